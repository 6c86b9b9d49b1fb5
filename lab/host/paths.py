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


def private_dir(path: Path) -> Path:
    """A directory only its owner can enter, for locks, registries and sockets.

    Created 0700; an existing one must be a real directory (not a symlink)
    owned by this user, else another local user could plant files or sockets
    where lab (often root) looks for its own.
    """
    from lab.errors import StateError

    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = path.lstat()
    if path.is_symlink() or not path.is_dir():
        raise StateError(f"{path} is not a directory lab made (a symlink or a file)",
                         hint=f"remove {path}; lab creates it again")
    if hasattr(os, "geteuid"):
        if info.st_uid != os.geteuid():
            raise StateError(f"{path} belongs to user id {info.st_uid}, not to you ({os.geteuid()})",
                             hint=f"remove {path}; lab creates it again")
        if info.st_mode & 0o077:
            os.chmod(path, 0o700)
    return path


def runtime_dir() -> Path:
    """Short-lived files such as ssh ControlPath sockets (kept short: socket paths max ~100 bytes)."""
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        return Path("/run/lab")
    value = os.environ.get("XDG_RUNTIME_DIR")
    return Path(value) / "lab" if value and os.path.isabs(value) else state_home() / "run"
