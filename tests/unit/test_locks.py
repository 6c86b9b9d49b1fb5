"""lab's file locks (filelock underneath): a bounded wait, and a waiter that gives up says who holds it."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from lab.errors import StateError
from lab.host.locks import UNKNOWN_HOLDER, ExclusiveLock, holding

HOLD_IN_ANOTHER_PROCESS = """\
import sys, time
from pathlib import Path
from lab.host.locks import ExclusiveLock
lock = ExclusiveLock(Path(sys.argv[1]), "`lab up` (pid 4242)")
assert lock.acquire(5)
print("held", flush=True)
sys.stdin.readline()
lock.release()
"""


def test_a_second_holder_waits_a_bounded_time_and_learns_who_holds_it(tmp_path: Path) -> None:
    path = tmp_path / "lab.lock"
    first, second = ExclusiveLock(path, "`lab up` (pid 1)"), ExclusiveLock(path, "`lab destroy` (pid 2)")
    assert first.acquire(0)
    started = time.monotonic()
    assert not second.acquire(0.3, interval=0.05)
    assert 0.3 <= time.monotonic() - started < 3
    assert second.holder() == "`lab up` (pid 1)"
    first.release()
    assert second.holder() == UNKNOWN_HOLDER  # a released lock names nobody
    assert second.acquire(0)
    assert first.holder() == "`lab destroy` (pid 2)"
    second.release()


def test_another_process_holding_it_is_named(tmp_path: Path) -> None:
    path = tmp_path / "registry.lock"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_IN_ANOTHER_PROCESS, str(path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(StateError, match=r"busy: `lab up` \(pid 4242\) holds it"):
            with holding(path, "`lab image import` (pid 3)", 0.2,
                         busy=lambda who: StateError(f"busy: {who} holds it")):
                pass
    finally:
        holder.communicate("\n", timeout=30)
    with holding(path, "`lab image import` (pid 3)", 5, busy=lambda who: StateError(who)):
        assert (tmp_path / "registry.lock.holder").read_text() == "`lab image import` (pid 3)\n"
    assert not (tmp_path / "registry.lock.holder").exists()


def test_a_planted_symlink_is_not_locked_through(tmp_path: Path) -> None:
    target = tmp_path / "precious"
    target.write_text("keep me")
    (tmp_path / "lab.lock").symlink_to(target)
    with pytest.raises(StateError, match="is a symlink"):
        ExclusiveLock(tmp_path / "lab.lock", "`lab up`").acquire(0)
    assert target.read_text() == "keep me"
