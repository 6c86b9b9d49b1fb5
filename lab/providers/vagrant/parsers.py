"""What Vagrant prints, read: machine states, `vagrant ssh-config`, `--machine-readable` errors.

Pure functions on text, with no Vagrant run: the provider classes feed them
Vagrant's output, the tests fixed text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lab.errors import ProviderError
from lab.host.ssh import SSHEndpoint
from lab.providers.base import NodeState

# python-vagrant already turns libvirt's shutoff into poweroff and paused into saved.
_STOPPED_STATES = frozenset({"poweroff", "aborted", "shutoff", "stopped", "off", "not_running"})
_PAUSED_STATES = frozenset({"saved", "paused", "suspended", "frozen", "pmsuspended"})


def node_state(vagrant_state: str | None) -> NodeState:
    """lab's state for a state name from `vagrant status` (any provider)."""
    state = (vagrant_state or "").strip().lower()
    if state == "not_created":
        return NodeState.NOT_CREATED
    if state == "running":
        return NodeState.RUNNING
    if state in _STOPPED_STATES:
        return NodeState.STOPPED
    if state in _PAUSED_STATES:
        return NodeState.PAUSED
    return NodeState.UNKNOWN


@dataclass(frozen=True)
class SSHConfigEntry:
    """One `Host` block of `vagrant ssh-config` output."""

    host: str
    hostname: str | None = None
    port: int | None = None
    user: str | None = None
    identity_files: tuple[str, ...] = ()
    options: dict[str, str] = field(default_factory=dict)  # every other keyword, as written


_SSH_LINE = re.compile(r"^([A-Za-z][A-Za-z0-9]*)(?:\s*=\s*|\s+)(.*)$")


def parse_ssh_config(text: str) -> dict[str, SSHConfigEntry]:
    """Parse `vagrant ssh-config` output into one entry per host name.

    Keywords are case-insensitive and may be separated from their value by
    whitespace or `=`; a value wholly in double quotes (Vagrant quotes
    IdentityFile paths with spaces) is unquoted. As in ssh, the first value
    of a keyword wins, except IdentityFile, which accumulates.
    """
    entries: dict[str, SSHConfigEntry] = {}
    hosts: list[str] = []
    fields: dict[str, Any] = {}

    def flush() -> None:
        for host in hosts:
            entries[host] = SSHConfigEntry(
                host=host, hostname=fields.get("hostname"), port=fields.get("port"), user=fields.get("user"),
                identity_files=tuple(fields.get("identityfile", ())), options=dict(fields.get("options", {})))

    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = _SSH_LINE.match(line)
        if not match:
            continue
        keyword, value = match.group(1), _unquote(match.group(2).strip())
        key = keyword.lower()
        if key == "host":
            flush()
            hosts, fields = value.split(), {}
            continue
        if key == "match":  # vagrant never writes Match; ignore such a block whole
            flush()
            hosts, fields = [], {}
            continue
        if not hosts:
            continue
        if key == "identityfile":
            fields.setdefault("identityfile", []).append(value)
        elif key == "port":
            if "port" not in fields:
                try:
                    fields["port"] = int(value)
                except ValueError:
                    raise ProviderError(f"vagrant ssh-config: Port {value!r} of host {hosts[0]!r} is not a number") from None
        elif key in ("hostname", "user"):
            fields.setdefault(key, value)
        else:
            fields.setdefault("options", {}).setdefault(keyword, value)
    flush()
    return entries


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] == '"' and '"' not in value[1:-1]:
        return value[1:-1]
    return value


def ssh_endpoint(node: str, entry: SSHConfigEntry) -> SSHEndpoint:
    """The endpoint for `node` from its ssh-config entry."""
    missing = [name for name, value in (("HostName", entry.hostname), ("Port", entry.port),
                                        ("User", entry.user)) if value is None]
    if not entry.identity_files:
        missing.append("IdentityFile")
    if missing:
        raise ProviderError(f"vagrant ssh-config for {node!r} gives no {', '.join(missing)}",
                            hint="run `vagrant ssh-config` in the lab directory to see what Vagrant reports")
    return SSHEndpoint(node=node, host=entry.hostname, port=entry.port, user=entry.user,
                       identity_file=Path(entry.identity_files[0]).expanduser(),
                       # Vagrant's own boxes come with no host key lab could pin.
                       known_hosts=None, extra_options=dict(entry.options))


def parse_vagrant_error(machine_readable: str) -> tuple[str | None, str]:
    """(error class, message) of the `error-exit` line of `--machine-readable` output."""
    for line in machine_readable.splitlines():
        parts = line.split(",", 4)
        if len(parts) == 5 and parts[2] == "error-exit":
            message = parts[4].replace("%!(VAGRANT_COMMA)", ",").replace("\\n", "\n").replace("\\r", "")
            return parts[3], message.strip()
    return None, ""

