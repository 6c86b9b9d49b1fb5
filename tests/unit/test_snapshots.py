"""Lab snapshots without nodes: snapshot.json's checks, what a restore refuses, the state rule, save and
restore through the core and the CLI on lab.testing's fake provider (taught to copy a file per node),
the nspawn freezer's thaw-whatever-happens, and the Vagrant refusal. Real saves and restores of
nspawn nodes are in tests/real/nodes/test_snapshot_restore.py."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from lab.core import snapshots
from lab.core.lab import Lab
from lab.core.state import LabState, resource_problems
from lab.errors import LabError, ProviderError, StateError, UsageError
from lab.model.spec import Override
from lab.providers import substituted
from lab.providers.base import NodeSnapshot, NodeState, Progress, SnapshotTaken, no_progress
from lab.testing.fake import FakeProvider


class SnapshotFake(FakeProvider):
    """The fake provider with snapshots: each node's "layer" is one file, nodes/NODE/layer."""

    def snapshot(self, directory: Path, progress: Progress = no_progress) -> SnapshotTaken:
        directory.mkdir(parents=True)
        self._call("snapshot")  # an injected failure strikes with the copy half made
        for node in self.context.nodes:
            layer = self.context.lab_dir / "nodes" / node.name / "layer"
            (directory / "nodes" / node.name).mkdir(parents=True)
            (directory / "nodes" / node.name / "layer").write_text(layer.read_text() if layer.exists() else "")
        return SnapshotTaken([NodeSnapshot(n.name, "a", {}) for n in self.context.nodes], frozen_s=0.01,
                             running=[n for n, s in self.nodes.items() if s is NodeState.RUNNING])

    def restore(self, directory: Path, nodes: list[NodeSnapshot], progress: Progress = no_progress) -> None:
        self._call("restore", ",".join(n.node for n in nodes))
        for saved in nodes:
            target = self.context.lab_dir / "nodes" / saved.node / "layer"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text((directory / "nodes" / saved.node / "layer").read_text())
            self.nodes[saved.node] = NodeState.RUNNING


    def prepare_restore(self, directory: Path, progress: Progress = no_progress) -> None:
        self._call("prepare_restore")


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_lab_env: None):
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.chdir(tmp_path)
    SnapshotFake.reset()
    with substituted("nspawn", f"{__name__}:SnapshotFake"):
        yield SnapshotFake
    SnapshotFake.reset()


def open_lab(tmp_path: Path, nodes: int = 3) -> Lab:
    return Lab.open(tmp_path / "lab.yaml", [Override(("provider",), "nspawn", "--provider"),
                                            Override(("nodes", "count"), nodes, "--nodes")])


def write_layers(lab: Lab, text: str) -> None:
    for node in lab.state["nodes"]:
        layer = lab.lab_dir / "nodes" / node / "layer"
        layer.parent.mkdir(parents=True, exist_ok=True)
        layer.write_text(f"{text} on {node}")


def layer(lab: Lab, node: str = "node-1") -> str:
    return (lab.lab_dir / "nodes" / node / "layer").read_text()


@pytest.fixture
def lab(fake, tmp_path) -> Lab:
    created = open_lab(tmp_path)
    created.up(bootstrap=False)
    write_layers(created, "before")
    return created


# ---------------------------------------------------------------- save, restore, list, rm on the fake


def test_a_restore_brings_back_what_was_saved_and_only_that(lab, fake):
    saved = snapshots.save(lab, "base")
    assert saved.node_names == ["node-1", "node-2", "node-3"]
    write_layers(lab, "after")
    result = snapshots.restore(lab, "base")
    assert layer(lab) == "before on node-1" and layer(lab, "node-3") == "before on node-3"
    assert "heal" in fake.calls and "restore node-1,node-2,node-3" in fake.calls
    assert result.took_s >= result.nodes_s >= 0


def test_a_snapshot_is_recorded_in_the_state_and_lives_in_the_lab_directory(lab):
    snapshots.save(lab, "base")
    record = LabState.load(lab.lab_dir).find("snapshot", "base")
    assert record and record[0]["dir"] == str(lab.lab_dir / "snapshots" / "base")
    meta = json.loads((lab.lab_dir / "snapshots" / "base" / "snapshot.json").read_text())
    assert meta["nodes"][0] == {"node": "node-1", "boot_slot": "a", "slots": {}}
    assert meta["addresses"] == lab.state["addresses"] and meta["etcd_settings"]["heartbeat_ms"] == 100
    assert [r.name for r in snapshots.rows(lab)] == ["base"]


def test_a_taken_name_is_refused_unless_forced(lab):
    snapshots.save(lab, "base")
    with pytest.raises(UsageError, match="has a snapshot 'base' already") as caught:
        snapshots.save(lab, "base")
    assert "--force" in caught.value.hint
    write_layers(lab, "later")
    snapshots.save(lab, "base", force=True)
    write_layers(lab, "latest")
    snapshots.restore(lab, "base")
    assert layer(lab) == "later on node-1"
    assert sorted(p.name for p in (lab.lab_dir / "snapshots").iterdir()) == ["base"]


@pytest.mark.parametrize("failure", [ProviderError("node-2: copying failed: No space left on device"),
                                     KeyboardInterrupt()])
def test_a_save_that_fails_midway_leaves_nothing_and_keeps_the_old_snapshot(lab, fake, failure):
    snapshots.save(lab, "base")
    write_layers(lab, "newer")
    fake.failures["snapshot"] = failure
    with pytest.raises(type(failure)):
        snapshots.save(lab, "base", force=True)
    with pytest.raises(type(failure)):
        snapshots.save(lab, "other")
    assert sorted(p.name for p in (lab.lab_dir / "snapshots").iterdir()) == ["base"]
    assert [r["id"] for r in LabState.load(lab.lab_dir).find("snapshot")] == ["base"]
    del fake.failures["snapshot"]
    snapshots.restore(lab, "base")
    assert layer(lab) == "before on node-1"


def test_the_next_restore_is_prepared_after_a_save_and_a_restore_and_a_failure_there_only_warns(lab, fake):
    snapshots.save(lab, "base")
    assert fake.calls[-2:] == ["snapshot", "prepare_restore"]
    fake.failures["prepare_restore"] = ProviderError("no space left on device")
    said = []
    result = snapshots.restore(lab, "base", progress=said.append)
    assert fake.calls[-1] == "prepare_restore" and result.prepared_s >= 0
    assert "the next restore will copy the snapshot first: no space left on device" in said


def test_an_unknown_snapshot_is_refused_naming_the_known_ones(lab):
    snapshots.save(lab, "base")
    with pytest.raises(UsageError, match="has no snapshot 'nope'") as caught:
        snapshots.restore(lab, "nope")
    assert caught.value.hint == "snapshots are: base"
    with pytest.raises(UsageError, match="has no snapshot 'nope'"):
        snapshots.remove(lab, "nope")


def test_rm_removes_the_directory_and_the_record(lab):
    snapshots.save(lab, "base")
    snapshots.remove(lab, "base")
    assert not (lab.lab_dir / "snapshots" / "base").exists()
    assert LabState.load(lab.lab_dir).find("snapshot") == []
    assert snapshots.rows(lab) == []


def test_a_save_cut_off_after_its_record_shows_as_incomplete_and_can_be_removed(lab):
    lab.state.record("snapshot", "cut", dir=str(lab.lab_dir / "snapshots" / "cut"), created_at="now")
    (lab.lab_dir / "snapshots" / ".cut.partial").mkdir(parents=True)
    assert [(r.name, r.complete) for r in snapshots.rows(lab)] == [("cut", False)]
    with pytest.raises(UsageError, match="has no snapshot 'cut' \\(its save was interrupted\\)"):
        snapshots.restore(lab, "cut")
    snapshots.remove(lab, "cut")
    snapshots.save(lab, "base")  # and the next save sweeps what the cut-off one left
    assert sorted(p.name for p in (lab.lab_dir / "snapshots").iterdir()) == ["base"]


def test_destroy_removes_every_snapshot(lab):
    snapshots.save(lab, "base")
    lab.destroy()
    assert not lab.lab_dir.exists()


def test_a_lab_not_created_has_nothing_to_snapshot(fake, tmp_path):
    with pytest.raises(StateError, match="does not exist yet"):
        snapshots.save(open_lab(tmp_path), "base")
    assert snapshots.rows(open_lab(tmp_path)) == []


def test_a_snapshot_of_other_nodes_is_refused_with_one_message(lab, fake, tmp_path):
    snapshots.save(lab, "base")
    lab.state.set("nodes", lab.state["nodes"] + ["node-4"])
    lab.state.set("image", {"name": "labos", "version": "2", "key": "k2", "rootfs": "/nonexistent"})
    with pytest.raises(StateError) as caught:
        snapshots.restore(lab, "base")
    message = caught.value.message
    assert "was not taken of lab 'lab' as it is now" in message
    assert "nodes: snapshot node-1, node-2, node-3, lab node-1, node-2, node-3, node-4" in message
    assert "image: snapshot none recorded, lab labos 2 (key k2)" in message
    assert not any(call.startswith("restore") for call in fake.calls)


@pytest.mark.parametrize("name", ["../up", ".hidden", "a/b", "", "x" * 64])
def test_a_bad_name_is_refused_before_anything_happens(lab, name):
    with pytest.raises(UsageError, match="is not a snapshot name"):
        snapshots.save(lab, name)
    assert not (lab.lab_dir / "snapshots").exists() or not any((lab.lab_dir / "snapshots").iterdir())


# ---------------------------------------------------------------- pure checks


def meta(**changes) -> dict:
    data = {"version": 1, "name": "base", "created_at": "2026-12-01T19:00:00+00:00", "provider": "nspawn",
            "image": {"name": "labos", "version": "1", "key": "k1", "rootfs": "/c/images/labos-1-k1/rootfs"},
            "nodes": [{"node": f"node-{i}", "boot_slot": "a", "slots": {"a": "/c/images/labos-1-k1/rootfs"}}
                      for i in (1, 2)],
            "addresses": {"node-1": "10.0.0.2", "node-2": "10.0.0.3"}, "etcd": {"tls": True, "token": "t"},
            "etcd_settings": {"heartbeat_ms": 100, "election_timeout_ms": 1000, "tls": True, "pre_vote": False}}
    data.update(changes)
    return data


FACTS = {"provider": "nspawn", "nodes": ["node-1", "node-2"], "addresses": {"node-1": "10.0.0.2", "node-2": "10.0.0.3"},
         "image": {"name": "labos", "version": "1", "key": "k1", "rootfs": "/c/images/labos-1-k1/rootfs"},
         "etcd_tls": True}


def test_a_snapshot_of_this_lab_as_it_is_fits():
    snapshot = snapshots.Snapshot.from_json(meta(), Path("/lab/snapshots/base/snapshot.json"))
    assert snapshots.differences(snapshot, FACTS) == []
    assert snapshots.Snapshot.from_json(snapshot.to_json(), Path("x")) == snapshot


@pytest.mark.parametrize("facts, expected", [
    ({"image": {"name": "labos", "version": "2", "key": "k2"}},
     "image: snapshot labos 1 (key k1), lab labos 2 (key k2)"),
    ({"nodes": ["node-1"]}, "nodes: snapshot node-1, node-2, lab node-1"),
    ({"addresses": {"node-1": "10.0.0.2", "node-2": "10.0.0.9"}},
     "addresses of node-2 (snapshot 10.0.0.3, lab 10.0.0.9)"),
    ({"etcd_tls": False}, "etcd.tls: snapshot True, lab False"),
    ({"provider": "libvirt"}, "provider: snapshot nspawn, lab libvirt"),
])
def test_what_differs_is_named(facts, expected):
    snapshot = snapshots.Snapshot.from_json(meta(), Path("x"))
    assert snapshots.differences(snapshot, {**FACTS, **facts}) == [expected]


@pytest.mark.parametrize("changes", [
    {"version": 2},
    {"nodes": []},
    {"nodes": [{"node": "../etc", "boot_slot": "a", "slots": {}}]},
    {"nodes": [{"node": "node-1", "boot_slot": "c", "slots": {}}]},
    {"nodes": [{"node": "node-1", "boot_slot": "a", "slots": {"../x": "/"}}]},
    {"image": "labos"},
    {"partition": "node-1|node-2"},
    {"name": 7},
])
def test_a_snapshot_record_lab_would_not_write_is_refused(changes):
    with pytest.raises(StateError, match="snapshot.json"):
        snapshots.Snapshot.from_json(meta(**changes), Path("/lab/snapshots/base/snapshot.json"))


def test_the_etcd_settings_the_nodes_run_after_a_restore_are_said_when_they_are_not_the_specs():
    snapshot = snapshots.Snapshot.from_json(meta(), Path("x"))
    assert snapshots.settings_note(snapshot, dict(snapshot.etcd_settings)) is None
    note = snapshots.settings_note(snapshot, {**snapshot.etcd_settings, "election_timeout_ms": 5000})
    assert note == ("etcd runs the snapshot's settings (election_timeout_ms 1000), not the spec's "
                    "(election_timeout_ms 5000): `lab up` applies the spec's")


def test_the_state_rule_keeps_snapshots_inside_the_lab_directory(tmp_path):
    lab_dir = tmp_path / ".lab" / "lab"
    good = {"kind": "snapshot", "id": "base", "dir": str(lab_dir / "snapshots" / "base"), "created_at": "now"}
    assert resource_problems([good], lab_dir) == []
    for bad in ({**good, "dir": "/etc"}, {**good, "dir": str(lab_dir / "snapshots" / "other")},
                {**good, "id": "../base", "dir": str(lab_dir / "base")}, {**good, "dir": str(lab_dir)}):
        assert resource_problems([bad], lab_dir), bad


# ---------------------------------------------------------------- the CLI


def test_the_cli_saves_lists_restores_and_removes(fake, tmp_path, run_lab):
    flags = ["--provider", "nspawn"]
    assert run_lab("up", *flags, "--no-bootstrap").exit_code == 0
    lab = open_lab(tmp_path)
    write_layers(lab, "before")
    result = run_lab("snapshot", "save", "base")
    assert result.exit_code == 0, result.output
    assert "saved snapshot base of lab lab: node-1, node-2, node-3" in result.stdout
    listed = run_lab("snapshot", "list", "--json")
    assert [row["name"] for row in json.loads(listed.stdout)] == ["base"]
    write_layers(lab, "after")
    result = run_lab("snapshot", "restore", "base")
    assert result.exit_code == 0, result.output
    assert "restored snapshot base of lab lab in" in result.stdout and layer(lab) == "before on node-1"
    taken = run_lab("snapshot", "save", "base")
    assert taken.exit_code == 2 and "already" in taken.stderr and "Traceback" not in taken.output
    assert run_lab("snapshot", "rm", "base").exit_code == 0
    assert "no snapshots" in run_lab("snapshot", "list").stdout


def test_the_cli_on_a_lab_not_created_says_so(fake, run_lab):
    result = run_lab("snapshot", "save", "base", "--provider", "nspawn")
    assert result.exit_code != 0
    result = run_lab("snapshot", "restore", "base")
    assert result.exit_code == 5 and "does not exist yet" in result.stderr and "Traceback" not in result.output


def test_a_busy_lab_is_refused(lab, run_lab, monkeypatch):
    from lab.core import lab as core_lab
    from lab.core.state import lab_lock

    monkeypatch.setattr(core_lab, "CHANGE_WAIT", 0.05)  # the refusal, not the wait for the holder, is tested
    with lab_lock(lab.lab_dir, "up"):
        result = run_lab("snapshot", "save", "base")
    assert result.exit_code == 5 and "is busy: `lab up`" in result.stderr


def test_from_snapshot_saves_once_and_restores_before_each_scenario(fake, tmp_path, monkeypatch):
    from types import SimpleNamespace

    from lab.core import lifecycle
    from lab.scenarios import engine

    calls = []
    monkeypatch.setattr(snapshots, "save", lambda lab, name, force=False, progress=None: calls.append(("save", name)))
    monkeypatch.setattr(snapshots, "restore", lambda lab, name, progress=None: calls.append(("restore", name)))

    class StubRun:
        def __init__(self, lab, found, spec, progress, **_) -> None:
            self.found = found

        def run(self):
            calls.append(("run", self.found.name))
            return SimpleNamespace(scenario=self.found.name, ok=True, run_dir=tmp_path, measurements={}, failures=[])

    monkeypatch.setattr(engine, "ScenarioRun", StubRun)
    monkeypatch.setattr(Lab, "up", lambda self, progress, bootstrap=True: None)
    for name in ("one", "two"):
        (tmp_path / "scenarios" / name).mkdir(parents=True)
        (tmp_path / "scenarios" / name / "scenario.yaml").write_text(
            f"description: {name}\nsteps:\n  - sleep: 0\n")
    lifecycle.run_scenarios("test", ["one", "two"], tmp_path / "lab.yaml", lifecycle.Flags(provider="nspawn"),
                            "never", None, no_progress, from_snapshot=True)
    base = lifecycle.BASE_SNAPSHOT
    assert calls == [("save", base), ("restore", base), ("run", "one"), ("restore", base), ("run", "two")]
    with pytest.raises(UsageError, match="--from-snapshot is for `lab test`"):
        lifecycle.run_scenarios("scenario", ["one"], tmp_path / "lab.yaml", lifecycle.Flags(), "never", None,
                                no_progress, from_snapshot=True)


# ---------------------------------------------------------------- nspawn parts and the Vagrant refusal


def freezers(tmp_path: Path, *nodes: str) -> dict[str, Path]:
    found = {}
    for node in nodes:
        (tmp_path / node).mkdir()
        (tmp_path / node / "freezer.state").write_text("THAWED")
        found[node] = tmp_path / node
    return found


@pytest.mark.parametrize("raised", [ProviderError("copy failed"), KeyboardInterrupt()])
def test_every_node_is_thawed_whatever_happens_while_frozen(tmp_path, raised):
    from lab.providers.nspawn.snapshot import frozen

    nodes = freezers(tmp_path, "node-1", "node-2")
    with pytest.raises(type(raised)):
        with frozen(nodes):
            assert {(d / "freezer.state").read_text() for d in nodes.values()} == {"FROZEN"}
            raise raised
    assert {(d / "freezer.state").read_text() for d in nodes.values()} == {"THAWED"}


def test_a_node_that_does_not_freeze_in_time_is_thawed_with_the_rest(tmp_path, monkeypatch):
    from lab.providers.nspawn import snapshot

    nodes = freezers(tmp_path, "node-1", "node-2")
    real = snapshot.read_value
    monkeypatch.setattr(snapshot, "read_value",
                        lambda path: "FREEZING" if "node-2" in str(path) and real(path) == "FROZEN" else real(path))
    with pytest.raises(ProviderError, match="node-2 did not freeze within 0 s"):
        with snapshot.frozen(nodes, timeout=0.05):
            pytest.fail("copied while a node was still running")
    assert (nodes["node-1"] / "freezer.state").read_text() == "THAWED"


def test_a_failed_copy_leaves_no_half_copy(tmp_path):
    from lab.providers.nspawn.snapshot import copy_tree

    with pytest.raises(ProviderError, match="node-1: copying .* failed") as caught:
        copy_tree(tmp_path / "missing", tmp_path / "copy", "node-1")
    assert not (tmp_path / "copy").exists() and "df -h" in caught.value.hint


def test_a_copy_keeps_owners_modes_links_and_attributes(tmp_path):
    from lab.providers.nspawn.snapshot import copy_tree

    source = tmp_path / "upper"
    (source / "etc").mkdir(parents=True)
    (source / "etc" / "key").write_text("secret")
    os.chmod(source / "etc" / "key", 0o600)
    os.symlink("/nonexistent/target", source / "etc" / "link")
    os.link(source / "etc" / "key", source / "etc" / "hard")
    try:
        os.setxattr(source / "etc", "user.lab", b"1")
    except OSError:
        pytest.skip("no user xattrs on this file system")
    if os.geteuid() == 0:
        os.setxattr(source / "etc", "trusted.overlay.opaque", b"y")
        os.mknod(source / "etc" / "whiteout", 0o600 | 0o020000, os.makedev(0, 0))
        os.chown(source / "etc" / "key", 100000, 100000)
    copy_tree(source, tmp_path / "copy", "node-1")
    copy = tmp_path / "copy" / "etc"
    assert (copy / "key").stat().st_mode & 0o777 == 0o600
    assert os.readlink(copy / "link") == "/nonexistent/target"
    assert (copy / "key").stat().st_ino == (copy / "hard").stat().st_ino
    assert os.getxattr(copy, "user.lab") == b"1"
    if os.geteuid() == 0:
        assert os.getxattr(copy, "trusted.overlay.opaque") == b"y"
        assert os.major((copy / "whiteout").lstat().st_rdev) == 0 and (copy / "whiteout").is_char_device()
        assert (copy / "key").stat().st_uid == 100000


@pytest.mark.parametrize("module, cls, expected", [
    ("lab.providers.vagrant.virtualbox", "VirtualboxProvider", "Vagrant snapshots one VM at a time"),
    ("lab.providers.vagrant.libvirt", "LibvirtProvider", "on libvirt lab lacks suspending every domain"),
])
def test_vagrant_labs_are_told_why_there_are_no_snapshots(module, cls, expected):
    import importlib

    provider = object.__new__(getattr(importlib.import_module(module), cls))
    for call in (lambda: provider.snapshot(Path("/nonexistent")), lambda: provider.restore(Path("/x"), [])):
        with pytest.raises(UsageError, match="snapshots are for nspawn labs") as caught:
            call()
        assert expected in caught.value.message and "--provider nspawn" in caught.value.hint


def test_errors_are_lab_errors():
    assert issubclass(StateError, LabError) and issubclass(UsageError, LabError)
