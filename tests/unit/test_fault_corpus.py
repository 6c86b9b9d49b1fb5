"""The runtime-fault corpus, the part that needs no nodes: each fault ends in one
message naming the problem and the fix, a non-zero exit, no traceback, and
nothing half-created. (The part on real nodes is tests/real/nodes/test_runtime_faults.py.)

Also here: every verb that changes a lab takes the lab's lock and reads the
state again once it holds it; `lab box rm` refuses an image a lab uses.
"""

from __future__ import annotations

import json
import os
import socket
import threading
from pathlib import Path

import pytest

from lab.errors import ProviderError

pytestmark = pytest.mark.usefixtures("no_lab_env")

FAKE = ["--provider", "nspawn"]


def assert_one_message(result, code: int) -> None:
    """Exit code `code`, an `error:` line and a `fix:` line, no traceback."""
    assert result.exit_code == code, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    assert result.stderr.count("error:") == 1 and "fix:" in result.stderr, result.stderr


def files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


@pytest.fixture
def made(run_lab, fake_lab, project):
    """A lab made on the fake provider (2 nodes, no etcd); the calls so far forgotten."""
    result = run_lab("up", *FAKE, "--nodes", "2", "--no-bootstrap")
    assert result.exit_code == 0, result.output
    fake_lab.calls.clear()
    return project / ".lab" / "lab"


# ---------------------------------------------------------------- files lab is pointed at


def test_junit_into_a_missing_directory_is_refused_before_anything(run_lab, fake_lab, project):
    result = run_lab("test", "demo", *FAKE, "--junit", "missing/out.xml")
    assert_one_message(result, 2)
    assert "--junit missing/out.xml: directory missing does not exist" in result.stderr
    assert fake_lab.calls == [] and not (project / ".lab").exists() and not (project / "missing").exists()


def test_junit_naming_a_directory_is_refused(run_lab, fake_lab, project):
    (project / "reports").mkdir()
    result = run_lab("scenario", "run", "demo", *FAKE, "--junit", "reports")
    assert_one_message(result, 2)
    assert "reports is a directory" in result.stderr and fake_lab.calls == []


@pytest.mark.parametrize("where", ["parent-is-a-file", "read-only-fs", "no-write-permission"])
def test_init_into_an_unwritable_place(run_lab, project, where):
    if where == "parent-is-a-file":
        (project / "plain").write_text("")
        target, why = project / "plain" / "lab.yaml", "plain is not a directory"
    elif where == "read-only-fs":
        if not os.path.isdir("/sys/kernel"):
            pytest.skip("no sysfs here")
        target, why = Path("/sys/lab.yaml"), "cannot write /sys/lab.yaml"
    else:
        if os.geteuid() == 0:
            pytest.skip("root writes into a 0555 directory")
        (project / "ro").mkdir(mode=0o555)
        target, why = project / "ro" / "lab.yaml", "Permission denied"
    before = files_under(project)
    result = run_lab("init", "--file", str(target))
    assert_one_message(result, 2)
    assert why in result.stderr
    assert files_under(project) == before and not target.exists()


@pytest.mark.parametrize("text", ['{"version": 1, "resou', "", "[1, 2]", '"a string"', "null"],
                         ids=["truncated", "empty", "list", "string", "null"])
@pytest.mark.parametrize("verb", ["status", "destroy"])
def test_a_broken_state_file_stops_status_and_destroy(run_lab, project, text, verb):
    lab_dir = project / ".lab" / "lab"
    lab_dir.mkdir(parents=True)
    (lab_dir / "state.json").write_text(text)
    result = run_lab(verb)
    assert_one_message(result, 5)
    assert f"{lab_dir / 'state.json'}:" in result.stderr
    assert (lab_dir / "state.json").read_text() == text  # untouched: nothing acted on


def test_a_missing_public_key_is_derived_again_by_lab_up(run_lab, fake_lab, made):
    public = made / "ssh" / "id_ed25519.pub"
    before = public.read_text()
    public.unlink()
    result = run_lab("up", "--no-bootstrap")
    assert result.exit_code == 0, result.output
    assert "id_ed25519.pub was missing: derived it again from the private key" in result.stderr
    assert public.read_text() == before


@pytest.mark.parametrize("verb", [["up", "--no-bootstrap"], ["node", "add"]])
def test_a_missing_private_key_stops_lab_up_before_anything(run_lab, fake_lab, made, verb):
    (made / "ssh" / "id_ed25519").unlink()
    state = (made / "state.json").read_text()
    result = run_lab(*verb)
    assert_one_message(result, 5)
    assert "id_ed25519 is missing: lab cannot reach the nodes without it" in result.stderr
    assert "`lab destroy`" in result.stderr
    assert fake_lab.calls == [] and (made / "state.json").read_text() == state


@pytest.mark.parametrize("entry", [b"{not json", b"[1]", b'{"lab_id": 5}', b"\xff\xfe",
                                   b'{"lab_id": "0badc0", "lab_dir": "LAB", "name": "other", "subnet": "garbage"}',
                                   b'{"lab_id": "0badc0", "lab_dir": 7, "name": "other", "subnet": "10.77.1.0/24"}'],
                         ids=["not-json", "list", "missing-fields", "not-utf8", "bad-subnet", "bad-dir"])
def test_a_corrupt_registry_entry_claims_nothing_and_lab_up_goes_on(run_lab, fake_lab, project, tmp_path, entry):
    other = tmp_path / "other" / ".lab" / "lab"  # a lab that exists: its claim would hold
    other.mkdir(parents=True)
    (other / "state.json").write_text("{}")
    registry = project.parent / "state" / "lab" / "labs"
    registry.mkdir(parents=True)
    (registry / "0badc0.json").write_bytes(entry.replace(b"LAB", str(other).encode()))
    result = run_lab("up", *FAKE, "--no-bootstrap")
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    own = [json.loads(p.read_text()) for p in registry.glob("*.json") if p.name != "0badc0.json"]
    assert [c["name"] for c in own] == ["lab"]


# ---------------------------------------------------------------- SSH: a node that does not answer


@pytest.fixture
def silent_server():
    """A TCP port that accepts connections and then says nothing, as a paused node's sshd does."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    server.close()


def endpoint_at(tmp_path: Path, port: int):
    from lab.host.ssh import SSHEndpoint, ensure_keypair

    key = ensure_keypair(tmp_path / "ssh" / "id_ed25519", "lab-test")
    return SSHEndpoint(node="node-2", host="127.0.0.1", port=port, user="root", identity_file=key)


def test_a_silent_node_is_a_provider_error_naming_it_and_the_resume(tmp_path, silent_server):
    from lab.host.ssh import connect

    with pytest.raises(ProviderError) as caught:
        with connect(endpoint_at(tmp_path, silent_server), timeout=0.5) as connection:
            connection.run("true", in_stream=False)  # as the bootstraps use a connection
    assert caught.value.message.startswith("node-2: cannot reach root@127.0.0.1")
    assert "`lab fault resume node-2`" in caught.value.hint


def test_a_refused_connection_is_a_provider_error_too(tmp_path):
    from lab.host.ssh import run

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed again: nothing listens there
    with pytest.raises(ProviderError, match="node-2: cannot reach"):
        run(endpoint_at(tmp_path, port), "true")


def test_a_missing_identity_file_is_named(tmp_path):
    from lab.host.ssh import run

    endpoint = endpoint_at(tmp_path, 22)
    endpoint.identity_file.unlink()
    with pytest.raises(ProviderError, match="the lab's SSH key .*id_ed25519 is missing"):
        run(endpoint, "true")


# ---------------------------------------------------------------- records in etcd


class Etcd:
    """The few calls of the host's etcd client that `lab unit` reads with, over a dict."""

    def __init__(self, data: dict[str, str]) -> None:
        self.data = data

    def get(self, key: str) -> str | None:
        return self.data.get(key)

    def get_prefix(self, prefix: str) -> dict[str, str]:
        return {k: v for k, v in self.data.items() if k.startswith(prefix)}


UNIT = json.dumps({"name": "web.service", "text": "[Service]\nExecStart=/bin/true\n", "desired": "launched"})
MACHINE = json.dumps({"id": "a" * 32, "name": "node-1", "ip": "10.0.0.11"})


@pytest.mark.parametrize("key, value, why", [
    ("/lab/fleet/units/bad.service", "not json", "not JSON"),
    ("/lab/fleet/units/bad.service", "[1]", "not a JSON object"),
    ("/lab/fleet/units/bad.service", '{"name": "bad.service"}', "'text' should be str"),
    ("/lab/fleet/machines/" + "b" * 32, '{"id": 1, "name": "x", "ip": "y"}', "'id' should be str"),
    ("/lab/fleet/machines/" + "b" * 32, '{"id": "b", "name": "x", "ip": "y", "metadata": []}',
     "'metadata' should be dict"),
    ("/lab/fleet/states/web.service/" + "a" * 32, '{"active": true}', "'active' should be str"),
])
def test_malformed_scheduler_records_name_their_key(key, value, why):
    from lab.cluster.records import RecordError
    from lab.cluster.units import list_units

    etcd = Etcd({"/lab/fleet/units/web.service": UNIT, "/lab/fleet/machines/" + "a" * 32: MACHINE, key: value})
    with pytest.raises(RecordError) as caught:
        list_units(etcd)
    assert caught.value.message.startswith(f"etcd key {key} does not hold what lab writes there ({why})")
    assert f"lab etcdctl -- del {key}" in caught.value.hint


def test_a_unit_on_a_machine_that_is_no_longer_a_node_is_named():
    from lab.cluster.units import UnitUsageError, unit_endpoints

    gone = json.dumps({"id": "c" * 32, "name": "node-3", "ip": "10.0.0.13"})
    etcd = Etcd({"/lab/fleet/units/web.service": UNIT, "/lab/fleet/machines/" + "c" * 32: gone,
                 "/lab/fleet/states/web.service/" + "c" * 32: '{"active": "active", "sub": "running"}'})
    with pytest.raises(UnitUsageError) as caught:
        unit_endpoints(etcd, "web.service", {"node-1": object(), "node-2": object()})
    assert caught.value.message == ("web.service is on machine node-3 (cccccccccccc), which is not a node of this "
                                    "lab (nodes: node-1, node-2)")
    assert f"lab etcdctl -- del /lab/fleet/machines/{'c' * 32}" in caught.value.hint


# ---------------------------------------------------------------- the lab lock


# one of each group of verbs that change a lab (`lab up`, `lab halt` and `lab destroy` held the lock already)
CHANGES = [["fault", "kill", "node-1"], ["fault", "partition", "node-1"], ["reboot", "node-1"], ["node", "add"],
           ["node", "remove", "node-2"], ["update", "--to", "2"], ["update", "unlock", "node-1"],
           ["unit", "start", "web.service"], ["unit", "destroy", "web.service"]]


@pytest.mark.parametrize("args", CHANGES, ids=[" ".join(a) for a in CHANGES])
def test_every_change_is_refused_while_another_command_holds_the_lab(run_lab, fake_lab, made, monkeypatch, args):
    from lab.core import lab as core_lab, lifecycle
    from lab.core.state import lab_lock

    for module in (core_lab, lifecycle):
        monkeypatch.setattr(module, "CHANGE_WAIT", 0.05)
    state = (made / "state.json").read_text()
    with lab_lock(made, "scenario run demo"):
        result = run_lab(*args)
    assert_one_message(result, 5)
    assert f"lab lab ({made}) is busy: `lab scenario run demo` (pid {os.getpid()}) is running on it" in result.stderr
    assert fake_lab.calls == [] and (made / "state.json").read_text() == state


def test_a_change_waits_briefly_for_the_lock(run_lab, fake_lab, made):
    from lab.core.state import lab_lock

    taken, release = threading.Event(), threading.Event()

    def hold() -> None:
        with lab_lock(made, "fault pause node-2"):
            taken.set()
            release.wait(0.5)

    holder = threading.Thread(target=hold)
    holder.start()
    taken.wait()
    result = run_lab("fault", "kill", "node-1")  # waits up to CHANGE_WAIT for the holder
    holder.join()
    assert result.exit_code == 0, result.output
    assert fake_lab.calls == ["kill node-1"]


def test_the_state_is_read_again_once_the_lock_is_held(fake_lab, made):
    from lab.core.lab import Lab

    first, second = Lab.open(made.parents[1] / "lab.yaml"), Lab.open(made.parents[1] / "lab.yaml")
    with first.lock("node add"):
        first.state.record("fake-node", "node-3")
    assert not second.state.find("fake-node", "node-3")  # read before the first command's change
    with second.lock("fault partition"):
        second.state.set("partition", [["node-1"], ["node-2"]])
    kept = json.loads((made / "state.json").read_text())
    assert {"kind": "fake-node", "id": "node-3"} in kept["resources"] and kept["partition"]


# ---------------------------------------------------------------- images in use


@pytest.fixture
def cached_image(tmp_path, monkeypatch):
    """A fake built image labos 1 in a private cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    path = tmp_path / "cache" / "lab" / "images" / "labos-1-0123456789ab"
    (path / "rootfs").mkdir(parents=True)
    (path / "meta.json").write_text(json.dumps({"name": "labos", "version": "1", "key": "0123456789ab",
                                                "size_bytes": 1, "built_at": "now", "mirror": "m"}))
    return path


@pytest.mark.parametrize("how", ["slot-a", "slot-b", "created-from"])
def test_box_rm_refuses_an_image_a_lab_uses(run_lab, fake_lab, made, cached_image, how):
    state = json.loads((made / "state.json").read_text())
    node_dir = made / "nodes" / "node-1"
    node_dir.mkdir(parents=True)
    if how.startswith("slot"):  # as the nspawn provider keeps them: links in the node's directory
        state["resources"].append({"kind": "node", "id": "node-1", "dir": str(node_dir)})
        (node_dir / how).symlink_to(cached_image / "rootfs")
    else:
        state["image"] = {"name": "labos", "version": "1", "rootfs": str(cached_image / "rootfs")}
    (made / "state.json").write_text(json.dumps(state))
    result = run_lab("box", "rm", "labos")
    assert_one_message(result, 6)
    assert f"image labos-1-0123456789ab is in use by lab 'lab' in {made}" in result.stderr
    assert "`lab destroy`" in result.stderr and cached_image.exists()
    assert run_lab("destroy").exit_code == 0
    result = run_lab("box", "rm", "labos")
    assert result.exit_code == 0, result.output
    assert not cached_image.exists()


def test_box_rm_refuses_when_a_labs_state_cannot_be_read(run_lab, fake_lab, made, cached_image):
    (made / "state.json").write_text("{")
    result = run_lab("box", "rm", "labos")
    assert_one_message(result, 5)
    assert "cannot tell which images lab 'lab'" in result.stderr and cached_image.exists()


def test_images_in_use_come_from_the_registry_not_mounts(fake_lab, made, cached_image):
    from lab.core.lab import images_in_use

    assert images_in_use() == {}
    state = json.loads((made / "state.json").read_text())
    state["image"] = {"rootfs": str(cached_image / "rootfs")}
    (made / "state.json").write_text(json.dumps(state))
    assert images_in_use() == {os.path.realpath(cached_image / "rootfs"): [f"lab 'lab' in {made}"]}
