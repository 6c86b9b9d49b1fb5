"""etcd members and workers on real nspawn nodes: a 5-node lab with `etcd.members: 3`.

node-1..3 are members; node-4 and node-5 are workers whose etcd.service is
etcd's gateway on 127.0.0.1:2379, through which their agents register (TLS,
the default, passes through it). A worker is added and removed, a member
is added (the workers' gateways follow) and removed, a unit on a killed
worker moves, and raft-failover passes on the lab.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from lab.core.lab import Lab
from lab.node import layout

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("systemd-nspawn") is None,
                                reason="needs root and systemd-nspawn")

MEMBERS = ["node-1", "node-2", "node-3"]
WORKERS = ["node-4", "node-5"]
LAB_YAML = """\
provider: nspawn
nodes:
  list:
    - {name: node-1}
    - {name: node-2}
    - {name: node-3}
    - {name: node-4, metadata: {role: worker}}
    - {name: node-5, metadata: {role: worker}}
etcd:
  members: 3
"""


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    from lab.images.build import build_image

    build_image("labos", "1")
    directory = tmp_path_factory.mktemp("workers")
    (directory / "lab.yaml").write_text(LAB_YAML)
    lab = Lab.open(directory / "lab.yaml")
    try:
        messages: list[str] = []
        started = time.monotonic()
        lab.up(messages.append)
        print(f"lab up, 5 nodes (3 members): {time.monotonic() - started:.1f} s")
        assert any("2 worker(s) reach them through a local gateway" in m for m in messages), messages
        yield lab
    finally:
        lab.destroy()


def cli(lab: Lab, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lab.cli", *args], cwd=lab.loaded.project_dir, capture_output=True,
                          text=True, timeout=timeout)


def on_node(lab: Lab, node: str, command: str):
    from lab.host.ssh import run

    return run(lab.ssh_endpoints()[node], command, timeout=30)


def etcdctl_on(lab: Lab, node: str, args: str) -> str:
    """etcdctl on the node against 127.0.0.1:2379: its member, or on a worker its gateway."""
    pki = layout.NODE_PKI_DIR
    result = on_node(lab, node, f"ETCDCTL_API=3 etcdctl --endpoints=https://127.0.0.1:2379 --cacert={pki}/ca.crt "
                                f"--cert={pki}/node.crt --key={pki}/node.key {args}")
    assert result.ok, result.stdout + result.stderr
    return result.stdout.strip()


def registered(lab: Lab) -> set[str]:
    from lab.cluster.units import machines

    return {m.name for m in machines(lab.etcd_client())}


def wait_for(what: str, check, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            found = check()
        except Exception:  # noqa: BLE001 - a member electing a leader: look again
            found = None
        if found:
            return found
        time.sleep(0.3)
    raise AssertionError(f"{what}: not within {timeout:.0f} s")


def test_three_members_are_healthy_and_the_workers_are_not_members(lab):
    assert lab.roles() == {**{n: "member" for n in MEMBERS}, **{n: "worker" for n in WORKERS}}
    assert lab.state["etcd"]["members"] == MEMBERS
    rows = lab.etcd_status()
    assert [r.node for r in rows] == MEMBERS and all(r.healthy for r in rows) and sum(r.leader for r in rows) == 1
    assert sorted(m["name"] for m in lab.etcd_client().members()) == MEMBERS
    if shutil.which("etcdctl"):
        listed = subprocess.run(["etcdctl", "member", "list"], env={**os.environ, **lab.etcdctl_env()},
                                capture_output=True, text=True, timeout=30)
        assert listed.returncode == 0 and len(listed.stdout.strip().splitlines()) == 3, listed.stdout + listed.stderr
    for worker in WORKERS:
        # Through the gateway, a worker sees the same three members, and no data of its own.
        assert len(etcdctl_on(lab, worker, "member list").splitlines()) == 3
        assert "gateway start" in on_node(lab, worker, "systemctl show -p ExecStart --value etcd").stdout
        assert not on_node(lab, worker, "test -e /var/lib/etcd/lab").ok


def test_status_shows_each_nodes_role(lab):
    shown = cli(lab, "status", "--json")
    assert shown.returncode == 0, shown.stderr
    data = json.loads(shown.stdout)
    assert {n["name"]: n["role"] for n in data["nodes"]} == lab.roles()
    assert [m["node"] for m in data["etcd"]] == MEMBERS
    table = cli(lab, "status")
    assert "ETCD" in table.stdout and "worker" in table.stdout, table.stdout


def test_workers_agents_register_through_their_local_gateway(lab):
    assert registered(lab) == set(MEMBERS + WORKERS)
    for worker in WORKERS:
        config = json.loads(on_node(lab, worker, f"cat {layout.AGENT_CONFIG}").stdout)
        assert config["endpoints"] == ["https://127.0.0.1:2379"] and config["tls"]
        # The agent's connection goes to the gateway, and the gateway's to a member.
        sockets = on_node(lab, worker, "ss -Htnp state established").stdout
        assert any("127.0.0.1:2379" in line and "python3" in line for line in sockets.splitlines()), sockets
        member_ips = {lab.context("nspawn").addresses[m] for m in MEMBERS}
        assert any(f"{ip}:2379" in line and '"etcd"' in line for line in sockets.splitlines() for ip in member_ips), \
            sockets
    # A write on a worker is read through the members, and the other way round.
    etcdctl_on(lab, "node-4", "put /lab/test/from-worker written-on-node-4")
    assert lab.etcd_client().get("/lab/test/from-worker") == "written-on-node-4"
    lab.etcd_client().put("/lab/test/from-host", "read-on-node-5")
    assert etcdctl_on(lab, "node-5", "get --print-value-only /lab/test/from-host") == "read-on-node-5"


def test_a_unit_on_a_killed_worker_moves_to_the_other_worker(lab):
    from lab.cluster.units import destroy, list_units, set_desired

    path = lab.loaded.project_dir / "on-worker.service"
    path.write_text('[Unit]\nDescription=runs on a worker\n\n[Service]\nExecStart=/bin/sh -c "while true; do '
                    'sleep 1; done"\n\n[X-Fleet]\nMachineMetadata=role=worker\n')
    set_desired(lab.etcd_client(), [str(path)], "launched")

    def running(avoid: str | None = None):
        row = next((r for r in list_units(lab.etcd_client()) if r.name == "on-worker.service"), None)
        ok = row and row.active == "active" and len(row.machines) == 1 and row.machines[0] != avoid
        return row.machines[0] if ok else None

    provider = lab.provider()
    try:
        first = wait_for("on-worker.service active on a worker", running)
        assert first in WORKERS
        provider.kill(first)
        moved = wait_for(f"on-worker.service moved off the killed {first}", lambda: running(avoid=first))
        assert moved in WORKERS and moved != first
        provider.start(first)
        # Back up, its agent registers again through its gateway.
        wait_for(f"{first}'s agent registered again", lambda: first in registered(lab))
    finally:
        destroy(lab.etcd_client(), ["on-worker.service"])
    assert all(r.healthy for r in lab.etcd_status())


def test_a_worker_is_added_and_removed_and_the_members_stay_three(lab):
    added = cli(lab, "node", "add", "--role", "worker")
    assert added.returncode == 0, added.stdout + added.stderr
    assert "node-6 added as an etcd worker" in added.stdout
    fresh = Lab.open(lab.loaded.path)  # the CLI changed the state on disk
    assert fresh.roles()["node-6"] == "worker" and fresh.state["etcd"]["members"] == MEMBERS
    assert sorted(m["name"] for m in fresh.etcd_client().members()) == MEMBERS
    assert "node-6" in registered(fresh)
    assert etcdctl_on(fresh, "node-6", "get --print-value-only /lab/test/from-host") == "read-on-node-5"
    removed = cli(lab, "node", "remove", "node-6")
    assert removed.returncode == 0, removed.stdout + removed.stderr
    fresh = Lab.open(lab.loaded.path)
    assert "node-6" not in fresh.state["nodes"] and fresh.state["etcd"]["members"] == MEMBERS
    wait_for("node-6's machine gone (its lease expired)", lambda: "node-6" not in registered(fresh))
    assert all(r.healthy for r in fresh.etcd_status())


def test_a_member_added_and_removed_is_followed_by_the_workers_gateways(lab):
    from lab.cluster.etcd_bootstrap import ETCD_ENV_FILE

    fresh = Lab.open(lab.loaded.path)
    new = fresh.node_add(role="member")
    assert new == "node-6"
    fresh = Lab.open(lab.loaded.path)
    ip = fresh.context("nspawn").addresses["node-6"]
    assert fresh.state["etcd"]["members"] == MEMBERS + ["node-6"]
    assert [r.node for r in fresh.etcd_status()] == MEMBERS + ["node-6"]
    for worker in WORKERS:
        assert f"{ip}:2379" in on_node(fresh, worker, f"cat {ETCD_ENV_FILE}").stdout
    fresh.node_remove("node-6")
    fresh = Lab.open(lab.loaded.path)
    assert fresh.state["etcd"]["members"] == MEMBERS
    assert sorted(m["name"] for m in fresh.etcd_client().members()) == MEMBERS
    for worker in WORKERS:
        assert f"{ip}:2379" not in on_node(fresh, worker, f"cat {ETCD_ENV_FILE}").stdout
    wait_for("every worker registered after its gateway restarted", lambda: set(WORKERS) <= registered(fresh))


WORKER_LOSS = """\
description: A worker loses power; its unit moves to the other worker and no etcd member notices.
steps:
  - unit: {start: on-worker.service, within: 30}
  - fault: kill node-of:on-worker.service
  # Until the dead worker's lease runs out its unit still shows there: wait until it runs elsewhere.
  - run: {target: "node-of:on-worker.service", command: systemctl is-active on-worker.service, within: 30,
          timeout: 5}
  - fault: start workers
  - wait-until: healthy
  - unit: {stop: on-worker.service, within: 15}
expect:
  units_moved: true
  quorum: true
  max_down: 0
"""


def test_a_scenario_kills_a_worker_and_its_unit_moves_while_etcd_stays_whole(lab):
    directory = lab.loaded.project_dir / "scenarios" / "worker-loss"
    directory.mkdir(parents=True)
    (directory / "scenario.yaml").write_text(WORKER_LOSS)
    (directory / "on-worker.service").write_text(
        '[Unit]\nDescription=runs on a worker\n\n[Service]\nExecStart=/bin/sh -c "while true; do sleep 1; done"'
        "\n\n[X-Fleet]\nMachineMetadata=role=worker\n")
    result = cli(lab, "scenario", "run", "worker-loss", "--keep", timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run = sorted((lab.loaded.project_dir / ".lab" / "runs").iterdir())[-1]
    data = json.loads((run / "result.json").read_text())
    assert data["ok"], data
    killed = next(f for f in data["faults"] if f["action"] == "kill")["targets"]
    assert len(killed) == 1 and killed[0] in WORKERS
    moved_to = next(s for s in data["steps"] if s["step"].startswith("run on"))["measurements"]["nodes"]
    assert moved_to != killed and moved_to[0] in WORKERS
    assert data["measurements"]["max_members_down"] == 0


def test_raft_failover_passes_on_the_lab(lab):
    result = cli(lab, "scenario", "run", "raft-failover", "--keep", timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run = sorted((lab.loaded.project_dir / ".lab" / "runs").iterdir())[-1]
    data = json.loads((run / "result.json").read_text())
    assert data["ok"] and data["measurements"]["lost_writes"] == 0, data
    leaders = [c["leader"] for c in data["leader_changes"]]
    assert leaders and set(leaders) <= set(MEMBERS)
    # The checks ran on every node, the workers included (their etcd is the gateway).
    for node in MEMBERS + WORKERS:
        assert (run / "nodes" / node / "etcd.log").exists()
    print(f"raft-failover on 3 members + 2 workers: time to new leader {data['measurements']['time_to_new_leader_s']}")
