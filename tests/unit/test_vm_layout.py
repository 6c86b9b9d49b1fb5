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
                                    "label-id: 0x1abd15c0\n"
                                    "start=2048, size=393216, type=6, bootable\n"
                                    "start=395264, size=16381952, type=83\n")
    assert plan.slots == {}
    with pytest.raises(BoxError, match="at least 1 GiB"):
        vmdisk.layout(0)


def test_ab_layout_puts_two_usr_slots_between_boot_and_root():
    plan = vmdisk.layout(8, kind="usr-ab")
    boot, usr_a, usr_b, root = plan.partitions
    assert [p.number for p in plan.partitions] == [1, 2, 3, 4]
    assert plan.slots == {"a": usr_a, "b": usr_b}
    assert usr_a.offset == boot.offset + boot.size and usr_b.offset == usr_a.offset + usr_a.size
    assert usr_a.size == usr_b.size == vmdisk.USR_SLOT_MIB * 2**20
    assert root.offset == usr_b.offset + usr_b.size and root.offset + root.size == plan.disk_bytes
    assert usr_a.partuuid == "1abd15c0-02" and plan.root.partuuid == "1abd15c0-04"
    assert plan.sfdisk_script().splitlines()[2:] == [
        "start=2048, size=393216, type=6, bootable",
        "start=395264, size=4194304, type=83",
        "start=4589568, size=4194304, type=83",
        "start=8783872, size=7993344, type=83"]
    with pytest.raises(BoxError, match="root file system under 1 GiB"):
        vmdisk.layout(4, kind="usr-ab")
    with pytest.raises(BoxError, match="unknown disk layout"):
        vmdisk.layout(8, kind="zfs")


def test_syslinux_config_boots_the_labelled_root():
    text = vmdisk.syslinux_config()
    assert "DEFAULT labos" in text and "TIMEOUT 0" in text
    assert "LINUX /vmlinuz" in text and "INITRD /initrd.img" in text
    assert "APPEND root=LABEL=labos-root rw console=tty0 console=ttyS0,115200 net.ifnames=0" in text


def test_syslinux_config_of_an_ab_disk_has_an_entry_per_slot():
    from lab.node import bootslots

    text = vmdisk.syslinux_config(plan=vmdisk.layout(8, kind="usr-ab"))
    assert bootslots.default_in(text) == "a"
    for slot, number in (("a", 2), ("b", 3)):
        entry = text.split(f"LABEL usr-{slot}\n", 1)[1].split("\n\n")[0]
        assert f"LINUX /vmlinuz-{slot}" in entry and f"INITRD /initrd-{slot}.img" in entry
        arguments = bootslots.kernel_arguments(entry.split("APPEND", 1)[1])
        assert arguments == {"labos.usr": f"PARTUUID=1abd15c0-0{number}", "labos.slot": slot}
        assert "panic=10" in entry  # a slot that cannot mount its /usr reboots, and the trial is over
    assert bootslots.default_in(bootslots.with_default(text, "b")) == "b"
    assert bootslots.with_default(bootslots.with_default(text, "b"), "a") == text


def test_usr_image_is_sized_from_the_tree_and_must_fit_a_slot():
    assert vmdisk.usr_image_size(800 * 2**20) == (1000 + 64) * 2**20
    assert vmdisk.usr_image_size(1) % 2**20 == 0
    with pytest.raises(BoxError, match="more than a slot"):
        vmdisk.usr_image_size(1700 * 2**20)


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
