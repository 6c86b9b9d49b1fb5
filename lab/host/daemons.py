"""Long-running helper processes lab starts on the host: the lab registry, the lab's DNS.

A daemon is detached (its own session, so Ctrl-C in the terminal does not
reach it and it outlives the `lab` command), writes to a log file, and is
known by pid *and* start time (lab.host.processes): `stop_daemon` never
signals a pid that has since been reused by another process.

Services that answer nodes run as an unprivileged user when one is given:
nodes are untrusted clients, and a parsing bug in a daemon must not hand
them the host's root.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from lab.errors import PrerequisiteError, ProviderError
from lab.host.files import append_nofollow
from lab.host.processes import alive, interrupts_held, keep_detached, start_time, wait_gone

LOG_TAIL_BYTES = 2000


@dataclass(frozen=True)
class Daemon:
    pid: int
    start: str  # /proc start time: with the pid, which process this is


def start_daemon(argv: Sequence[str | Path], *, log: Path, what: str, user: str | None = None,
                 ready: Callable[[], bool] | None = None, timeout: float = 15.0,
                 on_start: Callable[[Daemon], None] | None = None) -> Daemon:
    """Start argv detached, output appended to `log`; return once ready() holds.

    on_start(daemon) runs as soon as the process exists, before a Ctrl-C can
    land: the caller records it there, so nothing it starts goes unrecorded.
    If the process exits, or `timeout` passes before it is ready, it is stopped
    and a ProviderError names `what` with the end of its log.
    """
    args = [str(a) for a in argv]
    account = None
    if user is not None:
        import pwd  # POSIX-only: only a service run as its own user needs it

        try:
            account = pwd.getpwnam(user)
        except KeyError:
            raise PrerequisiteError(f"{what} runs as the system user {user!r}, which does not exist",
                                    hint="run tools/install.sh (its packages create that user)") from None
    daemon = None
    try:
        # A Ctrl-C is held from the start to the record, and lands inside this try: whatever stops the
        # start (the Ctrl-C, a record that fails, a daemon never ready) stops the daemon too.
        with interrupts_held():
            try:
                with append_nofollow(log) as output:
                    process = subprocess.Popen(
                        args, stdin=subprocess.DEVNULL, stdout=output, stderr=output, start_new_session=True,
                        close_fds=True, cwd="/",
                        user=account.pw_uid if account else None, group=account.pw_gid if account else None,
                        extra_groups=[] if account else None)
            except FileNotFoundError:
                raise PrerequisiteError(f"{args[0]} is not installed (needed for {what})",
                                        hint="run tools/install.sh, which installs every host tool lab "
                                             "uses") from None
            keep_detached(process)
            daemon = Daemon(process.pid, start_time(process.pid) or "")
            if on_start is not None:
                on_start(daemon)
        deadline = time.monotonic() + timeout
        while not (ready is None or ready()):
            if process.poll() is not None:
                raise ProviderError(f"{what} exited at start (status {process.returncode})",
                                    hint=f"its log {log} ends with:\n{log_tail(log)}")
            if time.monotonic() > deadline:
                raise ProviderError(f"{what} was not ready within {timeout:.0f} s: stopped it",
                                    hint=f"its log {log} ends with:\n{log_tail(log)}")
            time.sleep(0.05)
    except BaseException:
        if daemon is not None:
            stop_daemon(daemon.pid, daemon.start)
            process.poll()  # reap it: it is our child
        raise
    return daemon


def stop_daemon(pid: int | None, start: str | None, timeout: float = 5.0) -> None:
    """SIGTERM the daemon if it is still the same process, SIGKILL if it outlives `timeout`."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if not alive(pid, start):
            return
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        _reap(pid)
        if wait_gone((pid, start), timeout):
            return
    raise ProviderError(f"process {pid} survived SIGKILL", hint="see `ps -o pid,stat,cmd -p {pid}`")


def daemon_alive(pid: int | None, start: str | None) -> bool:
    return alive(pid, start)


def log_tail(log: Path) -> str:
    try:
        with open(log, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - LOG_TAIL_BYTES))
            return f.read().decode(errors="replace").strip() or "(empty)"
    except OSError:
        return "(no log)"


def _reap(pid: int) -> None:
    """Collect the exit status if the daemon is this process's child (started by this `lab` command)."""
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return  # not our child: its own parent (or init) reaps it
        if done:
            return
        time.sleep(0.02)
