"""libvirt through vagrant-libvirt: faults through virsh and QEMU, cleanup of what Vagrant leaves.

vagrant-libvirt boots a lab's machines in parallel itself. Faults go to
libvirt directly (`virsh`, or SIGKILL to the domain's QEMU for a kill), as a
`vagrant` command costs seconds. What vagrant-libvirt makes on the host
(domains, their disk volumes, networks) is recorded in the lab's state before
`vagrant up`, so `destroy` removes it even after lab or Vagrant died half-way.
Earlier builds' copies of the box in the storage pool are removed at `up`
(lab.images.vagrantbox owns the pool copies of boxes).
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import time
from pathlib import Path

from lab.errors import ProviderError
from lab.host.run import Result, run
from lab.images.vagrantbox import current_libvirt_volume, remove_stale_libvirt_volumes
from lab.providers.base import Availability, Progress, no_progress
from lab.providers.vagrant.provider import VagrantProvider
from lab.providers.vagrant.render import libvirt_network_name, vagrant_box_name

LIBVIRT_SOCKETS = (Path("/var/run/libvirt/libvirt-sock"), Path("/var/run/libvirt/virtqemud-sock"))


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


class LibvirtProvider(VagrantProvider):
    name = "libvirt"
    vagrant_provider = "libvirt"
    label = "libvirt"
    plugin = "vagrant-libvirt"
    plugin_hint = ("`apt-get install vagrant-libvirt` with Debian's vagrant, "
                   "or `vagrant plugin install vagrant-libvirt`")
    box_formats = ("libvirt",)

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
        return found

    # What vagrant-libvirt makes on the host, by name: recorded before `vagrant
    # up` so destroy finds them even if lab or Vagrant died half-way.
    MANAGEMENT_NETWORK = "vagrant-libvirt"  # vagrant-libvirt's default, shared by all its machines
    STORAGE_POOL = "default"

    def _vagrant_up(self, nodes: list[str], progress: Progress) -> None:
        etcd = self.context.spec.etcd
        if self.context.spec.providers.libvirt.driver == "qemu" and (
                etcd.election_timeout_ms < 2500 or not etcd.pre_vote):
            # Under emulation a follower's log lags by a few entries; without
            # pre-vote it campaigns in vain, each time raising the term and
            # restarting the timer of the one follower that could win.
            progress("note: software emulation (driver qemu) slows Raft down; with etcd "
                     f"{etcd.heartbeat_ms}/{etcd.election_timeout_ms} ms"
                     f"{'' if etcd.pre_vote else ' and no pre-vote'} elections can take several rounds: consider "
                     "--set etcd.heartbeat_ms=250 --set etcd.election_timeout_ms=2500 --set etcd.pre_vote=true")
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
        if self.context.spec.providers.libvirt.driver == "kvm" and not Path("/dev/kvm").exists():
            return ("providers.libvirt.driver is kvm but /dev/kvm does not exist",
                    "set providers.libvirt.driver: qemu (software emulation, slow) or enable KVM on this host")
        return super().lab_problem()
