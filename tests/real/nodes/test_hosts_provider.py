"""provider: hosts on real machines: plain Debian hosts (nspawn nodes of another lab, lab.testing.plainhosts)
adopted over SSH through the real CLI.

`lab up` installs what the hosts lack from their own apt sources (one host's
login is a user with password-less sudo, the others' root; one host's sshd
answers on port 2222) and
bootstraps etcd and the agents; raft-failover and partition pass unchanged;
pause, kill, start and a real reboot act on the hosts; a host another lab
holds and a host that does not answer are refused before anything changes;
`lab destroy` leaves every host as it was (same packages, same root keys,
nothing of lab's on disk, etcd gone). Hosts this machine may not connect to are
reached through a jump host (ProxyJump): everything, scenarios included.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

from lab.host.ssh import run as ssh_run

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("systemd-nspawn") is None,
                                reason="needs root and systemd-nspawn")

NODES = ["node-1", "node-2", "node-3"]
# What a host looks like to its owner: lab must leave all of it as it found it.
BASELINE = ("dpkg-query -W -f '${Package} ${Version}\\n' | sort | sha256sum; cat /root/.ssh/authorized_keys; "
            "ls -d /etc/lab /var/lib/lab /etc/etcd /etc/default/etcd* /var/lib/etcd /etc/systemd/system/lab-* "
            "/etc/systemd/system/etcd.service.d 2>/dev/null; true")


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    from lab.testing.plainhosts import plain_debian_hosts

    with plain_debian_hosts(tmp_path_factory.mktemp("plainhosts"), bastions=1) as made:
        yield made


def lab(project: Path, *args: str, timeout: float = 900) -> tuple[int, str]:
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("LAB_")}, "COLUMNS": "200"}
    result = subprocess.run([sys.executable, "-m", "lab.cli", *args], cwd=project, env=env, capture_output=True,
                            text=True, timeout=timeout)
    output = result.stdout + result.stderr
    assert "Traceback" not in output, output
    return result.returncode, output


def statuses(project: Path) -> dict[str, dict]:
    code, output = lab(project, "status", "--json")
    assert code == 0, output
    return {n["name"]: n for n in json.loads(output[output.index("{"):])["nodes"]}


def test_hosts_become_nodes_take_every_fault_and_are_left_as_they_were(hosts, tmp_path):
    before = {node: hosts.run(node, BASELINE) for node in NODES}
    project = tmp_path / "hosts"
    project.mkdir()
    # Two of the three hosts first; the third (whose login is a user with sudo, not root) joins through
    # `lab node add`.
    (project / "lab.yaml").write_text(hosts.lab_yaml("onhosts", nodes={"count": 2}))

    started = time.monotonic()
    code, output = lab(project, "up")
    assert code == 0, output
    print(f"lab up on 2 plain Debian hosts: {time.monotonic() - started:.1f} s")
    code, added = lab(project, "node", "add")
    assert code == 0, added
    output += added
    for node in NODES:
        assert f"{node}: installed python3, nftables, etcd-server, etcd-client from its own apt sources" in output
    assert {n: s["state"] for n, s in statuses(project).items()} == {n: "running" for n in NODES}
    assert statuses(project)["node-3"]["ip"] == hosts.addresses["node-3"]
    # Who each node is, for checks and scenarios, on every provider (smoke's and first-look's read it).
    info = json.loads(hosts.run("node-3", "cat /etc/lab/node.json"))
    assert info["node"] == "node-3" and info["ip"] == hosts.addresses["node-3"] and set(info["peers"]) == set(NODES)
    assert hosts.proxy.refused == []
    # no fourth host: said before anything is recorded, and the lab goes on as it was
    code, output = lab(project, "node", "add")
    assert code != 0 and "no host left for node-4" in output, output
    assert list(statuses(project)) == NODES

    # halt stops lab's services on every host (the machines run on); up starts them again
    code, output = lab(project, "halt")
    assert code == 0, output
    assert {n: s["state"] for n, s in statuses(project).items()} == {n: "stopped" for n in NODES}
    code, output = lab(project, "up")
    assert code == 0, output
    assert {n: s["state"] for n, s in statuses(project).items()} == {n: "running" for n in NODES}

    # A host this lab holds is refused by another lab, and nothing of that one touches it.
    other = tmp_path / "other"
    other.mkdir()
    (other / "lab.yaml").write_text(hosts.lab_yaml("other", nodes={"count": 1}))
    code, output = lab(other, "up")
    assert code != 0 and "belongs to another lab" in output and hosts.addresses["node-1"] in output, output
    assert not (other / ".lab" / "other").exists()

    for scenario in ("raft-failover", "partition"):
        code, output = lab(project, "scenario", scenario)
        assert code == 0, output

    code, output = lab(project, "fault", "pause", "node-1")
    assert code == 0, output
    assert statuses(project)["node-1"]["state"] == "paused"
    # etcd is stopped by SIGSTOP; the host itself runs on (it answers this)
    assert "T (stopped)" in hosts.run("node-1", "grep State: /proc/$(systemctl show -p MainPID --value etcd)/status")
    code, output = lab(project, "fault", "resume", "node-1")
    assert code == 0, output

    code, output = lab(project, "fault", "kill", "node-2")
    assert code == 0, output
    assert statuses(project)["node-2"]["state"] == "stopped"
    assert hosts.run("node-2", "systemctl is-active etcd lab-agent; true").split() != ["active", "active"]
    code, output = lab(project, "fault", "start", "node-2")
    assert code == 0, output

    boot = statuses(project)["node-3"]["boot_id"]
    code, output = lab(project, "fault", "reboot", "node-3")
    assert code == 0, output
    after_reboot = statuses(project)["node-3"]
    assert after_reboot["state"] == "running" and after_reboot["boot_id"] != boot
    wait_healthy(project)

    # A host that does not answer keeps the lab (its record) for another try; the others are cleaned.
    # `--forget-unreachable` gives up on it; here the test then cleans it as its owner would.
    state = json.loads((project / ".lab" / "onhosts" / "state.json").read_text())
    record = next(r for r in state["resources"] if r["kind"] == "host" and r["id"] == "node-2")
    public_key = (project / ".lab" / "onhosts" / "ssh" / "id_ed25519.pub").read_text().strip()
    outer = hosts.lab.provider()
    outer.pause("node-2")
    try:
        code, output = lab(project, "destroy")
        assert code != 0 and "could not clean node-2" in output and "--forget-unreachable" in output, output
        assert (project / ".lab" / "onhosts" / "state.json").exists()
        code, output = lab(project, "destroy", "--forget-unreachable")
        assert code == 0 and "node-2: forgot" in output and "what lab put there stays" in output, output
    finally:
        outer.resume("node-2")
    from lab.providers.hosts import cleanup_script

    assert "lab-cleaned" in hosts.run("node-2", cleanup_script(public_key, record["installed"], record["preexisting"],
                                                               record["etcd_was_enabled"]), timeout=300)
    assert {node: hosts.run(node, BASELINE) for node in NODES} == before
    for node in NODES:
        assert hosts.run(node, "systemctl is-active etcd; true").strip() in ("inactive", "unknown")
        assert hosts.run(node, "command -v nft etcd python3; true").strip() == ""


def wait_healthy(project: Path, timeout: float = 60) -> None:
    from lab.core.lab import Lab

    deadline = time.monotonic() + timeout
    rows = []
    while time.monotonic() < deadline:
        rows = Lab.open(project / "lab.yaml").etcd_status()
        if all(row.healthy for row in rows) and any(row.leader for row in rows):
            return
        time.sleep(0.5)
    raise AssertionError(f"etcd not healthy after {timeout} s: {rows}")


def test_a_host_that_does_not_answer_stops_lab_up_before_any_host_is_changed(hosts, tmp_path):
    before = hosts.run("node-1", BASELINE)
    silent = hosts.addresses["node-1"].rsplit(".", 1)[0] + ".250"  # on the hosts' network, nobody there
    project = tmp_path / "silent"
    project.mkdir()
    (project / "lab.yaml").write_text(hosts.lab_yaml("silent", extra=[{"address": silent, "key": str(hosts.key)}]))
    code, output = lab(project, "up")
    assert code != 0, output
    assert "these hosts cannot become nodes" in output and f"root@{silent}:22" in output, output
    assert "nothing was changed on any host" in output, output
    assert hosts.run("node-1", BASELINE) == before
    assert not (project / ".lab" / "silent").exists()


@contextmanager
def new_connections_refused(addresses: list[str]):
    """This machine may not open a connection to `addresses` (replies to theirs still go out): a network
    only a jump host reaches. Yields a function counting the connections refused so far."""
    table = "labtest_jump"
    subprocess.run(["nft", "-f", "-"], check=True, text=True, input=f"""
table inet {table} {{
  chain out {{
    type filter hook output priority 0;
    meta l4proto tcp ip daddr {{ {", ".join(addresses)} }} ct state new counter reject with tcp reset
  }}
}}""")

    def refused() -> int:
        rules = json.loads(subprocess.run(["nft", "-j", "list", "table", "inet", table], check=True,
                                          capture_output=True, text=True).stdout)["nftables"]
        return sum(item["counter"]["packets"] for entry in rules if "rule" in entry
                   for item in entry["rule"]["expr"] if "counter" in item)

    try:
        yield refused
    finally:
        subprocess.run(["nft", "delete", "table", "inet", table], check=False)


def test_hosts_behind_a_jump_host_are_reached_only_through_it(hosts, tmp_path):
    # Three hosts (raft-failover's quorum) this machine may not connect to; a fourth machine, not a
    # node, is the bastion.
    (bastion, address), = hosts.bastions.items()
    on_bastion = hosts.lab.ssh_endpoints()[bastion]
    before = {node: hosts.run(node, BASELINE) for node in NODES}
    bastion_before = ssh_run(on_bastion, BASELINE).stdout
    spec = yaml.safe_load(hosts.lab_yaml("jumped"))
    spec["providers"]["hosts"]["jump"] = {"address": address, "key": str(hosts.key)}
    project = tmp_path / "jumped"
    project.mkdir()
    (project / "lab.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    with new_connections_refused([hosts.addresses[n] for n in NODES]) as refused:
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((hosts.addresses["node-1"], 22), timeout=5)
        assert refused() == 1

        code, output = lab(project, "up")
        assert code == 0, output
        assert f"through jump host root@{address}:22, its key " in output, output
        assert {n: s["state"] for n, s in statuses(project).items()} == {n: "running" for n in NODES}
        # OpenSSH's way (lab ssh, testinfra): ProxyJump in the lab's ssh_config
        code, output = lab(project, "ssh", "node-2", "--", "cat", "/etc/hostname")
        assert code == 0, output
        # etcd, the workload, the faults and testinfra's checks, all through the jump
        code, output = lab(project, "scenario", "raft-failover")
        assert code == 0, output
        code, output = lab(project, "etcdctl", "endpoint", "status")
        assert code != 0 and "behind the jump host" in output and "lab ssh node-1 -- etcdctl" in output, output
        code, output = lab(project, "destroy")
        assert code == 0, output
        assert refused() == 1, "lab tried a host directly"
    assert {node: hosts.run(node, BASELINE) for node in NODES} == before
    assert ssh_run(on_bastion, BASELINE).stdout == bastion_before  # lab changes nothing on the jump host
