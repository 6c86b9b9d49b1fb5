"""The KVM probe for real: QEMU with /dev/kvm and the Lab OS box's own kernel, on this host.

On this project's machines /dev/kvm exists but KVM guests do not boot
(MACHINE-NOTES: they hang at kernel start, and QEMU aborts on an MSR with
`-cpu host`): `driver: auto` must answer qemu within the probe's timeout and
leave no QEMU behind. No libvirt, no Vagrant VM: QEMU alone, one probe at a
time. The box is built and added with lab's own functions if Vagrant lacks it
(as tests/real/vm/test_libvirt.py's `box` fixture does; cached on these
machines). Verdicts go to a cache dir of the test's own, so each run probes.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from lab.model.spec import LabSpec
from lab.providers.vagrant import kvmprobe
from lab.providers.vagrant.libvirt import driver_choice
from lab.providers.vagrant.render import vagrant_box_name

BOX = vagrant_box_name(LabSpec())

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not kvmprobe.KVM_DEVICE.exists()
    or any(shutil.which(tool) is None for tool in (kvmprobe.QEMU, "qemu-img", "mcopy", "vagrant", "debootstrap")),
    reason="the KVM probe needs root, /dev/kvm, QEMU, qemu-img, mtools, and vagrant + debootstrap for the box")


@pytest.fixture(scope="module")
def box() -> str:
    if kvmprobe.added_libvirt_box(BOX) is None:
        from lab.images.vagrantbox import add_box, build_box

        add_box(build_box("labos", "1", "libvirt"))
    assert kvmprobe.added_libvirt_box(BOX) is not None
    return BOX


@pytest.fixture
def own_cache(tmp_path, monkeypatch):
    # After the box fixture: the box itself stays in the user's cache, only verdicts go here.
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def probe_processes() -> list[int]:
    """Live processes whose command line holds the probe's marker (zombies waiting for this sandbox's
    slow reaper do not count, MACHINE-NOTES)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            state = next(line for line in (entry / "status").read_text().splitlines() if line.startswith("State:"))
        except (OSError, StopIteration):
            continue
        if kvmprobe.MARKER.encode() in cmdline and "Z" not in state.split()[1]:
            found.append(int(entry.name))
    return found


def test_kvm_that_does_not_boot_here_is_found_within_the_timeout(box, own_cache, capsys):
    assert probe_processes() == []
    lines: list[str] = []
    started = time.monotonic()
    verdict = kvmprobe.kvm_verdict(box, lines.append)
    elapsed = time.monotonic() - started
    with capsys.disabled():
        print(f"\nKVM probe: {elapsed:.2f} s in all, QEMU {verdict.seconds:.2f} s: {verdict.reason}")
    assert lines == [f"checking once whether KVM boots a guest on this host (up to "
                     f"{kvmprobe.PROBE_TIMEOUT:.0f} s; cached after)"]
    assert elapsed < kvmprobe.PROBE_TIMEOUT + 10
    assert not verdict.boots, f"KVM booted a guest here: update MACHINE-NOTES and this test ({verdict.reason})"
    assert probe_processes() == []

    # Cached: the next `lab up` (and `lab doctor`) answer at once, and auto means qemu, with a note.
    assert kvmprobe.cached_kvm_verdict(box) == verdict
    again: list[str] = []
    started = time.monotonic()
    choice = driver_choice(LabSpec(), probe=True, progress=again.append)
    assert time.monotonic() - started < 2 and again == []
    assert choice.driver == "qemu" and choice.note.startswith("KVM does not boot guests on this host (")


def test_a_kvm_guest_that_hangs_is_killed_at_the_timeout(box, tmp_path):
    """QEMU's default CPU model gets past the MSR QEMU aborts on with `-cpu host` and hangs at kernel
    start instead: the runner must end that, with every process of its group, at the timeout."""
    kernel, initrd = kvmprobe.extract_kernel(kvmprobe.added_libvirt_box(box), tmp_path)
    argv = kvmprobe.probe_argv(kernel, initrd)
    cpu = argv.index("-cpu")
    del argv[cpu:cpu + 2]
    started = time.monotonic()
    console, errors, exit_code, seconds = kvmprobe.run_probe(argv, timeout=5)
    assert time.monotonic() - started < 10
    booted, why = kvmprobe.judge_console(console, errors, exit_code, seconds, timeout=5)
    assert exit_code is None and not booted, (exit_code, why)
    assert "did not reach userspace within 5 s" in why
    assert probe_processes() == []
