"""Vagrant providers with no vagrant run: host checks on fake Vagrant homes and
plugin files, preflight, `vagrant up` orchestration with fake ups, faults and
destroy on labs Vagrant never created. The real `vagrant` binary is exercised
in tests/real/vm/test_vagrant_provider.py.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from pathlib import Path

import pytest

from lab.errors import CommandError, PrerequisiteError, ProviderError
from lab.host.vagrant import plugin_installed, vagrant_environment
from lab.images.vagrantbox import current_libvirt_volume
from lab.providers import provider_class
from lab.providers.base import LabContext
from lab.providers.vagrant.libvirt import LibvirtProvider, libvirt_socket_problem
from lab.providers.vagrant.provider import VagrantProvider
from lab.providers.vagrant.render import VAGRANT_PROVIDERS, render_vagrantfile
from lab.providers.vagrant.virtualbox import VirtualboxProvider, up_concurrently
from lab.testing import contexts


def make_context(tmp_path: Path, data: dict | None = None) -> LabContext:
    return contexts.make_context(tmp_path, data or {"name": "vlab", "providers": {"libvirt": {"driver": "qemu"}}},
                                 lab_id="5eed01", subnet="10.77.9.0/24")


# ---------------------------------------------------------------- registry

@pytest.mark.parametrize("name", VAGRANT_PROVIDERS)
def test_registry_names_match_the_classes(name: str) -> None:
    cls = provider_class(name)
    assert issubclass(cls, VagrantProvider)
    assert cls.name == name
    assert cls.vagrant_provider == name


# ---------------------------------------------------------------- host checks

def test_vagrant_environment() -> None:
    base = {"PATH": "/usr/bin", "VAGRANT_DEFAULT_PROVIDER": "virtualbox", "VAGRANT_CWD": "/elsewhere",
            "VAGRANT_DOTFILE_PATH": "/x", "VAGRANT_VAGRANTFILE": "Other", "HOME": "/root"}
    env = vagrant_environment("libvirt", base)
    assert env["PATH"] == "/usr/bin" and env["HOME"] == "/root"
    for gone in ("VAGRANT_DEFAULT_PROVIDER", "VAGRANT_CWD", "VAGRANT_DOTFILE_PATH", "VAGRANT_VAGRANTFILE"):
        assert gone not in env
    assert env["VAGRANT_CHECKPOINT_DISABLE"] == "1"
    assert env["VAGRANT_PREFERRED_PROVIDERS"] == "libvirt"
    assert base["VAGRANT_DEFAULT_PROVIDER"] == "virtualbox"  # the caller's dict is left alone
    # vagrant-libvirt boots machines in parallel itself; the others one by one
    # (VirtualBox nodes get lab's own concurrency: up_concurrently).
    assert "VAGRANT_NO_PARALLEL" not in vagrant_environment("libvirt", {"VAGRANT_NO_PARALLEL": "1"})
    for provider in ("virtualbox", "hyperv", "vmware_desktop", "parallels"):
        assert vagrant_environment(provider, base)["VAGRANT_NO_PARALLEL"] == "1"


def test_plugin_installed_reads_vagrants_plugin_files(tmp_path: Path) -> None:
    home = tmp_path / "vagrant.d"
    home.mkdir()
    embedded = tmp_path / "embedded"
    (embedded / "plugins.d").mkdir(parents=True)
    environ = {"VAGRANT_HOME": str(home), "VAGRANT_INSTALLER_EMBEDDED_DIR": str(embedded)}
    assert not plugin_installed("vagrant-lab-test-plugin", environ)
    (home / "plugins.json").write_text(json.dumps(
        {"version": "1", "installed": {"vagrant-lab-test-plugin": {"gem_version": "1.0"}}}))
    assert plugin_installed("vagrant-lab-test-plugin", environ)
    assert not plugin_installed("vagrant-lab-other-plugin", environ)
    (embedded / "plugins.d" / "vagrant-lab-other-plugin.json").write_text("{}")  # Debian's layout
    assert plugin_installed("vagrant-lab-other-plugin", environ)
    (home / "plugins.json").write_text("not json")
    assert not plugin_installed("vagrant-lab-test-plugin", environ)


def test_libvirt_socket_problem(tmp_path: Path) -> None:
    missing = tmp_path / "missing-sock"
    assert libvirt_socket_problem((missing,)) == f"libvirtd is not answering: {missing} does not exist"
    path = tmp_path / "sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(str(path))
        server.listen(1)
        assert libvirt_socket_problem((missing, path)) is None
    # the socket file outlives the listener: nobody answers
    problem = libvirt_socket_problem((path,))
    assert problem is not None and "Connection refused" in problem


def test_virtualbox_availability_names_what_is_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.delenv("VBOX_MSI_INSTALL_PATH", raising=False)
    monkeypatch.delenv("VBOX_INSTALL_PATH", raising=False)
    availability = VirtualboxProvider.availability()
    assert not availability.usable and availability.reason == "VBoxManage not found"
    tool = empty / "VBoxManage"
    tool.write_text("#!/bin/sh\n")
    tool.chmod(0o755)
    assert VirtualboxProvider.availability().reason == "vagrant not found"


def test_availability_is_cheap(monkeypatch: pytest.MonkeyPatch) -> None:
    """Cheap: `vagrant` is never run (it takes seconds to answer); judged without a clock, which a
    loaded machine makes lie (a QEMU version query may run, once: it is cached)."""
    import subprocess

    real_init = subprocess.Popen.__init__

    def no_vagrant(self, args, *rest, **kwargs):
        program = Path(args[0] if isinstance(args, (list, tuple)) else str(args).split()[0]).name
        assert program.lower() not in ("vagrant", "vagrant.exe"), f"availability ran {args}"
        real_init(self, args, *rest, **kwargs)

    monkeypatch.setattr(subprocess.Popen, "__init__", no_vagrant)
    for name in VAGRANT_PROVIDERS:
        availability = provider_class(name).availability()
        assert availability.reason


def test_libvirt_preflight_asks_for_qemu_without_kvm(tmp_path: Path) -> None:
    context = make_context(tmp_path, {"providers": {"libvirt": {"driver": "kvm", "uri": "qemu:///session"}}})
    provider = LibvirtProvider(context)
    if Path("/dev/kvm").exists() or provider.host_problem(daemon=False):
        pytest.skip("needs vagrant-libvirt on a host without /dev/kvm")
    with pytest.raises(PrerequisiteError, match="providers.libvirt.driver is kvm"):
        provider.preflight()


def as_if_on_amd64(monkeypatch: pytest.MonkeyPatch) -> None:
    """box.arch auto is this machine's architecture: the names below are an amd64 host's."""
    monkeypatch.setattr("lab.images.recipes.native_arch", lambda: "amd64")
    monkeypatch.setattr("lab.providers.vagrant.render.native_arch", lambda: "amd64")


def test_preflight_names_a_missing_box(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VAGRANT_HOME", str(tmp_path / "vagrant.d"))
    as_if_on_amd64(monkeypatch)
    provider = LibvirtProvider(make_context(tmp_path))
    problem, hint = provider.lab_problem()
    assert problem == "Vagrant box 'lab-labos-1' for libvirt is not installed"
    assert hint.startswith("build it and add it to Vagrant: `lab box add --format libvirt`")
    (tmp_path / "vagrant.d" / "boxes" / "lab-labos-1" / "0" / "libvirt").mkdir(parents=True)
    assert provider.lab_problem() is None


def test_a_missing_box_of_another_architecture_is_named_with_its_arch(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VAGRANT_HOME", str(tmp_path / "vagrant.d"))
    as_if_on_amd64(monkeypatch)
    problem, hint = LibvirtProvider(make_context(tmp_path, {"box": {"arch": "arm64"}})).lab_problem()
    assert problem == "Vagrant box 'lab-labos-1-arm64' for libvirt is not installed"
    assert "`lab box add --format libvirt --arch arm64`" in hint


def test_a_box_of_the_users_own_is_named_as_it_is_and_checked_before_vagrant_up(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VAGRANT_HOME", str(tmp_path / "vagrant.d"))
    context = make_context(tmp_path, {"box": {"vagrant": "debian/bookworm64"}})
    assert 'config.vm.box = "debian/bookworm64"' in render_vagrantfile(context, "libvirt")
    problem, hint = LibvirtProvider(context).lab_problem()
    assert problem == "Vagrant box 'debian/bookworm64' for libvirt is not installed"
    assert hint.startswith("add it to Vagrant first: `vagrant box add debian/bookworm64 --provider libvirt`")
    (tmp_path / "vagrant.d" / "boxes" / "debian-VAGRANTSLASH-bookworm64" / "12.20240905.1" / "libvirt").mkdir(
        parents=True)
    assert LibvirtProvider(context).lab_problem() is None


def test_the_pool_copy_of_the_added_box_is_named_as_vagrant_libvirt_names_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VAGRANT_HOME", str(tmp_path))
    assert current_libvirt_volume("lab-labos-1") is None
    for layout in ("0/libvirt", "0/amd64/libvirt"):  # Vagrant 2.3, Vagrant 2.4 (an architecture level)
        image = tmp_path / "boxes" / "lab-labos-1" / layout / "box.img"
        image.parent.mkdir(parents=True)
        image.touch()
        os.utime(image, (1796084965, 1796084965))
        assert current_libvirt_volume("lab-labos-1") == "lab-labos-1_vagrant_box_image_0_1796084965_box.img"
        shutil.rmtree(tmp_path / "boxes")


def test_preflight_names_a_missing_synced_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VAGRANT_HOME", str(tmp_path / "vagrant.d"))
    (tmp_path / "vagrant.d" / "boxes" / "lab-labos-1" / "0" / "amd64" / "libvirt").mkdir(parents=True)
    context = make_context(tmp_path, {"synced_folders": [{"host": "src", "guest": "/src"}]})
    problem = LibvirtProvider(context).lab_problem()
    assert problem is not None and problem[0].startswith("synced_folders[0].host: ")
    (tmp_path / "project" / "src").mkdir(parents=True)
    assert LibvirtProvider(context).lab_problem() is None


def test_auto_selection_sees_lab_boxes_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VAGRANT_HOME", str(tmp_path / "vagrant.d"))
    assert not LibvirtProvider.lab_boxes_added()
    (tmp_path / "vagrant.d" / "boxes" / "debian-VAGRANTSLASH-bookworm64" / "12" / "libvirt").mkdir(parents=True)
    assert not LibvirtProvider.lab_boxes_added()  # somebody else's box: not a Lab OS box
    (tmp_path / "vagrant.d" / "boxes" / "lab-labos-1" / "0" / "virtualbox").mkdir(parents=True)
    assert not LibvirtProvider.lab_boxes_added() and VirtualboxProvider.lab_boxes_added()
    (tmp_path / "vagrant.d" / "boxes" / "lab-labos-1" / "0" / "amd64" / "libvirt").mkdir(parents=True)
    assert LibvirtProvider.lab_boxes_added()


# ---------------------------------------------------------------- orchestration, faults, destroy

class FakeVagrantUps:
    """Stands in for one `vagrant up NODE` each: records when each ran and how many ran at once."""

    def __init__(self, fail: set[str] = frozenset(), seconds: float = 0.2) -> None:
        import threading

        self.fail, self.seconds = fail, seconds
        self.lock = threading.Lock()
        self.running = 0
        self.most_at_once = 0
        self.spans: dict[str, tuple[float, float]] = {}

    def __call__(self, node: str) -> None:
        with self.lock:
            self.running += 1
            self.most_at_once = max(self.most_at_once, self.running)
        start = time.monotonic()
        time.sleep(self.seconds)
        with self.lock:
            self.running -= 1
            self.spans[node] = (start, time.monotonic())
        if node in self.fail:
            raise CommandError(f"vagrant up {node}", where="test", exit_status=1, output="VBoxManage: error")


NODES = ["node-1", "node-2", "node-3", "node-4"]


def test_up_concurrently_imports_with_the_first_then_clones_the_rest_at_once() -> None:
    ups = FakeVagrantUps()
    progress: list[str] = []
    up_concurrently(NODES, ups, first_alone=True, progress=progress.append)
    first_end = ups.spans["node-1"][1]
    assert all(ups.spans[n][0] >= first_end for n in NODES[1:])  # the master clone exists before the rest
    assert ups.most_at_once == 3
    assert progress == ["vagrant up node-2 node-3 node-4: 3 at once"]


def test_up_concurrently_without_linked_clones_starts_everything_at_once() -> None:
    ups = FakeVagrantUps()
    up_concurrently(NODES, ups, first_alone=False)
    assert ups.most_at_once == 4


def test_up_concurrently_reports_every_failed_node_and_waits_for_the_rest() -> None:
    ups = FakeVagrantUps(fail={"node-2", "node-4"})
    with pytest.raises(ProviderError) as caught:
        up_concurrently(NODES, ups, first_alone=True)
    message = caught.value.message
    assert message.startswith("2 of 4 machines did not come up:")
    assert "node-2: test: `vagrant up node-2` exited 1" in message and "node-4" in message
    assert set(ups.spans) == set(NODES)  # node-3 was not abandoned half-way


def test_up_concurrently_stops_after_the_master_clone_fails() -> None:
    ups = FakeVagrantUps(fail={"node-1"})
    with pytest.raises(ProviderError, match="1 of 4 machines did not come up"):
        up_concurrently(NODES, ups, first_alone=True)
    assert set(ups.spans) == {"node-1"}


def test_virtualbox_up_runs_one_vagrant_up_per_node(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The provider's part of the orchestration: which vagrant call each node gets."""
    provider = VirtualboxProvider(make_context(tmp_path, {"name": "vb", "nodes": {"count": 3}}))
    calls: list[dict] = []

    class RecordingVagrant:
        def up(self, **kwargs):
            calls.append(kwargs)

    monkeypatch.setattr(provider, "_run", lambda call, progress=None: call(RecordingVagrant()))
    provider._vagrant_up(["node-1", "node-2", "node-3"], lambda line: None)
    assert calls[0] == {"vm_name": "node-1", "provider": "virtualbox", "provision": False}
    assert sorted(c["vm_name"] for c in calls[1:]) == ["node-2", "node-3"]


def test_faults_refuse_machines_vagrant_never_made(tmp_path: Path) -> None:
    provider = LibvirtProvider(make_context(tmp_path))
    for fault in (provider.kill, provider.pause, provider.resume, provider.reboot):
        with pytest.raises(ProviderError, match="Vagrant has not created it"):
            fault("node-2")
    with pytest.raises(Exception, match="no node named 'node-9'"):
        provider.kill("node-9")


def test_destroy_of_a_lab_never_created_removes_its_files(tmp_path: Path) -> None:
    context = make_context(tmp_path)
    (context.lab_dir / ".vagrant" / "machines" / "node-1" / "libvirt").mkdir(parents=True)
    (context.lab_dir / "Vagrantfile").write_text("# stale\n")
    (context.lab_dir / "state.json").write_text("{}")
    provider = LibvirtProvider(context)
    assert provider.machines_on_disk() == set()
    provider.destroy()
    provider.destroy()  # idempotent
    assert sorted(p.name for p in context.lab_dir.iterdir()) == ["state.json"]


def test_machines_on_disk(tmp_path: Path) -> None:
    context = make_context(tmp_path)
    machines = context.lab_dir / ".vagrant" / "machines"
    for name, ident in (("node-1", "abc"), ("node-2", ""), ("old-node", "def")):
        (machines / name / "libvirt").mkdir(parents=True)
        (machines / name / "libvirt" / "id").write_text(ident)
    assert LibvirtProvider(context).machines_on_disk() == {"node-1", "old-node"}


def test_vagrants_rewritten_progress_becomes_its_last_update():
    from lab.host.vagrant import plain_line

    upload = "\x1b[KProgress: 0%\x1b[KProgress: 1%\r\x1b[KProgress: 100%\x1b[K==> node-2: Creating image"
    assert plain_line(upload + "\n") == "==> node-2: Creating image"
    assert plain_line("\x1b[KProgress: 0%\r\x1b[0KProgress: 37%") == "Progress: 37%"
    assert plain_line("==> node-1: \x1b[1mBooting\x1b[0m  \n") == "==> node-1: Booting"
    assert plain_line("\r\x1b[K\n") == ""


def test_lab_up_notes_an_added_box_older_than_the_recipe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lab.images.cache import image_key
    from lab.images.vagrantbox import ADDED_MARKER, stale_added_box

    monkeypatch.setenv("VAGRANT_HOME", str(tmp_path / "vagrant.d"))
    as_if_on_amd64(monkeypatch)
    added = tmp_path / "vagrant.d" / "boxes" / "lab-labos-1" / "0" / "libvirt"
    added.mkdir(parents=True)
    provider = LibvirtProvider(make_context(tmp_path))
    assert stale_added_box("labos", "1", "libvirt") is None  # added by hand: lab cannot tell
    (added / ADDED_MARKER).write_text(json.dumps({"key": image_key("labos", "1", "vm")}))
    assert stale_added_box("labos", "1", "libvirt") is None and provider.preflight_notes() == []
    (added / ADDED_MARKER).write_text(json.dumps({"key": "0123456789ab"}))
    assert stale_added_box("labos", "1", "libvirt") == "0123456789ab"
    [note] = provider.preflight_notes()
    assert "lab-labos-1 is an older build (0123456789ab)" in note and "`lab box add --format libvirt`" in note
    own = LibvirtProvider(make_context(tmp_path, {"box": {"vagrant": "debian/bookworm64"}}))
    assert own.preflight_notes() == []
