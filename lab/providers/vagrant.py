"""Vagrant providers: nodes as VMs of VirtualBox, libvirt, Hyper-V, VMware or Parallels.

The only module of lab that imports `vagrant` (python-vagrant), and only inside
methods, so importing it stays cheap. Every Vagrant provider is the same code
with a different `vagrant_provider`; what differs is how to tell, cheaply,
whether the hypervisor and its Vagrant plugin are there.

How lab drives Vagrant:
- `<lab_dir>/Vagrantfile` is rendered from `Vagrantfile.j2` (lab.render) and
  holds the chosen provider's block only. `up` passes `--provider`; Vagrant
  then records each machine's provider under `.vagrant/machines/NAME/`, so
  later commands need no provider flag, and `status` on a lab that was never
  created answers even on a host that lacks the hypervisor.
- Vagrant runs with `vagrant_environment()`: no version check against
  HashiCorp's servers, no box update checks, no colors, and machines brought
  up one after another (VAGRANT_NO_PARALLEL): parallel `up` is racy with
  vagrant-libvirt's storage pool and with distribution-packaged Vagrant
  (vagrant-libvirt issues #278, #850, #1495).
- Vagrant's output is streamed line by line to the progress callback (from a
  reader thread) and its tail goes into the CommandError when a command fails.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import json
import os
import platform
import re
import shlex
import shutil
import socket
import subprocess
import threading
from collections import deque
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator, TypeVar

from ..errors import CommandError, PrerequisiteError, ProviderError
from ..network import node_addresses
from ..render import VAGRANTFILE, vagrant_box_name, write_vagrantfile
from ..spec import ResolvedNode
from .base import (Availability, LabContext, NodeState, NodeStatus, Progress, Provider, SSHEndpoint,
                   no_progress)

T = TypeVar("T")

VAGRANT_HINT = ("install Vagrant: `apt-get install vagrant` on Debian and Ubuntu, "
                "or the package for your system from Vagrant's downloads page")
LIBVIRT_SOCKETS = (Path("/var/run/libvirt/libvirt-sock"), Path("/var/run/libvirt/virtqemud-sock"))
# Variables that would make Vagrant look at another directory, another
# Vagrantfile, another .vagrant, or a provider other than the lab's.
_FOREIGN_VARIABLES = ("VAGRANT_CWD", "VAGRANT_VAGRANTFILE", "VAGRANT_DOTFILE_PATH", "VAGRANT_DEFAULT_PROVIDER")
_OUTPUT_TAIL_LINES = 200


# ---------------------------------------------------------------- pure helpers

# python-vagrant already turns libvirt's shutoff into poweroff and paused into saved.
_STOPPED_STATES = frozenset({"poweroff", "aborted", "shutoff", "stopped", "off", "not_running"})
_PAUSED_STATES = frozenset({"saved", "paused", "suspended", "frozen", "pmsuspended"})


def node_state(vagrant_state: str | None) -> NodeState:
    """lab's state for a state name from `vagrant status` (any provider)."""
    state = (vagrant_state or "").strip().lower()
    if state == "not_created":
        return NodeState.NOT_CREATED
    if state == "running":
        return NodeState.RUNNING
    if state in _STOPPED_STATES:
        return NodeState.STOPPED
    if state in _PAUSED_STATES:
        return NodeState.PAUSED
    return NodeState.UNKNOWN


@dataclass(frozen=True)
class SSHConfigEntry:
    """One `Host` block of `vagrant ssh-config` output."""

    host: str
    hostname: str | None = None
    port: int | None = None
    user: str | None = None
    identity_files: tuple[str, ...] = ()
    options: dict[str, str] = field(default_factory=dict)  # every other keyword, as written


_SSH_LINE = re.compile(r"^([A-Za-z][A-Za-z0-9]*)(?:\s*=\s*|\s+)(.*)$")


def parse_ssh_config(text: str) -> dict[str, SSHConfigEntry]:
    """Parse `vagrant ssh-config` output into one entry per host name.

    Keywords are case-insensitive and may be separated from their value by
    whitespace or `=`; a value wholly in double quotes (Vagrant quotes
    IdentityFile paths with spaces) is unquoted. As in ssh, the first value
    of a keyword wins, except IdentityFile, which accumulates.
    """
    entries: dict[str, SSHConfigEntry] = {}
    hosts: list[str] = []
    fields: dict[str, Any] = {}

    def flush() -> None:
        for host in hosts:
            entries[host] = SSHConfigEntry(
                host=host, hostname=fields.get("hostname"), port=fields.get("port"), user=fields.get("user"),
                identity_files=tuple(fields.get("identityfile", ())), options=dict(fields.get("options", {})))

    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = _SSH_LINE.match(line)
        if not match:
            continue
        keyword, value = match.group(1), _unquote(match.group(2).strip())
        key = keyword.lower()
        if key == "host":
            flush()
            hosts, fields = value.split(), {}
            continue
        if key == "match":  # vagrant never writes Match; ignore such a block whole
            flush()
            hosts, fields = [], {}
            continue
        if not hosts:
            continue
        if key == "identityfile":
            fields.setdefault("identityfile", []).append(value)
        elif key == "port":
            if "port" not in fields:
                try:
                    fields["port"] = int(value)
                except ValueError:
                    raise ProviderError(f"vagrant ssh-config: Port {value!r} of host {hosts[0]!r} is not a number") from None
        elif key in ("hostname", "user"):
            fields.setdefault(key, value)
        else:
            fields.setdefault("options", {}).setdefault(keyword, value)
    flush()
    return entries


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] == '"' and '"' not in value[1:-1]:
        return value[1:-1]
    return value


def ssh_endpoint(node: str, entry: SSHConfigEntry) -> SSHEndpoint:
    """The endpoint for `node` from its ssh-config entry."""
    missing = [name for name, value in (("HostName", entry.hostname), ("Port", entry.port),
                                        ("User", entry.user)) if value is None]
    if not entry.identity_files:
        missing.append("IdentityFile")
    if missing:
        raise ProviderError(f"vagrant ssh-config for {node!r} gives no {', '.join(missing)}",
                            hint="run `vagrant ssh-config` in the lab directory to see what Vagrant reports")
    return SSHEndpoint(node=node, host=entry.hostname, port=entry.port, user=entry.user,
                       identity_file=Path(entry.identity_files[0]).expanduser(),
                       # Vagrant's own boxes come with no host key lab could pin.
                       known_hosts=None, extra_options=dict(entry.options))


# ---------------------------------------------------------------- host checks (cheap)

def vagrant_environment(provider: str, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment every vagrant command of a lab runs with."""
    env = dict(os.environ if base is None else base)
    for name in _FOREIGN_VARIABLES:
        env.pop(name, None)
    env.update({
        "VAGRANT_CHECKPOINT_DISABLE": "1",        # no version check against HashiCorp's servers
        "VAGRANT_BOX_UPDATE_CHECK_DISABLE": "1",  # boxes are local: no catalog to ask
        "VAGRANT_NO_PARALLEL": "1",               # see the module docstring
        "VAGRANT_NO_COLOR": "1",                  # output goes to progress lines and error tails
        # A preference, not a force: status and destroy still answer where the
        # hypervisor is missing, and created machines keep their own provider.
        "VAGRANT_PREFERRED_PROVIDERS": provider,
    })
    return env


def vagrant_home(environ: dict[str, str] | None = None) -> Path:
    environ = os.environ if environ is None else environ
    value = environ.get("VAGRANT_HOME")
    return Path(value).expanduser() if value else Path.home() / ".vagrant.d"


def _plugin_files(environ: dict[str, str] | None = None) -> list[Path]:
    """Where Vagrant records installed plugins: the user's, then system ones."""
    environ = os.environ if environ is None else environ
    files = [vagrant_home(environ) / "plugins.json"]
    embedded = [environ.get("VAGRANT_INSTALLER_EMBEDDED_DIR"), "/opt/vagrant/embedded",
                "/usr/share/vagrant-plugins",  # Debian's vagrant and vagrant-* packages
                r"C:\HashiCorp\Vagrant\embedded"]
    files += [Path(directory) / "plugins.json" for directory in embedded if directory]
    return files


def plugin_installed(plugin: str, environ: dict[str, str] | None = None) -> bool:
    """Is a Vagrant plugin installed? Reads Vagrant's plugin files instead of
    running `vagrant plugin list`, which takes a second or more."""
    for path in _plugin_files(environ):
        # Debian's vagrant-* packages drop one file per plugin in plugins.d/.
        if (path.parent / "plugins.d" / f"{plugin}.json").is_file():
            return True
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        installed = data.get("installed") if isinstance(data, dict) else None
        if isinstance(installed, dict) and plugin in installed:
            return True
    return False


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


def _which(name: str) -> str | None:
    return shutil.which(name)


def _virtualbox_manage() -> str | None:
    found = _which("VBoxManage")
    if found:
        return found
    # VirtualBox on Windows does not put itself on PATH; Vagrant looks here too.
    for var in ("VBOX_MSI_INSTALL_PATH", "VBOX_INSTALL_PATH"):
        for directory in filter(None, os.environ.get(var, "").split(";")):
            candidate = Path(directory) / "VBoxManage.exe"
            if candidate.is_file():
                return str(candidate)
    return None


# ---------------------------------------------------------------- running vagrant

class _OutputSink:
    """File handles for python-vagrant's `out_cm`/`err_cm` that feed progress.

    Each use opens a pipe; a reader thread splits it into lines, passes each to
    the progress callback and keeps a tail for error messages.
    """

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.lines: deque[str] = deque(maxlen=_OUTPUT_TAIL_LINES)
        self._lock = threading.Lock()

    def text(self) -> str:
        with self._lock:
            return "\n".join(self.lines)

    @contextlib.contextmanager
    def cm(self) -> Iterator[Any]:
        read_fd, write_fd = os.pipe()
        reader = threading.Thread(target=self._pump, args=(read_fd,), daemon=True)
        reader.start()
        writer = os.fdopen(write_fd, "wb")
        try:
            yield writer
        finally:
            writer.close()
            # A grandchild still holding the pipe must not hang lab: give up
            # on the rest of its output after a while.
            reader.join(timeout=5)

    def _pump(self, read_fd: int) -> None:
        with os.fdopen(read_fd, "rb") as reader:
            for raw in reader:
                line = raw.decode("utf-8", "replace").rstrip()
                if not line:
                    continue
                with self._lock:
                    self.lines.append(line)
                    try:
                        self.progress(line)
                    except Exception:  # a broken progress display must not kill the command
                        pass


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
    result = _validate_run(path.parent, provider, [])
    if result.returncode != 0 and parse_vagrant_error(result.stdout)[0] in _NO_PROVIDER_ERRORS:
        result = _validate_run(path.parent, provider, ["--ignore-provider"])
    if result.returncode != 0:
        kind, message = parse_vagrant_error(result.stdout)
        text = message or (result.stdout + result.stderr).strip() or f"exit status {result.returncode}"
        raise ProviderError(f"{path}: vagrant validate failed:\n"
                            + "\n".join("    " + line for line in text.splitlines()),
                            hint="fix the lab spec (or Vagrantfile.j2) so that Vagrant accepts the Vagrantfile")


def _validate_run(directory: Path, provider: str, extra: list[str]) -> subprocess.CompletedProcess:
    vagrant_binary = _which("vagrant")
    if vagrant_binary is None:
        raise PrerequisiteError("vagrant not found", hint=VAGRANT_HINT)
    # python-vagrant's Vagrant.validate() ignores its env=, so run it here.
    command = [vagrant_binary, "validate", "--machine-readable", *extra]
    try:
        return subprocess.run(command, cwd=directory, env=vagrant_environment(provider),
                              stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired as exc:
        raise CommandError(shlex.join(["vagrant", *command[1:]]), where=str(directory), exit_status=None,
                           output=_text(exc.stdout) + _text(exc.stderr)) from None


def parse_vagrant_error(machine_readable: str) -> tuple[str | None, str]:
    """(error class, message) of the `error-exit` line of `--machine-readable` output."""
    for line in machine_readable.splitlines():
        parts = line.split(",", 4)
        if len(parts) == 5 and parts[2] == "error-exit":
            message = parts[4].replace("%!(VAGRANT_COMMA)", ",").replace("\\n", "\n").replace("\\r", "")
            return parts[3], message.strip()
    return None, ""


def _text(data: bytes | str | None) -> str:
    if data is None:
        return ""
    return data.decode("utf-8", "replace") if isinstance(data, bytes) else data


# ---------------------------------------------------------------- providers

class VagrantProvider(Provider):
    """Nodes as Vagrant machines of one Vagrant provider."""

    name: ClassVar[str]
    vagrant_provider: ClassVar[str]
    label: ClassVar[str]  # human name of the hypervisor
    plugin: ClassVar[str | None] = None  # Vagrant plugin the provider needs, if not built in
    plugin_hint: ClassVar[str] = ""
    box_formats: ClassVar[tuple[str, ...]] = ()  # provider directories a box may have

    # -- what the host has (all cheap: no vagrant command runs)

    @classmethod
    def hypervisor_problem(cls) -> tuple[str, str] | None:
        """(reason, hint) if the hypervisor is missing, else None."""
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
        if _which("vagrant") is None:
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

    def preflight(self) -> None:
        problem = self.host_problem(daemon=self.uses_local_daemon()) or self.lab_problem()
        if problem:
            raise PrerequisiteError(problem[0], hint=problem[1])

    def uses_local_daemon(self) -> bool:
        """Does this lab talk to the daemon `daemon_problem` checks?"""
        return True

    def lab_problem(self) -> tuple[str, str] | None:
        """What this lab needs beyond the host: its box, its synced folders."""
        box = vagrant_box_name(self.context.spec)
        if not self.box_installed(box):
            formats = " or ".join(self.box_formats)
            return (f"Vagrant box {box!r} for {formats} is not installed",
                    f"add it from a box file: `vagrant box add {box} PATH/TO/FILE.box` "
                    f"(`vagrant box list` shows the boxes Vagrant has)")
        project_dir = self.context.lab_dir.parent.parent
        for index, folder in enumerate(self.context.spec.synced_folders):
            host = Path(folder.host).expanduser()
            host = host if host.is_absolute() else project_dir / host
            if not folder.disabled and not host.is_dir():
                return (f"synced_folders[{index}].host: {host} is not a directory",
                        "create it, or fix synced_folders in lab.yaml")
        return None

    def box_installed(self, box: str) -> bool:
        # ~/.vagrant.d/boxes/NAME/VERSION/[ARCH/]PROVIDER/ (the ARCH level is Vagrant 2.4's)
        directory = vagrant_home() / "boxes" / box.replace("/", "-VAGRANTSLASH-")
        return any(any(directory.glob(f"*/{fmt}")) or any(directory.glob(f"*/*/{fmt}"))
                   for fmt in self.box_formats)

    # -- running vagrant

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
        if _which("vagrant") is None:
            raise PrerequisiteError("vagrant not found", hint=VAGRANT_HINT)
        if not self.vagrantfile.is_file():
            write_vagrantfile(self.context, self.vagrant_provider)
        import vagrant  # python-vagrant; imported here so `import lab` stays light

        sink = _OutputSink(progress)
        machine = vagrant.Vagrant(root=str(self.context.lab_dir), env=vagrant_environment(self.vagrant_provider),
                                  out_cm=sink.cm, err_cm=sink.cm)
        try:
            return call(machine)
        except subprocess.CalledProcessError as exc:
            command = exc.cmd if isinstance(exc.cmd, str) else shlex.join(
                ["vagrant", *[str(part) for part in exc.cmd[1:]]])
            output = "\n".join(filter(None, [sink.text(), _text(exc.output).rstrip()]))
            raise CommandError(command, where=f"{self.name} lab in {self.context.lab_dir}",
                               exit_status=exc.returncode, output=output,
                               hint=f"run `{command}` in {self.context.lab_dir} to see Vagrant's whole output") from None
        except OSError as exc:
            raise ProviderError(f"cannot run vagrant in {self.context.lab_dir}: {exc}") from None

    # -- lifecycle

    def up(self, progress: Progress = no_progress) -> None:
        write_vagrantfile(self.context, self.vagrant_provider)
        progress(f"vagrant up --provider={self.vagrant_provider} ({len(self.context.nodes)} nodes)")
        # `vagrant up` returns once every machine answers SSH.
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
        statuses = []
        for node in nodes:
            entry = found.get(node.name)
            if entry is None:
                statuses.append(self._status(node.name, NodeState.NOT_CREATED, "not in the Vagrantfile"))
            elif entry.state == "not_created":
                statuses.append(self._status(node.name, NodeState.NOT_CREATED, "not created"))
            else:
                statuses.append(self._status(node.name, node_state(entry.state),
                                             f"{entry.provider or self.vagrant_provider}: {entry.state}"))
        return statuses

    def _status(self, node: str, state: NodeState, detail: str) -> NodeStatus:
        return NodeStatus(name=node, state=state, ip=self.context.addresses.get(node), detail=detail)

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
            self._run(lambda v: v.destroy(), progress)
            remaining = self.machines_on_disk()
            if remaining:
                raise ProviderError(f"vagrant destroy left machines behind: {', '.join(sorted(remaining))}",
                                    hint=f"check `vagrant global-status`, then run `vagrant destroy -f` "
                                         f"in {self.context.lab_dir}")
        shutil.rmtree(self.dotdir, ignore_errors=True)
        self.vagrantfile.unlink(missing_ok=True)

    def stage_update(self, node: str, rootfs: Path) -> str:
        raise ProviderError("A/B OS updates are implemented for nspawn nodes only so far",
                            hint="run `lab update` on an nspawn lab")

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
        try:
            text = self._run(lambda v: v.ssh_config())
        except CommandError:
            # `vagrant ssh-config` stops at the first machine not running: ask
            # for the running ones by name instead.
            running = [s.name for s in self.status() if s.state is NodeState.RUNNING]
            text = "\n".join(self._run(lambda v, name=name: v.ssh_config(vm_name=name)) for name in running)
        entries = parse_ssh_config(text)
        return {node.name: ssh_endpoint(node.name, entries[node.name])
                for node in self.context.nodes if node.name in entries}

    # -- faults

    def reboot(self, node: str, progress: Progress = no_progress) -> None:
        self._require_created(node, "reboot")
        self._run(lambda v: v.reload(vm_name=node, provision=False), progress)

    def kill(self, node: str) -> None:
        self._require_created(node, "kill")
        self._run(lambda v: v.halt(vm_name=node, force=True))

    def start(self, node: str, progress: Progress = no_progress) -> None:
        self.context.node(node)
        self._run(lambda v: v.up(vm_name=node, provider=self.vagrant_provider, provision=False), progress)

    def pause(self, node: str) -> None:
        self._require_created(node, "pause")
        self._run(lambda v: v.suspend(vm_name=node))

    def resume(self, node: str) -> None:
        self._require_created(node, "resume")
        self._run(lambda v: v.resume(vm_name=node))

    def _require_created(self, node: str, action: str) -> None:
        # Vagrant answers a fault on a machine it never made with a note and
        # exit status 0; a scenario must not believe the fault happened.
        self.context.node(node)
        if node not in self.machines_on_disk():
            raise ProviderError(f"cannot {action} {node}: Vagrant has not created it in {self.context.lab_dir}",
                                hint="run `lab up` first")

    def partition(self, groups: list[list[str]]) -> None:
        raise ProviderError("partition on Vagrant VMs is not implemented yet",
                            hint="use the nspawn provider for partition faults (`--provider nspawn`)")

    def heal(self) -> None:
        raise ProviderError("heal on Vagrant VMs is not implemented yet",
                            hint="use the nspawn provider for partition faults (`--provider nspawn`)")

    # -- checks

    def validate(self) -> None:
        """Render this lab's Vagrantfile and have `vagrant validate` check it."""
        validate(self.context, self.vagrant_provider)


class VirtualboxProvider(VagrantProvider):
    name = "virtualbox"
    vagrant_provider = "virtualbox"
    label = "VirtualBox"
    box_formats = ("virtualbox",)

    @classmethod
    def hypervisor_problem(cls) -> tuple[str, str] | None:
        if _virtualbox_manage() is None:
            return "VBoxManage not found", "install VirtualBox from virtualbox.org (it is not in Debian)"
        return None


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

    def lab_problem(self) -> tuple[str, str] | None:
        if self.context.spec.providers.libvirt.driver == "kvm" and not Path("/dev/kvm").exists():
            return ("providers.libvirt.driver is kvm but /dev/kvm does not exist",
                    "set providers.libvirt.driver: qemu (software emulation, slow) or enable KVM on this host")
        return super().lab_problem()


class HypervProvider(VagrantProvider):
    name = "hyperv"
    vagrant_provider = "hyperv"
    label = "Hyper-V"
    box_formats = ("hyperv",)

    @classmethod
    def hypervisor_problem(cls) -> tuple[str, str] | None:
        if platform.system() != "Windows":
            return "Hyper-V only runs on Windows", "choose another provider on this host"
        return None


class VmwareDesktopProvider(VagrantProvider):
    name = "vmware_desktop"
    vagrant_provider = "vmware_desktop"
    label = "VMware"
    plugin = "vagrant-vmware-desktop"
    plugin_hint = ("`vagrant plugin install vagrant-vmware-desktop` "
                   "and install the Vagrant VMware Utility")
    box_formats = ("vmware_desktop", "vmware_workstation", "vmware_fusion")

    @classmethod
    def hypervisor_problem(cls) -> tuple[str, str] | None:
        if _which("vmrun") is None:
            return "vmrun not found", "install VMware Workstation or Fusion and put vmrun on PATH"
        return None


class ParallelsProvider(VagrantProvider):
    name = "parallels"
    vagrant_provider = "parallels"
    label = "Parallels Desktop"
    plugin = "vagrant-parallels"
    plugin_hint = "`vagrant plugin install vagrant-parallels`"
    box_formats = ("parallels",)

    @classmethod
    def hypervisor_problem(cls) -> tuple[str, str] | None:
        if _which("prlctl") is None:
            return "prlctl not found", "install Parallels Desktop (Pro or Business edition)"
        return None
