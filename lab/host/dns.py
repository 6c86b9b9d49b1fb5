"""The lab's DNS: a dnsmasq on the host's address on the lab network.

Containers on the nodes ask it (Docker's `dns` in each node's daemon.json).
It answers the lab's node names and refuses every other name: it has no
upstream server, so no lookup a container makes ever leaves the lab, and a
container never falls back to a public resolver.

dnsmasq starts as root to bind port 53 and then drops to `nobody` itself:
nodes are untrusted clients.
"""

from __future__ import annotations

import socket

DNS_PORT = 53


def dnsmasq_argv(address: str, records: dict[str, str]) -> list[str]:
    """dnsmasq answering `records` (name -> IPv4) on address:53 only, and nothing else."""
    return ["dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--pid-file=",
            # No upstream and no host files: a name not in `records` is refused, never forwarded.
            "--no-resolv", "--no-hosts", "--no-poll",
            # Only this address: other labs' dnsmasqs (and libvirt's) bind their own.
            f"--listen-address={address}", "--bind-interfaces", f"--port={DNS_PORT}",
            "--user=nobody", "--log-facility=-",
            *[f"--host-record={name},{ip}" for name, ip in sorted(records.items())]]


def answers(address: str, timeout: float = 0.2) -> bool:
    """Whether something listens on address:53 (TCP: dnsmasq serves both)."""
    try:
        with socket.create_connection((address, DNS_PORT), timeout=timeout):
            return True
    except OSError:
        return False
