"""Exclusive file locks that lab commands wait for, for a bounded time, and that say who holds them.

The lock itself is `filelock`'s: flock on Linux and macOS, LockFileEx on
Windows. Who holds it lives in a file beside it (`NAME.holder`), not in the
locked file: on Windows a locked byte cannot even be read by a waiter, and
`filelock` may create, empty or remove its own file as it sees fit.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable, Iterator

from lab.errors import LabError, StateError
from lab.host.files import write_atomic

UNKNOWN_HOLDER = "another lab command"


class ExclusiveLock:
    """One exclusive lock on `path`, shared by every lab process of this user on this host.

    `holder` describes this process to a waiter that gives up (e.g. "`lab up` (pid 123)").
    Not re-entrant: a second ExclusiveLock on the same path waits, even in the same process.
    """

    def __init__(self, path: Path, holder: str) -> None:
        from filelock import FileLock  # imported here: `lab --help` does not need it

        self.path = path
        self.holder_path = path.with_name(path.name + ".holder")
        self.description = holder
        self._lock = FileLock(str(path))

    def acquire(self, wait: float, interval: float = 0.1) -> bool:
        """Take the lock, trying every `interval` seconds for up to `wait` seconds; False if another
        process still holds it then (`holder()` says which, as it described itself)."""
        from filelock import Timeout

        if self.path.is_symlink():  # lab as root must not lock (create, truncate) through a planted link
            raise StateError(f"{self.path} is a symlink, not a lock file lab made",
                             hint=f"remove {self.path}; lab creates it again")
        try:
            self._lock.acquire(timeout=max(wait, 0.0), poll_interval=interval)
        except Timeout:
            return False
        try:
            write_atomic(self.holder_path, self.description + "\n")
        except OSError:
            pass  # who holds it is a courtesy to waiters, never a reason to fail the command
        return True

    def holder(self) -> str:
        """Who holds the lock, as the holder described itself; UNKNOWN_HOLDER if it left no word."""
        try:
            return self.holder_path.read_text(encoding="utf-8").strip() or UNKNOWN_HOLDER
        except OSError:
            return UNKNOWN_HOLDER

    def release(self) -> None:
        # The description goes first: once the lock is free, the next holder writes its own.
        with contextlib.suppress(OSError):  # on Windows a waiter reading it keeps it for a moment
            self.holder_path.unlink(missing_ok=True)
        self._lock.release()


@contextlib.contextmanager
def holding(path: Path, holder: str, wait: float, busy: Callable[[str], LabError],
            interval: float = 0.1) -> Iterator[None]:
    """Hold the lock on `path` for the block; if another process still holds it after `wait` seconds,
    raise busy(who holds it)."""
    lock = ExclusiveLock(path, holder)
    if not lock.acquire(wait, interval):
        raise busy(lock.holder())
    try:
        yield
    finally:
        lock.release()
