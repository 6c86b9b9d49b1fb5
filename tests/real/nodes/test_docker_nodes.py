"""Docker on nspawn nodes, for real: the seed's `docker run ubuntu /bin/echo hello world` offline through
the lab registry, in the default user-namespaced nodes and in privileged ones; containers ask the lab's
DNS and nothing leaves the lab network; a node's root gets its cgroup directories, never its limits;
`lab destroy` leaves no registry, DNS, mount, cgroup or process behind.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from lab.core.lab import Lab
from lab.host import ssh
from lab.host.processes import alive
from lab.providers.nspawn import cgroups

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("systemd-nspawn") is None,
                                reason="needs root and systemd-nspawn")

SPEC = """\
name: docker
provider: nspawn
nodes:
  count: 2
  memory: 768
providers:
  nspawn:
    privileged: {privileged}
"""


def open_lab(directory: Path, privileged: bool) -> Lab:
    (directory / "lab.yaml").write_text(SPEC.format(privileged="true" if privileged else "false"))
    lab = Lab.open(directory / "lab.yaml")
    with lab.lock("up"):
        lab.up()
    return lab


def on_node(lab: Lab, node: str, command: str, timeout: float = 120) -> ssh.NodeResult:
    endpoint = lab.provider().ssh_endpoints()[node]
    return ssh.run(endpoint, command, timeout=timeout)


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    lab = open_lab(tmp_path_factory.mktemp("docker"), privileged=False)
    yield lab
    with lab.lock("destroy"):
        lab.destroy()


def test_docker_is_socket_activated_an_idle_node_runs_no_daemon(lab):
    result = on_node(lab, "node-2", "systemctl is-active docker.socket; systemctl is-active docker.service containerd.service")
    assert result.stdout.split() == ["active", "inactive", "inactive"]


def test_the_seeds_docker_run_ubuntu_prints_hello_world_offline(lab):
    result = on_node(lab, "node-1", "docker run ubuntu /bin/echo hello world")
    assert result.exit_status == 0, result.stdout + result.stderr
    assert result.stdout.strip().splitlines()[-1] == "hello world"
    # Pulled through the lab registry on the host address, not from anywhere else.
    config = json.loads(on_node(lab, "node-1", "cat /etc/docker/daemon.json").stdout)
    host = lab.provider().context.host_address
    assert config["registry-mirrors"] == [f"http://{host}:5000"]
    assert config["init"] is True


def test_containers_ask_the_lab_dns_it_answers_node_names_and_refuses_the_rest(lab):
    host = lab.provider().context.host_address
    resolv = on_node(lab, "node-1", "docker run --rm busybox cat /etc/resolv.conf").stdout
    assert [line.split()[1] for line in resolv.splitlines() if line.startswith("nameserver")] == [host]
    peer = on_node(lab, "node-1", "docker run --rm busybox nslookup node-2")
    assert lab.state["addresses"]["node-2"] in peer.stdout
    outside = on_node(lab, "node-1", "docker run --rm busybox nslookup example.com")
    assert outside.exit_status != 0
    assert "REFUSED" in (outside.stdout + outside.stderr).upper()


def test_nothing_leaves_the_lab_network_during_a_container_workload(lab):
    """Every packet from a lab address that a bridge carries is counted unless it goes to a lab address."""
    subnet = lab.state["subnet"]
    table = f"lab_egress_{lab.lab_id}"
    # The first rule of each chain counts what leaves the lab; the second, what stays in it (so a chain
    # that never saw the nodes' traffic cannot pass as "nothing left").
    rules = (f"table bridge {table} {{\n"
             f"  chain count {{ type filter hook input priority 0; policy accept;\n"
             f"    ether type ip ip saddr {subnet} ip daddr != {subnet} counter\n"
             f"    ether type ip ip saddr {subnet} ip daddr {subnet} counter\n  }}\n"
             f"  chain forward {{ type filter hook forward priority 0; policy accept;\n"
             f"    ether type ip ip saddr {subnet} ip daddr != {subnet} counter\n"
             f"    ether type ip ip saddr {subnet} ip daddr {subnet} counter\n  }}\n}}\n")
    subprocess.run(["nft", "-f", "-"], input=rules, text=True, check=True)
    try:
        # Pulls, runs, and lookups of lab and public names: what a container workload does.
        workload = ("docker pull debian >/dev/null && docker run --rm debian sh -c 'echo hi; getent hosts node-1' "
                    "&& docker run --rm busybox nslookup example.com; true")
        for node in ("node-1", "node-2"):
            on_node(lab, node, workload)
        listing = subprocess.run(["nft", "-j", "list", "table", "bridge", table], capture_output=True, text=True,
                                 check=True).stdout
        counters = [item["counter"]["packets"] for entry in json.loads(listing)["nftables"]
                    for item in entry.get("rule", {}).get("expr", []) if "counter" in item]
        left, stayed = counters[0::2], counters[1::2]
        assert sum(stayed) > 0, counters  # the chains saw the workload's traffic (pulls, DNS)
        assert sum(left) == 0, counters
    finally:
        subprocess.run(["nft", "delete", "table", "bridge", table], check=False)


def test_a_nodes_root_gets_its_cgroup_directories_never_its_limits(lab):
    provider = lab.provider()
    owner = (provider.node_dir("node-1") / "merged").stat().st_uid
    assert owner != 0  # a user-namespaced node
    memory = cgroups.controller_cgroup(provider.cgroups("node-1"), "memory")
    assert memory.stat().st_uid == owner
    assert (memory / "memory.limit_in_bytes").stat().st_uid == 0
    raised = on_node(lab, "node-1", "echo -1 > /sys/fs/cgroup/memory/memory.limit_in_bytes")
    assert raised.exit_status != 0
    assert (memory / "memory.limit_in_bytes").read_text().strip() == str(768 * 1024 * 1024)
    # Docker's own directory is the node's on disk, as its upper layer is: never the host root's.
    assert provider.docker_dir("node-1").stat().st_uid == owner


def test_containers_survive_a_node_reboot_and_docker_comes_back_on_first_use(lab):
    lab.provider().reboot("node-2")
    result = on_node(lab, "node-2", "docker run --rm busybox echo back")
    assert result.stdout.strip().splitlines()[-1] == "back"


def test_privileged_nodes_run_docker_too(tmp_path):
    lab = open_lab(tmp_path, privileged=True)
    try:
        result = on_node(lab, "node-1", "docker run --rm busybox echo privileged")
        assert result.stdout.strip().splitlines()[-1] == "privileged", result.stdout + result.stderr
    finally:
        with lab.lock("destroy"):
            lab.destroy()


def test_destroy_leaves_no_registry_dns_mount_cgroup_or_process(tmp_path):
    lab = open_lab(tmp_path, privileged=False)
    on_node(lab, "node-1", "docker run --rm busybox true")
    services = [(res["pid"], res["start"]) for res in lab.state.find("service")]
    assert len(services) == 2
    machine_cgroups = [c for n in ("node-1", "node-2") for c in lab.provider().cgroups(n)]
    with lab.lock("destroy"):
        lab.destroy()
    assert not any(alive(pid, start) for pid, start in services)
    assert not any(c.exists() for c in machine_cgroups)
    assert str(tmp_path) not in Path("/proc/self/mountinfo").read_text()
    assert not (tmp_path / ".lab").exists()
