"""A remote libvirt host (`providers.libvirt.uri: qemu+ssh://...`): which URIs a lab.yaml may name, and the
login lab derives from one to reach the VMs through that host. The real thing (three VMs through an sshd on
loopback) is tests/real/vm/test_libvirt.py's remote test."""

from __future__ import annotations

import getpass

import pytest

from lab.errors import PrerequisiteError
from lab.host.jumphost import JUMP_ALIAS
from lab.model.spec import LabSpec, RemoteLibvirt, SpecError, load_spec, remote_libvirt
from lab.providers.vagrant.libvirt import LibvirtProvider
from lab.providers.vagrant.parsers import parse_ssh_config
from lab.providers.vagrant.render import render_vagrantfile
from lab.testing.contexts import make_context


VAGRANT_SSH_CONFIG = """\
Host node-1
  HostName 192.168.121.40
  User vagrant
  Port 22
  UserKnownHostsFile /dev/null
  StrictHostKeyChecking no
  PasswordAuthentication no
  IdentityFile /root/.vagrant.d/insecure_private_key
  IdentitiesOnly yes
  LogLevel FATAL
  ProxyCommand ssh '10.9.8.7' -l 'root' -i '{key}' -W %h:%p
"""


@pytest.mark.parametrize("uri, login", [
    ("qemu:///system", None),
    ("qemu:///session", None),
    ("qemu+ssh://far/system", RemoteLibvirt("far", 22, None, None)),
    ("qemu+ssh://admin@kvm-1.example.lan:2222/system", RemoteLibvirt("kvm-1.example.lan", 2222, "admin", None)),
    ("qemu+ssh://root@127.0.0.1:2201/system?keyfile=/srv/keys/id_ed25519",
     RemoteLibvirt("127.0.0.1", 2201, "root", "/srv/keys/id_ed25519")),
])
def test_accepted_uris_and_their_login(uri, login):
    assert LabSpec.model_validate({"providers": {"libvirt": {"uri": uri}}}).providers.libvirt.uri == uri
    assert remote_libvirt(uri) == login


@pytest.mark.parametrize("uri", [
    "qemu+tls://far/system",                       # reaches libvirtd, not the VMs
    "qemu+ssh://far/session",                      # another user's session daemon
    "qemu+ssh://far/system?command=/tmp/evil",     # runs a program the checkout names
    "qemu+ssh://far/system?netcat=/tmp/evil",
    "qemu+ssh://far/system?keyfile=id_ed25519",    # relative: a different file to libvirt and to Vagrant
    "qemu+ssh://far/system?keyfile=/k&no_verify=1",  # host key checks off
    "qemu+ssh://far:0/system",
    "qemu+ssh://far:70000/system",
    "qemu+ssh://-oProxyCommand=x/system",          # an ssh option in the host's place
    "qemu+ext:///system",
])
def test_refused_uris_name_what_lab_accepts(uri, tmp_path):
    (tmp_path / "lab.yaml").write_text(f"providers:\n  libvirt:\n    uri: '{uri}'\n")
    with pytest.raises(SpecError) as raised:
        load_spec(tmp_path / "lab.yaml")
    assert "providers.libvirt.uri" in str(raised.value) and "qemu+ssh://[user@]host[:port]/system" in str(raised.value)


def test_a_local_libvirt_has_no_jump_host(tmp_path):
    spec = LabSpec.model_validate({"providers": {"libvirt": {"uri": "qemu:///system"}}})
    assert LibvirtProvider.jump_host(spec, tmp_path / ".lab" / "lab", tmp_path / "known_hosts") is None


def test_the_remote_host_is_the_jump_host_with_the_uris_login(tmp_path):
    key = tmp_path / "id_ed25519"
    key.write_text("not read here")
    spec = LabSpec.model_validate({"providers": {"libvirt": {"uri": f"qemu+ssh://admin@10.9.8.7:2222/system"
                                                                    f"?keyfile={key}"}}})
    lab_dir = tmp_path / ".lab" / "lab"
    jump = LibvirtProvider.jump_host(spec, lab_dir, tmp_path / "known_hosts")
    assert (jump.node, jump.host, jump.port, jump.user, jump.identity_file) == (JUMP_ALIAS, "10.9.8.7", 2222,
                                                                               "admin", key)
    # A new lab: nothing vouches for the host yet; `lab up` pins what it is shown (lab.host.jumphost).
    assert jump.known_hosts is None
    lab_dir.mkdir(parents=True)
    (lab_dir / "state.json").write_text("{}")
    # A lab that exists checks against its own pin only.
    assert LibvirtProvider.jump_host(spec, lab_dir, tmp_path / "known_hosts").known_hosts == tmp_path / "known_hosts"


def test_without_a_user_the_login_is_the_local_users_as_ssh_has_it(tmp_path, monkeypatch):
    key = tmp_path / ".ssh" / "id_ed25519"
    key.parent.mkdir()
    key.write_text("not read here")
    monkeypatch.setenv("HOME", str(tmp_path))
    spec = LabSpec.model_validate({"providers": {"libvirt": {"uri": "qemu+ssh://far/system"}}})
    jump = LibvirtProvider.jump_host(spec, tmp_path / ".lab" / "lab", tmp_path / "known_hosts")
    assert (jump.user, jump.port, jump.identity_file) == (getpass.getuser(), 22, key)


def test_a_missing_key_file_is_one_clear_error(tmp_path):
    spec = LabSpec.model_validate({"providers": {"libvirt": {"uri": "qemu+ssh://far/system?keyfile=/nonexistent/k"}}})
    with pytest.raises(PrerequisiteError) as raised:
        LibvirtProvider.jump_host(spec, tmp_path / ".lab" / "lab", tmp_path / "known_hosts")
    assert "/nonexistent/k" in raised.value.message and "providers.libvirt.uri" in raised.value.hint


def test_nodes_and_vagrants_own_access_go_through_the_remote_host(tmp_path):
    key = tmp_path / "id_ed25519"
    key.write_text("not read here")
    uri = f"qemu+ssh://root@10.9.8.7/system?keyfile={key}"
    context = make_context(tmp_path, {"name": "far", "provider": "libvirt", "nodes": {"count": 2},
                                      "providers": {"libvirt": {"uri": uri, "driver": "kvm"}}},
                           lab_id="c0ffee", subnet="10.77.3.0/24")
    context.jump = LibvirtProvider.jump_host(context.spec, context.lab_dir, context.known_hosts)
    provider = LibvirtProvider(context)
    assert {endpoint.jump.host for endpoint in provider.ssh_endpoints().values()} == {"10.9.8.7"}
    # What `vagrant ssh-config` says of a machine on the remote host's management network.
    entries = parse_ssh_config(VAGRANT_SSH_CONFIG.format(key=key))
    vagrants = provider._endpoints_of(entries)
    assert (vagrants["node-1"].host, vagrants["node-1"].user, vagrants["node-1"].jump.host) == (
        "192.168.121.40", "vagrant", "10.9.8.7")
    assert f'lv.uri = "{uri}"' in render_vagrantfile(provider.context, "libvirt")
