"""Vagrant's output read on fixed text (machine states, `vagrant ssh-config`,
`--machine-readable` errors) and the scripts lab runs inside guests
(adoption, partitions). Pure: no vagrant, no VM.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from lab.errors import ProviderError
from lab.providers.base import NodeState
from lab.providers.guest import printed_host_key
from lab.providers.vagrant.adoption import PrivateAddress, adoption_script
from lab.providers.vagrant.parsers import (SSHConfigEntry, node_state, parse_ssh_config, parse_vagrant_error,
                                           ssh_endpoint)
from lab.providers.guest import partition_scripts


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


# ---------------------------------------------------------------- scripts run inside guests

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


PRIVATE = PrivateAddress(mac="0a:fb:02:88:00:01", address="10.77.9.11", prefixlen=24)


def test_adoption_script_and_its_output() -> None:
    script = adoption_script("ssh-ed25519 AAAAC3 lab-x", "node-1", private=PRIVATE)
    assert "grep -qF AAAAC3 /root/.ssh/authorized_keys || printf '%s\\n' 'ssh-ed25519 AAAAC3 lab-x'" in script
    assert "printf '%s\\n' node-1 > /etc/hostname\nhostname node-1\n" in script
    for command, package in (("python3", "python3"), ("nft", "nftables"), ("etcd", "etcd-server")):
        assert f'command -v {command} >/dev/null 2>&1 || missing="$missing {package}"' in script
    # Docker too, socket-activated as on the Lab OS, unless the spec says box.docker: false.
    assert 'command -v docker >/dev/null 2>&1 || missing="$missing docker.io"' in script
    assert "systemctl enable --now docker.socket" in script
    assert "command -v docker" not in adoption_script("ssh-ed25519 AAAAC3 lab-x", "node-1", docker=False,
                                                      private=PRIVATE)
    output = "lab-installed etcd-server\nlab-host-key ssh-ed25519 AAAAkey root@node-1\n"
    assert printed_host_key(output, "node-1") == "ssh-ed25519 AAAAkey"
    with pytest.raises(ProviderError, match="node-1: adoption printed no host key"):
        printed_host_key("sudo: a password is required\n", "node-1")
