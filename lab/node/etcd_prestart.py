#!/usr/bin/python3
"""Before a member's etcd starts: its own address up, and on a first start the members before it serving.

Run by etcd.service (ExecStartPre in lab's 10-lab.conf drop-in) with
/etc/default/etcd's variables in its environment; it always exits 0, and
every wait is bounded, so at worst etcd starts as it would have without it.
Standard library only.

- etcd binds its own peer address at once and exits if it is not up yet
  (a node's etcd may start before networkd has configured its address):
  wait until the address can be bound.
- On its first start (no data yet, a static bootstrap) etcd 3.4 asks every
  peer whether the member bootstrapped already, with a 1 s limit per peer,
  before it starts Raft. A peer that started at the same moment has its
  peer port open but serves nothing until its own asking is over: members
  started together each waited (members - 1) seconds (2 s of a 3-node
  `lab up`). In order instead: a member starts once every member listed
  before it in ETCD_INITIAL_CLUSTER serves its peer port, so each asks only
  members that answer at once and members that do not listen yet (refused
  at once). The first member never waits for peers.
"""

from __future__ import annotations

import http.client
import os
import socket
import ssl
import time
import urllib.parse

OWN_ADDRESS_WAIT = 5.0   # seconds; networkd configures the address within a fraction of a second
PEERS_WAIT = 5.0         # seconds; each member before this one starts within ~0.1 s of the one before it
POLL = 0.05
PROBE_TIMEOUT = 0.3      # a peer busy asking its own peers accepts the connection but does not answer


def own_address_up(address: str) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((address, 0))
        except OSError:
            return False
    return True


def earlier_peers(initial_cluster: str, own_url: str) -> list[str]:
    """The peer URLs of the members listed before this one in ETCD_INITIAL_CLUSTER (name=url,...)."""
    urls = [entry.split("=", 1)[1] for entry in initial_cluster.split(",") if "=" in entry]
    return urls[:urls.index(own_url)] if own_url in urls else []


def tls_context(environ) -> ssl.SSLContext | None:
    """The member's own peer credentials (the peers require a client certificate), or None without TLS."""
    if not environ.get("ETCD_PEER_CERT_FILE"):
        return None
    context = ssl.create_default_context(cafile=environ.get("ETCD_PEER_TRUSTED_CA_FILE"))
    context.check_hostname = False  # a readiness probe: the chain is checked, the address is the one dialled
    context.load_cert_chain(environ["ETCD_PEER_CERT_FILE"], environ["ETCD_PEER_KEY_FILE"])
    return context


def serves(url: str, context: ssl.SSLContext | None) -> bool:
    """Does the peer answer on its peer port (etcd's /version there)?"""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "https":
        connection: http.client.HTTPConnection = http.client.HTTPSConnection(
            parts.hostname, parts.port, timeout=PROBE_TIMEOUT, context=context)
    else:
        connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=PROBE_TIMEOUT)
    try:
        connection.request("GET", "/version")
        connection.getresponse().read()
        return True
    except (OSError, http.client.HTTPException):
        return False
    finally:
        connection.close()


def wait_until(condition, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(POLL)
    return True


def main(environ=os.environ) -> None:
    own_url = environ.get("ETCD_INITIAL_ADVERTISE_PEER_URLS", "")
    address = urllib.parse.urlsplit(own_url).hostname
    if address:
        wait_until(lambda: own_address_up(address), OWN_ADDRESS_WAIT)
    data_dir = environ.get("ETCD_DATA_DIR", "")
    if not data_dir or os.path.isdir(os.path.join(data_dir, "member")):
        return  # not a first start: etcd reads its peers from its own data
    if environ.get("ETCD_INITIAL_CLUSTER_STATE", "new") != "new":
        return  # a member joining a running cluster (`lab node add`): no bootstrap check to race
    try:
        context = tls_context(environ)
    except (OSError, ssl.SSLError):
        return
    deadline = time.monotonic() + PEERS_WAIT
    for url in earlier_peers(environ.get("ETCD_INITIAL_CLUSTER", ""), own_url):
        if not wait_until(lambda: serves(url, context), max(0.0, deadline - time.monotonic())):
            return


if __name__ == "__main__":
    try:
        main()
    except Exception:  # never keep etcd from starting
        pass
