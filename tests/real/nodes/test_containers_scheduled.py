"""Units that run containers, written in fleet's idiom, on a real 3-node lab: placed by the
scheduler, moved when their node dies, and stopped cleanly (no container left behind).

    ExecStartPre=-/usr/bin/docker rm -f %n        # a container left by a crash of this node
    ExecStart=/usr/bin/docker run --rm --name %n busybox ...
    ExecStop=/usr/bin/docker stop %n

busybox comes from the lab registry through each node's Docker mirror setting.
"""

from __future__ import annotations

import os
import shutil
import time

import pytest

from lab.core.lab import Lab
from lab.testing.bounds import unit_move_seconds

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("systemd-nspawn") is None,
                                reason="needs root and systemd-nspawn")

FLEET_IDIOM = """\
[Unit]
Description=%n: a busybox container
After=docker.service

[Service]
ExecStartPre=-/usr/bin/docker rm -f %n
ExecStart=/usr/bin/docker run --rm --name %n busybox /bin/sh -c "while true; do echo tick %n; sleep 1; done"
ExecStop=/usr/bin/docker stop %n
"""


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    from lab.images.build import build_image

    build_image("labos", "1")
    directory = tmp_path_factory.mktemp("containers")
    (directory / "lab.yaml").write_text("provider: nspawn\nnodes: {count: 3}\n")
    lab = Lab.open(directory / "lab.yaml")
    lab.up()
    try:
        yield lab
    finally:
        lab.destroy()


def start(lab: Lab, name: str, fleet: str = "") -> None:
    from lab.cluster.units import set_desired

    path = lab.lab_dir.parent.parent / name
    path.write_text(FLEET_IDIOM + (f"\n[X-Fleet]\n{fleet}\n" if fleet else ""))
    set_desired(lab.etcd_client(), [str(path)], "launched")


def unit_row(lab: Lab, name: str):
    from lab.cluster.etcdclient import EtcdError
    from lab.cluster.units import list_units

    try:
        return next((r for r in list_units(lab.etcd_client()) if r.name == name), None)
    except EtcdError:  # a leader election while a node is down: not yet
        return None


def on_node(lab: Lab, node: str, command: str, timeout: float = 60) -> str:
    from lab.host.ssh import run

    return run(lab.ssh_endpoints()[node], command, timeout=timeout, check=True).stdout


def container_running(lab: Lab, node: str, name: str) -> bool:
    return on_node(lab, node, f"docker ps --quiet --filter name=^{name}$").strip() != ""


def wait_container(lab: Lab, name: str, timeout: float = 60, avoid: str | None = None) -> str:
    """The node whose Docker runs the unit's container, once the scheduler says it runs there."""
    deadline = time.monotonic() + timeout
    row = None
    while time.monotonic() < deadline:
        row = unit_row(lab, name) or row
        if row and row.active == "active" and row.machines and row.machines[0] != avoid:
            node = row.machines[0]
            if container_running(lab, node, name):
                return node
        time.sleep(0.5)
    raise AssertionError(f"{name}: no running container within {timeout} s (scheduler: {row})")


def wait_stopped(lab: Lab, name: str, timeout: float = 30):
    deadline = time.monotonic() + timeout
    row = None
    while time.monotonic() < deadline:
        row = unit_row(lab, name) or row
        if row and row.active in ("inactive", "failed"):
            return row
        time.sleep(0.2)
    raise AssertionError(f"{name} not stopped within {timeout} s: {row}")


def destroy_units(lab: Lab, *names: str) -> None:
    from lab.cluster.units import destroy

    destroy(lab.etcd_client(), list(names))


def test_container_units_are_spread_by_conflicts_and_each_runs_its_container(lab):
    names = ["box1.service", "box2.service", "box3.service"]
    for name in names:
        start(lab, name, "Conflicts=box*.service")
    nodes = [wait_container(lab, name, timeout=90) for name in names]
    assert sorted(nodes) == ["node-1", "node-2", "node-3"]
    for name, node in zip(names, nodes):
        assert f"tick {name}" in on_node(lab, node, f"docker logs --tail 3 {name}")
    destroy_units(lab, *names)
    for node in nodes:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and on_node(lab, node, "docker ps --all --quiet --filter name=box").strip():
            time.sleep(0.5)
        assert on_node(lab, node, "docker ps --all --quiet --filter name=box").strip() == "", node


def test_a_container_unit_moves_when_its_node_dies_and_none_is_left_running_there(lab):
    provider = lab.provider()
    start(lab, "mover.service")
    first = wait_container(lab, "mover.service")
    # The unit's move (lease TTL, agent rounds; an election first if the node led etcd) and the
    # container's start (image already pulled or pulled from the lab registry).
    bound = unit_move_seconds(lab) + 10
    provider.kill(first)
    killed_at = time.monotonic()
    try:
        second = wait_container(lab, "mover.service", timeout=max(60, bound + 5), avoid=first)
        moved_after = time.monotonic() - killed_at
        print(f"mover.service running elsewhere after {moved_after:.1f} s (bound {bound:.1f} s)")
        assert second != first
        assert moved_after < bound, f"running elsewhere after {moved_after:.1f} s, bound {bound:.1f} s"
    finally:
        provider.start(first)
    # Back from the power cut, the old node runs no copy: its Docker does not restart the container
    # and its agent stops the unit that is no longer its own.
    time.sleep(3)
    assert not container_running(lab, first, "mover.service")
    assert container_running(lab, second, "mover.service")
    destroy_units(lab, "mover.service")


def test_stopping_a_container_unit_takes_seconds_and_leaves_no_container(lab):
    from lab.cluster.units import set_desired

    start(lab, "quiet.service")
    node = wait_container(lab, "quiet.service")
    requested = time.monotonic()
    set_desired(lab.etcd_client(), ["quiet.service"], "loaded")
    row = wait_stopped(lab, "quiet.service")
    observed = time.monotonic() - requested
    shown = on_node(lab, node, "systemctl show quiet.service -p ActiveExitTimestampMonotonic "
                               "-p InactiveEnterTimestampMonotonic -p Result -p ExecMainStatus")
    fields = dict(line.split("=", 1) for line in shown.splitlines() if "=" in line)
    stop_s = (int(fields["InactiveEnterTimestampMonotonic"]) - int(fields["ActiveExitTimestampMonotonic"])) / 1e6
    print(f"quiet.service: systemd stopped it in {stop_s:.2f} s, the scheduler showed {row.active} after "
          f"{observed:.1f} s (result {fields.get('Result')}, main status {fields.get('ExecMainStatus')})")
    assert stop_s < 5, fields
    assert on_node(lab, node, "docker ps --all --quiet --filter name=^quiet.service$").strip() == ""
    destroy_units(lab, "quiet.service")
