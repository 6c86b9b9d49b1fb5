"""`lab update` on a VM: write a new OS version into a node's passive /usr slot.

A Lab OS VM disk has two /usr partitions (lab/images/vmdisk.py). The host
makes the new version's /usr into an ext4 image once (kept beside the image
in lab's cache, with its sha256), then streams it to each node over the
node's SSH session. There `bootslots.py stage-usr` (lab/node/) inflates it
onto the passive partition (direct I/O), checks the sha256 of what arrived
and reads the partition's ends back; the slot's
kernel and initramfs go onto the boot partition the same way. The node's
update agent does the rest (the reboot lock, the trial boot, the health
check), exactly as on nspawn.

The node's side runs in a transient systemd scope of low CPU and I/O weight
(`updates.staging_weight`): staging reads and writes a gigabyte, and the
node's applications must keep their share while it does (the disk's
scheduler is BFQ on Lab OS VMs, which honours the weight).
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from pathlib import Path

from lab.errors import ProviderError, StateError
from lab.host.locks import holding
from lab.host.ssh import SSHEndpoint, run, run_with_input, stop_if_cancelled
from lab.images.cache import lock_path
from lab.images.vmdisk import SlotImage, make_usr_image
from lab.node import layout
from lab.providers.base import Progress, no_progress

BOOTSLOTS = f"{layout.NODE_DIR}/bootslots.py"
# Per read or write on the channel, not the whole transfer: a node at the staging's low weight, under
# emulation, beside busy applications, may inflate and fsync for minutes without a word.
STAGE_TIMEOUT = 900.0
STATUS_TIMEOUT = 60.0
SLOT_IMAGE_LOCK_WAIT = 15 * 60


def slot_image(rootfs: Path, progress: Progress = no_progress) -> SlotImage:
    """The version's /usr image, made once per image (two `lab update` at once: the second waits)."""
    image_dir = rootfs.parent
    with holding(lock_path(image_dir), f"`lab` (pid {os.getpid()}) making the /usr image of {image_dir.name}",
                 SLOT_IMAGE_LOCK_WAIT,
                 busy=lambda holder: StateError(f"{image_dir.name} is busy: {holder}",
                                                hint="wait for that command to finish, then retry")):
        return make_usr_image(rootfs, image_dir / "slot", progress)


def scoped(command: str, weight: int) -> str:
    """`command` in a transient scope of CPU and I/O weight `weight` (100: everyone else's)."""
    return (f"systemd-run --scope --quiet --collect -p CPUWeight={weight} -p IOWeight={weight} -- {command}")


def slot_status(endpoint: SSHEndpoint, box_add: str) -> dict:
    """The node's slots (booted, default, once) as bootslots.py reports them; box_add: the command that
    adds the lab's box to Vagrant anew (the hint for a node booted from a box without the slots)."""
    result = run(endpoint, f"python3 {BOOTSLOTS} status", timeout=STATUS_TIMEOUT)
    if not result.ok:
        raise ProviderError(f"{endpoint.node} has no A/B /usr slots: {(result.stderr or result.stdout).strip()}",
                            hint=f"`lab update` on VMs needs a Lab OS box with its two /usr slots: `{box_add}` "
                                 "(builds the box from the recipe in boxes/ first), then `lab destroy` and "
                                 "`lab up`")
    return _json_line(endpoint, result.stdout, "bootslots.py status")


def _json_line(endpoint: SSHEndpoint, text: str, what: str) -> dict:
    """The last line of what the node printed, as the JSON object it should be."""
    lines = text.strip().splitlines()
    try:
        found = json.loads(lines[-1]) if lines else None
    except ValueError:
        found = None
    if not isinstance(found, dict):
        raise ProviderError(f"{endpoint.node}: {what} printed {text.strip()[-200:]!r}, not its JSON report",
                            hint="the node's lab agents may be from another version of lab: `lab up` ships "
                                 "them again")
    return found


def stage(endpoint: SSHEndpoint, rootfs: Path, weight: int, progress: Progress = no_progress,
          cancel: threading.Event | None = None, box_add: str = "lab box add --format libvirt") -> str:
    """Write the image at `rootfs` into the node's passive slot; return the slot ("a" or "b")."""
    status = slot_status(endpoint, box_add)
    if status["booted"] != status["default"]:
        raise ProviderError(f"{endpoint.node} runs slot {status['booted']} on trial (its default is "
                            f"{status['default']}): its update agent has not settled it yet",
                            hint="wait for `lab update status` to show it updated or rolled back, then retry")
    if status.get("once"):
        raise ProviderError(f"{endpoint.node} has a trial boot pending ({status['once']}): its update agent is "
                            "about to reboot into the passive slot",
                            hint="wait for `lab update status` to show it updated or rolled back, then retry")
    passive = layout.BOOT_SLOTS[1 - layout.BOOT_SLOTS.index(status["booted"])]
    image = slot_image(rootfs, progress)
    stop_if_cancelled(cancel, endpoint)  # each session below hears it itself
    progress(f"{endpoint.node}: writing slot {passive} ({image.usr_bytes / 2**20:.0f} MiB of /usr, its kernel and "
             f"initramfs) at weight {weight}")
    started = time.monotonic()
    for kind, path in (("kernel", image.kernel), ("initrd", image.initrd)):
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        with open(path, "rb") as source:
            _checked(endpoint, run_with_input(
                endpoint, scoped(f"python3 {BOOTSLOTS} stage-file {passive} {kind} {digest}", weight), source,
                timeout=STAGE_TIMEOUT, cancel=cancel), f"writing the {kind} of slot {passive}")
    with open(image.usr_gz, "rb") as source:
        result = _checked(endpoint, run_with_input(
            endpoint, scoped(f"python3 {BOOTSLOTS} stage-usr {passive} {image.usr_bytes} {image.usr_sha256}",
                             weight), source, timeout=STAGE_TIMEOUT, cancel=cancel), f"writing /usr into slot {passive}")
    measured = _json_line(endpoint, result.stdout, "bootslots.py stage-usr")
    progress(f"{endpoint.node}: {image.usr_bytes / 2**20:.0f} MiB written to slot {passive} and checked in "
             f"{time.monotonic() - started:.1f} s (the node's part {measured.get('total_s', float('nan')):.1f} s, weight {weight})")
    return passive


def _checked(endpoint: SSHEndpoint, result, doing: str):
    if not result.ok:
        message = (result.stderr or result.stdout).strip().splitlines()
        raise ProviderError(f"{endpoint.node}: {doing} failed: {message[-1] if message else f'exit {result.exit_status}'}",
                            hint="nothing changed in the slot the node runs; `lab update` again writes the "
                                 "passive slot anew")
    return result


