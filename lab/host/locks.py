"""Exclusive file locks that lab commands wait for, for a bounded time."""

from __future__ import annotations

import fcntl
import time
from typing import IO


def try_flock(file: int | IO, wait: float, interval: float = 0.1) -> bool:
    """Take an exclusive flock on `file`, trying again every `interval` seconds for up to `wait` seconds;
    False if another process still holds it then (the caller says who, from what the holder wrote)."""
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(interval)
