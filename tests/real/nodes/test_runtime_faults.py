"""The runtime-fault corpus on a real lab, through the real CLI (`python -m lab.cli` as a
subprocess, as root): each fault ends in one message naming the problem and the
fix, a non-zero exit, no traceback, and nothing half-created. Faults that need
no nodes are in tests/unit/test_fault_corpus.py.

One 2-node lab is shared by the module; each test puts back what it broke. The
lab boots a hard-linked copy of the node image in a private cache, so the last
test can remove "its" image without touching the host's.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("systemd-nspawn") is None,
                                reason="needs root and systemd-nspawn")


@dataclass
class Project:
    """A project directory and the environment its `lab` commands run with."""

    directory: Path
    env: dict[str, str] = field(default_factory=dict)
    name: str = "lab"

    @property
    def lab_dir(self) -> Path:
        return self.directory / ".lab" / self.name

    def lab(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith("LAB_")}
        return subprocess.run([sys.executable, "-m", "lab.cli", *args], cwd=self.directory,
                              env={**env, **self.env, "COLUMNS": "200"}, capture_output=True, text=True,
                              timeout=timeout)

    def ok(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        result = self.lab(*args, timeout=timeout)
        assert result.returncode == 0, f"lab {' '.join(args)}:\n{result.stdout}{result.stderr}"
        return result

    def etcd_put(self, key: str, value: str) -> None:
        self.ok("etcdctl", "--", "put", key, value)

    def etcd_get(self, key: str) -> str | None:
        out = self.ok("etcdctl", "--", "get", key, "--print-value-only").stdout
        return out[:-1] if out else None


def one_message(result: subprocess.CompletedProcess, code: int, *fragments: str) -> None:
    """Failed as a fault should: the exit code, one error and its fix, no traceback."""
    shown = result.stdout + result.stderr
    assert result.returncode == code, shown
    assert "Traceback" not in shown
    assert result.stderr.count("error:") == 1 and "fix:" in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Project:
    from lab.images.build import build_image

    image = build_image("labos", "1")
    root = tmp_path_factory.mktemp("corpus")
    images = root / "cache" / "lab" / "images"
    images.mkdir(parents=True)
    # The node image is read-only below every node's overlay: links are enough, and fast.
    subprocess.run(["cp", "-al", str(image.path), str(images / image.path.name)], check=True)
    (root / "project").mkdir()
    project = Project(root / "project", {"XDG_CACHE_HOME": str(root / "cache")}, name="corpus")
    (project.directory / "lab.yaml").write_text("name: corpus\nprovider: nspawn\nnodes: {count: 2}\n")
    project.ok("up")
    yield project
    project.lab("destroy")
    assert not project.lab_dir.exists()


def nodes_running(project: Project) -> list[str]:
    statuses = json.loads(project.ok("status", "--json").stdout)["nodes"]
    return [n["name"] for n in statuses if n["state"] == "running"]


def test_status_shows_each_nodes_memory(corpus):
    nodes = json.loads(corpus.ok("status", "--json").stdout)["nodes"]
    assert all(n["memory_bytes"] > 0 for n in nodes), nodes
    assert "MEMORY" in corpus.ok("status").stdout


def test_paused_node_then_up(corpus):
    state = (corpus.lab_dir / "state.json").read_text()
    corpus.ok("fault", "pause", "node-2")
    try:
        result = corpus.lab("up", timeout=120)
        one_message(result, 4, "node-2: cannot reach root@", "`lab fault resume node-2`")
        assert (corpus.lab_dir / "state.json").read_text() == state  # nothing recorded, nothing made
    finally:
        corpus.ok("fault", "resume", "node-2")
    corpus.ok("up")


def test_unit_status_of_a_machine_that_is_no_longer_a_node(corpus):
    machine = "9" * 32  # a machine record left by a node the lab no longer has
    keys = {f"/lab/fleet/machines/{machine}": {"id": machine, "name": "node-9", "ip": "10.0.0.9", "metadata": {}},
            "/lab/fleet/units/ghost.service": {"name": "ghost.service", "desired": "inactive",
                                               "text": "[Service]\nExecStart=/bin/sleep 600\n"},
            f"/lab/fleet/states/ghost.service/{machine}": {"active": "active", "sub": "running", "load": "loaded"}}
    for key, value in keys.items():
        corpus.etcd_put(key, json.dumps(value))
    try:
        for verb in ("status", "journal"):
            result = corpus.lab("unit", verb, "ghost.service")
            one_message(result, 2, "ghost.service is on machine node-9 (999999999999), which is not a node of "
                                   "this lab (nodes: node-1, node-2)",
                        f"lab etcdctl -- del /lab/fleet/machines/{machine}")
    finally:
        for key in keys:
            corpus.ok("etcdctl", "--", "del", key)


@pytest.mark.parametrize("key, value, verb", [
    ("/lab/fleet/units/bad.service", "not json", ["unit", "list"]),
    ("/lab/fleet/units/bad.service", '["a", "list"]', ["unit", "list"]),
    ("/lab/fleet/machines/" + "0" * 32, '{"id": 7}', ["machines"]),
    ("/lab/fleet/states/bad.service/" + "0" * 32, '{"active": null}', ["unit", "list"]),
    ("/lab/update/nodes/node-1", "garbage", ["update", "status"]),
    ("/lab/update/nodes/node-1", '{"node": "node-1", "version": 2}', ["update", "status"]),
    ("/lab/update/semaphore", '{"max": "one"}', ["update", "status"]),
    ("/lab/update/halted", "[]", ["update", "status"]),
], ids=["unit-not-json", "unit-list", "machine", "state", "update-garbage", "update-version", "semaphore", "halted"])
def test_malformed_records_under_the_scheduler_and_update_prefixes(corpus, key, value, verb):
    before = corpus.etcd_get(key)
    corpus.etcd_put(key, value)
    try:
        result = corpus.lab(*verb)
        one_message(result, 5, f"etcd key {key} does not hold what lab writes there", f"lab etcdctl -- del {key}")
    finally:
        if before is None:
            corpus.ok("etcdctl", "--", "del", key)
        else:
            corpus.etcd_put(key, before)
    corpus.ok(*verb)


def test_junit_into_a_missing_directory(corpus):
    runs = sorted(p.name for p in (corpus.lab_dir / "runs").glob("*")) if (corpus.lab_dir / "runs").exists() else []
    result = corpus.lab("scenario", "run", "smoke", "--junit", "missing/junit.xml")
    one_message(result, 2, "--junit missing/junit.xml: directory missing does not exist")
    assert not (corpus.directory / "missing").exists()
    assert (sorted(p.name for p in (corpus.lab_dir / "runs").glob("*"))
            if (corpus.lab_dir / "runs").exists() else []) == runs


@pytest.mark.parametrize("text", ['{"version": 1, "resources": [{"kind": "no', "[]", ""],
                         ids=["truncated", "not-an-object", "empty"])
def test_a_broken_state_file_then_status_and_destroy(corpus, text):
    state_file = corpus.lab_dir / "state.json"
    saved = state_file.read_text()
    state_file.write_text(text)
    try:
        for verb in ("status", "destroy"):
            one_message(corpus.lab(verb), 5, f"{state_file}:")
        assert state_file.read_text() == text
    finally:
        state_file.write_text(saved)
    assert nodes_running(corpus) == ["node-1", "node-2"]  # destroy acted on nothing


def test_a_missing_public_key_then_up(corpus):
    public = corpus.lab_dir / "ssh" / "id_ed25519.pub"
    saved = public.read_text()
    public.unlink()
    result = corpus.ok("up")
    assert "id_ed25519.pub was missing: derived it again from the private key" in result.stderr
    assert public.read_text() == saved


def test_a_missing_private_key_then_up(corpus):
    private = corpus.lab_dir / "ssh" / "id_ed25519"
    saved = private.read_bytes()
    state = (corpus.lab_dir / "state.json").read_text()
    private.unlink()
    try:
        one_message(corpus.lab("up"), 5, f"the lab's SSH key {private} is missing", "`lab destroy`")
        assert (corpus.lab_dir / "state.json").read_text() == state
    finally:
        private.write_bytes(saved)
        private.chmod(0o600)
    corpus.ok("exec", "--", "true")


def test_init_into_a_read_only_directory(tmp_path):
    target = tmp_path / "ro"
    target.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "lab-corpus", str(target)], check=True)
    try:
        result = Project(target).lab("init")
        one_message(result, 2, "cannot write lab.yaml: Read-only file system")
        assert os.listdir(target) == []
    finally:
        subprocess.run(["umount", str(target)], check=True)


@pytest.mark.parametrize("entry", ["{garbage", '["a", "list"]',
                                   '{"lab_id": "0badc0", "lab_dir": "LAB", "name": "corpus", "subnet": "not-a-net"}'],
                         ids=["not-json", "not-an-object", "bad-subnet"])
def test_a_corrupt_registry_entry_then_up(corpus, tmp_path, entry):
    """A garbled entry in the subnet registry claims nothing: `lab up` of another lab goes on."""
    state_home = tmp_path / "state"
    registry = state_home / "lab" / "labs"
    registry.mkdir(parents=True)
    registry.chmod(0o700)
    (registry / "0badc0.json").write_text(entry.replace("LAB", str(corpus.lab_dir)))
    (tmp_path / "other").mkdir()
    other = Project(tmp_path / "other", {**corpus.env, "XDG_STATE_HOME": str(state_home)})
    try:
        result = other.ok("up", "--provider", "nspawn", "--nodes", "1", "--no-bootstrap")
        assert "Traceback" not in result.stderr
        claims = [json.loads(p.read_text()) for p in registry.glob("*.json") if p.name != "0badc0.json"]
        assert [c["lab_dir"] for c in claims] == [str(other.lab_dir)]
    finally:
        other.lab("destroy")
    assert not other.lab_dir.exists()


def test_box_rm_of_an_image_a_halted_lab_uses(corpus):
    images = Path(corpus.env["XDG_CACHE_HOME"]) / "lab" / "images"
    image = next(images.glob("labos-1-*"))
    corpus.ok("halt")
    result = corpus.lab("box", "rm", "labos", "--version", "1")
    one_message(result, 6, f"image {image.name} is in use by lab 'corpus' in {corpus.lab_dir}", "`lab destroy`")
    assert (image / "rootfs" / "usr").is_dir()
    corpus.ok("destroy")
    result = corpus.ok("box", "rm", "labos", "--version", "1")
    assert "removed labos 1 container image" in result.stdout
    assert not image.exists()
