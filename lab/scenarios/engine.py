"""The scenario engine: run a scenario's steps against a lab and gather evidence.

While the steps run, a leader monitor samples every etcd member (one thread
per member, every 50 ms), an invariant sampler counts the members down, and
the workload records its history (lab.scenarios.monitor, .workload). Faults
go through the fault registry (lab.scenarios.faults): the provider's
primitives or SSH, so a scenario runs the same on nspawn nodes and on
Vagrant VMs; wait-until steps poll lab.scenarios.conditions. Afterwards the
engine restores the lab (heal, resume, start), runs the checkers and the
scenario's expectations (lab.scenarios.expectations), collects journals and
writes the report into the run directory.
"""

from __future__ import annotations

import datetime
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

from lab.errors import LabError
from lab.scenarios.conditions import Conditions
from lab.scenarios.expectations import check_expectations, verify_history
from lab.scenarios.faults import FaultInjector
from lab.scenarios.model import Fault, Probe, Scenario, ScenarioSpec, Step, UnitStep, UpdateStep
from lab.scenarios.monitor import InvariantSampler, LeaderMonitor
from lab.scenarios.results import Outcome, RunResult, StepResult, progress_line

# testinfra checks on every node take seconds; a node that stops answering must not hang the run.
CHECKS_TIMEOUT = 15 * 60


class ScenarioRun:
    def __init__(self, lab, scenario: Scenario, spec: ScenarioSpec, progress: Callable[[str], None],
                 run_dir: Path | None = None) -> None:
        from lab.cluster.etcd_bootstrap import client_for, members

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
        self.faults = FaultInjector(self.provider, self.context, self.monitor, self.clock)
        self.measurements: dict[str, Any] = {}
        self.conditions = Conditions(lab, self.members, self.monitor, self.faults, self.client_factory, self.clock,
                                     self.measurements)
        self.invariants = InvariantSampler(self.members, self.monitor, self.client_factory, self.clock)
        self.workload = None
        self.steps: list[StepResult] = []
        self.boot_ids_start = {status.name: status.boot_id for status in self.provider.status()}
        # One handler per step kind (model.STEP_KINDS), given that kind's field of the step.
        self.handlers: dict[str, Callable[[Any], Outcome]] = {
            "workload": self._workload, "unit": self._unit, "update": self._update, "sleep": self._sleep,
            "fault": self._fault, "wait_until": self.conditions.wait, "probe": self._probe, "check": self._check}

    def clock(self) -> float:
        return time.monotonic() - self.t0

    # ------------------------------------------------------------ driver

    def run(self) -> RunResult:
        self.monitor.start()
        try:
            self.conditions.wait_leader(timeout=30)
            self.invariants.start()
            for index, step in enumerate(self.spec.steps):
                result = self._run_step(index, step)
                self.steps.append(result)
                self.progress(progress_line(result.started, result.ok, result.description)
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
        verify_history(self)
        check_expectations(self)
        self._collect_journals()
        from lab.scenarios.report import write_report

        result = RunResult(self.scenario.name, self.run_dir, ok=all(s.ok for s in self.steps),
                           steps=self.steps, measurements=self.measurements, faults=self.faults.records,
                           leader_changes=self.monitor.changes)
        write_report(result)
        return result

    def conclude(self, description: str, ok: bool, started: float, detail: str, *, duration: float | None = None,
                 summary: str | None = None, quiet: bool = False) -> None:
        """Add a checker's result after the steps' and show it (`summary`, or `description: detail`)."""
        self.steps.append(StepResult(len(self.steps), description, ok, started,
                                     self.clock() - started if duration is None else duration, detail))
        if not quiet:
            self.progress(progress_line(started, ok, summary or f"{description}: {detail}"))

    def _run_step(self, index: int, step: Step) -> StepResult:
        started = self.clock()
        description = step.describe()
        try:
            ok, detail, measured = self.handlers[step.kind](getattr(step, step.kind))
        except LabError as exc:
            ok, detail, measured = False, exc.message, {}
        return StepResult(index, description, ok, started, self.clock() - started, detail, measured)

    # ------------------------------------------------------------ steps

    def _workload(self, action: str) -> Outcome:
        if action == "start":
            if self.workload is not None:
                raise LabError("the workload is already running (two `workload: start` steps)")
            return self._start_workload()
        if self.workload is None:
            raise LabError("no workload is running (`workload: stop` before `workload: start`)")
        stats = self._stop_workload()
        return True, f"{stats.ops} ops ({stats.by_status})", {}

    def _start_workload(self) -> Outcome:
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

    def _sleep(self, seconds: float) -> Outcome:
        time.sleep(seconds)
        return True, "", {}

    def _unit(self, unit: UnitStep) -> Outcome:
        from lab.cluster.units import set_desired

        client = self.client_factory(2.0)
        try:
            names = set_desired(client, [str(Path(self.scenario.path) / unit.start)], "launched")
        finally:
            client.close()
        self.invariants.watch_units(names)
        return True, f"started {', '.join(names)}", {}

    def _update(self, update: UpdateStep) -> Outcome:
        from lab.cluster.update import start_roll

        messages: list[str] = []
        start_roll(self.lab, update.to, messages.append)
        self.conditions.roll_started(update.to)
        return True, f"{len(messages)} nodes staged", {}

    def _fault(self, fault: Fault) -> Outcome:
        return True, self.faults.inject(fault.action, fault.target), {}

    def _probe(self, probe: Probe) -> Outcome:
        from lab.cluster.etcdclient import EtcdClient, EtcdError

        node = self.faults.targets(probe.write_via)[0]
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
            shared.close()
        detail = f"via {node}: {reason}"
        return outcome == probe.expect, detail, {"probe_via": node, "probe_outcome": outcome}

    def _check(self, files: list[str]) -> Outcome:
        """Run the step's testinfra files on every node; the JUnit XML joins the run's."""
        from lab.host.ssh import close_masters

        index = len(self.steps)
        self.lab.write_ssh_config(self.provider)
        junit = self.run_dir / f"checks-{index}.xml"
        argv = [sys.executable, "-m", "pytest", *[str(Path(self.scenario.path) / f) for f in files],
                "-p", "no:cacheprovider", "-p", "lab.scenarios.checks_plugin", "-q", f"--rootdir={self.scenario.path}",
                f"--hosts={','.join('ssh://' + n.name for n in self.context.nodes)}",
                f"--ssh-config={self.lab.ssh_config_path}", f"--junitxml={junit}"]
        try:
            result = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=CHECKS_TIMEOUT)
        except subprocess.TimeoutExpired:
            return False, f"the checks did not finish in {CHECKS_TIMEOUT} s (a node stopped answering?)", {}
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
            self.faults.restore()
        except LabError as exc:
            self.progress(f"could not restore the lab fully: {exc.message}")

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
