"""Where fsagen's data files live.

Two layouts must work:
- a source tree, run with only PYTHONPATH=<repo> (how it runs on the GPU machine) or installed
  editable: schedules/, templates/ and generated/ sit beside the fsagen package;
- a regular install: schedules/ and templates/ are package data (fsagen/schedules_data,
  fsagen/templates_data, see pyproject.toml) and there is no repo.
The repo layout is tried first.
"""
from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
_REPO_ROOT = PACKAGE_DIR.parent


def source_tree() -> Path | None:
    """The repository root when fsagen runs from a source tree, else None."""
    if (_REPO_ROOT / "pyproject.toml").is_file() and (_REPO_ROOT / "schedules").is_dir():
        return _REPO_ROOT
    return None


def _data_dir(repo_name: str, package_name: str) -> Path:
    root = source_tree()
    if root is not None:
        return root / repo_name
    return PACKAGE_DIR / package_name


def schedules_dir() -> Path:
    """$FSAGEN_SCHEDULES_DIR (your own schedule files, e.g. for new hardware or a sweep), else the
    schedules shipped with fsagen."""
    env = os.environ.get("FSAGEN_SCHEDULES_DIR")
    if env:
        return Path(env).expanduser()
    return _data_dir("schedules", "schedules_data")


def templates_dir() -> Path:
    return _data_dir("templates", "templates_data")


def default_grid_file() -> Path:
    return PACKAGE_DIR / "grids" / "default.toml"


def kernels_dir() -> Path:
    return PACKAGE_DIR / "kernels"


def generated_dir() -> Path:
    """Root of AOT builds: $FSAGEN_GENERATED_DIR, else the repo's generated/, else ./generated."""
    env = os.environ.get("FSAGEN_GENERATED_DIR")
    if env:
        return Path(env).expanduser()
    root = source_tree()
    return root / "generated" if root is not None else Path.cwd() / "generated"


def cache_dir() -> Path:
    """Root of the user cache (JIT builds): $FSAGEN_CACHE_DIR, else ~/.cache/fsagen."""
    env = os.environ.get("FSAGEN_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "fsagen"
