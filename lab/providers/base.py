"""The provider interface: how nodes come to exist, and how they are hurt.

Everything above this layer (bootstrap, scenarios, the CLI) speaks only to
`Provider`. A provider is one module with these methods; nothing else knows
how its nodes are made.
"""

from __future__ import annotations

import enum
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar

from lab.errors import UsageError
from lab.host.network import host_address
from lab.host import jumphost
from lab.host.ssh import SSHEndpoint
from lab.model.spec import LabSpec, ResolvedNode

Progress = Callable[[str], None]


def no_progress(_message: str) -> None:
    pass


class NodeState(str, enum.Enum):
    NOT_CREATED = "not_created"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class NodeStatus:
    name: str
    state: NodeState
    ip: str | None = None
    boot_id: str | None = None
    detail: str = ""
    memory_bytes: int | None = None  # what the node uses now, where the provider can tell
    memory_limit_bytes: int | None = None

    def to_json(self) -> dict:
        return {"name": self.name, "state": self.state.value, "ip": self.ip,
                "boot_id": self.boot_id, "detail": self.detail,
                "memory_bytes": self.memory_bytes, "memory_limit_bytes": self.memory_limit_bytes}


@dataclass(frozen=True)
class Availability:
    usable: bool
    reason: str  # why not, or what was found


@dataclass(frozen=True)
class NodeSnapshot:
    """What a snapshot holds of one node besides its files: the slot it boots and the image each slot names."""

    node: str
    boot_slot: str
    slots: dict[str, str]  # slot ("a", "b") -> the image root filesystem its link named

    def to_json(self) -> dict:
        return {"node": self.node, "boot_slot": self.boot_slot, "slots": dict(self.slots)}


@dataclass(frozen=True)
class SnapshotTaken:
    """What `Provider.snapshot` copied, and for how long the nodes stood still."""

    nodes: list[NodeSnapshot]
    frozen_s: float  # from the first node frozen to the last thawed
    running: list[str]  # the nodes that ran (and were frozen); the others were stopped


@dataclass(frozen=True)
class NodeFile:
    """A file lab writes on a node: over SSH once it runs, or into its disk before its first boot."""

    path: str  # absolute, on the node
    content: bytes
    mode: int
    owner: str = "root"  # a user of the node's own /etc/passwd


@dataclass(frozen=True)
class NodeSeed:
    """What a node should boot with the first time: files, and units started at boot (enabled in
    multi-user.target), so that its services start with it instead of being set up over SSH after."""

    files: tuple[NodeFile, ...] = ()
    enabled_units: tuple[str, ...] = ()

    def __add__(self, other: "NodeSeed") -> "NodeSeed":
        return NodeSeed(self.files + other.files, self.enabled_units + other.enabled_units)


@dataclass
class LabContext:
    """What a provider is given about the lab it serves."""

    spec: LabSpec
    lab_dir: Path
    lab_id: str
    nodes: list[ResolvedNode]
    addresses: dict[str, str]  # node name -> IP on the lab subnet
    subnet: str
    ssh_key: Path  # per-lab private key; .pub beside it
    known_hosts: Path
    # The lab's LabState: providers record what they create in it *before*
    # creating it, so destroy can undo everything after a crash.
    state: Any = None
    # The SSH jump host every connection to a node goes through (lab.host.reach), or None: directly.
    jump: Any = None

    @property
    def host_address(self) -> str:
        """The host's address on the lab network (.1): the lab registry and DNS answer there."""
        return host_address(self.subnet)

    def node(self, name: str) -> ResolvedNode:
        for node in self.nodes:
            if node.name == name:
                return node
        raise UsageError(f"no node named {name!r} in lab {self.spec.name!r}",
                         hint=f"nodes are: {', '.join(n.name for n in self.nodes)}")

    def node_info(self, name: str) -> str:
        """/etc/lab/node.json of a node, on every provider: who it is, its lab address, the other nodes'
        (written at creation on nspawn, with the agents elsewhere; checks and scenarios read it)."""
        import json

        return json.dumps({"lab": self.spec.name, "lab_id": self.lab_id, "node": name, "ip": self.addresses[name],
                           "peers": self.addresses, "metadata": self.node(name).metadata}) + "\n"


class Provider(ABC):
    """One way of making nodes. Subclasses live one per module in this package."""

    name: ClassVar[str]
    # Set by `lab destroy --forget-unreachable`: a node that cannot be reached to be cleaned is forgotten
    # (what lab put there stays) instead of keeping the lab for another try. Only nodes lab did not make
    # (existing hosts) can be unreachable for good.
    forget_unreachable: bool = False
    # Whether `lab up` writes its Docker settings (/etc/docker/daemon.json) on the nodes: not on machines
    # lab did not make, whose Docker belongs to someone else.
    configures_docker: ClassVar[bool] = True

    def __init__(self, context: LabContext) -> None:
        self.context = context

    @classmethod
    def fixed_addresses(cls, spec: LabSpec, nodes: list[str], recorded: dict[str, str]) -> dict[str, str] | None:
        """Each node's address when the provider, not the lab's subnet, decides it (existing hosts have
        theirs); None: lab gives addresses on the lab's subnet. `recorded`: what the lab's state holds."""
        return None

    @classmethod
    def jump_host(cls, spec: LabSpec, lab_dir: Path, known_hosts: Path) -> Any:
        """The SSHEndpoint of the jump host this machine reaches the nodes through, or None (directly)."""
        return None

    @property
    def jump(self) -> Any:
        """The jump host (context.jump), checked against the lab's pin once there is one (pinned during this
        command too), or None: the nodes are reached directly."""
        return jumphost.checked(self.context.jump, self.context.known_hosts)

    @classmethod
    def settled_spec(cls, spec: LabSpec, state: Any = None) -> LabSpec:
        """The spec as this provider runs a lab of it here: what the spec leaves to the host (libvirt's
        `driver: auto`) settled, from the lab's state where it recorded it. Cheap, never boots anything."""
        return spec

    @classmethod
    @abstractmethod
    def availability(cls) -> Availability:
        """Can this provider run on this host at all? Cheap; used by auto-selection."""

    @abstractmethod
    def preflight(self) -> None:
        """Raise PrerequisiteError naming the exact fix if `up` cannot work."""

    @abstractmethod
    def up(self, progress: Progress = no_progress) -> None:
        """Create and start every node (or start stopped ones); return when all answer SSH."""

    def seed_first_boot(self, seeds: dict[str, NodeSeed]) -> set[str]:
        """Have the next `up` write each node's seed into its disk before that node first boots. Returns
        the nodes it will seed: those not created yet, on a provider that can write a node's disk before
        it boots. The rest are set up over SSH as before (here: every node)."""
        return set()

    @abstractmethod
    def status(self) -> list[NodeStatus]:
        """State of every node of the spec, created or not."""

    @abstractmethod
    def halt(self, progress: Progress = no_progress) -> None:
        """Power every node off cleanly, keeping its state for the next `up`."""

    @abstractmethod
    def destroy(self, progress: Progress = no_progress) -> None:
        """Remove everything this provider created for the lab. Idempotent, works after a crash."""

    @abstractmethod
    def remove_node(self, node: str, progress: Progress = no_progress) -> None:
        """Destroy one node and everything the provider made for it (the rest of the lab stays)."""

    # Seconds a node's reboot may take beyond an nspawn node's few: added to the waits of scenarios
    # (written for nspawn) that sit through reboots, so that they do not cut off a slow, passing roll.
    reboot_allowance_s: ClassVar[float] = 0.0
    # Which flavor of a node OS image `lab update` stages (lab/images/recipes.py FLAVORS): nspawn
    # nodes take the container image's /usr, VMs the VM image's (with its kernel).
    update_flavor: ClassVar[str] = "container"

    def preflight_notes(self) -> list[str]:
        """What `lab up` should say before it goes on: nothing wrong enough to stop it."""
        return []

    def update_problem(self) -> tuple[str, str] | None:
        """Why `lab update` cannot work on this lab's nodes at all (problem, hint), or None."""
        return None

    def prepare_update(self, rootfs: Path, progress: Progress = no_progress) -> None:
        """Whatever staging `rootfs` on every node needs made once, before the nodes are staged at once."""

    @abstractmethod
    def stage_update(self, node: str, rootfs: Path, progress: Progress = no_progress,
                     cancel: threading.Event | None = None) -> str:
        """Write an OS image into the node's passive slot; return the slot's name. Once `cancel` is set
        (Ctrl-C), a long staging stops early, leaving the passive slot to be written again."""

    @abstractmethod
    def ssh_endpoints(self) -> dict[str, SSHEndpoint]:
        """How to reach each running node over SSH."""

    # Fault primitives, used by scenarios and `lab fault`.

    @abstractmethod
    def reboot(self, node: str, progress: Progress = no_progress) -> None:
        """Reboot one node cleanly and wait until it answers SSH again."""

    @abstractmethod
    def kill(self, node: str) -> None:
        """Stop a node at once, as if its power were pulled."""

    @abstractmethod
    def start(self, node: str, progress: Progress = no_progress) -> None:
        """Start one stopped or killed node and wait until it answers SSH."""

    @abstractmethod
    def pause(self, node: str) -> None:
        """Freeze every process of a node."""

    @abstractmethod
    def resume(self, node: str) -> None:
        """Thaw a paused node."""

    def check_partition_groups(self, groups: list[list[str]]) -> None:
        """Every name is a node of this lab, and none is in two groups."""
        names = [n for group in groups for n in group]
        for name in names:
            self.context.node(name)
        if len(set(names)) != len(names):
            raise UsageError("a node appears in two partition groups", hint="list every node at most once")

    @abstractmethod
    def partition(self, groups: list[list[str]]) -> None:
        """Drop all traffic between nodes of different groups (nodes in no group keep talking to all)."""

    @abstractmethod
    def heal(self) -> None:
        """Undo every partition."""

    # Snapshots: the whole lab at one moment. Not abstract: a provider that cannot take them says why.

    def snapshot(self, directory: Path, progress: Progress = no_progress) -> SnapshotTaken:
        """Copy every node's writable state into `directory` (which does not exist yet) at one moment:
        all nodes stand still together while it is copied, so etcd's members agree on that moment."""
        raise self.snapshot_refusal()

    def restore(self, directory: Path, nodes: list[NodeSnapshot], progress: Progress = no_progress) -> None:
        """Put every node back to what `snapshot` copied into `directory`, and start every node;
        return when all answer SSH. Nothing is changed if the copy cannot be staged."""
        raise self.snapshot_refusal()

    def prepare_restore(self, directory: Path, progress: Progress = no_progress) -> None:
        """Make the next restore of this snapshot fast (after a save, and after a restore once the cluster is
        back), and remove what the last restore put aside. Nothing to do by default."""

    def snapshot_refusal(self) -> UsageError:
        return UsageError(f"the {self.name} provider cannot take lab snapshots",
                          hint="lab snapshots are for nspawn labs (--provider nspawn)")
