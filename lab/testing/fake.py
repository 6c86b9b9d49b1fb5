"""An in-memory Provider that records every call: a test double for what sits
above the provider layer (the `up` steps, destroy, the CLI's fault verbs), as
`fabric.testing` is for connection code.

It is not a test of any provider: the real ones are tested on real nodes
(tests/real). It keeps to the provider contract the core relies on: a node is
recorded in the lab's state before it "exists", destroy removes what the
state lists, faults change node states. A failure can be injected into any
method with `FakeProvider.failures`.

    with fake_provider() as calls:
        Lab.open(...).up(bootstrap=False)
    assert calls[:2] == ["preflight", "up"]
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from pathlib import Path
from typing import ClassVar, Iterator

from lab.core.state import NAME, register_resource_kind
from lab.host.ssh import SSHEndpoint
from lab.providers import substituted
from lab.providers.base import Availability, NodeState, NodeStatus, Progress, Provider, no_progress


register_resource_kind("fake-node", lambda res, lab_dir, lab_id: None if isinstance(res.get("id"), str)
                       and NAME.fullmatch(res["id"]) else "not a node name")


class FakeProvider(Provider):
    name = "fake"
    # Shared by every instance, as a real provider's nodes outlive its objects:
    # method name -> exception to raise when it is called.
    calls: ClassVar[list[str]] = []
    failures: ClassVar[dict[str, BaseException]] = {}
    nodes: ClassVar[dict[str, NodeState]] = {}

    @classmethod
    def reset(cls) -> None:
        cls.calls.clear()
        cls.failures.clear()
        cls.nodes.clear()

    def _call(self, method: str, *args: object) -> None:
        self.calls.append(method if not args else f"{method} {' '.join(map(str, args))}")
        if method in self.failures:
            raise self.failures[method]

    @classmethod
    def availability(cls) -> Availability:
        return Availability(True, "the fake provider is always there")

    def preflight(self) -> None:
        self._call("preflight")

    def up(self, progress: Progress = no_progress) -> None:
        for node in self.context.nodes:
            if not self.context.state.find("fake-node", node.name):
                self.context.state.record("fake-node", node.name)  # recorded before it exists
            self._call("up", node.name)
            self.nodes[node.name] = NodeState.RUNNING

    def status(self) -> list[NodeStatus]:
        return [NodeStatus(n.name, self.nodes.get(n.name, NodeState.NOT_CREATED), ip=self.context.addresses.get(n.name))
                for n in self.context.nodes]

    def halt(self, progress: Progress = no_progress) -> None:
        self._call("halt")
        for node in self.nodes:
            self.nodes[node] = NodeState.STOPPED

    def destroy(self, progress: Progress = no_progress) -> None:
        self._call("destroy")
        for resource in list(self.context.state.resources if self.context.state is not None else []):
            if resource["kind"] == "fake-node":
                self.nodes.pop(resource["id"], None)
                self.context.state.forget("fake-node", resource["id"])

    def remove_node(self, node: str, progress: Progress = no_progress) -> None:
        self._call("remove_node", node)
        self.nodes.pop(node, None)
        self.context.state.forget("fake-node", node)

    def stage_update(self, node: str, rootfs: Path, progress: Progress = no_progress,
                     cancel: threading.Event | None = None) -> str:
        self._call("stage_update", node)
        return "b"

    def ssh_endpoints(self) -> dict[str, SSHEndpoint]:
        return {n: SSHEndpoint(node=n, host=self.context.addresses[n], port=22, user="root",
                               identity_file=self.context.ssh_key, known_hosts=self.context.known_hosts)
                for n, state in self.nodes.items() if state is NodeState.RUNNING}

    def reboot(self, node: str, progress: Progress = no_progress) -> None:
        self._call("reboot", node)

    def kill(self, node: str) -> None:
        self._call("kill", node)
        self.nodes[node] = NodeState.STOPPED

    def start(self, node: str, progress: Progress = no_progress) -> None:
        self._call("start", node)
        self.nodes[node] = NodeState.RUNNING

    def pause(self, node: str) -> None:
        self._call("pause", node)
        self.nodes[node] = NodeState.PAUSED

    def resume(self, node: str) -> None:
        self._call("resume", node)
        self.nodes[node] = NodeState.RUNNING

    def partition(self, groups: list[list[str]]) -> None:
        self._call("partition", "|".join(",".join(g) for g in groups))

    def heal(self) -> None:
        self._call("heal")


@contextmanager
def fake_provider(under: str = "nspawn") -> Iterator[type[FakeProvider]]:
    """Put FakeProvider where the registry would find provider `under` (a name the spec accepts)."""
    FakeProvider.reset()
    with substituted(under, f"{__name__}:FakeProvider"):
        yield FakeProvider
    FakeProvider.reset()
