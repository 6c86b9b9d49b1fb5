"""Negative controls: a cluster deliberately made wrong fails the matching scenario, every time, with the
message that says why. The gate's verdicts are only worth something if these fail (the pure controls, a
lost write or a stale read injected into a history: tests/unit/test_verdicts.py).

One 3-node lab serves every control, in this order: the partition never healed, the roll to a version whose
etcd cannot start, then etcd with elections effectively disabled (last: it reconfigures etcd).
Each control is a built-in scenario made wrong in one place, written into the project's own scenarios/ under
the built-in's name (a project's scenario shadows the built-in of the same name).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lab.scenarios.conditions import liveness_bound

REPO = Path(__file__).resolve().parents[3]
BUILTINS = REPO / "scenarios"


def run_cli(args: list[str], cwd: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lab.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A running 3-node lab with etcd's defaults (T 1 s, h 100 ms, pre-vote off), destroyed afterwards."""
    if os.geteuid() != 0 or shutil.which("systemd-nspawn") is None:
        pytest.skip("needs root and systemd-nspawn")
    from lab.images.build import build_image

    build_image("labos", "1")
    build_image("labos", "2-broken")
    directory = tmp_path_factory.mktemp("negative")
    up = run_cli(["up", "--provider", "nspawn", "--nodes", "3"], directory)
    try:
        assert up.returncode == 0, up.stdout[-2000:] + up.stderr[-3000:]
        yield directory
    finally:
        run_cli(["destroy"], directory, timeout=300)


def shadow(project: Path, name: str, edit) -> Path:
    """Copy built-in scenario `name` into the project's scenarios/, its scenario.yaml changed by `edit`."""
    target = project / "scenarios" / name
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(BUILTINS / name, target)
    (project / "scenarios" / "_checks").mkdir(exist_ok=True)
    shutil.copy(BUILTINS / "_checks" / "test_cluster.py", project / "scenarios" / "_checks" / "test_cluster.py")
    text = (target / "scenario.yaml").read_text()
    changed = edit(text)
    assert changed != text, "the control must change the scenario"
    (target / "scenario.yaml").write_text(changed)
    return target


def failed_run(project: Path, name: str) -> tuple[subprocess.CompletedProcess, dict]:
    """`lab scenario run NAME` on the running lab; it must fail cleanly. Returns its result.json too."""
    before = set((project / ".lab" / "runs").glob("*")) if (project / ".lab" / "runs").is_dir() else set()
    result = run_cli(["scenario", "run", name, "--keep", "--provider", "nspawn"], project)
    assert result.returncode == 1, f"the control passed:\n{result.stdout[-3000:]}{result.stderr[-3000:]}"
    assert "Traceback" not in result.stderr
    new = [d for d in (project / ".lab" / "runs").glob(f"*-{name}") if d not in before]
    assert len(new) == 1, new
    return result, json.loads((new[0] / "result.json").read_text())


def failures(data: dict) -> dict[str, str]:
    return {step["step"]: step["detail"] for step in data["steps"] if not step["ok"]}


def test_a_partition_never_healed_fails_partition(project):
    shadow(project, "partition", lambda text: text.replace("  - fault: heal\n", "")
           .replace("{condition: converged, timeout: 30}", "{condition: converged, timeout: 15}"))
    result, data = failed_run(project, "partition")
    failed = failures(data)
    assert failed == {"wait until converged": "not reached within 15 s"}, failed
    assert "partition: wait until converged" in result.stderr
    # The minority was cut off all the same: a new leader came, within the liveness bound.
    assert data["measurements"]["time_to_new_leader_s"]


def test_a_roll_to_a_version_whose_etcd_cannot_start_fails_rolling_update(project):
    shadow(project, "rolling-update", lambda text: text.replace('to: ["2", "1"]', 'to: "2-broken"'))
    result, data = failed_run(project, "rolling-update")
    failed = failures(data)
    halted = failed.pop("wait until updated")
    assert halted.startswith("the roll halted: node-") and "rolled back from 2-broken" in halted, halted
    assert "etcd" in halted  # the health check's reason: its etcd did not start
    assert failed.pop("every node runs OS version 2-broken").count(": 1") == 3  # each node back on 1
    assert failed.pop("all node(s) rebooted (boot id changed)").startswith("rebooted: node-")
    # Whether the scheduled unit moved depends on which node tried the broken version first.
    failed.pop("units moved off rebooting machines", None)
    assert not failed, failed  # nothing else: no write lost, quorum kept through the rollback
    assert "rolling-update: " in result.stderr and "wait until updated" in result.stderr


def test_etcd_with_elections_effectively_disabled_fails_raft_failover_on_liveness(project):
    # The lab declares etcd's defaults (lab.yaml: none, so T 1 s); its members are made to run an election
    # timeout far beyond the bound those defaults give. `lab up --set` rewrites each member's settings.
    bound = liveness_bound(1000, 100, 3, pre_vote=False)
    # 20 s: every election takes 20-40 s, beyond the 15.55 s bound, yet the restarted members still elect a
    # first leader within `lab up`'s 60 s health wait (50 s did not, once).
    reconfigured = run_cli(["up", "--provider", "nspawn", "--nodes", "3", "--set", "etcd.election_timeout_ms=20000"],
                           project)
    assert reconfigured.returncode == 0, reconfigured.stdout[-2000:] + reconfigured.stderr[-3000:]
    result, data = failed_run(project, "raft-failover")
    failed = failures(data)
    detail = failed["wait until new-leader"]
    assert detail.startswith("no new leader "), detail
    assert f"liveness bound {bound.seconds:.2f} s: {bound.rounds} election round(s)" in detail
    assert data["measurements"]["no_new_leader_after_s"][0] >= bound.seconds
    assert "raft-failover: wait until new-leader" in result.stderr
