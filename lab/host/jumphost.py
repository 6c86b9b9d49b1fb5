"""The SSH jump host a lab's nodes sit behind, and how lab comes to trust its host key.

Two kinds of lab reach their nodes through one machine (lab.host.reach carries
the connections): existing hosts behind a bastion (`providers.hosts.jump`), and
VMs of a remote libvirt host (`providers.libvirt.uri: qemu+ssh://...`), whose
networks exist on that host only. Either way the jump host is an SSHEndpoint
named JUMP_ALIAS, and its key is trusted as ssh trusts a host: the lab's own
pin once it has one, else what the user's ~/.ssh/known_hosts lists, else, for
a new lab, the key shown at first contact, which `pin` records in the lab's
known_hosts (and `describe` prints, with its fingerprint, for the user to
compare). A lab that exists checks against its own pin only: a jump host
replaced since (another key, or another host in lab.yaml) is refused, never
trusted silently; it needs a new lab.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
from pathlib import Path

from lab.errors import PrerequisiteError
from lab.host.ssh import SSHEndpoint, known_hosts_name, parsed_known_hosts, record_host_key

JUMP_ALIAS = "lab-jump"  # the jump host's name in the lab's ssh_config and known_hosts


def login_key(key: str | None, lab_yaml_dir: Path, who: str, where: str) -> Path:
    """The private key a login of lab.yaml names (~ and paths relative to lab.yaml), else the user's own."""
    if key is None:
        found = default_key()
        if found is None:
            raise PrerequisiteError(f"no SSH key for {who}: ~/.ssh has no id_ed25519, id_ecdsa or id_rsa",
                                    hint=f"give its key in {where}")
        return found
    path = Path(key).expanduser()
    if not path.is_absolute():
        path = lab_yaml_dir / path
    if not path.is_file():
        raise PrerequisiteError(f"the SSH key {path} for {who} is not a file", hint=f"fix the key in {where}")
    return path


def default_key() -> Path | None:
    for name in ("id_ed25519", "id_ecdsa", "id_rsa"):
        candidate = Path.home() / ".ssh" / name
        if candidate.is_file():
            return candidate
    return None


def user_known_hosts() -> Path:
    return Path.home() / ".ssh" / "known_hosts"


def host_key(known_hosts: Path, address: str, port: int):
    """The key a known_hosts file has for the host (as ssh names it: ADDRESS, or [ADDRESS]:PORT), or None."""
    if not known_hosts.is_file():
        return None
    import paramiko

    try:
        keys = parsed_known_hosts(known_hosts)
    except (OSError, ValueError, paramiko.SSHException, paramiko.hostkeys.InvalidHostKey):
        return None  # unreadable or a line paramiko cannot parse: nothing lab can trust there
    found = keys.lookup(known_hosts_name(address, port))
    return next(iter(found.values())) if found else None


def lists_host(known_hosts: Path, address: str, port: int) -> bool:
    return host_key(known_hosts, address, port) is not None


def listing(address: str, port: int, lab_known_hosts: Path) -> Path | None:
    """The known_hosts to check the host against: the lab's when it pinned the host, else the user's when
    it lists the host, else None (nothing vouches for it yet)."""
    return next((path for path in (lab_known_hosts, user_known_hosts()) if lists_host(path, address, port)),
                None)


def fingerprint(key) -> str:
    """A host key's SHA256 fingerprint as ssh-keygen -l prints it (after "SHA256:")."""
    return base64.b64encode(hashlib.sha256(key.asbytes()).digest()).decode().rstrip("=")


def jump_endpoint(address: str, port: int, user: str, identity_file: Path, lab_dir: Path,
                  known_hosts: Path) -> SSHEndpoint:
    """The jump host as an endpoint, checked against what vouches for its key (see the module's docstring)."""
    known = listing(address, port, known_hosts) or (known_hosts if (lab_dir / "state.json").exists() else None)
    return SSHEndpoint(node=JUMP_ALIAS, host=address, port=port, user=user, identity_file=identity_file,
                       known_hosts=known)


def checked(jump: SSHEndpoint | None, known_hosts: Path) -> SSHEndpoint | None:
    """The jump host checked against the lab's pin once there is one (pinned during this command too)."""
    if jump is not None and lists_host(known_hosts, jump.host, jump.port):
        return dataclasses.replace(jump, known_hosts=known_hosts)
    return jump


def pin(jump: SSHEndpoint | None, known_hosts: Path) -> bool:
    """Pin the jump host's key in the lab's known_hosts, for ssh_config and every later command: the one
    the user's known_hosts has for it, else the one this command was shown (first contact). True if it
    pinned one now."""
    if jump is None or lists_host(known_hosts, jump.host, jump.port):
        return False
    shown = host_key(user_known_hosts(), jump.host, jump.port)
    if shown is None:
        from lab.host.ssh import jump_connection

        first_contact = dataclasses.replace(jump, known_hosts=None)
        shown = jump_connection(first_contact).transport.get_remote_server_key()
    record_host_key(known_hosts, JUMP_ALIAS, known_hosts_name(jump.host, jump.port),
                    f"{shown.get_name()} {shown.get_base64()}")
    return True


def describe(jump: SSHEndpoint | None, known_hosts: Path, role: str = "jump host") -> str | None:
    """What `lab up` says of the jump host: where it is and the key lab pinned for it."""
    jump = checked(jump, known_hosts)
    if jump is None:
        return None
    shown = host_key(jump.known_hosts, jump.host, jump.port) if jump.known_hosts else None
    how = ("as ~/.ssh/known_hosts has it" if lists_host(user_known_hosts(), jump.host, jump.port)
           else f"taken at first contact: compare it with the {role}'s `ssh-keygen -lf` of its host keys")
    return (f"through {role} {jump.user}@{jump.host}:{jump.port}"
            + (f", its key {shown.get_name()} SHA256:{fingerprint(shown)} ({how})" if shown else ""))
