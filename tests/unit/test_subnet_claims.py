"""Subnet claims: atomic under the registry lock, held from the claim on (not
only once a state.json exists), freed when the claiming process died before
its lab existed; the registry and lock directories are private (0700)."""

from __future__ import annotations

import ipaddress
import json
import multiprocessing
import os
import stat
from pathlib import Path

import pytest

from lab.host import network
from lab.host.paths import private_dir
from lab.errors import StateError


@pytest.fixture
def registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    return tmp_path


def claim_in_child(lab_dir: str, state_home: str, requested: str | None, queue, hold) -> None:
    os.environ["XDG_STATE_HOME"] = state_home
    try:
        subnet = network.claim_subnet(Path(lab_dir), Path(lab_dir).parent.parent.name,
                                      ipaddress.IPv4Network(requested) if requested else None,
                                      network.DEFAULT_POOL, own_devices=set())
        queue.put(str(subnet))
    except Exception as exc:  # noqa: BLE001 - reported to the parent
        queue.put(f"refused: {exc}")
    hold.get()  # stay alive (holding the claim, with no state.json) until the parent has looked


def race(registry: Path, requested: str | None) -> list[str]:
    context = multiprocessing.get_context("fork")
    results, hold = context.Queue(), context.Queue()
    children = [context.Process(target=claim_in_child, args=(str(registry / name / ".lab" / "lab"),
                                                             str(registry / "state"), requested, results, hold))
                for name in ("one", "two", "three")]
    for child in children:
        child.start()
    try:
        outcomes = sorted(results.get(timeout=30) for _ in children)
        assert len(network.claims()) == sum(not o.startswith("refused") for o in outcomes)  # held, no state.json yet
        return outcomes
    finally:
        for _ in children:
            hold.put("done")
        for child in children:
            child.join(timeout=30)
            if child.is_alive():  # never leave a forked child behind a failed assertion
                child.kill()


def test_three_labs_claiming_at_once_get_three_subnets(registry):
    outcomes = race(registry, None)
    assert len(set(outcomes)) == 3 and not any(o.startswith("refused") for o in outcomes)


def test_three_labs_asking_for_one_subnet_at_once_one_gets_it(registry):
    outcomes = race(registry, "10.77.50.0/24")
    assert outcomes.count("10.77.50.0/24") == 1
    assert sum("overlaps 10.77.50.0/24" in o for o in outcomes) == 2


def test_a_claim_of_a_dead_process_without_a_lab_is_free(registry):
    lab_dir = registry / "p" / ".lab" / "lab"
    network.claim_subnet(lab_dir, "lab", None, network.DEFAULT_POOL, own_devices=set())
    entry = next((registry / "state" / "lab" / "labs").glob("*.json"))
    record = json.loads(entry.read_text())
    assert record["claimer"]["pid"] == os.getpid()
    record["claimer"]["start"] = "1"  # this pid, but another process (pid reuse)
    entry.write_text(json.dumps(record))
    assert network.claims() == []
    (lab_dir).mkdir(parents=True)
    (lab_dir / "state.json").write_text("{}")
    assert [c.name for c in network.claims()] == ["lab"]  # a lab that exists holds its claim


def test_a_requested_subnet_held_by_a_running_up_is_refused(registry):
    network.claim_subnet(registry / "a" / ".lab" / "lab", "a", ipaddress.IPv4Network("10.77.40.0/24"),
                         network.DEFAULT_POOL, own_devices=set())
    with pytest.raises(Exception, match="overlaps 10.77.40.0/24"):
        network.claim_subnet(registry / "b" / ".lab" / "lab", "b", ipaddress.IPv4Network("10.77.40.0/24"),
                             network.DEFAULT_POOL, own_devices=set())


def test_a_corrupt_registry_entry_claims_nothing(registry):
    network.claim_subnet(registry / "a" / ".lab" / "lab", "a", None, network.DEFAULT_POOL, own_devices=set())
    for entry in (registry / "state" / "lab" / "labs").glob("*.json"):
        entry.write_text("{not json")
    assert network.claims() == []


def test_private_directories_are_0700_and_refuse_symlinks(tmp_path):
    directory = private_dir(tmp_path / "locks")
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(StateError, match="symlink"):
        private_dir(tmp_path / "link")


def test_nodes_that_would_run_out_of_inotify_instances_are_refused_with_the_sysctl_that_fixes_it():
    from lab.providers.nspawn.limits import INOTIFY_PER_NODE, inotify_problem

    assert inotify_problem(3, limit=128, used=20) is None
    assert inotify_problem(0, limit=128, used=500) is None  # nothing to start (every node runs)
    refused = inotify_problem(50, limit=128, used=24)
    assert f"50 node(s) need about {50 * INOTIFY_PER_NODE} inotify instances" in refused.message
    assert "root has 104 of fs.inotify.max_user_instances=128 left" in refused.message
    assert "`sysctl -w fs.inotify.max_user_instances=1024`" in refused.hint and "(10 fit now)" in refused.hint
    assert "max_user_instances=1536" in inotify_problem(100, limit=1024, used=400).hint


def test_a_node_gets_a_free_uid_range_of_nspawns_region_where_its_name_hashes(tmp_path):
    from lab.providers.nspawn import userns

    first = userns.choose_range("lab-abc123-node-1", set())
    assert userns.PICK_FIRST <= first < userns.PICK_END and first % userns.RANGE == 0
    assert userns.choose_range("lab-abc123-node-1", set()) == first  # the same name, the same range
    assert userns.choose_range("lab-abc123-node-1", {first}) == first + userns.RANGE  # taken: the next one
    last = userns.PICK_END - userns.RANGE
    assert userns.choose_range("x", {b for b in range(userns.PICK_FIRST, last, userns.RANGE)}) == last
    # Ranges in use on the host, as /proc/PID/uid_map shows them (the host's own processes map 0 to 0).
    for pid, line in (("1", "0 0 4294967295"), ("2041", "0 2097217536 65536"), ("2042", "0 2097217536 65536"),
                      ("3000", "0 524288 65536")):
        (tmp_path / pid).mkdir()
        (tmp_path / pid / "uid_map").write_text(f"         {line}\n")
    (tmp_path / "self").mkdir()
    assert userns.ranges_in_use(tmp_path) == {2097217536, 524288}
