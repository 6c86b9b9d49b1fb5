"""Vagrant providers against the real `vagrant` binary on rendered labs
(skipped where vagrant is not installed). What needs no vagrant is in
tests/unit/test_vagrant_parsers.py and tests/unit/test_vagrant_offline.py.

No VM is booted here: the real tests run `vagrant validate`, `vagrant status`
and commands that fail before a VM would be made.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from lab.errors import CommandError, ProviderError
from lab.providers import provider_class
from lab.providers.base import LabContext, NodeState
from lab.providers.vagrant.libvirt import LibvirtProvider
from lab.providers.vagrant.render import VAGRANT_PROVIDERS
from lab.providers.vagrant.virtualbox import VirtualboxProvider
from lab.testing import contexts

HAVE_VAGRANT = shutil.which("vagrant") is not None
needs_vagrant = pytest.mark.skipif(not HAVE_VAGRANT, reason="vagrant not installed")


def make_context(tmp_path: Path, data: dict | None = None) -> LabContext:
    return contexts.make_context(tmp_path, data or {"name": "vlab", "providers": {"libvirt": {"driver": "qemu"}}},
                                 lab_id="5eed01", subnet="10.77.9.0/24")


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
    # What Vagrant accepted leaves the guest to lab's adoption: no key swap, the private NIC unconfigured.
    text = (context.lab_dir / "Vagrantfile").read_text()
    assert "config.ssh.insert_key = false" in text and text.count(", auto_config: false") == 3
    statuses = provider.status()
    assert [s.name for s in statuses] == ["node-1", "node-2", "node-3"]
    assert all(s.state is NodeState.NOT_CREATED for s in statuses), statuses
    assert [s.ip for s in statuses] == ["10.77.9.11", "10.77.9.12", "10.77.9.13"]


@needs_vagrant
@pytest.mark.parametrize("name", VAGRANT_PROVIDERS)
def test_real_vagrant_validates_arm64_labs(name: str, tmp_path: Path) -> None:
    """An arm64 lab (box.arch, what `auto` picks on Apple silicon): each provider's Vagrantfile is valid
    to Vagrant, names the arm64 box, and carries the settings arm64 guests need where it has any."""
    context = make_context(tmp_path, {"name": "vlab", "box": {"arch": "arm64"},
                                      "providers": {"libvirt": {"driver": "qemu"}}})
    provider_class(name)(context).validate()
    text = (context.lab_dir / "Vagrantfile").read_text()
    assert 'config.vm.box = "lab-labos-1-arm64"' in text
    if name == "libvirt":
        for line in ('lv.machine_arch = "aarch64"', 'lv.machine_type = "virt"', 'lv.cpu_model = "cortex-a57"',
                     'lv.loader = "/usr/share/qemu-efi-aarch64/QEMU_EFI.fd"', 'lv.graphics_type = "none"'):
            assert line in text
    if name == "vmware_desktop":
        assert 'vm.vmx["guestOS"] = "arm-debian12-64"' in text


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
