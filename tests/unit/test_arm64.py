"""arm64 Lab OS on fixed inputs: the recipe's packages for arm64, the cache's names and keys (amd64's
unchanged), the UEFI disk and its systemd-boot entries, the box names and what `auto` picks. The real
build (qemu-user-static) and boot (qemu-system-aarch64) are in tests/real/vm/test_arm64.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from lab.errors import BoxError
from lab.images import cache, recipes, vmdisk
from lab.images.vagrantbox import vagrant_box_name_for
from lab.model.spec import LabSpec
from lab.node import bootslots
from lab.providers.vagrant import render


def test_arm64_recipes_take_the_arm64_kernel_and_a_uefi_boot_loader():
    amd64 = recipes.load_recipe("labos", "1", "vm")
    arm64 = recipes.load_recipe("labos", "1", "vm", "arm64")
    assert "linux-image-amd64" in amd64.packages and amd64.arch == "amd64"
    assert "linux-image-arm64" in arm64.packages and "linux-image-amd64" not in arm64.packages
    assert "systemd-boot-efi" in arm64.packages and "systemd-boot-efi" not in amd64.packages
    container = recipes.load_recipe("labos", "1", "container", "arm64")
    assert "systemd-boot-efi" not in container.packages  # nspawn nodes boot nothing themselves
    assert recipes.for_arch("linux-image-amd64", "arm64") == "linux-image-arm64"
    assert recipes.for_arch("etcd-server", "arm64") == "etcd-server"
    with pytest.raises(BoxError, match="unknown architecture"):
        recipes.load_recipe("labos", "1", "vm", "riscv64")


def test_host_arch_names(monkeypatch):
    import platform

    for machine, arch in (("x86_64", "amd64"), ("aarch64", "arm64"), ("arm64", "arm64"), ("ppc64le", "ppc64le")):
        monkeypatch.setattr(platform, "machine", lambda m=machine: m)
        assert recipes.host_arch() == arch


def test_arm64_images_have_their_own_keys_and_names_and_amd64_keeps_its_own():
    amd64 = cache.image_key("labos", "1", "vm")
    assert cache.image_key("labos", "1", "vm", "amd64") == amd64
    arm64 = cache.image_key("labos", "1", "vm", "arm64")
    assert arm64 != amd64 and len(arm64) == 12
    assert cache.image_path("labos", "1", "k", "vm", "arm64").name == "labos-1-vm-arm64-k"
    assert cache.image_path("labos", "1", "k", "container", "arm64").name == "labos-1-arm64-k"
    assert cache.image_path("labos", "1", "k", "vm").name == "labos-1-vm-k"
    assert vagrant_box_name_for("labos", "1") == "lab-labos-1"
    assert vagrant_box_name_for("labos", "2", "arm64") == "lab-labos-2-arm64"


def test_a_uefi_disk_has_an_efi_system_partition_and_systemd_boot_entries_per_slot():
    plan = vmdisk.layout(8, kind="usr-ab", uefi=True)
    assert plan.boot.kind == "ef" and not plan.boot.bootable
    assert [p.number for p in plan.slots.values()] == [2, 3]
    files = vmdisk.systemd_boot_entries(plan)
    assert files["loader/loader.conf"].splitlines()[1:] == ["default usr-a.conf", "timeout 0"]
    for slot, number in (("a", 2), ("b", 3)):
        entry = files[f"loader/entries/usr-{slot}.conf"]
        assert f"linux /vmlinuz-{slot}\ninitrd /initrd-{slot}.img\n" in entry
        options = entry.split("options ", 1)[1]
        assert bootslots.kernel_arguments(options) == {"labos.usr": f"PARTUUID=1abd15c0-0{number}",
                                                       "labos.slot": slot}
        assert "console=ttyAMA0,115200" in options and "panic=10" in options


def test_arm64_disks_need_the_ab_layout(tmp_path: Path):
    (tmp_path / "boot").mkdir()
    (tmp_path / "boot/vmlinuz-6.1.0-9-arm64").write_bytes(b"k")
    (tmp_path / "boot/initrd.img-6.1.0-9-arm64").write_bytes(b"i")
    with pytest.raises(BoxError, match="A/B layout only"):
        vmdisk.make_raw_disk(tmp_path, tmp_path / "disk.raw", kind="root", arch="arm64")


def test_auto_picks_this_machines_architecture(monkeypatch):
    spec = LabSpec.model_validate({"name": "a"})
    assert spec.box.arch == "auto"
    monkeypatch.setattr(recipes, "host_arch", lambda: "arm64")
    assert render.box_arch(spec) == "arm64" and render.vagrant_box_name(spec) == "lab-labos-1-arm64"
    monkeypatch.setattr(recipes, "host_arch", lambda: "s390x")
    assert render.box_arch(spec) == "amd64"
    pinned = LabSpec.model_validate({"name": "a", "box": {"arch": "amd64"}})
    assert render.box_arch(pinned) == "amd64"
