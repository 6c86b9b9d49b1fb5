"""The nspawn provider, for real: nodes boot, answer SSH, and take faults.

No mocks: every test boots real systemd-nspawn nodes of the real Lab OS image
and checks them over real SSH (testinfra and Fabric). Each lab is destroyed at
the end and the host is checked for leftovers.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lab.core.lab import Lab
from lab.errors import LabError, PrerequisiteError
from lab.providers.base import NodeState
from lab.model.spec import Override

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("systemd-nspawn") is None,
                                reason="needs root and systemd-nspawn")


@pytest.fixture(scope="session")
def image():
    from lab.images.build import build_image

    return build_image("labos", "1")


def open_lab(directory: Path, nodes: int = 3, name: str = "lab", **values) -> Lab:
    overrides = [Override(("nodes", "count"), nodes, "--nodes"), Override(("provider",), "nspawn", "--provider"),
                 Override(("name",), name, "--name")]
    overrides += [Override(tuple(k.split("__")), v, f"--set {k}") for k, v in values.items()]
    return Lab.open(directory / "lab.yaml", overrides)


def leftovers(lab_id: str, lab_dir: Path) -> list[str]:
    """Everything of a lab that could outlive `destroy` on the host."""
    found = []
    if Path(f"/sys/class/net/lab-{lab_id}").exists():
        found.append(f"bridge lab-{lab_id}")
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        if str(lab_dir) in line.split()[4]:
            found.append(f"mount {line.split()[4]}")
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if f"lab-{lab_id}-" in cmdline:
                found.append(f"process {proc.name}: {cmdline[:80]}")
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    if f"vb-lab-{lab_id}-" in links:
        found.append("veth of a node")
    for propagate in Path("/run/systemd/nspawn/propagate").glob(f"lab-{lab_id}-*"):
        found.append(f"nspawn directory {propagate}")
    tables = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout
    if f"lab_{lab_id}" in tables:
        found.append(f"nft table lab_{lab_id}")
    for hierarchy in Path("/sys/fs/cgroup").iterdir():  # every one: each node has a cgroup in all of them
        for cgroup in hierarchy.rglob(f"lab-{lab_id}-*"):
            found.append(f"cgroup {cgroup}")
    if lab_dir.exists():
        found.append(f"directory {lab_dir}")
    return found


@pytest.fixture(scope="module")
def lab3(image, tmp_path_factory):
    """One running 3-node lab shared by the tests of this module that only read or heal what they do."""
    directory = tmp_path_factory.mktemp("lab3")
    lab = open_lab(directory)
    with lab.lock("up"):
        lab.up()
    yield lab
    lab_id, lab_dir = lab.lab_id, lab.lab_dir
    lab.destroy()
    assert leftovers(lab_id, lab_dir) == []


def ssh(lab: Lab, node: str, command: str, timeout: float = 10):
    from lab.host.ssh import run

    return run(lab.ssh_endpoints()[node], command, timeout=timeout)


def boot_id(lab: Lab, node: str) -> str:
    return ssh(lab, node, "cat /proc/sys/kernel/random/boot_id").stdout.strip()


def reachable(lab: Lab, source: str, target_ip: str) -> bool:
    return ssh(lab, source, f"ping -c1 -W1 {target_ip}").exit_status == 0


# ---------------------------------------------------------------- boot and identity


def test_three_nodes_run_with_their_own_addresses_and_boot_ids(lab3):
    statuses = lab3.status()
    assert [s.state for s in statuses] == [NodeState.RUNNING] * 3
    assert [s.ip for s in statuses] == [lab3.context("nspawn").addresses[f"node-{i}"] for i in (1, 2, 3)]
    assert len({s.boot_id for s in statuses}) == 3


def test_testinfra_sees_systemd_journald_sshd_hostname_and_ip(lab3):
    import testinfra

    lab3.write_ssh_config(lab3.provider())
    addresses = lab3.context("nspawn").addresses
    try:
        for node, ip in addresses.items():
            host = testinfra.get_host(f"ssh://{node}", ssh_config=str(lab3.ssh_config_path))
            assert host.check_output("cat /proc/1/comm") == "systemd"
            assert host.service("systemd-journald").is_running
            assert host.service("ssh").is_running
            assert host.check_output("hostname") == node
            assert f"{ip}/" in host.check_output("ip -4 -o addr show dev host0")
            assert host.run("touch /usr/x").rc != 0, "/usr must be read-only"
    finally:
        from lab.host.ssh import close_masters
        close_masters(lab3.ssh_config_path, addresses)


def test_smoke_scenario_passes(lab3):
    from lab.scenarios.engine import ScenarioRun
    from lab.scenarios.model import find

    scenario = find("smoke", lab3.loaded.project_dir)
    result = ScenarioRun(lab3, scenario, scenario.load(), lambda _m: None).run()
    assert result.ok, [(s.description, s.detail) for s in result.failures]


def test_host_keys_are_verified(lab3, tmp_path):
    from dataclasses import replace

    from lab.errors import ProviderError
    from lab.host.ssh import generate_ed25519, run

    endpoint = lab3.ssh_endpoints()["node-1"]
    wrong = tmp_path / "known_hosts"
    public = generate_ed25519("impostor")[1].split()
    wrong.write_text(f"node-1,{endpoint.host} {public[0]} {public[1]}\n")
    with pytest.raises(ProviderError):
        run(replace(endpoint, known_hosts=wrong), "true")
    assert run(endpoint, "true").ok


def test_each_lab_has_its_own_ssh_key(lab3):
    key = lab3.lab_dir / "ssh" / "id_ed25519"
    assert key.stat().st_mode & 0o777 == 0o600
    assert "OPENSSH PRIVATE KEY" in key.read_text()


def test_each_node_is_supervised_by_supervisor_py_in_isolated_mode(lab3):
    """The supervisor is a plain file run as `python -I -S`: it imports nothing of lab."""
    from lab.providers.nspawn import supervisor

    nodes = lab3.state.find("node")
    assert len(nodes) == 3
    for res in nodes:
        argv = Path(f"/proc/{res['supervisor_pid']}/cmdline").read_bytes().split(b"\0")
        assert [a.decode() for a in argv[1:4]] == ["-I", "-S", supervisor.__file__]


def test_exec_runs_on_all_nodes_in_parallel_with_prefixes(lab3):
    result = subprocess.run([sys.executable, "-m", "lab.cli", "exec", "--file", str(lab3.loaded.path),
                             "--name", lab3.name, "--", "hostname"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    lines = sorted(result.stdout.splitlines())
    assert lines == ["node-1 | node-1", "node-2 | node-2", "node-3 | node-3"]


# ---------------------------------------------------------------- faults


def test_reboot_changes_boot_id_and_keeps_state(lab3):
    ssh(lab3, "node-2", "echo kept > /root/survives-reboot")
    before = boot_id(lab3, "node-2")
    lab3.provider().reboot("node-2")
    assert boot_id(lab3, "node-2") != before
    assert ssh(lab3, "node-2", "cat /root/survives-reboot").stdout.strip() == "kept"


def test_node_boots_the_slot_its_boot_json_names(lab3):
    """A/B slots: an image staged in slot b is the node's /usr once its boot.json says b, and a
    again after it says a (in a user namespace too: the slot's /usr is an idmapped bind)."""
    from lab.images.build import build_image

    provider = lab3.provider()
    assert provider.stage_update("node-1", build_image("labos", "2").rootfs) == "b"
    try:
        for slot, version in (("b", "2"), ("a", "1")):
            ssh(lab3, "node-1", f"echo '{{\"slot\": \"{slot}\"}}' > /etc/lab/boot.json")
            assert provider.boot_slot("node-1") == slot
            provider.reboot("node-1")
            assert ssh(lab3, "node-1", ". /usr/lib/os-release; echo $VERSION_ID").stdout.strip() == version
            assert not ssh(lab3, "node-1", "touch /usr/x").ok
    finally:
        ssh(lab3, "node-1", "rm -f /etc/lab/boot.json")


def test_killed_node_stops_answering_and_starts_again(lab3):
    provider = lab3.provider()
    ip = lab3.context("nspawn").addresses["node-3"]
    ssh(lab3, "node-3", "echo before-kill > /root/kill-marker; sync")
    provider.kill("node-3")
    states = {s.name: s.state for s in lab3.status()}
    assert states["node-3"] == NodeState.STOPPED
    assert not reachable(lab3, "node-1", ip)
    provider.start("node-3")
    assert reachable(lab3, "node-1", ip)
    assert ssh(lab3, "node-3", "cat /root/kill-marker").stdout.strip() == "before-kill"


def test_paused_node_stops_all_activity_until_resumed(lab3):
    provider = lab3.provider()
    ssh(lab3, "node-1", "systemd-run --unit=ticker /bin/sh -c "
                        "'while :; do date +%s%N > /root/tick; sleep 0.05; done'")
    tick = lab3.lab_dir / "nodes" / "node-1" / "merged" / "root" / "tick"
    time.sleep(0.3)
    provider.pause("node-1")
    try:
        assert {s.name: s.state for s in lab3.status()}["node-1"] == NodeState.PAUSED
        frozen = tick.read_text()
        time.sleep(0.5)
        assert tick.read_text() == frozen, "a paused node must not run anything"
        ip = lab3.context("nspawn").addresses["node-1"]
        assert ssh(lab3, "node-2", f"timeout 2 bash -c '</dev/tcp/{ip}/22 && head -c4 </dev/tcp/{ip}/22'"
                   ).stdout.strip() == "", "sshd of a paused node must not answer"
    finally:
        provider.resume("node-1")
    time.sleep(0.3)
    assert tick.read_text() != frozen
    ssh(lab3, "node-1", "systemctl stop ticker")


def test_partition_cuts_groups_apart_and_heal_restores(lab3):
    provider = lab3.provider()
    ips = lab3.context("nspawn").addresses
    provider.partition([["node-1"], ["node-2", "node-3"]])
    try:
        assert not reachable(lab3, "node-1", ips["node-2"])
        assert not reachable(lab3, "node-3", ips["node-1"])
        assert reachable(lab3, "node-2", ips["node-3"])
    finally:
        provider.heal()
    assert reachable(lab3, "node-1", ips["node-2"])
    assert reachable(lab3, "node-3", ips["node-1"])


# ---------------------------------------------------------------- lifecycle, isolation, crash safety


def test_halt_then_up_keeps_node_state(image, tmp_path):
    lab = open_lab(tmp_path, nodes=1)
    try:
        lab.up()
        ssh(lab, "node-1", "echo persisted > /root/halt-marker")
        lab.halt()
        assert [s.state for s in lab.status()] == [NodeState.STOPPED]
        assert not Path(f"/sys/class/net/lab-{lab.lab_id}").exists(), "halt leaves no bridge"
        lab.up()
        assert ssh(lab, "node-1", "cat /root/halt-marker").stdout.strip() == "persisted"
    finally:
        lab.destroy()
    assert leftovers(lab.lab_id, lab.lab_dir) == []


def test_two_labs_side_by_side_never_collide(image, tmp_path):
    a = open_lab(tmp_path / "a", nodes=1, name="alpha")
    b = open_lab(tmp_path / "b", nodes=1, name="beta")
    try:
        a.up()
        b.up()
        assert a.state["subnet"] != b.state["subnet"]
        assert a.lab_id != b.lab_id
        assert ssh(a, "node-1", "hostname").ok and ssh(b, "node-1", "hostname").ok
        a.destroy()
        assert leftovers(a.lab_id, a.lab_dir) == []
        assert [s.state for s in b.status()] == [NodeState.RUNNING]
    finally:
        a.destroy()
        b.destroy()
    assert leftovers(b.lab_id, b.lab_dir) == []


def test_subnet_in_use_is_refused_before_anything_is_created(lab3, tmp_path):
    other = open_lab(tmp_path, nodes=1, name="clash", network__subnet=lab3.state["subnet"])
    with pytest.raises(PrerequisiteError, match="overlaps|in use"):
        other.up()
    assert leftovers(other.lab_id, other.lab_dir) == []


def test_missing_image_names_the_fix_and_creates_nothing(image, tmp_path):
    (tmp_path / "lab.yaml").write_text("box:\n  version: '9'\n")
    result = subprocess.run([sys.executable, "-m", "lab.cli", "up", "--provider", "nspawn", "--file",
                             str(tmp_path / "lab.yaml")], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "lab box build" in result.stderr or "version" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / ".lab").exists() or not any((tmp_path / ".lab").iterdir())


def wait_until_nodes_start(lab_dir: Path, timeout: float = 30) -> None:
    """Until `lab up` is starting nodes: the state records a supervisor (the moment to interrupt it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state_file = lab_dir / "state.json"
        if state_file.exists() and "supervisor_pid" in state_file.read_text():
            return
        time.sleep(0.01)


def test_kill_9_during_up_then_destroy_leaves_nothing(image, tmp_path):
    (tmp_path / "lab.yaml").write_text("name: crash\nprovider: nspawn\nnodes:\n  count: 3\n")
    lab_dir = tmp_path / ".lab" / "crash"
    up = subprocess.Popen([sys.executable, "-m", "lab.cli", "up", "--file", str(tmp_path / "lab.yaml")],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_until_nodes_start(lab_dir)
    up.send_signal(signal.SIGKILL)
    up.wait()
    lab = Lab.open(tmp_path / "lab.yaml")
    lab_id = lab.lab_id
    assert lab.created, "the state must survive kill -9"
    with lab.lock("destroy", wait=10):
        lab.destroy()
    assert leftovers(lab_id, lab_dir) == []


def test_destroy_of_a_lab_that_never_existed_is_harmless(tmp_path):
    lab = open_lab(tmp_path, nodes=1)
    assert lab.destroy() is False


def test_unknown_node_is_a_clear_error(lab3):
    with pytest.raises(LabError, match="no node named 'node-9'"):
        lab3.provider().kill("node-9")


def test_status_json_lists_every_node(lab3):
    result = subprocess.run([sys.executable, "-m", "lab.cli", "status", "--json", "--file", str(lab3.loaded.path),
                             "--name", lab3.name], capture_output=True, text=True, timeout=60)
    data = json.loads(result.stdout)
    assert data["provider"] == "nspawn"
    assert [n["name"] for n in data["nodes"]] == ["node-1", "node-2", "node-3"]


def test_destroy_works_after_lab_yaml_breaks(image, tmp_path):
    (tmp_path / "lab.yaml").write_text("provider: nspawn\nnodes: {count: 1}\n")
    lab = Lab.open(tmp_path / "lab.yaml")
    lab.up(bootstrap=False)
    (tmp_path / "lab.yaml").write_text("nodes: {count: 0}\n")
    result = subprocess.run([sys.executable, "-m", "lab.cli", "destroy", "--file", str(tmp_path / "lab.yaml")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "from its recorded state" in result.stderr
    assert leftovers(lab.lab_id, lab.lab_dir) == []


@pytest.mark.parametrize("sent, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_during_first_up_rolls_back_everything(image, tmp_path, sent, code):
    """Ctrl-C, or SIGTERM as a CI runner cancelling the job sends it."""
    (tmp_path / "lab.yaml").write_text("name: interrupted\nprovider: nspawn\nnodes:\n  count: 3\n")
    lab_dir = tmp_path / ".lab" / "interrupted"
    up = subprocess.Popen([sys.executable, "-m", "lab.cli", "up", "--file", str(tmp_path / "lab.yaml")],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_until_nodes_start(lab_dir)
    lab_id = json.loads((lab_dir / "state.json").read_text())["lab_id"]
    up.send_signal(sent)
    _, stderr = up.communicate(timeout=120)
    assert up.returncode == code, stderr
    assert "rolling back" in stderr and "Traceback" not in stderr
    assert leftovers(lab_id, lab_dir) == []
