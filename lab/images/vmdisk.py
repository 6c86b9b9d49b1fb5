"""A disk that boots by itself, made from a VM-flavored node OS image.

The layout is the plainest a BIOS (SeaBIOS under QEMU, VirtualBox's BIOS)
boots: an MBR with SYSLINUX's boot code, partition 1 a small FAT file system
holding SYSLINUX, the kernel and the initramfs (marked active), partition 2
the ext4 root file system labelled `labos-root` (the image's fstab names it).

Everything is written into one sparse raw file with tools that work on plain
files: `mkfs.ext4 -d` fills the root file system straight from the image
directory, `mkfs.vfat --offset`, `mcopy -i FILE@@OFFSET` and `syslinux
--offset` do the boot partition. No loop device, no mount, nothing to undo
on the host if the build is interrupted but a file in a temporary directory.
`qemu-img convert` then turns the raw disk into a box's qcow2 or VMDK.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from lab.errors import BoxError, PrerequisiteError
from lab.host.run import Result, run

DISK_TOOL_TIMEOUT = 10 * 60

Progress = Callable[[str], None]

SECTOR = 512
MIB = 1024 * 1024
BOOT_PARTITION_MIB = 192      # kernel (~8 MB) and initramfs (~35 MB with MODULES=most)
ROOT_LABEL = "labos-root"
DEFAULT_DISK_GIB = 8
KERNEL_ARGS = "rw console=tty0 console=ttyS0,115200 net.ifnames=0 biosdevname=0 quiet"
SYSLINUX_MBR = Path("/usr/lib/syslinux/mbr/mbr.bin")

# tool -> Debian package, for one clear message when something is missing
DISK_TOOLS = {"mkfs.ext4": "e2fsprogs", "mkfs.vfat": "dosfstools", "mcopy": "mtools",
              "syslinux": "syslinux", "sfdisk": "fdisk", "qemu-img": "qemu-utils"}


@dataclass(frozen=True)
class Layout:
    """Byte offsets and sizes of the two partitions on a disk of `disk_bytes`."""

    disk_bytes: int
    boot_offset: int
    boot_bytes: int
    root_offset: int
    root_bytes: int

    def sfdisk_script(self) -> str:
        """Input for `sfdisk` (sizes in sectors): FAT16 boot partition active, Linux root after it.

        FAT16, not FAT32: at this size FAT32 would have fewer clusters than its
        minimum, and mtools (which SYSLINUX and mcopy use) then refuses it.
        """
        return ("label: dos\n"
                f"start={self.boot_offset // SECTOR}, size={self.boot_bytes // SECTOR}, type=6, bootable\n"
                f"start={self.root_offset // SECTOR}, size={self.root_bytes // SECTOR}, type=83\n")


def layout(disk_gib: int = DEFAULT_DISK_GIB, boot_mib: int = BOOT_PARTITION_MIB) -> Layout:
    """Partitions aligned to 1 MiB, as every partitioning tool does nowadays."""
    if disk_gib < 1:
        raise BoxError(f"disk size must be at least 1 GiB, got {disk_gib}")
    disk = disk_gib * 1024 * MIB
    boot_offset = 1 * MIB
    root_offset = boot_offset + boot_mib * MIB
    return Layout(disk_bytes=disk, boot_offset=boot_offset, boot_bytes=boot_mib * MIB,
                  root_offset=root_offset, root_bytes=disk - root_offset)


def syslinux_config(kernel_args: str = KERNEL_ARGS) -> str:
    return ("# Written by lab box build.\n"
            "DEFAULT labos\nPROMPT 0\nTIMEOUT 0\n\n"
            "LABEL labos\n  LINUX /vmlinuz\n  INITRD /initrd.img\n"
            f"  APPEND root=LABEL={ROOT_LABEL} {kernel_args}\n")


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


def make_raw_disk(rootfs: Path, target: Path, *, disk_gib: int = DEFAULT_DISK_GIB,
                  progress: Progress = lambda line: None) -> Layout:
    """Write a bootable raw disk image of the image at `rootfs` to `target` (sparse)."""
    check_tools()
    kernel, initrd = find_kernel(rootfs)
    plan = layout(disk_gib)
    target.unlink(missing_ok=True)
    with open(target, "wb") as disk:
        disk.truncate(plan.disk_bytes)
    _run(["sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", str(target)], input=plan.sfdisk_script())

    progress(f"root file system: ext4 from {rootfs} ({plan.root_bytes // MIB} MiB)")
    # -d copies the tree with owners, modes, xattrs and hard links; root_owner
    # only sets the top directory. No journal resize tricks: the defaults boot.
    _run(["mkfs.ext4", "-q", "-F", "-L", ROOT_LABEL, "-E", f"offset={plan.root_offset}",
          "-d", str(rootfs), str(target), f"{plan.root_bytes // 1024}k"])

    progress(f"boot partition: SYSLINUX, {kernel.name}, {initrd.name}")
    boot_sectors = plan.boot_offset // SECTOR
    _run(["mkfs.vfat", "-F", "16", "-n", "LABBOOT", "--offset", str(boot_sectors), str(target),
          str(plan.boot_bytes // 1024)])
    fat = f"{target}@@{plan.boot_offset}"
    config = target.with_name(target.name + ".syslinux.cfg")
    config.write_text(syslinux_config())
    try:
        for source, name in ((kernel, "vmlinuz"), (initrd, "initrd.img"), (config, "syslinux.cfg")):
            _run(["mcopy", "-o", "-i", fat, str(source), f"::/{name}"])
    finally:
        config.unlink(missing_ok=True)
    _run(["syslinux", "--install", "--offset", str(plan.boot_offset), str(target)])
    # SYSLINUX's MBR code: boot the active partition. 440 bytes leave the table alone.
    with open(target, "r+b") as disk:
        disk.write(SYSLINUX_MBR.read_bytes()[:440])
    return plan


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
