"""The engine's parts without nodes: the fault registry and injector, the samplers, conditions, availability."""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from lab.errors import LabError, UsageError
from lab.providers.base import NodeState, Provider
from lab.scenarios.conditions import Conditions
from lab.scenarios.expectations import availability
from lab.scenarios.faults import FAULTS, UNDOES, FaultInjector
from lab.scenarios.history import Op
from lab.scenarios.model import Fault
from lab.scenarios.monitor import InvariantSampler, LeaderMonitor
from lab.testing.contexts import make_context
from lab.testing.fake import FakeProvider

NODES = ["node-1", "node-2", "node-3"]


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 0.5
        return self.now


CONTEXT = make_context(Path("/nonexistent"), {"nodes": {"count": 3}}, lab_id="e1e1e1", subnet="10.77.8.0/24")


@pytest.fixture(autouse=True)
def fresh_fake():
    """lab.testing's fake provider keeps its nodes and calls per class: start each test from none."""
    FakeProvider.reset()
    yield
    FakeProvider.reset()


def fake_provider(failing: str | None = None) -> FakeProvider:
    """The fake provider with three running nodes; `failing` makes one method raise."""
    FakeProvider.nodes.update({n: NodeState.RUNNING for n in NODES})
    if failing:
        FakeProvider.failures[failing] = LabError(f"{failing} failed")
    return FakeProvider(CONTEXT)


class StaticMonitor:
    def __init__(self, leader=("node-2", 4), latest=None) -> None:
        self._leader = leader
        self.latest = latest or {}
        self.changes = []

    def leader(self):
        return self._leader

    def snapshot(self):
        return dict(self.latest)

    def failing(self):
        return dict(getattr(self, "failing_since", {}))

    def new_leader_since(self, old, old_term, since):
        return next((c for c in self.changes if c["t"] >= since and c["leader"] != old and c["term"] > old_term),
                    None)


def injector(**kwargs) -> FaultInjector:
    return FaultInjector(fake_provider(**kwargs), CONTEXT, StaticMonitor(), Clock())


# ---------------------------------------------------------------- the registry


def test_the_scenario_format_accepts_exactly_the_registered_faults():
    assert Fault.model_fields["action"].annotation.__args__ == tuple(FAULTS)


def test_every_registered_fault_calls_a_provider_method_or_the_injectors_own():
    for name, action in FAULTS.items():
        owner = Provider if action.via == "provider" else FaultInjector
        assert callable(getattr(owner, action.method, None)), name
        if action.undo is not None:
            assert action.undo in FAULTS and action.opens_window, name
    assert UNDOES == {"start": "kill", "resume": "pause", "heal": "partition", "start-etcd": "kill-etcd"}


# ---------------------------------------------------------------- the injector


def test_a_fault_on_the_leader_opens_a_window_its_undo_closes():
    faults = injector()
    assert faults.inject("kill", "leader") == "node-2 (leader was node-2, term 4)"
    record = faults.records[0]
    assert faults.last is record and record["targets"] == ["node-2"] and record["end"] is None
    assert record["requested"] < record["start"]  # measured from when the kill returned
    assert faults.inject("start", "node-2").startswith("node-2")
    assert record["end"] is not None and len(faults.records) == 1  # starting opens no window
    assert faults.provider.calls == ["kill node-2", "start node-2"]


def test_an_undo_closes_only_the_windows_of_its_targets():
    faults = injector()
    faults.inject("pause", "followers")
    faults.inject("resume", "node-1")
    assert faults.records[0]["end"] is None  # node-3 is still paused
    faults.inject("resume", "all")
    assert faults.records[0]["end"] is not None


def test_partition_groups_and_heal():
    faults = injector()
    assert faults.inject("partition", "node-1|node-2,node-3") == "node-1 | node-2,node-3"
    assert faults.inject("partition", "leader") == "node-2 | node-1,node-3"
    assert faults.inject("heal", "all") == ""
    assert [r["targets"] for r in faults.records] == [[["node-1"], ["node-2", "node-3"]],
                                                        [["node-2"], ["node-1", "node-3"]]]
    assert all(r["end"] is not None for r in faults.records)
    assert faults.provider.calls[-1] == "heal"


def test_a_reboot_window_ends_when_the_reboot_returns():
    faults = injector()
    faults.inject("reboot", "node-3")
    assert faults.records[0]["end"] >= faults.records[0]["start"]


def test_targets_are_checked_and_old_leader_needs_an_earlier_fault():
    faults = injector()
    with pytest.raises(UsageError):
        faults.inject("kill", "node-9")
    with pytest.raises(UsageError):
        faults.inject("partition", "node-1|node-9")
    with pytest.raises(LabError, match="no earlier fault"):
        faults.targets("old-leader")
    faults.inject("kill", "leader")
    assert faults.targets("old-leader") == ["node-2"]
    assert FaultInjector(fake_provider(), CONTEXT, StaticMonitor(leader=(None, 0)), Clock()).targets("all") \
        == NODES
    with pytest.raises(LabError, match="no leader"):
        FaultInjector(fake_provider(), CONTEXT, StaticMonitor(leader=(None, 0)), Clock()).targets("leader")


def test_a_failed_fault_still_leaves_its_window_for_restore_to_end():
    faults = injector(failing="kill")
    with pytest.raises(LabError):
        faults.inject("kill", "node-1")
    assert faults.records and faults.records[0]["end"] is None
    faults.restore()
    assert faults.records[0]["end"] is not None


def test_restore_heals_resumes_and_starts_what_faults_left_down():
    faults = injector()
    faults.inject("pause", "node-1")
    faults.inject("kill", "node-3")
    faults.inject("partition", "node-2")
    faults.provider.calls.clear()
    faults.restore()
    assert faults.provider.calls == ["heal", "resume node-1", "start node-3"]
    assert all(r["end"] is not None for r in faults.records)


def test_restore_starts_the_etcd_it_killed(monkeypatch):
    faults = injector()
    started = []
    monkeypatch.setattr(faults, "start_etcd", started.append)
    faults.killed_etcd = {"node-1"}
    faults.restore()
    assert started == ["node-1"]


# ---------------------------------------------------------------- samplers and conditions


def test_the_leader_monitor_reports_the_freshest_highest_term_claim():
    clock = Clock()
    monitor = LeaderMonitor([], lambda timeout, connect_timeout=None: None, clock)
    monitor.latest = {"node-1": (clock.now + 1, None, 3, True), "node-2": (clock.now + 1, None, 4, True),
                      "node-3": (-10.0, None, 9, True)}  # stale
    assert monitor.leader() == ("node-2", 4)
    monitor.changes = [{"t": 1.0, "leader": "node-1", "term": 3}, {"t": 2.0, "leader": "node-2", "term": 4}]
    assert monitor.new_leader_since("node-1", 3, 0.5)["leader"] == "node-2"
    assert monitor.new_leader_since("node-2", 4, 0.5) is None
    assert monitor.snapshot() == monitor.latest and monitor.snapshot() is not monitor.latest


def test_the_invariant_sampler_counts_members_down_and_lost_quorum():
    members = [SimpleNamespace(node=n) for n in NODES]
    now = time.monotonic()
    latest = {"node-1": (now, "node-1", 2, True), "node-2": (now, None, 0, False), "node-3": (now, None, 0, False)}
    monitor = StaticMonitor(latest=latest)
    # node-2 and node-3 failed every probe for 1.2 s: down; a single failed probe (node-1's, say) is not.
    monitor.failing_since = {"node-2": (now - 1.2, now), "node-3": (now - 1.2, now), "node-1": (now, now)}
    sampler = InvariantSampler(members, monitor, lambda timeout, connect_timeout=None: None, time.monotonic, interval=0.01)
    sampler.start()
    deadline = time.monotonic() + 5
    while sampler.samples < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    sampler.stop()
    assert sampler.max_down == 2 and sampler.max_down_nodes == ["node-2", "node-3"]
    assert sampler.quorum_lost


def test_a_slow_units_read_does_not_slow_the_member_samples(monkeypatch):
    members = [SimpleNamespace(node=n) for n in NODES]
    now = time.monotonic()
    monitor = StaticMonitor(latest={n: (now, "node-1", 2, True) for n in NODES})
    monitor.failing_since = {}
    sampler = InvariantSampler(members, monitor, lambda timeout, connect_timeout=None: None, time.monotonic,
                               interval=0.01)
    # A loaded emulated host: every read of where units run takes a second.
    monkeypatch.setattr(sampler, "_sample_units", lambda: time.sleep(1.0))
    sampler.watch_units(["web.service"])
    sampler.start()
    time.sleep(0.5)
    sampler.stop()
    assert sampler.samples >= 10  # one sample per 10 ms, not one per units read


def test_a_wait_lasts_at_least_its_bound_so_a_slow_leader_is_measured():
    from lab.scenarios.conditions import wait_timeout

    assert wait_timeout(10, 2.5) == 10      # the scenario's own timeout when it is longer
    assert wait_timeout(10, 15.55) == 16.55  # the liveness bound and a second, to judge a leader at the bound
    assert wait_timeout(30, None) == 30     # no bound, no change


def test_new_leader_is_measured_from_the_fault_and_judged_against_the_bound():
    lab = SimpleNamespace(spec=SimpleNamespace(etcd=SimpleNamespace(election_timeout_ms=1000, heartbeat_ms=100,
                                                                    pre_vote=False)))
    monitor = StaticMonitor()
    faults = SimpleNamespace(last={"requested": 1.0, "start": 1.2, "leader": "node-2", "term": 4})
    measurements: dict = {}
    members = [SimpleNamespace(node=n) for n in NODES]
    conditions = Conditions(lab, members, monitor, faults, lambda timeout, connect_timeout=None: None, Clock(), measurements)
    assert conditions.bound("auto") == 15.55 and conditions.bound(None) is None and conditions.bound(2.5) == 2.5
    monitor.changes = [{"t": 2.0, "leader": "node-1", "term": 5}]
    wait = SimpleNamespace(condition="new-leader", within=2.5, timeout=10)
    ok, detail, measured = conditions.wait(wait)
    assert ok and measured["time_to_new_leader_s"] == 0.8 and measured["fault_latency_s"] == 0.2
    assert "bound 2.50 s" in detail
    monitor.changes = [{"t": 5.0, "leader": "node-1", "term": 5}]
    ok, detail, _ = conditions.wait(wait)
    assert not ok and "no new leader within the bound 2.50 s" in detail
    assert measurements["time_to_new_leader_s"] == [0.8, 3.8] and measurements["fault_latency_s"] == [0.2, 0.2]


# ---------------------------------------------------------------- availability


def test_staging_latency_compares_operations_begun_during_the_staging_with_those_before():
    from lab.scenarios.expectations import staging_latency

    before = [Op(i, 0, "write", "r0", str(i), None, 1.0 + i / 100, 1.0 + i / 100 + 0.002, "ok", None)
              for i in range(100)]
    during = [Op(100 + i, 0, "write", "r0", str(i), None, 5.0 + i / 100, 5.0 + i / 100 + 0.006, "ok", None)
              for i in range(99)]
    during.append(Op(300, 0, "write", "r0", "x", None, 6.5, 7.5, "ok", None))        # one slow write
    during.append(Op(301, 1, "read", "r0", None, None, 6.6, None, "unknown", None))  # never acknowledged
    after = [Op(400, 0, "write", "r0", "y", None, 9.0, 9.5, "ok", None)]             # the roll: not counted
    measured = staging_latency(before + during + after, (5.0, 8.0))
    assert measured["window_s"] == 3.0
    assert measured["before"] == {"ops": 100, "p50_ms": 2.0, "p99_ms": 2.0}
    assert measured["during"] == {"ops": 100, "p50_ms": 6.0, "p99_ms": 6.0}
    assert measured["p50_ratio"] == 3.0
    assert staging_latency(during, (5.0, 8.0))["before"] == {"ops": 0}
    assert "p50_ratio" not in staging_latency(during, (5.0, 8.0))


def test_write_unavailability_is_the_longest_gap_between_acknowledged_writes_around_a_fault():
    ops = [Op(i, 0, "write", "r0", str(i), None, t - 0.01, t, "ok", None)
           for i, t in enumerate([0.5, 1.0, 1.5, 3.5, 4.0])]
    ops.append(Op(9, 1, "read", "r0", None, None, 2.0, None, "unknown", None))
    measured = availability(ops, [{"start": 1.2, "end": 3.0}, {"start": 90.0, "end": None}])
    assert measured == {"ops": 6, "errors": 1, "write_unavailability_s": [2.0, None]}
