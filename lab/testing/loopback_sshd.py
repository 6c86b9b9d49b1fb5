"""An sshd on 127.0.0.1 that stands for another machine reached over SSH (the remote-libvirt tests).

`loopback_sshd()` starts OpenSSH's sshd as root on a free loopback port with
a host key and one authorized client key of its own (nothing of the host's
sshd configuration or keys is used or changed), and stops it afterwards.

What logs in with the system's `ssh` (libvirt's qemu+ssh transport, Vagrant's
ProxyCommand) finds the host's key and the client key as a user's
~/.ssh/config would give them: `ssh_path` is a directory to put first on
PATH, whose `ssh` runs the real one with this server's own ssh_config. The
user's ~/.ssh is never touched. lab itself logs in with paramiko: the client
key through the URI's `keyfile=`, the host key pinned at first contact.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

SSHD = Path("/usr/sbin/sshd")
PRIVILEGE_SEPARATION_DIR = Path("/run/sshd")  # sshd refuses to start without it


@dataclass(frozen=True)
class LoopbackSshd:
    port: int
    client_key: Path     # authorized for root
    known_hosts: Path    # lists the server's host key as [127.0.0.1]:PORT
    ssh_path: Path       # put first on PATH: its `ssh` knows this server
    log: Path            # sshd's log at DEBUG1: a forwarded channel shows as "target ADDRESS port PORT"

    def forwarded_ports(self) -> set[tuple[str, int]]:
        """Every (address, port) a client had this server connect to (direct-tcpip: ProxyJump, -W; paramiko
        names no originator: "originator  port 0")."""
        import re

        return {(address, int(port)) for address, port in
                re.findall(r"direct_tcpip: originator \S* ?port \d+, target (\S+) port (\d+)", self.log.read_text())}

    def uri(self) -> str:
        return f"qemu+ssh://root@127.0.0.1:{self.port}/system?keyfile={self.client_key}"


def sshd_problem() -> str | None:
    if not SSHD.is_file():
        return f"{SSHD} is not installed (tools/install.sh installs openssh-server)"
    if shutil.which("ssh-keygen") is None or shutil.which("ssh") is None:
        return "the OpenSSH client is not installed (openssh-client)"
    return None


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
    return found


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _keygen(path: Path) -> str:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "lab-test", "-f", str(path)], check=True)
    return path.with_suffix(".pub").read_text().strip()


@contextlib.contextmanager
def loopback_sshd(directory: Path) -> Iterator[LoopbackSshd]:
    directory.mkdir(parents=True, exist_ok=True)
    host_key = _keygen(directory / "host_ed25519")
    client_key = directory / "client_ed25519"
    (directory / "authorized_keys").write_text(_keygen(client_key) + "\n")
    port = _free_port()
    known_hosts = directory / "known_hosts"
    known_hosts.write_text(f"[127.0.0.1]:{port} {' '.join(host_key.split()[:2])}\n")
    config = directory / "sshd_config"
    config.write_text(f"""\
Port {port}
ListenAddress 127.0.0.1
HostKey {directory / 'host_ed25519'}
AuthorizedKeysFile {directory / 'authorized_keys'}
PermitRootLogin prohibit-password
AllowUsers root
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
AllowTcpForwarding yes
PidFile none
LogLevel DEBUG1
""")
    client_config = directory / "ssh_config"
    client_config.write_text(f"""\
Host 127.0.0.1
  UserKnownHostsFile {known_hosts}
  StrictHostKeyChecking yes
  IdentityFile {client_key}
  IdentitiesOnly yes
  BatchMode yes
""")
    ssh_path = directory / "bin"
    ssh_path.mkdir(exist_ok=True)
    wrapper = ssh_path / "ssh"
    real_ssh = shlex.quote(shutil.which("ssh") or "ssh")
    wrapper.write_text(f'#!/bin/sh\nexec {real_ssh} -F {shlex.quote(str(client_config))} "$@"\n')
    wrapper.chmod(0o755)
    made_dir = not PRIVILEGE_SEPARATION_DIR.exists()
    PRIVILEGE_SEPARATION_DIR.mkdir(mode=0o755, exist_ok=True)
    log = (directory / "sshd.log").open("w")
    process = subprocess.Popen([str(SSHD), "-D", "-e", "-f", str(config)], stdin=subprocess.DEVNULL,
                               stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 15
        while True:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"sshd did not start: {(directory / 'sshd.log').read_text()[-2000:]}")
            time.sleep(0.05)
        yield LoopbackSshd(port=port, client_key=client_key, known_hosts=known_hosts, ssh_path=ssh_path,
                            log=directory / "sshd.log")
    finally:
        # A session still open (a client that timed out) lives on in a child of the listener: stop those too.
        for child in _children(process.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGTERM)
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
        if made_dir:
            with contextlib.suppress(OSError):
                PRIVILEGE_SEPARATION_DIR.rmdir()
