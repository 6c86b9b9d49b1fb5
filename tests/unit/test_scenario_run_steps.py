"""The unit, run and node-of: steps (what the first-look scenario is made of), without nodes:
parsed from fixed text, and run by the engine against the fake provider and a dict of etcd records."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from lab.host.ssh import NodeResult
from lab.node import layout
from lab.providers.base import NodeState
from lab.scenarios.engine import ScenarioRun
from lab.scenarios.faults import FaultInjector
from lab.scenarios.model import RunStep, ScenarioError, UnitStep, parse
from lab.testing.contexts import make_context
from lab.testing.fake import FakeProvider

REPO = Path(__file__).resolve().parents[2]
NODES = ["node-1", "node-2", "node-3"]
CONTEXT = make_context(Path("/nonexistent"), {"nodes": {"count": 3}}, lab_id="f1f1f1", subnet="10.77.9.0/24")
IDS = {name: str(i) * 32 for i, name in enumerate(NODES, 1)}


def write(tmp_path: Path, steps: str) -> Path:
    (tmp_path / "hello.service").write_text("[Service]\nExecStart=/bin/true\n")
    (tmp_path / "scenario.yaml").write_text("steps:\n" + steps)
    return tmp_path / "scenario.yaml"


# ---------------------------------------------------------------- the format


def test_the_first_look_scenario_parses_and_ships_the_seeds_unit_unchanged():
    spec = parse(REPO / "scenarios" / "first-look" / "scenario.yaml")
    kinds = [step.kind for step in spec.steps]
    assert {"run", "unit", "fault", "check"} <= set(kinds)
    reboot = next(s.fault for s in spec.steps if s.fault is not None)
    assert (reboot.action, reboot.target) == ("reboot", "node-of:hello.service")
    unit = (REPO / "scenarios" / "first-look" / "hello.service").read_text()
    assert 'ExecStart=/usr/bin/docker run ubuntu /bin/sh -c "while true; do echo Hello World; sleep 1; done"' in unit
    assert "After=docker.service" in unit


def test_unit_and_run_steps_parse_and_describe_themselves(tmp_path):
    spec = parse(write(tmp_path, "  - unit: {start: hello.service}\n"
                                 "  - unit: {running: hello.service}\n"
                                 "  - unit: {stop: hello.service, within: 15}\n"
                                 "  - run: {target: node-of:hello.service, command: docker ps, expect-output: x}\n"
                                 "  - fault: pause node-of:web@1.service\n"))
    assert [s.describe() for s in spec.steps] == [
        "unit: start hello.service", "unit: running hello.service (within 60 s)",
        "unit: stop hello.service (within 15 s)", "run on node-of:hello.service: docker ps",
        "fault: pause node-of:web@1.service"]
    run = spec.steps[3].run
    assert (run.expect_output, run.within, run.timeout) == ("x", 0, 60)


@pytest.mark.parametrize("steps, fragment", [
    ("  - unit: {}\n", "exactly one of start, stop, running"),
    ("  - unit: {start: hello.service, stop: hello.service}\n", "exactly one of start, stop, running"),
    ("  - unit: {stop: hello.service, within: 0}\n", "steps[0].unit.within"),
    ("  - run: {target: all}\n", "steps[0].run.command"),
    ("  - run: {target: node-of:a/b, command: 'true'}\n", "target must be"),
    ("  - run: {target: 'node-of:', command: 'true'}\n", "target must be"),
    ("  - fault: reboot node-of:../../x\n", "target must be"),
    ("  - run: {on: all, command: 'true'}\n", "steps[0].run"),  # YAML reads `on` as true: the key is `target`
])
def test_malformed_unit_and_run_steps_are_located(tmp_path, steps, fragment):
    with pytest.raises(ScenarioError) as raised:
        parse(write(tmp_path, steps))
    assert fragment in raised.value.message


# ---------------------------------------------------------------- the engine


class Etcd:
    """The calls of the host's etcd client the steps use, over a dict."""

    def __init__(self, data: dict[str, str]) -> None:
        self.data = data

    def get(self, key: str) -> str | None:
        return self.data.get(key)

    def get_prefix(self, prefix: str) -> dict[str, str]:
        return {k: v for k, v in self.data.items() if k.startswith(prefix)}

    def put(self, key: str, value: str) -> None:
        self.data[key] = value

    def close(self) -> None:
        pass


def scheduled(unit: str, node: str, active: str = "active") -> dict[str, str]:
    records = {f"{layout.MACHINES}{IDS[n]}": json.dumps({"id": IDS[n], "name": n, "ip": "10.0.0.1"}) for n in NODES}
    records[f"{layout.UNITS}{unit}"] = json.dumps({"name": unit, "text": "[Service]\n", "desired": "launched"})
    records[f"{layout.SCHEDULE}{unit}"] = IDS[node]
    records[f"{layout.STATES}{unit}/{IDS[node]}"] = json.dumps({"active": active, "sub": "running"})
    return records


@pytest.fixture
def engine(tmp_path):
    """A ScenarioRun with only what these steps touch: the fake provider, an etcd of dicts, a clock."""
    FakeProvider.reset()
    FakeProvider.nodes.update({n: NodeState.RUNNING for n in NODES})
    run = ScenarioRun.__new__(ScenarioRun)
    run.provider = FakeProvider(CONTEXT)
    run.etcd = Etcd({})
    run.client_factory = lambda timeout, connect_timeout=None: run.etcd
    run.clock = lambda: 0.0
    run.measurements = {}
    run.scenario = SimpleNamespace(path=str(tmp_path))
    run.invariants = SimpleNamespace(watch_units=lambda names: None)
    monitor = SimpleNamespace(leader=lambda: ("node-1", 3))
    run.faults = FaultInjector(run.provider, CONTEXT, monitor, run.clock)
    yield run
    FakeProvider.reset()


def fake_ssh(monkeypatch, answer):
    """Replace SSH with `answer(node, command) -> (exit status, stdout)`; returns the calls made."""
    calls = []

    def run(endpoint, command, *, timeout=None, **_):
        calls.append((endpoint.node, command))
        status, out = answer(endpoint.node, command)
        return NodeResult(endpoint.node, command, status, out, "")

    monkeypatch.setattr("lab.host.ssh.run", run)
    return calls


def test_node_of_a_unit_is_the_machine_the_scheduler_runs_it_on(engine):
    engine.etcd.data.update(scheduled("hello.service", "node-3"))
    assert engine.node_targets("node-of:hello.service") == ["node-3"]
    assert engine.node_targets("all") == NODES


def test_a_fault_on_node_of_a_unit_hits_that_node(engine):
    from lab.scenarios.model import Fault

    engine.etcd.data.update(scheduled("hello.service", "node-2"))
    ok, detail, measured = engine._fault(Fault(action="reboot", target="node-of:hello.service"))
    assert ok and detail.startswith("node-2") and measured == {"nodes": ["node-2"]}
    assert FakeProvider.calls == ["reboot node-2"]


def test_node_of_an_unplaced_unit_is_an_error_naming_it(engine):
    from lab.errors import LabError

    with pytest.raises(LabError, match="no unit named 'hello.service'"):
        engine.node_targets("node-of:hello.service")


def test_a_run_step_passes_when_every_target_exits_0_with_the_expected_output(engine, monkeypatch):
    calls = fake_ssh(monkeypatch, lambda node, command: (0, "hello world\n"))
    ok, detail, measured = engine._run_command(RunStep(target="all", command="docker run ubuntu /bin/echo hello world",
                                                       expect_output="hello world"))
    assert ok, detail
    assert sorted(node for node, _ in calls) == NODES and measured["nodes"] == NODES
    assert "node-1: 'hello world'" in detail


def test_a_run_step_tries_again_until_its_output_shows(engine, monkeypatch):
    engine.etcd.data.update(scheduled("hello.service", "node-1"))
    answers = iter([(0, ""), (0, "Hello World\nHello World\n")])
    calls = fake_ssh(monkeypatch, lambda node, command: next(answers))
    monkeypatch.setattr("lab.scenarios.engine.time.sleep", lambda seconds: None)
    ok, detail, _ = engine._run_command(RunStep(target="node-of:hello.service", command="journalctl -u hello.service",
                                                expect_output="Hello World", within=30))
    assert ok, detail
    assert calls == [("node-1", "journalctl -u hello.service")] * 2 and "2 attempt(s)" in detail


def test_a_run_step_that_never_passes_says_what_each_node_returned(engine, monkeypatch):
    fake_ssh(monkeypatch, lambda node, command: (127, "docker: command not found") if node == "node-2" else (0, "ok"))
    ok, detail, _ = engine._run_command(RunStep(target="all", command="docker ps"))
    assert not ok
    assert "node-2: exit 127, output 'docker: command not found'" in detail and "node-1" not in detail


def test_a_run_step_on_an_unplaced_unit_fails_with_the_reason(engine, monkeypatch):
    fake_ssh(monkeypatch, lambda node, command: (0, ""))
    ok, detail, _ = engine._run_command(RunStep(target="node-of:hello.service", command="true"))
    assert not ok and "no unit named 'hello.service'" in detail


def test_a_unit_start_waits_until_the_scheduler_reports_it_active(engine, tmp_path):
    (tmp_path / "hello.service").write_text("[Service]\nExecStart=/bin/true\n")
    engine.etcd.data.update(scheduled("hello.service", "node-2"))
    ok, detail, measured = engine._unit(UnitStep(start="hello.service", within=5))
    assert ok, detail
    assert json.loads(engine.etcd.data[f"{layout.UNITS}hello.service"])["desired"] == "launched"
    assert measured["machine"] == "node-2" and "unit_start_s" in engine.measurements


def test_a_unit_stop_counts_failed_as_stopped_and_reports_systemds_stop_time(engine, monkeypatch):
    # `docker run` exits 143 when its container ends on SIGTERM: systemd calls the unit failed.
    engine.etcd.data.update(scheduled("hello.service", "node-1", active="failed"))
    # Its journal: an earlier stop, then the one measured (the "Stopping" and "Stopped" records).
    journal = [{"MESSAGE_ID": "de5b426a63be47a7b6ac3eaac82e2f6f", "__REALTIME_TIMESTAMP": "1000000"},
               {"MESSAGE_ID": "9d1aaa27d60140bd96365438aad20286", "__REALTIME_TIMESTAMP": "1100000"},
               {"MESSAGE": "Hello World", "__REALTIME_TIMESTAMP": "5000000"},
               {"MESSAGE_ID": "de5b426a63be47a7b6ac3eaac82e2f6f", "__REALTIME_TIMESTAMP": "10000000"},
               {"MESSAGE_ID": "7ad2d189f7e94e70a38c781354912448", "__REALTIME_TIMESTAMP": "10300000"},
               {"MESSAGE_ID": "9d1aaa27d60140bd96365438aad20286", "__REALTIME_TIMESTAMP": "10420000"}]
    fake_ssh(monkeypatch, lambda node, command: (0, "\n".join(json.dumps(e) for e in journal) + "\n"))
    ok, detail, measured = engine._unit(UnitStep(stop="hello.service", within=5))
    assert ok, detail
    assert json.loads(engine.etcd.data[f"{layout.UNITS}hello.service"])["desired"] == "loaded"
    assert measured["systemd_stop_s"] == 0.42 and "systemd stopped it in 0.42 s" in detail


def test_a_unit_that_does_not_stop_in_time_fails_the_step(engine, monkeypatch):
    engine.etcd.data.update(scheduled("hello.service", "node-1", active="deactivating"))
    monkeypatch.setattr("lab.scenarios.engine.POLL_INTERVAL", 0.01)
    ok, detail, _ = engine._unit(UnitStep(stop="hello.service", within=0.05))
    assert not ok and "not inactive within 0.05 s (deactivating/running on node-1)" in detail
