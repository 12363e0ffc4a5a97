"""The parameters every figure notebook and executable chapter declares, resolved in one place.

A notebook's or chapter's ``parameters`` cell declares ``profile = None`` (and, where it reads
results, ``results_dir = None``) beside its own parameters (``reduction``, ...). The book's build
and the live pages inject the profile they build and its results folder, relative to the
notebook (:func:`~hrtem_book.book.build.relative_to_notebooks`); a notebook opened on its own
resolves the defaults here: the shipped profile when its databases are in the repository, else
the laptop profile, and that profile's results folder. Nothing in a cell names a profile.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

from ..layout import Layout, database_file
from ..profiles import PROFILES, get_profile
from ..studies import STUDY_NAMES

DEFAULT_PROFILE = "laptop"  # runs end to end on a laptop CPU
SHIPPED_PROFILE = "gpu"  # preferred once defined and its databases are committed under results/
PROJECT_ROOT = ".."  # the project folder, seen from notebooks/ and chapters/


def missing_studies(results_dir: str | Path) -> list[str]:
    """The studies without a database in the folder ``results_dir``."""
    return [s for s in STUDY_NAMES if not database_file(results_dir, s).is_file()]


def default_profile(root: str | Path = ".") -> str:
    """The shipped profile (``gpu``) when it is a defined profile and its databases are in the
    repository (``results/gpu/*.nc``), else the laptop profile."""
    shipped = Layout(root, SHIPPED_PROFILE).results_dir
    if SHIPPED_PROFILE in PROFILES and not missing_studies(shipped):
        return SHIPPED_PROFILE
    return DEFAULT_PROFILE


class Page(NamedTuple):
    """A notebook's or chapter's resolved parameters: the profile's name and its results folder
    (relative to the notebook, as the build injects it)."""

    profile: str
    results_dir: str


def resolve(
    profile: str | None = None, results_dir: str | Path | None = None, root: str = PROJECT_ROOT
) -> Page:
    """``profile`` (None: :func:`default_profile` of ``root``) checked against the defined
    profiles, and ``results_dir`` (None: that profile's results folder under ``root``)."""
    name = get_profile(profile or default_profile(root)).name
    folder = results_dir if results_dir is not None else Layout(root, name).results_dir
    return Page(name, str(folder))
