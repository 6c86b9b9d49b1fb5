"""Scenarios' format: parsing scenario.yaml (fixed inputs), discovery, scaffolding, `lab scenario list`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lab.scenarios.model import ScenarioError, discover, parse, scaffold

REPO = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str, files: tuple[str, ...] = ()) -> Path:
    directory = tmp_path / "sc"
    directory.mkdir(exist_ok=True)
    for name in files:
        (directory / name).write_text("def test_x(host):\n    pass\n")
    (directory / "scenario.yaml").write_text(text)
    return directory / "scenario.yaml"


def test_every_builtin_scenario_parses():
    names = {s.name for s in discover(REPO) if s.source in ("built-in", "local")}
    assert {"smoke", "raft-failover", "partition", "full-restart"} <= names
    for scenario in discover(REPO):
        spec = scenario.load()
        assert spec.description


def test_shorthands_expand():
    spec = parse(REPO / "scenarios" / "raft-failover" / "scenario.yaml")
    kinds = [step.kind for step in spec.steps]
    assert kinds[0] == "workload" and "fault" in kinds and "wait_until" in kinds
    fault = next(s.fault for s in spec.steps if s.fault is not None)
    assert (fault.action, fault.target) == ("kill-etcd", "leader")


@pytest.mark.parametrize("text, fragment", [
    ("steps:\n  - sleeep: 1\n", "steps[0].sleeep: unknown key; did you mean 'sleep'?"),
    ("steps:\n  - sleep: 1\n    workload: start\n", "exactly one of"),
    ("steps:\n  - fault: explode leader\n", "steps[0].fault.action"),
    ("steps:\n  - fault: kill ../etc\n", "target must be"),
    ("steps:\n  - wait-until: {condition: sunrise}\n", "steps[0].wait-until.condition"),
    ("steps:\n  - wait-until: {condition: healthy, timeout: -1}\n", "must be"),
    ("steps:\n  - check: [test_missing.py]\n", "no file 'test_missing.py'"),
    ("steps:\n  - probe: {write-via: leader, expect: maybe}\n", "steps[0].probe.expect"),
    ("nodes: 0\n", "nodes: must be at least 1"),
    ("descripton: x\n", "did you mean 'description'"),
    ("- a\n", "must be a mapping"),
    ("steps:\n  - sleep: 1\n  - sleep: [\n", "YAML syntax error"),
    ("steps:\n  - {}\n", "exactly one of"),
])
def test_malformed_scenarios_name_file_line_and_key(tmp_path, text, fragment):
    path = write(tmp_path, text)
    with pytest.raises(ScenarioError) as raised:
        parse(path)
    assert str(path) in raised.value.message
    assert fragment in raised.value.message


def test_scaffold_writes_a_valid_scenario(tmp_path):
    target = scaffold("my-check", tmp_path)
    spec = parse(target / "scenario.yaml")
    assert spec.steps and (target / "test_my_check.py").exists()
    with pytest.raises(Exception, match="already exists"):
        scaffold("my-check", tmp_path)


def test_scenario_list_through_the_cli(tmp_path):
    result = subprocess.run([sys.executable, "-m", "lab.cli", "scenario", "list", "--json"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    names = [s["name"] for s in json.loads(result.stdout)]
    assert {"smoke", "raft-failover", "partition", "full-restart"} <= set(names)
