"""Vagrant providers: pure parsers and mappings on fixed text, then the real
`vagrant` binary on rendered labs (skipped where vagrant is not installed).

No VM is booted here: the real tests run `vagrant validate`, `vagrant status`
and commands that fail before a VM would be made.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import socket
import time
from pathlib import Path

import pytest

from lab.errors import CommandError, PrerequisiteError, ProviderError
from lab.host.network import node_addresses
from lab.providers import provider_class
from lab.providers.base import LabContext, NodeState
from lab.providers.vagrant.provider import (LibvirtProvider, SSHConfigEntry, VagrantProvider, VirtualboxProvider,
                                   adoption_script, libvirt_socket_problem, node_state, parse_adoption_output,
                                   parse_ssh_config, parse_vagrant_error, partition_scripts, plugin_installed,
                                   ssh_endpoint, up_concurrently, vagrant_environment)
from lab.providers.vagrant.render import VAGRANT_PROVIDERS, render_vagrantfile
from lab.model.spec import LabSpec

HAVE_VAGRANT = shutil.which("vagrant") is not None
needs_vagrant = pytest.mark.skipif(not HAVE_VAGRANT, reason="vagrant not installed")


def make_context(tmp_path: Path, data: dict | None = None, *, lab_id: str = "5eed01") -> LabContext:
    spec = LabSpec.model_validate(data or {"name": "vlab", "providers": {"libvirt": {"driver": "qemu"}}})
    nodes = spec.node_specs()
    lab_dir = tmp_path / "project" / ".lab" / spec.name
    subnet = "10.77.9.0/24"
    return LabContext(spec=spec, lab_dir=lab_dir, lab_id=lab_id, nodes=nodes,
                      addresses=node_addresses(ipaddress.IPv4Network(subnet), [n.name for n in nodes]),
                      subnet=subnet, ssh_key=lab_dir / "ssh" / "id_ed25519",
                      known_hosts=lab_dir / "ssh" / "known_hosts")


# ---------------------------------------------------------------- registry

@pytest.mark.parametrize("name", VAGRANT_PROVIDERS)
def test_registry_names_match_the_classes(name: str) -> None:
    cls = provider_class(name)
    assert issubclass(cls, VagrantProvider)
    assert cls.name == name
    assert cls.vagrant_provider == name


# ---------------------------------------------------------------- state mapping

@pytest.mark.parametrize(("raw", "expected"), [
    ("not_created", NodeState.NOT_CREATED),
    ("running", NodeState.RUNNING),
    ("poweroff", NodeState.STOPPED),
    ("aborted", NodeState.STOPPED),
    ("shutoff", NodeState.STOPPED),       # libvirt
    ("off", NodeState.STOPPED),           # hyperv
    ("not_running", NodeState.STOPPED),   # vmware_desktop
    ("stopped", NodeState.STOPPED),       # parallels
    ("saved", NodeState.PAUSED),
    ("paused", NodeState.PAUSED),
    ("suspended", NodeState.PAUSED),
    ("Running", NodeState.RUNNING),
    ("gurumeditation", NodeState.UNKNOWN),
    ("inaccessible", NodeState.UNKNOWN),
    ("", NodeState.UNKNOWN),
    (None, NodeState.UNKNOWN),
])
def test_node_state(raw: str | None, expected: NodeState) -> None:
    assert node_state(raw) is expected


# ---------------------------------------------------------------- ssh-config parser

# What `vagrant ssh-config` prints for three machines (blank lines included:
# Vagrant's template leaves them around IdentityFile).
SSH_CONFIG = """\
Host node-1
  HostName 192.168.121.17
  User vagrant
  Port 22
  UserKnownHostsFile /dev/null
  StrictHostKeyChecking no
  PasswordAuthentication no

  IdentityFile /home/me/proj/.lab/lab/.vagrant/machines/node-1/libvirt/private_key

  IdentitiesOnly yes
  LogLevel FATAL

Host node-2
  HostName 127.0.0.1
  User vagrant
  Port 2200
  UserKnownHostsFile /dev/null
  StrictHostKeyChecking no
  PasswordAuthentication no
  IdentityFile "/home/me/My Projects/.lab/lab/.vagrant/machines/node-2/virtualbox/private_key"
  IdentityFile /home/me/.vagrant.d/insecure_private_key
  IdentitiesOnly yes
  LogLevel FATAL
  PubkeyAcceptedKeyTypes +ssh-rsa
  HostKeyAlgorithms +ssh-rsa

# a comment
host node-3
  hostname=10.0.0.5
  user = core
  PORT 2222
  Port 9999
  identityfile "C:/Users/Jane Doe/.vagrant.d/insecure_private_key"
  ProxyCommand ssh -W %h:%p "jump host"
"""


def test_parse_ssh_config_multi_host() -> None:
    entries = parse_ssh_config(SSH_CONFIG)
    assert list(entries) == ["node-1", "node-2", "node-3"]
    one = entries["node-1"]
    assert (one.hostname, one.port, one.user) == ("192.168.121.17", 22, "vagrant")
    assert one.identity_files == ("/home/me/proj/.lab/lab/.vagrant/machines/node-1/libvirt/private_key",)
    assert one.options == {"UserKnownHostsFile": "/dev/null", "StrictHostKeyChecking": "no",
                           "PasswordAuthentication": "no", "IdentitiesOnly": "yes", "LogLevel": "FATAL"}


def test_parse_ssh_config_quoted_paths_and_repeats() -> None:
    two = parse_ssh_config(SSH_CONFIG)["node-2"]
    assert two.identity_files == ("/home/me/My Projects/.lab/lab/.vagrant/machines/node-2/virtualbox/private_key",
                                  "/home/me/.vagrant.d/insecure_private_key")
    assert two.options["PubkeyAcceptedKeyTypes"] == "+ssh-rsa"


def test_parse_ssh_config_case_equals_and_first_value_wins() -> None:
    three = parse_ssh_config(SSH_CONFIG)["node-3"]
    assert (three.hostname, three.user, three.port) == ("10.0.0.5", "core", 2222)
    assert three.identity_files == ("C:/Users/Jane Doe/.vagrant.d/insecure_private_key",)
    # a value that is not one quoted string is kept as written
    assert three.options["ProxyCommand"] == 'ssh -W %h:%p "jump host"'


def test_parse_ssh_config_empty_and_bad_port() -> None:
    assert parse_ssh_config("") == {}
    with pytest.raises(ProviderError, match="Port 'x' of host 'a'"):
        parse_ssh_config("Host a\n  Port x\n")


def test_ssh_endpoint_from_entry() -> None:
    entry = parse_ssh_config(SSH_CONFIG)["node-2"]
    endpoint = ssh_endpoint("node-2", entry)
    assert (endpoint.node, endpoint.host, endpoint.port, endpoint.user) == ("node-2", "127.0.0.1", 2200, "vagrant")
    assert endpoint.identity_file == Path(
        "/home/me/My Projects/.lab/lab/.vagrant/machines/node-2/virtualbox/private_key")
    assert endpoint.known_hosts is None
    assert endpoint.extra_options["StrictHostKeyChecking"] == "no"


def test_ssh_endpoint_missing_fields() -> None:
    with pytest.raises(ProviderError, match="gives no Port, IdentityFile"):
        ssh_endpoint("n", SSHConfigEntry(host="n", hostname="h", user="u"))


def test_parse_vagrant_error() -> None:
    output = (
        "1795738283,,ui,error,No usable default provider could be found for your system.\\n\\n"
        "Examples are VirtualBox%!(VAGRANT_COMMA) VMware%!(VAGRANT_COMMA) Hyper-V.\n"
        "1795738283,,error-exit,Vagrant::Errors::NoDefaultProvider,No usable default provider could be found"
        " for your system.\\n\\nExamples are VirtualBox%!(VAGRANT_COMMA) VMware%!(VAGRANT_COMMA) Hyper-V.\n")
    kind, message = parse_vagrant_error(output)
    assert kind == "Vagrant::Errors::NoDefaultProvider"
    assert message == ("No usable default provider could be found for your system.\n\n"
                       "Examples are VirtualBox, VMware, Hyper-V.")
    assert parse_vagrant_error("1795738283,node-1,state,not_created\n") == (None, "")


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


def test_availability_is_cheap() -> None:
    started = time.monotonic()
    for name in VAGRANT_PROVIDERS:
        availability = provider_class(name).availability()
        assert availability.reason
    assert time.monotonic() - started < 0.5


def test_libvirt_preflight_asks_for_qemu_without_kvm(tmp_path: Path) -> None:
    context = make_context(tmp_path, {"providers": {"libvirt": {"driver": "kvm", "uri": "qemu:///session"}}})
    provider = LibvirtProvider(context)
    if Path("/dev/kvm").exists() or provider.host_problem(daemon=False):
        pytest.skip("needs vagrant-libvirt on a host without /dev/kvm")
    with pytest.raises(PrerequisiteError, match="providers.libvirt.driver is kvm"):
        provider.preflight()


def test_preflight_names_a_missing_box(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VAGRANT_HOME", str(tmp_path / "vagrant.d"))
    provider = LibvirtProvider(make_context(tmp_path))
    problem, hint = provider.lab_problem()
    assert problem == "Vagrant box 'lab-labos-1' for libvirt is not installed"
    assert hint.startswith("build it and add it to Vagrant: `lab box add --format libvirt`")
    (tmp_path / "vagrant.d" / "boxes" / "lab-labos-1" / "0" / "libvirt").mkdir(parents=True)
    assert provider.lab_problem() is None


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
    from lab.images.vagrantbox import current_libvirt_volume

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


# ---------------------------------------------------------------- no vagrant needed

ADDRESSES = {"node-1": "10.77.9.11", "node-2": "10.77.9.12", "node-3": "10.77.9.13", "node-10": "10.77.9.20"}


def test_partition_scripts_cut_each_group_off_from_the_others() -> None:
    scripts = partition_scripts([["node-1"], ["node-2", "node-3"]], ADDRESSES)
    assert set(scripts) == set(ADDRESSES)
    one = scripts["node-1"]
    # Replaces any earlier partition whole: declare, delete, define.
    assert one.startswith("table inet lab_partition\ndelete table inet lab_partition\n")
    assert "ip saddr { 10.77.9.12, 10.77.9.13 } drop;" in one
    assert "ip daddr { 10.77.9.12, 10.77.9.13 } drop;" in one
    assert "ip saddr { 10.77.9.11 } drop;" in scripts["node-2"] == scripts["node-3"]
    # A node in no group keeps talking to everyone: its table is only removed.
    assert scripts["node-10"] == "table inet lab_partition\ndelete table inet lab_partition\n"


def test_partition_scripts_sort_addresses_numerically_and_skip_empty_sides() -> None:
    scripts = partition_scripts([["node-10", "node-2"], []], ADDRESSES)
    assert "drop" not in scripts["node-10"] and "drop" not in scripts["node-2"]
    scripts = partition_scripts([["node-1"], ["node-10", "node-2"]], ADDRESSES)
    assert "{ 10.77.9.12, 10.77.9.20 }" in scripts["node-1"]


def test_adoption_script_and_its_output() -> None:
    script = adoption_script("ssh-ed25519 AAAAC3 lab-x", "node-1")
    assert "grep -qxF 'ssh-ed25519 AAAAC3 lab-x' /root/.ssh/authorized_keys" in script
    assert "printf '%s\\n' node-1 > /etc/hostname\nhostname node-1\n" in script
    for command, package in (("python3", "python3"), ("nft", "nftables"), ("etcd", "etcd-server")):
        assert f'command -v {command} >/dev/null 2>&1 || missing="$missing {package}"' in script
    output = "lab-installed etcd-server\nlab-host-key ssh-ed25519 AAAAkey root@node-1\n"
    assert parse_adoption_output(output, "node-1") == "ssh-ed25519 AAAAkey"
    with pytest.raises(ProviderError, match="node-1: adoption printed no host key"):
        parse_adoption_output("sudo: a password is required\n", "node-1")


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


# ---------------------------------------------------------------- the real vagrant

@needs_vagrant
@pytest.mark.parametrize("name", VAGRANT_PROVIDERS)
def test_real_vagrant_validates_and_reports_not_created(name: str, tmp_path: Path) -> None:
    context = make_context(tmp_path, {
        "name": "vlab",
        "nodes": {"count": 3, "list": [{"name": "node-1", "memory": 2048}, {"name": "node-2"}, {"name": "node-3"}]},
        "forwarded_ports": [{"guest": 2379, "host": 23790}],
        "synced_folders": [{"host": ".", "guest": "/project"}],
        "providers": {"libvirt": {"driver": "qemu"}},
    })
    provider = provider_class(name)(context)
    provider.validate()
    assert (context.lab_dir / "Vagrantfile").is_file()
    statuses = provider.status()
    assert [s.name for s in statuses] == ["node-1", "node-2", "node-3"]
    assert all(s.state is NodeState.NOT_CREATED for s in statuses), statuses
    assert [s.ip for s in statuses] == ["10.77.9.11", "10.77.9.12", "10.77.9.13"]


@needs_vagrant
def test_real_vagrant_without_any_usable_provider(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # VAGRANT_NO_PLUGINS: as on a host with Vagrant alone and no hypervisor
    monkeypatch.setenv("VAGRANT_NO_PLUGINS", "1")
    provider = VirtualboxProvider(make_context(tmp_path))
    if provider.hypervisor_problem() is None:
        pytest.skip("VirtualBox is installed")
    provider.validate()  # falls back to --ignore-provider
    statuses = provider.status()
    assert all(s.state is NodeState.NOT_CREATED for s in statuses)
    assert "No usable default provider" in statuses[0].detail


@needs_vagrant
def test_real_vagrant_validate_failure_is_a_provider_error(tmp_path: Path) -> None:
    context = make_context(tmp_path, {"synced_folders": [{"host": "./absent", "guest": "/absent"}]})
    with pytest.raises(ProviderError, match="vagrant validate failed:(.|\n)*host path of the shared folder is missing"):
        LibvirtProvider(context).validate()


@needs_vagrant
def test_real_vagrant_ssh_endpoints_of_a_lab_not_running(tmp_path: Path) -> None:
    provider = LibvirtProvider(make_context(tmp_path))
    assert provider.vagrant_ssh_endpoints() == {}
    # lab's own endpoints need no vagrant: root on each node's private address.
    endpoint = provider.ssh_endpoints()["node-1"]
    assert (endpoint.user, endpoint.host, endpoint.port) == ("root", "10.77.9.11", 22)
    assert endpoint.known_hosts == provider.context.known_hosts


@needs_vagrant
@pytest.mark.skipif(VirtualboxProvider.hypervisor_problem() is None, reason="VirtualBox is installed")
def test_real_vagrant_failure_carries_command_and_output(tmp_path: Path) -> None:
    provider = VirtualboxProvider(make_context(tmp_path))
    progress: list[str] = []
    with pytest.raises(CommandError) as caught:
        provider.start("node-1", progress=progress.append)
    error = caught.value
    assert error.command == "vagrant up node-1 --no-provision --provider=virtualbox"
    assert error.exit_status == 1
    assert "VirtualBox" in error.output and "VBoxManage" in str(error)
    assert any("VirtualBox" in line for line in progress)  # streamed as it came


def test_auto_selection_sees_lab_boxes_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VAGRANT_HOME", str(tmp_path / "vagrant.d"))
    assert not LibvirtProvider.lab_boxes_added()
    (tmp_path / "vagrant.d" / "boxes" / "debian-VAGRANTSLASH-bookworm64" / "12" / "libvirt").mkdir(parents=True)
    assert not LibvirtProvider.lab_boxes_added()  # somebody else's box: not a Lab OS box
    (tmp_path / "vagrant.d" / "boxes" / "lab-labos-1" / "0" / "virtualbox").mkdir(parents=True)
    assert not LibvirtProvider.lab_boxes_added() and VirtualboxProvider.lab_boxes_added()
    (tmp_path / "vagrant.d" / "boxes" / "lab-labos-1" / "0" / "amd64" / "libvirt").mkdir(parents=True)
    assert LibvirtProvider.lab_boxes_added()
