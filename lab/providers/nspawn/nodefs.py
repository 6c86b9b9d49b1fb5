"""Reading and writing files in a node's tree without following anything the node made.

A node's root user owns its upper layer, and through /proc/PID/root its whole
tree: any directory on the way to a file the host reads or writes there may be
a symlink to a host path, any file a FIFO, a device or a huge sparse file. Host
code therefore never hands such a path to open(): it walks it one component at
a time from a directory it trusts (`root`), each step an openat() with
O_NOFOLLOW, reads only regular files and at most `cap` bytes, and writes by
creating a new file beside the target and renaming it over (rename replaces a
planted symlink instead of following it).

Standard library only, imports nothing of lab: supervisor.py, run as a plain
file, uses it too.
"""

from __future__ import annotations

import os
import secrets
import stat

READ_CAP = 64 * 1024  # bytes: every file the host reads from a node is a small JSON or an id

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class UnsafeNodePath(OSError):
    """A path in a node's tree that the host refuses to follow, read or write through."""


def _parts(relpath: str) -> list[str]:
    parts = [p for p in relpath.split("/") if p not in ("", ".")]
    if not parts or ".." in parts or relpath.startswith("/"):
        raise UnsafeNodePath(f"{relpath!r} is not a relative path inside the node")
    return parts


def _open_dirs(root: str, parts: list[str], create: bool = False, owner: tuple[int, int] | None = None) -> int:
    """An fd of root/parts..., every component a real directory (not a symlink); with `create`,
    missing ones are made, 0755 and `owner`'s (in a mounted overlay, image directories keep theirs)."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)  # root is the host's, e.g. /proc/PID/root
    walked = root
    try:
        for part in parts:
            walked = os.path.join(walked, part)
            try:
                next_fd = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    raise
                os.mkdir(part, 0o755, dir_fd=fd)
                next_fd = os.open(part, _DIR_FLAGS, dir_fd=fd)
                os.fchmod(next_fd, 0o755)  # whatever the umask
                if owner is not None:
                    os.fchown(next_fd, *owner)
            except OSError as exc:  # ELOOP or ENOTDIR: a symlink, a file or a device
                raise UnsafeNodePath(f"{walked}: not a directory ({os.strerror(exc.errno)}): refused") from None
            os.close(fd)
            fd = next_fd
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_node_file(root: "os.PathLike | str", relpath: str, cap: int = READ_CAP) -> bytes:
    """The bytes of root/relpath, if every component is a real directory and the file a regular
    file of at most `cap` bytes; UnsafeNodePath (an OSError) otherwise, FileNotFoundError if absent.
    Never blocks on a FIFO, never opens a device."""
    root, parts = os.fspath(root), _parts(relpath)
    where = os.path.join(root, *parts)
    dir_fd = _open_dirs(root, parts[:-1])
    try:
        # O_PATH opens nothing: a device's or FIFO's open() never runs. The
        # inode is then pinned, and reopened for reading only if regular.
        path_fd = os.open(parts[-1], os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    finally:
        os.close(dir_fd)
    try:
        mode = os.fstat(path_fd).st_mode
        if not stat.S_ISREG(mode):
            raise UnsafeNodePath(f"{where}: not a regular file ({_kind(mode)}): refused")
        fd = os.open(f"/proc/self/fd/{path_fd}", os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    finally:
        os.close(path_fd)
    try:
        data = b""
        while len(data) <= cap:  # /proc files say size 0: trust only what read() returns
            chunk = os.read(fd, cap + 1 - len(data))
            if not chunk:
                break
            data += chunk
    finally:
        os.close(fd)
    if len(data) > cap:
        raise UnsafeNodePath(f"{where}: larger than {cap} bytes: refused")
    return data


def read_node_text(root: "os.PathLike | str", relpath: str, cap: int = READ_CAP) -> str | None:
    """read_node_file as stripped text, or None if it is absent or refused (a status probe's reader)."""
    try:
        return read_node_file(root, relpath, cap).decode(errors="replace").strip()
    except OSError:
        return None


def write_node_file(root: "os.PathLike | str", relpath: str, data: bytes, mode: int,
                    owner: tuple[int, int] | None = None) -> None:
    """Write root/relpath atomically with `mode` (and `owner`: uid, gid), making missing directories,
    refusing symlinks on the way (UnsafeNodePath)."""
    root, parts = os.fspath(root), _parts(relpath)
    dir_fd = _open_dirs(root, parts[:-1], create=True, owner=owner)
    tmp = f".{parts[-1]}.{secrets.token_hex(8)}.lab-tmp"  # unguessable: nothing can be planted there
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                     dir_fd=dir_fd)
        try:
            if owner is not None:
                os.fchown(fd, *owner)
            os.fchmod(fd, mode)  # after fchown, which clears set-id bits
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
        _replace(dir_fd, tmp, root, parts)
    finally:
        os.close(dir_fd)


def link_node_file(root: "os.PathLike | str", relpath: str, target: str,
                   owner: tuple[int, int] | None = None) -> None:
    """Make root/relpath a symlink to `target` (a path as the node sees it, never followed here),
    replacing what was there, making missing directories, refusing symlinks on the way."""
    root, parts = os.fspath(root), _parts(relpath)
    dir_fd = _open_dirs(root, parts[:-1], create=True, owner=owner)
    tmp = f".{parts[-1]}.{secrets.token_hex(8)}.lab-tmp"
    try:
        os.symlink(target, tmp, dir_fd=dir_fd)
        if owner is not None:
            os.chown(tmp, *owner, dir_fd=dir_fd, follow_symlinks=False)
        _replace(dir_fd, tmp, root, parts)
    finally:
        os.close(dir_fd)


def _replace(dir_fd: int, tmp: str, root: str, parts: list[str]) -> None:
    """Rename `tmp` over the last of `parts` in dir_fd: a planted symlink is replaced, never followed."""
    try:
        os.rename(tmp, parts[-1], src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except OSError as exc:  # EISDIR: the node put a directory there
        os.unlink(tmp, dir_fd=dir_fd)
        raise UnsafeNodePath(f"{os.path.join(root, *parts)}: {os.strerror(exc.errno)}: refused") from None


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISLNK, "a symlink"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a directory")):
        if test(mode):
            return name
    return "not a file"
