"""Install the node agents over SSH: the scheduler agent (agent.py) and the update agent (updater.py).

Every module of lab/node/ is copied to the node's /var/lib/lab/ and run there
by the node's own python3 under a systemd unit, with a JSON configuration in
/etc/lab/ naming the node, its etcd endpoints (its own member first) and, on
a TLS lab, the member's certificates. Re-running changes nothing on a node
whose files are already right.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from lab.cluster.etcd_bootstrap import client_for, members
from lab.cluster.remote import BootstrapError, RemoteFile, check, journal_tail, put_files, units_active
from lab.host.ssh import SSHEndpoint, connect
from lab.node import layout
from lab.node.layout import NODE_PKI_DIR
from lab.providers.base import LabContext, Progress, no_progress
from lab.cluster.units import machines as registered_machines

AGENT_TTL = 5  # seconds: a dead machine's units move after about this long
NODE_SOURCES = Path(layout.__file__).parent  # lab/node/: what runs on the nodes


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

    def _files(self, node: str) -> list[RemoteFile]:
        cluster = members(self.context)
        own = next(m for m in cluster if m.node == node)
        config = {"name": node, "ip": self.context.addresses[node],
                  "metadata": self.context.node(node).metadata,
                  # Its own member first: the agent keeps working when only its side of a partition is up.
                  "endpoints": [own.client_url] + [m.client_url for m in cluster if m.node != node],
                  "tls": ({"ca": f"{NODE_PKI_DIR}/ca.crt", "cert": f"{NODE_PKI_DIR}/node.crt",
                           "key": f"{NODE_PKI_DIR}/node.key"} if own.tls else None),
                  "ttl": AGENT_TTL, "interval": 0.5}
        updates = self.context.spec.updates
        update_config = {"name": node, "endpoints": config["endpoints"], "tls": config["tls"],
                         "strategy": updates.strategy, "max_holders": updates.max_concurrent_reboots,
                         "interval": 1.0}
        sources = [RemoteFile(str(layout.NODE_DIR / path.name), path.read_bytes(), 0o644) for path in node_sources()]
        return sources + [
            RemoteFile(str(layout.AGENT_CONFIG), _json(config), 0o644),
            RemoteFile(str(layout.UPDATE_CONFIG), _json(update_config), 0o644),
            RemoteFile(str(layout.UNIT_DIR / f"{layout.AGENT_SERVICE}.service"), AGENT_UNIT_TEXT.encode(), 0o644),
            RemoteFile(str(layout.UNIT_DIR / f"{layout.UPDATE_SERVICE}.service"), UPDATE_UNIT_TEXT.encode(), 0o644)]

    def install(self, node: str) -> bool:
        with connect(self.endpoints[node]) as connection:
            changed = put_files(connection, self._files(node), node)
            active = units_active(connection, node, SERVICES)
            if changed or not active:
                check(connection, f"systemctl daemon-reload && systemctl enable --quiet {SERVICES} && "
                                  f"systemctl restart {SERVICES}", node)
            return changed or not active

    def run(self, progress: Progress = no_progress, nodes: list[str] | None = None, timeout: float = 30.0) -> None:
        nodes = nodes or [n.name for n in self.context.nodes]
        with ThreadPoolExecutor(max_workers=max(1, len(nodes))) as pool:
            changed = list(pool.map(self.install, nodes))
        touched = [n for n, c in zip(nodes, changed) if c]
        progress(f"scheduler: agent installed on {', '.join(touched)}" if touched
                 else "scheduler: agents unchanged")
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
