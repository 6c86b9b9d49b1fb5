"""`lab up` as steps (lab.core.up), against the fake provider of lab.testing:
the order of the steps, a rollback that leaves nothing after a failure or a
Ctrl-C at any step of a new lab, and nothing undone on an existing lab.
The real `lab up` is tested on real nodes in tests/real/nodes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lab.core import up as up_module
from lab.core.lab import Lab
from lab.errors import LabError, PrerequisiteError
from lab.host import network
from lab.model.spec import Override
from lab.providers.base import NodeState
from lab.testing.fake import fake_provider


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_lab_env: None):
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.chdir(tmp_path)
    with fake_provider("nspawn") as provider:
        yield provider


def open_lab(tmp_path: Path) -> Lab:
    return Lab.open(tmp_path / "lab.yaml", [Override(("provider",), "nspawn", "--provider"),
                                            Override(("nodes", "count"), 3, "--nodes")])


def leftovers(tmp_path: Path) -> list[str]:
    """What a lab may leave on disk: its directory and its subnet claim."""
    found = [str(p.relative_to(tmp_path)) for p in (tmp_path / ".lab").rglob("*")] if (tmp_path / ".lab").exists() else []
    return found + [c.name for c in network.claims()]


NEW_LAB_STEPS = ["select provider", "preflight", "claim subnet", "record state", "assign addresses", "ssh keypair",
                 "provider", "boot nodes", "ssh config"]


def test_a_new_lab_runs_every_step_in_order(fake, tmp_path):
    lab = open_lab(tmp_path)
    run = up_module.UpRun(lab=lab, progress=lambda _m: None, new_lab=True)
    up_module.run_steps(run, up_module.up_steps(bootstrap=False))
    assert run.done == NEW_LAB_STEPS
    assert fake.calls == ["preflight", "up node-1", "up node-2", "up node-3"]
    state = json.loads((lab.lab_dir / "state.json").read_text())
    assert state["provider"] == "nspawn" and state["nodes"] == ["node-1", "node-2", "node-3"]
    assert [r["id"] for r in state["resources"]] == ["node-1", "node-2", "node-3"]
    assert (lab.lab_dir / "ssh" / "id_ed25519").exists() and (lab.lab_dir / "ssh_config").exists()
    assert [c.subnet for c in network.claims()] == [state["subnet"]]


def test_bootstrap_adds_the_first_boot_files_and_the_etcd_and_scheduler_steps():
    names = [s.name for s in up_module.up_steps(bootstrap=True)]
    # The files go into the nodes' disks before they boot, so their services start with them.
    assert names[names.index("provider"):] == ["provider", "first-boot files", "boot nodes", "ssh config",
                                               "containers", "etcd", "scheduler"]


def test_an_existing_lab_skips_creation_and_checks_its_claim(fake, tmp_path):
    open_lab(tmp_path).up(bootstrap=False)
    fake.calls.clear()
    lab = open_lab(tmp_path)
    run = up_module.UpRun(lab=lab, progress=lambda _m: None, new_lab=False)
    up_module.run_steps(run, up_module.up_steps(bootstrap=False))
    assert run.done == ["select provider", "preflight", "check subnet claim", "provider", "boot nodes", "ssh config"]


@pytest.mark.parametrize("failing", NEW_LAB_STEPS)
@pytest.mark.parametrize("error", [PrerequisiteError("injected", hint="none"), KeyboardInterrupt()],
                         ids=["error", "ctrl-c"])
def test_a_failure_at_any_step_of_a_new_lab_leaves_nothing(fake, tmp_path, monkeypatch, failing, error):
    steps = up_module.up_steps(bootstrap=False)
    index = [s.name for s in steps].index(failing)
    original = steps[index]

    def fail_after_running(run):
        original.run(run)  # the step did its work (created what it creates), then things went wrong
        raise error

    steps[index] = up_module.Step(original.name, fail_after_running, original.new_lab_only)
    lab = open_lab(tmp_path)
    messages: list[str] = []
    run = up_module.UpRun(lab=lab, progress=messages.append, new_lab=True)
    with pytest.raises(type(error)):
        up_module.run_steps(run, steps)
    assert leftovers(tmp_path) == []
    assert all(state is not NodeState.RUNNING for state in fake.nodes.values())
    if index >= NEW_LAB_STEPS.index("claim subnet"):
        assert "rolling back: removing what this `lab up` created" in messages


def test_a_failure_of_the_provider_rolls_back_through_destroy(fake, tmp_path):
    fake.failures["up"] = PrerequisiteError("the node would not boot", hint="none")
    with pytest.raises(LabError, match="would not boot"):
        open_lab(tmp_path).up(bootstrap=False)
    assert fake.calls == ["preflight", "up node-1", "destroy"]
    assert leftovers(tmp_path) == []


def test_a_failed_preflight_creates_nothing(fake, tmp_path):
    fake.failures["preflight"] = PrerequisiteError("systemd-nspawn is missing", hint="apt-get install systemd-container")
    with pytest.raises(PrerequisiteError):
        open_lab(tmp_path).up(bootstrap=False)
    assert fake.calls == ["preflight"]
    assert leftovers(tmp_path) == []


def test_a_failure_on_an_existing_lab_undoes_nothing(fake, tmp_path):
    open_lab(tmp_path).up(bootstrap=False)
    fake.failures["up"] = KeyboardInterrupt()
    with pytest.raises(KeyboardInterrupt):
        open_lab(tmp_path).up(bootstrap=False)
    assert "destroy" not in fake.calls
    assert (tmp_path / ".lab" / "lab" / "state.json").exists()


def test_destroy_removes_everything_up_made(fake, tmp_path):
    open_lab(tmp_path).up(bootstrap=False)
    assert open_lab(tmp_path).destroy() is True
    assert leftovers(tmp_path) == [] and fake.nodes == {}


def test_an_existing_lab_whose_spec_flips_etcd_tls_is_refused_before_any_node_boots(fake, tmp_path):
    from lab.errors import UsageError

    open_lab(tmp_path).up(bootstrap=False)  # recorded with the default, etcd.tls: true
    fake.calls.clear()
    lab = Lab.open(tmp_path / "lab.yaml", [Override(("provider",), "nspawn", "--provider"),
                                           Override(("nodes", "count"), 3, "--nodes"),
                                           Override(("etcd", "tls"), False, "--set etcd.tls=false")])
    with pytest.raises(UsageError, match="was created with etcd.tls: true, the spec now says etcd.tls: false"):
        lab.up(bootstrap=False)
    assert not any(call.startswith("up ") for call in fake.calls)
    assert (tmp_path / ".lab" / "lab" / "state.json").exists()


def test_a_lab_too_big_for_the_hosts_memory_is_refused_before_anything_exists(fake, tmp_path, monkeypatch):
    from lab.core import doctor

    monkeypatch.setattr(doctor, "memory_mib", lambda: (24_000, 250))  # MiB total, available
    with pytest.raises(PrerequisiteError) as refused:
        open_lab(tmp_path).up(bootstrap=False)
    assert "a 3-node nspawn lab does not fit on this host: memory needs 300 MiB" in refused.value.message
    assert "250 MiB available" in refused.value.message
    assert "--nodes 2 fits" in refused.value.hint and "lab doctor --nodes 3 --provider nspawn" in refused.value.hint
    assert fake.calls == ["preflight"] and leftovers(tmp_path) == []
    # An existing lab is not measured again: its nodes are made.
    monkeypatch.setattr(doctor, "memory_mib", lambda: (24_000, 24_000))
    open_lab(tmp_path).up(bootstrap=False)
    monkeypatch.setattr(doctor, "memory_mib", lambda: (24_000, 250))
    open_lab(tmp_path).up(bootstrap=False)
