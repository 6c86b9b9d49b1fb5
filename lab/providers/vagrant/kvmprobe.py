"""Does a KVM guest actually boot on this host? One short probe per host and box, cached.

`/dev/kvm` existing says little: under nested virtualisation (CI runners,
this project's own machines) KVM guests can hang at kernel start, or QEMU can
abort setting an MSR the host's CPU model names, and vagrant-libvirt then
waits for its boot timeout with nothing to show. `providers.libvirt.driver:
auto` (the default) asks this module first.

The probe boots the box's own kernel and initramfs, the very files the VM
would boot, under `qemu-system-x86_64 -accel kvm -cpu host` (vagrant-libvirt's
default CPU mode is libvirt's host-model: the host's CPU with its features;
`-cpu host` is the nearest QEMU has without libvirt) with the initramfs's
shell as PID 1 echoing a marker on the serial console. The marker on a line
of its own means the guest reached userspace. The shell then exits, the
kernel panics, `panic=-1` reboots at once and `-no-reboot` ends QEMU: a
guest that boots ends the probe by itself in about a second. Anything else
(QEMU exits first, or no marker within `PROBE_TIMEOUT`) means KVM does not
boot guests here; QEMU runs in its own process group and is killed when the
time is up.

The kernel and initramfs come out of the box image Vagrant has added (the
`box.img` vagrant-libvirt uploads): the MBR's FAT boot partition of a Lab OS
box is copied out with `qemu-img dd` and read with mtools (both already
needed to build boxes), under a second. A box laid out otherwise (a generic
`box.vagrant` box with /boot on ext4 or LVM) cannot be probed: the answer is
then "unknown" and never cached.

Verdicts are cached in the user's cache dir, one file per host and box, keyed
by the host's kernel release, QEMU version and /dev/kvm, and the box image's
size and modification time (vagrant-libvirt keys its pool copy on the same
mtime): a kernel or QEMU update or a new box build probes again.
`cached_kvm_verdict()` reads it without probing (`lab doctor`, `lab render`).
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import json
import math
import os
import platform
import shutil
import signal
import struct
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Literal, Sequence

from lab.errors import LabError, ProviderError
from lab.host.files import write_atomic
from lab.host.locks import holding
from lab.host.processes import interrupts_held
from lab.host.paths import cache_dir
from lab.host.run import run
from lab.host.vagrant import added_box_dirs

Progress = Callable[[str], None]
Driver = Literal["kvm", "qemu"]

QEMU = "qemu-system-x86_64"
KVM_DEVICE = Path("/dev/kvm")
# KVM reaches the initramfs in under 2 s even on a loaded host; a hang never does.
PROBE_TIMEOUT = 15.0
PROBE_MEMORY_MIB = 256
MARKER = "LAB-KVM-PROBE-REACHED-USERSPACE"
KERNEL_ARGS = f'console=ttyS0 panic=-1 rdinit=/bin/sh -- -c "echo {MARKER}"'
CACHE_VERSION = 1
# MBR partition types of FAT file systems (FAT12, FAT16 <32M, FAT16, FAT32, FAT32 LBA, FAT16 LBA).
FAT_TYPES = frozenset({0x01, 0x04, 0x06, 0x0B, 0x0C, 0x0E})
SECTOR = 512
DISK_TOOL_TIMEOUT = 120.0


# ---------------------------------------------------------------- what is probed

@dataclass(frozen=True)
class HostFacts:
    """What a verdict holds for: a change in any of these probes again."""

    kernel: str   # the host's kernel release
    qemu: str     # `qemu-system-x86_64 --version`'s first line, "" if it is missing
    kvm: str      # "usable", "absent" or "no access" (/dev/kvm for this user)

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


def kvm_device_state(device: Path = KVM_DEVICE) -> str:
    if not device.exists():
        return "absent"
    return "usable" if os.access(device, os.R_OK | os.W_OK) else "no access"


@functools.lru_cache(maxsize=None)
def qemu_version(qemu: str = QEMU) -> str:
    """`qemu --version`'s first line, "" if QEMU is missing (asked once per process: every spec settling asks)."""
    if shutil.which(qemu) is None:
        return ""
    result = run([qemu, "--version"], check=False, timeout=30)
    return result.stdout.strip().splitlines()[0] if result.ok and result.stdout.strip() else ""


def host_facts() -> HostFacts:
    return HostFacts(kernel=platform.release(), qemu=qemu_version(), kvm=kvm_device_state())


@dataclass(frozen=True)
class BoxImage:
    """The disk image of a box added to Vagrant for libvirt, as vagrant-libvirt uploads it."""

    name: str
    path: Path
    disk_format: str
    identity: str  # size and mtime: a rebuilt and re-added box is another box

    @classmethod
    def of(cls, name: str, directory: Path) -> "BoxImage | None":
        image = directory / "box.img"
        try:
            info = image.stat()
            metadata = json.loads((directory / "metadata.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        disk_format = metadata.get("format", "qcow2") if isinstance(metadata, dict) else "qcow2"
        if disk_format not in ("qcow2", "raw"):
            return None
        identity = hashlib.sha256(f"{name}\0{info.st_size}\0{info.st_mtime_ns}".encode()).hexdigest()[:16]
        return cls(name=name, path=image, disk_format=disk_format, identity=identity)


def added_libvirt_box(name: str) -> BoxImage | None:
    """The libvirt box Vagrant has added under `name` (version 0 first: lab adds its boxes unversioned)."""
    for directory in [*added_box_dirs(name, "libvirt", version="0"), *reversed(added_box_dirs(name, "libvirt"))]:
        box = BoxImage.of(name, directory)
        if box is not None:
            return box
    return None


# ---------------------------------------------------------------- the verdict

@dataclass(frozen=True)
class KvmVerdict:
    """What the probe found for one host and box."""

    boots: bool
    reason: str       # for people: "a KVM guest reached userspace in 0.9 s", "QEMU exited: ..."
    seconds: float    # how long the probe ran
    probed_at: str    # ISO 8601, UTC
    host: HostFacts
    box: str          # the box's Vagrant name
    box_identity: str

    def to_json(self) -> dict:
        return {"version": CACHE_VERSION, **asdict(self)}

    @classmethod
    def from_json(cls, data: object) -> "KvmVerdict | None":
        """The verdict a cache file holds, or None for anything lab did not write."""
        try:
            if not isinstance(data, dict) or data.get("version") != CACHE_VERSION:
                return None
            host = data["host"]
            verdict = cls(boots=data["boots"], reason=data["reason"], seconds=float(data["seconds"]),
                          probed_at=data["probed_at"], box=data["box"], box_identity=data["box_identity"],
                          host=HostFacts(kernel=host["kernel"], qemu=host["qemu"], kvm=host["kvm"]))
        except (KeyError, TypeError, ValueError):
            return None
        fields = (verdict.reason, verdict.probed_at, verdict.box, verdict.box_identity,
                  verdict.host.kernel, verdict.host.qemu, verdict.host.kvm)
        if not isinstance(verdict.boots, bool) or not all(isinstance(f, str) for f in fields):
            return None
        return verdict


def judge_console(console: str, errors: str, exit_code: int | None, seconds: float,
                  timeout: float = PROBE_TIMEOUT) -> tuple[bool, str]:
    """(booted, why) from what a probe's QEMU printed: the serial console, its stderr, how it ended.

    Only the marker on a line of its own counts: the kernel also prints its
    command line, which holds the marker after `echo`.
    """
    if any(line.strip() == MARKER for line in console.splitlines()):
        return True, f"a KVM guest reached userspace in {seconds:.1f} s"
    said = [line.strip() for line in errors.splitlines() if line.strip()]
    if exit_code is None:
        shown = [line.strip() for line in console.splitlines() if line.strip()]
        last = f"; the console's last line: {shown[-1][:160]!r}" if shown else "; no console output at all"
        return False, f"a KVM guest did not reach userspace within {timeout:.0f} s (it hangs){last}"
    detail = next((line for line in said if "error" in line.lower()), said[0] if said else "")
    how = f"was killed by {_signal_name(-exit_code)}" if exit_code < 0 else f"exited with status {exit_code}"
    return False, (f"QEMU with KVM {how} before the guest reached userspace"
                   + (f": {detail[:200]}" if detail else ""))


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def probe_argv(kernel: Path, initrd: Path, qemu: str = QEMU) -> list[str]:
    return [qemu, "-accel", "kvm", "-cpu", "host", "-m", str(PROBE_MEMORY_MIB), "-smp", "1",
            "-nodefaults", "-display", "none", "-monitor", "none", "-serial", "stdio", "-no-reboot",
            "-kernel", str(kernel), "-initrd", str(initrd), "-append", KERNEL_ARGS]


def run_probe(argv: Sequence[str], timeout: float = PROBE_TIMEOUT) -> tuple[str, str, int | None, float]:
    """Run a probe's QEMU: (console, stderr, exit code or None on timeout, seconds).

    Not lab.host.run: QEMU gets a process group of its own, and whatever
    ends the wait (the timeout, Ctrl-C) kills that whole group before QEMU is
    reaped, so no guest outlives the probe.
    """
    started = time.monotonic()
    process: subprocess.Popen | None = None
    exit_code: int | None = None
    console, errors = b"", b""
    try:
        with interrupts_held():  # a Ctrl-C lands inside the try, once there is a group to kill
            process = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, start_new_session=True)
        console, errors = process.communicate(timeout=timeout)
        exit_code = process.returncode
    except subprocess.TimeoutExpired:
        console, errors = b"", b""
    finally:
        if process is not None and process.returncode is None:  # not reaped: its group id is still its own
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            leftover = process.communicate()
            console, errors = console or leftover[0] or b"", errors or leftover[1] or b""
    return (console.decode(errors="replace"), errors.decode(errors="replace"), exit_code,
            time.monotonic() - started)


# ---------------------------------------------------------------- the box's kernel

@dataclass(frozen=True)
class Partition:
    start: int    # sectors
    sectors: int
    kind: int     # MBR partition type
    bootable: bool


def mbr_partitions(sector: bytes) -> list[Partition]:
    """The primary partitions of an MBR (empty if it is not one)."""
    if len(sector) < SECTOR or sector[510:512] != b"\x55\xaa":
        return []
    found = []
    for index in range(4):
        entry = sector[446 + 16 * index: 446 + 16 * (index + 1)]
        status, kind = entry[0], entry[4]
        start, sectors = struct.unpack_from("<II", entry, 8)
        if kind and sectors:
            found.append(Partition(start=start, sectors=sectors, kind=kind, bootable=status == 0x80))
    return found


def boot_files(syslinux_cfg: str) -> tuple[str, str]:
    """The kernel and initramfs a SYSLINUX config boots (its first LINUX/KERNEL and INITRD lines)."""
    kernel = initrd = None
    for line in syslinux_cfg.splitlines():
        words = line.split(None, 1)
        if len(words) != 2:
            continue
        keyword, value = words[0].upper(), words[1].strip()
        if keyword in ("LINUX", "KERNEL") and kernel is None:
            kernel = value.split()[0]
        elif keyword == "INITRD" and initrd is None:
            initrd = value.split(",")[0].split()[0]
    return (kernel or "/vmlinuz").lstrip("/"), (initrd or "/initrd.img").lstrip("/")


class NotProbeable(LabError):
    """The box's kernel cannot be had without booting the box (its layout is not a Lab OS box's)."""


def _disk_tool(argv: list[str]) -> None:
    result = run(argv, check=False, timeout=DISK_TOOL_TIMEOUT)
    if not result.ok:
        raise NotProbeable(f"`{' '.join(argv[:2])}` failed: {result.output.strip()[-300:]}")


def extract_kernel(box: BoxImage, directory: Path) -> tuple[Path, Path]:
    """Copy the box's kernel and initramfs into `directory`; NotProbeable if the box has no FAT boot partition."""
    for tool, package in (("qemu-img", "qemu-utils"), ("mcopy", "mtools")):
        if shutil.which(tool) is None:
            raise NotProbeable(f"{tool} is not installed (apt-get install {package})")
    head = directory / "mbr.raw"
    _disk_tool(["qemu-img", "dd", "-f", box.disk_format, "-O", "raw", f"bs={SECTOR}", "count=1",
                f"if={box.path}", f"of={head}"])
    partitions = mbr_partitions(head.read_bytes())
    fat = sorted((p for p in partitions if p.kind in FAT_TYPES), key=lambda p: not p.bootable)
    if not fat:
        raise NotProbeable(f"{box.name} has no FAT boot partition (not a Lab OS box)")
    part = fat[0]
    # qemu-img dd counts in blocks of bs: the largest power of two up to 1 MiB that the partition's start
    # and size both are multiples of (Lab OS boxes align to 1 MiB: a 192 MiB copy in under a second).
    common = math.gcd(part.start, part.sectors)
    block = SECTOR * min(2048, common & -common)
    boot = directory / "boot.raw"
    _disk_tool(["qemu-img", "dd", "-f", box.disk_format, "-O", "raw", f"bs={block}",
                f"skip={part.start * SECTOR // block}", f"count={part.sectors * SECTOR // block}",
                f"if={box.path}", f"of={boot}"])
    config = directory / "syslinux.cfg"
    found = run(["mcopy", "-n", "-i", str(boot), "::/syslinux.cfg", str(config)], check=False, timeout=60)
    kernel_name, initrd_name = boot_files(config.read_text(errors="replace") if found.ok else "")
    kernel, initrd = directory / "vmlinuz", directory / "initrd.img"
    for name, target in ((kernel_name, kernel), (initrd_name, initrd)):
        copied = run(["mcopy", "-n", "-i", str(boot), f"::/{name}", str(target)], check=False, timeout=60)
        if not copied.ok:
            raise NotProbeable(f"{box.name}'s boot partition has no /{name}")
    return kernel, initrd


# ---------------------------------------------------------------- cache

def cache_path(host: HostFacts, box: BoxImage) -> Path:
    return cache_dir() / "kvm-probe" / f"{host.key()}-{box.identity}.json"


def read_verdict(path: Path, host: HostFacts, box: BoxImage) -> KvmVerdict | None:
    try:
        verdict = KvmVerdict.from_json(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError):
        return None
    # The file name is a hash of these; a verdict for something else is never taken.
    if verdict is None or verdict.host != host or verdict.box_identity != box.identity:
        return None
    return verdict


def cached_kvm_verdict(box: str, *, host: HostFacts | None = None) -> KvmVerdict | None:
    """What the last probe found for this host and the libvirt box Vagrant has as `box` (e.g.
    `lab-labos-1`), without probing; None if it was never probed, or the host or box changed since."""
    image = added_libvirt_box(box)
    if image is None:
        return None
    host = host or host_facts()
    return read_verdict(cache_path(host, image), host, image)


def kvm_verdict(box: str, progress: Progress = lambda line: None, *,
                timeout: float = PROBE_TIMEOUT) -> KvmVerdict:
    """The cached verdict for this host and box, or probe now (one probe at a time per user) and cache it.

    Raises NotProbeable when no probe can tell: no /dev/kvm this user can
    open, no QEMU, the box not added or not laid out as a Lab OS box.
    """
    host = host_facts()
    if host.kvm != "usable":
        raise NotProbeable("/dev/kvm does not exist" if host.kvm == "absent"
                           else f"this user cannot open {KVM_DEVICE}")
    if not host.qemu:
        raise NotProbeable(f"{QEMU} is not installed (apt-get install qemu-system-x86)")
    if platform.machine() not in ("x86_64", "AMD64"):
        raise NotProbeable(f"the probe boots x86_64 guests; this host is {platform.machine()}")
    image = added_libvirt_box(box)
    if image is None:
        raise NotProbeable(f"Vagrant has no libvirt box {box}")
    path = cache_path(host, image)
    verdict = read_verdict(path, host, image)
    if verdict is not None:
        return verdict
    lock = path.parent / "probe.lock"
    path.parent.mkdir(parents=True, exist_ok=True)

    def busy(holder: str) -> LabError:
        return ProviderError(f"another KVM probe is still running ({holder})",
                             hint="wait for it to finish, or set providers.libvirt.driver to kvm or qemu")

    with holding(lock, f"a KVM probe (pid {os.getpid()})", wait=2 * timeout + 60, busy=busy):
        verdict = read_verdict(path, host, image)  # another process may have probed meanwhile
        if verdict is not None:
            return verdict
        progress(f"checking once whether KVM boots a guest on this host (up to {timeout:.0f} s; cached after)")
        with tempfile.TemporaryDirectory(prefix="lab-kvm-probe-") as scratch:
            kernel, initrd = extract_kernel(image, Path(scratch))
            console, errors, exit_code, seconds = run_probe(probe_argv(kernel, initrd), timeout)
        boots, reason = judge_console(console, errors, exit_code, seconds, timeout)
        verdict = KvmVerdict(boots=boots, reason=reason, seconds=round(seconds, 2),
                             probed_at=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                             host=host, box=box, box_identity=image.identity)
        write_atomic(path, json.dumps(verdict.to_json(), indent=2, sort_keys=True) + "\n")
    return verdict


# ---------------------------------------------------------------- the decision

@dataclass(frozen=True)
class DriverChoice:
    """The libvirt domain type a lab gets, and why. `driver` is None while only a probe can tell."""

    driver: Driver | None
    why: str
    note: str | None = None  # one line for `lab up` when the lab gets less than the user may expect


def choose_driver(requested: str, *, recorded: str | None = None, remote: bool = False,
                  kvm_device: str = "usable", verdict: KvmVerdict | None = None,
                  unprobeable: str | None = None) -> DriverChoice:
    """Pure: the driver for `providers.libvirt.driver: requested`, from what is known.

    `recorded` is the driver the lab's domains were created with (it stays
    theirs), `remote` a libvirt URI of another host (nothing here says what
    its KVM does), `kvm_device` what `kvm_device_state()` says, `verdict` the
    probe's, `unprobeable` why no probe can tell.
    """
    if requested in ("kvm", "qemu"):
        return DriverChoice(requested, "set in the spec")  # type: ignore[arg-type]
    if recorded in ("kvm", "qemu"):
        return DriverChoice(recorded, "the driver this lab was created with")  # type: ignore[arg-type]
    if remote:
        return DriverChoice("kvm", "libvirt runs on another host: its KVM is not probed from here")
    if kvm_device == "absent":
        return DriverChoice("qemu", "no /dev/kvm on this host",
                            note="no /dev/kvm on this host: VMs run under software emulation (driver qemu, "
                                 "much slower)")
    if verdict is not None:
        if verdict.boots:
            return DriverChoice("kvm", verdict.reason)
        return DriverChoice("qemu", verdict.reason,
                            note=f"KVM does not boot guests on this host ({verdict.reason}); VMs run under "
                                 "software emulation (driver qemu, much slower)")
    if unprobeable is not None:
        return DriverChoice("kvm", f"not probed: {unprobeable}",
                            note=f"could not check whether KVM boots guests here ({unprobeable}); using driver kvm"
                                 ": if VMs hang at boot, set providers.libvirt.driver: qemu")
    return DriverChoice(None, "not probed yet")
