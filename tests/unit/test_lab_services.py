"""The lab's host services and node Docker settings: daemon.json, dnsmasq's command line, the state records of
services, and detached daemons known by pid and start time (real processes: `sleep`, no root)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from lab.cluster.docker import daemon_config
from lab.core.state import resource_problems
from lab.errors import ProviderError
from lab.host import daemons, dns
from lab.host.network import host_address, lab_id


def test_daemon_json_points_nodes_at_the_lab_registry_and_dns_only():
    config = daemon_config("10.77.3.1", registry=True, dns=True)
    assert config["registry-mirrors"] == ["http://10.77.3.1:5000"]
    assert config["insecure-registries"] == ["10.77.3.1:5000"]
    assert config["dns"] == ["10.77.3.1"]
    assert config["init"] is True and config["shutdown-timeout"] <= 10


def test_without_lab_services_daemon_json_names_no_registry_or_resolver():
    config = daemon_config("10.77.3.1", registry=False, dns=False)
    assert not {"registry-mirrors", "insecure-registries", "dns"} & set(config)
    assert config["init"] is True


def test_host_address_is_the_first_of_the_lab_subnet():
    assert host_address("10.77.3.0/24") == "10.77.3.1"


def test_dnsmasq_answers_node_names_on_the_host_address_only_and_forwards_nothing():
    argv = dns.dnsmasq_argv("10.77.3.1", {"node-2": "10.77.3.12", "node-1": "10.77.3.11"})
    assert "--no-resolv" in argv and "--no-hosts" in argv and "--conf-file=/dev/null" in argv
    assert "--listen-address=10.77.3.1" in argv and "--bind-interfaces" in argv
    assert not any(a.startswith("--server") for a in argv)
    assert [a for a in argv if a.startswith("--host-record=")] == ["--host-record=node-1,10.77.3.11",
                                                                   "--host-record=node-2,10.77.3.12"]
    assert "--user=nobody" in argv


def service(lab_dir: Path, **fields) -> dict:
    return {"kind": "service", "id": "registry", "log": str(lab_dir / "registry.log"), **fields}


def test_state_records_of_services_are_checked(tmp_path):
    assert resource_problems([service(tmp_path, pid=1234, start="5678")], tmp_path) == []
    assert resource_problems([service(tmp_path)], tmp_path) == []  # recorded before it started
    bad = [service(tmp_path, id="sshd"), service(tmp_path, log="/etc/shadow"),
           service(tmp_path, pid=1), service(tmp_path, pid=True), service(tmp_path, pid=99, start="x"),
           {**service(tmp_path), "id": "dns", "records": {"node-1": 7}}]
    problems = resource_problems(bad, tmp_path)
    assert len(problems) == len(bad), problems
    assert lab_id(tmp_path)  # the rule needs no lab beyond its directory


def test_a_daemon_is_started_detached_and_stopped_by_pid_and_start_time(tmp_path):
    log = tmp_path / "sleep.log"
    daemon = daemons.start_daemon([sys.executable, "-c", "import time; print('up', flush=True); time.sleep(60)"],
                                  log=log, what="a sleeper", ready=lambda: "up" in log.read_text())
    assert daemons.daemon_alive(daemon.pid, daemon.start)
    assert not daemons.daemon_alive(daemon.pid, str(int(daemon.start) + 1))  # another process's start time
    daemons.stop_daemon(daemon.pid, str(int(daemon.start) + 1))  # never signals a process it cannot identify
    assert daemons.daemon_alive(daemon.pid, daemon.start)
    daemons.stop_daemon(daemon.pid, daemon.start)
    assert not daemons.daemon_alive(daemon.pid, daemon.start)


def test_a_daemon_that_exits_at_start_is_one_error_with_its_log(tmp_path):
    log = tmp_path / "fail.log"
    with pytest.raises(ProviderError) as caught:
        daemons.start_daemon([sys.executable, "-c", "import sys; print('port in use'); sys.exit(3)"],
                             log=log, what="the lab DNS", ready=lambda: False, timeout=10)
    assert "the lab DNS exited at start (status 3)" in caught.value.message
    assert "port in use" in caught.value.hint


def test_a_daemon_never_ready_is_stopped_after_the_timeout(tmp_path):
    log = tmp_path / "slow.log"
    with pytest.raises(ProviderError) as caught:
        daemons.start_daemon([sys.executable, "-c", "import time; time.sleep(60)"], log=log, what="the registry",
                             ready=lambda: False, timeout=0.5)
    assert "not ready within" in caught.value.message


def test_a_missing_program_or_user_is_a_prerequisite_error(tmp_path):
    from lab.errors import PrerequisiteError

    with pytest.raises(PrerequisiteError):
        daemons.start_daemon(["lab-no-such-program"], log=tmp_path / "x.log", what="x")
    with pytest.raises(PrerequisiteError):
        daemons.start_daemon(["true"], log=tmp_path / "x.log", what="x", user="lab-no-such-user")


def test_a_daemon_that_cannot_be_recorded_is_stopped(tmp_path):
    started = []

    def record(daemon):
        started.append(daemon)
        raise OSError("state.json: no space left on device")

    with pytest.raises(OSError):
        daemons.start_daemon([sys.executable, "-c", "import time; time.sleep(60)"], log=tmp_path / "d.log",
                             what="x", on_start=record)
    assert started and not daemons.daemon_alive(started[0].pid, started[0].start)
