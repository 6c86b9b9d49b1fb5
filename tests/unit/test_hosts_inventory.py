"""provider: hosts without hosts: the inventory's validation, what a probe's facts mean, which host a node
gets, what the state may name, and what the adoption and cleanup scripts touch (their real runs are in
tests/real/nodes/test_hosts_provider.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from lab.core.state import LabState, resource_problems
from lab.errors import SpecError, UsageError
from lab.model.spec import LabSpec, load_spec
from lab.node import layout
from lab.providers.hosts import (HostsProvider, adoption_script, cleanup_script, facts_of, host_problems,
                                 signal_script)

pytestmark = pytest.mark.usefixtures("no_lab_env")

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOlabkeydata lab-hosts"
OWNER = "5f0c1d2e3a4b"


def spec_error(tmp_path: Path, text: str) -> str:
    path = tmp_path / "lab.yaml"
    path.write_text(text)
    with pytest.raises(SpecError) as info:
        load_spec(path, [], environ={})
    return info.value.message


def hosts_spec(*addresses: str, **more) -> LabSpec:
    return LabSpec.model_validate({"provider": "hosts", **more,
                                   "providers": {"hosts": {"inventory": [{"address": a} for a in addresses]}}})


# ---------------------------------------------------------------- the inventory


def test_one_node_per_host_unless_fewer_are_asked_for():
    assert [n.name for n in hosts_spec("10.1.0.5", "10.1.0.6").node_specs()] == ["node-1", "node-2"]
    assert [n.name for n in hosts_spec("10.1.0.5", "10.1.0.6", nodes={"count": 1}).node_specs()] == ["node-1"]


def test_provider_hosts_without_an_inventory_says_what_to_write(tmp_path):
    message = spec_error(tmp_path, "provider: hosts\n")
    assert "providers.hosts.inventory" in message and "address:" in message


def test_more_nodes_than_hosts_is_refused(tmp_path):
    message = spec_error(tmp_path, "provider: hosts\nnodes: {count: 3}\n"
                                   "providers: {hosts: {inventory: [{address: 10.1.0.5}]}}\n")
    assert "3 nodes asked for" in message and "lists 1 host(s)" in message


@pytest.mark.parametrize("address, wanted", [("db1.example.com", "is not an IPv4 address"),
                                             ("127.0.0.1", "cannot be another machine's address"),
                                             ("10.1.0.300", "IPv4")])
def test_a_host_is_an_ipv4_address_of_another_machine(tmp_path, address, wanted):
    message = spec_error(tmp_path, f"provider: hosts\nproviders: {{hosts: {{inventory: [{{address: {address}}}]}}}}\n")
    assert "providers.hosts.inventory[0].address" in message or "inventory" in message
    assert wanted in message


def test_a_host_listed_twice_is_refused(tmp_path):
    message = spec_error(tmp_path, "provider: hosts\nproviders: {hosts: {inventory: "
                                   "[{address: 10.1.0.5}, {address: 10.1.0.5, user: admin}]}}\n")
    assert "10.1.0.5 is listed twice" in message


def test_the_inventory_is_ignored_by_other_providers():
    spec = LabSpec.model_validate({"provider": "nspawn", "providers": {"hosts": {"inventory": []}}})
    assert len(spec.node_specs()) == 3


# ---------------------------------------------------------------- addresses


def test_nodes_keep_their_hosts_and_a_new_node_takes_the_next_free_one():
    spec = hosts_spec("10.1.0.5", "10.1.0.6", "10.1.0.7")
    assert HostsProvider.fixed_addresses(spec, ["node-1", "node-2"], {}) == {"node-1": "10.1.0.5",
                                                                             "node-2": "10.1.0.6"}
    # node-1 was removed; node-3 is added: it takes the first host no node has
    assert HostsProvider.fixed_addresses(spec, ["node-2", "node-3"], {"node-2": "10.1.0.6"}) == {
        "node-2": "10.1.0.6", "node-3": "10.1.0.5"}


def test_no_host_left_for_a_new_node_says_to_add_one():
    spec = hosts_spec("10.1.0.5")
    with pytest.raises(UsageError) as info:
        HostsProvider.fixed_addresses(spec, ["node-1", "node-2"], {"node-1": "10.1.0.5"})
    assert "no host left for node-2" in info.value.message and "inventory" in info.value.hint


# ---------------------------------------------------------------- a host's facts


def test_facts_are_read_from_the_probes_lines_only():
    assert facts_of("motd text\nlab-fact systemd\nlab-fact has etcd\nlab-fact owner 5f0c1d2e3a4b\n") == {
        "systemd", "has etcd", "owner 5f0c1d2e3a4b"}


def test_a_debian_host_with_nothing_of_labs_is_fine():
    assert host_problems({"systemd", "apt"}, OWNER) == []


def test_a_host_without_systemd_or_a_way_to_install_is_refused():
    problems = host_problems({"has python3"}, OWNER)
    assert any("no systemd" in p for p in problems)
    assert any("lacks nft, etcd, etcdctl" in p and "apt-get" in p for p in problems)
    assert host_problems({"systemd", *(f"has {c}" for c in layout.NODE_COMMANDS)}, OWNER) == []


def test_a_host_of_another_lab_or_with_its_own_etcd_is_refused_and_this_labs_own_is_not():
    assert "belongs to another lab" in host_problems({"systemd", "apt", "owner ffffff", "etcd-active"}, OWNER)[0]
    assert "runs an etcd lab did not set up" in host_problems({"systemd", "apt", "etcd-active"}, OWNER)[0]
    assert "certificates of its own" in host_problems({"systemd", "apt", "etcd-pki"}, OWNER)[0]
    assert host_problems({"systemd", "apt", f"owner {OWNER}", "etcd-active", "etcd-pki"}, OWNER) == []
    # a lab not created yet owns no host
    assert "belongs to another lab" in host_problems({"systemd", "apt", f"owner {OWNER}"}, None)[0]


# ---------------------------------------------------------------- the scripts


def test_adoption_keeps_the_hosts_etcd_defaults_and_notes_what_was_there_before_lab():
    script = adoption_script(KEY, OWNER)
    assert "cp -p /etc/default/etcd /etc/default/etcd.lab-saved" in script
    assert "lab-preexisting" in script and "lab-etcd-was-enabled" in script
    assert f"> {layout.CONFIG_DIR}/owner" in script
    assert "apt-get install" in script and "python3 nftables etcd-server etcd-client" not in script  # only what lacks
    # every package the install brings is written on the host before it is installed
    assert script.index(f"awk '/^Inst /{{print $2}}' >> {layout.CONFIG_DIR}/installed") < \
        script.index("apt-get install -y")


def test_adoption_refuses_another_labs_host_or_a_foreign_etcd_before_changing_anything():
    script = adoption_script(KEY, OWNER)
    first_change = script.index("install -d -m 0700 /root/.ssh")
    for refusal in ("belongs to another lab", "runs an etcd lab did not set up", "certificates of its own"):
        assert script.index(refusal) < first_change


def test_cleanup_purges_only_what_the_state_and_the_hosts_record_both_name_and_nothing_that_depends_on_them():
    script = cleanup_script(KEY, ["etcd-server", "etcd-client"], [], etcd_was_enabled=False)
    assert "for package in etcd-server etcd-client; do" in script
    assert f'grep -qxF "$package" {layout.CONFIG_DIR}/installed' in script
    assert "apt-get -s purge $purge" in script and "lab-kept:" in script  # a simulation first
    assert "autoremove" not in script
    # the host's record is read before lab's directories go
    assert script.index("for package in") < script.index("rm -rf")


def test_cleanup_keeps_what_else_a_directory_that_was_there_before_holds():
    whole = cleanup_script(KEY, [], [], etcd_was_enabled=False)
    kept = cleanup_script(KEY, [], [str(layout.CONFIG_DIR)], etcd_was_enabled=False)
    removal = next(line for line in whole.splitlines() if line.startswith("rm -rf"))
    assert f" {layout.CONFIG_DIR} " in removal + " "
    removal = next(line for line in kept.splitlines() if line.startswith("rm -rf"))
    assert f" {layout.CONFIG_DIR} " not in removal + " "
    assert f"{layout.CONFIG_DIR}/agent.json" in removal and f"{layout.CONFIG_DIR}/owner" in removal
    assert str(layout.NODE_INFO) in removal  # who the node is: written with the agents on every provider


def test_cleanup_leaves_etcd_enabled_only_if_it_was_before():
    assert "systemctl stop etcd" in cleanup_script(KEY, [], [], etcd_was_enabled=True)
    assert "systemctl disable --now etcd" in cleanup_script(KEY, [], [], etcd_was_enabled=False)


def test_cleanup_removes_the_labs_key_last():
    script = cleanup_script(KEY, ["etcd-server"], [], etcd_was_enabled=False)
    assert script.index("authorized_keys") > script.index("apt-get purge")
    assert "AAAAC3NzaC1lZDI1NTE5AAAAIOlabkeydata" in script.split("authorized_keys", 1)[1]


def test_faults_signal_labs_services_and_the_units_the_scheduler_runs_only():
    script = signal_script("SIGSTOP")
    assert "systemctl kill --signal=SIGSTOP etcd lab-agent lab-update $managed" in script
    assert str(layout.MANAGED) in script and "(service|socket|timer|path|mount|target)" in script  # names checked


# ---------------------------------------------------------------- the state


def record(tmp_path: Path, **details) -> list[str]:
    state = {"kind": "host", "id": "node-1", "address": "10.1.0.5", **details}
    return resource_problems([state], tmp_path / ".lab" / "x")


def test_a_host_record_names_only_packages_and_directories_lab_touches(tmp_path):
    assert record(tmp_path, installed=["etcd-server", "libpython3.11-minimal", "libc6:amd64"],
                  preexisting=["/etc/lab"], port=2222) == []
    assert "not a list of Debian package names" in record(tmp_path, installed=["x; rm -rf /"])[0]
    assert "not a TCP port" in record(tmp_path, port="22; true")[0]
    assert "never writes in" in record(tmp_path, preexisting=["/etc"])[0]
    assert "not an IPv4 address" in record(tmp_path, address="example.com; rm -rf /")[0]


def test_a_state_with_a_forged_host_record_is_refused_at_load(tmp_path):
    import json

    lab_dir = tmp_path / ".lab" / "x"
    lab_dir.mkdir(parents=True)
    (lab_dir / "state.json").write_text(json.dumps({
        "version": 1, "resources": [{"kind": "host", "id": "node-1", "address": "10.1.0.5",
                                     "installed": ["$(reboot)"]}]}))
    from lab.errors import StateError

    with pytest.raises(StateError) as info:
        LabState.load(lab_dir)
    assert "$(reboot)" in info.value.message


def test_provider_hosts_needs_tls(tmp_path):
    message = spec_error(tmp_path, "provider: hosts\netcd: {tls: false}\n"
                                   "providers: {hosts: {inventory: [{address: 10.1.0.5}]}}\n")
    assert "etcd.tls: true" in message


def test_a_unit_the_machine_has_is_not_the_schedulers(tmp_path):
    from lab.node.agent import machine_has_unit

    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "ssh.service").write_text("[Service]\n")
    assert machine_has_unit("ssh.service", (tmp_path / "etc", tmp_path / "lib"))
    assert not machine_has_unit("hello.service", (tmp_path / "etc", tmp_path / "lib"))


# ---------------------------------------------------------------- the jump host


def jumped_spec(**jump) -> LabSpec:
    return LabSpec.model_validate({"provider": "hosts", "providers": {"hosts": {
        "inventory": [{"address": "10.1.0.5"}, {"address": "10.1.0.6"}], "jump": jump}}})


def test_a_jump_host_is_an_endpoint_of_its_own_and_none_without_one(tmp_path):
    key = tmp_path / "bastion_key"
    key.write_text("private")
    lab_dir = tmp_path / ".lab" / "lab"
    jump = HostsProvider.jump_host(jumped_spec(address="bastion-1.lan", user="admin", port=2200, key="bastion_key"),
                                   lab_dir, lab_dir / "ssh" / "known_hosts")
    assert (jump.node, jump.host, jump.port, jump.user, jump.identity_file) == (
        "lab-jump", "bastion-1.lan", 2200, "admin", key)  # a relative key: beside lab.yaml
    assert jump.known_hosts is None  # nothing pinned yet: the first `lab up` pins what it is shown
    assert HostsProvider.jump_host(hosts_spec("10.1.0.5"), lab_dir, lab_dir / "ssh" / "known_hosts") is None


def test_a_jump_host_that_is_not_an_address_is_refused(tmp_path):
    message = spec_error(tmp_path, "provider: hosts\nproviders:\n  hosts:\n    inventory: [{address: 10.1.0.5}]\n"
                                   "    jump: {address: 'bastion; rm -rf /'}\n")
    assert "providers.hosts.jump.address" in message


def test_nodes_behind_a_jump_get_proxyjump_and_the_jump_its_own_pinned_block(tmp_path):
    from lab.host.ssh import SSHEndpoint, render_ssh_config

    known = tmp_path / "known_hosts"
    jump = SSHEndpoint("lab-jump", "192.168.1.2", 2200, "admin", tmp_path / "bastion_key", known_hosts=known)
    nodes = [SSHEndpoint(f"node-{i}", f"10.1.0.{4 + i}", 22, "root", tmp_path / "id_ed25519", known_hosts=known,
                         jump=jump) for i in (1, 2)]
    blocks = render_ssh_config(nodes).strip().split("\n\n")
    assert [block.splitlines()[0] for block in blocks] == ["Host node-1", "Host node-2", "Host lab-jump"]
    assert all("  ProxyJump lab-jump" in block for block in blocks[:2])
    assert "  HostName 192.168.1.2" in blocks[2] and "  Port 2200" in blocks[2] and "  User admin" in blocks[2]
    assert "  HostKeyAlias lab-jump" in blocks[2] and "  StrictHostKeyChecking yes" in blocks[2]
    assert "ProxyJump" not in blocks[2]


def test_a_jump_host_that_is_one_of_the_hosts_is_refused(tmp_path):
    message = spec_error(tmp_path, "provider: hosts\nproviders:\n  hosts:\n"
                                   "    inventory: [{address: 10.1.0.5}, {address: 10.1.0.6}]\n"
                                   "    jump: {address: 10.1.0.6}\n")
    assert "providers.hosts.jump.address" in message and "is one of the hosts" in message


def test_a_channel_the_jump_host_opens_after_the_caller_gave_up_is_closed(monkeypatch):
    import socket
    import threading
    from types import SimpleNamespace

    from lab.host import ssh

    closed, release = threading.Event(), threading.Event()

    class LateChannel:
        def close(self):
            closed.set()

    def open_channel(kind, dest, src, timeout):
        release.wait(5)  # the jump host answers only after the caller's timeout
        return LateChannel()

    monkeypatch.setattr(ssh, "jump_connection", lambda jump: SimpleNamespace(
        transport=SimpleNamespace(open_channel=open_channel)))
    jump = ssh.SSHEndpoint("lab-jump", "192.168.1.2", 22, "admin", Path("key"))
    with pytest.raises(socket.timeout, match="did not connect 10.1.0.5:2379 within 0.05 s"):
        ssh.channel_to(jump, "10.1.0.5", 2379, timeout=0.05)
    release.set()
    assert closed.wait(5), "the late channel stayed open"
