"""Scenarios run for real on nspawn nodes through the CLI (the pure tests are in tests/unit/test_scenario_*.py)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

needs_nodes = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("systemd-nspawn") is None,
                                 reason="needs root and systemd-nspawn")


def run_cli(args: list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lab.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def image():
    if os.geteuid() != 0 or shutil.which("systemd-nspawn") is None:
        pytest.skip("needs root and systemd-nspawn")
    from lab.images.build import build_image

    return build_image("labos", "1")


@needs_nodes
def test_lab_test_runs_every_fault_scenario_on_one_lab_and_removes_it(image, tmp_path):
    scenarios = ["raft-failover", "partition", "full-restart"]
    # Run once: the verdict fails only on a broken Raft promise (the liveness bound), never on a slow
    # sample, so there is nothing to run again (tests/real/nodes/test_negative_controls.py: what must fail).
    result = run_cli(["test", *scenarios, "--provider", "nspawn", "--junit", str(tmp_path / "j.xml")],
                     cwd=tmp_path, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    runs = sorted((tmp_path / ".lab" / "runs").iterdir())
    assert [r.name.split("-lab-")[1] for r in runs] == scenarios  # back to back on the same lab
    for run in runs:
        data = json.loads((run / "result.json").read_text())
        assert data["ok"] and data["measurements"]["lost_writes"] == 0, data
        assert (run / "timeline.svg").exists() and (run / "history.jsonl").stat().st_size > 0
        assert (run / "nodes" / "node-1" / "etcd.log").stat().st_size > 0
        assert "Authentication (publickey) successful" in (run / "ssh.log").read_text()  # lab's own connections
        if not run.name.endswith("full-restart"):
            leader_times = data["measurements"]["time_to_new_leader_s"]
            assert leader_times and len(data["measurements"]["fault_latency_s"]) == len(leader_times)
    for scenario in scenarios:
        suite = ET.parse(tmp_path / f"j-{scenario}.xml").getroot()
        assert all(s.get("failures") in ("0", None) for s in suite.iter("testsuite"))
    assert not (tmp_path / ".lab" / "lab").exists(), "the lab `lab test` created must be gone"


@needs_nodes
def test_rolling_update_and_rollback_on_one_lab(image, tmp_path):
    from lab.images.build import build_image

    build_image("labos", "2")
    build_image("labos", "2-broken")
    # The order that failed when expectations assumed a fresh lab: the roll leaves the nodes on 2, the
    # failed roll must bring them back to 2 (the version they ran before), and the roll after that goes
    # back to 1 (the other version).
    scenarios = ["rolling-update", "rolling-update-rollback", "rolling-update"]
    result = run_cli(["test", *scenarios, "--provider", "nspawn"], cwd=tmp_path, timeout=1500)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    runs = [json.loads((r / "result.json").read_text()) for r in sorted((tmp_path / ".lab" / "runs").iterdir())]
    assert [r["scenario"] for r in runs] == scenarios and all(r["ok"] for r in runs)
    rolled_to = [next(s["measurements"]["to"] for s in r["steps"] if s["step"].startswith("update:")) for r in runs]
    assert rolled_to == ["2", "2-broken", "1"]
    for run in (runs[0], runs[2]):
        measured = run["measurements"]
        assert measured["max_members_down"] <= 1 and measured["lost_writes"] == 0
        assert measured["roll_s"] > 0


@needs_nodes
def test_a_failing_check_fails_the_run_with_the_failure_in_junit(image, tmp_path):
    directory = tmp_path / "scenarios" / "must-fail"
    directory.mkdir(parents=True)
    (directory / "scenario.yaml").write_text("description: a check that cannot pass\nnodes: 1\n"
                                             "steps:\n  - check: [test_impossible.py]\n")
    (directory / "test_impossible.py").write_text(
        "def test_hostname_is_impossible(host):\n    assert host.check_output('hostname') == 'no-such-host'\n")
    result = run_cli(["scenario", "run", "must-fail", "--provider", "nspawn", "--junit", str(tmp_path / "j.xml")],
                     cwd=tmp_path)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "must-fail" in result.stderr and "check: test_impossible.py" in result.stderr
    text = (tmp_path / "j.xml").read_text()
    assert "<failure" in text and "test_hostname_is_impossible" in text
