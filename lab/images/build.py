"""Build a node OS image from a box recipe: debootstrap, then customize.

Building runs `debootstrap` against the host's Debian mirror and then
customizes the result so it boots under `systemd-nspawn --boot` with `/usr`
bound read-only (or, in the VM flavor, as a Vagrant box's disk). A finished
build is moved into the cache (lab/images/cache.py) in one rename; an
interrupted one leaves nothing behind.
"""

from __future__ import annotations

import collections
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from lab.errors import BoxError, PrerequisiteError, StateError
from lab.host.files import copy_as_lf
from lab.host.locks import holding
from lab.host.processes import interrupts_held
from lab.host.run import run
from lab.images.cache import (Image, delete_tree, find_image, image_key, image_path, lock_path, read_image,
                              refuse_if_in_use)
from lab.images.recipes import (UNIT_ACTIONS, Recipe, host_arch, host_debian_mirror, load_recipe, native_arch,
                                recipe_files)

Progress = Callable[[str], None]

_OUTPUT_TAIL_LINES = 25
# debootstrap takes ~3.5 min from a good mirror; a chroot step (apt, update-initramfs) a minute or two.
DEBOOTSTRAP_TIMEOUT = 30 * 60
CHROOT_TIMEOUT = 15 * 60
# A foreign build's second stage configures every package under qemu-user-static: 5 to 20 times slower.
FOREIGN_STAGE_TIMEOUT = 90 * 60
# A second build of the same image waits for the first: debootstrap and a chroot step or two at most.
BUILD_LOCK_WAIT = DEBOOTSTRAP_TIMEOUT + FOREIGN_STAGE_TIMEOUT + 2 * CHROOT_TIMEOUT


def build_image(name: str, version: str, *, mirror: str | None = None,
                progress: Progress | None = None, force: bool = False, flavor: str = "container",
                arch: str | None = None) -> Image:
    """The image for `name`/`version` (for `arch`, default this machine's), built now unless cached."""
    report = progress or (lambda line: None)
    arch = arch or native_arch()
    if not force and (image := find_image(name, version, flavor, arch)) is not None:
        return image
    recipe = load_recipe(name, version, flavor, arch)
    _check_build_prerequisites()
    if arch != host_arch():
        check_foreign_arch(arch)
    mirror = (mirror or host_debian_mirror()).rstrip("/")
    key = image_key(name, version, flavor, arch)
    final = image_path(name, version, key, flavor, arch)
    final.parent.mkdir(parents=True, exist_ok=True)

    # Two `lab up` at once must not both spend minutes building the same image:
    # the second waits here and then finds the first one's result.
    with holding(lock_path(final), f"`lab` (pid {os.getpid()}) building {final.name}", BUILD_LOCK_WAIT,
                 busy=lambda holder: StateError(f"{final.name} is still being built by {holder} after "
                                                f"{BUILD_LOCK_WAIT / 60:.0f} min",
                                                hint="wait for that build to finish (or stop it), then retry")):
        if not force and (image := read_image(final)) is not None:
            return image
        temp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
        _discard(temp)
        try:
            temp.mkdir()
            _debootstrap(recipe, mirror, temp / "rootfs", report)
            _customize(recipe, key, temp / "rootfs", report)
            _write_meta(temp, recipe, key, mirror)
            _install(temp, final)
        except BaseException:
            _discard(temp)
            raise
    image = read_image(final)
    assert image is not None, f"{final} was just built but is unreadable"
    report(f"built {final.name} ({image.size_bytes / 1e6:.0f} MB)")
    return image


def _check_build_prerequisites() -> None:
    if not sys.platform.startswith("linux"):
        raise PrerequisiteError("building a node image needs Linux (debootstrap, chroot)",
                                hint="build the box on a Linux machine (`lab box build --format virtualbox`) and "
                                     "add its .box here (`vagrant box add --name NAME FILE.box`), or set "
                                     "box.vagrant to a box from Vagrant's catalog, e.g. debian/bookworm64")
    if os.geteuid() != 0:
        raise PrerequisiteError("building a node image needs root (debootstrap, chroot)",
                                hint="run lab as root, e.g. with sudo")
    for tool, package in (("debootstrap", "debootstrap"), ("chroot", "coreutils"),
                          ("umount", "mount")):
        if shutil.which(tool) is None:
            raise PrerequisiteError(f"`{tool}` is not on PATH",
                                    hint=f"apt-get install {package}")


def _debootstrap(recipe: Recipe, mirror: str, rootfs: Path, report: Progress) -> None:
    def before_configure(tree: Path) -> None:
        # The VM overlay's initramfs settings (MODULES=list) before the kernel's package is configured:
        # under emulation an initramfs of every module took ~10 min to make, and it was made twice.
        if recipe.vm_overlay is not None and (recipe.vm_overlay / "etc/initramfs-tools").is_dir():
            _copy_overlay(recipe.vm_overlay / "etc/initramfs-tools", tree / "etc/initramfs-tools")

    debootstrap(recipe.suite, mirror, rootfs, report, recipe.packages, arch=recipe.arch,
                before_configure=before_configure)


# Where the kernel's binfmt_misc lists its interpreters, and the one a foreign arm64 build runs through.
BINFMT_DIR = Path("/proc/sys/fs/binfmt_misc")
QEMU_BINFMT = {"arm64": "qemu-aarch64", "amd64": "qemu-x86_64"}


def check_foreign_arch(arch: str) -> None:
    """A foreign debootstrap runs the image's own binaries (dpkg, maintainer scripts, update-initramfs)
    through qemu-user-static, which binfmt_misc must know with its `F` flag (opened once, so it works
    inside the chroot). lab does not register it: that changes the host's kernel for every program;
    `tools/install.sh` (or the package's own systemd-binfmt) does, once."""
    entry = BINFMT_DIR / QEMU_BINFMT.get(arch, f"qemu-{arch}")
    try:
        text = entry.read_text()
    except OSError:
        text = ""
    if not text.startswith("enabled") or "F" not in next((line.split(":", 1)[1] for line in text.splitlines()
                                                          if line.startswith("flags:")), ""):
        name = entry.name
        raise PrerequisiteError(
            f"building an {arch} image on this {host_arch()} machine needs qemu-user-static registered with "
            f"binfmt_misc ({entry} is {'missing' if not text else 'not enabled with flag F'})",
            hint=f"apt-get install qemu-user-static; mountpoint -q {BINFMT_DIR} || mount -t binfmt_misc "
                 f"binfmt_misc {BINFMT_DIR}; [ -e {entry} ] || grep -v '^#' /usr/lib/binfmt.d/{name}.conf "
                 f"> {BINFMT_DIR}/register   (tools/install.sh does this)")


def debootstrap(suite: str, mirror: str, rootfs: Path, report: Progress, packages: tuple[str, ...] = (),
                arch: str | None = None, before_configure: Callable[[Path], None] | None = None) -> None:
    """A minbase `suite` at `rootfs` from `mirror`, stopped (with its children) on Ctrl-C or a stalled mirror.

    Another architecture than this machine's (arm64 on amd64) is two stages: debootstrap unpacks the
    packages (`--foreign`), then its second stage, run inside the tree through qemu-user-static,
    configures them."""
    include = [f"--include={','.join(packages)}"] if packages else []
    foreign = arch is not None and arch != host_arch()
    arch_options = [f"--arch={arch}", "--foreign"] if foreign else []
    argv = ["debootstrap", "--variant=minbase", *arch_options, *include, suite, str(rootfs), mirror]
    report(f"debootstrap {suite}{f' ({arch}, foreign)' if foreign else ''} from {mirror} "
           f"({len(packages)} extra packages)")
    _debootstrap_stage(argv, rootfs, mirror, suite, report, DEBOOTSTRAP_TIMEOUT)
    if foreign:
        if before_configure is not None:
            before_configure(rootfs)
        report(f"debootstrap's second stage, inside the {arch} tree under qemu-user-static (slow: emulated)")
        _debootstrap_stage(["chroot", str(rootfs), "/debootstrap/debootstrap", "--second-stage"], rootfs, mirror,
                           suite, report, FOREIGN_STAGE_TIMEOUT)


def _debootstrap_stage(argv: list[str], rootfs: Path, mirror: str, suite: str, report: Progress,
                       timeout: float) -> None:
    tail: collections.deque[str] = collections.deque(maxlen=_OUTPUT_TAIL_LINES)
    # Its own session: on an interrupt we stop debootstrap *and* the dpkg and
    # chroot processes it started, before unmounting and deleting their tree.
    process: subprocess.Popen | None = None
    # A mirror that stalls would otherwise hang the build forever: stop it at a deadline.
    timed_out = threading.Event()

    def expire() -> None:
        timed_out.set()
        if process is not None:
            _stop(process)

    watchdog = threading.Timer(timeout, expire)
    watchdog.daemon = True
    try:
        with interrupts_held():  # a Ctrl-C lands inside the try, once there is a process to stop
            process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, text=True, errors="replace",
                                       start_new_session=True)
        watchdog.start()
        assert process.stdout is not None
        for line in process.stdout:
            line = line.rstrip()
            tail.append(line)
            report(line)
        status = process.wait()
    except BaseException:
        if process is not None:
            _stop(process)
        raise
    finally:
        watchdog.cancel()
    if timed_out.is_set():
        raise BoxError(f"debootstrap did not finish in {timeout // 60:.0f} minutes: stopped",
                       hint=f"check that {mirror} answers (pass another with --mirror URL)")
    if status != 0:
        # debootstrap's own log names the package or URL that failed; its
        # console output often only says "see the log".
        log = rootfs / "debootstrap" / "debootstrap.log"
        log_tail = _tail(log.read_text(errors="replace")) if log.is_file() else ""
        raise BoxError(failure_message(argv, status, "\n".join(tail), log_tail),
                       hint="check that the mirror serves "
                            f"{suite} (pass another with --mirror URL)")


def _stop(process: subprocess.Popen) -> None:
    """Terminate a process and everything in its process group, politely first."""
    for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            continue
        # The leader is gone; give what is left of its group a moment to follow.
        deadline = time.monotonic() + grace
        while _group_alive(process.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if not _group_alive(process.pid):
            return


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _customize(recipe: Recipe, key: str, rootfs: Path, report: Progress) -> None:
    if recipe.flavor == "vm":
        # Before the overlay, which puts files into the new user's home.
        report("customize: the vagrant user")
        _chroot(rootfs, "useradd", "--create-home", "--user-group", "--shell", "/bin/bash", "vagrant")
    report("customize: copying the recipe's rootfs/ files")
    _copy_overlay(recipe.overlay, rootfs)
    if recipe.version_overlay is not None:
        _copy_overlay(recipe.version_overlay, rootfs)
    if recipe.vm_overlay is not None:
        _copy_overlay(recipe.vm_overlay, rootfs)
        _vagrant_conventions(rootfs)
        # The overlay may configure initramfs-tools (which modules): the
        # initramfs the kernel package made during debootstrap predates it.
        report("customize: regenerating the initramfs")
        _chroot(rootfs, "update-initramfs", "-u", "-k", "all")
    report("customize: os-release, identity, ssh host keys")
    _write_os_release(recipe, key, rootfs)
    _reset_identity(rootfs)
    report("customize: enabling, disabling and masking units")
    _write_preset(recipe, rootfs)
    _set_units(recipe, rootfs)
    _chroot(rootfs, "passwd", "--lock", "root")
    (rootfs / "var/log/journal").mkdir(parents=True, exist_ok=True)
    report("customize: cleaning apt caches")
    _clean_apt(rootfs)
    _mark_updated(rootfs)


def _vagrant_conventions(rootfs: Path) -> None:
    """Modes and owners Vagrant and sudo insist on (git keeps neither)."""
    ssh_dir = rootfs / "home/vagrant/.ssh"
    if ssh_dir.is_dir():
        os.chmod(ssh_dir, 0o700)
        for file in ssh_dir.iterdir():
            os.chmod(file, 0o600)
        _chroot(rootfs, "chown", "-R", "vagrant:vagrant", "/home/vagrant")
    for sudoers in (rootfs / "etc/sudoers.d").glob("*"):
        os.chmod(sudoers, 0o440)


def _copy_overlay(overlay: Path, rootfs: Path) -> None:
    """Copy files one by one: merged-/usr symlinks (/lib -> usr/lib) must stay links."""
    if not overlay.is_dir():
        return
    for source in recipe_files(overlay):
        target = rootfs / source.relative_to(overlay)
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.is_symlink() or target.exists():
            target.unlink()
        copy_as_lf(source, target)  # LF: a CRLF checkout's units and scripts would break in the image


def _write_os_release(recipe: Recipe, key: str, rootfs: Path) -> None:
    v = recipe.version
    fields = {
        "NAME": recipe.os_name, "ID": recipe.name, "ID_LIKE": "debian",
        "VERSION_ID": v, "VERSION": f"{v} ({recipe.suite})",
        "PRETTY_NAME": f"{recipe.os_name} {v}", "VERSION_CODENAME": recipe.suite,
        "IMAGE_ID": recipe.name, "IMAGE_VERSION": v, "BUILD_ID": key,
    }
    text = "".join(f'{k}="{value}"\n' for k, value in fields.items())
    usr_os_release = rootfs / "usr/lib/os-release"
    usr_os_release.unlink(missing_ok=True)
    usr_os_release.write_text(text)
    etc_os_release = rootfs / "etc/os-release"
    etc_os_release.unlink(missing_ok=True)
    etc_os_release.symlink_to("../usr/lib/os-release")


def _reset_identity(rootfs: Path) -> None:
    """Nothing that must differ between nodes may be baked into the shared image."""
    for host_key in (rootfs / "etc/ssh").glob("ssh_host_*"):
        host_key.unlink()
    # Empty (not absent): systemd then treats each node's first boot as such and
    # gives it a fresh machine id, while the file stays a valid mount point.
    (rootfs / "etc/machine-id").write_text("")
    (rootfs / "var/lib/dbus/machine-id").unlink(missing_ok=True)
    (rootfs / "etc/hostname").write_text("localhost\n")
    # debootstrap copies the build host's resolv.conf; nspawn provides one per node.
    (rootfs / "etc/resolv.conf").unlink(missing_ok=True)


def _write_preset(recipe: Recipe, rootfs: Path) -> None:
    """A preset matching the recipe: systemd applies presets on a node's first
    boot (empty machine-id) and must not re-enable what the recipe disables."""
    lines = [f"enable {u}" for u in recipe.units["enable"]]
    lines += [f"disable {u}" for u in recipe.units["disable"]]
    preset = rootfs / "usr/lib/systemd/system-preset/10-labos.preset"
    preset.parent.mkdir(parents=True, exist_ok=True)
    preset.write_text(f"# {recipe.os_name}: from boxes/{recipe.name}/recipe.yaml\n"
                      + "\n".join(lines) + "\n")


def _set_units(recipe: Recipe, rootfs: Path) -> None:
    # systemctl enable/disable/mask only edit symlinks, which works in a chroot
    # without a running systemd; the image's own systemctl knows its own layout.
    for action in UNIT_ACTIONS:
        if recipe.units[action]:
            _chroot(rootfs, "systemctl", action, *recipe.units[action])


def _clean_apt(rootfs: Path) -> None:
    for archive in (rootfs / "var/cache/apt/archives").glob("*.deb"):
        archive.unlink()
    for cache in (rootfs / "var/cache/apt").glob("*.bin"):
        cache.unlink()
    lists = rootfs / "var/lib/apt/lists"
    if lists.is_dir():
        for entry in lists.iterdir():
            if entry.name in ("partial", "lock"):
                continue
            entry.unlink() if not entry.is_dir() or entry.is_symlink() else shutil.rmtree(entry)


def _mark_updated(rootfs: Path) -> None:
    """Record that /etc and /var match this /usr, as systemd-update-done would.

    Units with ConditionNeedsUpdate= (systemd-sysusers here) otherwise run on
    every node's boot and copy files up into its layer; dpkg already did their
    work. Debian ships no systemd-update-done, so write its stamp ourselves.
    Runs last: the stamp must carry /usr's final mtime.
    """
    usr_mtime_ns = (rootfs / "usr").stat().st_mtime_ns
    stamp = ("# Written by lab's image builder in place of systemd-update-done.\n"
             f"TIMESTAMP_NSEC={usr_mtime_ns}\n")
    for directory in ("etc", "var"):
        updated = rootfs / directory / ".updated"
        updated.write_text(stamp)
        os.utime(updated, ns=(usr_mtime_ns, usr_mtime_ns))


def _chroot(rootfs: Path, *command: str) -> None:
    argv = ["chroot", str(rootfs), *command]
    result = run(argv, check=False, timeout=CHROOT_TIMEOUT)  # a timeout is a CommandError naming the command
    if not result.ok:
        raise BoxError(failure_message(argv, result.exit_code, result.output))


def _write_meta(temp: Path, recipe: Recipe, key: str, mirror: str) -> None:
    meta = {
        "name": recipe.name, "version": recipe.version, "key": key, "mirror": mirror, "flavor": recipe.flavor,
        "arch": recipe.arch,
        "built_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "size_bytes": _disk_usage(temp / "rootfs"),
    }
    (temp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")


def _install(temp: Path, final: Path) -> None:
    """Move a finished build into place; with force, replace the old image."""
    if final.exists():
        refuse_if_in_use(final)
        old = final.with_name(f"{final.name}.old-{os.getpid()}")
        final.rename(old)
        temp.rename(final)
        delete_tree(old)
    else:
        temp.rename(final)


def _disk_usage(path: Path) -> int:
    """Bytes allocated below `path`, each hard-linked file counted once, like du."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            stat = os.lstat(os.path.join(root, name))
            if (stat.st_dev, stat.st_ino) in seen:
                continue
            seen.add((stat.st_dev, stat.st_ino))
            total += stat.st_blocks * 512
    return total


def failure_message(argv: list[str], status: int, output: str, log_tail: str = "") -> str:
    message = f"`{shlex.join(argv)}` exited {status}"
    for title, text in (("output", output), ("debootstrap.log", log_tail)):
        text = _tail(text)
        if text:
            message += f"\n  last lines of {title}:\n" + "\n".join(
                "    " + line for line in text.splitlines())
    return message


def _tail(text: str, lines: int = _OUTPUT_TAIL_LINES) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])



def _discard(temp: Path) -> None:
    """Remove a half-built image, whatever state the failed build left it in."""
    if temp.exists():
        delete_tree(temp)
