"""A disk that boots by itself, made from a VM-flavored node OS image.

The layout is the plainest a BIOS (SeaBIOS under QEMU, VirtualBox's BIOS)
boots: an MBR with SYSLINUX's boot code, partition 1 a small FAT file system
holding SYSLINUX, the kernel and the initramfs (marked active), then the ext4
root file system labelled `labos-root` (the image's fstab names it).

Lab OS's boxes use CoreOS's A/B layout (`usr-ab`): partitions 2 and 3 are
USR-A and USR-B, each a whole /usr; the root file system (partition 4) keeps
/etc and /var across updates. The boot partition holds each slot's kernel
and initramfs, and SYSLINUX's configuration picks the slot (see
syslinux_config and lab/node/bootslots.py, the node's side).

Everything is written into one sparse raw file with tools that work on plain
files: `mkfs.ext4 -d` fills the root file system straight from the image
directory, `mkfs.vfat --offset`, `mcopy -i FILE@@OFFSET` and `syslinux
--offset` do the boot partition. No loop device, no mount, nothing to undo
on the host if the build is interrupted but a file in a temporary directory.
`qemu-img convert` then turns the raw disk into a box's qcow2 or VMDK.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from lab.errors import BoxError, PrerequisiteError
from lab.host.files import write_atomic
from lab.host.run import Result, run
# the `usr-ab` layout: 1 boot, 2 USR-A, 3 USR-B, 4 root; the node's update agent reads the same numbers
from lab.node.layout import BOOT_PARTITION, SLOT_PARTITIONS

DISK_TOOL_TIMEOUT = 10 * 60

Progress = Callable[[str], None]

SECTOR = 512
MIB = 1024 * 1024
BOOT_PARTITION_MIB = 192      # two kernels (~8 MB each) and initramfs images (~10 MB each with MODULES=list)
ROOT_LABEL = "labos-root"
USR_LABEL = "labos-usr"       # both slots' file systems: a slot is found by its partition, not its label
DEFAULT_DISK_GIB = 8
USR_SLOT_MIB = 2048           # each /usr slot: Lab OS's /usr is ~0.95 GB with the kernel's modules
# The MBR's disk signature: a partition's PARTUUID is SIGNATURE-NN, the same on every disk of every
# box, so the kernel command line can name a slot's partition whatever the disk is called (vda, sda).
DISK_SIGNATURE = "1abd15c0"
KERNEL_ARGS = "rw console=tty0 console=ttyS0,115200 net.ifnames=0 biosdevname=0 panic=10 quiet"
# arm64 VMs (QEMU's virt machine, Apple's and other hypervisors): the PL011 serial port, no BIOS names
KERNEL_ARGS_ARM64 = "rw console=tty0 console=ttyAMA0,115200 net.ifnames=0 panic=10 quiet"
# systemd-boot, from the arm64 image's systemd-boot-efi: what edk2 starts from the EFI System Partition
SYSTEMD_BOOT = {"arm64": ("usr/lib/systemd/boot/efi/systemd-bootaa64.efi", "BOOTAA64.EFI")}
SYSLINUX_MBR = Path("/usr/lib/syslinux/mbr/mbr.bin")

# tool -> Debian package, for one clear message when something is missing
DISK_TOOLS = {"mkfs.ext4": "e2fsprogs", "mkfs.vfat": "dosfstools", "mcopy": "mtools",
              "syslinux": "syslinux", "sfdisk": "fdisk", "qemu-img": "qemu-utils"}


@dataclass(frozen=True)
class Partition:
    number: int
    offset: int
    size: int
    kind: str             # MBR type, hex: 6 FAT16, 83 Linux
    bootable: bool = False

    @property
    def partuuid(self) -> str:
        return f"{DISK_SIGNATURE}-{self.number:02d}"


@dataclass(frozen=True)
class Layout:
    """The partitions of a disk of `disk_bytes`: boot first, root last, the /usr slots between (usr-ab)."""

    disk_bytes: int
    partitions: tuple[Partition, ...]

    @property
    def boot(self) -> Partition:
        return self.partitions[0]

    @property
    def root(self) -> Partition:
        return self.partitions[-1]

    @property
    def slots(self) -> dict[str, Partition]:
        """Slot name -> its /usr partition; empty on a one-root disk."""
        by_number = {p.number: p for p in self.partitions}
        return {slot: by_number[number] for slot, number in SLOT_PARTITIONS.items()
                if len(self.partitions) > 2 and number in by_number}

    # the one-root names, kept for the box's own readers (kvmprobe, tests)
    boot_offset = property(lambda self: self.boot.offset)
    boot_bytes = property(lambda self: self.boot.size)
    root_offset = property(lambda self: self.root.offset)
    root_bytes = property(lambda self: self.root.size)

    def sfdisk_script(self) -> str:
        """Input for `sfdisk` (sizes in sectors): FAT16 boot partition active, Linux partitions after it.

        FAT16, not FAT32: at this size FAT32 would have fewer clusters than its
        minimum, and mtools (which SYSLINUX and mcopy use) then refuses it.
        """
        lines = ["label: dos", f"label-id: 0x{DISK_SIGNATURE}"]
        for part in self.partitions:
            lines.append(f"start={part.offset // SECTOR}, size={part.size // SECTOR}, type={part.kind}"
                         + (", bootable" if part.bootable else ""))
        return "\n".join(lines) + "\n"


def layout(disk_gib: int = DEFAULT_DISK_GIB, boot_mib: int = BOOT_PARTITION_MIB, *, kind: str = "root",
           usr_mib: int = USR_SLOT_MIB, uefi: bool = False) -> Layout:
    """Partitions aligned to 1 MiB, as every partitioning tool does nowadays.

    kind "root": boot, root. kind "usr-ab" (CoreOS's layout): boot, USR-A, USR-B, root; the running
    slot's /usr is mounted read-only over the root file system's empty /usr, which keeps /etc and /var.
    """
    if disk_gib < 1:
        raise BoxError(f"disk size must be at least 1 GiB, got {disk_gib}")
    disk = disk_gib * 1024 * MIB
    offset = 1 * MIB
    # UEFI (arm64) finds its boot loader on an EFI System Partition (type ef); a BIOS boots the active one
    partitions = [Partition(BOOT_PARTITION, offset, boot_mib * MIB, "ef" if uefi else "6", bootable=not uefi)]
    offset += boot_mib * MIB
    if kind == "usr-ab":
        for number in SLOT_PARTITIONS.values():
            partitions.append(Partition(number, offset, usr_mib * MIB, "83"))
            offset += usr_mib * MIB
        if disk - offset < 1024 * MIB:
            raise BoxError(f"a {disk_gib} GiB disk leaves the root file system under 1 GiB beside two "
                           f"{usr_mib} MiB /usr slots", hint="give the disk more room (--disk-gib)")
    elif kind != "root":
        raise BoxError(f"unknown disk layout {kind!r}")
    partitions.append(Partition(len(partitions) + 1, offset, disk - offset, "83"))
    return Layout(disk_bytes=disk, partitions=tuple(partitions))


def slot_label(slot: str) -> str:
    return f"usr-{slot}"


def syslinux_config(kernel_args: str = KERNEL_ARGS, plan: Layout | None = None, default: str = "a") -> str:
    """SYSLINUX's configuration: one entry on a one-root disk, one per /usr slot on an A/B disk.

    Each slot boots its own kernel and initramfs (their modules are in that slot's /usr);
    `labos.usr=` tells the initramfs which partition to mount on /usr (labos-usr, in the image's
    initramfs-tools scripts). Which slot boots is DEFAULT, or once SYSLINUX's boot-once `usr-b` (the
    update agent's trial boot; SYSLINUX clears it as it boots, so a trial that never comes up
    healthy falls back to DEFAULT on the next boot).
    """
    if plan is None or not plan.slots:
        return ("# Written by lab box build.\nPROMPT 0\nTIMEOUT 0\nDEFAULT labos\n\n"
                "LABEL labos\n  LINUX /vmlinuz\n  INITRD /initrd.img\n"
                f"  APPEND root=LABEL={ROOT_LABEL} {kernel_args}\n")
    entries = [f"\nLABEL {slot_label(slot)}\n  LINUX /{slot_kernel(slot)}\n  INITRD /{slot_initrd(slot)}\n"
               f"  APPEND {slot_arguments(slot, part, kernel_args)}\n" for slot, part in plan.slots.items()]
    return ("# Written by lab box build; the update agent rewrites DEFAULT.\nPROMPT 0\nTIMEOUT 0\n"
            f"DEFAULT {slot_label(default)}\n" + "".join(entries))


def slot_arguments(slot: str, part: Partition, kernel_args: str) -> str:
    """A slot's kernel command line, whichever boot loader passes it: the root file system, the slot's
    /usr partition (the initramfs mounts it) and its name (the update agent reads it)."""
    return f"root=LABEL={ROOT_LABEL} labos.usr=PARTUUID={part.partuuid} labos.slot={slot} {kernel_args}"


def systemd_boot_entries(plan: Layout, kernel_args: str = KERNEL_ARGS_ARM64, default: str = "a") -> dict[str, str]:
    """systemd-boot's configuration (a UEFI box, arm64): loader.conf and one entry per slot, by path on
    the EFI System Partition. The same slots and kernel arguments as SYSLINUX's entries; the update
    agent's trial boot there would be systemd-boot's LoaderEntryOneShot (not written yet: see README)."""
    files = {"loader/loader.conf": f"# Written by lab box build.\ndefault {slot_label(default)}.conf\ntimeout 0\n"}
    for slot, part in plan.slots.items():
        files[f"loader/entries/{slot_label(slot)}.conf"] = (
            f"title Lab OS (slot {slot})\nlinux /{slot_kernel(slot)}\ninitrd /{slot_initrd(slot)}\n"
            f"options {slot_arguments(slot, part, kernel_args)}\n")
    return files


def slot_kernel(slot: str) -> str:
    return f"vmlinuz-{slot}"


def slot_initrd(slot: str) -> str:
    return f"initrd-{slot}.img"


def find_kernel(rootfs: Path) -> tuple[Path, Path]:
    """The newest kernel and its initramfs in the image's /boot."""
    kernels = sorted((rootfs / "boot").glob("vmlinuz-*"))
    if not kernels:
        raise BoxError(f"{rootfs}/boot has no kernel: this image cannot boot a VM",
                       hint="build the VM flavor of the image (its recipe's vm section installs a kernel)")
    kernel = kernels[-1]
    initrd = kernel.with_name("initrd.img-" + kernel.name[len("vmlinuz-"):])
    if not initrd.is_file():
        raise BoxError(f"{kernel} has no initramfs beside it ({initrd.name})",
                       hint="rebuild the image with --force (update-initramfs failed during the build)")
    return kernel, initrd


def check_tools() -> None:
    missing = [(tool, package) for tool, package in DISK_TOOLS.items() if shutil.which(tool) is None]
    if not SYSLINUX_MBR.is_file():
        missing.append((str(SYSLINUX_MBR), "syslinux-common"))
    if missing:
        packages = sorted({package for _, package in missing})
        raise PrerequisiteError(f"making a VM disk needs {', '.join(tool for tool, _ in missing)}",
                                hint=f"apt-get install {' '.join(packages)}")


def make_raw_disk(rootfs: Path, target: Path, *, disk_gib: int = DEFAULT_DISK_GIB, kind: str = "root",
                  arch: str = "amd64", progress: Progress = lambda line: None) -> Layout:
    """Write a bootable raw disk image of the image at `rootfs` to `target` (sparse).

    kind "usr-ab": the image's /usr goes into USR-A (USR-B stays empty until the first update), its
    kernel and initramfs become slot a's on the boot partition, the rest is the root file system.
    """
    check_tools()
    kernel, initrd = find_kernel(rootfs)
    uefi = arch in SYSTEMD_BOOT
    if uefi and kind != "usr-ab":
        raise BoxError(f"{arch} disks boot by UEFI with the A/B layout only (vm.disk: usr-ab)")
    plan = layout(disk_gib, kind=kind, uefi=uefi)
    target.unlink(missing_ok=True)
    with open(target, "wb") as disk:
        disk.truncate(plan.disk_bytes)
    _run(["sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", str(target)], input=plan.sfdisk_script())

    scratch = target.with_name(target.name + ".root")
    shutil.rmtree(scratch, ignore_errors=True)
    try:
        root_tree = rootfs
        if plan.slots:
            usr_a = plan.slots["a"]
            progress(f"USR-A: ext4 from {rootfs}/usr ({usr_a.size // MIB} MiB); USR-B left for the first update")
            _mkfs_ext4(rootfs / "usr", target, usr_a.offset, usr_a.size, USR_LABEL)
            root_tree = _tree_without_usr(rootfs, scratch)
        progress(f"root file system: ext4 from {root_tree} ({plan.root.size // MIB} MiB)")
        _mkfs_ext4(root_tree, target, plan.root.offset, plan.root.size, ROOT_LABEL)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    boot_sectors = plan.boot.offset // SECTOR
    _run(["mkfs.vfat", "-F", "16", "-n", "LABBOOT", "--offset", str(boot_sectors), str(target),
          str(plan.boot.size // 1024)])
    if uefi:
        _uefi_boot_partition(rootfs, target, plan, arch, kernel, initrd, progress)
        return plan
    progress(f"boot partition: SYSLINUX, {kernel.name}, {initrd.name}")
    fat = f"{target}@@{plan.boot.offset}"
    config = target.with_name(target.name + ".syslinux.cfg")
    config.write_text(syslinux_config(plan=plan))
    names = ((slot_kernel("a"), slot_initrd("a")) if plan.slots else ("vmlinuz", "initrd.img"))
    try:
        for source, name in ((kernel, names[0]), (initrd, names[1]), (config, "syslinux.cfg")):
            _run(["mcopy", "-o", "-i", fat, str(source), f"::/{name}"])
    finally:
        config.unlink(missing_ok=True)
    _run(["syslinux", "--install", "--offset", str(plan.boot.offset), str(target)])
    # SYSLINUX's MBR code: boot the active partition. 440 bytes leave the table alone.
    with open(target, "r+b") as disk:
        disk.write(SYSLINUX_MBR.read_bytes()[:440])
    return plan


def _uefi_boot_partition(rootfs: Path, target: Path, plan: Layout, arch: str, kernel: Path, initrd: Path,
                         progress: Progress) -> None:
    """The EFI System Partition of an arm64 box: systemd-boot as the removable-media loader
    (EFI/BOOT/BOOTAA64.EFI, what edk2 starts with no boot entries of its own), its entries, and slot
    a's kernel, uncompressed: Debian's arm64 vmlinuz is gzip'd, which an EFI loader cannot start."""
    import gzip

    loader, loader_name = SYSTEMD_BOOT[arch]
    if not (rootfs / loader).is_file():
        raise BoxError(f"{rootfs} has no {loader}: this image cannot boot by UEFI",
                       hint="rebuild the image with --force (the VM flavor on arm64 installs systemd-boot-efi)")
    progress(f"boot partition (EFI): systemd-boot, {kernel.name}, {initrd.name}")
    fat = f"{target}@@{plan.boot.offset}"
    scratch = target.with_name(target.name + ".esp")
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    try:
        image = kernel.read_bytes()
        if image[:2] == b"\x1f\x8b":
            image = gzip.decompress(image)
        (scratch / slot_kernel("a")).write_bytes(image)
        files = {f"EFI/BOOT/{loader_name}": rootfs / loader, slot_kernel("a"): scratch / slot_kernel("a"),
                 slot_initrd("a"): initrd}
        for name, text in systemd_boot_entries(plan).items():
            (scratch / name.replace("/", "_")).write_text(text)
            files[name] = scratch / name.replace("/", "_")
        _run(["mmd", "-i", fat, "::/EFI", "::/EFI/BOOT", "::/loader", "::/loader/entries"])
        for name, source in files.items():
            _run(["mcopy", "-o", "-i", fat, str(source), f"::/{name}"])
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _mkfs_ext4(tree: Path, target: Path, offset: int, size: int, label: str) -> None:
    # -d copies the tree with owners, modes, xattrs and hard links; root_owner
    # only sets the top directory. No journal resize tricks: the defaults boot.
    _run(["mkfs.ext4", "-q", "-F", "-L", label, "-E", f"offset={offset}", "-d", str(tree), str(target),
          f"{size // 1024}k"])


def _tree_without_usr(rootfs: Path, scratch: Path) -> Path:
    """A copy of the image without /usr's content (mounted from a slot) or /boot's kernels (on the boot
    partition, per slot): what is left is small (/etc, /var, the merged-/usr links), so a plain copy."""
    scratch.mkdir()
    for entry in sorted(rootfs.iterdir()):
        if entry.name in ("usr", "boot"):
            (scratch / entry.name).mkdir()
            shutil.copystat(entry, scratch / entry.name)
            continue
        _run(["cp", "-a", "--", str(entry), str(scratch / entry.name)])
    return scratch


# ---------------------------------------------------------------- a slot's content for `lab update`

@dataclass(frozen=True)
class SlotImage:
    """What `lab update` writes into a node's passive slot: /usr as an ext4 image (gzip), its kernel."""

    usr_gz: Path          # the file system image, gzip-compressed (what crosses the network)
    usr_bytes: int        # its size uncompressed: what is written to the partition
    usr_sha256: str       # of the uncompressed image: what the node checks after writing
    kernel: Path
    initrd: Path


def usr_image_size(usr_tree_bytes: int, slot_bytes: int = USR_SLOT_MIB * MIB) -> int:
    """Room for a /usr of `usr_tree_bytes` (allocated) in ext4: a quarter more for metadata and the
    inode tables, 64 MiB for the journal, in whole MiB; refused when it cannot fit a slot."""
    wanted = -(-(usr_tree_bytes * 5 // 4 + 64 * MIB) // MIB) * MIB
    if wanted > slot_bytes:
        raise BoxError(f"this image's /usr needs {wanted // MIB} MiB, more than a slot's {slot_bytes // MIB} MiB",
                       hint="make the image smaller, or build boxes with bigger slots (USR_SLOT_MIB)")
    return wanted


def make_usr_image(rootfs: Path, directory: Path, progress: Progress = lambda line: None) -> SlotImage:
    """The image's /usr as a compressed ext4 image in `directory` (made once; its sha256 beside it)."""
    import gzip
    import hashlib
    import json

    kernel, initrd = find_kernel(rootfs)
    meta = directory / "usr-slot.json"
    packed = directory / "usr-slot.ext4.gz"
    if meta.is_file() and packed.is_file():
        record = json.loads(meta.read_text())
        return SlotImage(packed, int(record["bytes"]), str(record["sha256"]), kernel, initrd)
    directory.mkdir(parents=True, exist_ok=True)
    allocated = int(_run(["du", "-s", "--block-size=1", str(rootfs / "usr")]).stdout.split()[0])
    size = usr_image_size(allocated)
    raw = directory / f".usr-slot.ext4.tmp-{os.getpid()}"
    packing = directory / f".usr-slot.ext4.gz.tmp-{os.getpid()}"
    try:
        progress(f"/usr of {rootfs.parent.name} as a {size // MIB} MiB ext4 image")
        with open(raw, "wb") as handle:
            handle.truncate(size)
        _mkfs_ext4(rootfs / "usr", raw, 0, size, USR_LABEL)
        digest = hashlib.sha256()
        # gzip level 1: the image is read once per node, and a node under emulation inflates slowly
        with open(raw, "rb") as source, gzip.open(packing, "wb", compresslevel=1) as sink:
            while chunk := source.read(4 * MIB):
                digest.update(chunk)
                sink.write(chunk)
        os.replace(packing, packed)
        write_atomic(meta, json.dumps({"bytes": size, "sha256": digest.hexdigest()}) + "\n")
    finally:
        raw.unlink(missing_ok=True)
        packing.unlink(missing_ok=True)
    return SlotImage(packed, size, digest.hexdigest(), kernel, initrd)


def convert(raw: Path, target: Path, disk_format: str) -> None:
    """raw -> qcow2 (libvirt boxes) or a stream-optimized VMDK (what OVF packages carry)."""
    options = {"qcow2": ["-O", "qcow2"],
               "vmdk": ["-O", "vmdk", "-o", "subformat=streamOptimized"]}[disk_format]
    target.unlink(missing_ok=True)
    _run(["qemu-img", "convert", "-f", "raw", *options, str(raw), str(target)])


def virtual_size(image: Path) -> int:
    """Bytes the guest sees, from `qemu-img info`."""
    import json

    info = json.loads(_run(["qemu-img", "info", "--output=json", str(image)]).stdout)
    return int(info["virtual-size"])


def _run(argv: list[str], *, input: str | None = None) -> Result:
    # Disk tools on a ~1 GiB image take seconds; a stuck one ends as a CommandError.
    result = run(argv, input=input, check=False, timeout=DISK_TOOL_TIMEOUT)
    if not result.ok:
        from lab.images.build import failure_message

        raise BoxError(failure_message(argv, result.exit_code, result.output))
    return result
