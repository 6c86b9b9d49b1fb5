"""Lab snapshots on real nspawn nodes: a 3-node lab saved with every node frozen together and restored
in seconds with its data (a key written before the save is there, one written after is gone), its
files (a whiteout of the image's file survives, a file written after the save does not), its Docker
directory (an image pulled after the save is gone); a restore after every node was killed; a paused
node refused; `lab snapshot` through the CLI; `lab test --from-snapshot` over two scenarios.
Restore times are printed (`pytest -s`) and held to the 5 s the issue asks for.
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

from lab.core import snapshots
from lab.core.lab import Lab
from lab.errors import UsageError
from lab.host import ssh
from lab.model.spec import Override

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("systemd-nspawn") is None,
                                reason="needs root and systemd-nspawn")

RESTORE_BOUND_S = 5.0  # the goal for a 3-node lab


def open_lab(directory: Path) -> Lab:
    return Lab.open(directory / "lab.yaml", [Override(("nodes", "count"), 3, "--nodes"),
                                             Override(("provider",), "nspawn", "--provider")])


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    from lab.images.build import build_image

    build_image("labos", "1")
    lab = open_lab(tmp_path_factory.mktemp("snapshots"))
    try:
        with lab.lock("up"):
            lab.up()
        yield lab
    finally:
        with lab.lock("destroy", wait=10):
            lab.destroy()
    assert not lab.lab_dir.exists()  # snapshots went with it


def on_node(lab: Lab, node: str, command: str, timeout: float = 60) -> ssh.NodeResult:
    return ssh.run(lab.provider().ssh_endpoints()[node], command, timeout=timeout)


def healthy_with_one_leader(lab: Lab) -> bool:
    rows = lab.etcd_status()
    return all(r.healthy for r in rows) and sum(r.leader for r in rows) == 1 and len(rows) == 3


def judge_restore_time(took_s: float) -> None:
    """The 5 s bound holds on this machine when it is not overloaded; on a loaded one (another lab booting,
    a VM, a CPU hog: load above the CPU count) the time is printed, not judged: a gate must not flake."""
    load, cpus = os.getloadavg()[0], os.cpu_count() or 1
    if load > cpus:
        print(f"restore took {took_s:.2f} s with load {load:.1f} on {cpus} CPUs: the {RESTORE_BOUND_S:.0f} s "
              "bound is not judged on an overloaded machine")
        return
    assert took_s < RESTORE_BOUND_S


def test_a_restore_brings_back_the_data_of_the_moment_saved_and_nothing_after(lab):
    client = lab.etcd_client()
    client.put("/lab/test/snapshot/before", "kept")
    on_node(lab, "node-2", "rm /etc/issue && echo saved > /root/saved")  # a whiteout over the image's file
    machine_id = on_node(lab, "node-2", "cat /etc/machine-id").stdout
    boot_id = on_node(lab, "node-2", "cat /proc/sys/kernel/random/boot_id").stdout
    saved = snapshots.save(lab, "base", progress=print)
    print(f"save: nodes frozen {saved.frozen_s:.2f} s, {saved.size_bytes / 2**20:.0f} MiB")
    client.put("/lab/test/snapshot/after", "gone")
    on_node(lab, "node-2", "echo back > /etc/issue && rm /root/saved && echo later > /root/later")
    client.close()

    result = snapshots.restore(lab, "base", progress=print)
    print(f"restore: {result.took_s:.2f} s (nodes {result.nodes_s:.2f} s, etcd {result.etcd_s:.2f} s)")

    client = lab.etcd_client()
    assert client.get("/lab/test/snapshot/before") == "kept"
    assert client.get("/lab/test/snapshot/after") is None
    client.close()
    assert healthy_with_one_leader(lab)
    files = on_node(lab, "node-2", "test -e /etc/issue && echo issue; cat /root/saved; test -e /root/later && echo later")
    assert files.stdout.split() == ["saved"]
    assert on_node(lab, "node-2", "cat /etc/machine-id").stdout == machine_id  # the same node, booted again
    assert on_node(lab, "node-2", "cat /proc/sys/kernel/random/boot_id").stdout != boot_id
    judge_restore_time(result.took_s)


def test_a_restore_works_after_every_node_was_killed(lab):
    if "base" not in [r.name for r in snapshots.rows(lab)]:
        snapshots.save(lab, "base")
    provider = lab.provider()
    for node in lab.state["nodes"]:
        provider.kill(node)
    result = snapshots.restore(lab, "base", progress=print)
    print(f"restore after kill: {result.took_s:.2f} s")
    assert healthy_with_one_leader(lab)
    client = lab.etcd_client()
    assert client.get("/lab/test/snapshot/before") == "kept"
    client.close()


def test_an_image_pulled_after_the_save_is_gone_after_the_restore(lab):
    if "base" not in [r.name for r in snapshots.rows(lab)]:
        snapshots.save(lab, "base")
    pulled = on_node(lab, "node-1", "docker pull -q busybox >/dev/null && docker images -q busybox", timeout=120)
    assert pulled.ok and pulled.stdout.strip(), pulled.stderr
    snapshots.restore(lab, "base")
    assert on_node(lab, "node-1", "docker images -q busybox", timeout=60).stdout.strip() == ""


def test_a_snapshot_with_images_restores_them_and_says_what_it_costs(lab):
    on_node(lab, "node-1", "docker pull -q ubuntu >/dev/null", timeout=180)
    for node in ("node-2", "node-3"):
        on_node(lab, node, "docker pull -q ubuntu >/dev/null", timeout=180)
    saved = snapshots.save(lab, "with-images", progress=print)
    result = snapshots.restore(lab, "with-images", progress=print)
    print(f"with the ubuntu stand-in on every node: {saved.size_bytes / 2**20:.0f} MiB, frozen {saved.frozen_s:.2f} s, "
          f"restore {result.took_s:.2f} s (nodes {result.nodes_s:.2f} s)")
    hello = on_node(lab, "node-3", "docker run --rm ubuntu /bin/echo hello world", timeout=60)
    assert hello.stdout.strip() == "hello world", hello.stderr
    assert healthy_with_one_leader(lab)


def test_a_paused_node_is_refused_and_every_node_left_as_it_was(lab):
    provider = lab.provider()
    provider.pause("node-2")
    try:
        with pytest.raises(UsageError, match="node-2 is paused"):
            snapshots.save(lab, "paused")
        assert {s.name: s.state.value for s in provider.status()} == {
            "node-1": "running", "node-2": "paused", "node-3": "running"}
    finally:
        provider.resume("node-2")
    assert "paused" not in [r.name for r in snapshots.rows(lab)]


def lab_cli(directory: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lab.cli", *args], cwd=directory, capture_output=True, text=True,
                          timeout=timeout)


def test_the_cli_lists_replaces_restores_and_removes(lab):
    project = lab.loaded.project_dir
    saved = lab_cli(project, "snapshot", "save", "cli")
    assert saved.returncode == 0, saved.stderr
    again = lab_cli(project, "snapshot", "save", "cli")
    assert again.returncode == 2 and "already" in again.stderr and "Traceback" not in again.stderr
    assert lab_cli(project, "snapshot", "save", "cli", "--force").returncode == 0
    listed = json.loads(lab_cli(project, "snapshot", "list", "--json").stdout)
    assert "cli" in [row["name"] for row in listed]
    started = time.monotonic()
    restored = lab_cli(project, "snapshot", "restore", "cli", "--json")
    assert restored.returncode == 0, restored.stderr
    print(f"`lab snapshot restore` as a command: {time.monotonic() - started:.2f} s "
          f"({json.loads(restored.stdout)['took_s']:.2f} s inside)")
    missing = lab_cli(project, "snapshot", "restore", "nope")
    assert missing.returncode == 2 and "has no snapshot 'nope'" in missing.stderr
    assert lab_cli(project, "snapshot", "rm", "cli").returncode == 0
    assert not (lab.lab_dir / "snapshots" / "cli").exists()


def test_lab_test_from_snapshot_runs_each_scenario_on_a_restored_lab(tmp_path):
    result = lab_cli(tmp_path, "test", "smoke", "raft-failover", "--from-snapshot", "--provider", "nspawn",
                     "--nodes", "3", "--destroy", "always", timeout=1200)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert result.stderr.count("restored lab-test-base in") == 2, result.stderr
    assert "scenario smoke passed" in result.stdout and "scenario raft-failover passed" in result.stdout
    assert not (tmp_path / ".lab" / "lab").exists()
