"""The host kernel limit a lab of many nspawn nodes meets first: inotify instances.

Every node's systemd, journald, logind, networkd and Docker each hold inotify
instances (8 per node measured here with Docker running). A container's
instances are charged to the user that created its user namespace as well,
so all of them count against root's `fs.inotify.max_user_instances` (128 on
Debian): past ~20 nodes a node's systemd stops at boot with "Failed to create
control group inotify object: Too many open files". lab checks before booting
and says how to raise it, as kind's documentation does for its nodes; it does
not change the host's kernel settings itself.
"""

from __future__ import annotations

import os
from pathlib import Path

from lab.errors import PrerequisiteError

INOTIFY_PER_NODE = 10  # 8 measured with Docker running, and a margin
LIMIT_FILE = Path("/proc/sys/fs/inotify/max_user_instances")
CONTAINER_UIDS_START = 0x80000  # the ranges nspawn picks for containers' users begin here


def inotify_instances_used(proc: Path = Path("/proc")) -> int:
    """inotify instances charged to root: its own processes' and those of containers (any process of a
    uid in nspawn's container ranges). An fd shared by forked processes counts twice: this errs high."""
    used = 0
    for entry in os.scandir(proc):
        if not entry.name.isdigit():
            continue
        try:
            uid = entry.stat(follow_symlinks=False).st_uid
            if uid != 0 and uid < CONTAINER_UIDS_START:
                continue
            fds = proc / entry.name / "fd"
            used += sum(1 for fd in os.listdir(fds) if _is_inotify(fds / fd))
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return used


def _is_inotify(fd: Path) -> bool:
    try:
        return os.readlink(fd) == "anon_inode:inotify"
    except OSError:
        return False


def inotify_problem(nodes_to_start: int, limit: int | None = None, used: int | None = None) -> PrerequisiteError | None:
    """Why `nodes_to_start` more nodes would not boot for want of inotify instances, or None."""
    if nodes_to_start <= 0:
        return None
    if limit is None:
        try:
            limit = int(LIMIT_FILE.read_text())
        except (OSError, ValueError):
            return None
    used = inotify_instances_used() if used is None else used
    needed = nodes_to_start * INOTIFY_PER_NODE
    if used + needed <= limit:
        return None
    fits = max(0, (limit - used) // INOTIFY_PER_NODE)
    suggested = max(1024, -(-(used + needed) // 512) * 512)
    return PrerequisiteError(
        f"{nodes_to_start} node(s) need about {needed} inotify instances (~{INOTIFY_PER_NODE} each: systemd, "
        f"journald, Docker) and root has {max(0, limit - used)} of fs.inotify.max_user_instances={limit} left: "
        "their systemd would stop at boot with 'Too many open files'",
        hint=f"raise the limit: `sysctl -w fs.inotify.max_user_instances={suggested}` (a line in /etc/sysctl.d/ "
             f"keeps it), or start fewer nodes ({fits} fit now)")
