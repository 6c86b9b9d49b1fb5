"""`lab update`'s host side on fixed inputs: how many nodes stage at once, how long a scenario's waits
sit through reboots, and the VM staging's commands (the real staging: tests/real/vm/test_libvirt.py)."""

from __future__ import annotations

from lab.cluster.update import STAGING_CONCURRENCY, staging_concurrency
from lab.providers.base import Provider
from lab.providers.nspawn.provider import NspawnProvider
from lab.providers.vagrant.provider import VagrantProvider
from lab.providers.vagrant.staging import scoped
from lab.scenarios.conditions import reboots_in


def test_as_many_nodes_stage_at_once_as_may_reboot_at_once():
    assert staging_concurrency(1) == 1
    assert staging_concurrency(3) == 3
    assert staging_concurrency(64) == STAGING_CONCURRENCY
    assert staging_concurrency(0) == 1


def test_waits_through_reboots_grow_only_on_providers_whose_nodes_reboot_slowly():
    assert reboots_in("updated", 3) == 3 and reboots_in("update-halted", 3) == 1
    assert reboots_in("healthy", 5) == 1 and reboots_in("new-leader", 3) == 0
    assert Provider.reboot_allowance_s == NspawnProvider.reboot_allowance_s == 0.0
    assert VagrantProvider.reboot_allowance_s > 0


def test_vm_staging_runs_in_a_low_weight_scope_and_takes_the_vm_image():
    command = scoped("python3 /var/lib/lab/bootslots.py stage-usr b 10 abc", 10)
    assert command.startswith("systemd-run --scope --quiet --collect -p CPUWeight=10 -p IOWeight=10 -- ")
    assert command.endswith("bootslots.py stage-usr b 10 abc")
    assert NspawnProvider.update_flavor == "container" and VagrantProvider.update_flavor == "vm"


def libvirt_provider(tmp_path, data: dict):
    from lab.providers.vagrant.libvirt import LibvirtProvider
    from lab.testing import contexts

    return LibvirtProvider(contexts.make_context(tmp_path, {"name": "up", **data}, lab_id="0dd5e7",
                                                 subnet="10.77.9.0/24"))


def test_lab_update_refuses_vm_labs_whose_disk_it_cannot_switch(tmp_path):
    def problem(data):
        return libvirt_provider(tmp_path, data).update_problem()

    assert problem({"box": {"arch": "amd64"}}) is None  # stated: `auto` is arm64 on an arm64 host
    assert "systemd-boot" in problem({"box": {"arch": "arm64"}})[0]
    what, hint = problem({"box": {"vagrant": "debian/bookworm64"}})
    assert "not a Lab OS box" in what and "drop box.vagrant" in hint


def test_lab_update_status_shows_a_staging_only_while_its_command_runs():
    import os
    import subprocess

    from lab.cluster.update import _process_started, _staging_since

    me = {"staging_since": 100.0, "staging_pid": os.getpid(), "staging_pid_started": _process_started(os.getpid())}
    assert _staging_since(me) == 100.0
    gone = subprocess.Popen(["true"])
    gone.wait()
    assert _staging_since({**me, "staging_pid": gone.pid}) is None  # killed mid-way
    assert _staging_since({**me, "staging_pid_started": 1.0}) is None  # its pid taken by another process since
    assert _staging_since({"target": "2", "started_at": 100.0}) is None  # staged: the roll is on
    assert _staging_since({**me, "staging_since": "x"}) is None


class _RefusedLab:
    """What start_roll asks of a lab before it refuses: nothing is read or written past the provider."""

    def __init__(self, provider):
        self._provider = provider
        self.spec = provider.context.spec

    def require_created(self, verb):
        pass

    def provider(self):
        return self._provider

    def etcd_client(self):
        raise AssertionError("a refused update must not touch etcd")


def test_lab_update_on_a_refused_lab_is_one_clear_error_before_anything_changes(tmp_path):
    import pytest

    from lab.cluster.update import start_roll
    from lab.errors import PrerequisiteError

    with pytest.raises(PrerequisiteError, match="systemd-boot") as refused:
        start_roll(_RefusedLab(libvirt_provider(tmp_path, {"box": {"arch": "arm64"}})), "2")
    assert "amd64 VM lab" in refused.value.hint
