"""Docker on every node: the daemon's settings that make containers behave in a lab.

/etc/docker/daemon.json on each node, written over SSH by `lab up` (the same
for every provider):
  * registry-mirrors / insecure-registries: plain names (`docker run ubuntu`)
    pull through the lab registry on the host, offline;
  * dns: containers ask the lab's DNS, which answers node names and refuses
    the rest (never a public resolver);
  * init: tini runs as each container's PID 1, so a shell as the container's
    command (the seed's hello.service) stops on SIGTERM in a second instead
    of being killed after systemd's timeout, leaving its container running;
  * shutdown-timeout: a node powers off within lab's stop timeout;
  * log-opts: a chatty container cannot fill the node's disk.
Docker is socket-activated: the file is in place before its first start, and
a running daemon is restarted only when the file changed.
"""

from __future__ import annotations

import json
from typing import Collection

from lab.cluster.remote import check, put_files, run_bounded
from lab.host.registry import REGISTRY_PORT
from lab.host.ssh import SSHEndpoint, connect, parallel_map
from lab.providers.base import LabContext, NodeFile, NodeSeed, Progress, no_progress

DAEMON_CONFIG = "/etc/docker/daemon.json"


def daemon_config(host: str, registry: bool, dns: bool) -> dict:
    """daemon.json for a node of a lab whose host address is `host`, with the lab services it has."""
    config: dict = {"init": True, "shutdown-timeout": 5, "log-opts": {"max-size": "10m", "max-file": "2"}}
    if registry:
        config["registry-mirrors"] = [f"http://{host}:{REGISTRY_PORT}"]
        config["insecure-registries"] = [f"{host}:{REGISTRY_PORT}"]
    if dns:
        config["dns"] = [host]
    return config


class DockerSetup:
    def __init__(self, context: LabContext, endpoints: dict[str, SSHEndpoint], *, registry: bool, dns: bool) -> None:
        self.context = context
        self.endpoints = endpoints
        self.text = (json.dumps(daemon_config(context.host_address, registry, dns), indent=2, sort_keys=True)
                     + "\n").encode()

    def configure(self, node: str) -> bool:
        with connect(self.endpoints[node]) as connection:
            if run_bounded(connection, "command -v dockerd >/dev/null", node).exited != 0:
                return False  # a generic box adopted without Docker (box.docker: false)
            changed = put_files(connection, [NodeFile(DAEMON_CONFIG, self.text, 0o644)], node)
            if changed:
                check(connection, "systemctl try-restart docker.service", node)
            return changed

    def first_boot_seeds(self) -> dict[str, NodeSeed]:
        """daemon.json for nodes that boot with it: in place before Docker's first start."""
        return {n.name: NodeSeed((NodeFile(DAEMON_CONFIG, self.text, 0o644),)) for n in self.context.nodes}

    def run(self, progress: Progress = no_progress, seeded: Collection[str] = ()) -> None:
        """Write daemon.json over SSH on every node but those that booted with it (`seeded`)."""
        nodes = [n.name for n in self.context.nodes if n.name not in seeded]
        changed = parallel_map(self.configure, nodes)
        touched = [n for n, c in zip(nodes, changed) if c]
        if touched:
            progress(f"docker: configured on {', '.join(touched)}")
