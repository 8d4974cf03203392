"""Where offlab keeps things: OFFLAB_HOME (default ~/.offlab) and the repository folders it reads."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def home() -> Path:
    """OFFLAB_HOME, default ~/.offlab; read on every call so tests can point it elsewhere."""
    return Path(os.environ.get("OFFLAB_HOME", Path.home() / ".offlab")).expanduser()


def datasets_dir() -> Path:
    """The dataset cache: one folder per dataset name."""
    return home() / "datasets"


def staging_dir() -> Path:
    """Temporary folders for atomic writes; on the same filesystem as the cache so rename is atomic."""
    return home() / ".staging"


def catalog_dir() -> Path:
    """The shipped catalog, behaviour policies and recipes (the repository's datasets/ folder)."""
    return Path(os.environ.get("OFFLAB_CATALOG_DIR", REPO_ROOT / "datasets"))


def evaluators_dir() -> Path:
    return REPO_ROOT / "evaluators"
