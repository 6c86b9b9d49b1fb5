"""VM disks and boxes on fixed numbers: the partition layout, the boot loader's
configuration, finding the kernel, the OVF descriptor. Pure: no build, no
qemu; tests/real/vm/test_vm_boxes.py builds real boxes and boots one.
"""

from __future__ import annotations


import pytest

from lab.errors import BoxError
from lab.images import vmdisk
from lab.images.vagrantbox import ovf_descriptor
from lab.testing.ovf import OVF, check_ovf


def test_layout_is_aligned_and_fills_the_disk():
    plan = vmdisk.layout(8)
    assert plan.disk_bytes == 8 * 2**30
    assert plan.boot_offset == 2**20 and plan.boot_bytes == vmdisk.BOOT_PARTITION_MIB * 2**20
    assert plan.root_offset == plan.boot_offset + plan.boot_bytes
    assert plan.root_offset + plan.root_bytes == plan.disk_bytes
    assert plan.sfdisk_script() == ("label: dos\n"
                                    "start=2048, size=393216, type=6, bootable\n"
                                    "start=395264, size=16381952, type=83\n")
    with pytest.raises(BoxError, match="at least 1 GiB"):
        vmdisk.layout(0)


def test_syslinux_config_boots_the_labelled_root():
    text = vmdisk.syslinux_config()
    assert "DEFAULT labos" in text and "TIMEOUT 0" in text
    assert "LINUX /vmlinuz" in text and "INITRD /initrd.img" in text
    assert "APPEND root=LABEL=labos-root rw console=tty0 console=ttyS0,115200 net.ifnames=0" in text


def test_find_kernel_names_what_is_missing(tmp_path):
    (tmp_path / "boot").mkdir()
    with pytest.raises(BoxError, match="has no kernel"):
        vmdisk.find_kernel(tmp_path)
    (tmp_path / "boot/vmlinuz-6.1.0-9-amd64").write_text("k")
    with pytest.raises(BoxError, match="has no initramfs beside it"):
        vmdisk.find_kernel(tmp_path)
    (tmp_path / "boot/initrd.img-6.1.0-9-amd64").write_text("i")
    assert [p.name for p in vmdisk.find_kernel(tmp_path)] == ["vmlinuz-6.1.0-9-amd64", "initrd.img-6.1.0-9-amd64"]


def test_ovf_descriptor_is_consistent():
    root = check_ovf(ovf_descriptor(vm_name="labos-1 <&>", disk_file="box-disk001.vmdk", disk_bytes=123,
                                    capacity_bytes=8 * 2**30), {"box-disk001.vmdk": 123})
    assert root.find(f"{OVF}DiskSection/{OVF}Disk").get(f"{OVF}capacity") == str(8 * 2**30)
    assert root.find(f"{OVF}VirtualSystem").get(f"{OVF}id") == "labos-1 <&>"  # escaped, then parsed back
