"""The scheduler on a real 3-node lab: placement, global units, conflicts, failover, journal.

Nodes carry metadata (node-1 and node-2: role=web, node-3: role=db). Units are
real systemd units started by the agents on the nodes.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from lab.core.lab import Lab
from lab.testing.bounds import unit_move_seconds

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("systemd-nspawn") is None,
                                reason="needs root and systemd-nspawn")

LOOP = '/bin/sh -c "while true; do echo tick-%n; sleep 1; done"'


def unit_text(fleet: str = "") -> str:
    return (f"[Unit]\nDescription=test unit\n\n[Service]\nExecStart={LOOP}\n"
            + (f"\n[X-Fleet]\n{fleet}\n" if fleet else ""))


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    from lab.images.build import build_image

    build_image("labos", "1")
    directory = tmp_path_factory.mktemp("sched")
    (directory / "lab.yaml").write_text(
        "provider: nspawn\nnodes:\n  list:\n"
        "    - {name: node-1, metadata: {role: web}}\n"
        "    - {name: node-2, metadata: {role: web}}\n"
        "    - {name: node-3, metadata: {role: db}}\n")
    lab = Lab.open(directory / "lab.yaml")
    lab.up()
    try:
        yield lab
    finally:
        lab.destroy()


def start(lab: Lab, name: str, text: str) -> None:
    from lab.cluster.units import set_desired

    path = lab.lab_dir.parent.parent / name
    path.write_text(text)
    set_desired(lab.etcd_client(), [str(path)], "launched")


def polled(call):
    """One poll of etcd while a fault may be electing a leader: a failed read is just 'not yet'."""
    from lab.cluster.etcdclient import EtcdError

    try:
        return call()
    except EtcdError:
        return None


def wait_running(lab: Lab, name: str, timeout: float = 20, count: int = 1, avoid: str | None = None):
    from lab.cluster.units import list_units

    deadline = time.monotonic() + timeout
    row = None
    while time.monotonic() < deadline:
        rows = polled(lambda: list_units(lab.etcd_client())) or []
        row = next((r for r in rows if r.name == name), row)
        if row and row.active == "active" and len(row.machines) == count and avoid not in row.machines:
            return row
        time.sleep(0.2)
    from lab.host.ssh import run_many
    from lab.cluster.units import machines

    registered = polled(lambda: [m.name for m in machines(lab.etcd_client())])
    agents = run_many(list(lab.ssh_endpoints().values()),
                      "systemctl is-active lab-agent; journalctl -u lab-agent -n 15 --no-pager -o cat")
    raise AssertionError(f"{name} not running as expected within {timeout} s: {row}\n"
                         f"registered machines: {registered}\n"
                         + "\n".join(f"--- {r.node}:\n{r.stdout}{r.stderr}" for r in agents))


def destroy_units(lab: Lab, *names: str) -> None:
    from lab.cluster.units import destroy

    destroy(lab.etcd_client(), list(names))


def test_machines_register_with_metadata_and_one_engine(lab):
    from lab.cluster.units import machines

    rows = machines(lab.etcd_client())
    assert [r.name for r in rows] == ["node-1", "node-2", "node-3"]
    assert [r.metadata.get("role") for r in rows] == ["web", "web", "db"]
    assert sum(r.engine for r in rows) == 1


def test_seed_hello_example_runs_and_journal_follows_live(lab):
    # The seed's unit as written (it runs ubuntu in Docker, pulled through the lab registry), shipped
    # with the first-look scenario.
    seed = Path(__file__).resolve().parents[3] / "scenarios" / "first-look" / "hello.service"
    start(lab, "hello.service", seed.read_text())
    row = wait_running(lab, "hello.service")
    follow = subprocess.Popen([sys.executable, "-m", "lab.cli", "unit", "journal", "hello.service", "-f",
                               "--file", str(lab.loaded.path)], stdout=subprocess.PIPE, text=True)
    # 30 s: the first start pulls ubuntu into the node's Docker. The timer ends a follow that
    # prints nothing, so readline() sees the end instead of blocking.
    stopper = threading.Timer(30, follow.terminate)
    stopper.start()
    try:
        lines = []
        while len([l for l in lines if "Hello World" in l]) < 4 and (line := follow.stdout.readline()):
            lines.append(line)
    finally:
        stopper.cancel()
        follow.terminate()
        follow.wait(timeout=10)
    assert len([l for l in lines if "Hello World" in l]) >= 4, lines
    assert row.machines[0] in lines[-1]
    destroy_units(lab, "hello.service")


def test_machine_metadata_places_on_matching_machine(lab):
    start(lab, "db.service", unit_text("MachineMetadata=role=db"))
    assert wait_running(lab, "db.service").machines == ["node-3"]
    destroy_units(lab, "db.service")


def test_machine_id_and_machine_of(lab):
    from lab.cluster.units import machines

    node2 = next(m for m in machines(lab.etcd_client()) if m.name == "node-2")
    start(lab, "pinned.service", unit_text(f"MachineID={node2.id}"))
    start(lab, "sidekick.service", unit_text("MachineOf=pinned.service"))
    assert wait_running(lab, "pinned.service").machines == ["node-2"]
    assert wait_running(lab, "sidekick.service").machines == ["node-2"]
    destroy_units(lab, "pinned.service", "sidekick.service")


def test_global_unit_runs_on_every_matching_machine(lab):
    start(lab, "everywhere.service", unit_text("Global=true"))
    assert wait_running(lab, "everywhere.service", count=3).machines == ["node-1", "node-2", "node-3"]
    start(lab, "webonly.service", unit_text("Global=true\nMachineMetadata=role=web"))
    assert wait_running(lab, "webonly.service", count=2).machines == ["node-1", "node-2"]
    destroy_units(lab, "everywhere.service", "webonly.service")


def test_conflicts_spread_units_and_unsatisfiable_ones_stay_pending_with_a_reason(lab):
    from lab.cluster.units import list_units

    for i in range(1, 4):
        start(lab, f"web{i}.service", unit_text("Conflicts=web*.service"))
    placed = {wait_running(lab, f"web{i}.service").machines[0] for i in range(1, 4)}
    assert placed == {"node-1", "node-2", "node-3"}
    start(lab, "web4.service", unit_text("Conflicts=web*.service"))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        row = next(r for r in list_units(lab.etcd_client()) if r.name == "web4.service")
        if row.reason:
            break
        time.sleep(0.2)
    assert "Conflicts" in row.reason and not row.machines
    destroy_units(lab, *(f"web{i}.service" for i in range(1, 5)))


def test_unit_moves_when_its_machine_dies(lab):
    provider = lab.provider()
    start(lab, "mover.service", unit_text())
    first = wait_running(lab, "mover.service").machines[0]
    # Typically the lease TTL (5 s) and a second of agent rounds; the bound also allows for the
    # killed node having led etcd (an election, then every lease extended) on a starved host.
    bound = unit_move_seconds(lab)
    provider.kill(first)
    killed_at = time.monotonic()
    try:
        row = wait_running(lab, "mover.service", timeout=bound + 5, avoid=first)
        moved_after = time.monotonic() - killed_at
        print(f"mover.service moved after {moved_after:.1f} s (bound {bound:.1f} s)")
        assert row.machines[0] != first
        assert moved_after < bound, f"moved after {moved_after:.1f} s, bound {bound:.1f} s"
    finally:
        provider.start(first)
    destroy_units(lab, "mover.service")


def test_scheduling_continues_when_the_engines_machine_dies(lab):
    from lab.cluster.units import machines

    provider = lab.provider()
    engine = next(m.name for m in machines(lab.etcd_client()) if m.engine)
    provider.kill(engine)
    try:
        # The engine key lives under the dead agent's lease (5 s); etcd may be
        # electing a leader at the same time if that node led it.
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline:
            engines = [m.name for m in polled(lambda: machines(lab.etcd_client())) or [] if m.engine]
            if engines and engines[0] != engine:
                break
            time.sleep(0.2)
        if not (engines and engines[0] != engine):
            from lab.host.ssh import run_many

            alive = [ep for name, ep in lab.ssh_endpoints().items() if name != engine]
            agents = run_many(alive, "systemctl is-active lab-agent; journalctl -u lab-agent -n 25 --no-pager -o cat")
            raise AssertionError(f"no new engine after {engine} died; machines: "
                                 f"{polled(lambda: machines(lab.etcd_client()))}\n"
                                 + "\n".join(f"--- {r.node}:\n{r.stdout}{r.stderr}" for r in agents))
        start(lab, "after-engine.service", unit_text())
        assert wait_running(lab, "after-engine.service", avoid=engine).machines[0] != engine
    finally:
        provider.start(engine)
    destroy_units(lab, "after-engine.service")


def test_bad_unit_files_and_unknown_units_get_clear_errors(lab, tmp_path):
    bad = tmp_path / "bad.service"
    bad.write_text("[Service]\nExecStart=/bin/true\n[X-Fleet]\nMachineMetdata=role=web\n")
    result = subprocess.run([sys.executable, "-m", "lab.cli", "unit", "start", str(bad), "--file",
                             str(lab.loaded.path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "bad.service:4" in result.stderr and "MachineMetadata" in result.stderr
    result = subprocess.run([sys.executable, "-m", "lab.cli", "unit", "stop", "nope.service", "--file",
                             str(lab.loaded.path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "no unit named 'nope.service'" in result.stderr
