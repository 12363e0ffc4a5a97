"""A module imported on first use, for the modules a command line loads before it checks its
arguments: the studies' registry names every study, but a refused ``--study nope`` must not wait
for xarray or SciPy (seconds on two cores). As :mod:`hrtem_book.metrics` does for torch."""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any


class LazyModule:
    """Stands for the module ``name``; the first attribute read imports it, and each attribute
    read is kept, so that later reads are plain lookups."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._module: ModuleType | None = None

    def __getattr__(self, attr: str) -> Any:
        if self._module is None:
            self._module = importlib.import_module(self._name)
        value = getattr(self._module, attr)
        setattr(self, attr, value)
        return value

    def __repr__(self) -> str:
        return f"<module {self._name!r}, imported on first use>"
