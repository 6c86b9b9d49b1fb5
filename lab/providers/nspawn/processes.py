"""The node processes as /proc shows them (supervisor, nspawn, the container's PID 1).

A process is known by its pid and its start time together (lab.host.processes):
a pid alone may be reused by an unrelated process after the node's one is gone.
"""

from __future__ import annotations

import os
from pathlib import Path

from lab.providers.nspawn.nodefs import read_node_text


def read_value(path: Path) -> str | None:
    """A small file's stripped text (/proc, /sys, pid files), or None if unreadable or a symlink."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as handle:
            return handle.read(65536).decode(errors="replace").strip()
    except OSError:
        return None


def runs_file(pid: int, path: Path) -> bool:
    """Whether the process's command line names `path` (the supervisor runs as `python -I -S PATH CONFIG`)."""
    try:
        return str(path) in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return False


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def container_init(nspawn_pid: int) -> int | None:
    """The container's PID 1 as seen from the host: nspawn's child in a new pid namespace."""
    try:
        own_ns = os.readlink(f"/proc/{nspawn_pid}/ns/pid")
    except OSError:
        return None  # gone meanwhile (or not ours to read: status checks root first)
    for child in _children(nspawn_pid):
        try:
            if os.readlink(f"/proc/{child}/ns/pid") != own_ns:
                return child
        except OSError:
            continue
    return None


def boot_id(init_pid: int) -> str | None:
    """The boot id of the container whose PID 1 this is (new at every boot). Read through the
    container's root, which its root user controls (a /proc of its own making, a FIFO): nodefs."""
    text = read_node_text(f"/proc/{init_pid}/root", "proc/sys/kernel/random/boot_id", cap=64)
    return text or None
