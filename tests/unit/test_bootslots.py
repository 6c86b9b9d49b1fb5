"""The node's side of A/B slots on a VM disk (lab/node/bootslots.py), on fixed inputs: the kernel
command line, SYSLINUX's DEFAULT, and writing a /usr image into a slot (a plain file stands in for
the partition; the real one is written in tests/real/vm/test_vm_update.py)."""

from __future__ import annotations

import gzip
import hashlib
import io

import pytest

from lab.node import bootslots

CMDLINE = ("root=LABEL=labos-root labos.usr=PARTUUID=1abd15c0-03 labos.slot=b rw console=ttyS0,115200 "
           "panic=10 quiet")

CONFIG = """# Written by lab box build
PROMPT 0
TIMEOUT 0
DEFAULT usr-a

LABEL usr-a
  LINUX /vmlinuz-a

LABEL usr-b
  LINUX /vmlinuz-b
"""


@pytest.fixture
def booted_b(monkeypatch):
    monkeypatch.setattr(bootslots, "_cmdline", lambda: bootslots.kernel_arguments(CMDLINE))


def test_the_command_line_names_the_slot_and_the_disk(booted_b):
    assert bootslots.kernel_arguments(CMDLINE) == {"labos.usr": "PARTUUID=1abd15c0-03", "labos.slot": "b"}
    assert bootslots.on_ab_disk() and bootslots.booted_slot() == "b" and bootslots.other("b") == "a"
    assert bootslots.boot_device() == "/dev/disk/by-partuuid/1abd15c0-01"
    assert bootslots.slot_device("a") == "/dev/disk/by-partuuid/1abd15c0-02"


def test_a_machine_without_slots_is_told_so(monkeypatch):
    monkeypatch.setattr(bootslots, "_cmdline", lambda: bootslots.kernel_arguments("root=/dev/sda1 quiet"))
    assert not bootslots.on_ab_disk()
    with pytest.raises(bootslots.SlotError, match="did not boot a slot"):
        bootslots.booted_slot()
    with pytest.raises(bootslots.SlotError, match="names no MBR partition"):
        bootslots.boot_device()


def test_default_is_read_and_rewritten_in_place():
    assert bootslots.default_in(CONFIG) == "a"
    changed = bootslots.with_default(CONFIG, "b")
    assert bootslots.default_in(changed) == "b" and changed.replace("usr-b\n\nLABEL", "") != CONFIG
    assert changed.count("DEFAULT") == 1 and "LABEL usr-a" in changed
    assert bootslots.default_in("DEFAULT labos\n") is None
    with pytest.raises(bootslots.SlotError, match="no entry usr-b"):
        bootslots.with_default("DEFAULT usr-a\nLABEL usr-a\n", "b")
    with pytest.raises(bootslots.SlotError, match="no DEFAULT"):
        bootslots.with_default("LABEL usr-b\n", "b")


def _partition(monkeypatch, tmp_path, size=4 * 2**20):
    device = tmp_path / "usr-a"
    device.write_bytes(b"\xff" * size)  # old content: the check must not pass on what was there
    monkeypatch.setattr(bootslots, "slot_device", lambda slot: str(device))
    return device


def test_a_usr_image_is_written_into_the_passive_slot_and_checked(booted_b, monkeypatch, tmp_path):
    device = _partition(monkeypatch, tmp_path)
    image = bytes(range(256)) * 8192 + b"\0" * 2**20   # 3 MiB
    result = bootslots.stage_usr("a", len(image), hashlib.sha256(image).hexdigest(),
                                 io.BytesIO(gzip.compress(image)))
    assert result["slot"] == "a" and result["bytes"] == len(image)
    assert device.read_bytes()[:len(image)] == image
    odd = b"lab" * 400_000 + b"!"  # not a whole number of blocks: its tail cannot go by direct I/O
    bootslots.stage_usr("a", len(odd), hashlib.sha256(odd).hexdigest(), io.BytesIO(gzip.compress(odd)))
    assert device.read_bytes()[:len(odd)] == odd


def test_staging_refuses_the_running_slot_a_cut_stream_and_a_wrong_checksum(booted_b, monkeypatch, tmp_path):
    _partition(monkeypatch, tmp_path)
    image = b"x" * 2**20
    packed = gzip.compress(image)
    digest = hashlib.sha256(image).hexdigest()
    with pytest.raises(bootslots.SlotError, match="the one this machine runs"):
        bootslots.stage_usr("b", len(image), digest, io.BytesIO(packed))
    with pytest.raises(bootslots.SlotError, match="stream was cut"):
        bootslots.stage_usr("a", len(image) + 10, digest, io.BytesIO(packed))
    with pytest.raises(bootslots.SlotError, match="more than the announced"):
        bootslots.stage_usr("a", len(image) - 10, digest, io.BytesIO(packed))
    with pytest.raises(bootslots.SlotError, match="arrived with sha256 .*changed on the way"):
        bootslots.stage_usr("a", len(image), "0" * 64, io.BytesIO(packed))
    with pytest.raises(bootslots.SlotError, match="bigger than slot a"):
        bootslots.stage_usr("a", 8 * 2**20, digest, io.BytesIO(packed))


def test_a_boot_file_with_another_checksum_is_refused(booted_b):
    with pytest.raises(bootslots.SlotError, match="another sha256"):
        bootslots.stage_file("a", "kernel", "0" * 64, io.BytesIO(b"kernel"))
    with pytest.raises(bootslots.SlotError, match="unknown boot file"):
        bootslots.stage_file("a", "dtb", "0" * 64, io.BytesIO(b""))


# ---------------------------------------------------------------- SYSLINUX's boot-once


def test_the_auxiliary_data_vector_round_trips_and_its_checksum_is_checked():
    adv = bootslots.adv_bytes({bootslots.ADV_BOOTONCE: b"usr-b"})
    assert len(adv) == 1024 and adv[:512] == adv[512:]
    assert bootslots.adv_consistent(adv[:512])
    assert bootslots.adv_records(adv) == {1: b"usr-b"}
    broken = bytearray(adv)
    broken[20] ^= 1                     # the first copy damaged: the second one is read
    assert bootslots.adv_records(bytes(broken)) == {1: b"usr-b"}
    broken[532] ^= 1                    # both damaged: nothing is pending
    assert bootslots.adv_records(bytes(broken)) == {}
    assert bootslots.adv_records(bootslots.adv_bytes({})) == {}
    with pytest.raises(bootslots.SlotError, match="would not fit"):
        bootslots.adv_bytes({1: b"x" * 255, 2: b"y" * 255})


def test_a_files_clusters_and_where_they_are():
    assert bootslots.clusters("::/ldlinux.sys <3797-3811>") == list(range(3797, 3812))
    assert bootslots.clusters("::/x <3-4><9><12-13>") == [3, 4, 9, 12, 13]
    # FAT16 as lab builds its boot partition: 512-byte sectors, 8 per cluster, 8 reserved, 2 FATs of 192
    sector = bytearray(512)
    import struct

    struct.pack_into("<HBHBHHBH", sector, 11, 512, 8, 8, 2, 512, 0, 0xF8, 192)
    assert bootslots.fat_cluster_offsets(bytes(sector)) == ((8 + 2 * 192) * 512 + 512 * 32, 4096)
    with pytest.raises(bootslots.SlotError, match="not a FAT12/16"):
        bootslots.fat_cluster_offsets(bytes(512))


def test_boot_once_is_written_where_the_boot_loader_reads_it(monkeypatch, tmp_path):
    """A real SYSLINUX install on a FAT file system in a file: the ADV is found through the FAT, written
    in place, and read back by mtools as ldlinux.sys's last 1024 bytes."""
    import shutil
    import subprocess

    if not all(shutil.which(tool) for tool in ("mkfs.vfat", "syslinux", "mtype", "mshowfat")):
        pytest.skip("needs dosfstools, syslinux and mtools (tools/install.sh installs them)")
    device = tmp_path / "boot.fat"
    with open(device, "wb") as handle:
        handle.truncate(32 * 2**20)
    subprocess.run(["mkfs.vfat", "-F", "16", "-n", "LABBOOT", str(device)], check=True, capture_output=True)
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"k" * 10000)  # a file before ldlinux.sys: its clusters are not the first ones
    subprocess.run(["mcopy", "-i", str(device), str(kernel), "::/vmlinuz-a"], check=True,
                   env={"MTOOLS_SKIP_CHECK": "1", "PATH": "/usr/bin:/bin"})
    subprocess.run(["syslinux", "--install", str(device)], check=True, capture_output=True)
    monkeypatch.setattr(bootslots, "boot_device", lambda: str(device))
    assert bootslots.pending_once() is None
    bootslots.boot_once("b")
    assert bootslots.pending_once() == "usr-b"
    loader = subprocess.run(["mtype", "-i", str(device), "::/ldlinux.sys"], check=True, capture_output=True,
                            env={"MTOOLS_SKIP_CHECK": "1", "PATH": "/usr/bin:/bin"}).stdout
    assert bootslots.adv_records(loader[-1024:]) == {1: b"usr-b"}


def test_inflating_is_bounded_however_well_the_stream_compresses():
    zeros = b"\0" * (64 * 2**20)
    pieces = list(bootslots.inflated(io.BytesIO(gzip.compress(zeros))))
    assert b"".join(pieces) == zeros and max(map(len, pieces)) <= bootslots.CHUNK
