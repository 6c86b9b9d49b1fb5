"""Real VMs: vagrant-libvirt + libvirtd + QEMU (software emulation here), booted from lab's own box.

No KVM works on these machines, so every VM runs under TCG and takes about a
minute to boot; the tests keep to as few boots as cover the path:
- one VM: lab up (vagrant up, adoption, etcd, scheduler), every fault
  primitive, and destroy leaving no domain, volume or network behind;
- three VMs (slow): raft-failover and partition on one lab via `lab test`.

libvirtd is started by the tests when it is not running (lab/testing/hostdaemons.py)
and stopped afterwards. The box is built and added with lab's own commands.
"""

from __future__ import annotations

import contextlib

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lab.testing.hostdaemons import libvirt_problem, libvirtd_running
from lab.core.lab import Lab
from lab.model.spec import Override

PROBLEM = libvirt_problem()
pytestmark = pytest.mark.skipif(PROBLEM is not None, reason=f"libvirt VMs: {PROBLEM}")

URI = "qemu:///system"


def virsh(*args: str) -> str:
    return subprocess.run(["virsh", "-q", "-c", URI, *args], capture_output=True, text=True, timeout=60).stdout


def networks() -> set[str]:
    return set(virsh("net-list", "--all", "--name").split())


def libvirt_leftovers(prefix: str, network: str, networks_before: set[str], lab_dir: Path) -> list[str]:
    """What of a lab could outlive `destroy` in libvirt: its domains, their disks, its networks."""
    found = [f"domain {d}" for d in virsh("list", "--all", "--name").split() if d.startswith(prefix)]
    found += [f"volume {line.split()[0]}" for line in virsh("vol-list", "default").splitlines()
              if line.split() and line.split()[0].startswith(prefix)]
    found += [f"network {n}" for n in networks() - networks_before]
    if network in networks():
        found.append(f"network {network}")
    if lab_dir.exists():
        found.append(f"directory {lab_dir}")
    return found


@pytest.fixture(scope="module")
def libvirtd():
    with libvirtd_running(), default_pool():
        yield


@contextlib.contextmanager
def default_pool():
    """libvirt's `default` storage pool, which a pristine machine lacks until vagrant-libvirt's first
    `vagrant up` defines it; the tests put volumes there before that. Defined here as vagrant-libvirt
    would (a directory pool on /var/lib/libvirt/images), and undefined afterwards if it was made here."""
    if "default" in virsh("pool-list", "--all", "--name").split():
        yield
        return
    Path("/var/lib/libvirt/images").mkdir(parents=True, exist_ok=True)
    for step in (["pool-define-as", "default", "dir", "--target", "/var/lib/libvirt/images"],
                 ["pool-start", "default"]):
        subprocess.run(["virsh", "-q", "-c", URI, *step], check=True, capture_output=True, timeout=60)
    try:
        yield
    finally:
        virsh("pool-destroy", "default")
        virsh("pool-undefine", "default")


@pytest.fixture(scope="module")
def box(libvirtd):
    from lab.images.vagrantbox import add_box, build_box

    built = build_box("labos", "1", "libvirt")
    add_box(built)
    return built


def open_vm_lab(directory: Path, nodes: int, name: str) -> Lab:
    overrides = [Override(("nodes", "count"), nodes, "--nodes"), Override(("provider",), "libvirt", "--provider"),
                 Override(("name",), name, "--name"),
                 Override(("providers", "libvirt", "driver"), "qemu", "--set providers.libvirt.driver")]
    return Lab.open(directory / "lab.yaml", overrides)


def ssh(lab: Lab, node: str, command: str, timeout: float = 60):
    from lab.host.ssh import run

    return run(lab.ssh_endpoints()[node], command, timeout=timeout)


def wait_healthy(lab: Lab, timeout: float = 120) -> list:
    deadline = time.monotonic() + timeout
    rows = []
    while time.monotonic() < deadline:
        rows = lab.etcd_status()
        if rows and all(r.healthy for r in rows) and any(r.leader for r in rows):
            return rows
        time.sleep(1)
    raise AssertionError(f"etcd not healthy in {timeout} s: {rows}")


def test_one_vm_boots_bootstraps_takes_every_fault_and_leaves_nothing(box, tmp_path):
    lab = open_vm_lab(tmp_path, 1, "vm1")
    before = networks()
    context = lab.context("libvirt")
    from lab.providers.vagrant.render import libvirt_network_name, machine_prefix

    prefix, network = machine_prefix(context), libvirt_network_name(context)
    domain = prefix + "node-1"
    # A copy of an earlier build left in the pool (`lab box add` ran while
    # libvirtd was down): `lab up` removes it and keeps the current one.
    stale = "lab-labos-1_vagrant_box_image_0_1_box.img"
    virsh("vol-delete", "--pool", "default", stale)  # a failed earlier run's
    subprocess.run(["virsh", "-q", "-c", URI, "vol-create-as", "default", stale, "1M", "--format", "qcow2"],
                   check=True, capture_output=True)
    progress: list[str] = []
    try:
        with lab.lock("up"):
            lab.up(progress.append)
        assert any("adopted node-1" in line for line in progress), progress
        assert any(f"removed {stale}" in line for line in progress), progress
        from lab.images.vagrantbox import current_libvirt_volume

        pool = virsh("vol-list", "default")
        assert stale not in pool and current_libvirt_volume("lab-labos-1") in pool
        ip = lab.context("libvirt").addresses["node-1"]

        # Reached as root on the private network, host key pinned by adoption.
        assert f"node-1,{ip} ssh-ed25519 " in context.known_hosts.read_text()
        facts = ssh(lab, "node-1", "id -un; hostname; systemctl is-system-running; ip -o -4 addr show").stdout
        assert facts.splitlines()[:2] == ["root", "node-1"]
        assert facts.splitlines()[2] in ("running", "degraded"), facts
        assert f"inet {ip}/24" in facts
        adopted_by_lab(lab, "node-1", ip, progress)
        [row] = wait_healthy(lab)
        assert row.leader and row.endpoint == f"https://{ip}:2379"  # TLS, the default
        client = lab.etcd_client()
        client.put("/lab/test/vm", "kept")
        client.close()

        provider = lab.provider()
        old_boot = ssh(lab, "node-1", "cat /proc/sys/kernel/random/boot_id").stdout.strip()

        started = time.monotonic()
        provider.kill("node-1")
        assert time.monotonic() - started < 5
        deadline = time.monotonic() + 30
        while virsh("domstate", domain).strip() != "shut off" and time.monotonic() < deadline:
            time.sleep(0.2)
        assert virsh("domstate", domain).strip() == "shut off"
        provider.start("node-1")
        wait_healthy(lab)
        client = lab.etcd_client()
        assert client.get("/lab/test/vm") == "kept"  # etcd came back from its data dir
        client.close()

        provider.pause("node-1")
        assert virsh("domstate", domain).strip() == "paused"
        provider.resume("node-1")
        assert virsh("domstate", domain).strip() == "running"

        provider.reboot("node-1")
        new_boot = ssh(lab, "node-1", "cat /proc/sys/kernel/random/boot_id").stdout.strip()
        assert new_boot and new_boot != old_boot
        wait_healthy(lab)
        wait_active(lab, "node-1", "lab-agent")
        a_b_update_and_rollback(lab)
    finally:
        lab_dir = lab.lab_dir
        lab.destroy()
        virsh("vol-delete", "--pool", "default", stale)  # when up failed before removing it
    assert libvirt_leftovers(prefix, network, before, lab_dir) == []


def slots(lab: Lab) -> dict:
    text = ssh(lab, "node-1", "python3 /var/lib/lab/bootslots.py status; . /usr/lib/os-release; "
                              "echo $VERSION_ID; findmnt -n -o SOURCE /usr").stdout.split("\n")
    return {**json.loads(text[0]), "version": text[1], "usr": text[2]}


def a_b_update_and_rollback(lab: Lab) -> None:
    """`lab update` on a VM: version 2's /usr written into partition USR-B, SYSLINUX's boot-once into
    it, the health check, B made the default; then 2-broken (its etcd exits at once) into USR-A,
    whose trial fails the health check and the node boots B again, with the roll halted."""
    from lab.cluster.update import start_roll, status, wait
    from lab.images.build import build_image

    for version in ("2", "2-broken"):  # what the updates stage: VM images (their /usr and kernel)
        build_image("labos", version, flavor="vm")
    assert slots(lab) == {"booted": "a", "default": "a", "once": None, "version": "1",
                          "usr": "/dev/disk/by-partuuid/1abd15c0-02"}
    progress: list[str] = []
    staging_s = start_roll(lab, "2", progress.append)
    assert any("written to slot b and checked" in line for line in progress), progress
    done = wait(lab, "2", progress.append, timeout=600)
    assert not done.halted and done.nodes[0].version == "2", (done, progress)
    wait_healthy(lab)
    assert slots(lab) == {"booted": "b", "default": "b", "once": None, "version": "2",
                          "usr": "/dev/disk/by-partuuid/1abd15c0-03"}

    start_roll(lab, "2-broken", progress.append)
    halted = wait(lab, "2-broken", progress.append, timeout=600)
    assert halted.halted and halted.halted["version"] == "2-broken", (halted, progress)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:  # the node reboots into B after the failed trial of A
        try:
            if slots(lab)["booted"] == "b" and status(lab).nodes[0].state == "idle":
                break
        except Exception:  # noqa: BLE001 - rebooting: SSH or etcd do not answer yet
            pass
        time.sleep(3)
    assert {k: v for k, v in slots(lab).items() if k != "once"} == {
        "booted": "b", "default": "b", "version": "2", "usr": "/dev/disk/by-partuuid/1abd15c0-03"}
    boot = json.loads(ssh(lab, "node-1", "cat /etc/lab/boot.json").stdout)
    assert boot["slot"] == "b" and boot["rolled_back_from"] == "2-broken", boot
    wait_healthy(lab)
    print(f"A/B on a VM: staging {staging_s:.0f} s")


def adopted_by_lab(lab: Lab, node: str, ip: str, progress: list[str]) -> None:
    """Vagrant did nothing in the guest once SSH answered; lab's adoption swapped the keys and set the address,
    and Vagrant itself gets in with the lab's key."""
    from lab.host.vagrant import vagrant_environment

    assert not [line for line in progress if "insecure key detected" in line or "Inserting generated" in line
                or "Configuring and enabling network interfaces" in line], progress
    context = lab.context("libvirt")
    lab_key = context.ssh_key.with_suffix(".pub").read_text().split()[1]
    insecure_rsa = "AAAAB3NzaC1yc2EAAAABIwAAAQEA6NF8iallvQVp22WDkTkyrtvp9eWW6A8YVr"
    authorized = ssh(lab, node, "cat /home/vagrant/.ssh/authorized_keys").stdout
    assert lab_key in authorized and insecure_rsa not in authorized, authorized
    network = ssh(lab, node, "cat /etc/systemd/network/10-lab-private.network; ls /etc/systemd/network").stdout
    assert f"Address={ip}/24" in network and "50-vagrant" not in network, network
    machine_key = context.lab_dir / ".vagrant" / "machines" / node / "libvirt" / "private_key"
    assert machine_key.read_text() == context.ssh_key.read_text()
    result = subprocess.run(["vagrant", "ssh", node, "-c", "hostname"], cwd=context.lab_dir, capture_output=True,
                            text=True, timeout=120, env=vagrant_environment("libvirt"))
    assert result.returncode == 0 and result.stdout.strip() == node, result.stdout + result.stderr


def wait_active(lab: Lab, node: str, unit: str, timeout: float = 90) -> None:
    """The unit runs (after a boot it waits for etcd's readiness, which /health may report first)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ssh(lab, node, f"systemctl is-active {unit}").stdout.strip() == "active":
            return
        time.sleep(1)
    diagnosis = ssh(lab, node, f"systemctl status --no-pager {unit}; ls -l /etc/systemd/system/{unit}.service; "
                               f"journalctl -b -u {unit} -n 20 --no-pager").stdout
    raise AssertionError(f"{unit} not active on {node} after {timeout} s:\n{diagnosis}")


def test_kill_9_during_vagrant_up_then_destroy_leaves_nothing(box, tmp_path):
    """lab and Vagrant die while the domain boots: destroy works from what the state recorded."""
    import os
    import signal

    (tmp_path / "lab.yaml").write_text("name: crashvm\nprovider: libvirt\nnodes:\n  count: 1\n"
                                       "providers:\n  libvirt:\n    driver: qemu\n")
    lab = Lab.open(tmp_path / "lab.yaml")
    from lab.providers.vagrant.render import libvirt_network_name, machine_prefix

    context = lab.context("libvirt")
    prefix, network = machine_prefix(context), libvirt_network_name(context)
    before = networks()
    up = subprocess.Popen([sys.executable, "-m", "lab.cli", "up", "--file", str(tmp_path / "lab.yaml")],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and virsh("domstate", prefix + "node-1").strip() != "running":
            time.sleep(0.5)
        assert virsh("domstate", prefix + "node-1").strip() == "running", "the domain never started"
    finally:
        os.killpg(up.pid, signal.SIGKILL)  # lab and the vagrant it runs, at once
        up.wait()
    lab = Lab.open(tmp_path / "lab.yaml")
    assert lab.created, "the state must survive kill -9"
    recorded = {r["kind"] for r in lab.state.resources}
    assert {"libvirt-domain", "libvirt-volume", "libvirt-network"} <= recorded
    with lab.lock("destroy", wait=10):
        lab.destroy()
    assert libvirt_leftovers(prefix, network, before, lab.lab_dir) == []


def run_cli(args: list[str], cwd: Path, timeout: float, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lab.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_box_rm_vagrant_removes_the_registration_and_the_unused_pool_copy(box, tmp_path):
    """Real `vagrant box add/remove` and a real pool volume, on a box of its own so others' boxes stay."""
    import os

    from lab.images.vagrantbox import BoxFile, add_box, added_boxes

    copy = box.path.with_name(f"rmtest-1-{box.key}-libvirt.box")
    copy.unlink(missing_ok=True)
    os.link(box.path, copy)  # the labos box's bytes under another recipe's name, without copying 700 MiB
    add_box(BoxFile(path=copy, format="libvirt", name="rmtest", version="1", key=box.key,
                    size_bytes=box.size_bytes))
    assert ("lab-rmtest-1", "libvirt") in added_boxes()
    # What vagrant-libvirt's first `vagrant up` would leave in the pool.
    volume = "lab-rmtest-1_vagrant_box_image_0_box.img"
    virsh("vol-delete", "--pool", "default", volume)  # a failed earlier run's
    subprocess.run(["virsh", "-q", "-c", URI, "vol-create-as", "default", volume, "1M", "--format", "qcow2"],
                   check=True, capture_output=True)
    try:
        result = run_cli(["box", "rm", "rmtest", "--vagrant"], tmp_path, timeout=300)

        assert result.returncode == 0, result.stdout + result.stderr
        assert "removed vagrant box lab-rmtest-1 (libvirt)" in result.stdout
        assert f"removed {volume}" in result.stdout and f"removed {copy}" in result.stdout
        assert ("lab-rmtest-1", "libvirt") not in added_boxes()
        assert volume not in virsh("vol-list", "default") and not copy.exists()
        assert box.path.exists() and ("lab-labos-1", "libvirt") in added_boxes()  # the others stay
        again = run_cli(["box", "rm", "rmtest", "--vagrant"], tmp_path, timeout=300)
        assert again.returncode == 2 and "no built image rmtest" in again.stderr
    finally:  # whatever failed, leave no 700 MiB hard link, box or volume behind
        copy.unlink(missing_ok=True)
        subprocess.run(["vagrant", "box", "remove", "--force", "--all", "lab-rmtest-1"], capture_output=True)
        virsh("vol-delete", "--pool", "default", volume)


@pytest.mark.slow
def test_three_vms_on_a_remote_libvirt_host_pass_smoke_raft_failover_and_partition(box, tmp_path):
    """The lab's libvirt is another machine's, reached over SSH: `qemu+ssh://root@127.0.0.1:PORT/system`
    through an sshd this test starts (lab.testing.loopback_sshd). Vagrant and virsh log in with the
    system's ssh, lab through that host as a jump host (SSH, etcd, faults, the update's staging). The
    machine is this one, so the VMs' networks are routable from here too: sshd's log shows that lab's
    SSH and etcd connections went through it; smoke's checks read the node's /etc/lab/node.json, written
    with the agents on VMs (at creation on nspawn). (The rolling-update scenarios on three VMs were run
    by hand: README, "Rolling OS updates"; at the staging's low weight, beside the workload, under
    emulation, they take longer than CI has. The 1-VM test above updates and rolls back a VM.)"""
    from lab.testing.loopback_sshd import loopback_sshd, sshd_problem

    if sshd_problem():
        pytest.skip(sshd_problem())
    before = networks()
    # Raft under software emulation (three emulated CPUs on two host cores):
    # 250/2500 ms timings (bound 5.5 s) and pre-vote. Without pre-vote a
    # follower whose log lagged 15 entries campaigned four times in vain, each
    # time raising the term and restarting the timer of the one follower that
    # could win: about 20 s to a new leader in a partition (CI, 2026-12-01). See
    # README, "VMs".
    with loopback_sshd(tmp_path / "sshd") as sshd:
        env = dict(os.environ, PATH=f"{sshd.ssh_path}{os.pathsep}{os.environ.get('PATH', '')}")
        project = tmp_path / "project"
        project.mkdir()
        args = ["test", "smoke", "raft-failover", "partition", "--provider", "libvirt", "--nodes", "3",
                "--set", "providers.libvirt.driver=qemu", "--set", f"providers.libvirt.uri={sshd.uri()}",
                "--set", "etcd.pre_vote=true", "--set", "etcd.heartbeat_ms=250",
                "--set", "etcd.election_timeout_ms=2500"]
        # No second try: the new-leader verdict allows the rounds Raft may need (the liveness bound).
        result = run_cli(args, project, timeout=1800, env=env)
        assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
        assert f"through libvirt host root@127.0.0.1:{sshd.port}" in result.stdout + result.stderr
        forwarded = sshd.forwarded_ports()
        assert {port for address, port in forwarded if address.startswith("10.")} >= {22, 2379}, forwarded
    runs = sorted((project / ".lab" / "runs").iterdir())
    assert [r.name.split("-lab-")[1] for r in runs] == ["smoke", "raft-failover", "partition"]
    assert json.loads((runs[0] / "result.json").read_text())["ok"]
    for run in runs[1:]:
        data = json.loads((run / "result.json").read_text())
        assert data["ok"] and data["measurements"]["lost_writes"] == 0, data
        assert data["measurements"]["time_to_new_leader_s"]
    leftovers = [d for d in virsh("list", "--all", "--name").split() if d.startswith("lab-")]
    assert leftovers == [] and networks() - before == set()
    assert not (project / ".lab" / "lab").exists()


@pytest.mark.slow
def test_an_arm64_vm_boots_from_a_box_lab_built_and_takes_a_fault(libvirtd, tmp_path):
    """arm64 on this amd64 machine: the box built under qemu-user-static (`lab box build --arch arm64
    --format libvirt`), booted by vagrant-libvirt with qemu-system-aarch64 (software emulation), UEFI
    (edk2) and systemd-boot; lab adopts it, bootstraps etcd, kills and restarts it."""
    from lab.errors import PrerequisiteError
    from lab.images.build import check_foreign_arch
    from lab.images.vagrantbox import add_box, build_box

    try:
        check_foreign_arch("arm64")
    except PrerequisiteError as exc:
        pytest.skip(exc.message)
    started = time.monotonic()
    built = build_box("labos", "1", "libvirt", arch="arm64")
    add_box(built)
    build_s = time.monotonic() - started
    lab = Lab.open(tmp_path / "lab.yaml", [
        Override(("nodes", "count"), 1, "--nodes"), Override(("provider",), "libvirt", "--provider"),
        Override(("name",), "arm", "--name"), Override(("box", "arch"), "arm64", "--set box.arch"),
        Override(("providers", "libvirt", "driver"), "qemu", "--set providers.libvirt.driver")])
    context = lab.context("libvirt")
    from lab.providers.vagrant.render import libvirt_network_name, machine_prefix

    before = networks()
    progress: list[str] = []
    try:
        started = time.monotonic()
        with lab.lock("up"):
            lab.up(progress.append)
        up_s = time.monotonic() - started
        facts = ssh(lab, "node-1", "uname -m; findmnt -n -o SOURCE /usr; cat /proc/cmdline").stdout.split("\n")
        assert facts[0] == "aarch64", facts
        assert facts[1] == "/dev/disk/by-partuuid/1abd15c0-02" and "labos.slot=a" in facts[2], facts
        wait_healthy(lab, timeout=300)
        client = lab.etcd_client(timeout=10)
        client.put("/lab/test/arm64", "kept")
        client.close()
        provider = lab.provider()
        provider.kill("node-1")
        provider.start("node-1")
        wait_healthy(lab, timeout=300)
        client = lab.etcd_client(timeout=10)
        assert client.get("/lab/test/arm64") == "kept"
        client.close()
        print(f"arm64: box built in {build_s:.0f} s, lab up in {up_s:.0f} s")
    finally:
        lab_dir = lab.lab_dir
        lab.destroy()
    assert libvirt_leftovers(machine_prefix(context), libvirt_network_name(context), before, lab_dir) == []


@pytest.mark.slow
def test_a_generic_debian_box_gets_what_lab_needs_installed(libvirtd, tmp_path):
    """A plain Debian box of the user's own (no etcd, python3 or nftables), named as Vagrant boxes from a
    catalog are (owner/name), still becomes a node: `box.vagrant`. Here: boxes/debian built by lab."""
    from lab.images.vagrantbox import build_box, remove_stale_libvirt_volumes

    users_box = "local/debian12"
    subprocess.run(["vagrant", "box", "add", "--force", "--name", users_box,
                    str(build_box("debian", "12", "libvirt").path)], check=True, capture_output=True)
    lab = Lab.open(tmp_path / "lab.yaml", [
        Override(("nodes", "count"), 1, "--nodes"), Override(("provider",), "libvirt", "--provider"),
        Override(("name",), "generic", "--name"), Override(("box", "vagrant"), users_box, "--set box.vagrant"),
        Override(("providers", "libvirt", "driver"), "qemu", "--set providers.libvirt.driver"),
        # Installing docker.io as well takes many minutes under software emulation: the script's Docker
        # line is checked in tests/unit/test_vagrant_parsers.py.
        Override(("box", "docker"), False, "--set box.docker")])
    context = lab.context("libvirt")
    from lab.providers.vagrant.render import libvirt_network_name, machine_prefix

    before = networks()
    progress: list[str] = []
    try:
        with lab.lock("up"):
            lab.up(progress.append)
        installed = [line for line in progress if "installed" in line and "generic box" in line]
        assert installed and all(p in installed[0] for p in ("python3", "nftables", "etcd-server")), progress
        assert ssh(lab, "node-1", ". /etc/os-release; echo $ID").stdout.strip() == "debian"
        [row] = wait_healthy(lab)
        assert row.leader
        wait_active(lab, "node-1", "lab-agent")
    finally:
        lab_dir = lab.lab_dir
        lab.destroy()
        # The box and its pool copy are this test's own: 700 MiB each, a new copy every run otherwise.
        subprocess.run(["vagrant", "box", "remove", "--force", "--all", users_box], capture_output=True)
        remove_stale_libvirt_volumes(users_box)
    assert libvirt_leftovers(machine_prefix(context), libvirt_network_name(context), before, lab_dir) == []
