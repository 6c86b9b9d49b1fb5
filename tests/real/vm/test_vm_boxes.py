"""Vagrant boxes of Lab OS, built for real (the layout on fixed numbers is
tests/unit/test_vm_layout.py).

This builds the VM image (debootstrap with a kernel, ~1.5 min cold,
cached afterwards), the libvirt and VirtualBox boxes from it, reads them back
with the same tools a hypervisor would (sfdisk, mtools, qemu-img, blkid),
boots the libvirt disk under QEMU to its login prompt and has the real
`vagrant box add` accept both boxes into a private VAGRANT_HOME.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tarfile
import time
from pathlib import Path

import pytest

from lab.images import vmdisk
from lab.images.vagrantbox import VIRTUALBOX_BASE_MAC, build_box
from lab.testing.ovf import OVF, check_ovf

# ---------------------------------------------------------------- real builds

needs_build = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("debootstrap") is None or shutil.which("qemu-img") is None,
    reason="building a VM box needs root, debootstrap and qemu-img")


def members(box: Path) -> dict[str, int]:
    with tarfile.open(box) as archive:
        return {m.name: m.size for m in archive.getmembers()}


def extract(box: Path, directory: Path) -> Path:
    with tarfile.open(box) as archive:
        archive.extractall(directory, filter="data")
    return directory


@pytest.fixture(scope="module")
def libvirt_box():
    return build_box("labos", "1", "libvirt")


@pytest.fixture(scope="module")
def virtualbox_box():
    return build_box("labos", "1", "virtualbox")


@needs_build
def test_libvirt_box_is_what_vagrant_libvirt_reads(libvirt_box, tmp_path):
    assert set(members(libvirt_box.path)) == {"metadata.json", "Vagrantfile", "box.img"}
    content = extract(libvirt_box.path, tmp_path)
    metadata = json.loads((content / "metadata.json").read_text())
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(content / "box.img")],
                                     check=True, capture_output=True, text=True).stdout)
    assert info["format"] == "qcow2"
    assert metadata == {"provider": "libvirt", "format": "qcow2", "virtual_size": info["virtual-size"] // 2**30,
                        "architecture": "amd64"}
    assert 'config.vm.guest = :debian' in (content / "Vagrantfile").read_text()


@needs_build
def test_libvirt_disk_layout_read_back(libvirt_box, tmp_path):
    content = extract(libvirt_box.path, tmp_path)
    raw = tmp_path / "disk.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(content / "box.img"), str(raw)], check=True)
    table = json.loads(subprocess.run(["sfdisk", "--json", str(raw)], check=True, capture_output=True,
                                      text=True).stdout)["partitiontable"]
    boot, usr_a, usr_b, root = table["partitions"]
    assert table["label"] == "dos" and table["id"] == f"0x{vmdisk.DISK_SIGNATURE}"
    assert boot.get("bootable") and boot["type"] == "6" and {usr_a["type"], usr_b["type"], root["type"]} == {"83"}
    plan = vmdisk.layout(kind="usr-ab")
    assert [p["start"] * 512 for p in (boot, usr_a, usr_b, root)] == [p.offset for p in plan.partitions]
    # The MBR carries SYSLINUX's boot code, the partition table stays intact.
    assert raw.read_bytes()[:440] == vmdisk.SYSLINUX_MBR.read_bytes()[:440]
    listing = subprocess.run(["mdir", "-a", "-b", "-i", f"{raw}@@{plan.boot_offset}", "::/"], check=True,
                             capture_output=True, text=True).stdout
    for name in ("VMLINUZ-A", "INITRD-A.IMG", "SYSLINUX.CFG", "LDLINUX.SYS", "LDLINUX.C32"):
        assert name.lower() in listing.lower()
    config = subprocess.run(["mtype", "-i", f"{raw}@@{plan.boot_offset}", "::/syslinux.cfg"], check=True,
                            capture_output=True, text=True).stdout
    assert "DEFAULT usr-a" in config and "labos.usr=PARTUUID=1abd15c0-03 labos.slot=b" in config

    def probe(offset: int) -> str:
        return subprocess.run(["blkid", "-p", "-O", str(offset), "-o", "export", str(raw)],
                              capture_output=True, text=True).stdout

    assert "TYPE=ext4" in probe(plan.root_offset) and f"LABEL={vmdisk.ROOT_LABEL}" in probe(plan.root_offset)
    assert f"LABEL={vmdisk.USR_LABEL}" in probe(plan.slots["a"].offset)  # slot a: the box's /usr
    assert "TYPE=" not in probe(plan.slots["b"].offset)                  # slot b: empty until an update


@needs_build
@pytest.mark.slow
def test_libvirt_disk_boots_to_a_login_prompt_under_qemu(libvirt_box, tmp_path):
    """No libvirt, no Vagrant: the disk alone, under software emulation, reaches getty on the serial console."""
    content = extract(libvirt_box.path, tmp_path)
    overlay = tmp_path / "overlay.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(content / "box.img"),
                    str(overlay)], check=True)
    console = tmp_path / "console.log"
    process = subprocess.Popen(["qemu-system-x86_64", "-accel", "tcg", "-m", "1024", "-nographic",
                                "-drive", f"file={overlay},if=virtio", "-nic", "user,model=virtio",
                                "-serial", f"file:{console}", "-monitor", "none"],
                               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        text = ""
        while time.monotonic() < deadline and process.poll() is None:
            text = console.read_text(errors="replace") if console.exists() else ""
            if "login:" in text:
                break
            time.sleep(1)
        assert "login:" in text, f"no login prompt; console tail:\n{text[-2000:]}"
        assert "Kernel panic" not in text
    finally:
        process.kill()
        process.wait()


@needs_build
def test_virtualbox_box_is_a_consistent_ovf_package(virtualbox_box, tmp_path):
    files = members(virtualbox_box.path)
    assert set(files) == {"metadata.json", "Vagrantfile", "box.ovf", "box-disk001.vmdk"}
    content = extract(virtualbox_box.path, tmp_path)
    assert json.loads((content / "metadata.json").read_text()) == {"provider": "virtualbox", "architecture": "amd64"}
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(content / "box-disk001.vmdk")],
                                     check=True, capture_output=True, text=True).stdout)
    assert info["format"] == "vmdk" and info["format-specific"]["data"]["create-type"] == "streamOptimized"
    root = check_ovf((content / "box.ovf").read_text(), files)
    assert root.find(f"{OVF}DiskSection/{OVF}Disk").get(f"{OVF}capacity") == str(info["virtual-size"])
    assert f'config.vm.base_mac = "{VIRTUALBOX_BASE_MAC}"' in (content / "Vagrantfile").read_text()


@needs_build
@pytest.mark.skipif(shutil.which("vagrant") is None, reason="vagrant not installed")
def test_vagrant_box_add_accepts_both_boxes(libvirt_box, virtualbox_box, tmp_path, monkeypatch):
    from lab.images.vagrantbox import add_box

    monkeypatch.setenv("VAGRANT_HOME", str(tmp_path / "vagrant.d"))
    assert add_box(libvirt_box) == "lab-labos-1"
    assert add_box(virtualbox_box) == "lab-labos-1"
    listing = subprocess.run(["vagrant", "box", "list", "--machine-readable"], capture_output=True, text=True,
                             env={**os.environ, "VAGRANT_CHECKPOINT_DISABLE": "1"}).stdout
    providers = sorted(line.split(",")[3] for line in listing.splitlines() if ",box-provider," in line)
    assert providers == ["libvirt", "virtualbox"]
    boxes = tmp_path / "vagrant.d" / "boxes" / "lab-labos-1" / "0"
    assert (boxes / "virtualbox" / "box.ovf").is_file() and (boxes / "libvirt" / "box.img").is_file()
    # Which build Vagrant has, for `lab up` to compare with the recipe (Vagrant lists the box all the same).
    from lab.images.vagrantbox import ADDED_MARKER, stale_added_box

    assert json.loads((boxes / "libvirt" / ADDED_MARKER).read_text())["key"] == libvirt_box.key
    assert stale_added_box("labos", "1", "libvirt") is None and stale_added_box("labos", "1", "virtualbox") is None
