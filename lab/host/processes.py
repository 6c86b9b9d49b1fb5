"""Processes on the host as /proc shows them, known by pid *and* start time.

A pid alone may name an unrelated process once the one lab started is gone:
lab records the start time beside every pid it may later signal or wait for
(node supervisors, the `lab up` holding a subnet claim) and trusts the pid
only while both still match.
"""

from __future__ import annotations

import signal
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def stat_fields(pid: int) -> list[str] | None:
    """/proc/PID/stat after the command name (which may hold spaces and parentheses): state, ppid, ..."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def start_time(pid: int) -> str | None:
    """Process start time in clock ticks: with the pid, a unique process identity."""
    fields = stat_fields(pid)
    return fields[19] if fields else None


def parent_of(pid: int) -> int | None:
    fields = stat_fields(pid)
    return int(fields[1]) if fields else None


def alive(pid: int | None, started: str | None) -> bool:
    """Whether the process (pid, start time) still runs; without a start time nothing proves which process
    a pid names, so it counts as gone (lab never signals a pid it cannot identify)."""
    if not pid or started is None:
        return False
    fields = stat_fields(pid)
    return fields is not None and fields[19] == started and fields[0] != "Z"


def wait_gone(process: tuple[int | None, str | None], timeout: float) -> bool:
    """Until the process (pid, start time) is gone; False if it outlives the timeout."""
    deadline = time.monotonic() + timeout
    while alive(*process):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


# Detached children (node supervisors, the lab's registry and DNS) outlive the command that starts them.
# A Popen object collected while its process runs warns from its __del__, and a Ctrl-C that arrives during
# that __del__ is swallowed ("Exception ignored in: Popen.__del__"): `lab up` then went on instead of
# rolling back. Holding them until the command exits keeps __del__ out of the way.
_DETACHED: list = []


def keep_detached(process) -> None:
    """Keep the Popen of a process meant to outlive this command referenced until the command exits."""
    _DETACHED.append(process)



class Terminated(KeyboardInterrupt):
    """SIGTERM (a CI runner cancelling a job, `kill PID`), raised where a Ctrl-C would be: the same
    rollback and cleanup run, and the command exits 143 instead of 130."""


def raise_terminated(signum: int, frame: object) -> None:
    """The SIGTERM handler a command installs (lab.cli.main): stop as on Ctrl-C."""
    raise Terminated()


def interrupt_signals() -> list[int]:
    """The signals that interrupt this command: SIGINT, and SIGTERM once the command made it one."""
    return [signal.SIGINT] + ([signal.SIGTERM] if signal.getsignal(signal.SIGTERM) is raise_terminated else [])


@contextmanager
def interrupts_held() -> Iterator[None]:
    """Hold a Ctrl-C (SIGINT), and a SIGTERM the command turned into one, until the block ends; then
    deliver them.

    For starting a detached process and recording it: a KeyboardInterrupt
    between the two left a process nobody knew of (the rollback, and destroy,
    found no record of it). Only the main thread receives Python's signal
    handlers, so elsewhere this holds nothing and needs to hold nothing. The
    handler is swapped, not the signal mask: a child inherits the mask, and a
    supervisor started with SIGINT blocked would never see it.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = {}
    for signum in interrupt_signals():
        previous[signum] = signal.signal(signum, lambda signum, frame: received.append(signum))
        if previous[signum] is None:  # installed outside Python: Python's own takes its place afterwards
            previous[signum] = signal.default_int_handler
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if received:
            signal.raise_signal(received[0])
