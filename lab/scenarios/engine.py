"""The scenario engine: run a scenario's steps against a lab and gather evidence.

While the steps run, a leader monitor samples every etcd member (one thread
per member, every 50 ms), an invariant sampler counts the members down, and
the workload records its history (lab.scenarios.monitor, .workload); a
`service` step polls a replicated HTTP service on every node from the host
(lab.scenarios.service_probe). Faults
go through the fault registry (lab.scenarios.faults): the provider's
primitives or SSH, so a scenario runs the same on nspawn nodes and on
Vagrant VMs; wait-until steps poll lab.scenarios.conditions. Afterwards the
engine restores the lab (heal, resume, start), runs the checkers and the
scenario's expectations (lab.scenarios.expectations), collects journals and
writes the report into the run directory.
"""

from __future__ import annotations

import datetime
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

from lab.errors import LabError
from lab.scenarios.conditions import Conditions
from lab.scenarios.expectations import (check_expectations, choose_version, read_node_states, starting_state,
                                        verify_history)
from lab.scenarios.faults import FaultInjector
from lab.scenarios.model import (NODE_OF, Fault, Probe, RunStep, Scenario, ScenarioSpec, ServiceStart, Step,
                                  UnitStep, UpdateStep)
from lab.scenarios.monitor import HANDSHAKE_TIMEOUT, InvariantSampler, LeaderMonitor, status_timeout
from lab.scenarios.results import Outcome, RunResult, StepResult, progress_line

# testinfra checks on every node take seconds; a node that stops answering must not hang the run.
CHECKS_TIMEOUT = 15 * 60
# How often unit and run steps look again: the agents report unit states once a second.
# systemd's catalog ids of a unit's "Stopping" and "Stopped" records
UNIT_STOPPING = "de5b426a63be47a7b6ac3eaac82e2f6f"
UNIT_STOPPED = "9d1aaa27d60140bd96365438aad20286"
POLL_INTERVAL = 0.2


class ScenarioRun:
    def __init__(self, lab, scenario: Scenario, spec: ScenarioSpec, progress: Callable[[str], None],
                 run_dir: Path | None = None, earlier: list[dict[str, Any]] | None = None) -> None:
        from lab.cluster.etcd_bootstrap import client_for, members

        self.lab = lab
        self.scenario = scenario
        self.spec = spec
        self.progress = progress
        self.context = lab.context(lab.selection().name)
        self.provider = lab.provider()
        self.members = members(self.context)
        self.client_factory = lambda timeout, connect_timeout=None: client_for(
            self.context, timeout=timeout, connect_timeout=connect_timeout)
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        # Beside the lab, not inside it: the evidence outlives `lab destroy`
        # (and the lab a scenario created and removed).
        self.run_dir = run_dir or (lab.lab_dir.parent / "runs" / f"{stamp}-{lab.name}-{scenario.name}")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.t0 = time.monotonic()
        self.started_wall = time.time()  # for the nodes' journals: what was logged during this run
        self.monitor = LeaderMonitor(self.members, self.client_factory, self.clock,
                                     status_timeout=status_timeout(lab.spec.etcd.heartbeat_ms))
        self.faults = FaultInjector(self.provider, self.context, self.monitor, self.clock)
        self.measurements: dict[str, Any] = {}
        self.conditions = Conditions(lab, self.members, self.monitor, self.faults, self.client_factory, self.clock,
                                     self.measurements)
        # A scenario's waits are written for nspawn nodes, which reboot in seconds; a VM's reboot takes
        # minutes under emulation. Only a failing run waits the longer bound, a passing one never.
        self.conditions.reboot_allowance = self.provider.reboot_allowance_s
        self.invariants = InvariantSampler(self.members, self.monitor, self.client_factory, self.clock,
                                           down_after=lab.spec.etcd.election_timeout_ms / 1000)
        self.workload = None
        # The measurements of earlier runs of this scenario in one `lab test`: its `slo:` judges them all.
        self.earlier = earlier or []
        self.staging_window: tuple[float, float] | None = None  # an update step's staging, on self.clock
        self.start_state: dict[str, dict[str, str]] = {}  # node -> version, boot.json: what the run found
        self.steps: list[StepResult] = []
        self.boot_ids_start = {status.name: status.boot_id for status in self.provider.status()}
        # One handler per step kind (model.STEP_KINDS), given that kind's field of the step.
        self.handlers: dict[str, Callable[[Any], Outcome]] = {
            "workload": self._workload, "unit": self._unit, "run": self._run_command, "update": self._update,
            "sleep": self._sleep,
            "fault": self._fault, "wait_until": self.conditions.wait, "probe": self._probe, "check": self._check,
            "service": self._service}

    def clock(self) -> float:
        return time.monotonic() - self.t0

    # ------------------------------------------------------------ driver

    def run(self) -> RunResult:
        from lab.host.ssh import transport_log

        with transport_log(self.run_dir / "ssh.log"):
            return self._run()

    def _run(self) -> RunResult:
        self.monitor.start()
        try:
            self.conditions.wait_leader(timeout=30)
            if self.spec.expect.final_version is not None or self.spec.expect.rolled_back is not None or any(
                    step.update for step in self.spec.steps):
                self.start_state = starting_state(self)
            self.invariants.start()
            for index, step in enumerate(self.spec.steps):
                result = self._run_step(index, step)
                self.steps.append(result)
                self.progress(progress_line(result.started, result.ok, result.description)
                              + (f": {result.detail}" if result.detail else ""))
                if not result.ok and step.kind in ("fault", "wait_until", "update"):
                    # Later steps depend on this one; skip to restore and collect.
                    break
        finally:
            if self.workload is not None:
                self._stop_workload()
            if self.conditions.service is not None and self.conditions.service.running:
                self._stop_service()
            self._restore()
            self.invariants.stop()
            self.monitor.stop()
            self.conditions.close()
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

        requested = self.clock()
        if unit.action != "running":
            target = str(Path(self.scenario.path) / unit.start) if unit.action == "start" else unit.name
            client = self.client_factory(2.0)
            try:
                set_desired(client, [target], "launched" if unit.action == "start" else "loaded")
            finally:
                client.close()
            self.invariants.watch_units([unit.name])
        verb = {"start": "started", "stop": "stopped", "running": "running"}[unit.action]
        if unit.within is None:
            return True, f"{verb} {unit.name}", {}
        # A stopped service whose main process exited non-zero on SIGTERM (`docker run` passes on the
        # container's 143) is `failed`: stopped all the same.
        wanted = ("inactive", "failed") if unit.action == "stop" else ("active",)
        within = unit.within + self.provider.reboot_allowance_s  # a container's start on a slow VM, too
        row = self._wait_unit(unit.name, wanted, within)
        elapsed = round(self.clock() - requested, 2)
        where = ",".join(row.machines) if row and row.machines else "no machine"
        if row is None or row.active not in wanted:
            state = f"{row.active}/{row.sub} on {where}" if row else "not in the cluster"
            return False, f"{unit.name} not {wanted[0]} within {within:g} s ({state})", {}
        measured = {f"unit_{unit.action}_s": elapsed, "unit": unit.name, "machine": where}
        detail = f"{unit.name} {row.active} on {where} {elapsed:.1f} s after the request"
        if unit.action == "stop":
            stop_s = self._systemd_stop_seconds(unit.name, row.machines)
            if stop_s is not None:
                measured["systemd_stop_s"] = stop_s
                detail += f" (systemd stopped it in {stop_s:.2f} s)"
        self.measurements.setdefault(f"unit_{unit.action}_s", {})[unit.name] = elapsed
        return True, detail, measured

    def _wait_unit(self, name: str, wanted: tuple[str, ...], within: float):
        """The unit's row once the scheduler reports one of the `wanted` states on a machine,
        else its last row after `within` seconds (None if it never showed)."""
        from lab.cluster.etcdclient import EtcdError
        from lab.cluster.units import list_units

        deadline = time.monotonic() + within
        row = None
        client = self.client_factory(1.0, connect_timeout=HANDSHAKE_TIMEOUT)  # one for the wait: see monitor
        try:
            while True:
                try:
                    row = next((r for r in list_units(client) if r.name == name), row)
                except EtcdError:
                    pass  # a leader election under way: look again
                if row is not None and row.machines and row.active in wanted:
                    return row
                if time.monotonic() >= deadline:
                    return row
                time.sleep(POLL_INTERVAL)
        finally:
            client.close()

    def _systemd_stop_seconds(self, name: str, machines: list[str]) -> float | None:
        """How long systemd took to stop the unit on its machine: from its "Stopping" to its "Stopped"
        journal record (the unit's own timestamps are gone once a stopped unit is unloaded)."""
        import json

        from lab.host.ssh import run

        endpoints = self.provider.ssh_endpoints()
        if len(machines) != 1 or machines[0] not in endpoints:
            return None
        try:
            shown = run(endpoints[machines[0]], f"journalctl --boot -u {shlex.quote(name)} -n 400 -o json "
                                                "--output-fields=MESSAGE_ID --no-pager", timeout=15).stdout
        except LabError:
            return None
        stopping = stopped = None
        for line in shown.splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if entry.get("MESSAGE_ID") == UNIT_STOPPING:
                stopping, stopped = int(entry["__REALTIME_TIMESTAMP"]), None
            elif entry.get("MESSAGE_ID") == UNIT_STOPPED and stopping is not None:
                stopped = int(entry["__REALTIME_TIMESTAMP"])
        return round((stopped - stopping) / 1e6, 2) if stopping and stopped else None

    def node_targets(self, target: str) -> list[str]:
        """The nodes a step's target stands for now: the fault injector's targets, or node-of:UNIT,
        the machine(s) the scheduler runs that unit on."""
        if not target.startswith(NODE_OF):
            return self.faults.targets(target)
        from lab.cluster.units import machine_of

        client = self.client_factory(2.0)
        try:
            return [m.name for m in machine_of(client, target[len(NODE_OF):])]
        finally:
            client.close()

    def _run_command(self, step: RunStep) -> Outcome:
        """Run the command on the target nodes until every one exits 0 (with the expected output)."""
        from lab.host.ssh import run

        started = self.clock()
        deadline = time.monotonic() + step.within
        attempts = 0
        while True:
            attempts += 1
            try:
                nodes = self.node_targets(step.target)
                endpoints = self.provider.ssh_endpoints()
                with ThreadPoolExecutor(max_workers=max(1, len(nodes))) as pool:
                    results = list(pool.map(lambda n: run(endpoints[n], step.command, timeout=step.timeout), nodes))
                failed = [r for r in results if not r.ok or (step.expect_output is not None
                                                             and step.expect_output not in r.stdout)]
                problem = "; ".join(f"{r.node}: " + ("timed out" if r.exit_status is None else f"exit {r.exit_status}")
                                    + f", output {_tail(r.stdout + r.stderr)!r}" for r in failed)
            except LabError as exc:  # the unit not placed yet, a node rebooting
                results, problem = [], exc.message
            if not problem:
                elapsed = round(self.clock() - started, 2)
                shown = "; ".join(f"{r.node}: {_tail(r.stdout)!r}" for r in results)
                return True, f"{shown} ({elapsed:.1f} s, {attempts} attempt(s))", {"run_s": elapsed,
                                                                                  "nodes": [r.node for r in results]}
            if time.monotonic() >= deadline:
                wanted = f" printing {step.expect_output!r}" if step.expect_output is not None else ""
                return False, f"not passed{wanted} within {step.within:g} s ({attempts} attempt(s)): {problem}", {}
            time.sleep(max(POLL_INTERVAL, 1.0))

    def _service(self, service: ServiceStart | str) -> Outcome:
        """Start probing a service on every node (and wait for its replicas), or stop and measure."""
        from lab.scenarios.service_probe import ServiceProbe

        probe = self.conditions.service
        if service == "stop":
            if probe is None or not probe.running:
                raise LabError("no service is being probed (`service: stop` before `service: {start: ...}`)")
            measured = self._stop_service()
            windows = ", ".join(f"{w['start_s']:.2f}-{w['end_s']:.2f} s ({w['duration_s']:.2f} s)"
                                for w in measured["windows"]) or "none"
            return True, (f"{measured['answered']} of {measured['requests']} requests answered; "
                          f"unavailable (no replica answered for > {measured['window_min_s']:g} s): {windows}"), {}
        if probe is not None and probe.running:
            raise LabError(f"the service {probe.name} is already being probed (two `service: {{start: ...}}` steps)")
        probe = self.conditions.service = ServiceProbe(service.start, self.context.addresses, service.port,
                                                       service.path, self.clock, jump=self.context.jump)
        probe.start()
        deadline = time.monotonic() + service.within
        while len(probe.serving()) < service.replicas and time.monotonic() < deadline:
            time.sleep(POLL_INTERVAL)
        serving = sorted(probe.serving())
        detail = f"answering on {', '.join(serving) or 'no node'} {self.clock() - probe.begin:.1f} s after the start"
        if len(serving) < service.replicas:
            return False, f"{detail}; expected {service.replicas} replica(s) within {service.within:g} s", {}
        # Unavailability counts from here: waiting for the first replicas (an image pull) is not an outage.
        probe.measure_from(self.clock())
        return True, detail, {"serving": serving}

    def _stop_service(self) -> dict[str, Any]:
        probe = self.conditions.service
        measured = probe.stop()
        probe.write(self.run_dir / "service.jsonl")
        self.measurements["service"] = {"name": probe.name, **measured}
        return measured

    def _update(self, update: UpdateStep) -> Outcome:
        from lab.cluster.update import start_roll

        messages: list[str] = []
        running = {node: state["version"] for node, state in read_node_states(self).items()}
        version = choose_version(update.to, running)
        def staged(line: str) -> None:  # shown as it comes: staging VMs takes minutes per node
            messages.append(line)
            self.progress(f"  {line}")

        staging_from = self.clock()
        staging_s = start_roll(self.lab, version, staged)
        self.staging_window = (staging_from, self.clock())
        self.measurements["staging_s"] = round(staging_s, 2)
        self.conditions.roll_started(version)
        found = ", ".join(sorted(set(running.values()))) or "?"
        return True, (f"{len(self.lab.node_names())} nodes staged {version} in {staging_s:.1f} s "
                      f"(they ran {found})"), {"to": version, "from": running, "staging": messages}

    def _no_leader(self, target: str) -> str | None:
        """Why a step aimed at the leader cannot go on (no leader within the liveness bound), else None."""
        if target not in ("leader", "followers") or self.conditions.await_leader() is not None:
            return None
        return f"no leader to target: none within the {self.conditions.liveness().describe()}"

    def _fault(self, fault: Fault) -> Outcome:
        problem = self._no_leader(fault.target)
        if problem:
            return False, problem, {}
        if not fault.target.startswith(NODE_OF):
            return True, self.faults.inject(fault.action, fault.target), {}
        nodes = self.node_targets(fault.target)
        # One injection per machine of the unit (several only for a global unit), each its own window.
        return True, "; ".join(self.faults.inject(fault.action, node) for node in nodes), {"nodes": nodes}

    def _probe(self, probe: Probe) -> Outcome:
        from lab.cluster.etcdclient import EtcdClient, EtcdError

        problem = self._no_leader(probe.write_via)
        if problem:
            return False, problem, {}
        node = self.faults.targets(probe.write_via)[0]
        member = next((m for m in self.members if m.node == node), None)
        if member is None:
            raise LabError(f"{node} is an etcd worker, not a member: a probe writes through a member",
                           hint="write via leader, old-leader or a member's name")
        shared = self.client_factory(probe.timeout)
        client = EtcdClient([member.client_url], tls=shared.tls, timeout=probe.timeout, jump=shared.jump,
                            connect_timeout=HANDSHAKE_TIMEOUT)
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
        """Each node's journal and etcd's log from this run (across reboots), with a margin for a VM's or a
        host's clock. Not the whole journal: on a lab that has run many scenarios, reading it all took
        longer than the run (36 s after a 2 s scenario)."""
        from lab.host.ssh import run

        endpoints = self.provider.ssh_endpoints()
        since = f"--since=@{int(self.started_wall) - JOURNAL_MARGIN_S}"

        def collect(node: str) -> None:
            directory = self.run_dir / "nodes" / node
            directory.mkdir(parents=True, exist_ok=True)
            for name, command in (("journal.txt", f"journalctl {since} --no-pager -o short-precise"),
                                  ("etcd.log", f"journalctl -u etcd {since} --no-pager -o short-precise")):
                try:
                    result = run(endpoints[node], command, timeout=30)
                    (directory / name).write_text(result.stdout)
                except LabError as exc:
                    (directory / name).write_text(f"could not collect: {exc.message}\n")

        with ThreadPoolExecutor(max_workers=max(1, len(endpoints))) as pool:
            list(pool.map(collect, list(endpoints)))


# How far before the run's start the journals are read: a node's clock (a VM's, a host's) may lag this one's.
JOURNAL_MARGIN_S = 120


def _tail(text: str, limit: int = 200) -> str:
    """The end of a command's output, for a one-line detail."""
    text = text.strip()
    return text if len(text) <= limit else "..." + text[-limit:]
