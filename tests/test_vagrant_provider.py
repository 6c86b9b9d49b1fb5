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
from lab.network import node_addresses
from lab.providers import provider_class
from lab.providers.base import LabContext, NodeState
from lab.providers.vagrant import (LibvirtProvider, SSHConfigEntry, VagrantProvider, VirtualboxProvider,
                                   libvirt_socket_problem, node_state, parse_ssh_config, parse_vagrant_error,
                                   plugin_installed, ssh_endpoint, vagrant_environment)
from lab.render import VAGRANT_PROVIDERS
from lab.spec import LabSpec

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
    assert env["VAGRANT_NO_PARALLEL"] == "1"
    assert env["VAGRANT_PREFERRED_PROVIDERS"] == "libvirt"
    assert base["VAGRANT_DEFAULT_PROVIDER"] == "virtualbox"  # the caller's dict is left alone


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
    assert provider.lab_problem()[0] == "Vagrant box 'lab-labos-1' for libvirt is not installed"
    (tmp_path / "vagrant.d" / "boxes" / "lab-labos-1" / "0" / "libvirt").mkdir(parents=True)
    assert provider.lab_problem() is None


def test_preflight_names_a_missing_synced_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VAGRANT_HOME", str(tmp_path / "vagrant.d"))
    (tmp_path / "vagrant.d" / "boxes" / "lab-labos-1" / "0" / "amd64" / "libvirt").mkdir(parents=True)
    context = make_context(tmp_path, {"synced_folders": [{"host": "src", "guest": "/src"}]})
    problem = LibvirtProvider(context).lab_problem()
    assert problem is not None and problem[0].startswith("synced_folders[0].host: ")
    (tmp_path / "project" / "src").mkdir(parents=True)
    assert LibvirtProvider(context).lab_problem() is None


# ---------------------------------------------------------------- no vagrant needed

def test_partition_and_heal_are_not_implemented(tmp_path: Path) -> None:
    provider = LibvirtProvider(make_context(tmp_path))
    with pytest.raises(ProviderError, match="partition on Vagrant VMs is not implemented yet"):
        provider.partition([["node-1"], ["node-2", "node-3"]])
    with pytest.raises(ProviderError, match="not implemented yet"):
        provider.heal()


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
    assert provider.ssh_endpoints() == {}


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
