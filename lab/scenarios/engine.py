"""The scenario engine: run a scenario's steps against a lab and gather evidence.

While the steps run, a leader monitor samples every etcd member (one thread
per member, every 50 ms) and the workload records its history. Faults go
through the provider's primitives (kill, start, pause, resume, reboot,
partition, heal) or over SSH (kill-etcd / start-etcd), so a scenario runs the
same on nspawn nodes and on Vagrant VMs. Afterwards the engine restores the
lab (heal, resume, start), collects journals, runs the checkers and writes
the report into `<lab_dir>/runs/<timestamp>/`.
"""

from __future__ import annotations

import datetime
import json
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from lab.errors import LabError
from lab.scenarios.model import Fault, Probe, Scenario, ScenarioFailed, ScenarioSpec, Step, WaitUntil

SAMPLE_INTERVAL = 0.05
LEADER_MARGIN_S = 0.5  # added to 2x the election timeout for `within: auto`
KILL_ETCD_DROPIN = "/run/systemd/system/etcd.service.d/lab-fault.conf"


def wait_timeout(timeout: float, bound: float | None) -> float:
    """How long a wait-until step waits: its own timeout, but at least twice
    its bound, so that a leader elected late (slow Raft timings under software
    emulation) is measured and reported against the bound instead of missed."""
    return max(timeout, 2 * bound) if bound is not None else timeout


@dataclass
class StepResult:
    index: int
    description: str
    ok: bool
    started: float  # seconds since the run began
    duration: float
    detail: str = ""
    measurements: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunResult:
    scenario: str
    run_dir: Path
    ok: bool
    steps: list[StepResult]
    measurements: dict[str, Any]
    faults: list[dict[str, Any]]  # {"start", "end", "action", "targets"}
    leader_changes: list[dict[str, Any]]  # {"t", "leader", "term"}

    @property
    def failures(self) -> list[StepResult]:
        return [s for s in self.steps if not s.ok]


# ---------------------------------------------------------------- leader monitor


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


# ---------------------------------------------------------------- the run


class ScenarioRun:
    def __init__(self, lab, scenario: Scenario, spec: ScenarioSpec, progress: Callable[[str], None],
                 run_dir: Path | None = None) -> None:
        from lab.cluster.bootstrap import client_for, members

        self.lab = lab
        self.scenario = scenario
        self.spec = spec
        self.progress = progress
        self.context = lab.context(lab.selection().name)
        self.provider = lab.provider()
        self.members = members(self.context)
        self.client_factory = lambda timeout: client_for(self.context, timeout=timeout)
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        # Beside the lab, not inside it: the evidence outlives `lab destroy`
        # (and the lab a scenario created and removed).
        self.run_dir = run_dir or (lab.lab_dir.parent / "runs" / f"{stamp}-{lab.name}-{scenario.name}")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.t0 = time.monotonic()
        self.monitor = LeaderMonitor(self.members, self.client_factory, self.clock)
        self.workload = None
        self.steps: list[StepResult] = []
        self.faults: list[dict[str, Any]] = []
        self.last_fault: dict[str, Any] | None = None
        self.measurements: dict[str, Any] = {}
        self.killed_etcd: set[str] = set()
        self.boot_ids_start = {status.name: status.boot_id for status in self.provider.status()}
        self.update_target: str | None = None
        self.invariants = InvariantSampler(self)

    def clock(self) -> float:
        return time.monotonic() - self.t0

    # ------------------------------------------------------------ driver

    def run(self) -> RunResult:
        self.monitor.start()
        try:
            self._wait_leader(timeout=30)
            self.invariants.start()
            for index, step in enumerate(self.spec.steps):
                result = self._run_step(index, step)
                self.steps.append(result)
                mark = "ok" if result.ok else "FAILED"
                self.progress(f"[{result.started:6.2f}s] {mark:6} {result.description}"
                              + (f": {result.detail}" if result.detail else ""))
                if not result.ok and step.kind in ("fault", "wait_until"):
                    # Later steps depend on this one; skip to restore and collect.
                    break
        finally:
            if self.workload is not None:
                self._stop_workload()
            self._restore()
            self.invariants.stop()
            self.monitor.stop()
        self._verify()
        self._expectations()
        self._collect_journals()
        from lab.scenarios.report import write_report

        result = RunResult(self.scenario.name, self.run_dir, ok=all(s.ok for s in self.steps),
                           steps=self.steps, measurements=self.measurements, faults=self.faults,
                           leader_changes=self.monitor.changes)
        write_report(result)
        return result

    def _run_step(self, index: int, step: Step) -> StepResult:
        started = self.clock()
        description = step.describe()
        try:
            ok, detail, measured = self._dispatch(step)
        except LabError as exc:
            ok, detail, measured = False, exc.message, {}
        return StepResult(index, description, ok, started, self.clock() - started, detail, measured)

    def _dispatch(self, step: Step) -> tuple[bool, str, dict[str, Any]]:
        if step.workload == "start":
            if self.workload is not None:
                raise LabError("the workload is already running (two `workload: start` steps)")
            return self._start_workload()
        if step.workload == "stop":
            if self.workload is None:
                raise LabError("no workload is running (`workload: stop` before `workload: start`)")
            stats = self._stop_workload()
            return True, f"{stats.ops} ops ({stats.by_status})", {}
        if step.sleep is not None:
            time.sleep(step.sleep)
            return True, "", {}
        if step.unit is not None:
            from lab.cluster.units import set_desired

            client = self.client_factory(2.0)
            try:
                names = set_desired(client, [str(Path(self.scenario.path) / step.unit.start)], "launched")
            finally:
                client.close()
            self.invariants.watch_units(names)
            return True, f"started {', '.join(names)}", {}
        if step.update is not None:
            from lab.cluster.update import start_roll

            messages: list[str] = []
            start_roll(self.lab, step.update.to, messages.append)
            self.update_target = step.update.to
            self.update_started = self.clock()
            return True, f"{len(messages)} nodes staged", {}
        if step.fault is not None:
            return self._fault(step.fault)
        if step.wait_until is not None:
            return self._wait_until(step.wait_until)
        if step.probe is not None:
            return self._probe(step.probe)
        if step.check is not None:
            return self._check(step.check, len(self.steps))
        raise AssertionError(step)  # pragma: no cover - the model allows nothing else

    # ------------------------------------------------------------ workload

    def _start_workload(self) -> tuple[bool, str, dict[str, Any]]:
        from lab.scenarios.workload import Workload, WorkloadConfig

        options = self.spec.workload
        config = WorkloadConfig(register_clients=options.register_clients, unique_writers=options.unique_writers,
                                registers=options.registers, pause_s=options.pause_ms / 1000)
        self.workload = Workload(self.client_factory, self.run_dir / "history.jsonl", config, clock=self.clock,
                                 run_id=self.run_dir.name)
        self.workload.start()
        return True, f"{config.register_clients} register clients, {config.unique_writers} unique writers", {}

    def _stop_workload(self):
        stats = self.workload.stop()
        self.workload = None
        self.measurements["workload_ops"] = stats.ops
        self.measurements["workload_by_status"] = stats.by_status
        return stats

    # ------------------------------------------------------------ faults

    def _targets(self, target: str) -> list[str]:
        nodes = [n.name for n in self.context.nodes]
        if target == "all":
            return nodes
        if target in ("leader", "followers"):
            leader, _ = self.monitor.leader()
            if leader is None:
                raise LabError("no leader to target right now")
            return [leader] if target == "leader" else [n for n in nodes if n != leader]
        if target == "old-leader":
            if not self.last_fault or not self.last_fault.get("leader"):
                raise LabError("no earlier fault recorded a leader")
            return [self.last_fault["leader"]]
        self.context.node(target)
        return [target]

    def _fault(self, fault: Fault) -> tuple[bool, str, dict[str, Any]]:
        leader, term = self.monitor.leader()
        requested = self.clock()
        record = {"start": requested, "requested": requested, "end": None, "action": fault.action,
                  "leader": leader, "term": term}
        if fault.action == "heal":
            self.provider.heal()
            self._close_faults("partition")
            return True, "", {}
        if fault.action == "partition":
            groups = self._partition_groups(fault.target)
            record["targets"] = groups
            self.provider.partition(groups)
            record["start"] = self.clock()
            self.faults.append(record)
            self.last_fault = record
            return True, " | ".join(",".join(g) for g in groups), {}
        targets = self._targets(fault.target)
        record["targets"] = targets
        actions = {"kill": self.provider.kill, "start": self.provider.start, "pause": self.provider.pause,
                   "resume": self.provider.resume, "reboot": self.provider.reboot,
                   "kill-etcd": self._kill_etcd, "start-etcd": self._start_etcd}
        if fault.action in ("kill", "pause", "reboot", "kill-etcd"):
            self.faults.append(record)
            self.last_fault = record
        with ThreadPoolExecutor(max_workers=max(1, len(targets))) as pool:
            list(pool.map(actions[fault.action], targets))
        # Measured from when the fault is surely in place (the kill returned
        # once the process was gone): times to recover are lower bounds by at
        # most the injection latency, never inflated by it.
        record["start"] = self.clock()
        if fault.action in ("start", "resume", "start-etcd"):
            undone = {"start": "kill", "resume": "pause", "start-etcd": "kill-etcd"}[fault.action]
            self._close_faults(undone, targets)
        elif fault.action == "reboot":
            record["end"] = self.clock()
        return True, ", ".join(targets) + (f" (leader was {leader}, term {term})" if leader else ""), {}

    def _partition_groups(self, target: str) -> list[list[str]]:
        nodes = [n.name for n in self.context.nodes]
        if "|" in target:
            groups = [[n for n in group.split(",") if n] for group in target.split("|")]
            for group in groups:
                for node in group:
                    self.context.node(node)
            return groups
        isolated = self._targets(target)
        return [isolated, [n for n in nodes if n not in isolated]]

    def _close_faults(self, action: str, targets: list[str] | None = None) -> None:
        now = self.clock()
        for record in self.faults:
            if record["action"] == action and record["end"] is None and (
                    targets is None or set(record.get("targets") or []) <= set(targets)):
                record["end"] = now

    def _kill_etcd(self, node: str) -> None:
        """SIGKILL the node's etcd and keep systemd from restarting it until start-etcd."""
        from lab.host.ssh import run

        # kill -9 of the main PID, not `systemctl kill`: on cgroup v1 hosts the
        # latter also signals the unit's cgroup and fails with EIO here.
        script = (f"mkdir -p {Path(KILL_ETCD_DROPIN).parent} && "
                  f"printf '[Service]\\nRestart=no\\n' > {KILL_ETCD_DROPIN} && systemctl daemon-reload && "
                  "pid=$(systemctl show -p MainPID --value etcd) && [ \"$pid\" != 0 ] && kill -9 \"$pid\" && "
                  "for i in $(seq 100); do systemctl is-active --quiet etcd || exit 0; sleep 0.05; done; exit 1")
        self.killed_etcd.add(node)  # before: restore must undo even a half-done kill
        run(self.context_endpoint(node), script, timeout=15, check=True)

    def _start_etcd(self, node: str) -> None:
        from lab.host.ssh import run

        script = (f"rm -f {KILL_ETCD_DROPIN} && systemctl daemon-reload && systemctl reset-failed etcd; "
                  "systemctl start --no-block etcd")
        run(self.context_endpoint(node), script, timeout=15, check=True)
        self.killed_etcd.discard(node)

    def context_endpoint(self, node: str):
        return self.provider.ssh_endpoints()[node]

    # ------------------------------------------------------------ waiting and probing

    def _wait_leader(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            leader, _ = self.monitor.leader()
            if leader:
                return leader
            time.sleep(SAMPLE_INTERVAL)
        raise ScenarioFailed(f"the cluster has no etcd leader after {timeout:.0f} s",
                             hint="check `lab status`; the scenario needs a healthy cluster to start")

    def _bound(self, within: float | str | None) -> float | None:
        if within == "auto":
            return 2 * self.lab.spec.etcd.election_timeout_ms / 1000 + LEADER_MARGIN_S
        return within

    def _wait_until(self, wait: WaitUntil) -> tuple[bool, str, dict[str, Any]]:
        # Look for changes from when the fault was requested (a graceful reboot
        # hands leadership over before the reboot returns), measure from when
        # it was in place, and never report less than zero.
        since = self.last_fault["requested"] if self.last_fault else 0.0
        in_place = self.last_fault["start"] if self.last_fault else 0.0
        bound = self._bound(wait.within)
        timeout = wait_timeout(wait.timeout, bound)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            reached_at = self._condition(wait.condition, since)
            if reached_at is not None:
                measured = {}
                detail = ""
                if wait.condition == "updated":
                    elapsed = self.clock() - self.update_started
                    self.measurements["roll_s"] = round(elapsed, 2)
                    detail = f"every node runs {self.update_target}, {elapsed:.1f} s after the roll began"
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

    def _condition(self, condition: str, since: float):
        if condition in ("updated", "update-halted"):
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
        if condition == "new-leader":
            old, old_term = (self.last_fault or {}).get("leader"), (self.last_fault or {}).get("term", 0)
            return self.monitor.new_leader_since(old, old_term, since)
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
            old = (self.last_fault or {}).get("leader")
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

    def _probe(self, probe: Probe) -> tuple[bool, str, dict[str, Any]]:
        from lab.cluster.etcdclient import EtcdClient, EtcdError

        node = self._targets(probe.write_via)[0]
        member = next(m for m in self.members if m.node == node)
        shared = self.client_factory(probe.timeout)
        client = EtcdClient([member.client_url], tls=shared.tls, timeout=probe.timeout)
        try:
            client.put("/lab/probe", f"via {node} at {self.clock():.3f}")
            outcome, reason = "ok", "the write was acknowledged"
        except EtcdError as exc:
            outcome, reason = "fail", exc.message
        finally:
            client.close()
        detail = f"via {node}: {reason}"
        return outcome == probe.expect, detail, {"probe_via": node, "probe_outcome": outcome}

    # ------------------------------------------------------------ checks

    def _check(self, files: list[str], index: int) -> tuple[bool, str, dict[str, Any]]:
        from lab.host.ssh import close_masters

        self.lab.write_ssh_config(self.provider)
        junit = self.run_dir / f"checks-{index}.xml"
        argv = [sys.executable, "-m", "pytest", *[str(Path(self.scenario.path) / f) for f in files],
                "-p", "no:cacheprovider", "-q", f"--rootdir={self.scenario.path}",
                f"--hosts={','.join('ssh://' + n.name for n in self.context.nodes)}",
                f"--ssh-config={self.lab.ssh_config_path}", f"--junitxml={junit}"]
        try:
            result = subprocess.run(argv, capture_output=True, text=True, check=False)
        finally:
            close_masters(self.lab.ssh_config_path, [n.name for n in self.context.nodes])
        (self.run_dir / f"checks-{index}.txt").write_text(result.stdout + result.stderr)
        summary = next((line for line in reversed(result.stdout.splitlines()) if line.strip()), "")
        if result.returncode != 0:
            failing = [line for line in result.stdout.splitlines() if line.startswith("FAILED")]
            return False, summary + ("\n" + "\n".join(failing[:10]) if failing else ""), {}
        return True, summary, {}

    # ------------------------------------------------------------ afterwards

    def _restore(self) -> None:
        """Leave the lab as healthy as it was: heal, resume, start whatever a fault left down."""
        try:
            self.provider.heal()
            for status in self.provider.status():
                if status.state.value == "paused":
                    self.provider.resume(status.name)
                elif status.state.value == "stopped":
                    self.provider.start(status.name)
            for node in list(self.killed_etcd):
                self._start_etcd(node)
            self._close_faults("partition")
            for record in self.faults:
                if record["end"] is None:
                    record["end"] = self.clock()
        except LabError as exc:
            self.progress(f"could not restore the lab fully: {exc.message}")

    def _verify(self) -> None:
        """Run the history checkers: no acknowledged write lost, registers linearizable."""
        from lab.cluster.bootstrap import EtcdBootstrap

        history = self.run_dir / "history.jsonl"
        if not history.exists():
            return
        try:
            EtcdBootstrap(self.context, self.provider.ssh_endpoints()).wait_healthy(timeout=60)
        except LabError as exc:
            self.steps.append(StepResult(len(self.steps), "cluster healthy again after the faults", False,
                                         self.clock(), 0.0, exc.message))
            return
        from lab.scenarios.checker import check_linearizable, check_lost_writes, load_history
        from lab.scenarios.workload import read_final_uniques

        ops = load_history(history)
        self.measurements.update(_availability(ops, self.faults))
        if self.spec.expect.no_lost_writes:
            started = self.clock()
            client = self.client_factory(5.0)
            try:
                final = read_final_uniques(client, self.run_dir.name)
            finally:
                client.close()
            report = check_lost_writes(ops, final)
            self.measurements["acknowledged_writes"] = report.acknowledged
            self.measurements["lost_writes"] = len(report.lost)
            detail = (f"{report.acknowledged} acknowledged unique writes, {len(report.lost)} lost"
                      + (f": {', '.join(op.key for op in report.lost[:5])}" if report.lost else ""))
            self.steps.append(StepResult(len(self.steps), "no acknowledged write lost", report.ok, started,
                                         self.clock() - started, detail))
            self.progress(f"[{started:6.2f}s] {'ok' if report.ok else 'FAILED':6} no acknowledged write lost: {detail}")
        if self.spec.expect.linearizable:
            started = self.clock()
            report = check_linearizable(ops)
            self.measurements["checker_s"] = round(report.elapsed_s, 3)
            failing = [r for r in report.registers if not r.linearizable]
            detail = (f"{sum(r.ops for r in report.registers)} register ops on {len(report.registers)} keys, "
                      f"checked in {report.elapsed_s:.2f} s")
            if failing:
                detail += "\n" + "\n".join(r.explanation for r in failing)
            self.steps.append(StepResult(len(self.steps), "register history is linearizable", report.ok, started,
                                         self.clock() - started, detail))
            self.progress(f"[{started:6.2f}s] {'ok' if report.ok else 'FAILED':6} linearizable: "
                          f"{detail.splitlines()[0]}")

    def _expectations(self) -> None:
        """The scenario's `expect:` beyond the history checkers, each as a result of its own."""
        expect = self.spec.expect
        results: list[tuple[str, bool, str]] = []
        majority = len(self.members) // 2 + 1
        sampled = self.invariants
        self.measurements["max_members_down"] = sampled.max_down
        self.measurements["member_downtime_s"] = {node: round(t, 2) for node, t in sorted(sampled.downtime.items())}
        if expect.max_down is not None:
            bound = (self.lab.spec.updates.max_concurrent_reboots if expect.max_down == "auto"
                     else expect.max_down)
            results.append((f"never more than {bound} etcd member(s) down at once", sampled.max_down <= bound,
                            f"at most {sampled.max_down} down at once ({sampled.samples} samples"
                            + (f"; worst at {sampled.max_down_at:.2f} s: {', '.join(sampled.max_down_nodes)}"
                               if sampled.max_down else "") + ")"))
        if expect.quorum:
            lost = sampled.quorum_lost
            results.append((f"etcd quorum ({majority} of {len(self.members)}) never lost", not lost,
                            f"{sampled.samples} samples" + (f"; lost at {', '.join(f'{t:.2f} s' for t in lost[:5])}"
                                                            if lost else "")))
        statuses = {s.name: s for s in self.provider.status()}
        if expect.rebooted is not None:
            changed = [n for n, s in statuses.items() if s.boot_id and s.boot_id != self.boot_ids_start.get(n)]
            wanted = len(statuses) if expect.rebooted == "all" else expect.rebooted
            results.append((f"{expect.rebooted} node(s) rebooted (boot id changed)", len(changed) == wanted,
                            f"rebooted: {', '.join(changed) or 'none'}"))
        if expect.final_version is not None or expect.rolled_back is not None:
            from lab.host.ssh import run_many

            outputs = run_many(list(self.provider.ssh_endpoints().values()),
                               ". /usr/lib/os-release; echo $VERSION_ID; cat /etc/lab/boot.json 2>/dev/null || true")
            versions = {r.node: (r.stdout.splitlines() or ["?"])[0] for r in outputs}
            rolled = [r.node for r in outputs if "rolled_back_from" in r.stdout]
            if expect.final_version is not None:
                ok = all(v == expect.final_version for v in versions.values())
                results.append((f"every node runs OS version {expect.final_version}", ok,
                                ", ".join(f"{n}: {v}" for n, v in sorted(versions.items()))))
            if expect.rolled_back is not None:
                results.append((f"{expect.rolled_back} node(s) rolled back", len(rolled) == expect.rolled_back,
                                f"rolled back: {', '.join(rolled) or 'none'}"))
        if expect.units_running or expect.units_moved:
            from lab.cluster.units import list_units

            client = self.client_factory(2.0)
            try:
                rows = {r.name: r for r in list_units(client)}
            finally:
                client.close()
            for name in expect.units_running:
                row = rows.get(name)
                ok = row is not None and row.active == "active"
                results.append((f"{name} is running", ok,
                                f"on {','.join(row.machines)}: {row.active}/{row.sub}" if row else "not found"))
            if expect.units_moved:
                moves = sampled.unit_moves()
                results.append(("units moved off rebooting machines", bool(moves),
                                "; ".join(f"{u}: {' -> '.join(path)}" for u, path in moves.items()) or "no unit moved"))
        for description, ok, detail in results:
            self.steps.append(StepResult(len(self.steps), description, ok, self.clock(), 0.0, detail))
            self.progress(f"[{self.clock():6.2f}s] {'ok' if ok else 'FAILED':6} {description}: {detail}")

    def _collect_journals(self) -> None:
        from lab.host.ssh import run

        endpoints = self.provider.ssh_endpoints()

        def collect(node: str) -> None:
            directory = self.run_dir / "nodes" / node
            directory.mkdir(parents=True, exist_ok=True)
            for name, command in (("journal.txt", "journalctl -b --no-pager -o short-precise"),
                                  ("etcd.log", "journalctl -u etcd --no-pager -o short-precise")):
                try:
                    result = run(endpoints[node], command, timeout=30)
                    (directory / name).write_text(result.stdout)
                except LabError as exc:
                    (directory / name).write_text(f"could not collect: {exc.message}\n")

        with ThreadPoolExecutor(max_workers=max(1, len(endpoints))) as pool:
            list(pool.map(collect, list(endpoints)))


class InvariantSampler:
    """Samples, from outside the nodes, how many etcd members are down and where units run."""

    def __init__(self, run: "ScenarioRun", interval: float = SAMPLE_INTERVAL) -> None:
        self.run = run
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
        majority = len(self.run.members) // 2 + 1
        next_units = 0.0
        while not self._stop.is_set():
            now = self.run.clock()
            with self.run.monitor._lock:
                latest = dict(self.run.monitor.latest)
            # Down: no fresh answer from the member (a failed probe, or none for 0.5 s).
            down = sorted(node for node in (m.node for m in self.run.members)
                          if node not in latest or latest[node][2] == 0 or now - latest[node][0] > 0.5)
            if len(latest) == len(self.run.members):  # every member probed at least once
                self.samples += 1
                for node in (m.node for m in self.run.members):
                    if node in down:
                        self._down_since.setdefault(node, now)
                    elif node in self._down_since:
                        self.downtime[node] = self.downtime.get(node, 0.0) + now - self._down_since.pop(node)
                if len(down) > self.max_down:
                    self.max_down, self.max_down_at, self.max_down_nodes = len(down), now, down
                if len(self.run.members) - len(down) < majority:
                    self.quorum_lost.append(now)
            if self._units and now >= next_units:
                self._sample_units()
                next_units = now + 0.5
            self._stop.wait(self.interval)

    def _sample_units(self) -> None:
        from lab.cluster.units import list_units

        client = self.run.client_factory(0.5)
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


def _availability(ops, faults: list[dict[str, Any]]) -> dict[str, Any]:
    """Write-unavailability: the longest gap between acknowledged writes around each fault."""
    writes = sorted(op.complete for op in ops if op.kind in ("write", "unique", "cas") and op.status == "ok"
                    and op.complete is not None)
    total = len(ops)
    errors = sum(1 for op in ops if op.status != "ok")
    windows = []
    for fault in faults:
        start = fault["start"]
        end = (fault["end"] or start) + 30.0
        around = [t for t in writes if start - 1.0 <= t <= end]
        if len(around) < 2:
            windows.append(None)
            continue
        gap = max(b - a for a, b in zip(around, around[1:]))
        windows.append(round(gap, 3))
    return {"ops": total, "errors": errors, "write_unavailability_s": windows}


def now_stamp() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")
