"""The container-service scenario for real: two busybox httpd replicas run by the scheduler as containers,
probed from the host through a node kill, a partition and a rolling OS update (the pure parts are in
tests/unit/test_service_probe.py)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("systemd-nspawn") is None,
                                reason="needs root and systemd-nspawn")


def test_the_service_stays_available_through_a_kill_a_partition_and_a_roll(tmp_path):
    from lab.images.build import build_image

    build_image("labos", "1")
    build_image("labos", "2")
    result = subprocess.run([sys.executable, "-m", "lab.cli", "scenario", "run", "container-service",
                             "--provider", "nspawn"], cwd=tmp_path, capture_output=True, text=True, timeout=1500)
    runs = list((tmp_path / ".lab" / "runs").glob("*/result.json"))
    assert runs, result.stdout[-3000:] + result.stderr[-5000:]
    run_dir = runs[0].parent
    data = json.loads(runs[0].read_text())
    assert result.returncode == 0 and data["ok"], result.stdout[-3000:] + result.stderr[-5000:]

    measured = data["measurements"]
    service = measured["service"]
    # Two replicas polled every 100 ms answer well over 5 times a second; the kill moved one replica
    # to the free node and the partition the other to the node killed before, so every node served.
    assert service["answered"] > 5 * (service["end_s"] - service["begin_s"])
    assert set(service["serving"]) == {"node-1", "node-2", "node-3"}
    assert all(service["serving"][node] for node in service["serving"])
    # Judged as the scenario judges it: on what the probe saw (a host too starved to send is not a
    # service that did not answer; a 1.58 s window of which part was unobserved failed here at load 25).
    assert service["longest_observed_s"] <= scenario_bound()
    lanes = measured["unavailability"]
    assert set(lanes) == {"etcd_writes", "service"}
    assert measured["lost_writes"] == 0 and measured["max_members_down"] <= 1
    summary = (run_dir / "summary.md").read_text()
    assert "| etcd writes |" in summary and "| service |" in summary and "  node-3    |" in summary
    requests = (run_dir / "service.jsonl").read_text().splitlines()
    assert len(requests) == service["requests"] and json.loads(requests[0])["node"].startswith("node-")
    assert not (tmp_path / ".lab" / "lab").exists(), "the lab the scenario created must be gone"


def scenario_bound() -> float:
    """The scenario's own bound, as its expectation checked it."""
    from lab.host.paths import resource
    from lab.scenarios.model import parse

    return parse(resource("scenarios") / "container-service" / "scenario.yaml").expect.service_max_unavailable_s
