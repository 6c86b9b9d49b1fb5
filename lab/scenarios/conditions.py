"""The wait-until conditions of a scenario: polled every 50 ms until reached or timed out.

new-leader and the leader at the start are read from the leader monitor;
the others ask the members (healthy, leader, converged, old-leader-follows)
or the update state in etcd (updated, update-halted). A new-leader wait
measures the time from the moment the last fault was in place to the new
leader (the fault's own latency is recorded beside it), always reports it,
and fails only when no leader came within the liveness bound Raft promises
(`within: auto`, see `liveness_bound`) or within an explicit `within: S`.
A latency objective over many faults is the scenario's `slo:`
(lab.scenarios.expectations), never one sample.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

from lab.errors import LabError
from lab.scenarios.model import ScenarioFailed, WaitUntil
from lab.scenarios.monitor import SAMPLE_INTERVAL, status_timeout
from lab.scenarios.results import Outcome

# The chance, in the model below, that a correct cluster needs longer than
# the bound for one new-leader wait: a gate running a thousand faults a day
# would see a false failure about once in three thousand years.
FALSE_FAILURE_TARGET = 1e-6
# The host's own delays on top of Raft's: a loaded CI runner schedules the
# monitor's threads late, and a status answer can take a while.
HOST_MARGIN_S = 0.5


@dataclass(frozen=True)
class LivenessBound:
    """How long a correct etcd cluster may take to elect a new leader after its leader is gone."""

    seconds: float
    rounds: int  # election rounds allowed: 1 + lagging-candidate rounds + split-vote rounds
    lagging_rounds: int
    split_rounds: int
    split_chance: float  # per round
    election_timeout_s: float
    heartbeat_s: float
    members: int
    pre_vote: bool

    def describe(self) -> str:
        return (f"liveness bound {self.seconds:.2f} s: {self.rounds} election round(s) of at most "
                f"2T + h = {2 * self.election_timeout_s + self.heartbeat_s:.2f} s "
                f"(1 + {self.lagging_rounds} lagging-candidate + {self.split_rounds} split-vote rounds; "
                f"T {self.election_timeout_s:g} s, h {self.heartbeat_s:g} s, {self.members} members, "
                f"pre-vote {'on' if self.pre_vote else 'off'}) + observation and margin")


def liveness_bound(election_timeout_ms: int, heartbeat_ms: int, members: int, pre_vote: bool,
                   target: float = FALSE_FAILURE_TARGET) -> LivenessBound:
    """The time within which a correct cluster elects a new leader once its leader is gone.

    What etcd's Raft promises, with T the election timeout and h the
    heartbeat interval (etcd's tick):

    * Each member draws its election timeout uniformly from [T, 2T) in whole
      ticks, again at every new term. A follower's timer runs from the last
      message of the leader, which came before the fault was in place, so the
      first campaign starts within 2T of the fault, plus up to one tick h
      (timers fire on ticks). A campaign that is not disturbed wins within a
      vote round trip (milliseconds).
    * A split vote: another member's timer fires before the first candidate's
      vote request reaches it. That window is at most a tick on a working
      lab (the request waits for an fsync and one message); two timers drawn
      from a span of T fall within h of each other, one after the other, with
      chance at most h/T. With m = members - 1 voters left and a union over
      the other m - 1, a round fails with chance p = (m - 1) h / T (capped at
      1/2), and the next campaign starts within another 2T + h.
    * Pre-vote off: a member whose log lags can time out first and campaign
      at a higher term; it cannot win, but every member it reaches moves to
      its term and starts a fresh timer: one more round per lagging member
      (m - 1 of them at most). Pre-vote on: such a campaign changes nothing.

    So k = 1 + lagging + s rounds, where s is the fewest split rounds with
    p^(s+1) <= target (no more than s splits in a row, but for that chance),
    each round at most 2T + h: bound = k (2T + h) + the monitor's
    observation delay (one sample interval and a status answer, see
    monitor.status_timeout) + a host margin. etcd's defaults (T 1 s, h
    100 ms) with 3 members and pre-vote off: p = 0.1, s = 5, k = 7, bound 15.55 s. Beyond it the cluster has
    lost liveness (elections disabled or never concluding, no quorum), which
    is what this bound is for; how fast elections usually are is a latency
    objective (`slo:`), judged over many faults.
    """
    t, h = election_timeout_ms / 1000, heartbeat_ms / 1000
    voters = max(1, members - 1)
    chance = min(0.5, (voters - 1) * h / t)
    split = 0
    while chance ** (split + 1) > target * (1 + 1e-9):  # the tolerance: 0.1 ** 6 is 1e-6 give or take a bit
        split += 1
    lagging = 0 if pre_vote else voters - 1
    rounds = 1 + lagging + split
    seconds = rounds * (2 * t + h) + SAMPLE_INTERVAL + status_timeout(heartbeat_ms) + HOST_MARGIN_S
    return LivenessBound(round(seconds, 2), rounds, lagging, split, chance, t, h, members, pre_vote)


def wait_timeout(timeout: float, bound: float | None) -> float:
    """How long a wait-until step waits: its own timeout, but at least its bound, so that a slow
    leader is measured and judged against the bound instead of cut off before it."""
    return max(timeout, bound + 1.0) if bound is not None else timeout


def reboots_in(condition: str, nodes: int) -> int:
    """How many node reboots a wait for `condition` may have to sit through: a roll reboots every
    node in turn; a halt or a return to health waits for one (the node going back to its slot)."""
    return {"updated": nodes, "update-halted": 1, "healthy": 1}.get(condition, 0)


class Conditions:
    def __init__(self, lab, members, monitor, faults, client_factory: Callable[..., Any],
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
        self.reboot_allowance = 0.0  # seconds a node's reboot takes beyond nspawn's (Provider.reboot_allowance_s)
        self._status_client = None  # kept across polls: a new one each poll is a TLS handshake per member

    def close(self) -> None:
        if self._status_client is not None:
            self._status_client.close()
            self._status_client = None

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

    def await_leader(self) -> str | None:
        """The leader now, or the first one within the liveness bound: a fault or probe aimed at the
        leader must not fail because the previous step's election (a member rejoining with a higher
        term, pre-vote off) is still under way, or because a loaded host sampled late."""
        deadline = time.monotonic() + self.liveness().seconds
        while True:
            leader, _ = self.monitor.leader()
            if leader or time.monotonic() >= deadline:
                return leader
            time.sleep(SAMPLE_INTERVAL)

    def liveness(self) -> LivenessBound:
        etcd = self.lab.spec.etcd
        return liveness_bound(etcd.election_timeout_ms, etcd.heartbeat_ms, len(self.members), etcd.pre_vote)

    def bound(self, within: float | str | None) -> float | None:
        if within == "auto":
            return self.liveness().seconds
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
        if self.reboot_allowance:  # VMs: every node of the lab reboots in a roll, workers too
            timeout += reboots_in(wait.condition, len(self.lab.node_names())) * self.reboot_allowance
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
                    return self._judge_new_leader(reached_at, last, wait.within, bound)
                return True, detail, measured
            time.sleep(SAMPLE_INTERVAL)
        if wait.condition == "new-leader":
            return self._judge_new_leader(None, last, wait.within, bound)
        return False, f"not reached within {timeout:g} s", {}

    def _judge_new_leader(self, change: dict[str, Any] | None, last: dict[str, Any] | None,
                          within: float | str | None, bound: float | None) -> Outcome:
        """Measure from when the fault was in place; fail only past the bound (or with no leader at all)."""
        last = last or {}
        in_place = last.get("start", 0.0)
        fault_latency = round(max(0.0, in_place - last.get("requested", in_place)), 3)
        self.measurements.setdefault("fault_latency_s", []).append(fault_latency)
        what = (self.liveness().describe() if within == "auto"
                else f"bound {bound:.2f} s (within: {within:g})" if bound is not None else "")
        measured: dict[str, Any] = {"fault_latency_s": fault_latency, "resolution_s": SAMPLE_INTERVAL}
        if bound is not None:
            measured["bound_s"] = bound
        if change is None:
            # No time to report: how long it waited goes into its own list, the times stay numbers.
            waited_s = round(max(0.0, self.clock() - in_place), 2)
            self.measurements.setdefault("no_new_leader_after_s", []).append(waited_s)
            measured["no_new_leader_after_s"] = waited_s
            return False, (f"no new leader {waited_s:.2f} s after the fault was in place (the fault took "
                           f"{fault_latency:.2f} s)" + (f"; {what}" if what else "")), measured
        elapsed = round(max(0.0, change["t"] - in_place), 3)
        measured.update({"time_to_new_leader_s": elapsed, "new_leader": change["leader"], "term": change["term"]})
        self.measurements.setdefault("time_to_new_leader_s", []).append(elapsed)
        detail = (f"{change['leader']} leads term {change['term']} {elapsed:.2f} s after the fault was in place "
                  f"(the fault took {fault_latency:.2f} s; sampled every {SAMPLE_INTERVAL * 1000:.0f} ms)")
        if bound is not None and elapsed > bound:
            return False, f"{detail}; no new leader within the {what}", measured
        if bound is not None:
            detail += f"; {what}"
        return True, detail, measured

    def reached(self, condition: str, since: float):
        """None while `condition` does not hold; then True, or the leader change for new-leader."""
        last = self.faults.last or {}
        if condition in ("updated", "update-halted"):
            return self._update_reached(condition)
        if condition == "new-leader":
            return self.monitor.new_leader_since(last.get("leader"), last.get("term", 0), since)
        if condition == "service-moved":
            return self._service_moved(since)
        if self._status_client is None:
            self._status_client = self.monitor.observer_client(0.5)
        client = self._status_client
        if condition == "healthy":
            return True if all(client.health(m.client_url) for m in self.members) else None
        statuses = []
        for member in self.members:
            try:
                statuses.append(client.status(member.client_url))
            except LabError:
                statuses.append(None)
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
