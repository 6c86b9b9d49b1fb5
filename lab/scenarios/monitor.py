"""Background sampling while a scenario runs: etcd leadership, members down, unit placement.

`LeaderMonitor` asks every etcd member for its status (one thread per
member, every 50 ms): who it thinks leads, at which term. Leader changes and
the wait-until conditions are read from it. `InvariantSampler` reads the
monitor's latest samples from outside the nodes to count the members down
at each instant (and whether quorum held), and follows where watched units
run.
"""

from __future__ import annotations

import threading
from typing import Any, Callable

from lab.errors import LabError

SAMPLE_INTERVAL = 0.05


class LeaderMonitor:
    """Samples each member's status: who it thinks leads, at which term."""

    def __init__(self, members, client_factory: Callable[[float], Any], clock: Callable[[], float]) -> None:
        self.members = members  # bootstrap.EtcdMember list
        self.client_factory = client_factory
        self.clock = clock
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self.ids: dict[str, str] = {}  # member id -> node
        # latest sample per node: (t, leader_node or None, term, is_self_leader)
        self.latest: dict[str, tuple[float, str | None, int, bool]] = {}
        self.changes: list[dict[str, Any]] = []
        self._max_term = 0

    def start(self) -> None:
        for member in self.members:
            thread = threading.Thread(target=self._sample, args=(member,), daemon=True,
                                      name=f"monitor-{member.node}")
            self._threads.append(thread)
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=2)

    def _sample(self, member) -> None:
        from lab.cluster.etcdclient import EtcdError

        client = self.client_factory(0.3)
        try:
            while not self._stop.is_set():
                now = self.clock()
                try:
                    status = client.status(member.client_url)
                except EtcdError:
                    status = None
                with self._lock:
                    if status is None:
                        self.latest[member.node] = (now, None, 0, False)
                    else:
                        self.ids[status.member_id] = member.node
                        leader = self.ids.get(status.leader)
                        self.latest[member.node] = (now, leader, status.raft_term, status.is_leader)
                        # A change is a leader of a newer term. An isolated old
                        # leader still claiming its old term is not one.
                        if status.is_leader and status.raft_term > self._max_term:
                            self._max_term = status.raft_term
                            self.changes.append({"t": now, "leader": member.node, "term": status.raft_term})
                self._stop.wait(SAMPLE_INTERVAL)
        finally:
            client.close()

    def snapshot(self) -> dict[str, tuple[float, str | None, int, bool]]:
        """A consistent copy of the latest sample per node."""
        with self._lock:
            return dict(self.latest)

    def leader(self, fresh_within: float = 1.0) -> tuple[str | None, int]:
        """The member that most recently reported itself leader at the highest term, if fresh."""
        now = self.clock()
        with self._lock:
            claims = [(term, node) for node, (t, _, term, is_leader) in self.latest.items()
                      if is_leader and now - t <= fresh_within]
        if not claims:
            return None, 0
        term, node = max(claims)
        return node, term

    def new_leader_since(self, old: str | None, old_term: int, since: float) -> dict[str, Any] | None:
        with self._lock:
            for change in self.changes:
                if change["t"] >= since and change["leader"] != old and change["term"] > old_term:
                    return change
        return None


class InvariantSampler:
    """Samples, from outside the nodes, how many etcd members are down and where units run."""

    def __init__(self, members, monitor: LeaderMonitor, client_factory: Callable[[float], Any],
                 clock: Callable[[], float], interval: float = SAMPLE_INTERVAL) -> None:
        self.members = members
        self.monitor = monitor
        self.client_factory = client_factory
        self.clock = clock
        self.interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.samples = 0
        self.max_down = 0
        self.max_down_at = 0.0
        self.max_down_nodes: list[str] = []
        self.quorum_lost: list[float] = []
        self.downtime: dict[str, float] = {}  # node -> seconds its member did not answer
        self._down_since: dict[str, float] = {}
        self._units: list[str] = []
        self.placements: dict[str, list[str]] = {}  # unit -> machines it was seen on, in order

    def watch_units(self, names: list[str]) -> None:
        self._units += [n for n in names if n not in self._units]

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, daemon=True, name="invariants")
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)

    def _loop(self) -> None:
        nodes = [m.node for m in self.members]
        majority = len(nodes) // 2 + 1
        next_units = 0.0
        while not self._stop.is_set():
            now = self.clock()
            latest = self.monitor.snapshot()
            # Down: no fresh answer from the member (a failed probe, or none for 0.5 s).
            down = sorted(node for node in nodes
                          if node not in latest or latest[node][2] == 0 or now - latest[node][0] > 0.5)
            if len(latest) == len(nodes):  # every member probed at least once
                self.samples += 1
                for node in nodes:
                    if node in down:
                        self._down_since.setdefault(node, now)
                    elif node in self._down_since:
                        self.downtime[node] = self.downtime.get(node, 0.0) + now - self._down_since.pop(node)
                if len(down) > self.max_down:
                    self.max_down, self.max_down_at, self.max_down_nodes = len(down), now, down
                if len(nodes) - len(down) < majority:
                    self.quorum_lost.append(now)
            if self._units and now >= next_units:
                self._sample_units()
                next_units = now + 0.5
            self._stop.wait(self.interval)

    def _sample_units(self) -> None:
        from lab.cluster.units import list_units

        client = self.client_factory(0.5)
        try:
            rows = list_units(client)
        except LabError:
            return
        finally:
            client.close()
        for row in rows:
            if row.name in self._units and row.machines and row.active == "active":
                seen = self.placements.setdefault(row.name, [])
                if not seen or seen[-1] != row.machines[0]:
                    seen.append(row.machines[0])

    def unit_moves(self) -> dict[str, list[str]]:
        return {unit: path for unit, path in self.placements.items() if len(path) > 1}
