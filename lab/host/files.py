"""Files the host writes: atomically, so a crash or Ctrl-C never leaves half a file; and
files the host ships to nodes or into images: with LF line ends, whatever the checkout has.

A Windows clone with `core.autocrlf=true` turns every text file of the
repository into CRLF; a node given such a unit file, shell script or Python
module fails in odd ways (`/bin/sh^M: not found`, `Unknown section
'Service'^M`). `.gitattributes` keeps lab's own files LF; `to_lf` is the
guard at each point where a file leaves the host, for checkouts and copies
that did not honour it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


def write_atomic(path: Path, text: str, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # newline="\n": the same bytes on every OS (text mode on Windows would write CRLF).
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def append_nofollow(path: Path):
    """A file opened for appending that is never a symlink (lab as root must not write through one)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    return os.fdopen(fd, "ab")


def to_lf(data: bytes) -> bytes:
    """`data` with its CRLF line ends made LF if it is text (UTF-8, no NUL byte); anything else as is.

    Deciding by content lets every shipping point call it on whatever it sends:
    a binary (an etcd build, an image layer) is never altered.
    """
    if b"\r\n" not in data or b"\0" in data:
        return data
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return data
    return data.replace(b"\r\n", b"\n")


def copy_as_lf(source: Path, target: Path) -> None:
    """`shutil.copy2(source, target)` (a symlink stays a link), a text file's CRLF line ends made LF."""
    if source.is_symlink():
        shutil.copy2(source, target, follow_symlinks=False)
        return
    target.write_bytes(to_lf(source.read_bytes()))
    shutil.copystat(source, target)
