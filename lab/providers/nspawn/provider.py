"""The embedded default: every node is a `systemd-nspawn --boot` container.

The only package that knows about nspawn; this module is the Provider, the
others its parts (supervisor, cgroups, bridge, overlay, processes). Per lab:
  * one host bridge `lab-<id>` carrying the lab subnet (host side is .1);
  * per node an overlayfs (lower: the read-only OS image, upper: the node's
    own state) booted by systemd-nspawn, with `/usr` bound read-only from the
    image as on CoreOS; unless the spec asks for privileged nodes, in a user
    namespace: the node's root is an unprivileged uid range of the host;
  * per node a small supervisor process (supervisor.py, detached, so nodes
    outlive the `lab` command) that restarts nspawn when the node reboots
    (exit 133, what systemd-nspawn@.service does on a systemd host, which
    this may not be);
  * per node a cgroup in every hierarchy (cgroups.py) holding the supervisor
    and so the whole container: the spec's memory and cpus limit it,
    pause/resume freeze it, destroy kills whatever is in it, even processes
    that a crash left unrecorded;
  * one nftables `bridge` table for partitions, created on first use.
  * per snapshot (snapshot.py), a copy of every node's upper layer and Docker
    directory, taken with all nodes frozen together; a restore stages the copy,
    kills every node, swaps the layers in and boots them as `up` does.

Everything is recorded in the lab's state before it is made; every removal
is idempotent, so `destroy` works after Ctrl-C or kill -9 at any point.

A node's root user owns its tree: host code reads and writes there only
through nodefs (no symlink followed, no FIFO or device opened, sizes capped).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from lab.errors import LabError, PrerequisiteError, ProviderError, StateError, UsageError
from lab.host.files import append_nofollow, write_atomic
from lab.host.mounts import is_mount_point, unmount_below
from lab.host.ssh import SSHEndpoint
from lab.images.cache import is_cached_rootfs
from lab.node import layout
from lab.providers.base import (Availability, LabContext, NodeSeed, NodeSnapshot, NodeState, NodeStatus, Progress,
                                Provider, SnapshotTaken, no_progress)
from lab.providers.nspawn import bridge, cgroups, limits, nodefs, overlay, supervisor, userns
from lab.providers.nspawn.snapshot import copy_tree, frozen, remove_tree
from lab.host.processes import alive, interrupts_held, keep_detached, parent_of, start_time, wait_gone
from lab.providers.nspawn.processes import boot_id, container_init, read_value, runs_file

BOOT_TIMEOUT = 90.0  # seconds until a node must answer SSH; nodes boot in ~1 s warm
STOP_TIMEOUT = 30.0
# What a node writes, each a directory of NODE_DIR: its overlay's upper layer and Docker's directory.
SNAPSHOT_LAYERS = ("upper", "docker")
# In a snapshot: a second copy of its layers that the next restore swaps in by rename (the copy costs
# ~1.5 s for 3 nodes, here mostly the 16 000 inodes a user-namespaced node's chown copied up).
SPARE_DIR, SPARE_READY = "spare", "ready"
SUPERVISOR = Path(supervisor.__file__)  # run as a plain file: `python -I -S supervisor.py CONFIG`


class NspawnProvider(Provider):
    name = "nspawn"

    def __init__(self, context: LabContext) -> None:
        super().__init__(context)
        self._first_boot_seeds: dict[str, NodeSeed] = {}
        self._ranges_taken: set[int] | None = None  # uid ranges in use, as this command found and chose them

    # -- names (all derived from the lab id, so labs never collide)

    @property
    def bridge(self) -> str:
        return f"lab-{self.context.lab_id}"  # 10 chars: under the 15-char interface limit

    @property
    def nft_table(self) -> str:
        return f"lab_{self.context.lab_id}"

    def machine(self, node: str) -> str:
        return f"lab-{self.context.lab_id}-{node}"

    def veth(self, node: str) -> str:
        # nspawn names the host end vb-MACHINE; past 15 characters it shortens
        # the name with a hash but keeps the full one as an altname, which
        # `ip link` accepts everywhere a name goes.
        return f"vb-{self.machine(node)}"

    def propagate_dir(self, node: str) -> Path:
        # nspawn makes this per machine and, where /run is not a tmpfs, refuses
        # to remove it on exit ("disk file system"): lab removes it.
        return Path("/run/systemd/nspawn/propagate") / self.machine(node)

    def docker_dir(self, node: str) -> Path:
        """Bound at the node's /var/lib/docker: overlay2 cannot sit on the node's overlayfs root."""
        return self.node_dir(node) / "docker"

    def node_dir(self, node: str) -> Path:
        return self.context.lab_dir / "nodes" / node

    def cgroups(self, node: str) -> list[Path]:
        """The node's cgroups: those it was started in (recorded), else where it would start now. (The
        memory cgroup, say, lies below the caller's own: another shell may see another path.)"""
        machine = self.machine(node)
        recorded = [Path(r["id"]) for r in self.state.find("cgroup") if r["id"].rsplit("/", 1)[-1] == machine]
        return recorded or cgroups.node_cgroups(machine)

    @property
    def state(self):
        if self.context.state is None:
            raise StateError("the lab has no state", hint="create it with `lab up`")
        return self.context.state

    # -- checks

    @classmethod
    def availability(cls) -> Availability:
        if platform.system() != "Linux":
            return Availability(False, "needs Linux")
        if shutil.which("systemd-nspawn") is None:
            return Availability(False, "systemd-nspawn not found (apt-get install systemd-container)")
        if os.geteuid() != 0:
            return Availability(False, "needs root")
        return Availability(True, "systemd-nspawn found, running as root")

    def preflight(self) -> None:
        availability = self.availability()
        if not availability.usable:
            hint = ("run lab as root (sudo)" if "root" in availability.reason
                    else "apt-get install systemd-container")
            raise PrerequisiteError(f"the nspawn provider cannot run: {availability.reason}", hint=hint)
        for binary, package in (("ip", "iproute2"), ("nft", "nftables"), ("mount", "mount")):
            if shutil.which(binary) is None:
                raise PrerequisiteError(f"`{binary}` not found", hint=f"apt-get install {package}")
        if "overlay" not in Path("/proc/filesystems").read_text():
            raise PrerequisiteError("the kernel has no overlayfs", hint="modprobe overlay")
        controller = cgroups.missing_controller()
        if controller is not None:
            raise PrerequisiteError(f"cgroup v1 controller {controller!r} is not mounted at "
                                    f"{cgroups.CGROUP_ROOT / controller}",
                                    hint=f"the nspawn provider needs the "
                                         f"{', '.join(cgroups.REQUIRED_CONTROLLERS)} controllers")
        recorded = (self.context.state.get("image") if self.context.state is not None else None) or {}
        if not Path(recorded.get("rootfs", "/nonexistent")).is_dir():
            self.image()
        created = self.context.state is not None
        problem = limits.inotify_problem(sum(1 for n in self.context.nodes
                                             if not (created and self._supervisor_alive(n.name))))
        if problem is not None:
            raise problem

    def image(self):
        from lab.images.cache import find_image

        box = self.context.spec.box
        image = find_image(box.name, box.version)
        if image is None:
            raise PrerequisiteError(f"the node OS image {box.name} {box.version} is not built yet",
                                    hint=f"lab box build --name {box.name} --version {box.version}  "
                                         "(a few minutes, once; cached afterwards)")
        return image

    # -- lifecycle

    def up(self, progress: Progress = no_progress) -> None:
        if self.context.spec.box.vagrant:
            # One lab.yaml may serve laptops (VirtualBox) and CI (nspawn): not an error.
            progress(f"note: box.vagrant ({self.context.spec.box.vagrant}) is for Vagrant providers; "
                     f"nspawn boots the {self.context.spec.box.name} {self.context.spec.box.version} image")
        recorded = self.state.get("image")
        if recorded and Path(recorded["rootfs"]).is_dir():
            # The lower layer of existing nodes never changes; updates swap /usr slots.
            rootfs = Path(recorded["rootfs"])
        else:
            image = self.image()
            self.state.set("image", {"name": image.name, "version": image.version, "key": image.key,
                                     "rootfs": str(image.rootfs)})
            rootfs = image.rootfs
        self._ensure_bridge(progress)
        to_start = []
        for node in self.context.nodes:
            if self._supervisor_alive(node.name):
                continue
            self._prepare_node(node.name, rootfs)
            to_start.append(node.name)
        if self.state.get("partition"):
            self._apply_partition(self.state["partition"])
        if not to_start:
            progress("every node is already running")
            return
        progress(f"booting {len(to_start)} node(s): {', '.join(to_start)}")
        started = time.monotonic()
        for node in to_start:
            self._spawn(node, rootfs)
        self._wait_ssh(to_start)
        progress(f"{len(to_start)} node(s) answer SSH after {time.monotonic() - started:.1f} s")

    def seed_first_boot(self, seeds: dict[str, NodeSeed]) -> set[str]:
        # Written by _prepare_node into the node's layer, with its identity, before its first boot.
        self._first_boot_seeds = {node: seed for node, seed in seeds.items() if not self._provisioned(node)}
        return set(self._first_boot_seeds)

    def _provisioned(self, node: str) -> bool:
        marker = self.node_dir(node) / "provisioned"
        return marker.is_file() and not marker.is_symlink()

    def start(self, node: str, progress: Progress = no_progress) -> None:
        self.context.node(node)
        if self._supervisor_alive(node):
            return
        image_root = Path(self.state["image"]["rootfs"])
        self._ensure_bridge(progress)
        self._prepare_node(node, image_root)
        self._spawn(node, image_root)
        self._wait_ssh([node])

    def status(self) -> list[NodeStatus]:
        _require_root()
        statuses = []
        for node in self.context.nodes:
            ip = self.context.addresses.get(node.name)
            if not self.node_dir(node.name).exists():
                statuses.append(NodeStatus(node.name, NodeState.NOT_CREATED, ip))
                continue
            init = self._init_pid(node.name)
            if init is None:
                statuses.append(NodeStatus(node.name, NodeState.STOPPED, ip))
                continue
            node_cgroups = self.cgroups(node.name)
            frozen = cgroups.is_frozen(cgroups.controller_cgroup(node_cgroups, "freezer"))
            used, limit = cgroups.memory_use(node_cgroups)
            statuses.append(NodeStatus(node.name, NodeState.PAUSED if frozen else NodeState.RUNNING, ip,
                                       boot_id=boot_id(init), detail=f"init pid {init}",
                                       memory_bytes=used, memory_limit_bytes=limit))
        return statuses

    def halt(self, progress: Progress = no_progress) -> None:
        running = [n.name for n in self.context.nodes if self._supervisor_alive(n.name)]
        if running:
            progress(f"powering off {', '.join(running)}")
        with ThreadPoolExecutor(max_workers=max(1, len(running))) as pool:
            list(pool.map(self._stop_cleanly, running))
        self._teardown_host(progress, keep_files=True)

    def destroy(self, progress: Progress = no_progress) -> None:
        progress(f"removing nodes, mounts, cgroups and bridge {self.bridge}")
        for node in self.context.nodes:
            self._kill_everything(node.name)
        # Nodes recorded in state but gone from the spec are removed as well.
        for res in list(self.state.find("node")):
            self._kill_everything(res["id"])
        self._teardown_host(progress, keep_files=False)

    def remove_node(self, node: str, progress: Progress = no_progress) -> None:
        progress(f"removing node {node}")
        self._kill_everything(node)
        merged = str(self.node_dir(node) / "merged")
        unmount_below(self.node_dir(node))
        self.state.forget("mount", merged)
        self.state.forget("mount", str(self.node_dir(node) / "lower"))
        for cgroup in self.cgroups(node):
            cgroups.remove_cgroup(cgroup)
            self.state.forget("cgroup", str(cgroup))
        bridge.delete_link(self.veth(node))
        _remove_empty_dir(self.propagate_dir(node))
        shutil.rmtree(self.node_dir(node), ignore_errors=True)
        self.state.forget("node", node)

    def stage_update(self, node: str, rootfs: Path, progress: Progress = no_progress,
                     cancel: threading.Event | None = None) -> str:
        """Put an image in the node's passive slot; returns that slot's name ("a" or "b")."""
        self.context.node(node)
        active = self.boot_slot(node)
        passive = "b" if active == "a" else "a"
        link = self.node_dir(node) / f"slot-{passive}"
        tmp = link.with_name(link.name + ".new")
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(rootfs)
        os.replace(tmp, link)
        return passive

    def boot_slot(self, node: str) -> str:
        """The slot the node boots next (what its own /etc/lab/boot.json says, if it names a known slot)."""
        try:
            text = nodefs.read_node_file(self.node_dir(node) / "upper", str(layout.BOOT_FILE.relative_to("/")))
        except OSError:
            return layout.BOOT_SLOTS[0]
        return layout.boot_record(text)["slot"]

    def ssh_endpoints(self) -> dict[str, SSHEndpoint]:
        return {node.name: SSHEndpoint(node=node.name, host=self.context.addresses[node.name], port=22,
                                       user="root", identity_file=self.context.ssh_key,
                                       known_hosts=self.context.known_hosts)
                for node in self.context.nodes}

    # -- faults

    def reboot(self, node: str, progress: Progress = no_progress) -> None:
        init = self._require_running(node)
        old_boot = boot_id(init)
        # SIGRTMIN+5 asks systemd (PID 1) for a clean reboot; nspawn then exits
        # 133 and the supervisor boots the node again on the same overlay.
        os.kill(init, signal.SIGRTMIN + 5)
        deadline = time.monotonic() + BOOT_TIMEOUT
        while time.monotonic() < deadline:
            new_init = self._init_pid(node)
            if new_init and new_init != init:
                new_boot = boot_id(new_init)
                if new_boot and new_boot != old_boot:
                    break
            if not self._supervisor_alive(node):
                raise ProviderError(f"{node}: stopped instead of rebooting",
                                    hint=f"see {self.node_dir(node) / 'console.log'}")
            time.sleep(0.1)
        else:
            raise ProviderError(f"{node}: did not reboot within {BOOT_TIMEOUT:.0f} s")
        self._wait_ssh([node])
        progress(f"{node} rebooted")

    def kill(self, node: str) -> None:
        """SIGKILL to the container's PID 1 ends its whole pid namespace at once: no shutdown, no sync."""
        init = self._require_running(node)
        os.kill(init, signal.SIGKILL)
        # A frozen task gets no signal, SIGKILL included: thaw a paused node.
        self._freezer(node, "THAWED")
        if not wait_gone(self._supervisor(node), timeout=10):
            raise ProviderError(f"{node}: still running 10 s after SIGKILL", hint="`lab destroy` removes it")

    def pause(self, node: str) -> None:
        self._require_running(node)
        self._freezer(node, "FROZEN")

    def resume(self, node: str) -> None:
        self.context.node(node)
        self._freezer(node, "THAWED")

    def partition(self, groups: list[list[str]]) -> None:
        self.check_partition_groups(groups)
        self.state.set("partition", groups)
        self._apply_partition(groups)

    def heal(self) -> None:
        self.state.set("partition", None)
        bridge.delete_table(self.nft_table)

    # -- snapshots (snapshot.py: what is copied, and why that is one moment of the whole cluster)

    def snapshot(self, directory: Path, progress: Progress = no_progress) -> SnapshotTaken:
        _require_root()
        names = [n.name for n in self.context.nodes]
        never = [n for n in names if not (self.node_dir(n) / "upper").is_dir()]
        if never:
            raise UsageError(f"{', '.join(never)} {'was' if len(never) == 1 else 'were'} never created: "
                             "there is nothing to save of it", hint="`lab up` creates every node of the lab")
        running = [n for n in names if self._init_pid(n) is not None]
        freezers = {n: cgroups.controller_cgroup(self.cgroups(n), "freezer") for n in running}
        paused = [n for n, freezer in freezers.items() if cgroups.is_frozen(freezer)]
        if paused:
            raise UsageError(f"{', '.join(paused)} {'is' if len(paused) == 1 else 'are'} paused: a snapshot "
                             "freezes every node and thaws them all afterwards, which would resume "
                             f"{'it' if len(paused) == 1 else 'them'}",
                             hint=f"`lab fault resume {paused[0]}` first, then save")
        directory.mkdir(parents=True)
        copies = {(n, layer): (self.node_dir(n) / layer, directory / "nodes" / n / layer)
                  for n in names for layer in SNAPSHOT_LAYERS if (self.node_dir(n) / layer).is_dir()}
        for _, target in copies.values():
            target.parent.mkdir(parents=True, exist_ok=True)
        progress(f"freezing {', '.join(running)} together" if running else "no node runs: copying their layers")
        started = time.monotonic()
        with frozen(freezers):
            nodes = [NodeSnapshot(n, self.boot_slot(n), self._slot_images(n)) for n in names]
            self._copy_all(copies)
        frozen_s = time.monotonic() - started
        return SnapshotTaken(nodes=nodes, frozen_s=frozen_s if running else 0.0, running=running)

    def restore(self, directory: Path, nodes: list[NodeSnapshot], progress: Progress = no_progress) -> None:
        _require_root()
        names = [n.name for n in self.context.nodes]
        if sorted(n.node for n in nodes) != sorted(names):
            raise StateError(f"the snapshot holds nodes {', '.join(n.node for n in nodes)}, the lab has "
                             f"{', '.join(names)}", hint="take a new snapshot of this lab")
        for saved in nodes:
            upper = directory / "nodes" / saved.node / "upper"
            if upper.is_symlink() or not upper.is_dir():
                raise StateError(f"the snapshot in {directory} holds no upper layer of {saved.node}",
                                 hint="remove it (`lab snapshot rm`) and save a new one")
            for slot, image in saved.slots.items():
                if slot not in layout.BOOT_SLOTS or not is_cached_rootfs(image):
                    raise StateError(f"{saved.node}: slot {slot} of the snapshot names {image}, which is not "
                                     "an image in lab's cache (any more)",
                                     hint="build that image again (`lab box build`), or take a new snapshot")
        spare = directory / SPARE_DIR
        started = time.monotonic()
        if (spare / SPARE_READY).is_file():
            # The copy prepared after the last save or restore: taken as it is, in no time.
            (spare / SPARE_READY).unlink()
            staged = {(n, layer): spare / n / layer for n in names for layer in SNAPSHOT_LAYERS}
        else:
            # Copied beside each node while the nodes still run: a copy that fails (a full disk) changes nothing.
            staged = {(n, layer): self.node_dir(n) / f"{layer}.restoring" for n in names for layer in SNAPSHOT_LAYERS}
            self._copy_layers(directory, staged)
            progress(f"copied the snapshot's layers in {time.monotonic() - started:.1f} s")
        # What the nodes hold now is thrown away: no clean shutdown, all at once.
        with ThreadPoolExecutor(max_workers=len(names)) as pool:
            list(pool.map(self._kill_everything, names))
        for saved in nodes:
            node_dir = self.node_dir(saved.node)
            unmount_below(node_dir / "merged")
            for layer in (*SNAPSHOT_LAYERS, "work"):
                current, old = node_dir / layer, node_dir / f"{layer}.discarded"
                remove_tree(old)
                if current.exists() or current.is_symlink():
                    os.rename(current, old)  # removed by prepare_restore, once the cluster is back
                source = staged.get((saved.node, layer))
                if source is not None and source.is_dir() and not source.is_symlink():
                    os.rename(source, current)
            (node_dir / "work").mkdir(exist_ok=True)  # overlayfs wants an empty work dir
            for slot in layout.BOOT_SLOTS:
                link = node_dir / f"slot-{slot}"
                if slot in saved.slots:
                    tmp = link.with_name(link.name + ".new")
                    tmp.unlink(missing_ok=True)
                    tmp.symlink_to(saved.slots[slot])
                    os.replace(tmp, link)
                else:
                    link.unlink(missing_ok=True)
        progress(f"every node stopped and its layers swapped {time.monotonic() - started:.1f} s in")
        self.up(progress)

    def prepare_restore(self, directory: Path, progress: Progress = no_progress) -> None:
        """Copy the snapshot's layers once more, ready for the next restore to swap in, and remove the layers
        the last restore put aside. Run after a save, and after a restore once the cluster is back."""
        _require_root()
        started = time.monotonic()
        for node in self.context.nodes:
            for layer in (*SNAPSHOT_LAYERS, "work"):
                remove_tree(self.node_dir(node.name) / f"{layer}.discarded")
        spare, partial = directory / SPARE_DIR, directory / f"{SPARE_DIR}.partial"
        if (spare / SPARE_READY).is_file():
            return
        remove_tree(spare)
        remove_tree(partial)
        names = [n.name for n in self.context.nodes]
        self._copy_layers(directory, {(n, layer): partial / n / layer for n in names for layer in SNAPSHOT_LAYERS})
        (partial / SPARE_READY).write_text("")
        os.rename(partial, spare)
        progress(f"prepared the next restore in {time.monotonic() - started:.1f} s")

    def _copy_layers(self, directory: Path, targets: dict[tuple[str, str], Path]) -> None:
        """Copy each (node, layer) of the snapshot to its target; on any failure no target is left."""
        for target in targets.values():
            remove_tree(target)  # left by an interrupted restore
            target.parent.mkdir(parents=True, exist_ok=True)
        copies = {key: (directory / "nodes" / key[0] / key[1], target) for key, target in targets.items()}
        try:
            self._copy_all({key: (source, target) for key, (source, target) in copies.items()
                            if source.is_dir() and not source.is_symlink()})
        except BaseException:
            for target in targets.values():
                remove_tree(target)
            raise

    def _slot_images(self, node: str) -> dict[str, str]:
        """Slot -> the image its link names, for the slots that name an image of lab's cache."""
        images = {}
        for slot in layout.BOOT_SLOTS:
            link = self.node_dir(node) / f"slot-{slot}"
            if link.is_symlink() and is_cached_rootfs(link):
                images[slot] = os.readlink(link)
        return images

    def _copy_all(self, copies: dict[tuple[str, str], tuple[Path, Path]]) -> None:
        """Copy every (node, layer) source to its target at once; the first failure is raised after all end."""
        with ThreadPoolExecutor(max_workers=max(1, len(copies))) as pool:
            futures = [pool.submit(copy_tree, source, target, node)
                       for (node, _), (source, target) in copies.items()]
            errors = [f.exception() for f in futures]
        for error in errors:
            if error is not None:
                raise error

    # ---------------------------------------------------------------- internals

    def _ensure_bridge(self, progress: Progress) -> None:
        self.state.record("bridge", self.bridge)
        bridge.ensure_bridge(self.bridge, self.context.subnet, progress)

    def _prepare_node(self, node: str, rootfs: Path) -> None:
        directory = self.node_dir(node)
        upper, work, merged = directory / "upper", directory / "work", directory / "merged"
        fresh = not self._provisioned(node)
        # Decided when the node is made and kept: its files' owners depend on it.
        extra = {"private_users": not self.privileged and overlay.metacopy_available()} if fresh else {}
        self.state.record("node", node, dir=str(directory), docker_dir=str(self.docker_dir(node)), **extra)
        for path in (upper, work, merged, self.docker_dir(node)):
            path.mkdir(parents=True, exist_ok=True)
        # The node's root owns what is below (its layer, its Docker directory, the image shown in its range):
        # no other user of the host walks in there.
        os.chmod(directory, 0o700)
        slot_a = directory / "slot-a"
        if not (slot_a.is_symlink() and is_cached_rootfs(os.readlink(slot_a))):
            slot_a.unlink(missing_ok=True)  # a link a checkout planted, to anywhere: replaced
            slot_a.symlink_to(rootfs)  # the image the node was created with
        lower = self._idmapped_lower(node, rootfs, fresh) if self._private_users(node) else rootfs
        self.state.record("mount", str(merged))
        mask = overlay.usr_mask(self.context.lab_dir / "usr-mask", rootfs) if self._private_users(node) else None
        try:
            overlay.mount_overlay(lower, upper, work, merged, unprivileged=mask)
        except LabError:
            if not (fresh and lower != rootfs):
                raise
            # Overlayfs takes an idmapped lower layer from Linux 5.19 on (idmapped mounts exist from 5.12).
            self._without_idmapped_lower(node)
            overlay.mount_overlay(rootfs, upper, work, merged, unprivileged=mask)
        try:
            if fresh:
                self._write_identity(node, merged)
                seed = self._first_boot_seeds.pop(node, None)
                if seed is not None:
                    overlay.write_seed(merged, rootfs, seed)
                write_atomic(directory / "provisioned", time.strftime("%Y-%m-%dT%H:%M:%SZ\n", time.gmtime()))
            overlay.write_into_node(merged, overlay.fact_files(self.context, node))
        except nodefs.UnsafeNodePath as exc:
            raise ProviderError(f"{node}: cannot write its files: {exc}",
                                hint=f"a path lab writes in the node was replaced by a link or a device; "
                                     f"remove the node (`lab node remove {node}` or `lab destroy`)") from None

    def _idmapped_lower(self, node: str, rootfs: Path, fresh: bool) -> Path:
        """The overlay's lower layer of a node in a user namespace: the image idmapped into the node's range,
        so nspawn chowns nothing (userns.py); the image itself for a node made before, or where the kernel
        cannot idmap (nspawn then chowns the tree at the first boot, as it always did)."""
        directory = self.node_dir(node)
        upper, target = directory / "upper", directory / "lower"
        if fresh:
            # A node never booted: what an interrupted attempt mounted goes, so that its lower layer, its
            # layer's root and the overlay agree on the range chosen now.
            unmount_below(directory / "merged")
            unmount_below(target)
            if self._ranges_taken is None:  # once per command: /proc is scanned once, not once per node
                self._ranges_taken = userns.ranges_in_use() | {
                    self.node_dir(n.name).joinpath("upper").stat().st_uid for n in self.context.nodes
                    if n.name != node and self.node_dir(n.name).joinpath("upper").is_dir()}
            base = userns.choose_range(self.machine(node), self._ranges_taken)
            self._ranges_taken.add(base)
            self.state.record("node", node, idmapped_lower=True)
            os.chown(upper, base, base)  # the overlay's root is the upper layer's: nspawn reads the range there
        if not any(res.get("idmapped_lower") for res in self.state.find("node", node)):
            return rootfs
        base = upper.stat().st_uid  # the node's range, as nspawn last chose it
        if is_mount_point(target):
            return target
        target.mkdir(exist_ok=True)
        self.state.record("mount", str(target))
        try:
            userns.mount_idmapped(rootfs, target, base)
        except OSError as exc:
            if not fresh:
                raise ProviderError(f"{node}: cannot mount its image idmapped: {exc}",
                                    hint="the node was made on a kernel with idmapped mounts: boot it there, or "
                                         f"`lab node remove {node}` and add it again") from None
            self._without_idmapped_lower(node)
            return rootfs
        return target

    def _without_idmapped_lower(self, node: str) -> None:
        """A new node where the kernel cannot take the image idmapped: it is made as before, its layer's root
        the host's, and nspawn picks a range and chowns the tree into it at the first boot."""
        unmount_below(self.node_dir(node) / "lower")
        self.state.record("node", node, idmapped_lower=False)
        os.chown(self.node_dir(node) / "upper", 0, 0)

    def _write_identity(self, node: str, merged: Path) -> None:
        """The node's identity, written into its own layer before its first boot."""
        from lab.host.ssh import generate_ed25519, record_host_key

        private, public = generate_ed25519(f"root@{node}")
        overlay.write_into_node(merged, overlay.identity_files(self.context, node, (private, public)))
        record_host_key(self.context.known_hosts, node, self.context.addresses[node], public)

    def _nspawn_argv(self, node: str) -> list[str]:
        # /usr read-only, from the slot the node boots (see supervisor.py)
        usr = ["--bind-ro={usr}:/usr"]
        if self._private_users(node):
            # The node's root is an unprivileged uid range of the host. nspawn
            # chowns the tree into it at the first boot (the overlay copies up
            # inodes only, and hides the image's /usr: see overlay.py). The
            # slot's /usr is shared and stays root's: an idmapped bind shows
            # it shifted.
            usr = ["--private-users=pick", "--private-users-ownership=chown", "--bind-ro={usr}:/usr:idmap"]
        # Docker: its own directory (overlay2 cannot sit on the node's overlayfs root; it would fall
        # back to vfs, ~7x slower per run), and the syscalls runc needs (it makes a session keyring).
        docker = [f"--bind={self.docker_dir(node)}:/var/lib/docker", "--system-call-filter=@keyring bpf"]
        return ["systemd-nspawn", "--boot", "--register=no", "--keep-unit", "--quiet",
                f"--machine={self.machine(node)}", f"--directory={self.node_dir(node) / 'merged'}", *usr, *docker,
                f"--network-bridge={self.bridge}", "--console=read-only",
                "--resolv-conf=off", "--timezone=off", "--link-journal=no"]

    @property
    def privileged(self) -> bool:
        """`providers.nspawn.privileged: true`: new nodes' root is the host's root (no user namespace)."""
        return self.context.spec.providers.nspawn.privileged

    def _private_users(self, node: str) -> bool:
        return any(res.get("private_users") for res in self.state.find("node", node))

    def _spawn(self, node: str, rootfs: Path) -> None:
        directory = self.node_dir(node)
        node_cgroups = cgroups.node_cgroups(self.machine(node))
        for stale in set(self.cgroups(node)) - set(node_cgroups):  # recorded by a caller in other cgroups
            cgroups.remove_cgroup(stale)
            self.state.forget("cgroup", str(stale))
        self.state.record_all("cgroup", [str(cgroup) for cgroup in node_cgroups])
        for cgroup in node_cgroups:
            cgroups.make_cgroup(cgroup)
        spec = self.context.node(node)
        cgroups.set_limits(node_cgroups, spec.memory, spec.cpus)
        self._delegate(node)
        self._freezer(node, "THAWED")
        config = {"argv": self._nspawn_argv(node), "pidfile": str(directory / "nspawn.pid"),
                  "cgroups": [str(c / "cgroup.procs") for c in node_cgroups],
                  "slots_dir": str(directory), "slots": list(layout.BOOT_SLOTS), "slot": self.boot_slot(node),
                  "upper": str(directory / "upper"), "boot_file": str(layout.BOOT_FILE.relative_to("/"))}
        (directory / "nspawn.pid").unlink(missing_ok=True)
        # A killed node's old veth lives on while orphaned TCP sockets keep its
        # network namespace alive (up to minutes); nspawn would then fail with
        # "File exists". Deleting one end deletes the pair.
        bridge.delete_link(self.veth(node))
        # A Ctrl-C between the start and the record would leave a supervisor nobody knows of: the
        # rollback found no record, and its nspawn joined the node's cgroups after they were emptied.
        with interrupts_held(), append_nofollow(directory / "console.log") as log:
            process = subprocess.Popen([sys.executable, "-I", "-S", str(SUPERVISOR), json.dumps(config)],
                                       stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                       start_new_session=True, close_fds=True)
            keep_detached(process)
            self.state.record("node", node, dir=str(directory), supervisor_pid=process.pid,
                              supervisor_start=start_time(process.pid))

    def _delegate(self, node: str) -> None:
        """Hand the node's root its cgroup directories and its Docker directory, once nspawn has chowned
        its tree into its user namespace (at the first boot: until then the tree is the host root's, and
        nothing is done; Docker is socket-activated and not yet started)."""
        if not self._private_users(node):
            return  # a privileged node's root is the host's: labos-cgroups-writable.service does the rest
        owner = (self.node_dir(node) / "merged").stat().st_uid
        if owner == 0:
            return
        cgroups.delegate(self.cgroups(node), owner)
        # Not an idmapped bind: what the node writes there is owned by its own uid range on disk, as its
        # upper layer is, never by the host's root (an image's setuid files included).
        docker = self.docker_dir(node)
        if docker.stat(follow_symlinks=False).st_uid != owner:
            os.chown(docker, owner, owner, follow_symlinks=False)

    def _wait_ssh(self, nodes: list[str]) -> None:
        import threading

        from lab.host.ssh import wait_for_ssh

        endpoints = self.ssh_endpoints()
        deadline = time.monotonic() + BOOT_TIMEOUT
        # Ctrl-C must stop the pollers at once, not after BOOT_TIMEOUT: the
        # rollback that follows waits for them.
        cancelled = threading.Event()
        errors = []
        with ThreadPoolExecutor(max_workers=max(1, len(nodes))) as pool:
            futures = [pool.submit(wait_for_ssh, endpoints[n], deadline,
                                   lambda n=n: not cancelled.is_set() and self._supervisor_alive(n))
                       for n in nodes]
            try:
                for node, future in zip(nodes, futures):
                    try:
                        future.result()
                    except ProviderError as exc:
                        errors.append(exc.message)
            except BaseException:
                cancelled.set()
                raise
        if errors:
            log = self.node_dir(nodes[0]) / "console.log"
            raise ProviderError("; ".join(errors), hint=f"console output of each node is in {log}")
        for node in nodes:  # a node's first boot has just chowned its tree: its uid is known now
            self._delegate(node)

    def _supervisor(self, node: str) -> tuple[int | None, str | None]:
        """The node's supervisor as recorded, if that process is really one (state.json may be forged)."""
        for res in self.state.find("node", node):
            pid, started = res.get("supervisor_pid"), res.get("supervisor_start")
            if pid and alive(pid, started) and not runs_file(pid, SUPERVISOR):
                return None, None
            return pid, started
        return None, None

    def _supervisor_alive(self, node: str) -> bool:
        return alive(*self._supervisor(node))

    def _init_pid(self, node: str) -> int | None:
        if not self._supervisor_alive(node):
            return None
        nspawn = read_value(self.node_dir(node) / "nspawn.pid")
        if not nspawn or not nspawn.isdigit():
            return None
        if parent_of(int(nspawn)) != self._supervisor(node)[0]:
            return None  # not the nspawn our supervisor started: never signal what a pid file names
        return container_init(int(nspawn))

    def _require_running(self, node: str) -> int:
        _require_root()
        self.context.node(node)
        init = self._init_pid(node)
        if init is None:
            raise UsageError(f"{node} is not running", hint=f"start it with `lab fault start {node}` or `lab up`")
        return init

    def _freezer(self, node: str, value: str) -> None:
        cgroups.set_freezer(cgroups.controller_cgroup(self.cgroups(node), "freezer"), value, node)

    def _stop_cleanly(self, node: str) -> None:
        """SIGTERM to the supervisor: nspawn asks the node's systemd to power off."""
        pid, started = self._supervisor(node)
        self._freezer(node, "THAWED")  # a frozen node cannot shut down
        if alive(pid, started):
            os.kill(pid, signal.SIGTERM)
            if not wait_gone((pid, started), timeout=STOP_TIMEOUT):
                self._kill_everything(node)

    def _kill_everything(self, node: str) -> None:
        """Kill every process in the node's cgroups (recorded or not), then its supervisor."""
        self._freezer(node, "THAWED")
        pid, started = self._supervisor(node)
        init = self._init_pid(node)
        if init:
            try:
                os.kill(init, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            pids = cgroups.pids_in(self.cgroups(node))
            if alive(pid, started):
                pids.add(pid)
            if not pids:
                return
            for stray in pids:
                try:
                    os.kill(stray, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.05)
        raise ProviderError(f"{node}: processes survive SIGKILL: {sorted(cgroups.pids_in(self.cgroups(node)))}")

    def _teardown_host(self, progress: Progress, keep_files: bool) -> None:
        """Undo host-side resources in reverse order of creation."""
        for res in reversed(list(self.state.resources)):
            kind, ident = res["kind"], res["id"]
            if kind == "mount":
                unmount_below(Path(ident))
                self.state.forget(kind, ident)
            elif kind == "cgroup":
                cgroups.remove_cgroup(Path(ident))
                self.state.forget(kind, ident)
            elif kind == "nftables":
                bridge.delete_table(ident)
                self.state.forget(kind, ident)
            elif kind == "bridge":
                bridge.delete_bridge(ident)
                self.state.forget(kind, ident)
            elif kind == "node":
                bridge.delete_link(self.veth(ident))
                _remove_empty_dir(self.propagate_dir(ident))
                if not keep_files:
                    unmount_below(Path(res.get("dir", self.node_dir(ident))))
                    shutil.rmtree(res.get("dir", self.node_dir(ident)), ignore_errors=True)
                    self.state.forget(kind, ident)
        # Anything mounted below the lab directory that the state missed.
        unmount_below(self.context.lab_dir)
        cgroups.remove_stale(f"lab-{self.context.lab_id}-*")

    def _apply_partition(self, groups: list[list[str]]) -> None:
        """One bridge-family table on the host: traffic between groups is dropped on the lab bridge."""
        script = bridge.partition_script(self.nft_table, groups, self.context.addresses)
        self.state.record("nftables", self.nft_table)
        bridge.load_ruleset(script)


def _require_root() -> None:
    if os.geteuid() != 0:
        raise PrerequisiteError("nspawn nodes are root's: reading their state needs root too",
                                hint="run lab as root (sudo)")


def _remove_empty_dir(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:
        pass
