"""Host daemons the VM tests and benchmarks need, started by them when missing.

This machine has no systemd as PID 1, so nothing starts libvirtd; CI starts
with no processes at all. `libvirtd_running()` starts virtlogd and libvirtd
by hand (as MACHINE-NOTES describes) if the system socket does not answer,
and stops exactly those processes, by the PIDs in their own PID files,
afterwards. A daemon that was already running is left alone.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Iterator

RUN_DIR = Path("/run/lab-tests")


def libvirt_problem() -> str | None:
    """Why libvirt VMs cannot be tested here, or None."""
    if os.geteuid() != 0:
        return "needs root"
    for tool in ("libvirtd", "virtlogd", "virsh", "vagrant", "qemu-system-x86_64", "qemu-img"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (tools/install.sh installs it)"
    from lab.host.vagrant import plugin_installed

    if not plugin_installed("vagrant-libvirt"):
        return "the vagrant-libvirt plugin is not installed (apt-get install vagrant-libvirt)"
    return None


def _answering() -> bool:
    from lab.providers.vagrant.libvirt import libvirt_socket_problem

    return libvirt_socket_problem() is None


def _start(argv: list[str], pid_file: Path) -> int:
    pid_file.unlink(missing_ok=True)
    subprocess.run([*argv, "--daemon", "--pid-file", str(pid_file)], check=True,
                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while not pid_file.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return int(pid_file.read_text().strip())


def _stop(pid: int, timeout: float = 15.0) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def libvirtd_running() -> Iterator[bool]:
    """Yield with libvirt's system daemon answering; True if this call started it."""
    if _answering():
        yield False
        return
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    started: list[int] = []
    try:
        started.append(_start(["virtlogd"], RUN_DIR / "virtlogd.pid"))
        started.append(_start(["libvirtd"], RUN_DIR / "libvirtd.pid"))
        deadline = time.monotonic() + 30
        while not _answering():
            if time.monotonic() > deadline:
                raise RuntimeError("libvirtd started but its socket does not answer after 30 s")
            time.sleep(0.2)
        yield True
    finally:
        for pid in reversed(started):
            _stop(pid)
