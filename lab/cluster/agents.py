"""Install the node agents over SSH: the scheduler agent (agent.py) and the update agent (updater.py).

Every module of lab/node/ is copied to the node's /var/lib/lab/ and run there
by the node's own python3 under a systemd unit, with a JSON configuration in
/etc/lab/ naming the node, its etcd endpoints (its own member first) and, on
a TLS lab, the node's certificates; a worker's agents reach etcd through
the node's gateway on 127.0.0.1. Re-running changes nothing on a node whose
files are already right.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Collection

from lab.cluster.etcd_bootstrap import agent_endpoints, client_for, tls_mode
from lab.cluster.remote import BootstrapError, check, journal_tail, units_active, written_files
from lab.host.ssh import SSHEndpoint, connect, parallel_map
from lab.node import layout
from lab.node.layout import NODE_PKI_DIR
from lab.providers.base import LabContext, NodeFile, NodeSeed, Progress, no_progress
from lab.cluster.units import machines as registered_machines

AGENT_TTL = 5  # seconds: a dead machine's units move after about this long
AGENT_INTERVAL = 0.5  # seconds between an agent's rounds (renewal, engine pass, unit reconcile)
NODE_SOURCES = Path(layout.__file__).parent  # lab/node/: what runs on the nodes


def unit_move_bound(election_bound_s: float, election_timeout_s: float) -> float:
    """How long after its machine dies a correct lab may take to run that machine's unit elsewhere.

    The unit moves when the dead agent's lease expires (AGENT_TTL). If the
    dead machine also led etcd, nothing expires until a new leader is elected
    (at most the election liveness bound), and etcd's new leader then extends
    every lease by the election timeout before counting down again (its
    lessor's promotion). After the expiry the engine places the unit on its
    next round and that machine's agent starts it on its own next round.
    The rest is a margin for a starved host: the agents are processes on the
    same cores as everything else.
    """
    return (election_bound_s + election_timeout_s + AGENT_TTL + 2 * AGENT_INTERVAL
            + 3.0)


def node_sources() -> list[Path]:
    """The files shipped to every node: each module of lab/node/."""
    return sorted(path for path in NODE_SOURCES.glob("*.py") if path.name != "__init__.py")


def service_unit(description: str, ordering: str, program: str, config: Path) -> str:
    """A node agent's systemd unit: python3 runs `program` with its config, restarted forever."""
    return (f"[Unit]\nDescription={description}\n{ordering}StartLimitIntervalSec=0\n\n"
            f"[Service]\nExecStart=/usr/bin/python3 -u {layout.NODE_DIR}/{program} {config}\n"
            "Restart=always\nRestartSec=1\n\n[Install]\nWantedBy=multi-user.target\n")


AGENT_UNIT_TEXT = service_unit(
    "lab scheduler agent (fleet, reborn): runs the units etcd assigns to this machine",
    "After=etcd.service network-online.target\nWants=network-online.target\n"
    "# Restart forever: the agent is how this machine takes part in scheduling.\n",
    "agent.py", layout.AGENT_CONFIG)
UPDATE_UNIT_TEXT = service_unit(
    "lab update agent: A/B slot updates under the etcd reboot lock",
    f"After=etcd.service {layout.AGENT_SERVICE}.service\n", "updater.py", layout.UPDATE_CONFIG)
SERVICES = f"{layout.AGENT_SERVICE} {layout.UPDATE_SERVICE}"


class SchedulerBootstrap:
    """Install and start the scheduler and update agents on every node; wait until every machine registered."""

    def __init__(self, context: LabContext, endpoints: dict[str, SSHEndpoint]) -> None:
        self.context = context
        self.endpoints = endpoints

    def _files(self, node: str) -> list[NodeFile]:
        config = {"name": node, "ip": self.context.addresses[node],
                  "metadata": self.context.node(node).metadata,
                  # A member's own first, then the others; a worker's local gateway.
                  "endpoints": agent_endpoints(self.context, node),
                  "tls": ({"ca": f"{NODE_PKI_DIR}/ca.crt", "cert": f"{NODE_PKI_DIR}/node.crt",
                           "key": f"{NODE_PKI_DIR}/node.key"} if tls_mode(self.context) else None),
                  "ttl": AGENT_TTL, "interval": AGENT_INTERVAL}
        updates = self.context.spec.updates
        update_config = {"name": node, "endpoints": config["endpoints"], "tls": config["tls"],
                         "strategy": updates.strategy, "max_holders": updates.max_concurrent_reboots,
                         "interval": 1.0}
        sources = [NodeFile(str(layout.NODE_DIR / path.name), path.read_bytes(), 0o644) for path in node_sources()]
        return sources + [
            NodeFile(str(layout.AGENT_CONFIG), _json(config), 0o644),
            NodeFile(str(layout.UPDATE_CONFIG), _json(update_config), 0o644),
            NodeFile(str(layout.UNIT_DIR / f"{layout.AGENT_SERVICE}.service"), AGENT_UNIT_TEXT.encode(), 0o644),
            NodeFile(str(layout.UNIT_DIR / f"{layout.UPDATE_SERVICE}.service"), UPDATE_UNIT_TEXT.encode(), 0o644)]

    def node_info_file(self, node: str) -> NodeFile:
        """Who the node is (/etc/lab/node.json), for checks and scenarios: nspawn writes it at creation,
        other providers' nodes get it here. Not the agents' input: a new peer in it restarts nothing."""
        return NodeFile(str(layout.NODE_INFO), self.context.node_info(node).encode(), 0o644)

    def install(self, node: str) -> bool:
        with connect(self.endpoints[node]) as connection:
            written = written_files(connection, [*self._files(node), self.node_info_file(node)], node)
            changed = any(path != str(layout.NODE_INFO) for path in written)
            active = units_active(connection, node, SERVICES)
            if changed or not active:
                check(connection, f"systemctl daemon-reload && systemctl enable --quiet {SERVICES} && "
                                  f"systemctl restart {SERVICES}", node)
            return changed or not active

    def first_boot_seeds(self) -> dict[str, NodeSeed]:
        """Every node's agents, enabled, for nodes that boot with them (they start once etcd is up)."""
        units = (f"{layout.AGENT_SERVICE}.service", f"{layout.UPDATE_SERVICE}.service")
        return {n.name: NodeSeed(tuple(self._files(n.name)), units) for n in self.context.nodes}

    def run(self, progress: Progress = no_progress, nodes: list[str] | None = None, timeout: float = 30.0,
            seeded: Collection[str] = ()) -> None:
        """Install the agents over SSH on `nodes` (default: every node) except those that booted with
        them (`seeded`), then wait until every machine registered and an engine is elected."""
        nodes = [n for n in nodes or [n.name for n in self.context.nodes] if n not in seeded]
        changed = parallel_map(self.install, nodes)
        touched = [n for n, c in zip(nodes, changed) if c]
        if touched:
            progress(f"scheduler: agent installed on {', '.join(touched)}")
        elif nodes:
            progress("scheduler: agents unchanged")
        self.wait_registered(progress, timeout)

    def wait_registered(self, progress: Progress, timeout: float) -> None:
        client = client_for(self.context)
        expected = {n.name for n in self.context.nodes}
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                machines = {m.name for m in registered_machines(client)}  # a garbled record is one clear error
                engine = client.get(layout.ENGINE)
                if expected <= machines and engine:
                    progress(f"scheduler: {len(machines)} machines registered, engine elected")
                    return
                time.sleep(0.2)
        finally:
            client.close()
        missing = sorted(expected - machines)
        raise BootstrapError(f"scheduler agents did not register in {timeout:.0f} s: missing {', '.join(missing)}:\n"
                             + "\n".join(journal_tail(self.endpoints[node], layout.AGENT_SERVICE) for node in missing),
                             hint=f"see `lab exec --node NODE -- journalctl -u {layout.AGENT_SERVICE}`")


def _json(config: dict) -> bytes:
    return (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()
