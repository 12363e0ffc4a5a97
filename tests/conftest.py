"""Shared test settings: one torch thread per process (two cores, several processes), the CPU
kernels the CPU profiles pin (set before torch is imported, as the command line does), GPU skip,
the smoke profile's simulated series and its in-process sweep (each made once per session and
test worker)."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HRTEM_BOOK_THREADS", "1")

from hrtem_book.profiles import get_profile, pin_cpu  # noqa: E402  (pure Python: no torch)

pin_cpu(get_profile("smoke"))

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def smoke_data(tmp_path_factory) -> Path:
    """The smoke profile's series, simulated once for the whole session (about 15 s)."""
    from hrtem_book import datasets
    from hrtem_book.profiles import get_profile
    from hrtem_book.series import SERIES

    root = tmp_path_factory.mktemp("smoke-data") / "data" / "smoke"
    # one pass: the series that show the same scenes simulate them once
    datasets.generate(SERIES[0], get_profile("smoke").data, root, progress=False,
                      with_series=SERIES[1:])  # fmt: skip
    return root


def smoke_project(root: Path, smoke_data: Path) -> Path:
    """A new project folder whose ``data/smoke`` is a link to the session's smoke series."""
    (root / "data").mkdir(parents=True)
    (root / "data" / "smoke").symlink_to(smoke_data, target_is_directory=True)
    return root


@pytest.fixture(scope="session")
def smoke_sweep(tmp_path_factory, smoke_data) -> Path:
    """A project holding every run of the smoke profile, swept in this process and collected:
    the reference that the other executors and every recovery must reproduce. Copy it before
    changing it (``shutil.copytree(smoke_sweep, dst, symlinks=True)``)."""
    from hrtem_book.profiles import get_profile
    from hrtem_book.results import collect
    from hrtem_book.sweep import run_sweep

    smoke = get_profile("smoke")
    root = smoke_project(tmp_path_factory.mktemp("smoke-sweep"), smoke_data)
    summary = run_sweep("all", smoke, root, progress=False, log=lambda msg: None)
    assert summary.failed == summary.errors == 0, summary.failures
    collect(smoke, root)
    return root
