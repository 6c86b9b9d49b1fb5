"""Bootstrap the etcd cluster on the nodes over SSH, and change its membership.

Provider-agnostic: it speaks only SSH (Fabric) to nodes and HTTP to etcd, so
the same code configures nspawn nodes, Vagrant VMs and generic boxes.

etcd is bootstrapped statically (every member knows the whole initial
cluster; no discovery service, the lab is offline), configured through
`/etc/default/etcd`, which Debian's etcd unit reads as its environment, and
run as the node's systemd unit. Re-running changes nothing on a node whose
configuration is already right.

TLS (`etcd.tls`, on by default) gives every member a certificate of the lab's
own CA (lab/host/pki.py) and turns on client-certificate auth for clients and
peers: only holders of a lab certificate (the host's tools, the node agents,
the other members) can talk to etcd. The mode is fixed when the lab is
created (recorded in the state as etcd.tls): members, agents and their
certificates are set up for it, so a spec that flips it later is refused.
"""

from __future__ import annotations

import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from lab.cluster.etcdclient import EtcdClient, EtcdError, TlsFiles
from lab.cluster.remote import (APT_TIMEOUT, BootstrapError, RemoteFile, check, journal_tail, put_files,
                               run_bounded, units_active)
from lab.errors import ProviderError, StateError, UsageError
from lab.host.pki import LabPki
from lab.host.ssh import SSHEndpoint, connect, run
from lab.node.layout import CLIENT_PORT, NODE_PKI_DIR
from lab.providers.base import LabContext, Progress, no_progress

PEER_PORT = 2380
ETCD_ENV_FILE = "/etc/default/etcd"
# Named to sort before a fault's runtime drop-in (lab-fault.conf), which must win.
ETCD_DROPIN = "/etc/systemd/system/etcd.service.d/10-lab.conf"
ETCD_DROPIN_TEXT = """\
# Written by lab. A member may start before its address is up (wait-online
# is not reliable in containers on every host): try again instead of staying down.
[Service]
Restart=on-failure
RestartSec=1
"""
DATA_DIR = "/var/lib/etcd/lab"
HEALTH_TIMEOUT = 60.0


@dataclass(frozen=True)
class EtcdMember:
    """Where a member's etcd listens, derived from the node's address."""

    node: str
    ip: str
    tls: bool

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"

    @property
    def client_url(self) -> str:
        return f"{self.scheme}://{self.ip}:{CLIENT_PORT}"

    @property
    def peer_url(self) -> str:
        return f"{self.scheme}://{self.ip}:{PEER_PORT}"


def members(context: LabContext) -> list[EtcdMember]:
    tls = tls_mode(context)
    return [EtcdMember(n.name, context.addresses[n.name], tls) for n in context.nodes]


def recorded_tls(context: LabContext) -> bool | None:
    """The TLS mode the lab was created with; None for a lab not created yet."""
    if context.state is None:
        return None
    etcd_state = context.state.get("etcd") or {}
    if "tls" in etcd_state:
        if not isinstance(etcd_state["tls"], bool):
            raise StateError(f"{context.state.path}: etcd.tls is {etcd_state['tls']!r}, not true or false",
                             hint="set it to the mode the lab was created with, or `lab destroy` and `lab up`")
        return etcd_state["tls"]
    if "token" in etcd_state:
        # Bootstrapped before the mode was recorded: only a TLS lab has a CA.
        return LabPki(context.lab_dir / "pki").ca.exists()
    return None


def tls_mode(context: LabContext) -> bool:
    """Whether the lab's etcd speaks TLS; refuses a spec that flipped it since the lab was created."""
    wanted, recorded = context.spec.etcd.tls, recorded_tls(context)
    if recorded is not None and recorded != wanted:
        old, new = str(recorded).lower(), str(wanted).lower()
        raise UsageError(
            f"lab {context.spec.name!r} was created with etcd.tls: {old}, the spec now says etcd.tls: {new}; "
            "a lab's etcd cannot switch between TLS and plain HTTP",
            hint=f"set etcd.tls back to {old} in lab.yaml, or `lab destroy` then `lab up` to recreate the lab "
                 f"with etcd.tls: {new}")
    return wanted


def etcd_environment(member: EtcdMember, cluster: list[EtcdMember], token: str, heartbeat_ms: int,
                     election_timeout_ms: int, cluster_state: str = "new", pre_vote: bool = False) -> str:
    """The `/etc/default/etcd` of one member (pure: tested on fixed input)."""
    lines = [
        "# Written by lab: `lab up` rewrites it. etcd reads ETCD_* variables.",
        f"ETCD_NAME={member.node}",
        f"ETCD_DATA_DIR={DATA_DIR}",
        f"ETCD_LISTEN_PEER_URLS={member.peer_url}",
        f"ETCD_LISTEN_CLIENT_URLS={member.client_url},{member.scheme}://127.0.0.1:{CLIENT_PORT}",
        f"ETCD_INITIAL_ADVERTISE_PEER_URLS={member.peer_url}",
        f"ETCD_ADVERTISE_CLIENT_URLS={member.client_url}",
        # Sorted: the file must not change when nothing but an order did.
        "ETCD_INITIAL_CLUSTER=" + ",".join(f"{m.node}={m.peer_url}" for m in sorted(cluster, key=lambda m: m.node)),
        f"ETCD_INITIAL_CLUSTER_TOKEN={token}",
        f"ETCD_INITIAL_CLUSTER_STATE={cluster_state}",
        f"ETCD_HEARTBEAT_INTERVAL={heartbeat_ms}",
        f"ETCD_ELECTION_TIMEOUT={election_timeout_ms}",
    ]
    if pre_vote:
        lines.append("ETCD_PRE_VOTE=true")
    if member.tls:
        lines += [
            f"ETCD_TRUSTED_CA_FILE={NODE_PKI_DIR}/ca.crt",
            f"ETCD_CERT_FILE={NODE_PKI_DIR}/node.crt",
            f"ETCD_KEY_FILE={NODE_PKI_DIR}/node.key",
            "ETCD_CLIENT_CERT_AUTH=true",
            f"ETCD_PEER_TRUSTED_CA_FILE={NODE_PKI_DIR}/ca.crt",
            f"ETCD_PEER_CERT_FILE={NODE_PKI_DIR}/node.crt",
            f"ETCD_PEER_KEY_FILE={NODE_PKI_DIR}/node.key",
            "ETCD_PEER_CLIENT_CERT_AUTH=true",
        ]
    return "\n".join(lines) + "\n"


class EtcdBootstrap:
    """Configure and start etcd on every node, then wait for a healthy cluster."""

    def __init__(self, context: LabContext, endpoints: dict[str, SSHEndpoint]) -> None:
        self.context = context
        self.endpoints = endpoints
        self.members = members(context)
        self.pki = LabPki(context.lab_dir / "pki")

    # -- the cluster's identity, kept in the lab state so re-runs agree

    def token(self) -> str:
        etcd_state = dict(self.context.state.get("etcd") or {})
        if "token" not in etcd_state:
            etcd_state["token"] = f"lab-{self.context.lab_id}-{secrets.token_hex(4)}"
            self.context.state.set("etcd", etcd_state)
        return etcd_state["token"]

    def client(self, timeout: float = 2.0) -> EtcdClient:
        return client_for(self.context, timeout=timeout)

    def _joined(self) -> dict[str, dict]:
        """Members added at run time: the initial cluster they were started with."""
        return dict((self.context.state.get("etcd") or {}).get("joined") or {})

    def _initial(self, member: EtcdMember) -> tuple[list[EtcdMember], str]:
        """The initial cluster a member was (or is to be) started with: fixed once chosen,
        so removing or adding other members later never rewrites its configuration."""
        etcd_state = dict(self.context.state.get("etcd") or {})
        joined = (etcd_state.get("joined") or {}).get(member.node)
        if joined is not None:
            return [EtcdMember(name, ip, member.tls) for name, ip in joined["cluster"].items()], "existing"
        if "initial_cluster" not in etcd_state:
            etcd_state["initial_cluster"] = {m.node: m.ip for m in self.members}
            self.context.state.set("etcd", etcd_state)
        return [EtcdMember(name, ip, member.tls) for name, ip in etcd_state["initial_cluster"].items()], "new"

    # -- bootstrap

    def run(self, progress: Progress = no_progress, timeout: float = HEALTH_TIMEOUT) -> None:
        if self.context.spec.etcd.tls:
            self.pki.ensure(self.context.spec.name, self.context.addresses)
        else:
            progress("etcd: WARNING: etcd.tls is false: plain HTTP without client certificates, open to every "
                     "local user (any of them can run units as root on the nodes)")
        token = self.token()
        started = time.monotonic()
        initial = {m.node: self._initial(m) for m in self.members}  # state writes stay on this thread
        with ThreadPoolExecutor(max_workers=max(1, len(self.members))) as pool:
            changed = list(pool.map(lambda m: self._configure(m, token, *initial[m.node]), self.members))
        touched = [m.node for m, c in zip(self.members, changed) if c]
        progress(f"etcd: configured {', '.join(touched)}" if touched else "etcd: configuration unchanged")
        self.wait_healthy(progress, timeout)
        progress(f"etcd: {len(self.members)}/{len(self.members)} members healthy "
                 f"{time.monotonic() - started:.1f} s after the nodes were ready")

    def _files(self, member: EtcdMember, token: str, cluster: list[EtcdMember], state: str) -> list[RemoteFile]:
        spec = self.context.spec.etcd
        env = etcd_environment(member, cluster, token, spec.heartbeat_ms, spec.election_timeout_ms, state,
                               pre_vote=spec.pre_vote)
        files = [RemoteFile(ETCD_ENV_FILE, env.encode(), 0o644),
                 RemoteFile(ETCD_DROPIN, ETCD_DROPIN_TEXT.encode(), 0o644)]
        if member.tls:
            pair = self.pki.node(member.node)
            files += [RemoteFile(f"{NODE_PKI_DIR}/ca.crt", self.pki.ca.read_bytes(), 0o644),
                      RemoteFile(f"{NODE_PKI_DIR}/node.crt", pair.cert.read_bytes(), 0o644),
                      RemoteFile(f"{NODE_PKI_DIR}/node.key", pair.key.read_bytes(), 0o600, owner="etcd")]
        return files

    def _configure(self, member: EtcdMember, token: str, cluster: list[EtcdMember] | None = None,
                   state: str = "new") -> bool:
        """Write the member's files and (re)start etcd if anything changed. Returns whether it did."""
        endpoint = self.endpoints[member.node]
        files = self._files(member, token, cluster or self.members, state)
        with connect(endpoint) as connection:
            self._ensure_etcd_installed(connection, member.node)
            changed = put_files(connection, files, member.node)
            active = units_active(connection, member.node, "etcd")
            if changed or not active:
                # --no-block: a member only reports ready once a quorum is up,
                # so starting them one by one would wait forever on the first.
                verb = "restart" if active else "start"
                check(connection, "systemctl daemon-reload && systemctl enable --quiet etcd && "
                                  f"systemctl {verb} --no-block etcd", member.node)
            return changed or not active

    def join(self, node: str, progress: Progress = no_progress) -> None:
        """Add `node` as a new member through the member API, then start its etcd."""
        member = next(m for m in self.members if m.node == node)
        if self.context.spec.etcd.tls:
            self.pki.ensure(self.context.spec.name, self.context.addresses)  # the new node's certificate
        client = self.client()
        try:
            existing = client.members()
            if not any(member.peer_url in m.get("peerURLs", []) for m in existing):
                progress(f"etcd: adding member {node} ({member.peer_url})")
                self._reconfigure(lambda: client.member_add(member.peer_url))
                existing = client.members()
        finally:
            client.close()
        # The initial cluster of a joining member is every current member, itself included.
        ips = {m.node: m.ip for m in self.members}
        cluster = {}
        for entry in existing:
            name = entry.get("name") or node  # a member added but not started has no name yet
            peer = entry["peerURLs"][0]
            cluster[name] = ips.get(name) or peer.split("//")[1].rsplit(":", 1)[0]
        etcd_state = dict(self.context.state.get("etcd") or {})
        etcd_state["joined"] = {**etcd_state.get("joined", {}), node: {"cluster": cluster}}
        self.context.state.set("etcd", etcd_state)
        self._configure(member, self.token(), *self._initial(member))
        self.wait_healthy(progress)
        progress(f"etcd: {node} joined; {len(self.members)} members healthy")

    @staticmethod
    def _reconfigure(call, timeout: float = 30.0):
        # etcd refuses reconfiguration ("unhealthy cluster") until every member
        # has been connected for a few seconds, e.g. right after bootstrap.
        deadline = time.monotonic() + timeout
        while True:
            try:
                return call()
            except EtcdError as exc:
                if "unhealthy cluster" not in exc.message or time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def leave(self, node: str, progress: Progress = no_progress) -> None:
        """Remove `node`'s member through the member API (the cluster stays available)."""
        member = next(m for m in self.members if m.node == node)
        client = self.client()
        try:
            for entry in client.members():
                if entry.get("name") == node or member.peer_url in entry.get("peerURLs", []):
                    progress(f"etcd: removing member {node} ({entry['ID']})")
                    self._reconfigure(lambda entry=entry: client.member_remove(entry["ID"]))
        finally:
            client.close()
        etcd_state = dict(self.context.state.get("etcd") or {})
        etcd_state["joined"] = {k: v for k, v in etcd_state.get("joined", {}).items() if k != node}
        self.context.state.set("etcd", etcd_state)

    @staticmethod
    def _ensure_etcd_installed(connection, node: str) -> None:
        if run_bounded(connection, "command -v etcd", node).exited == 0:
            return
        # A generic Debian/Ubuntu box: install etcd from the node's own apt sources.
        check(connection, "DEBIAN_FRONTEND=noninteractive apt-get update -qq && "
                          "DEBIAN_FRONTEND=noninteractive apt-get install -y -qq etcd-server etcd-client", node,
              timeout=APT_TIMEOUT)

    def wait_healthy(self, progress: Progress = no_progress, timeout: float = HEALTH_TIMEOUT) -> None:
        """Poll every member's /health; give up early on a member whose etcd unit has failed."""
        client = self.client(timeout=1.0)
        deadline = time.monotonic() + timeout
        healthy: set[str] = set()
        reported, next_unit_check = -1, time.monotonic() + 2.0
        failed: list[str] = []
        try:
            while time.monotonic() < deadline:
                for member in self.members:
                    if member.node not in healthy and client.health(member.client_url):
                        healthy.add(member.node)
                if len(healthy) == len(self.members):
                    return
                if len(healthy) != reported:
                    reported = len(healthy)
                    progress(f"etcd: {reported}/{len(self.members)} members healthy")
                if time.monotonic() >= next_unit_check:
                    failed = self._failed_units([m.node for m in self.members if m.node not in healthy])
                    if failed:
                        break
                    next_unit_check = time.monotonic() + 2.0
                time.sleep(0.1)
        finally:
            client.close()
        sick = failed or [m.node for m in self.members if m.node not in healthy]
        why = "etcd failed to start" if failed else f"etcd did not become healthy within {timeout:.0f} s"
        raise BootstrapError(f"{why} on {', '.join(sick)}:\n"
                             + "\n".join(journal_tail(self.endpoints[node], "etcd") for node in sick),
                             hint="see the journal lines above; `lab exec --node NODE -- journalctl -u etcd` "
                                  "shows the whole log")

    def _failed_units(self, nodes: list[str]) -> list[str]:
        failed = []
        for node in nodes:
            try:
                if run(self.endpoints[node], "systemctl is-failed --quiet etcd", timeout=5).exit_status == 0:
                    failed.append(node)
            except ProviderError:
                continue
        return failed


def client_for(context: LabContext, timeout: float = 2.0) -> EtcdClient:
    """An etcd client for the lab, with its certificates when TLS is on."""
    cluster = members(context)
    tls = None
    if tls_mode(context):
        pki = LabPki(context.lab_dir / "pki")
        tls = TlsFiles(ca=str(pki.ca), cert=str(pki.client.cert), key=str(pki.client.key))
    return EtcdClient([m.client_url for m in cluster], tls=tls, timeout=timeout)
