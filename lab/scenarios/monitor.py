"""Background sampling while a scenario runs: etcd leadership, members down, unit placement.

`LeaderMonitor` asks every etcd member for its status (one thread per
member, every 50 ms): who it thinks leads, at which term, and its committed
raft index. Leader changes and the wait-until conditions are read from it;
the committed indexes let the verdict see a leader elected from a stale log
(`stale_leaders`). `InvariantSampler` reads the
monitor's latest samples from outside the nodes to count the members down
at each instant (and whether quorum held), and follows where watched units
run.
"""

from __future__ import annotations

import threading
from typing import Any, Callable

from lab.errors import LabError

SAMPLE_INTERVAL = 0.05
STATUS_TIMEOUT = 0.3  # one member's status answer; a member slower than this counts as not answering
# A new connection's TLS handshake: never cut off at an answer's timeout. With three emulated VMs on a
# loaded two-core host a handshake took 0.6 s (p50) to 1.6 s where an answer took 0.14 s; a 0.3 s
# limit on both left the monitor unable to reconnect after one slow answer, blind for the whole fault.
HANDSHAKE_TIMEOUT = 5.0


def status_timeout(heartbeat_ms: int) -> float:
    """How long a member's status answer may take before it counts as not answering: STATUS_TIMEOUT,
    or three heartbeats where the lab's heartbeat says its members are slower to reach (etcd's
    heartbeat is meant to be about the round trip between members: 250 ms for emulated VMs)."""
    return max(STATUS_TIMEOUT, 3 * heartbeat_ms / 1000)


class LeaderMonitor:
    """Samples each member's status: who it thinks leads, at which term."""

    def __init__(self, members, client_factory: Callable[..., Any], clock: Callable[[], float],
                 status_timeout: float = STATUS_TIMEOUT) -> None:
        self.members = members  # bootstrap.EtcdMember list
        self.client_factory = client_factory  # (timeout, connect_timeout=None) -> EtcdClient
        self.clock = clock
        self.status_timeout = status_timeout
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self.ids: dict[str, str] = {}  # member id -> node
        # latest sample per node: (t, leader_node or None, term, is_self_leader)
        self.latest: dict[str, tuple[float, str | None, int, bool]] = {}
        # {"t", "leader", "term"}, and while that leader leads its term: "index" (its highest committed
        # raft index reported) and "last_t" (its latest sample as leader of that term)
        self.changes: list[dict[str, Any]] = []
        self._max_term = 0
        # (t, index): every time the highest committed index any member reported went up
        self.committed: list[tuple[float, int]] = []
        # node -> (first, latest): when its failing probes since its last answer started
        self._failing: dict[str, tuple[float, float]] = {}
        self._probing: dict[str, float] = {}  # node -> when its probe under way started

    def start(self) -> None:
        for member in self.members:
            thread = threading.Thread(target=self._sample, args=(member,), daemon=True,
                                      name=f"monitor-{member.node}")
            self._threads.append(thread)
            thread.start()

    def observer_client(self, timeout: float = 0.0):
        """A client for the run's observers, kept across their polls: answers within `timeout`, at
        least the status timeout; a new connection's handshake within HANDSHAKE_TIMEOUT."""
        return self.client_factory(max(timeout, self.status_timeout), connect_timeout=HANDSHAKE_TIMEOUT)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:  # a probe may be in a handshake: wait it out (a late one is dropped)
            thread.join(timeout=HANDSHAKE_TIMEOUT + self.status_timeout + 1)

    def _sample(self, member) -> None:
        from lab.cluster.etcdclient import EtcdError

        client = self.observer_client()
        try:
            while not self._stop.is_set():
                now = self.clock()
                with self._lock:
                    self._probing[member.node] = now
                try:
                    status = client.status(member.client_url)
                except EtcdError:
                    status = None
                with self._lock:
                    self._probing.pop(member.node, None)
                    if self._stop.is_set():
                        break  # after stop(): the run's records are being read
                    if status is None:
                        self.latest[member.node] = (now, None, 0, False)
                        first = self._failing.get(member.node, (now, now))[0]
                        self._failing[member.node] = (first, now)
                    else:
                        self._failing.pop(member.node, None)
                        self.ids[status.member_id] = member.node
                        leader = self.ids.get(status.leader)
                        self.latest[member.node] = (now, leader, status.raft_term, status.is_leader)
                        # A change is a leader of a newer term. An isolated old
                        # leader still claiming its old term is not one.
                        if status.is_leader and status.raft_term > self._max_term:
                            self._max_term = status.raft_term
                            self.changes.append({"t": now, "leader": member.node, "term": status.raft_term,
                                                 "index": status.raft_index, "last_t": now})
                        self._note_index(member.node, now, status.raft_term, status.raft_index, status.is_leader)
                self._stop.wait(SAMPLE_INTERVAL)
        finally:
            client.close()

    def _note_index(self, node: str, now: float, term: int, index: int, is_leader: bool) -> None:
        """Called under the lock: the highest committed index so far, and the current leader's own."""
        if not self.committed or index > self.committed[-1][1]:
            self.committed.append((now, index))
        if is_leader and self.changes and self.changes[-1]["leader"] == node and self.changes[-1]["term"] == term:
            change = self.changes[-1]
            change["index"] = max(change["index"], index)
            change["last_t"] = now

    def committed_before(self, t: float) -> int:
        """The highest raft index any member reported committed at or before `t` (0: none seen)."""
        with self._lock:
            return max((index for at, index in self.committed if at <= t), default=0)

    def failing(self) -> dict[str, tuple[float, float]]:
        """Members whose probes fail since their last answer: node -> (first failed probe's start, latest).

        A probe still under way past the status timeout counts as failing now: it may wait up to
        HANDSHAKE_TIMEOUT for a new connection, and a member that cannot be reached must not
        look up for that long."""
        now = self.clock()
        with self._lock:
            failing = dict(self._failing)
            for node, started in self._probing.items():
                if now - started > self.status_timeout:
                    failing[node] = (failing.get(node, (started, now))[0], now)
            return failing

    def snapshot(self) -> dict[str, tuple[float, str | None, int, bool]]:
        """A consistent copy of the latest sample per node."""
        with self._lock:
            return dict(self.latest)

    def leader(self, fresh_within: float | None = None) -> tuple[str | None, int]:
        """The member that most recently reported itself leader at the highest term, if fresh (within
        a second, or two status timeouts where answers are slow)."""
        fresh_within = fresh_within if fresh_within is not None else max(1.0, 2 * self.status_timeout)
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


# How long a new leader must have been seen leading before its log is judged: enough to commit the
# entry of its own term (a vote round trip), and more, on a loaded machine.
SETTLED_LEADER_S = 1.0


def stale_leaders(faults: list[dict[str, Any]], changes: list[dict[str, Any]],
                  committed_before: Callable[[float], int]) -> list[str]:
    """Leaders elected after a fault whose log lacked what was committed before the fault.

    Raft elects only a member holding every committed entry, and a new leader
    commits an entry of its own term first, so its committed index soon
    passes every index committed before the fault. A leader seen leading for
    SETTLED_LEADER_S whose committed index stayed below that was elected
    from a stale log. A leader seen for less is not judged.
    """
    found = []
    for fault in faults:
        if not fault.get("leader"):
            continue
        change = next((c for c in changes if c["t"] >= fault["requested"] and c["term"] > fault.get("term", 0)
                       and c["leader"] != fault["leader"]), None)
        if change is None or change.get("last_t", change["t"]) - change["t"] < SETTLED_LEADER_S:
            continue
        before = committed_before(fault["requested"])
        if change.get("index", 0) < before:
            found.append(f"{change['leader']} led term {change['term']} (from {change['t']:.2f} s, after the "
                         f"{fault['action']} at {fault['requested']:.2f} s) with committed index at most "
                         f"{change.get('index', 0)}, below the {before} committed before the fault")
    return found


class InvariantSampler:
    """Samples, from outside the nodes, how many etcd members are down and where units run."""

    def __init__(self, members, monitor: LeaderMonitor, client_factory: Callable[[float], Any],
                 clock: Callable[[], float], interval: float = SAMPLE_INTERVAL, down_after: float = 1.0) -> None:
        self.members = members
        # A member is down once its probes have kept failing this long: Raft's own patience (the election
        # timeout). A shorter silence does not cost the cluster a member, and on a loaded CI runner one
        # slow status answer, or a host stall that delays every probe at once, is not a member down.
        self.down_after = down_after
        self.monitor = monitor
        self.client_factory = client_factory
        self.clock = clock
        self.interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._units_thread: threading.Thread | None = None
        self.samples = 0
        self.max_down = 0
        self.max_down_at = 0.0
        self.max_down_nodes: list[str] = []
        self.quorum_lost: list[float] = []
        self.downtime: dict[str, float] = {}  # node -> seconds its member did not answer
        self._down_since: dict[str, float] = {}
        self._units: list[str] = []
        self.placements: dict[str, list[str]] = {}  # unit -> machines it was seen on, in order
        self._units_client = None

    def watch_units(self, names: list[str]) -> None:
        self._units += [n for n in names if n not in self._units]

    def start(self) -> None:
        # Two threads: a units read takes seconds on a loaded emulated host, and the member counts must
        # not wait for it (in one loop, samples came every 2 s where they should every 50 ms).
        self._thread = threading.Thread(target=self._loop, daemon=True, name="invariants")
        self._units_thread = threading.Thread(target=self._units_loop, daemon=True, name="invariants-units")
        self._thread.start()
        self._units_thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)
        if self._units_thread:  # a units read may try every member, each with a handshake's wait
            self._units_thread.join(timeout=HANDSHAKE_TIMEOUT * max(1, len(self.members)) + 5)

    def _loop(self) -> None:
        nodes = [m.node for m in self.members]
        majority = len(nodes) // 2 + 1
        while not self._stop.is_set():
            now = self.clock()
            latest = self.monitor.snapshot()
            failing = self.monitor.failing()
            # Down: probes failing without an answer for down_after seconds, counted from the first.
            down = sorted(node for node, (first, last) in failing.items() if last - first >= self.down_after)
            if len(latest) == len(nodes):  # every member probed at least once
                self.samples += 1
                for node in nodes:
                    if node in down:
                        self._down_since.setdefault(node, failing[node][0])
                    elif node in self._down_since:
                        self.downtime[node] = self.downtime.get(node, 0.0) + now - self._down_since.pop(node)
                if len(down) > self.max_down:
                    self.max_down, self.max_down_at, self.max_down_nodes = len(down), now, down
                if len(nodes) - len(down) < majority:
                    self.quorum_lost.append(now)
            self._stop.wait(self.interval)

    def _units_loop(self) -> None:
        while not self._stop.is_set():
            if self._units:
                self._sample_units()
            self._stop.wait(0.5)
        if self._units_client is not None:  # its connections belong to this thread
            self._units_client.close()

    def _sample_units(self) -> None:
        from lab.cluster.units import list_units

        if self._units_client is None:  # kept: a new connection every half second is a handshake each
            self._units_client = self.monitor.observer_client(0.5)
        try:
            rows = list_units(self._units_client)
        except LabError:
            return
        if self._stop.is_set():
            return  # after stop(): the run's records are being read
        for row in rows:
            if row.name in self._units and row.machines and row.active == "active":
                seen = self.placements.setdefault(row.name, [])
                if not seen or seen[-1] != row.machines[0]:
                    seen.append(row.machines[0])

    def unit_moves(self) -> dict[str, list[str]]:
        return {unit: path for unit, path in self.placements.items() if len(path) > 1}
