"""A/B /usr slots on a Lab OS VM disk, the node's side: standard library only.

Copied to /var/lib/lab/ with the agents. The disk (lab/images/vmdisk.py) has
a FAT boot partition (SYSLINUX, each slot's kernel and initramfs), USR-A,
USR-B and the root file system. SYSLINUX's DEFAULT is the committed slot; a
trial boot of the other slot is SYSLINUX's boot-once (what `syslinux --once`
sets; written here, see boot_once), which the boot loader itself clears as it boots: a trial that hangs, panics
or is reset comes back on the committed slot, with nobody having to count.
The boot partition is never mounted: mtools and `syslinux` work on the
device, so no slot can leave it mounted and dirty.

    python3 bootslots.py status                       JSON: booted, default
    python3 bootslots.py stage-usr SLOT BYTES SHA256   stdin: the /usr image, gzip
    python3 bootslots.py stage-file SLOT kernel|initrd SHA256   stdin: the file

lab runs the stage commands in a transient scope of low CPU and I/O weight
(`lab update`, lab/providers/vagrant/provider.py): writing ~1 GB must not
slow the applications on the node.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import mmap
import os
import re
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Iterator

try:  # in the lab package on the host; beside this file on a node
    from . import layout
except ImportError:  # pragma: no cover - the node's way
    import layout  # type: ignore[no-redef]

CHUNK = 1024 * 1024
# mtools checks a FAT's geometry against the device's; a partition of a virtual disk need not match
MTOOLS_ENV = {"MTOOLS_SKIP_CHECK": "1"}


class SlotError(Exception):
    """A slot operation that cannot be done: the message says which and why."""


def kernel_arguments(text: str) -> dict[str, str]:
    """labos.* arguments of a kernel command line."""
    found = {}
    for word in text.split():
        key, sep, value = word.partition("=")
        if sep and key.startswith("labos."):
            found[key] = value
    return found


def _cmdline() -> dict[str, str]:
    return kernel_arguments(Path("/proc/cmdline").read_text())


def on_ab_disk() -> bool:
    """Whether this machine booted a slot of an A/B disk (SYSLINUX's entry names it)."""
    try:
        return "labos.slot" in _cmdline()
    except OSError:
        return False


def booted_slot() -> str:
    slot = _cmdline().get("labos.slot", "")
    if slot not in layout.BOOT_SLOTS:
        raise SlotError("this machine did not boot a slot of an A/B disk (no labos.slot= on its command line)")
    return slot


def other(slot: str) -> str:
    return layout.BOOT_SLOTS[1 - layout.BOOT_SLOTS.index(slot)]


def partition(number: int) -> str:
    """The device of partition `number` of the boot disk, by PARTUUID (the disk signature, from labos.usr=)."""
    usr = _cmdline().get("labos.usr", "")
    match = re.fullmatch(r"PARTUUID=([0-9a-f]{8})-\d{2}", usr)
    if not match:
        raise SlotError(f"labos.usr= names no MBR partition ({usr!r}): not a Lab OS A/B disk")
    return f"/dev/disk/by-partuuid/{match.group(1)}-{number:02d}"


def slot_device(slot: str) -> str:
    return partition(layout.SLOT_PARTITIONS[slot])


def boot_device() -> str:
    return partition(layout.BOOT_PARTITION)


def label(slot: str) -> str:
    return f"usr-{slot}"


def default_in(config: str) -> str | None:
    """The slot a SYSLINUX configuration boots by default (DEFAULT usr-X), or None."""
    for line in config.splitlines():
        words = line.split()
        if len(words) == 2 and words[0].upper() == "DEFAULT":
            for slot in layout.BOOT_SLOTS:
                if words[1] == label(slot):
                    return slot
    return None


def with_default(config: str, slot: str) -> str:
    """The configuration with DEFAULT set to `slot`'s entry (which it must have)."""
    if not re.search(rf"^[ \t]*LABEL[ \t]+{re.escape(label(slot))}[ \t]*$", config, re.MULTILINE | re.IGNORECASE):
        raise SlotError(f"syslinux.cfg has no entry {label(slot)}")
    text, count = re.subn(r"^([ \t]*)DEFAULT[ \t]+\S+[ \t]*$", rf"\g<1>DEFAULT {label(slot)}", config, count=1,
                          flags=re.MULTILINE | re.IGNORECASE)
    if count != 1:
        raise SlotError("syslinux.cfg has no DEFAULT line")
    return text


def _tool(argv: list[str]) -> str:
    result = subprocess.run(argv, capture_output=True, text=True, check=False, stdin=subprocess.DEVNULL,
                            env={**os.environ, **MTOOLS_ENV})
    if result.returncode != 0:
        raise SlotError(f"{' '.join(argv[:2])} failed ({result.returncode}): {result.stderr.strip()[-400:]}")
    return result.stdout


def read_config() -> str:
    return _tool(["mtype", "-i", boot_device(), "::/syslinux.cfg"])


def default_slot() -> str:
    slot = default_in(read_config())
    if slot is None:
        raise SlotError("syslinux.cfg names no slot as DEFAULT")
    return slot


def _put_boot_file(data: bytes, name: str) -> None:
    """Write `name` on the boot partition and read it back: a short write there is an unbootable slot."""
    with tempfile.NamedTemporaryFile(dir="/run", prefix="lab-boot-") as handle:
        handle.write(data)
        handle.flush()
        _tool(["mcopy", "-o", "-i", boot_device(), handle.name, f"::/{name}"])
    back = subprocess.run(["mtype", "-i", boot_device(), f"::/{name}"], capture_output=True, check=False,
                          env={**os.environ, **MTOOLS_ENV}).stdout
    if hashlib.sha256(back).digest() != hashlib.sha256(data).digest():
        raise SlotError(f"{name} read back from the boot partition differs from what was written")
    os.sync()


def set_default(slot: str) -> None:
    """Make `slot` the one SYSLINUX boots from now on (after its trial boot came up healthy)."""
    config = read_config()
    if default_in(config) == slot:
        return
    _put_boot_file(with_default(config, slot).encode(), "syslinux.cfg")


# ---------------------------------------------------------------- SYSLINUX's auxiliary data vector
# The ADV: two copies of a 512-byte block at the end of ldlinux.sys, which the boot loader reads and
# writes by sector (its installer patched their addresses in). The mtools-based `syslinux` cannot set
# it ("not yet implemented for this installer"); extlinux can, but only on a mounted file system. So it
# is written here, in place, at the sectors the boot loader uses: found through the FAT, and checked to
# hold what the file's last 1024 bytes hold before anything is written. Format: syslinux's adv.c.
ADV_SIZE = 512
ADV_MAGIC1, ADV_MAGIC2, ADV_MAGIC3 = 0x5A2D2FA5, 0xA3041767, 0xDD28BF64
ADV_BOOTONCE = 1


def adv_consistent(block: bytes) -> bool:
    if len(block) != ADV_SIZE:
        return False
    words = struct.unpack(f"<{ADV_SIZE // 4}I", block)
    return (words[0] == ADV_MAGIC1 and words[-1] == ADV_MAGIC3
            and sum(words[1:-1]) & 0xFFFFFFFF == ADV_MAGIC2)


def adv_records(adv: bytes) -> dict[int, bytes]:
    """tag -> data of an ADV (both copies: the first consistent one; none consistent: empty)."""
    block = next((adv[i:i + ADV_SIZE] for i in (0, ADV_SIZE) if adv_consistent(adv[i:i + ADV_SIZE])), None)
    records: dict[int, bytes] = {}
    if block is None:
        return records
    data, at = block[8:ADV_SIZE - 4], 0
    while at + 2 <= len(data) and data[at] != 0:
        tag, size = data[at], data[at + 1]
        records[tag] = data[at + 2:at + 2 + size]
        at += 2 + size
    return records


def adv_bytes(records: dict[int, bytes]) -> bytes:
    """Both copies of an ADV holding `records` (as syslinux's cleanup_adv makes it)."""
    data = b"".join(bytes([tag, len(value)]) + value for tag, value in records.items() if value)
    if len(data) > ADV_SIZE - 12:
        raise SlotError("the boot loader's auxiliary data would not fit its 500 bytes")
    body = data.ljust(ADV_SIZE - 12, b"\0")
    csum = (ADV_MAGIC2 - sum(struct.unpack(f"<{len(body) // 4}I", body))) & 0xFFFFFFFF
    block = struct.pack("<II", ADV_MAGIC1, csum) + body + struct.pack("<I", ADV_MAGIC3)
    return block * 2


def fat_cluster_offsets(boot_sector: bytes) -> tuple[int, int]:
    """(byte offset of cluster 2, bytes per cluster) of a FAT12/16 file system, from its boot sector."""
    (sector, per_cluster, reserved, fats, root_entries, _total16, _media,
     per_fat) = struct.unpack_from("<HBHBHHBH", boot_sector, 11)
    if sector not in (512, 1024, 2048, 4096) or per_cluster == 0 or per_fat == 0:
        raise SlotError("the boot partition is not a FAT12/16 file system")
    root_bytes = -(-root_entries * 32 // sector) * sector
    return (reserved + fats * per_fat) * sector + root_bytes, sector * per_cluster


def clusters(mshowfat: str) -> list[int]:
    """The clusters of a file, in order, from `mshowfat`'s `::/NAME <3-9><12>`."""
    found = []
    for first, last in re.findall(r"<(\d+)(?:-(\d+))?>", mshowfat):
        found += range(int(first), int(last or first) + 1)
    return found


def _adv_location() -> tuple[str, int, bytes]:
    """(device, byte offset, current ADV) of the ADV the boot loader reads: ldlinux.sys's last 1024 bytes."""
    device = boot_device()
    loader = subprocess.run(["mtype", "-i", device, "::/ldlinux.sys"], capture_output=True, check=False,
                            env={**os.environ, **MTOOLS_ENV}).stdout
    if len(loader) < 2 * ADV_SIZE:
        raise SlotError("the boot partition has no ldlinux.sys (SYSLINUX is not installed there)")
    chain = clusters(_tool(["mshowfat", "-i", device, "::/ldlinux.sys"]))
    with open(device, "rb") as disk:
        data_start, cluster_bytes = fat_cluster_offsets(disk.read(512))
        at = len(loader) - 2 * ADV_SIZE
        index, within = divmod(at, cluster_bytes)
        if index >= len(chain) or within + 2 * ADV_SIZE > cluster_bytes:
            raise SlotError("ldlinux.sys's auxiliary data straddles two clusters: not where SYSLINUX puts it")
        offset = data_start + (chain[index] - 2) * cluster_bytes + within
        disk.seek(offset)
        if disk.read(2 * ADV_SIZE) != loader[at:]:
            raise SlotError("the sectors found for ldlinux.sys's auxiliary data do not hold it")
    return device, offset, loader[at:]


def pending_once() -> str | None:
    """The command SYSLINUX will boot once on the next boot, if one is set."""
    value = adv_records(_adv_location()[2]).get(ADV_BOOTONCE)
    return value.decode(errors="replace") if value else None


def boot_once(slot: str) -> None:
    """Boot `slot` on the next boot only: SYSLINUX's boot-once, which the boot loader clears as it boots."""
    device, offset, adv = _adv_location()
    records = adv_records(adv)
    records[ADV_BOOTONCE] = label(slot).encode()
    with open(device, "r+b", buffering=0) as disk:
        disk.seek(offset)
        disk.write(adv_bytes(records))
        os.fsync(disk.fileno())
    if pending_once() != label(slot):
        raise SlotError("the boot-once command read back is not the one written")


def _refuse_running(slot: str) -> None:
    if slot not in layout.BOOT_SLOTS:
        raise SlotError(f"unknown slot {slot!r}: a slot is one of {', '.join(layout.BOOT_SLOTS)}")
    if slot == booted_slot():
        raise SlotError(f"slot {slot} is the one this machine runs: an update goes into the other slot")


def _open_direct(path: str, flags: int) -> tuple[int, bool]:
    """(fd, whether O_DIRECT) for `path`: direct I/O where the file system takes it (a block device
    does; tmpfs, where the tests' stand-in lives, does not)."""
    try:
        return os.open(path, flags | os.O_DIRECT), True
    except OSError:
        return os.open(path, flags), False


class _AlignedWriter:
    """Writes through an aligned buffer, as O_DIRECT needs: the /usr image bypasses the page cache.

    Buffered, a gigabyte written into a 1 GiB VM filled its dirty-page budget with the staging's
    pages, whose writeback runs at the staging's low I/O weight, and every other writer there (etcd's
    WAL fsync) waited behind them: the nodes stopped answering (2026-12-02, three VMs staging at
    once). Direct writes leave nothing dirty behind them."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.buffer = mmap.mmap(-1, CHUNK)  # page-aligned, as direct I/O wants
        self.fill = 0

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            room = min(len(view), CHUNK - self.fill)
            self.buffer[self.fill:self.fill + room] = view[:room]
            self.fill += room
            view = view[room:]
            if self.fill == CHUNK:
                self._flush()

    def _flush(self) -> None:
        fill, self.fill = self.fill, 0
        if fill % 4096:  # a tail direct I/O cannot take: written through the page cache
            fcntl.fcntl(self.fd, fcntl.F_SETFL, fcntl.fcntl(self.fd, fcntl.F_GETFL) & ~os.O_DIRECT)
        with memoryview(self.buffer) as whole:
            view, done = whole[:fill], 0
            while done < fill:
                done += os.write(self.fd, view[done:])
            view.release()

    def close(self) -> None:
        try:
            if self.fill:
                self._flush()
        finally:
            self.buffer.close()


def _read_at(fd: int, offset: int, length: int) -> bytes:
    """`length` bytes at `offset` (through an aligned buffer: with O_DIRECT this reads the disk)."""
    start = offset - offset % 4096  # direct I/O reads whole aligned blocks
    span = -(-(offset - start + length) // 4096) * 4096
    buffer = mmap.mmap(-1, span)
    try:
        got = os.preadv(fd, [buffer], start)
        return bytes(memoryview(buffer)[offset - start:min(got, offset - start + length)])
    finally:
        buffer.close()


def inflated(source) -> Iterator[bytes]:
    """The gzip stream from `source`, inflated, in pieces of at most CHUNK bytes. Bounded: a megabyte
    of a file system's free space (zeros) inflates to a gigabyte, more than a node's memory."""
    inflate = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    while chunk := source.read(CHUNK):
        data = inflate.decompress(chunk, CHUNK)
        while data:
            yield data
            data = inflate.decompress(inflate.unconsumed_tail, CHUNK) if inflate.unconsumed_tail else b""
    if rest := inflate.flush():
        yield rest


def stage_usr(slot: str, size: int, sha256: str, source) -> dict:
    """Write a gzip-compressed /usr image from `source` into `slot`'s partition, checking the sha256 of
    what arrived, then read the first and last MiB back from the disk.

    The partition is the passive one: nothing has it mounted. The whole image is not read back: at
    the staging's low CPU weight, on a busy VM under emulation, hashing 1.2 GB a second time took
    minutes per node; a write O_DIRECT and fsync reported done is on the disk, and the ends read back
    catch a device that takes writes and keeps nothing."""
    _refuse_running(slot)
    device = slot_device(slot)
    started = time.monotonic()
    digest = hashlib.sha256()
    head = tail = b""
    written = 0
    fd, direct = _open_direct(device, os.O_RDWR)
    try:
        capacity = os.lseek(fd, 0, os.SEEK_END)
        if size > capacity:
            raise SlotError(f"the image ({size} bytes) is bigger than slot {slot} ({capacity} bytes)")
        os.lseek(fd, 0, os.SEEK_SET)
        writer = _AlignedWriter(fd)
        try:
            for data in inflated(source):
                if written < CHUNK:
                    head = (head + data)[:CHUNK]
                written += len(data)
                if written > size:
                    raise SlotError(f"more than the announced {size} bytes arrived")
                tail = (tail + data)[-CHUNK:]
                digest.update(data)
                writer.write(data)
        finally:
            writer.close()
        if written != size:
            raise SlotError(f"{written} bytes arrived of the {size} announced (the stream was cut)")
        if digest.hexdigest() != sha256:
            raise SlotError(f"the image arrived with sha256 {digest.hexdigest()}, not {sha256}: changed on the way; "
                            f"slot {slot} is not bootable until staged again")
        os.fsync(fd)
        if not direct:  # what the page cache holds of it goes, so the reads below read the disk
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    fd, _ = _open_direct(device, os.O_RDONLY)
    try:
        ends_ok = (_read_at(fd, 0, len(head)) == head
                   and _read_at(fd, size - len(tail), len(tail)) == tail)
    finally:
        os.close(fd)
    if not ends_ok:
        raise SlotError(f"slot {slot} does not read back what was written to it: the write did not take")
    return {"slot": slot, "bytes": size, "total_s": round(time.monotonic() - started, 3)}


def stage_file(slot: str, kind: str, sha256: str, source) -> dict:
    """The slot's kernel or initramfs onto the boot partition, checked against `sha256`."""
    _refuse_running(slot)
    names = {"kernel": f"vmlinuz-{slot}", "initrd": f"initrd-{slot}.img"}
    if kind not in names:
        raise SlotError(f"unknown boot file {kind!r}: kernel or initrd")
    data = source.read()
    if hashlib.sha256(data).hexdigest() != sha256:
        raise SlotError(f"the {kind} arrived with another sha256 than announced (cut or changed on the way)")
    _put_boot_file(data, names[kind])
    return {"slot": slot, "file": names[kind], "bytes": len(data)}


def status() -> dict:
    return {"booted": booted_slot(), "default": default_slot(), "once": pending_once()}


def main(argv: list[str]) -> int:
    usage = next(part for part in __doc__.split("\n\n") if "bootslots.py status" in part)
    try:
        if argv[1:] == ["status"]:
            result = status()
        elif len(argv) == 5 and argv[1] == "stage-usr":
            result = stage_usr(argv[2], int(argv[3]), argv[4], sys.stdin.buffer)
        elif len(argv) == 5 and argv[1] == "stage-file":
            result = stage_file(argv[2], argv[3], argv[4], sys.stdin.buffer)
        else:
            print(f"usage:\n{usage}", file=sys.stderr)
            return 2
    except (SlotError, OSError, ValueError, zlib.error) as exc:
        print(f"bootslots: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result, sort_keys=True))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(sys.argv))
