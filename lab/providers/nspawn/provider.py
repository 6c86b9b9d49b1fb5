"""The embedded default: every node is a `systemd-nspawn --boot` container.

The only module that knows about nspawn. Per lab:
  * one host bridge `lab-<id>` carrying the lab subnet (host side is .1);
  * per node an overlayfs (lower: the read-only OS image, upper: the node's
    own state) booted by systemd-nspawn, with `/usr` bound read-only from the
    image as on CoreOS;
  * per node a small supervisor process (detached, so nodes outlive the
    `lab` command) that restarts nspawn when the node reboots (exit 133, what
    systemd-nspawn@.service does on a systemd host, which this may not be);
  * per node a freezer and a memory cgroup holding the supervisor and so the
    whole container: pause/resume freeze it, destroy kills whatever is in it,
    even processes that a crash left unrecorded;
  * one nftables `bridge` table for partitions, created on first use.

Everything is recorded in the lab's state before it is made; every removal
is idempotent, so `destroy` works after Ctrl-C or kill -9 at any point.
"""

from __future__ import annotations

import ipaddress
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from lab.errors import CommandError, PrerequisiteError, ProviderError, StateError, UsageError
from lab.providers.base import Availability, NodeState, NodeStatus, Progress, Provider, SSHEndpoint, no_progress

CGROUP_ROOT = Path("/sys/fs/cgroup")
CGROUP_CONTROLLERS = ("freezer", "memory")
BOOT_TIMEOUT = 90.0  # seconds until a node must answer SSH; nodes boot in ~1 s warm
STOP_TIMEOUT = 30.0
REBOOT_EXIT_STATUS = 133  # systemd-nspawn's exit status when the container asked to reboot

# Run as `python -I -S -c SUPERVISOR CONFIG`: no lab import, so it stays tiny
# (a few MB) and keeps working even if lab is upgraded under a running lab.
SUPERVISOR = r"""
import json, os, signal, subprocess, sys
config = json.loads(sys.argv[1])
for procs in config["cgroups"]:
    with open(procs, "w") as f:
        f.write(str(os.getpid()))
stopping = False
child = None
def stop(signum, frame):
    global stopping
    stopping = True
    if child is not None and child.poll() is None:
        child.send_signal(signal.SIGTERM)
signal.signal(signal.SIGTERM, stop)
signal.signal(signal.SIGINT, signal.SIG_IGN)
signal.signal(signal.SIGHUP, signal.SIG_IGN)
def boot_usr():
    # The node chooses its boot slot itself, as a machine writes its
    # bootloader's config: /etc/lab/boot.json in its own layer.
    try:
        with open(config["boot_file"]) as f:
            slot = json.load(f).get("slot", "a")
    except (OSError, ValueError, AttributeError):
        slot = "a"
    path = os.path.join(config["slots_dir"], "slot-" + str(slot))
    if not os.path.isdir(path):
        path = os.path.join(config["slots_dir"], "slot-a")
    return os.path.join(path, "usr")
while True:
    usr = boot_usr()
    child = subprocess.Popen([a.replace("{usr}", usr) for a in config["argv"]], stdin=subprocess.DEVNULL)
    with open(config["pidfile"] + ".tmp", "w") as f:
        f.write(str(child.pid))
    os.replace(config["pidfile"] + ".tmp", config["pidfile"])
    while True:
        try:
            status = child.wait()
            break
        except InterruptedError:
            continue
    if status == 133 and not stopping:
        continue
    sys.exit(status if status >= 0 else 128 - status)
"""


def _run(argv: list[str], *, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run(argv, capture_output=True, text=True, input=input, check=False)
    if check and result.returncode != 0:
        raise CommandError(" ".join(argv), where="host", exit_status=result.returncode,
                           output=result.stdout + result.stderr)
    return result


# ---------------------------------------------------------------- processes


def _start_time(pid: int) -> str | None:
    """Process start time in clock ticks: with the pid, a unique process identity."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _alive(pid: int | None, started: str | None) -> bool:
    if not pid:
        return False
    now = _start_time(pid)
    if now is None or (started is not None and now != started):
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def _container_init(nspawn_pid: int) -> int | None:
    """The container's PID 1 as seen from the host: nspawn's child in a new pid namespace."""
    try:
        own_ns = os.readlink(f"/proc/{nspawn_pid}/ns/pid")
    except OSError:
        return None  # gone meanwhile (or not ours to read: status checks root first)
    for child in _children(nspawn_pid):
        try:
            if os.readlink(f"/proc/{child}/ns/pid") != own_ns:
                return child
        except OSError:
            continue
    return None


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _mounts_below(directory: Path) -> list[str]:
    """Mount points at or below a directory, deepest first (so they unmount in order)."""
    prefix = str(directory.resolve())
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        # mountinfo escapes space, tab, newline and backslash as \ooo octal;
        # other characters (UTF-8 names) are written as they are.
        mount_point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), line.split()[4])
        if mount_point == prefix or mount_point.startswith(prefix + "/"):
            found.append(mount_point)
    return sorted(found, key=len, reverse=True)


def _unmount(mount_point: str) -> None:
    result = _run(["umount", mount_point], check=False)
    if result.returncode != 0 and os.path.ismount(mount_point):
        _run(["umount", "--lazy", mount_point], check=False)


def _link_exists(name: str) -> bool:
    return Path(f"/sys/class/net/{name}").exists()


def _delete_link(name: str) -> None:
    """Delete a network link by name or altname, if it exists."""
    _run(["ip", "link", "delete", name], check=False)


def _remove_empty_dir(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:
        pass


# ---------------------------------------------------------------- the provider


class NspawnProvider(Provider):
    name = "nspawn"

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

    def node_dir(self, node: str) -> Path:
        return self.context.lab_dir / "nodes" / node

    def cgroups(self, node: str) -> list[Path]:
        return [_cgroup_base(c) / self.machine(node) for c in CGROUP_CONTROLLERS]

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
        for controller in CGROUP_CONTROLLERS:
            if not (CGROUP_ROOT / controller).is_dir():
                raise PrerequisiteError(f"cgroup v1 controller {controller!r} is not mounted at "
                                        f"{CGROUP_ROOT / controller}",
                                        hint="the nspawn provider needs the freezer and memory controllers")
        recorded = (self.context.state.get("image") if self.context.state is not None else None) or {}
        if not Path(recorded.get("rootfs", "/nonexistent")).is_dir():
            self.image()

    def image(self):
        from lab.images.boxes import find_image

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
            boot_id = _read(Path(f"/proc/{init}/root/proc/sys/kernel/random/boot_id"))
            frozen = _read(self.cgroups(node.name)[0] / "freezer.state") == "FROZEN"
            statuses.append(NodeStatus(node.name, NodeState.PAUSED if frozen else NodeState.RUNNING, ip,
                                       boot_id=boot_id, detail=f"init pid {init}"))
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
        for mount_point in _mounts_below(self.node_dir(node)):
            _unmount(mount_point)
        self.state.forget("mount", merged)
        for cgroup in self.cgroups(node):
            _remove_cgroup(cgroup)
            self.state.forget("cgroup", str(cgroup))
        _delete_link(self.veth(node))
        _remove_empty_dir(self.propagate_dir(node))
        shutil.rmtree(self.node_dir(node), ignore_errors=True)
        self.state.forget("node", node)

    def stage_update(self, node: str, rootfs: Path) -> str:
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
        """The slot the node boots next (what its own /etc/lab/boot.json says)."""
        try:
            return json.loads((self.node_dir(node) / "upper/etc/lab/boot.json").read_text()).get("slot", "a")
        except (OSError, ValueError):
            return "a"

    def ssh_endpoints(self) -> dict[str, SSHEndpoint]:
        return {node.name: SSHEndpoint(node=node.name, host=self.context.addresses[node.name], port=22,
                                       user="root", identity_file=self.context.ssh_key,
                                       known_hosts=self.context.known_hosts)
                for node in self.context.nodes}

    # -- faults

    def reboot(self, node: str, progress: Progress = no_progress) -> None:
        init = self._require_running(node)
        old_boot = _read(Path(f"/proc/{init}/root/proc/sys/kernel/random/boot_id"))
        # SIGRTMIN+5 asks systemd (PID 1) for a clean reboot; nspawn then exits
        # 133 and the supervisor boots the node again on the same overlay.
        os.kill(init, signal.SIGRTMIN + 5)
        deadline = time.monotonic() + BOOT_TIMEOUT
        while time.monotonic() < deadline:
            new_init = self._init_pid(node)
            if new_init and new_init != init:
                new_boot = _read(Path(f"/proc/{new_init}/root/proc/sys/kernel/random/boot_id"))
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
        if not self._wait_gone(self._supervisor(node), timeout=10):
            raise ProviderError(f"{node}: still running 10 s after SIGKILL", hint="`lab destroy` removes it")

    def pause(self, node: str) -> None:
        self._require_running(node)
        self._freezer(node, "FROZEN")

    def resume(self, node: str) -> None:
        self.context.node(node)
        self._freezer(node, "THAWED")

    def partition(self, groups: list[list[str]]) -> None:
        names = [n for group in groups for n in group]
        for name in names:
            self.context.node(name)
        if len(set(names)) != len(names):
            raise UsageError("a node appears in two partition groups", hint="list every node at most once")
        self.state.set("partition", groups)
        self._apply_partition(groups)

    def heal(self) -> None:
        self.state.set("partition", None)
        _run(["nft", "delete", "table", "bridge", self.nft_table], check=False)

    # ---------------------------------------------------------------- internals

    def _ensure_bridge(self, progress: Progress) -> None:
        self.state.record("bridge", self.bridge)
        if not _link_exists(self.bridge):
            progress(f"creating bridge {self.bridge} for {self.context.subnet}")
            _run(["ip", "link", "add", "name", self.bridge, "type", "bridge"])
        prefix = self.context.subnet.split("/")[1]
        host_ip = str(ipaddress.IPv4Network(self.context.subnet).network_address + 1)
        addresses = _run(["ip", "-4", "-o", "addr", "show", "dev", self.bridge]).stdout
        if f" {host_ip}/{prefix} " not in addresses:
            _run(["ip", "addr", "add", f"{host_ip}/{prefix}", "dev", self.bridge])
        _run(["ip", "link", "set", self.bridge, "up"])

    def _prepare_node(self, node: str, rootfs: Path) -> None:
        directory = self.node_dir(node)
        upper, work, merged = directory / "upper", directory / "work", directory / "merged"
        self.state.record("node", node, dir=str(directory))
        for path in (upper, work, merged):
            path.mkdir(parents=True, exist_ok=True)
        slot_a = directory / "slot-a"
        if not slot_a.is_symlink():
            slot_a.symlink_to(rootfs)  # the image the node was created with
        if not (directory / "provisioned").exists():
            self._write_node_files(node, upper, rootfs)
            (directory / "provisioned").write_text(time.strftime("%Y-%m-%dT%H:%M:%SZ\n", time.gmtime()))
        self.state.record("mount", str(merged))
        if not os.path.ismount(merged):
            _run(["mount", "-t", "overlay", "overlay", "-o",
                  f"lowerdir={rootfs},upperdir={upper},workdir={work}", str(merged)])

    def _write_node_files(self, node: str, upper: Path, rootfs: Path) -> None:
        """Per-node identity, written into the node's own layer before its first boot."""
        from lab.host.ssh import generate_ed25519, record_host_key

        ip = self.context.addresses[node]
        prefix = self.context.subnet.split("/")[1]
        hosts = "\n".join(f"{self.context.addresses[n.name]}\t{n.name}" for n in self.context.nodes)
        private, public = generate_ed25519(f"root@{node}")
        files = {
            "etc/hostname": f"{node}\n",
            "etc/hosts": f"127.0.0.1\tlocalhost\n127.0.1.1\t{node}\n{hosts}\n",
            "etc/machine-id": uuid.uuid4().hex + "\n",
            "etc/systemd/network/10-host0.network":
                f"[Match]\nName=host0\n\n[Network]\nAddress={ip}/{prefix}\nLinkLocalAddressing=no\n"
                "IPv6AcceptRA=no\n",
            "etc/ssh/ssh_host_ed25519_key": private,
            "etc/ssh/ssh_host_ed25519_key.pub": public,
            "root/.ssh/authorized_keys": self.context.ssh_key.with_suffix(".pub").read_text(),
            "etc/lab/node.json": json.dumps({"lab": self.context.spec.name, "lab_id": self.context.lab_id,
                                             "node": node, "ip": ip, "peers": self.context.addresses,
                                             "metadata": self.context.node(node).metadata}) + "\n",
        }
        for relative, text in files.items():
            target = upper / relative
            _mkdirs_like(upper, Path(relative).parent, rootfs)
            target.write_text(text)
            private_file = relative.endswith("_key") or "authorized_keys" in relative
            os.chmod(target, 0o600 if private_file else 0o644)
        record_host_key(self.context.known_hosts, node, ip, public)

    def _nspawn_argv(self, node: str) -> list[str]:
        return ["systemd-nspawn", "--boot", "--register=no", "--keep-unit", "--quiet",
                f"--machine={self.machine(node)}", f"--directory={self.node_dir(node) / 'merged'}",
                "--bind-ro={usr}:/usr",  # /usr read-only, from the slot the node boots (see SUPERVISOR)
                f"--network-bridge={self.bridge}", "--console=read-only",
                "--resolv-conf=off", "--timezone=off", "--link-journal=no"]

    def _spawn(self, node: str, rootfs: Path) -> None:
        directory = self.node_dir(node)
        cgroups = self.cgroups(node)
        for cgroup in cgroups:
            self.state.record("cgroup", str(cgroup))
            cgroup.mkdir(parents=True, exist_ok=True)
        self._freezer(node, "THAWED")
        config = {"argv": self._nspawn_argv(node), "pidfile": str(directory / "nspawn.pid"),
                  "cgroups": [str(c / "cgroup.procs") for c in cgroups],
                  "slots_dir": str(directory), "boot_file": str(directory / "upper" / "etc" / "lab" / "boot.json")}
        (directory / "nspawn.pid").unlink(missing_ok=True)
        # A killed node's old veth lives on while orphaned TCP sockets keep its
        # network namespace alive (up to minutes); nspawn would then fail with
        # "File exists". Deleting one end deletes the pair.
        _delete_link(self.veth(node))
        with open(directory / "console.log", "ab") as log:
            process = subprocess.Popen([sys.executable, "-I", "-S", "-c", SUPERVISOR, json.dumps(config)],
                                       stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                       start_new_session=True, close_fds=True)
        self.state.record("node", node, dir=str(directory), supervisor_pid=process.pid,
                          supervisor_start=_start_time(process.pid))

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
        self._retry_cgroup_races(nodes)

    def _retry_cgroup_races(self, nodes: list[str]) -> None:
        """Start again the units that lost systemd's early-boot race for a cgroup.

        On cgroup-v1 hosts a unit started in the first moments of a container's
        boot now and then fails with "Failed at step CGROUP ... No such file or
        directory" (seen with systemd-sysctl and systemd-tmpfiles-setup-dev);
        started again a moment later it works.
        """
        from lab.host.ssh import run_many

        # Every unit failed at boot gets one more start: a real failure fails
        # again and stays visible; a lost race is gone.
        script = ("for u in $(systemctl list-units --failed --plain --no-legend | awk '{print $1}'); do "
                  "systemctl reset-failed \"$u\"; systemctl restart --no-block \"$u\"; done; true")
        endpoints = self.ssh_endpoints()
        run_many([endpoints[n] for n in nodes], script, timeout=30)

    def _supervisor(self, node: str) -> tuple[int | None, str | None]:
        for res in self.state.find("node", node):
            return res.get("supervisor_pid"), res.get("supervisor_start")
        return None, None

    def _supervisor_alive(self, node: str) -> bool:
        return _alive(*self._supervisor(node))

    def _init_pid(self, node: str) -> int | None:
        if not self._supervisor_alive(node):
            return None
        nspawn = _read(self.node_dir(node) / "nspawn.pid")
        if not nspawn or not nspawn.isdigit():
            return None
        return _container_init(int(nspawn))

    def _require_running(self, node: str) -> int:
        _require_root()
        self.context.node(node)
        init = self._init_pid(node)
        if init is None:
            raise UsageError(f"{node} is not running", hint=f"start it with `lab fault start {node}` or `lab up`")
        return init

    def _freezer(self, node: str, value: str) -> None:
        state_file = self.cgroups(node)[0] / "freezer.state"
        if not state_file.exists():
            if value == "THAWED":
                return
            raise ProviderError(f"{node}: no freezer cgroup", hint="restart the node with `lab up`")
        state_file.write_text(value)
        deadline = time.monotonic() + 10
        while _read(state_file) != value and time.monotonic() < deadline:
            time.sleep(0.02)

    def _stop_cleanly(self, node: str) -> None:
        """SIGTERM to the supervisor: nspawn asks the node's systemd to power off."""
        pid, started = self._supervisor(node)
        self._freezer(node, "THAWED")  # a frozen node cannot shut down
        if _alive(pid, started):
            os.kill(pid, signal.SIGTERM)
            if not self._wait_gone((pid, started), timeout=STOP_TIMEOUT):
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
            pids = self._cgroup_pids(node)
            if _alive(pid, started):
                pids.add(pid)
            if not pids:
                return
            for stray in pids:
                try:
                    os.kill(stray, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.05)
        raise ProviderError(f"{node}: processes survive SIGKILL: {sorted(self._cgroup_pids(node))}")

    def _cgroup_pids(self, node: str) -> set[int]:
        pids: set[int] = set()
        for cgroup in self.cgroups(node):
            if cgroup.is_dir():
                for procs in cgroup.rglob("cgroup.procs"):
                    pids.update(int(p) for p in (_read(procs) or "").split())
        return pids

    @staticmethod
    def _wait_gone(process: tuple[int | None, str | None], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while _alive(*process):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def _teardown_host(self, progress: Progress, keep_files: bool) -> None:
        """Undo host-side resources in reverse order of creation."""
        for res in reversed(list(self.state.resources)):
            kind, ident = res["kind"], res["id"]
            if kind == "mount":
                for mount_point in _mounts_below(Path(ident)):
                    _unmount(mount_point)
                self.state.forget(kind, ident)
            elif kind == "cgroup":
                _remove_cgroup(Path(ident))
                self.state.forget(kind, ident)
            elif kind == "nftables":
                _run(["nft", "delete", "table", "bridge", ident], check=False)
                self.state.forget(kind, ident)
            elif kind == "bridge":
                if _link_exists(ident):
                    _run(["ip", "link", "delete", ident, "type", "bridge"], check=False)
                self.state.forget(kind, ident)
            elif kind == "node":
                _delete_link(self.veth(ident))
                _remove_empty_dir(self.propagate_dir(ident))
                if not keep_files:
                    for mount_point in _mounts_below(Path(res.get("dir", self.node_dir(ident)))):
                        _unmount(mount_point)
                    shutil.rmtree(res.get("dir", self.node_dir(ident)), ignore_errors=True)
                    self.state.forget(kind, ident)
        # Anything mounted below the lab directory that the state missed.
        for mount_point in _mounts_below(self.context.lab_dir):
            _unmount(mount_point)
        for controller in CGROUP_CONTROLLERS:
            base = _cgroup_base(controller)
            for stale in base.glob(f"lab-{self.context.lab_id}-*"):
                _remove_cgroup(stale)
            try:
                base.rmdir()  # shared by all labs: goes when the last one does
            except OSError:
                pass

    def _apply_partition(self, groups: list[list[str]]) -> None:
        """One bridge-family table on the host: traffic between groups is dropped on the lab bridge."""
        addresses = self.context.addresses
        rules = []
        for i, group in enumerate(groups):
            for other in groups[i + 1:]:
                if not group or not other:
                    continue
                a = ", ".join(addresses[n] for n in group)
                b = ", ".join(addresses[n] for n in other)
                rules.append(f"ip saddr {{ {a} }} ip daddr {{ {b} }} drop")
                rules.append(f"ip saddr {{ {b} }} ip daddr {{ {a} }} drop")
                # ARP keeps working; only IP is cut, as with a firewall between racks.
        self.state.record("nftables", self.nft_table)
        script = (f"table bridge {self.nft_table}\ndelete table bridge {self.nft_table}\n"
                  f"table bridge {self.nft_table} {{\n  chain forward {{\n"
                  f"    type filter hook forward priority 0; policy accept;\n"
                  + "".join(f"    {rule}\n" for rule in rules) + "  }\n}\n")
        _run(["nft", "-f", "-"], input=script)


def _require_root() -> None:
    if os.geteuid() != 0:
        raise PrerequisiteError("nspawn nodes are root's: reading their state needs root too",
                                hint="run lab as root (sudo)")


def _mkdirs_like(upper: Path, relative: Path, lower: Path) -> None:
    """Create parents in the upper layer with the lower layer's mode, so /root stays 0700."""
    current_upper, current_lower = upper, lower
    for part in relative.parts:
        current_upper, current_lower = current_upper / part, current_lower / part
        if not current_upper.exists():
            current_upper.mkdir()
            mode = current_lower.stat().st_mode & 0o7777 if current_lower.exists() else 0o755
            os.chmod(current_upper, mode)


def _cgroup_base(controller: str) -> Path:
    """`lab/` below this process's own cgroup, so nodes stay inside whatever
    limits the caller runs under (a CI job's memory cgroup, say)."""
    own = "/"
    for line in _read(Path("/proc/self/cgroup")).splitlines():
        _, controllers, path = line.split(":", 2)
        if controller in controllers.split(","):
            own = path
    return CGROUP_ROOT / controller / own.lstrip("/") / "lab"


def _remove_cgroup(path: Path) -> None:
    if not path.is_dir():
        return
    for child in sorted((p for p in path.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        try:
            child.rmdir()
        except OSError:
            pass
    try:
        path.rmdir()
    except OSError:
        pass
