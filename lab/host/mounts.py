"""The host's mounts, read from /proc/self/mountinfo, and unmounting what lies below a directory.

Image builds leave mounts in their tree when interrupted (debootstrap's /proc
and /sys), and node directories hold overlays: whoever deletes such a tree
unmounts what is below it first, deepest first.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from lab.host.run import run

MOUNTINFO = Path("/proc/self/mountinfo")


@dataclass(frozen=True)
class Mount:
    mount_point: Path
    fs_type: str
    super_options: str  # e.g. an overlay's lowerdir=...,upperdir=...


def unescape_mountinfo(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as \\ooo octal; other characters
    (UTF-8 names) are written as they are."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def parse_mountinfo(text: str) -> list[Mount]:
    """The mounts of a mountinfo(5) text (pure)."""
    mounts = []
    for line in text.splitlines():
        before, _, after = line.partition(" - ")
        fields, tail = before.split(), after.split()
        if len(fields) < 5 or len(tail) < 3:
            continue
        mounts.append(Mount(Path(unescape_mountinfo(fields[4])), tail[0], unescape_mountinfo(tail[2])))
    return mounts


def mounted(fs_types: tuple[str, ...] | None = None) -> list[Mount]:
    """What is mounted now, as this process sees it; with `fs_types`, mounts of those types only (the lines
    are picked before they are parsed: a host running 100 nodes has thousands of other mounts)."""
    text = MOUNTINFO.read_text()
    if fs_types is not None:
        text = "\n".join(line for line in text.splitlines()
                         if line.partition(" - ")[2].split(" ", 1)[0] in fs_types)
    return parse_mountinfo(text)


def is_below(path: Path, top: Path) -> bool:
    return path == top or top in path.parents


def mount_points_below(top: Path) -> list[Path]:
    """Mount points at or below `top`, deepest first (the order to unmount them in)."""
    top = top.resolve()  # mountinfo names real paths
    return sorted({m.mount_point for m in mounted() if is_below(m.mount_point, top)},
                  key=lambda p: len(p.parts), reverse=True)


def is_mount_point(path: Path) -> bool:
    """Whether something is mounted at `path` (a bind mount of the same filesystem too, which
    os.path.ismount does not see)."""
    path = path.resolve()
    return any(m.mount_point == path for m in mounted())


def unmount_below(top: Path) -> None:
    """Unmount everything mounted at or below `top`, deepest first (mounts stacked on one point too)."""
    for _ in range(8):  # each pass takes one layer of every stack
        points = mount_points_below(top)
        if not points:
            return
        for mount_point in points:
            if not run(["umount", mount_point], check=False).ok:
                # Busy (a process of an interrupted build still inside): detach it
                # now; the kernel finishes the unmount when the last user is gone.
                run(["umount", "--lazy", mount_point], check=False)