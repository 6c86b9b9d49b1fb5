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

Not every node need be a member: etcd advises 3 to 7, and every member more
slows each write and each election. The first `etcd.members` nodes are members
(recorded in the state as etcd.members when the lab is created); the others
are workers, whose etcd.service runs etcd's TCP gateway on 127.0.0.1:2379,
forwarding each connection to a member (the next one that accepts it), so
agents and units use 127.0.0.1:2379 on every node. It forwards bytes, not
requests: TLS goes through untouched, and a client on a worker checks the
member's certificate (which names 127.0.0.1) and shows its own, as on a
member.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Collection

from lab.cluster.etcdclient import EtcdClient, EtcdError, EtcdUnknown, TlsFiles
from lab.cluster.remote import (APT_TIMEOUT, BootstrapError, check, journal_tail, put_files,
                               run_bounded, units_active)
from lab.errors import ProviderError, StateError, UsageError
from lab.host.pki import LabPki
from lab.host.ssh import SSHEndpoint, connect, parallel_map, run
from lab.node.layout import CLIENT_PORT, ETCD_PRESTART, NODE_PKI_DIR
from lab.providers.base import LabContext, NodeFile, NodeSeed, Progress, no_progress

PEER_PORT = 2380
ETCD_ENV_FILE = "/etc/default/etcd"
# Named to sort before a fault's runtime drop-in (lab-fault.conf), which must win.
ETCD_DROPIN = "/etc/systemd/system/etcd.service.d/10-lab.conf"
# Run before every start of a member: waits (bounded) for its own address, and on a first start for
# the members before it to serve (lab/node/etcd_prestart.py says why: 2 s of a 3-node `lab up`).
ETCD_PRESTART_TEXT = (Path(__file__).parent.parent / "node" / "etcd_prestart.py").read_bytes()
ETCD_DROPIN_TEXT = f"""\
# Written by lab. A member may start before its address is up (wait-online
# is not reliable in containers on every host): {ETCD_PRESTART} waits for it
# (and on a first start for the members before it to serve), and a member that
# fails anyway tries again instead of staying down.
[Service]
ExecStartPre=-{ETCD_PRESTART}
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


MEMBER, WORKER = "member", "worker"
ROLES = (MEMBER, WORKER)


def member_names(context: LabContext) -> list[str]:
    """The nodes that are etcd members, in node order.

    As the state records them; a lab created before nodes had roles made
    every node a member; a lab not created yet has the spec's first
    `etcd.members` nodes.
    """
    names = [n.name for n in context.nodes]
    if context.state is None:
        return names[:context.spec.etcd_member_count(len(names))]
    recorded = (context.state.get("etcd") or {}).get("members")
    if recorded is None:
        return names
    return [name for name in names if name in recorded]


def roles(context: LabContext) -> dict[str, str]:
    """Each node's part in etcd: member or worker."""
    chosen = set(member_names(context))
    return {n.name: MEMBER if n.name in chosen else WORKER for n in context.nodes}


def new_node_role(spec, members_now: int, nodes_after: int) -> str:
    """The role of a node added without --role: a member while the lab has fewer members than its spec
    wants for its new size (`etcd.members`, or the default for that many nodes), else a worker."""
    return MEMBER if members_now < spec.etcd_member_count(nodes_after) else WORKER


def members(context: LabContext) -> list[EtcdMember]:
    tls = tls_mode(context)
    chosen = set(member_names(context))
    return [EtcdMember(n.name, context.addresses[n.name], tls) for n in context.nodes if n.name in chosen]


def record_members(context: LabContext, names: list[str]) -> None:
    """Record which nodes are members (before a member is added, after one is removed)."""
    etcd_state = dict(context.state.get("etcd") or {})
    etcd_state["members"] = list(names)
    context.state.set("etcd", etcd_state)


def local_url(tls: bool) -> str:
    """etcd on the node itself: its member, or on a worker the gateway."""
    return f"{'https' if tls else 'http'}://127.0.0.1:{CLIENT_PORT}"


def agent_endpoints(context: LabContext, node: str) -> list[str]:
    """The etcd endpoints a node's agents use, in the order they try them.

    A member lists its own first (its agents keep working when only their side
    of a partition is up), then the others; a worker has its gateway, which
    itself moves on to another member when one does not take the connection.
    """
    cluster = members(context)
    own = next((m for m in cluster if m.node == node), None)
    if own is None:
        return [local_url(tls_mode(context))]
    return [own.client_url] + [m.client_url for m in cluster if m.node != node]


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


def gateway_environment(turn: int, cluster: list[EtcdMember]) -> str:
    """A worker's `/etc/default/etcd`: the members its gateway forwards to (pure: tested on fixed input).

    Each worker starts its round-robin at another member (`turn`: the last byte of its address, which
    never changes, so removing another worker rewrites nothing here), so the workers' connections
    spread over the members instead of all landing on the first.
    """
    addresses = [f"{m.ip}:{CLIENT_PORT}" for m in cluster]
    start = turn % len(addresses) if addresses else 0
    return ("# Written by lab: `lab up` rewrites it. This node is an etcd worker: etcd.service runs\n"
            "# etcd's gateway on 127.0.0.1, forwarding to these members (see 10-lab.conf).\n"
            f"ETCD_GATEWAY_ENDPOINTS={','.join(addresses[start:] + addresses[:start])}\n")


# A member that is down is tried again after a second (etcd's default is a minute): a worker whose
# gateway had put every member aside after a partition would otherwise stay cut off long after it healed.
GATEWAY_DROPIN_TEXT = f"""\
# Written by lab. This node is an etcd worker, not a member: etcd.service runs
# etcd's TCP gateway on 127.0.0.1:{CLIENT_PORT} instead, forwarding each connection to
# a member (ETCD_GATEWAY_ENDPOINTS in {ETCD_ENV_FILE}), so agents and units use
# the same address on every node. TLS passes through it untouched.
[Service]
Type=simple
ExecStart=
ExecStart=/usr/bin/etcd gateway start --listen-addr=127.0.0.1:{CLIENT_PORT} --endpoints=${{ETCD_GATEWAY_ENDPOINTS}} --retry-delay=1s
Restart=on-failure
RestartSec=1
"""


class EtcdBootstrap:
    """Configure and start etcd on every node (members, and workers' gateways), then wait for a healthy cluster."""

    def __init__(self, context: LabContext, endpoints: dict[str, SSHEndpoint]) -> None:
        self.context = context
        self.endpoints = endpoints
        self.members = members(context)
        chosen = {m.node for m in self.members}
        self.workers = [n.name for n in context.nodes if n.name not in chosen]
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

    def first_boot_seeds(self) -> dict[str, NodeSeed]:
        """Every node's etcd files and etcd.service enabled, for nodes that boot with them: a member's
        etcd then starts with its node (all members at once, as a static bootstrap wants) and a
        worker's gateway too, with no SSH round trip."""
        if tls_mode(self.context):
            self.pki.ensure(self.context.spec.name, self.context.addresses)
        token = self.token()
        seeds = {m.node: NodeSeed(tuple(self._member_files(m, token, *self._initial(m))), ("etcd.service",))
                 for m in self.members}
        seeds.update({node: NodeSeed(tuple(self._gateway_files(node)), ("etcd.service",)) for node in self.workers})
        return seeds

    def run(self, progress: Progress = no_progress, timeout: float = HEALTH_TIMEOUT,
            seeded: Collection[str] = ()) -> None:
        """Configure etcd on every node over SSH, except those that booted with it (`seeded`), and wait
        until the cluster is healthy."""
        if self.context.spec.etcd.tls:
            self.pki.ensure(self.context.spec.name, self.context.addresses)
        else:
            progress("etcd: WARNING: etcd.tls is false: plain HTTP without client certificates, open to every "
                     "local user (any of them can run units as root on the nodes)")
        self._note_members_target(progress)
        token = self.token()
        started = time.monotonic()
        initial = {m.node: self._initial(m) for m in self.members}  # state writes stay on this thread
        jobs = [(m.node, lambda m=m: self._configure(m.node, self._member_files(m, token, *initial[m.node])))
                for m in self.members if m.node not in seeded]
        jobs += [(node, lambda node=node: self._configure(node, self._gateway_files(node), gateway=True))
                 for node in self.workers if node not in seeded]
        changed = parallel_map(lambda job: job[1](), jobs)
        touched = [node for (node, _), c in zip(jobs, changed) if c]
        if touched:
            progress(f"etcd: configured {', '.join(touched)}")
        elif not seeded:
            progress("etcd: configuration unchanged")
        self.wait_healthy(progress, timeout)
        progress(f"etcd: {len(self.members)}/{len(self.members)} members healthy "
                 f"{time.monotonic() - started:.1f} s after the nodes were ready"
                 + (f"; {len(self.workers)} worker(s) reach them through a local gateway" if self.workers else ""))

    def _note_members_target(self, progress: Progress) -> None:
        wanted, nodes = self.context.spec.etcd.members, len(self.context.nodes)
        if wanted is None or wanted == len(self.members):
            return
        if wanted > nodes and len(self.members) == nodes:
            progress(f"etcd: etcd.members is {wanted} but the lab has {nodes} node(s): every node is a member")
        else:
            progress(f"etcd: the lab has {len(self.members)} members, the spec asks for {wanted}: members "
                     "change only through `lab node add --role member` and `lab node remove`")

    def _pki_files(self, node: str) -> list[NodeFile]:
        """The lab CA and the node's certificate: a member serves with it, every node's agents show it."""
        if not tls_mode(self.context):
            return []
        pair = self.pki.node(node)
        return [NodeFile(f"{NODE_PKI_DIR}/ca.crt", self.pki.ca.read_bytes(), 0o644),
                NodeFile(f"{NODE_PKI_DIR}/node.crt", pair.cert.read_bytes(), 0o644),
                NodeFile(f"{NODE_PKI_DIR}/node.key", pair.key.read_bytes(), 0o600, owner="etcd")]

    def _member_files(self, member: EtcdMember, token: str, cluster: list[EtcdMember] | None = None,
                      state: str = "new") -> list[NodeFile]:
        spec = self.context.spec.etcd
        env = etcd_environment(member, cluster or self.members, token, spec.heartbeat_ms, spec.election_timeout_ms,
                               state, pre_vote=spec.pre_vote)
        return [NodeFile(ETCD_ENV_FILE, env.encode(), 0o644), NodeFile(ETCD_PRESTART, ETCD_PRESTART_TEXT, 0o755),
                NodeFile(ETCD_DROPIN, ETCD_DROPIN_TEXT.encode(), 0o644)] + self._pki_files(member.node)

    def _gateway_files(self, node: str) -> list[NodeFile]:
        env = gateway_environment(int(self.context.addresses[node].rsplit(".", 1)[1]), self.members)
        return [NodeFile(ETCD_ENV_FILE, env.encode(), 0o644),
                NodeFile(ETCD_DROPIN, GATEWAY_DROPIN_TEXT.encode(), 0o644)] + self._pki_files(node)

    def _configure(self, node: str, files: list[NodeFile], gateway: bool = False) -> bool:
        """Write a node's etcd files and (re)start etcd if anything changed. Returns whether it did."""
        with connect(self.endpoints[node]) as connection:
            self._ensure_etcd_installed(connection, node)
            changed = put_files(connection, files, node)
            active = units_active(connection, node, "etcd")
            if changed or not active:
                # --no-block: a member only reports ready once a quorum is up,
                # so starting them one by one would wait forever on the first.
                verb = "restart" if active else "start"
                check(connection, "systemctl daemon-reload && systemctl enable --quiet etcd && "
                                  f"systemctl {verb} --no-block etcd", node)
                if gateway:
                    self._wait_gateway(connection, node)
            return changed or not active

    def _wait_gateway(self, connection, node: str, timeout: float = 10.0) -> None:
        # The gateway listens at once or not at all (its port taken, a bad flag): say so here,
        # with its journal, rather than as agents that never register.
        tries = int(timeout / 0.1)
        waited = run_bounded(connection, f"for i in $(seq {tries}); do ss -Hltn 'sport = :{CLIENT_PORT}' | "
                                         f"grep -q 127.0.0.1: && exit 0; sleep 0.1; done; exit 1", node,
                             timeout=timeout + 5)
        if waited.exited != 0:
            raise BootstrapError(f"the etcd gateway on worker {node} is not listening on 127.0.0.1:{CLIENT_PORT} "
                                 f"after {timeout:.0f} s:\n" + journal_tail(self.endpoints[node], "etcd"),
                                 hint=f"`lab exec --node {node} -- journalctl -u etcd` shows the whole log")

    def configure_gateways(self, progress: Progress = no_progress) -> None:
        """Point every worker's gateway at the members as they are now (after one joined or left)."""
        if not self.workers:
            return
        changed = parallel_map(lambda node: self._configure(node, self._gateway_files(node), gateway=True),
                              self.workers)
        touched = [node for node, c in zip(self.workers, changed) if c]
        if touched:
            progress(f"etcd: gateways of {', '.join(touched)} now forward to {', '.join(m.node for m in self.members)}")

    def start_gateway(self, node: str, progress: Progress = no_progress) -> None:
        """Start a new worker's gateway (its certificate first, on a TLS lab)."""
        if tls_mode(self.context):
            self.pki.ensure(self.context.spec.name, self.context.addresses)
        self._configure(node, self._gateway_files(node), gateway=True)
        progress(f"etcd: {node} is a worker: its gateway forwards to {', '.join(m.node for m in self.members)}")

    def join(self, node: str, progress: Progress = no_progress) -> None:
        """Add `node` as a new member through the member API, then start its etcd (it must be recorded a member)."""
        member = next(m for m in self.members if m.node == node)
        if self.context.spec.etcd.tls:
            self.pki.ensure(self.context.spec.name, self.context.addresses)  # the new node's certificate
        client = self.client(timeout=self._reconfigure_timeout())

        def added() -> bool:
            return any(member.peer_url in m.get("peerURLs", []) for m in client.members())

        try:
            if not added():
                progress(f"etcd: adding member {node} ({member.peer_url})")
                self._reconfigure(lambda: client.member_add(member.peer_url), applied=added)
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
        self._configure(node, self._member_files(member, self.token(), *self._initial(member)))
        self.wait_healthy(progress)
        progress(f"etcd: {node} joined; {len(self.members)} members healthy")
        self.configure_gateways(progress)

    def _reconfigure_timeout(self) -> float:
        # A member change answers once the member that took it has applied the
        # configuration change: a raft round trip plus fsyncs, seconds on a
        # loaded machine. etcd's own request timeout is 5 s plus two election
        # timeouts; wait that long before calling the outcome unknown.
        return 5.0 + 2 * self.context.spec.etcd.election_timeout_ms / 1000

    @staticmethod
    def _reconfigure(call, applied, timeout: float = 30.0):
        """Make one member change. `applied()` reads the member list to settle a change whose answer was lost
        (a timeout after sending): a change is not idempotent, so it is never sent twice blindly."""
        deadline = time.monotonic() + timeout
        uncertain = False  # a change was sent and its answer lost: it may have applied
        while True:
            try:
                return call()
            except EtcdUnknown:
                uncertain = True
                if time.monotonic() > deadline:
                    raise
            except EtcdError as exc:
                # After a lost answer, etcd refusing the same change again because it is done is success.
                if uncertain and ("already exists" in exc.message or "member not found" in exc.message):
                    return None
                # etcd refuses reconfiguration ("unhealthy cluster") until every
                # member has been connected for a few seconds, e.g. right after bootstrap.
                if "unhealthy cluster" not in exc.message or time.monotonic() > deadline:
                    raise
            if uncertain:
                try:
                    if applied():
                        return None
                except EtcdError:
                    pass  # no answer to the list either (an election): ask again below
            time.sleep(0.5)

    def leave(self, node: str, progress: Progress = no_progress) -> None:
        """Remove `node`'s member through the member API (the cluster stays available), record it gone, and
        point the workers' gateways at the members left. A worker has no member: nothing to do."""
        member = next((m for m in self.members if m.node == node), None)
        if member is None:
            return
        client = self.client(timeout=self._reconfigure_timeout())
        try:
            for entry in client.members():
                if entry.get("name") == node or member.peer_url in entry.get("peerURLs", []):
                    progress(f"etcd: removing member {node} ({entry['ID']})")

                    def removed(member_id: str = entry["ID"]) -> bool:
                        return all(m.get("ID") != member_id for m in client.members())

                    self._reconfigure(lambda entry=entry: client.member_remove(entry["ID"]), applied=removed)
        finally:
            client.close()
        self.members = [m for m in self.members if m.node != node]
        record_members(self.context, [m.node for m in self.members])
        etcd_state = dict(self.context.state.get("etcd") or {})
        etcd_state["joined"] = {k: v for k, v in etcd_state.get("joined", {}).items() if k != node}
        self.context.state.set("etcd", etcd_state)
        self.configure_gateways(progress)

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


def client_for(context: LabContext, timeout: float = 2.0, connect_timeout: float | None = None) -> EtcdClient:
    """An etcd client for the lab, with its certificates when TLS is on (connect_timeout: see EtcdClient)."""
    cluster = members(context)
    tls = None
    if tls_mode(context):
        pki = LabPki(context.lab_dir / "pki")
        tls = TlsFiles(ca=str(pki.ca), cert=str(pki.client.cert), key=str(pki.client.key))
    return EtcdClient([m.client_url for m in cluster], tls=tls, timeout=timeout, jump=context.jump,
                      connect_timeout=connect_timeout)
