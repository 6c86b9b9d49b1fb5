"""Where lab finds its shipped resources and keeps its per-user files.

`Vagrantfile.j2`, `boxes/` and `scenarios/` live at the top of the source tree
and are copied into the wheel as `lab/_data/...` (see pyproject.toml), so the
same lookup works from a checkout, an editable install and a plain
`pip install .`.
"""

from __future__ import annotations

import os
from pathlib import Path

# lab/host/paths.py -> the `lab` package directory.
_PACKAGE_DIR = Path(__file__).resolve().parent.parent


def resource(name: str) -> Path:
    """Path of a top-level resource (`Vagrantfile.j2`, `boxes`, `scenarios`)."""
    for candidate in (_PACKAGE_DIR / "_data" / name, _PACKAGE_DIR.parent / name):
        if candidate.exists():
            return candidate
    raise FileNotFoundError(f"lab resource {name!r} is missing from this installation")


def _xdg(var: str, default: str) -> Path:
    value = os.environ.get(var)
    base = Path(value) if value and os.path.isabs(value) else Path.home() / default
    return base / "lab"


def cache_dir() -> Path:
    """Rebuildable data: node OS images."""
    return _xdg("XDG_CACHE_HOME", ".cache")


def state_home() -> Path:
    """Per-user state shared by all labs: the registry of subnets and bridges in use."""
    return _xdg("XDG_STATE_HOME", ".local/state")
