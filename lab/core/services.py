"""The lab's services on the host: the lab registry and the lab's DNS.

Both answer nodes on the host's address on the lab network and nowhere else.
Each is recorded in the lab's state before it starts (so `lab destroy`
finds it even after a crash) and again with its pid and start time once it
runs; `lab halt` and `lab destroy` stop them, `lab up` starts them again.
Only the nspawn provider's labs get them for now: on a VM lab, the host
address belongs to the hypervisor's network (libvirt's own dnsmasq holds
port 53 there), see the README.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Collection

from lab.errors import LabError
from lab.host import daemons, dns
from lab.host.registry import REGISTRY_PORT
from lab.host.files import write_atomic
from lab.providers.base import LabContext, NodeSeed, Progress, Provider, no_progress

if TYPE_CHECKING:
    from lab.core.state import LabState

PROVIDERS_WITH_SERVICES = ("nspawn",)


def wanted(provider: str) -> bool:
    return provider in PROVIDERS_WITH_SERVICES


def running(state: "LabState", name: str) -> bool:
    return any(daemons.daemon_alive(res.get("pid"), res.get("start")) for res in state.find("service", name))


def endpoints(state: "LabState") -> dict[str, str]:
    """Where each running service answers ("registry" -> "10.77.3.1:5000", "dns" -> "10.77.3.1:53")."""
    from lab.host.network import host_address

    address = host_address(state["subnet"])
    ports = {"registry": REGISTRY_PORT, "dns": dns.DNS_PORT}
    return {name: f"{address}:{port}" for name, port in ports.items() if running(state, name)}


def prepare_containers(provider: Provider, progress: Progress = no_progress, seeded: Collection[str] = ()) -> None:
    """The lab's services (on providers that have them), then every node's Docker settings pointing at them
    (but on `seeded` nodes, which booted with them). Re-run after a node is added or removed: the DNS
    learns the names, the new node its settings."""
    from lab.cluster.docker import DockerSetup

    state = provider.context.state
    if wanted(provider.name):
        start_services(provider.context, progress)
    if not provider.configures_docker:
        return
    DockerSetup(provider.context, provider.ssh_endpoints(),
                registry=running(state, "registry"), dns=running(state, "dns")).run(progress, seeded=seeded)


def docker_seeds(provider: Provider) -> "dict[str, NodeSeed]":
    """Docker settings for nodes that boot with them: pointing at the services `prepare_containers`
    starts right after the nodes boot (before anything on them can pull)."""
    from lab.cluster.docker import DockerSetup

    return DockerSetup(provider.context, {}, registry=wanted(provider.name),
                       dns=wanted(provider.name)).first_boot_seeds()


def start_services(context: LabContext, progress: Progress = no_progress) -> None:
    """Start the registry (seeding its images first, once per machine) and the DNS, unless they run."""
    state = context.state
    address = context.host_address
    records = dict(context.addresses)
    if running(state, "dns") and any(res.get("records") != records for res in state.find("service", "dns")):
        stop_services(state, progress, only="dns")  # a node was added or removed: its names change
    if not running(state, "dns"):
        _start(state, "dns", dns.dnsmasq_argv(address, records), context.lab_dir / "dns.log",
               ready=lambda: dns.answers(address), what=f"the lab DNS (dnsmasq on {address}:53)",
               records=records)
    if not running(state, "registry"):
        from lab.host import registry
        from lab.images.containers import ensure_seeded

        ensure_seeded(progress)
        config = context.lab_dir / "registry.yml"
        write_atomic(config, registry.serving_config(address, upstream=context.spec.registry.upstream))
        endpoint = f"{address}:{REGISTRY_PORT}"
        _start(state, "registry", registry.serving_argv(config), context.lab_dir / "registry.log",
               ready=lambda: registry.answers(endpoint),
               what=f"the lab registry ({endpoint})")
    progress(f"lab registry on {address}:{REGISTRY_PORT}, lab DNS on {address}:{dns.DNS_PORT}")


def _start(state: "LabState", name: str, argv: list[str], log: Path, *, what: str, ready, user: str | None = None,
           **details) -> None:
    # Recorded before it starts, and its pid as soon as it exists: a crash
    # (kill -9) between the two leaves a record without a pid, which destroy
    # skips (it never signals a process it cannot identify) and the next
    # `lab up` replaces.
    state.forget("service", name)
    state.record("service", name, log=str(log), **details)
    daemons.start_daemon(argv, log=log, what=what, user=user, ready=ready,
                         on_start=lambda daemon: state.record("service", name, pid=daemon.pid, start=daemon.start))


def stop_services(state: "LabState", progress: Progress = no_progress, only: str | None = None) -> None:
    """Stop every service the state records (or the one named); each record goes once its process is gone."""
    problems = []
    for res in list(state.find("service", only)):
        try:
            daemons.stop_daemon(res.get("pid"), res.get("start"))
        except LabError as exc:
            problems.append(f"{res['id']}: {exc.message}")
            continue
        state.forget("service", res["id"])
    if problems:
        progress("could not stop: " + "; ".join(problems))
