"""A hostile node: its root user tries to turn the host (root) against itself.

Each test is an escape tried from inside a real nspawn node as root, over
lab's SSH, followed by what makes the host act on it (a reboot, a restart,
`lab status`). Afterwards the host is checked unchanged: its /usr, a scratch
"victim" directory the attack aimed at, and the node boots again (or lab
refuses it with one message). The first tests check nodefs itself on plain
files: it is the one door through which host code touches a node's tree.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path

import pytest

from lab.core.lab import Lab
from lab.errors import ProviderError
from lab.model.spec import Override
from lab.providers.base import NodeState
from lab.providers.nspawn import nodefs

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("systemd-nspawn") is None,
                                reason="needs root and systemd-nspawn")

BOOT_JSON = "/etc/lab/boot.json"


# ---------------------------------------------------------------- nodefs on plain files


def test_nodefs_reads_only_regular_small_files_through_real_directories(tmp_path):
    root, victim = tmp_path / "root", tmp_path / "victim"
    (root / "etc" / "lab").mkdir(parents=True)
    victim.mkdir()
    (victim / "secret").write_text("host secret")
    (root / "etc" / "lab" / "boot.json").write_text('{"slot": "b"}')
    os.symlink("/dev/zero", root / "etc" / "lab" / "zero")
    os.mkfifo(root / "etc" / "lab" / "fifo")
    (root / "etc" / "lab" / "big").write_bytes(b"x" * (nodefs.READ_CAP + 1))
    with open(root / "etc" / "lab" / "sparse", "wb") as handle:
        handle.truncate(1 << 40)  # 1 TiB of nothing
    os.symlink(victim, root / "etc" / "link")

    assert nodefs.read_node_file(root, "etc/lab/boot.json") == b'{"slot": "b"}'
    for relpath in ("etc/lab/zero", "etc/lab/fifo", "etc/lab/big", "etc/lab/sparse", "etc/link/secret",
                    "etc/lab", "../victim/secret", "/etc/lab/boot.json", "etc/lab/../../../victim/secret"):
        started = time.monotonic()
        with pytest.raises(nodefs.UnsafeNodePath):
            nodefs.read_node_file(root, relpath)
        assert time.monotonic() - started < 1, relpath
    with pytest.raises(FileNotFoundError):
        nodefs.read_node_file(root, "etc/lab/absent")


def test_nodefs_writes_replace_links_and_never_follow_them(tmp_path):
    root, victim = tmp_path / "root", tmp_path / "victim"
    (root / "etc").mkdir(parents=True)
    victim.mkdir()
    os.symlink(victim, root / "etc" / "network")  # a directory on the way
    os.symlink(victim / "hostname", root / "etc" / "hostname")  # the target itself
    with pytest.raises(nodefs.UnsafeNodePath, match="not a directory"):
        nodefs.write_node_file(root, "etc/network/10.network", b"x", 0o644)
    nodefs.write_node_file(root, "etc/hostname", b"node-1\n", 0o644)
    assert not (root / "etc" / "hostname").is_symlink()
    assert (root / "etc" / "hostname").read_text() == "node-1\n"
    nodefs.write_node_file(root, "root/.ssh/authorized_keys", b"key\n", 0o600, owner=(4242, 4243))
    made = (root / "root" / ".ssh" / "authorized_keys").stat()
    assert (made.st_mode & 0o777, made.st_uid, made.st_gid) == (0o600, 4242, 4243)
    assert (root / "root").stat().st_uid == 4242
    assert list(victim.iterdir()) == []


def test_nodefs_links_replace_what_is_there_and_never_follow_a_directory_link(tmp_path):
    root, victim = tmp_path / "root", tmp_path / "victim"
    (root / "etc" / "systemd" / "system").mkdir(parents=True)
    victim.mkdir()
    os.symlink(victim, root / "etc" / "systemd" / "system" / "multi-user.target.wants")
    with pytest.raises(nodefs.UnsafeNodePath, match="not a directory"):
        nodefs.link_node_file(root, "etc/systemd/system/multi-user.target.wants/etcd.service", "/lib/x")
    (root / "etc" / "unit").write_text("a file in the way")
    nodefs.link_node_file(root, "etc/unit", "/lib/systemd/system/etcd.service", owner=(4242, 4243))
    assert os.readlink(root / "etc" / "unit") == "/lib/systemd/system/etcd.service"
    assert (root / "etc" / "unit").lstat().st_uid == 4242
    assert list(victim.iterdir()) == []


def test_a_seed_is_written_as_systemctl_enable_and_the_nodes_own_users_would_leave_it(tmp_path):
    from lab.providers.base import NodeFile, NodeSeed
    from lab.providers.nspawn import overlay

    image, merged = tmp_path / "image", tmp_path / "merged"
    (image / "usr/lib/systemd/system").mkdir(parents=True)
    (image / "usr/lib/systemd/system/etcd.service").write_text("[Unit]\n")
    os.symlink("usr/lib", image / "lib")
    (merged / "etc").mkdir(parents=True)
    (merged / "etc/passwd").write_text("root:x:0:0::/root:/bin/sh\netcd:x:100:101::/var/lib/etcd:/bin/false\n")
    os.chown(merged, 100000, 100000)  # a user-namespaced node's root after its first boot
    seed = NodeSeed((NodeFile("/etc/etcd/pki/node.key", b"key", 0o600, owner="etcd"),
                     NodeFile("/etc/systemd/system/lab-agent.service", b"[Unit]\r\n", 0o644)),
                    ("etcd.service", "lab-agent.service"))
    overlay.write_seed(merged, image, seed)
    key = (merged / "etc/etcd/pki/node.key").stat()
    assert (key.st_mode & 0o777, key.st_uid, key.st_gid) == (0o600, 100100, 100000)  # group root's, as over SSH
    assert (merged / "etc/systemd/system/lab-agent.service").read_bytes() == b"[Unit]\n"  # LF on nodes
    wants = merged / "etc/systemd/system/multi-user.target.wants"
    assert os.readlink(wants / "etcd.service") == "/lib/systemd/system/etcd.service"
    assert os.readlink(wants / "lab-agent.service") == "/etc/systemd/system/lab-agent.service"
    with pytest.raises(nodefs.UnsafeNodePath, match="no user 'nobody-here'"):
        overlay.write_seed(merged, image, NodeSeed((NodeFile("/etc/x", b"", 0o644, owner="nobody-here"),)))
    with pytest.raises(nodefs.UnsafeNodePath, match="no unit absent.service"):
        overlay.write_seed(merged, image, NodeSeed((), ("absent.service",)))


def test_an_idmapped_image_shows_every_owner_moved_into_the_nodes_range_and_cannot_be_written(tmp_path):
    import subprocess

    from lab.providers.nspawn import userns

    image, target, base = tmp_path / "image", tmp_path / "lower", 0x00A00000
    (image / "var/lib/etcd").mkdir(parents=True)
    os.chown(image / "var/lib/etcd", 100, 101)
    (image / "etc").mkdir()
    (image / "etc/shadow").write_text("root:*:1::::::\n")
    target.mkdir()
    userns.mount_idmapped(image, target, base)
    try:
        assert (os.stat(target / "var/lib/etcd").st_uid, os.stat(target / "var/lib/etcd").st_gid) == \
            (base + 100, base + 101)
        assert os.stat(target / "etc/shadow").st_uid == base
        with pytest.raises(OSError):
            (target / "etc/shadow").write_text("changed")
        assert os.stat(image / "etc/shadow").st_uid == 0  # the image itself is untouched
    finally:
        subprocess.run(["umount", str(target)], check=True)


@pytest.mark.parametrize("text, expected", [
    ('{"slot": "b", "try": true, "previous": "a"}', {"slot": "b", "try": True, "previous": "a"}),
    ('{"slot": "a/../../../../evil"}', {"slot": "a"}),
    ('{"slot": ["b"]}', {"slot": "a"}),
    ('{"slot": "b", "previous": "../x"}', {"slot": "b"}),
    ('["not", "an", "object"]', {"slot": "a"}),
    ("[" * 100000, {"slot": "a"}),
    (b"\xff\xfe", {"slot": "a"}),
    ("{}", {"slot": "a"}),
])
def test_boot_json_is_checked_before_anyone_uses_it(text, expected):
    from lab.node.layout import boot_record

    assert boot_record(text) == expected


def test_update_agent_halts_instead_of_looping_on_a_trial_boot_without_previous(tmp_path, monkeypatch):
    """{"slot": "b", "try": true} and no `previous`: a failed health check cannot roll back."""
    import json

    from lab.node import layout, updater

    boot = tmp_path / "boot.json"
    boot.write_text('{"slot": "b", "try": true, "staging": 7}')
    monkeypatch.setattr(layout, "BOOT_FILE", boot)
    monkeypatch.setattr(updater, "os_version", lambda: "2")
    agent = updater.Updater({"name": "node-1", "endpoints": ["http://127.0.0.1:9"]})
    written: dict[str, str] = {}
    published: list[str] = []
    monkeypatch.setattr(agent.etcd, "put", lambda key, value, lease=None: written.__setitem__(key, value))
    monkeypatch.setattr(agent, "health_check", lambda: (False, "etcd is not running"))
    monkeypatch.setattr(agent, "publish", lambda state, **extra: published.append(state))
    monkeypatch.setattr(agent, "release_if_holding", lambda: None)
    monkeypatch.setattr(agent, "reboot", lambda: pytest.fail("there is no slot to reboot into"))
    agent.settle_boot()
    assert json.loads(boot.read_text()) == {"slot": "b", "rolled_back_staging": 7}
    assert "no previous slot" in json.loads(written[layout.HALTED])["reason"]
    agent.settle_boot()  # the next start: nothing is on trial any more
    assert published == ["failed", "idle"]


# ---------------------------------------------------------------- on a real node


@pytest.fixture(scope="session")
def image():
    from lab.images.build import build_image

    return build_image("labos", "1")


def open_lab(directory: Path, name: str) -> Lab:
    return Lab.open(directory / "lab.yaml", [Override(("nodes", "count"), 1, "--nodes"),
                                             Override(("provider",), "nspawn", "--provider"),
                                             Override(("name",), name, "--name")])


@pytest.fixture(scope="module")
def lab(image, tmp_path_factory):
    lab = open_lab(tmp_path_factory.mktemp("hostile"), "hostile")
    with lab.lock("up"):
        lab.up(bootstrap=False)
    yield lab
    lab.destroy()


@pytest.fixture
def host_usr():
    """The host's /usr before the test; checked unchanged after it."""
    before = usr_fingerprint()
    yield
    assert usr_fingerprint() == before, "the host's /usr changed"


def usr_fingerprint() -> list[tuple[str, int, int]]:
    found = []
    for path in (Path("/usr"), *Path("/usr").iterdir(), *Path("/usr/bin").iterdir()):
        st = path.lstat()
        found.append((str(path), st.st_mtime_ns, st.st_size))
    return found


def tree(path: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(path)): (p.read_bytes() if p.is_file() and not p.is_symlink() else None)
            for p in sorted(path.rglob("*"))}


def ssh(lab: Lab, command: str, timeout: float = 30):
    from lab.host.ssh import run

    return run(lab.ssh_endpoints()["node-1"], command, timeout=timeout)


def as_node_root(lab: Lab, command: str) -> str:
    result = ssh(lab, command)
    assert result.ok, f"{command}: {result.stdout}{result.stderr}"
    return result.stdout


def within(seconds: float, function, *args):
    """function(*args), failing the test (not hanging it) if it takes longer."""
    outcome: dict = {}

    def call() -> None:
        try:
            outcome["value"] = function(*args)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            outcome["error"] = exc

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"{getattr(function, '__name__', function)} still blocked after {seconds} s"
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


def console(lab: Lab) -> str:
    return (lab.lab_dir / "nodes" / "node-1" / "console.log").read_text(errors="replace")


def reboot_past_the_plant(lab: Lab, logged: str) -> None:
    """The host reads the planted boot.json as slot a, at once; the node reboots with the image's
    /usr; the supervisor's console log says why it ignored the file."""
    logged_before = len(console(lab))
    assert within(5, lab.provider().boot_slot, "node-1") == "a"
    within(120, lab.provider().reboot, "node-1")
    assert as_node_root(lab, ". /usr/lib/os-release; echo $ID").strip() == "labos"
    assert not ssh(lab, "test -e /usr/bin/systemd-nspawn").ok, "the host's /usr is mounted in the node"
    assert logged in console(lab)[logged_before:]


def restore_boot_json(lab: Lab) -> None:
    as_node_root(lab, f"rm -rf {BOOT_JSON}; echo '{{\"slot\": \"a\"}}' > {BOOT_JSON}")


def test_node_root_is_not_host_root(lab):
    """Nodes run in a user namespace: uid 0 inside is an unprivileged uid range of the host."""
    init = int(lab.status()[0].detail.split()[-1])  # "init pid N": the container's PID 1 as the host sees it
    first, base, count = Path(f"/proc/{init}/uid_map").read_text().split()[:3]
    assert first == "0" and int(base) > 0 and int(count) == 65536
    assert as_node_root(lab, "id -u").strip() == "0"


def test_traversal_slot_cannot_mount_a_host_directory_as_usr(lab, host_usr):
    # The node names a host path as its slot: its own upper layer, found in
    # its mountinfo, holding a link to the host's /.
    upper = as_node_root(lab, "sed -n 's/.*upperdir=\\([^,]*\\).*/\\1/p' /proc/self/mountinfo | head -1").strip()
    assert upper.startswith("/")
    slot = "a/" + "../" * 12 + upper.lstrip("/") + "/evil"
    as_node_root(lab, f"mkdir -p /evil && ln -sfn / /evil/usr && echo '{{\"slot\": \"{slot}\"}}' > {BOOT_JSON}")
    try:
        reboot_past_the_plant(lab, "is not a slot")
    finally:
        restore_boot_json(lab)
        as_node_root(lab, "rm -rf /evil")


@pytest.mark.parametrize("plant", [
    f"ln -sfn /dev/zero {BOOT_JSON}",
    f"mkfifo {BOOT_JSON}",
    f"truncate -s 1T {BOOT_JSON}",
    f"python3 -c 'print(\"[\" * 100000)' > {BOOT_JSON}",
], ids=["symlink-to-dev-zero", "fifo", "sparse-1TiB", "nested-json"])
def test_hostile_boot_json_neither_hangs_nor_exhausts_the_host(lab, host_usr, plant):
    as_node_root(lab, f"rm -f {BOOT_JSON}; {plant}")
    try:
        assert within(10, lab.provider().status)[0].state == NodeState.RUNNING
        reboot_past_the_plant(lab, "boot.json ignored")
    finally:
        restore_boot_json(lab)


def test_boot_json_behind_a_link_to_a_host_directory_is_not_read(lab, host_usr, tmp_path):
    # /etc/lab itself becomes a link to a host directory holding a FIFO named
    # boot.json: a host that followed it would block on the FIFO forever.
    victim = tmp_path / "victim"
    victim.mkdir()
    os.mkfifo(victim / "boot.json")
    before = tree(victim)
    as_node_root(lab, f"mv /etc/lab /etc/lab.real && ln -s {victim} /etc/lab")
    try:
        reboot_past_the_plant(lab, "not a directory")
    finally:
        as_node_root(lab, "rm -f /etc/lab && mv /etc/lab.real /etc/lab")
    assert tree(victim) == before


def test_replaced_proc_does_not_block_status_or_reboot(lab, host_usr):
    """The host reads the node's boot id through /proc/PID/root: the node puts a FIFO there."""
    as_node_root(lab, "mount -t tmpfs tmpfs /proc/sys && mkdir -p /proc/sys/kernel/random && "
                      "mkfifo /proc/sys/kernel/random/boot_id")
    statuses = within(10, lab.provider().status)
    assert statuses[0].state == NodeState.RUNNING and statuses[0].boot_id is None
    within(120, lab.provider().reboot, "node-1")  # a new boot has a new /proc
    assert within(10, lab.provider().status)[0].boot_id


@pytest.fixture
def victim(tmp_path):
    """A host directory the node aims at; checked unchanged after the test."""
    directory = tmp_path / "victim"
    directory.mkdir()
    (directory / "keep").write_text("host file\n")
    before = tree(directory)
    yield directory
    assert tree(directory) == before, "the host's directory changed"


@pytest.fixture
def lab1(image, tmp_path):
    lab = open_lab(tmp_path, "planted")
    with lab.lock("up"):
        lab.up(bootstrap=False)
    yield lab
    lab.destroy()


@pytest.mark.parametrize("planted", ["etc/systemd/network", "etc/lab", "etc/systemd"])
def test_links_where_the_host_writes_are_refused_with_one_message(lab1, victim, host_usr, planted):
    """The host writes the node's hostname, network and lab files at every start: the node's root
    replaces a directory on the way with a link to a host directory, then the node is restarted."""
    as_node_root(lab1, f"rm -rf /{planted} && ln -s {victim} /{planted}")
    provider = lab1.provider()
    provider.kill("node-1")
    with pytest.raises(ProviderError) as refused:
        within(60, provider.start, "node-1")
    message = refused.value.message
    assert "refused" in message and planted in message
    assert "\n" not in message and "Traceback" not in message
    assert [s.state for s in lab1.status()] == [NodeState.STOPPED]


def test_a_link_in_place_of_a_file_the_host_writes_is_replaced_not_followed(lab1, victim, host_usr):
    as_node_root(lab1, f"ln -sfn {victim}/keep /etc/hostname && ln -sfn {victim}/hosts /etc/hosts")
    provider = lab1.provider()
    provider.kill("node-1")
    within(120, provider.start, "node-1")
    assert as_node_root(lab1, "test ! -L /etc/hostname && test ! -L /etc/hosts && hostname").strip() == "node-1"
