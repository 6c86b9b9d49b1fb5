"""Where lab finds its shipped resources and keeps its per-user files.

`Vagrantfile.j2`, `boxes/` and `scenarios/` live at the top of the source tree
and are copied into the wheel as `lab/_data/...` (see pyproject.toml), so the
same lookup works from a checkout, an editable install and a plain
`pip install .`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# lab/host/paths.py -> the `lab` package directory.
_PACKAGE_DIR = Path(__file__).resolve().parent.parent


def resource(name: str) -> Path:
    """Path of a top-level resource (`Vagrantfile.j2`, `boxes`, `scenarios`)."""
    for candidate in (_PACKAGE_DIR / "_data" / name, _PACKAGE_DIR.parent / name):
        if candidate.exists():
            return candidate
    raise FileNotFoundError(f"lab resource {name!r} is missing from this installation")


def _user_dirs():
    """platformdirs' answer for this OS: XDG on Linux (exactly the ~/.cache/lab, ~/.local/state/lab
    and $XDG_*_HOME/lab lab always used), ~/Library/... on macOS, %LOCALAPPDATA%\\lab on Windows."""
    from platformdirs import PlatformDirs

    return PlatformDirs("lab", appauthor=False)


def cache_dir() -> Path:
    """Rebuildable data: node OS images, boxes, the registry's blobs."""
    return Path(_user_dirs().user_cache_dir)


def state_home() -> Path:
    """Per-user state shared by all labs: the registry of subnets in use, the labs' locks."""
    return Path(_user_dirs().user_state_dir)


def effective_uid() -> int | None:
    """This process's user id where the OS has one (None on Windows): who owns what lab made."""
    return os.geteuid() if hasattr(os, "geteuid") else None


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
    uid = effective_uid()
    if uid is not None:  # Windows: the user's profile folder's ACL already keeps other users out
        if info.st_uid != uid:
            raise StateError(f"{path} belongs to user id {info.st_uid}, not to you ({uid})",
                             hint=f"remove {path}; lab creates it again")
        if info.st_mode & 0o077:
            os.chmod(path, 0o700)
    return path


def runtime_dir() -> Path:
    """Short-lived files such as ssh ControlPath sockets (kept short: socket paths max ~100 bytes)."""
    if not sys.platform.startswith("linux"):
        # macOS has no /run nor XDG_RUNTIME_DIR; ~/Library/Caches/lab/run stays short and has no space
        # (Application Support has one, and ssh_config's ControlPath is not quoted).
        return cache_dir() / "run"
    if effective_uid() == 0:
        return Path("/run/lab")
    value = os.environ.get("XDG_RUNTIME_DIR")
    return Path(value) / "lab" if value and os.path.isabs(value) else state_home() / "run"
