"""libvirt through vagrant-libvirt: faults through virsh and QEMU, cleanup of what Vagrant leaves.

vagrant-libvirt boots a lab's machines in parallel itself. Faults go to
libvirt directly (`virsh`, or SIGKILL to the domain's QEMU for a kill), as a
`vagrant` command costs seconds. What vagrant-libvirt makes on the host
(domains, their disk volumes, networks) is recorded in the lab's state before
`vagrant up`, so `destroy` removes it even after lab or Vagrant died half-way.
Earlier builds' copies of the box in the storage pool are removed at `up`
(lab.images.vagrantbox owns the pool copies of boxes).

`providers.libvirt.driver: auto` (the default) is settled here, never passed
on: `kvm` where a KVM guest boots on this host (lab.providers.vagrant.kvmprobe
asks once per host and box, and caches the answer), `qemu` (software
emulation) where it does not or there is no /dev/kvm, with Raft timings that
suit emulation for the etcd keys the spec leaves unset. `lab up` probes when
nothing else tells and records the driver in the lab's state, so a lab keeps
the driver its domains were made with. Everything else (render, validate,
status, destroy) settles without probing: the lab's recorded driver, else the
cached verdict, else `kvm`, the answer a passing probe would give (`lab up`
probes before Vagrant ever sees it).
"""

from __future__ import annotations

import errno
import getpass
import os
import signal
import socket
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from lab.errors import CommandError, LabError, PrerequisiteError, ProviderError
from lab.host import jumphost
from lab.host.run import Result, run
from lab.host.ssh import SSHEndpoint
from lab.host.vagrant import added_box_dirs, vagrant_home
from lab.images.vagrantbox import current_libvirt_volume, remove_stale_libvirt_volumes, vagrant_box_name_for
from lab.model.spec import Etcd, LabSpec, LibvirtOptions, remote_libvirt
from lab.providers.base import Availability, LabContext, Progress, no_progress
from lab.providers.vagrant.kvmprobe import (DriverChoice, NotProbeable, cached_kvm_verdict, choose_driver,
                                            host_facts, kvm_device_state, kvm_verdict)
from lab.providers.vagrant.provider import VagrantProvider
from lab.providers.vagrant.render import libvirt_network_name, vagrant_box_name

LIBVIRT_SOCKETS = (Path("/var/run/libvirt/libvirt-sock"), Path("/var/run/libvirt/virtqemud-sock"))
# URIs whose QEMU runs on this host (and so uses this host's /dev/kvm).
LOCAL_URIS = ("qemu:///system", "qemu:///session")
# Raft under software emulation (README, "VMs"): three emulated CPUs on two
# host cores delay heartbeats and let a follower's log lag; pre-vote keeps the
# lagging follower from forcing elections it cannot win. Measured: 4.9 s to a
# new leader with 100/1000 ms, about 20 s once with 250/2500 ms and no pre-vote.
EMULATION_ETCD = {"heartbeat_ms": 250, "election_timeout_ms": 2500, "pre_vote": True}
# `virsh version` over SSH: a login and libvirtd's answer.
REMOTE_ANSWER_TIMEOUT = 60.0
STATE_SECTION = "libvirt"  # {"driver": "kvm" | "qemu"}: what the lab's domains were made with


def requested_driver(spec: LabSpec) -> str:
    """What the spec asks for: kvm, qemu or auto. A spec `with_driver` settled still says auto: its
    options count `driver` as set only when the user set it to kvm or qemu."""
    options = spec.providers.libvirt
    return options.driver if "driver" in options.model_fields_set else "auto"


def recorded_driver(state: Any) -> str | None:
    section = state.get(STATE_SECTION) if state is not None else None
    driver = section.get("driver") if isinstance(section, dict) else None
    return driver if driver in ("kvm", "qemu") else None


def with_driver(spec: LabSpec, driver: str) -> LabSpec:
    """`spec` as a lab with this driver runs: providers.libvirt.driver `driver`, and etcd's timings and
    pre-vote, where the spec leaves them unset, those of emulation (qemu) or the defaults (kvm).

    Idempotent and reversible: the keys lab fills in are not marked as set,
    so settling a settled spec again (say with the driver a lab recorded)
    starts from what the user wrote. The two timings go together: a spec that
    sets either keeps both as they are (etcd needs election >= 5x heartbeat).
    """
    options = spec.providers.libvirt
    user_set = options.model_fields_set - {"driver"}
    if requested_driver(spec) != "auto":
        user_set = user_set | {"driver"}
    libvirt = LibvirtOptions.model_construct(_fields_set=user_set, **{**dict(options), "driver": driver})
    etcd = spec.etcd
    wanted = EMULATION_ETCD if driver == "qemu" else {key: Etcd.model_fields[key].default for key in EMULATION_ETCD}
    values = dict(etcd)
    if not etcd.model_fields_set & {"heartbeat_ms", "election_timeout_ms"}:
        values.update(heartbeat_ms=wanted["heartbeat_ms"], election_timeout_ms=wanted["election_timeout_ms"])
    if "pre_vote" not in etcd.model_fields_set:
        values["pre_vote"] = wanted["pre_vote"]
    settled_etcd = Etcd.model_construct(_fields_set=set(etcd.model_fields_set), **values)
    providers = spec.providers.model_copy(update={"libvirt": libvirt})
    return spec.model_copy(update={"providers": providers, "etcd": settled_etcd})


def driver_choice(spec: LabSpec, state: Any = None, *, probe: bool = False,
                  progress: Progress = no_progress) -> DriverChoice:
    """The driver a lab of `spec` gets here; with `probe`, a KVM probe runs if nothing else tells
    (and the choice's driver is then never None)."""
    requested, recorded = requested_driver(spec), recorded_driver(state)
    remote = spec.providers.libvirt.uri not in LOCAL_URIS
    if requested != "auto" or recorded or remote:
        return choose_driver(requested, recorded=recorded, remote=remote)
    device = kvm_device_state()
    if device == "absent":
        return choose_driver(requested, kvm_device=device)
    box = vagrant_box_name(spec)
    if not probe:
        return choose_driver(requested, kvm_device=device, verdict=cached_kvm_verdict(box))
    try:
        return choose_driver(requested, kvm_device=device, verdict=kvm_verdict(box, progress))
    except NotProbeable as exc:
        return choose_driver(requested, kvm_device=device, unprobeable=exc.message)


def libvirt_socket_problem(sockets: tuple[Path, ...] = LIBVIRT_SOCKETS) -> str | None:
    """None if libvirt's system daemon accepts a connection, else why not."""
    problems = []
    for path in sockets:
        if not path.exists():
            problems.append(f"{path} does not exist")
            continue
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(1.0)
            try:
                sock.connect(str(path))
                return None
            except OSError as exc:
                reason = os.strerror(exc.errno) if exc.errno else str(exc)
                if exc.errno in (errno.EACCES, errno.EPERM):
                    reason += " (join the libvirt group or run as root)"
                problems.append(f"{path}: {reason}")
    return "libvirtd is not answering: " + "; ".join(problems)


def remote_libvirtd_problem(uri: str, timeout: float) -> str | None:
    """None if the libvirtd of a remote URI answers `virsh -c URI version` (over the user's ssh), else why not."""
    try:
        answer = run(["virsh", "-q", "-c", uri, "version"], where=f"libvirt at {uri}", timeout=timeout, check=False,
                     missing_hint="apt-get install libvirt-clients")
    except CommandError:
        return f"libvirt at {uri} does not answer: no answer in {timeout:.0f} s"
    said = (answer.stderr or answer.stdout).strip().splitlines()
    return None if answer.ok else f"libvirt at {uri} does not answer: {said[-1] if said else 'virsh failed'}"


class LibvirtProvider(VagrantProvider):
    name = "libvirt"
    vagrant_provider = "libvirt"
    label = "libvirt"
    plugin = "vagrant-libvirt"
    plugin_hint = ("`apt-get install vagrant-libvirt` with Debian's vagrant, "
                   "or `vagrant plugin install vagrant-libvirt`")
    box_formats = ("libvirt",)

    def __init__(self, context: LabContext) -> None:
        super().__init__(replace(context, spec=self.settled_spec(context.spec, context.state)))

    @classmethod
    def settled_spec(cls, spec: LabSpec, state: Any = None) -> LabSpec:
        """The spec with `driver: auto` settled without probing (see the module's docstring)."""
        return with_driver(spec, driver_choice(spec, state).driver or "kvm")

    @classmethod
    def jump_host(cls, spec: LabSpec, lab_dir: Path, known_hosts: Path) -> SSHEndpoint | None:
        """The libvirt host of a `qemu+ssh://` URI: the lab's networks exist there only, so lab reaches the
        VMs through it (lab.host.reach), with the URI's login; None for this host's libvirt."""
        remote = remote_libvirt(spec.providers.libvirt.uri)
        if remote is None:
            return None
        user = remote.user or getpass.getuser()
        key = jumphost.login_key(remote.keyfile, lab_dir.parent.parent, f"{user}@{remote.host}",
                                 "providers.libvirt.uri (?keyfile=/absolute/path)")
        return jumphost.jump_endpoint(remote.host, remote.port, user, key, lab_dir, known_hosts)

    def up(self, progress: Progress = no_progress) -> None:
        self._settle_driver(progress)
        if self.context.jump is not None:
            jumphost.pin(self.context.jump, self.context.known_hosts)
            progress(jumphost.describe(self.context.jump, self.context.known_hosts, role="libvirt host"))
        super().up(progress)

    def _settle_driver(self, progress: Progress) -> None:
        """Settle `driver: auto` for good before anything boots, probing KVM if nothing else tells;
        record it, and say so in one line when the lab gets emulation or an unchecked KVM."""
        spec = self.context.spec
        choice = driver_choice(spec, self.context.state, probe=True, progress=progress)
        driver = choice.driver or "kvm"
        spec = with_driver(spec, driver)
        self.context = replace(self.context, spec=spec)
        if choice.note:
            etcd = spec.etcd
            timings = (f"; etcd for emulation: heartbeat {etcd.heartbeat_ms} ms, election timeout "
                       f"{etcd.election_timeout_ms} ms, pre-vote {'on' if etcd.pre_vote else 'off'}"
                       if driver == "qemu" else "")
            progress(f"note: {choice.note}{timings}")
        elif choice.why and requested_driver(spec) == "auto" and recorded_driver(self.context.state) is None:
            progress(f"libvirt driver {driver}: {choice.why}")
        state = self.context.state
        if state is not None and recorded_driver(state) is None:
            # Before the domains exist; theirs for good (vagrant-libvirt does not redefine a domain's type).
            state.set(STATE_SECTION, {"driver": driver})

    @classmethod
    def daemon_problem(cls) -> tuple[str, str] | None:
        problem = libvirt_socket_problem()
        if problem:
            return problem, ("start libvirtd: `systemctl start libvirtd`, or without systemd "
                             "`virtlogd -d && libvirtd -d` (apt-get install libvirt-daemon-system)")
        return None

    def uses_local_daemon(self) -> bool:
        # Another URI (a session, a remote host) has its own daemon.
        return self.context.spec.providers.libvirt.uri == "qemu:///system"

    @classmethod
    def availability(cls) -> Availability:
        # Auto-selection passes libvirt over until a Lab OS box was added: a
        # host that runs libvirtd for other reasons (CI runners, this kind of
        # machine) keeps the embedded default, and says why.
        found = super().availability()
        if found.usable and not cls.lab_boxes_added():
            return Availability(False, "no Lab OS box for libvirt yet (lab box add --format libvirt)")
        if found.usable:
            # "Linux without a hypervisor" gets the embedded default: VMs under
            # software emulation boot in minutes and stretch Raft's timings, where
            # nspawn nodes boot in seconds. `--provider libvirt` still runs them.
            slow = cls.emulation_only()
            if slow:
                return Availability(False, f"{slow}: VMs would run under software emulation "
                                           "(--provider libvirt uses it anyway)")
        return found

    @classmethod
    def emulation_only(cls) -> str | None:
        """Why this host's libvirt VMs would run without KVM, else None: no usable /dev/kvm, or every added
        Lab OS box's KVM probe (cached, else run now: once per host and box) saw the guest not boot."""
        host = host_facts()
        if host.kvm != "usable":
            return "no usable /dev/kvm"
        verdicts = []
        for box in sorted(path.name for path in (vagrant_home() / "boxes").glob(vagrant_box_name_for("*", "*"))
                          if added_box_dirs(path.name, "libvirt")):
            try:
                verdicts.append(kvm_verdict(box))
            except LabError:  # not probeable, or another probe holds the lock: this box cannot tell
                continue
        if verdicts and not any(v.boots for v in verdicts):
            return f"KVM does not boot guests on this host ({verdicts[-1].reason})"
        return None

    # What vagrant-libvirt makes on the host, by name: recorded before `vagrant
    # up` so destroy finds them even if lab or Vagrant died half-way.
    MANAGEMENT_NETWORK = "vagrant-libvirt"  # vagrant-libvirt's default, shared by all its machines
    STORAGE_POOL = "default"

    def _vagrant_up(self, nodes: list[str], progress: Progress) -> None:
        etcd = self.context.spec.etcd
        if self.context.spec.providers.libvirt.driver == "qemu" and (
                etcd.election_timeout_ms < EMULATION_ETCD["election_timeout_ms"] or not etcd.pre_vote):
            # Only a spec that sets etcd's keys gets here (with_driver fills in the
            # unset ones). Under emulation a follower's log lags by a few entries;
            # without pre-vote it campaigns in vain, each time raising the term
            # and restarting the timer of the one follower that could win.
            progress("note: software emulation (driver qemu) slows Raft down; with etcd "
                     f"{etcd.heartbeat_ms}/{etcd.election_timeout_ms} ms"
                     f"{'' if etcd.pre_vote else ' and no pre-vote'} elections can take several rounds: consider "
                     + " ".join(f"--set etcd.{key}={str(value).lower()}" for key, value in EMULATION_ETCD.items()))
        # Copies of earlier builds that `lab box add` could not remove (libvirtd
        # was not running then): 700 MiB each in the pool.
        box = vagrant_box_name(self.context.spec)
        current = current_libvirt_volume(box)
        if current is not None:
            for volume in remove_stale_libvirt_volumes(box, self.context.spec.providers.libvirt.uri, keep=current):
                progress(f"removed {volume}, the libvirt copy of an earlier build of {box}")
        state = self.context.state
        if state is not None:
            # Shared by every vagrant-libvirt machine: removed at destroy only
            # when no domain at all is attached to it (as vagrant-libvirt does).
            state.record("libvirt-network", self.MANAGEMENT_NETWORK, shared=True)
            state.record("libvirt-network", libvirt_network_name(self.context))
            for node in nodes:
                state.record("libvirt-domain", self.machine_name(node))
                # vagrant-libvirt names the domain's disk after it, in the default pool.
                state.record("libvirt-volume", f"{self.machine_name(node)}.img", pool=self.STORAGE_POOL)
        super()._vagrant_up(nodes, progress)

    def _virsh(self, *args: str, check: bool = True) -> Result:
        return run(["virsh", "-q", "-c", self.context.spec.providers.libvirt.uri, *args],
                   where=f"libvirt lab {self.context.spec.name}", timeout=120, check=check,
                   hint="libvirtd is not answering: restart it and run the command again",
                   missing_hint="apt-get install libvirt-clients")

    def _domain_state(self, node: str) -> str | None:
        """virsh's state of the node's domain (running, paused, shut off), or None if there is none."""
        result = self._virsh("domstate", self.machine_name(node), check=False)
        return result.stdout.strip() if result.ok else None

    def _networks(self) -> set[str]:
        return set(self._virsh("net-list", "--all", "--name", check=False).stdout.split())

    def kill(self, node: str) -> None:
        """Pull the plug: SIGKILL to the node's QEMU, no shutdown inside the guest.

        `virsh destroy` would do too, but returns about 2 s after the guest
        stopped (libvirt's cleanup of a software-emulated machine), and a
        scenario measures recovery from when the fault returns. SIGKILL stops
        the guest the instant it is sent; libvirt then notices on its own
        (`_settle` waits for that before the next action on the domain).
        Needs the local system daemon; elsewhere `virsh destroy` it is.
        """
        self._require_created(node, "kill")
        state = self._domain_state(node)
        if state is None:
            raise ProviderError(f"cannot kill {node}: libvirt does not know domain {self.machine_name(node)}",
                                hint="check `virsh list --all` and that libvirtd is running")
        if state not in ("running", "paused"):
            return
        if state == "paused" or not self._sigkill_qemu(node):
            self._virsh("destroy", self.machine_name(node))

    def _reaches_qemu_directly(self) -> bool:
        """Can lab see and signal this lab's QEMU processes (local system daemon, as root)?"""
        return self.context.spec.providers.libvirt.uri == "qemu:///system" and os.geteuid() == 0

    def _sigkill_qemu(self, node: str) -> bool:
        if not self._reaches_qemu_directly():
            return False
        domain = self.machine_name(node)
        try:
            pid = int(Path(f"/run/libvirt/qemu/{domain}.pid").read_text().strip())
            # The pid file outlives a process now and then: kill only the right QEMU.
            if f"guest={domain},".encode() not in Path(f"/proc/{pid}/cmdline").read_bytes():
                return False
            os.kill(pid, signal.SIGKILL)
        except (OSError, ValueError):
            return False
        return True

    def _settle(self, node: str, timeout: float = 30.0) -> str | None:
        """The domain's state once libvirt has caught up with a kill (it still says running meanwhile)."""
        deadline = time.monotonic() + timeout
        state = self._domain_state(node)
        while state == "running" and self._qemu_gone(node) and time.monotonic() < deadline:
            time.sleep(0.1)
            state = self._domain_state(node)
        return state

    def _qemu_gone(self, node: str) -> bool:
        """Is the domain's QEMU dead or dying (a zombie, or SIGKILL pending) while libvirt still says running?"""
        if not self._reaches_qemu_directly():
            return False  # lab never SIGKILLs there (see _sigkill_qemu): libvirt's word stands
        domain = self.machine_name(node)
        try:
            pid = int(Path(f"/run/libvirt/qemu/{domain}.pid").read_text().strip())
            fields = dict(line.split(":\t", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                          if ":\t" in line)
        except FileNotFoundError:
            return True
        except (OSError, ValueError):
            return False
        sigkill = 1 << (signal.SIGKILL - 1)
        pending = int(fields.get("ShdPnd", "0"), 16) | int(fields.get("SigPnd", "0"), 16)
        return fields.get("State", "").startswith(("Z", "X")) or bool(pending & sigkill)

    def pause(self, node: str) -> None:
        self._require_created(node, "pause")
        self._virsh("suspend", self.machine_name(node))

    def resume(self, node: str) -> None:
        self._require_created(node, "resume")
        if self._settle(node) == "paused":
            self._virsh("resume", self.machine_name(node))
        self._reapply_partition(node)

    def start(self, node: str, progress: Progress = no_progress) -> None:
        # A killed domain keeps its definition and its guest its network
        # settings: starting it is enough, and much faster than `vagrant up`.
        self.context.node(node)
        if self._settle(node) == "shut off":
            self._virsh("start", self.machine_name(node))
            self._wait_ssh(node)
            self._reapply_partition(node)
            progress(f"{node} started")
            return
        super().start(node, progress)

    def _thaw_all(self) -> None:
        for node in self.machines_on_disk():
            if self._settle(node) == "paused":
                self._virsh("resume", self.machine_name(node), check=False)

    def _cleanup_host(self, progress: Progress) -> None:
        """Whatever `vagrant destroy` left of what the state recorded: domains first, then networks."""
        state = self.context.state
        if state is None:
            return
        left: list[str] = []

        def remove(kind: str, name: str, exists: list[str], *removals: list[str]) -> None:
            """Remove one recorded resource if virsh `exists` finds it; forget it once gone, else report it."""
            what = f"{kind.removeprefix('libvirt-')} {name}"
            if self._virsh(*exists, check=False).ok:
                progress(f"removing leftover {what}")
                for removal in removals:
                    self._virsh(*removal, check=False)
            if self._virsh(*exists, check=False).ok:
                left.append(what)
            else:
                state.forget(kind, name)

        for resource in state.find("libvirt-domain"):
            domain = resource["id"]
            remove("libvirt-domain", domain, ["domstate", domain],
                   ["destroy", domain], ["undefine", domain, "--remove-all-storage", "--nvram"])
        for resource in state.find("libvirt-volume"):
            pool, volume = resource.get("pool", self.STORAGE_POOL), resource["id"]
            remove("libvirt-volume", volume, ["vol-info", "--pool", pool, volume], ["vol-delete", "--pool", pool, volume])
        for resource in state.find("libvirt-network"):
            network = resource["id"]
            if network in self._networks() and not self._network_in_use(network):
                progress(f"removing libvirt network {network}")
                self._virsh("net-destroy", network, check=False)
                self._virsh("net-undefine", network, check=False)
            if network in self._networks() and not resource.get("shared"):
                left.append(f"network {network}")
            else:
                state.forget("libvirt-network", network)
        if left:
            # The state keeps them: `lab destroy` again retries.
            raise ProviderError(f"could not remove {', '.join(left)}",
                                hint="check libvirtd (`virsh list --all`, `virsh net-list --all`), "
                                     "then run `lab destroy` again")

    def _network_in_use(self, network: str) -> bool:
        """Is any domain on the host (of any lab, or not lab's at all) attached to the network?"""
        for domain in self._virsh("list", "--all", "--name", check=False).stdout.split():
            interfaces = self._virsh("domiflist", domain, check=False).stdout.split()
            if network in interfaces:
                return True
        return False

    def lab_problem(self) -> tuple[str, str] | None:
        options = self.context.spec.providers.libvirt
        if options.driver == "kvm" and options.uri in LOCAL_URIS and not Path("/dev/kvm").exists():
            return ("providers.libvirt.driver is kvm but /dev/kvm does not exist",
                    "set providers.libvirt.driver: qemu (software emulation, slow) or enable KVM on this host")
        return super().lab_problem()

    def preflight(self) -> None:
        super().preflight()
        problem = self.remote_problem()
        if problem:
            raise PrerequisiteError(problem[0], hint=problem[1])

    def remote_problem(self) -> tuple[str, str] | None:
        """Why the remote libvirt host of a `qemu+ssh://` URI cannot hold this lab, else None: libvirt and
        Vagrant must reach its libvirtd (with the user's ssh, as `virsh -c URI` does), lab its SSH login."""
        uri = self.context.spec.providers.libvirt.uri
        if remote_libvirt(uri) is None:
            return None
        problem = remote_libvirtd_problem(uri, REMOTE_ANSWER_TIMEOUT)
        if problem is not None:
            return (problem,
                    f"`virsh -c '{uri}' list` must work from here without a password prompt: the host's key in "
                    "~/.ssh/known_hosts (ssh to it once), the key of the URI (or ~/.ssh/id_*) authorized there, "
                    "libvirtd running there")
        try:
            from lab.host.ssh import jump_connection

            jump_connection(self.jump)
        except ProviderError as exc:
            return exc.message, exc.hint or ""
        return None
