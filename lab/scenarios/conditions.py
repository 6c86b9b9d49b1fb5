"""The wait-until conditions of a scenario: polled every 50 ms until reached or timed out.

new-leader and the leader at the start are read from the leader monitor;
the others ask the members (healthy, leader, converged, old-leader-follows)
or the update state in etcd (updated, update-halted). A new-leader wait
measures the time from the last fault to the new leader and fails when it
took longer than its bound (`within`).
"""

from __future__ import annotations

import time
from typing import Any, Callable

from lab.errors import LabError
from lab.scenarios.model import ScenarioFailed, WaitUntil
from lab.scenarios.monitor import SAMPLE_INTERVAL
from lab.scenarios.results import Outcome

LEADER_MARGIN_S = 0.5  # added to 2x the election timeout for `within: auto`


def wait_timeout(timeout: float, bound: float | None) -> float:
    """How long a wait-until step waits: its own timeout, but at least twice
    its bound, so that a leader elected late (slow Raft timings under software
    emulation) is measured and reported against the bound instead of missed."""
    return max(timeout, 2 * bound) if bound is not None else timeout


class Conditions:
    def __init__(self, lab, members, monitor, faults, client_factory: Callable[[float], Any],
                 clock: Callable[[], float], measurements: dict[str, Any]) -> None:
        self.lab = lab
        self.members = members  # bootstrap.EtcdMember list
        self.monitor = monitor  # LeaderMonitor
        self.faults = faults  # FaultInjector: its last window is what new-leader and old-leader-follows refer to
        self.client_factory = client_factory
        self.clock = clock
        self.measurements = measurements  # the run's: roll_s and time_to_new_leader_s go there
        self.update_target: str | None = None
        self.service = None  # the ServiceProbe of a `service` step, for service-moved
        self.update_started = 0.0

    def roll_started(self, version: str) -> None:
        """An update step staged `version`: `updated` waits for it, and measures from now."""
        self.update_target = version
        self.update_started = self.clock()

    def wait_leader(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            leader, _ = self.monitor.leader()
            if leader:
                return leader
            time.sleep(SAMPLE_INTERVAL)
        raise ScenarioFailed(f"the cluster has no etcd leader after {timeout:.0f} s",
                             hint="check `lab status`; the scenario needs a healthy cluster to start")

    def bound(self, within: float | str | None) -> float | None:
        if within == "auto":
            return 2 * self.lab.spec.etcd.election_timeout_ms / 1000 + LEADER_MARGIN_S
        return within

    def wait(self, wait: WaitUntil) -> Outcome:
        # Look for changes from when the fault was requested (a graceful reboot
        # hands leadership over before the reboot returns), measure from when
        # it was in place, and never report less than zero.
        last = self.faults.last
        since = last["requested"] if last else 0.0
        in_place = last["start"] if last else 0.0
        bound = self.bound(wait.within)
        timeout = wait_timeout(wait.timeout, bound)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            reached_at = self.reached(wait.condition, since)
            if reached_at is not None:
                measured = {}
                detail = ""
                if wait.condition == "updated":
                    elapsed = self.clock() - self.update_started
                    self.measurements["roll_s"] = round(elapsed, 2)
                    detail = f"every node runs {self.update_target}, {elapsed:.1f} s after the roll began"
                if wait.condition == "service-moved":
                    elapsed = max(0.0, self.clock() - in_place)
                    serving = sorted(self.service.serving())
                    measured = {"service_moved_s": round(elapsed, 2), "serving": serving}
                    self.measurements.setdefault("service_moved_s", []).append(round(elapsed, 2))
                    detail = f"answering on {', '.join(serving)} {elapsed:.1f} s after the fault"
                if wait.condition == "new-leader":
                    change = reached_at
                    elapsed = max(0.0, change["t"] - in_place)
                    measured = {"time_to_new_leader_s": round(elapsed, 3), "new_leader": change["leader"],
                                "term": change["term"], "resolution_s": SAMPLE_INTERVAL}
                    self.measurements.setdefault("time_to_new_leader_s", []).append(round(elapsed, 3))
                    detail = (f"{change['leader']} leads term {change['term']} {elapsed:.2f} s after the fault "
                              f"(sampled every {SAMPLE_INTERVAL * 1000:.0f} ms)")
                    if bound is not None and elapsed > bound:
                        return False, detail + f"; expected within {bound:.2f} s", measured
                    if bound is not None:
                        detail += f"; bound {bound:.2f} s"
                return True, detail, measured
            time.sleep(SAMPLE_INTERVAL)
        return False, f"not reached within {timeout:g} s", {}

    def reached(self, condition: str, since: float):
        """None while `condition` does not hold; then True, or the leader change for new-leader."""
        last = self.faults.last or {}
        if condition in ("updated", "update-halted"):
            return self._update_reached(condition)
        if condition == "new-leader":
            return self.monitor.new_leader_since(last.get("leader"), last.get("term", 0), since)
        if condition == "service-moved":
            return self._service_moved(since)
        client = self.client_factory(0.5)
        try:
            if condition == "healthy":
                ok = all(client.health(m.client_url) for m in self.members)
                return True if ok else None
            statuses = []
            for member in self.members:
                try:
                    statuses.append(client.status(member.client_url))
                except LabError:
                    statuses.append(None)
        finally:
            client.close()
        answered = [s for s in statuses if s is not None]
        if condition == "leader":
            majority = len(self.members) // 2 + 1
            leaders = [s.leader for s in answered if s.leader and s.leader != "0"]
            return True if leaders and max(leaders.count(x) for x in leaders) >= majority else None
        if condition == "old-leader-follows":
            old = last.get("leader")
            by_node = dict(zip([m.node for m in self.members], statuses))
            mine = by_node.get(old)
            others = [s for n, s in by_node.items() if n != old and s is not None]
            follows = (mine is not None and not mine.is_leader and others
                       and all(s.leader == mine.leader and s.raft_term == mine.raft_term for s in others))
            return True if follows else None
        if condition == "converged":
            same = len(answered) == len(self.members) and len({(s.leader, s.raft_term) for s in answered}) == 1
            close = same and max(s.raft_index for s in answered) - min(s.raft_index for s in answered) <= 5
            return True if close else None
        raise AssertionError(condition)  # pragma: no cover

    def _service_moved(self, since: float) -> bool | None:
        """As many nodes answer as served when the last fault came, and not the same ones."""
        if self.service is None or not self.service.running:
            raise LabError("service-moved needs a probed service (a `service: {start: ...}` step before it)")
        before = self.service.serving(at=since)
        now = self.service.serving()
        return True if len(now) >= len(before) and now != before else None

    def _update_reached(self, condition: str) -> bool | None:
        from lab.cluster.etcdclient import EtcdError
        from lab.cluster.update import status

        try:
            current = status(self.lab)
        except EtcdError:
            return None
        if condition == "update-halted":
            return True if current.halted else None
        if current.halted:
            halted = current.halted
            raise LabError(f"the roll halted: {halted['node']} rolled back from {halted['version']}: "
                           f"{halted['reason']}")
        done = all(n.version == self.update_target and n.state in ("updated", "idle") for n in current.nodes)
        return True if done else None
