"""A node's uid range, and the image as that range sees it, without chowning anything.

A node in a user namespace is root only of its own uid range. nspawn's way to
give it a tree it owns is to chown the node's tree into the range at the first
boot; through the overlay that copies up every inode of the image outside /usr
(~1 600 here), one at a time: ~1.3 s of each node's first boot on this machine,
most of what a big lab costs. Instead lab mounts the image idmapped into the
node's range (an idmapped bind mount: the same files, their owners shown moved
up by the range's first uid, nothing copied) and uses that as the overlay's
lower layer, with the node's own layer's root owned by the range. nspawn
(`--private-users=pick`) reads the range from the tree's root, takes its lock
for that range as for any container, finds the tree already owned by it and
chowns nothing. If another container holds the range, nspawn picks another and
chowns the tree into it as before: slower, still right, and the node keeps that
range (lab reads it back from the node's layer).

Every node has a range of its own: kernel quotas charged per uid (200 keys per
uid, 16 per node after boot) are never shared by two nodes.

Idmapped mounts need Linux 5.12 (overlayfs layers on them, 5.19); where they
fail the node is made as before.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import subprocess
import time
from pathlib import Path

RANGE = 0x10000  # uids per node: a whole 16-bit range, as nspawn gives a container
PICK_FIRST, PICK_END = 0x00080000, 0x6FFF0000  # the ranges nspawn picks from for containers

_SYS_OPEN_TREE, _SYS_MOVE_MOUNT, _SYS_MOUNT_SETATTR = 428, 429, 442  # one table for every architecture
_OPEN_TREE_CLONE, _AT_EMPTY_PATH, _AT_FDCWD = 1, 0x1000, -100
_MOUNT_ATTR_RDONLY, _MOUNT_ATTR_NOSUID, _MOUNT_ATTR_NODEV, _MOUNT_ATTR_IDMAP = 0x1, 0x2, 0x4, 0x00100000
_MOVE_MOUNT_F_EMPTY_PATH = 0x4


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


def ranges_in_use(proc: Path = Path("/proc")) -> set[int]:
    """The first uid of every range a process of this host runs in (any container's, any lab's)."""
    found = set()
    for entry in os.scandir(proc):
        if not entry.name.isdigit():
            continue
        try:
            fields = (proc / entry.name / "uid_map").read_text().split()
        except OSError:
            continue
        if len(fields) >= 3 and fields[1] != "0":
            found.add(int(fields[1]) & ~(RANGE - 1))
    return found


def choose_range(name: str, taken: set[int]) -> int:
    """A free range for the machine `name`: where its name hashes to in nspawn's region, else the next free."""
    slots = (PICK_END - PICK_FIRST) // RANGE
    start = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") % slots
    for step in range(slots):
        base = PICK_FIRST + ((start + step) % slots) * RANGE
        if base not in taken:
            return base
    raise OSError(errno.ENOSPC, "every container uid range is taken")


def mount_idmapped(source: Path, target: Path, base: int) -> None:
    """Mount `source` read-only, nosuid and nodev at `target` with every owner shown moved up by `base`.
    OSError if the kernel cannot (too old, or the filesystem does not support idmapped mounts)."""
    libc = ctypes.CDLL(None, use_errno=True)
    userns = _user_namespace_fd(base)
    try:
        tree = libc.syscall(_SYS_OPEN_TREE, _AT_FDCWD, os.fsencode(source), _OPEN_TREE_CLONE | os.O_CLOEXEC)
        if tree < 0:
            raise _os_error("open_tree", source)
        try:
            # nosuid, nodev: seen from the host, the image's set-uid files would grant the node's root uid.
            attr = _MountAttr(_MOUNT_ATTR_IDMAP | _MOUNT_ATTR_RDONLY | _MOUNT_ATTR_NOSUID | _MOUNT_ATTR_NODEV,
                              0, 0, userns)
            if libc.syscall(_SYS_MOUNT_SETATTR, tree, b"", _AT_EMPTY_PATH, ctypes.byref(attr),
                            ctypes.sizeof(attr)) < 0:
                raise _os_error("mount_setattr (idmap)", source)
            if libc.syscall(_SYS_MOVE_MOUNT, tree, b"", _AT_FDCWD, os.fsencode(target),
                            _MOVE_MOUNT_F_EMPTY_PATH) < 0:
                raise _os_error("move_mount", target)
        finally:
            os.close(tree)
    finally:
        os.close(userns)


def _user_namespace_fd(base: int) -> int:
    """An fd of a new user namespace mapping 0..65535 to base..base+65535 (what an idmapped mount needs).
    Made by a short-lived `unshare --user` child whose maps this (root) process writes: no fork of
    this multi-threaded process."""
    child = subprocess.Popen(["unshare", "--user", "sleep", "10"], stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        own = os.readlink("/proc/self/ns/user")
        deadline = time.monotonic() + 5
        while os.readlink(f"/proc/{child.pid}/ns/user") == own:
            if child.poll() is not None or time.monotonic() > deadline:
                raise OSError(errno.ESRCH, "unshare --user did not start")
            time.sleep(0.001)
        for name in ("uid_map", "gid_map"):
            with open(f"/proc/{child.pid}/{name}", "w") as mapping:
                mapping.write(f"0 {base} {RANGE}\n")
        return os.open(f"/proc/{child.pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        child.kill()
        child.wait()


def _os_error(call: str, path: Path) -> OSError:
    code = ctypes.get_errno()
    return OSError(code, f"{call} of {path}: {os.strerror(code)}")
