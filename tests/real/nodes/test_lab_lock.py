"""Two commands changing one lab at once, through the real CLI on a real lab.

Every verb that changes a lab takes its lock (a short wait, then a clear
"busy" error) and reads the state again once it holds it, so two writers at
once never lose a recorded resource: afterwards every node the state names
exists and runs, every node directory on disk is recorded, and `lab destroy`
leaves nothing behind on the host.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("systemd-nspawn") is None,
                                reason="needs root and systemd-nspawn")

BUSY = 5  # StateError: the lab is busy


def command(*args: str) -> list[str]:
    return [sys.executable, "-m", "lab.cli", *args]


def environment() -> dict[str, str]:
    return {**{k: v for k, v in os.environ.items() if not k.startswith("LAB_")}, "COLUMNS": "200"}


def lab(project: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(command(*args), cwd=project, env=environment(), capture_output=True, text=True,
                          timeout=timeout)


def start(project: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(command(*args), cwd=project, env=environment(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finished(process: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    out, err = process.communicate(timeout=timeout)
    return process.returncode, out + err


def ok_or_busy(code: int, output: str, holder: str) -> bool:
    """True if the command ran; False if it was refused as busy (with one clear message)."""
    assert "Traceback" not in output, output
    if code == 0:
        return True
    assert code == BUSY, output
    assert "is busy: `lab " in output and holder in output and "fix: wait for it to finish" in output, output
    return False


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    from lab.images.build import build_image

    build_image("labos", "1")
    directory = tmp_path_factory.mktemp("lock")
    (directory / "lab.yaml").write_text("name: lock\nprovider: nspawn\nnodes: {count: 2}\n")
    result = lab(directory, "up")
    assert result.returncode == 0, result.stdout + result.stderr
    yield directory
    from lab.host.network import lab_id

    lab_dir = directory / ".lab" / "lock"
    ident = lab_id(lab_dir)
    result = lab(directory, "destroy")
    assert result.returncode == 0, result.stdout + result.stderr
    assert leftovers(ident, lab_dir) == []


def leftovers(ident: str, lab_dir: Path) -> list[str]:
    """What of the lab outlived `lab destroy`: what a lost record would leave."""
    found = [f"directory {lab_dir}"] if lab_dir.exists() else []
    found += [f"bridge lab-{ident}"] if Path(f"/sys/class/net/lab-{ident}").exists() else []
    found += [f"mount {line.split()[4]}" for line in Path("/proc/self/mountinfo").read_text().splitlines()
              if str(lab_dir) in line.split()[4]]
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if proc.name.isdigit() and f"lab-{ident}-" in cmdline:
            found.append(f"process {proc.name}: {cmdline[:80]}")
    found += [f"cgroup {c}" for h in Path("/sys/fs/cgroup").iterdir() for c in h.rglob(f"lab-{ident}-*")]
    return found


def state(project: Path) -> dict:
    return json.loads((project / ".lab" / "lock" / "state.json").read_text())


def running(project: Path) -> list[str]:
    result = lab(project, "status", "--json")
    assert result.returncode == 0, result.stderr
    return [n["name"] for n in json.loads(result.stdout)["nodes"] if n["state"] == "running"]


def holds_lock(project: Path, verb: str) -> bool:
    from lab.host.locks import ExclusiveLock
    from lab.host.network import lab_id
    from lab.host.paths import state_home

    lock = state_home() / "locks" / f"{lab_id(project / '.lab' / 'lock')}.lock"
    return f"`lab {verb}`" in ExclusiveLock(lock, "the test").holder()


def assert_every_record_kept(project: Path) -> None:
    """Each node the state names is recorded as a resource and runs; each node directory is recorded."""
    current = state(project)
    recorded = {r["id"] for r in current["resources"] if r["kind"] == "node"}
    assert set(current["nodes"]) == recorded
    assert {p.name for p in (project / ".lab" / "lock" / "nodes").iterdir()} == recorded
    mounts = {r["id"] for r in current["resources"] if r["kind"] == "mount"}
    nodes_dir = project / ".lab" / "lock" / "nodes"
    # Every node's overlay, and (user-namespaced nodes) the image idmapped as its lower layer.
    assert {str(nodes_dir / n / "merged") for n in recorded} <= mounts
    assert mounts <= {str(nodes_dir / n / layer) for n in recorded for layer in ("merged", "lower")}
    assert sorted(running(project)) == sorted(current["nodes"])


def test_a_fault_while_a_node_is_added(project):
    adder = start(project, "node", "add")
    deadline = time.monotonic() + 60
    while not holds_lock(project, "node add"):
        assert adder.poll() is None and time.monotonic() < deadline, finished(adder)
        time.sleep(0.05)
    partition = lab(project, "fault", "partition", "node-1")
    code, output = finished(adder)
    assert code == 0, output
    partitioned = ok_or_busy(partition.returncode, partition.stdout + partition.stderr, "`lab node add`")
    assert state(project)["nodes"] == ["node-1", "node-2", "node-3"]
    assert bool(state(project).get("partition")) == partitioned
    assert_every_record_kept(project)
    result = lab(project, "fault", "heal")
    assert result.returncode == 0, result.stderr
    assert not state(project).get("partition")


def test_two_node_adds_at_once(project):
    before = state(project)["nodes"]
    adders = [start(project, "node", "add") for _ in range(2)]
    outcomes = [finished(adder) for adder in adders]
    added = [ok_or_busy(code, output, "`lab node add`") for code, output in outcomes]
    assert any(added), outcomes
    assert len(state(project)["nodes"]) == len(before) + sum(added)
    assert_every_record_kept(project)


def test_two_quick_faults_at_once(project):
    pause, partition = start(project, "fault", "pause", "node-1"), start(project, "fault", "partition", "node-2")
    paused = ok_or_busy(*finished(pause), "`lab fault partition")
    partitioned = ok_or_busy(*finished(partition), "`lab fault pause")
    assert paused or partitioned
    current = state(project)
    assert bool(current.get("partition")) == partitioned
    statuses = json.loads(lab(project, "status", "--json").stdout)["nodes"]
    assert (next(n for n in statuses if n["name"] == "node-1")["state"] == "paused") == paused
    for args in (["fault", "resume", "node-1"], ["fault", "heal"]):
        result = lab(project, *args)
        assert result.returncode == 0, result.stderr
    assert_every_record_kept(project)
