"""Vagrant providers: nodes as VMs of VirtualBox, libvirt, Hyper-V, VMware or Parallels.

This module holds what every Vagrant provider shares (`VagrantProvider`);
each provider class (virtualbox, libvirt, others) is this code with a
different `vagrant_provider` and, where the hypervisor has one, a fast way to
inject faults. Vagrant itself is run by lab.host.vagrant, the only module of
lab that imports `vagrant` (python-vagrant).

How lab drives Vagrant:
- `<lab_dir>/Vagrantfile` is rendered from `Vagrantfile.j2`
  (lab.providers.vagrant.render) and holds the chosen provider's block only.
  `up` passes `--provider`; Vagrant then records each machine's provider under
  `.vagrant/machines/NAME/`, so later commands need no provider flag, and
  `status` on a lab that was never created answers even on a host that lacks
  the hypervisor.
- Vagrant runs with `vagrant_environment()`: no version check against
  HashiCorp's servers, no box update checks, no colors. Machines boot in
  parallel where that is safe: vagrant-libvirt does it itself in one
  process (its box upload and storage pool setup hold a lock); Vagrant's
  VirtualBox provider cannot (`--parallel` is refused), so lab runs one
  `vagrant up NODE` per node at once after the first (see
  `up_concurrently` in lab.providers.vagrant.virtualbox). Other providers
  boot one after another.
- `vagrant up` does nothing in the guest after it answers SSH (no key
  swap, no network setup: see Vagrantfile.j2). Then lab *adopts* each
  machine in one SSH session over Vagrant's own access
  (lab.providers.vagrant.adoption): lab's key in place of Vagrant's insecure
  one, the hostname, the private address. From then on everything goes to
  root@PRIVATE-IP with host keys verified, exactly as on nspawn nodes, and
  no command needs `vagrant ssh-config` (a second or more per call).
- Faults go to the hypervisor directly where that is fast (virsh for
  libvirt, VBoxManage for VirtualBox; a `vagrant` command costs seconds,
  which a leader-failover measurement cannot afford), to the guest over SSH
  for reboots and partitions (nftables inside every guest), and to Vagrant
  for the rest.
- Vagrant's output is streamed line by line to the progress callback (from a
  reader thread) and its tail goes into the CommandError when a command fails.
"""

from __future__ import annotations

import ipaddress
import shutil
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, ClassVar, TypeVar

from lab.errors import CommandError, PrerequisiteError, ProviderError, UsageError
from lab.host.network import node_addresses
from lab.host.ssh import run_many, wait_for_ssh
from lab.host.vagrant import (NATIVE_PARALLEL, VAGRANT_HINT, added_box_dirs, plugin_installed, require_vagrant,
                              run_vagrant, vagrant_validate)
from lab.images.vagrantbox import BOX_FORMATS, box_options, lab_boxes_added, stale_added_box
from lab.model.spec import ResolvedNode
from lab.providers.base import (Availability, LabContext, NodeState, NodeStatus, Progress, Provider, SSHEndpoint,
                                no_progress)
from lab.providers.guest import BOOT_ID_PATH, GuestPartitions, reboot_over_ssh
from lab.providers.vagrant.adoption import adopt
from lab.providers.vagrant.parsers import (SSHConfigEntry, node_state, parse_ssh_config, parse_vagrant_error,
                                          ssh_endpoint)
from lab.providers.vagrant.render import VAGRANTFILE, box_arch, machine_prefix, vagrant_box_name, write_vagrantfile

T = TypeVar("T")

# Software-emulated VMs (QEMU without KVM) take a minute or more to boot.
VM_BOOT_TIMEOUT = 300.0


# Errors of `vagrant validate` that say no provider could be used here, not
# that the Vagrantfile is wrong.
_NO_PROVIDER_ERRORS = frozenset({"Vagrant::Errors::NoDefaultProvider", "Vagrant::Errors::ProviderNotUsable",
                                 "Vagrant::Errors::ProviderNotFound"})


def validate(context: LabContext, provider: str) -> None:
    """Render the lab's Vagrantfile and run `vagrant validate` on it.

    Vagrant checks the provider block of the provider it would use: the lab's
    own where that is usable, else another usable one. Where no provider is
    usable at all, it refuses to validate anything; the file is then checked
    with `--ignore-provider` (everything but the provider block).
    """
    path = write_vagrantfile(context, provider)
    result = vagrant_validate(path.parent, provider, [])
    if not result.ok and parse_vagrant_error(result.stdout)[0] in _NO_PROVIDER_ERRORS:
        result = vagrant_validate(path.parent, provider, ["--ignore-provider"])
    if not result.ok:
        _, message = parse_vagrant_error(result.stdout)
        text = message or (result.stdout + result.stderr).strip() or f"exit status {result.exit_code}"
        raise ProviderError(f"{path}: vagrant validate failed:\n"
                            + "\n".join("    " + line for line in text.splitlines()),
                            hint="fix the lab spec (or Vagrantfile.j2) so that Vagrant accepts the Vagrantfile")


class VagrantProvider(GuestPartitions, Provider):
    """Nodes as Vagrant machines of one Vagrant provider."""

    name: ClassVar[str]
    vagrant_provider: ClassVar[str]
    label: ClassVar[str]  # human name of the hypervisor
    plugin: ClassVar[str | None] = None  # Vagrant plugin the provider needs, if not built in
    plugin_hint: ClassVar[str] = ""
    box_formats: ClassVar[tuple[str, ...]] = ()  # provider directories a box may have
    # (command, hint to install it): the hypervisor's tool that tells it is installed, if it has one on PATH
    hypervisor_tool: ClassVar[tuple[str, str] | None] = None

    # -- what the host has (all cheap: no vagrant command runs)

    @classmethod
    def hypervisor_problem(cls) -> tuple[str, str] | None:
        """(reason, hint) if the hypervisor is missing, else None."""
        if cls.hypervisor_tool and shutil.which(cls.hypervisor_tool[0]) is None:
            return f"{cls.hypervisor_tool[0]} not found", cls.hypervisor_tool[1]
        return None

    @classmethod
    def daemon_problem(cls) -> tuple[str, str] | None:
        """(reason, hint) if a service the hypervisor needs is not answering."""
        return None

    @classmethod
    def host_problem(cls, *, daemon: bool = True) -> tuple[str, str] | None:
        """The first reason this provider cannot run here, with its fix."""
        problem = cls.hypervisor_problem()
        if problem:
            return problem
        if shutil.which("vagrant") is None:
            return "vagrant not found", VAGRANT_HINT
        if cls.plugin and not plugin_installed(cls.plugin):
            return f"the {cls.plugin} Vagrant plugin is not installed", cls.plugin_hint
        return cls.daemon_problem() if daemon else None

    @classmethod
    def availability(cls) -> Availability:
        problem = cls.host_problem()
        if problem:
            return Availability(False, problem[0])
        return Availability(True, f"vagrant with {cls.label} found")

    @classmethod
    def lab_boxes_added(cls) -> bool:
        """Has any Lab OS box (lab-NAME-VERSION) of this provider's format been added to Vagrant?"""
        return lab_boxes_added(cls.box_formats)

    def preflight(self) -> None:
        problem = self.host_problem(daemon=self.uses_local_daemon()) or self.lab_problem()
        if problem:
            raise PrerequisiteError(problem[0], hint=problem[1])

    def preflight_notes(self) -> list[str]:
        spec = self.context.spec
        if spec.box.vagrant or self.name not in BOX_FORMATS:
            return []
        stale = stale_added_box(spec.box.name, spec.box.version, self.name, box_arch(spec))
        if stale is None:
            return []
        return [f"Vagrant's box {vagrant_box_name(spec)} is an older build ({stale}) than the recipe in boxes/ "
                f"now makes: new VMs boot the old one. `{self.box_add_command()}` replaces it (VMs made already "
                "keep their disks until `lab destroy`)"]

    def box_add_command(self) -> str:
        """The command that builds the lab's Lab OS box (if needed) and adds it to Vagrant, as hints name it."""
        spec = self.context.spec
        return f"lab box add --format {self.name}{box_options(spec.box.name, spec.box.version, box_arch(spec))}"

    def uses_local_daemon(self) -> bool:
        """Does this lab talk to the daemon `daemon_problem` checks?"""
        return True

    def lab_problem(self) -> tuple[str, str] | None:
        """What this lab needs beyond the host: its box, its synced folders."""
        box = vagrant_box_name(self.context.spec)
        if not self.box_installed(box):
            formats = " or ".join(self.box_formats)
            if self.context.spec.box.vagrant:
                # Only an owner/name is a catalog name; anything else needs a file.
                from_catalog = f"`vagrant box add {box} --provider {self.box_formats[0]}` (or a file: " \
                    if "/" in box else "("
                hint = (f"add it to Vagrant first: {from_catalog}`vagrant box add --name {box} FILE.box`), "
                        f"or drop box.vagrant to use a Lab OS box")
            elif self.name in BOX_FORMATS:  # a Lab OS box lab can build for this provider
                hint = (f"build it and add it to Vagrant: `{self.box_add_command()}` "
                        f"(builds the box first if needed; on Linux only)")
            else:
                hint = (f"add a {formats} box named {box}: `vagrant box add {box} PATH/TO/FILE.box` "
                        f"(`vagrant box list` shows the boxes Vagrant has)")
            return f"Vagrant box {box!r} for {formats} is not installed", hint
        project_dir = self.context.lab_dir.parent.parent
        for index, folder in enumerate(self.context.spec.synced_folders):
            host = Path(folder.host).expanduser()
            host = host if host.is_absolute() else project_dir / host
            if not folder.disabled and not host.is_dir():
                return (f"synced_folders[{index}].host: {host} is not a directory",
                        "create it, or fix synced_folders in lab.yaml")
        return None

    def box_installed(self, box: str) -> bool:
        return any(added_box_dirs(box, fmt) for fmt in self.box_formats)

    # -- running vagrant

    def machine_name(self, node: str) -> str:
        """The node's name on the hypervisor: VirtualBox's vb.name, libvirt's default_prefix + node."""
        return machine_prefix(self.context) + node

    @property
    def vagrantfile(self) -> Path:
        return self.context.lab_dir / VAGRANTFILE

    @property
    def dotdir(self) -> Path:
        return self.context.lab_dir / ".vagrant"

    def machines_on_disk(self) -> set[str]:
        """Machines Vagrant created in this lab (it keeps their ids under .vagrant)."""
        return {path.parent.parent.name for path in (self.dotdir / "machines").glob("*/*/id")
                if path.is_file() and path.read_text(errors="replace").strip()}

    def _run(self, call: Callable[[Any], T], progress: Progress = no_progress) -> T:
        """Run one python-vagrant call in the lab dir; failures become CommandError."""
        require_vagrant()  # before writing anything: without Vagrant there is nothing to render for
        if not self.vagrantfile.is_file():
            write_vagrantfile(self.context, self.vagrant_provider)
        return run_vagrant(self.context.lab_dir, self.vagrant_provider, call, progress,
                           where=f"{self.name} lab in {self.context.lab_dir}")

    # -- lifecycle

    def up(self, progress: Progress = no_progress) -> None:
        write_vagrantfile(self.context, self.vagrant_provider)
        nodes = [node.name for node in self.context.nodes]
        started = time.monotonic()
        self._vagrant_up(nodes, progress)
        progress(f"{len(nodes)} machine(s) booted by Vagrant in {time.monotonic() - started:.0f} s; adopting them")
        entries = self._vagrant_ssh_entries()
        adopt(self.context, nodes, self._endpoints_of(entries), progress, vagrant_provider=self.vagrant_provider,
              vagrant_identities={name: tuple(Path(path).expanduser() for path in entry.identity_files)
                                  for name, entry in entries.items()})

    def _vagrant_up(self, nodes: list[str], progress: Progress) -> None:
        """`vagrant up` returns once every machine answers SSH (as Vagrant's user)."""
        progress(f"vagrant up --provider={self.vagrant_provider} ({len(nodes)} nodes"
                 f"{', in parallel' if self.vagrant_provider in NATIVE_PARALLEL else ''})")
        self._run(lambda v: v.up(provider=self.vagrant_provider, provision=False), progress)

    def status(self) -> list[NodeStatus]:
        nodes = self.context.nodes
        if not self.vagrantfile.is_file() and not self.machines_on_disk():
            return [self._status(node.name, NodeState.NOT_CREATED, "no Vagrantfile yet") for node in nodes]
        try:
            found = {entry.name: entry for entry in self._run(lambda v: v.status())}
        except (CommandError, PrerequisiteError) as exc:
            # Vagrant refuses to answer without a usable provider even for
            # machines it never made; with nothing on disk, nothing exists.
            if self.machines_on_disk():
                raise
            reason = parse_vagrant_error(getattr(exc, "output", ""))[1] or exc.message
            detail = f"not created; vagrant status: {reason.splitlines()[0]}"
            return [self._status(node.name, NodeState.NOT_CREATED, detail) for node in nodes]
        running = [node.name for node in nodes
                   if (entry := found.get(node.name)) is not None and node_state(entry.state) is NodeState.RUNNING]
        boot_ids = self._boot_ids(running)
        statuses = []
        for node in nodes:
            entry = found.get(node.name)
            if entry is None:
                statuses.append(self._status(node.name, NodeState.NOT_CREATED, "not in the Vagrantfile"))
            elif entry.state == "not_created":
                statuses.append(self._status(node.name, NodeState.NOT_CREATED, "not created"))
            else:
                statuses.append(replace(self._status(node.name, node_state(entry.state),
                                                     f"{entry.provider or self.vagrant_provider}: {entry.state}"),
                                        boot_id=boot_ids.get(node.name)))
        return statuses

    def _status(self, node: str, state: NodeState, detail: str) -> NodeStatus:
        return NodeStatus(name=node, state=state, ip=self.context.addresses.get(node), detail=detail)

    def _boot_ids(self, nodes: list[str]) -> dict[str, str]:
        """Each running, adopted node's boot id over SSH (none for a node not answering yet)."""
        if not nodes or not self.context.known_hosts.exists():
            return {}
        endpoints = self.ssh_endpoints()
        results = run_many([endpoints[node] for node in nodes], f"cat {BOOT_ID_PATH}", timeout=5)
        return {result.node: result.stdout.strip() for result in results if result.ok and result.stdout.strip()}

    def halt(self, progress: Progress = no_progress) -> None:
        if not self.machines_on_disk():
            return
        self._run(lambda v: v.halt(), progress)

    def destroy(self, progress: Progress = no_progress) -> None:
        leftover = self.machines_on_disk()
        if leftover:
            # Machines of nodes since removed from the spec are still Vagrant's
            # to destroy: render them in too.
            write_vagrantfile(self._context_with(leftover), self.vagrant_provider)
            # A paused machine refuses some providers' destroy: thaw it first.
            self._thaw_all()
            self._run(lambda v: v.destroy(), progress)
            remaining = self.machines_on_disk()
            if remaining:
                raise ProviderError(f"vagrant destroy left machines behind: {', '.join(sorted(remaining))}",
                                    hint=f"check `vagrant global-status`, then run `vagrant destroy -f` "
                                         f"in {self.context.lab_dir}")
        self._cleanup_host(progress)
        shutil.rmtree(self.dotdir, ignore_errors=True)
        self.vagrantfile.unlink(missing_ok=True)

    def _thaw_all(self) -> None:
        """Resume paused machines (best effort) before a destroy."""

    def _cleanup_host(self, progress: Progress) -> None:
        """Remove what Vagrant leaves on the host after destroying every machine."""

    def snapshot_refusal(self) -> UsageError:
        if self.vagrant_provider == "libvirt":
            # What a libvirt lab would need, none of which lab has yet.
            missing = ("suspending every domain before the first is saved (virsh suspend on all, then "
                       "`virsh snapshot-create-as` of disks and memory per domain, then resume), a recorded "
                       "snapshot kind in state.json that destroy removes (libvirt refuses to undefine a domain "
                       "that has snapshots), and a revert of every domain before any is resumed; memory "
                       "snapshots of QEMU without KVM also take far longer than seconds")
            return UsageError(f"snapshots are for nspawn labs; on libvirt lab lacks {missing}",
                              hint="run snapshot-based tests on an nspawn lab (--provider nspawn)")
        return UsageError("snapshots are for nspawn labs; Vagrant snapshots one VM at a time: `vagrant snapshot "
                          "save` saves one machine after another while the others run on, so etcd's members "
                          "would be saved at different moments and a restore could bring back a cluster that "
                          "never existed",
                          hint="run snapshot-based tests on an nspawn lab (--provider nspawn)")

    # A VM under software emulation reboots in one to two minutes (BIOS, kernel, systemd, etcd rejoining)
    reboot_allowance_s: ClassVar[float] = 240.0
    # a VM's slot is written from the VM image (its /usr holds the kernel's modules; its kernel boots)
    update_flavor: ClassVar[str] = "vm"

    def update_problem(self) -> tuple[str, str] | None:
        spec = self.context.spec
        if self.name not in BOX_FORMATS:
            return (f"`lab update` needs Lab OS boxes with A/B /usr slots, which lab builds for "
                    f"{' and '.join(BOX_FORMATS)} only, not {self.label}",
                    "roll updates on a libvirt or VirtualBox lab, or on nspawn nodes")
        if spec.box.vagrant:
            return (f"the lab's box {spec.box.vagrant} is not a Lab OS box: it has no A/B /usr slots to update",
                    "drop box.vagrant from lab.yaml to use the Lab OS box, then `lab destroy` and `lab up`")
        if box_arch(spec) != "amd64":
            # The arm64 disk boots by UEFI and systemd-boot; the update agent sets SYSLINUX's boot-once only.
            return (f"`lab update` on {box_arch(spec)} VMs is not built yet: their disk boots through "
                    "systemd-boot, whose one-shot boot the update agent does not set",
                    "roll updates on an amd64 VM lab or on nspawn nodes (README: arm64)")
        return None

    def prepare_update(self, rootfs: Path, progress: Progress = no_progress) -> None:
        from lab.providers.vagrant import staging

        staging.slot_image(rootfs, progress)  # once, under the image's lock, before the nodes in parallel

    def stage_update(self, node: str, rootfs: Path, progress: Progress = no_progress,
                     cancel: threading.Event | None = None) -> str:
        """Stream the image's /usr into the VM's passive slot (see staging.py); the update agent boots it."""
        from lab.providers.vagrant import staging

        endpoint = self.ssh_endpoints()[node]
        return staging.stage(endpoint, rootfs, self.context.spec.updates.staging_weight, progress, cancel,
                             self.box_add_command())

    def remove_node(self, node: str, progress: Progress = no_progress) -> None:
        if node in self.machines_on_disk():
            self._run(lambda v: v.destroy(vm_name=node), progress)

    def _context_with(self, names: set[str]) -> LabContext:
        known = {node.name for node in self.context.nodes}
        extra = sorted(names - known)
        if not extra:
            return self.context
        defaults = self.context.spec.nodes
        nodes = [*self.context.nodes,
                 *(ResolvedNode(name=name, index=len(known) + i, cpus=defaults.cpus, memory=defaults.memory)
                   for i, name in enumerate(extra, start=1))]
        addresses = node_addresses(ipaddress.IPv4Network(self.context.subnet), [n.name for n in nodes])
        addresses.update(self.context.addresses)
        return replace(self.context, nodes=nodes, addresses=addresses)

    def ssh_endpoints(self) -> dict[str, SSHEndpoint]:
        # Adopted machines: root on the private network, host keys pinned (see adoption.py); through the
        # jump host where the machines are another host's (a remote libvirt).
        jump = self.jump
        return {node.name: SSHEndpoint(node=node.name, host=self.context.addresses[node.name], port=22,
                                       user="root", identity_file=self.context.ssh_key,
                                       known_hosts=self.context.known_hosts, jump=jump)
                for node in self.context.nodes}

    def vagrant_ssh_endpoints(self) -> dict[str, SSHEndpoint]:
        """Vagrant's own way in (user vagrant; after adoption with the lab's key), for adoption and diagnosis."""
        return self._endpoints_of(self._vagrant_ssh_entries())

    def _endpoints_of(self, entries: dict[str, SSHConfigEntry]) -> dict[str, SSHEndpoint]:
        # Through the jump host too, as `vagrant ssh-config`'s ProxyCommand goes (a remote libvirt).
        jump = self.jump
        return {node.name: replace(ssh_endpoint(node.name, entries[node.name]), jump=jump)
                for node in self.context.nodes if node.name in entries}

    def _vagrant_ssh_entries(self) -> dict[str, SSHConfigEntry]:
        try:
            text = self._run(lambda v: v.ssh_config())
        except CommandError:
            # `vagrant ssh-config` stops at the first machine not running: ask
            # for the running ones by name instead.
            running = [s.name for s in self.status() if s.state is NodeState.RUNNING]
            text = "\n".join(self._run(lambda v, name=name: v.ssh_config(vm_name=name)) for name in running)
        return parse_ssh_config(text)

    # -- faults: the hypervisor where a provider class knows a fast way, else Vagrant

    def reboot(self, node: str, progress: Progress = no_progress) -> None:
        """A clean reboot from inside the guest; returns once it answers SSH with a new boot id."""
        self._require_created(node, "reboot")
        reboot_over_ssh(self.ssh_endpoints()[node], VM_BOOT_TIMEOUT,
                        hint="look at the machine's console (virt-manager, VirtualBox GUI) or `lab status`")
        self._reapply_partition(node)
        progress(f"{node} rebooted")

    def kill(self, node: str) -> None:
        self._require_created(node, "kill")
        self._run(lambda v: v.halt(vm_name=node, force=True))

    def start(self, node: str, progress: Progress = no_progress) -> None:
        self.context.node(node)
        self._run(lambda v: v.up(vm_name=node, provider=self.vagrant_provider, provision=False), progress)
        self._wait_ssh(node)
        self._reapply_partition(node)

    def pause(self, node: str) -> None:
        self._require_created(node, "pause")
        self._run(lambda v: v.suspend(vm_name=node))

    def resume(self, node: str) -> None:
        self._require_created(node, "resume")
        self._run(lambda v: v.resume(vm_name=node))
        self._reapply_partition(node)

    def _wait_ssh(self, node: str) -> None:
        wait_for_ssh(self.ssh_endpoints()[node], time.monotonic() + VM_BOOT_TIMEOUT, poll=0.5)

    def _require_created(self, node: str, action: str) -> None:
        # Vagrant answers a fault on a machine it never made with a note and
        # exit status 0; a scenario must not believe the fault happened.
        self.context.node(node)
        if node not in self.machines_on_disk():
            raise ProviderError(f"cannot {action} {node}: Vagrant has not created it in {self.context.lab_dir}",
                                hint="run `lab up` first")

    # -- checks

    def validate(self) -> None:
        """Render this lab's Vagrantfile and have `vagrant validate` check it."""
        validate(self.context, self.vagrant_provider)

