"""The node processes as /proc shows them (supervisor, nspawn, the container's PID 1).

A process is known by its pid and its start time together: a pid alone may be
reused by an unrelated process after the node's one is gone.
"""

from __future__ import annotations

import os
import time
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


def start_time(pid: int) -> str | None:
    """Process start time in clock ticks: with the pid, a unique process identity."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def alive(pid: int | None, started: str | None) -> bool:
    """Whether the process (pid, start time) still runs; without a start time nothing proves which process
    a pid names, so it counts as gone (lab never signals a pid it cannot identify)."""
    if not pid or started is None:
        return False
    now = start_time(pid)
    if now is None or now != started:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def wait_gone(process: tuple[int | None, str | None], timeout: float) -> bool:
    """Until the process (pid, start time) is gone; False if it outlives the timeout."""
    deadline = time.monotonic() + timeout
    while alive(*process):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def parent_of(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
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
