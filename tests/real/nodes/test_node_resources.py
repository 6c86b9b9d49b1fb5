"""Node resources and cgroups, for real: each node in its own cgroup in every hierarchy, its spec's
`memory` and `cpus` enforced there, and a runaway node unable to take the host or its neighbours.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from lab.core.lab import Lab
from lab.providers.base import NodeState
from lab.providers.nspawn import cgroups

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("systemd-nspawn") is None,
                                reason="needs root and systemd-nspawn")

MIB = 1024 * 1024
SPEC = """\
name: resources
provider: nspawn
nodes:
  memory: 512
  list:
    - name: node-1
      memory: 256
      cpus: 1
    - name: node-2
"""


@pytest.fixture(scope="session")
def image():
    from lab.images.build import build_image

    return build_image("labos", "1")


@pytest.fixture(scope="module")
def lab(image, tmp_path_factory):
    directory = tmp_path_factory.mktemp("resources")
    (directory / "lab.yaml").write_text(SPEC)
    lab = Lab.open(directory / "lab.yaml")
    with lab.lock("up"):
        lab.up(bootstrap=False)
    yield lab
    machines = [f"lab-{lab.lab_id}-{n}" for n in ("node-1", "node-2")]
    lab.destroy()
    left = [c for m in machines for c in cgroups.node_cgroups(m) if c.exists()]
    assert left == [], "destroy leaves no cgroup"


def ssh(lab: Lab, node: str, command: str, timeout: float = 60):
    from lab.host.ssh import run

    return run(lab.ssh_endpoints()[node], command, timeout=timeout)


def host_pid(lab: Lab, node: str, unit: str) -> int:
    """The host's pid of a unit's main process in a node."""
    init = int({s.name: s for s in lab.status()}[node].detail.split()[-1])
    inner = ssh(lab, node, f"systemctl show -P MainPID {unit}").stdout.strip()
    assert inner not in ("", "0"), f"{unit} is not running on {node}"
    # NSpid in the host's /proc lists the pid in every namespace: host first, node last.
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            text = status.read_text()
        except OSError:
            continue
        fields = dict(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)
        nspids = fields.get("NSpid", "").split()
        if len(nspids) > 1 and nspids[-1] == inner and pid_ns(int(nspids[0])) == pid_ns(init):
            return int(nspids[0])
    raise AssertionError(f"no host pid for {unit} on {node}")


def pid_ns(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/pid")
    except OSError:
        return None


def recorded(lab: Lab, node: str) -> list[Path]:
    """The node's cgroups as the lab's state records them."""
    return [Path(r["id"]) for r in lab.state.find("cgroup") if Path(r["id"]).name == f"lab-{lab.lab_id}-{node}"]


def own_cgroups(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    return {line.split(":", 2)[1]: line.split(":", 2)[2] for line in lines}


def test_each_node_has_its_own_cgroup_in_every_hierarchy(lab):
    one, two = (own_cgroups(host_pid(lab, n, "systemd-journald")) for n in ("node-1", "node-2"))
    assert set(one) == set(two) and len(one) == len(cgroups.hierarchies())
    for hierarchy, path in one.items():
        assert f"/lab-{lab.lab_id}-node-1/" in path + "/", (hierarchy, path)
        assert f"/lab-{lab.lab_id}-node-2/" in two[hierarchy] + "/", (hierarchy, two[hierarchy])
    for node in ("node-1", "node-2"):
        assert set(recorded(lab, node)) == set(cgroups.node_cgroups(f"lab-{lab.lab_id}-{node}"))
        assert all(cgroup.is_dir() for cgroup in recorded(lab, node))


def test_memory_and_cpus_from_the_spec_limit_the_node(lab):
    for node, mib in (("node-1", 256), ("node-2", 512)):
        memory = cgroups.controller_cgroup(recorded(lab, node), "memory")
        assert int((memory / "memory.limit_in_bytes").read_text()) == mib * MIB
        cpu = cgroups.controller_cgroup(recorded(lab, node), "cpu")
        assert int((cpu / "cpu.cfs_quota_us").read_text()) == int((cpu / "cpu.cfs_period_us").read_text())
    statuses = {s.name: s for s in lab.status()}
    assert statuses["node-1"].memory_limit_bytes == 256 * MIB
    assert 0 < statuses["node-1"].memory_bytes <= 256 * MIB
    assert statuses["node-1"].to_json()["memory_bytes"] == statuses["node-1"].memory_bytes


def test_a_node_with_one_cpu_gets_one_cpu_however_busy_it_is(lab):
    cpuacct = cgroups.controller_cgroup(recorded(lab, "node-1"), "cpuacct") / "cpuacct.usage"
    assert ssh(lab, "node-1", "for i in 1 2 3; do systemd-run --unit=spin$i sh -c 'while :; do :; done'; done").ok
    try:
        time.sleep(1)
        used, started = int(cpuacct.read_text()), time.monotonic()
        time.sleep(3)
        cpus = (int(cpuacct.read_text()) - used) / 1e9 / (time.monotonic() - started)
    finally:
        ssh(lab, "node-1", "systemctl stop spin1 spin2 spin3")
    assert cpus < 1.15, f"node-1 used {cpus:.2f} CPUs with cpus: 1"


def test_a_memory_hog_is_killed_inside_its_node_and_nothing_else_suffers(lab):
    memory = cgroups.controller_cgroup(recorded(lab, "node-1"), "memory")
    kills_before = oom_kills(memory)
    # Touches every byte it takes (b"x" * n), 16 MiB at a time, forever.
    hog = ("systemd-run --unit=hog python3 -c "
           "'import time\nhog = []\nwhile True:\n    hog.append(b\"x\" * (16 << 20))\n    time.sleep(0.01)'")
    assert ssh(lab, "node-1", hog).ok
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        state = ssh(lab, "node-1", "systemctl show -P ActiveState hog").stdout.strip()
        if state in ("failed", "inactive"):
            break
        time.sleep(0.5)
    else:
        pytest.fail("the hog still runs after 90 s")
    shown = ssh(lab, "node-1", "systemctl show -p Result -p ExecMainStatus hog").stdout.split()
    assert "ExecMainStatus=9" in shown, shown  # SIGKILL
    assert oom_kills(memory) > kills_before
    assert int((memory / "memory.max_usage_in_bytes").read_text()) <= 256 * MIB
    # The node itself, its neighbour and the host are fine.
    assert ssh(lab, "node-1", "systemctl is-active systemd-journald ssh").stdout.split() == ["active", "active"]
    assert ssh(lab, "node-2", "true").ok
    assert [s.state for s in lab.status()] == [NodeState.RUNNING] * 2
    ssh(lab, "node-1", "systemctl reset-failed hog")


def oom_kills(memory: Path) -> int:
    for line in (memory / "memory.oom_control").read_text().splitlines():
        if line.startswith("oom_kill "):
            return int(line.split()[1])
    return 0
