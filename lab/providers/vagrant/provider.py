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
  HashiCorp's servers, no box update checks, no colors. Machines boot in
  parallel where that is safe: vagrant-libvirt does it itself in one
  process (its box upload and storage pool setup hold a lock); Vagrant's
  VirtualBox provider cannot (`--parallel` is refused), so lab runs one
  `vagrant up NODE` per node at once after the first (see
  `up_concurrently`). Other providers boot one after another.
- After `vagrant up`, lab *adopts* each machine over Vagrant's own SSH
  access (user vagrant, the key Vagrant inserted): it authorizes the lab's
  own key for root, pins the machine's host key in the lab's known_hosts and,
  on a generic box, installs what lab needs (etcd, python3, nftables).
  From then on everything (bootstrap, scenarios, testinfra, `lab ssh`) goes
  to root@PRIVATE-IP with host keys verified, exactly as on nspawn nodes, and
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

import contextlib
import errno
import ipaddress
import json
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator, TypeVar

from lab.errors import CommandError, PrerequisiteError, ProviderError
from lab.host.network import node_addresses
from lab.providers.vagrant.render import VAGRANTFILE, libvirt_network_name, machine_prefix, vagrant_box_name, write_vagrantfile
from lab.model.spec import ResolvedNode
from lab.providers.base import (Availability, LabContext, NodeState, NodeStatus, Progress, Provider, SSHEndpoint,
                   no_progress)

T = TypeVar("T")

VAGRANT_HINT = ("install Vagrant: `apt-get install vagrant` on Debian and Ubuntu, "
                "or the package for your system from Vagrant's downloads page")
LIBVIRT_SOCKETS = (Path("/var/run/libvirt/libvirt-sock"), Path("/var/run/libvirt/virtqemud-sock"))
# Variables that would make Vagrant look at another directory, another
# Vagrantfile, another .vagrant, or a provider other than the lab's.
_FOREIGN_VARIABLES = ("VAGRANT_CWD", "VAGRANT_VAGRANTFILE", "VAGRANT_DOTFILE_PATH", "VAGRANT_DEFAULT_PROVIDER")
_OUTPUT_TAIL_LINES = 200
# Software-emulated VMs (QEMU without KVM) take a minute or more to boot.
VM_BOOT_TIMEOUT = 300.0
# Adoption may install packages on a generic box (apt-get over the VM's NAT).
ADOPT_TIMEOUT = 900.0
BOOT_ID_PATH = "/proc/sys/kernel/random/boot_id"
PARTITION_TABLE = "lab_partition"


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


# What lab needs on a node, by command, and the Debian/Ubuntu package that brings it.
NODE_COMMANDS = {"python3": "python3", "nft": "nftables", "etcd": "etcd-server", "etcdctl": "etcd-client"}


def adoption_script(public_key: str, hostname: str) -> str:
    """Shell run as root on a fresh machine: lab's key for root, its hostname, missing tools, the host key.

    Prints `lab-installed PKG...` when it had to install packages (a generic
    box), and always `lab-host-key TYPE DATA` last. The hostname is set here
    rather than by Vagrant (`config.vm.hostname`), whose Debian way ends in a
    restart of the guest's networking: ~12 s per VM under software emulation.
    """
    key = shlex.quote(public_key)
    name = shlex.quote(hostname)
    checks = "\n".join(f"command -v {cmd} >/dev/null 2>&1 || missing=\"$missing {pkg}\""
                       for cmd, pkg in NODE_COMMANDS.items())
    return f"""set -e
install -d -m 0700 /root/.ssh
touch /root/.ssh/authorized_keys
chmod 0600 /root/.ssh/authorized_keys
grep -qxF {key} /root/.ssh/authorized_keys || printf '%s\\n' {key} >> /root/.ssh/authorized_keys
printf '%s\\n' {name} > /etc/hostname
hostname {name}
touch /etc/hosts
sed -i '/^127\\.0\\.1\\.1[[:space:]]/d' /etc/hosts
[ -z "$(tail -c 1 /etc/hosts)" ] || echo >> /etc/hosts
printf '127.0.1.1\\t%s\\n' {name} >> /etc/hosts
missing=""
{checks}
if [ -n "$missing" ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq --no-install-recommends $missing >/dev/null
  # Debian's etcd-server starts a default single-member etcd; lab configures its own.
  case "$missing" in *etcd-server*) systemctl disable --now etcd >/dev/null 2>&1 || true ;; esac
  echo "lab-installed$missing"
fi
test -f /etc/ssh/ssh_host_ed25519_key.pub || ssh-keygen -A >/dev/null
echo "lab-host-key $(cat /etc/ssh/ssh_host_ed25519_key.pub)"
"""


def parse_adoption_output(stdout: str, node: str) -> str:
    """`TYPE DATA` of the host key the adoption script printed."""
    for line in reversed(stdout.splitlines()):
        words = line.split()
        if len(words) >= 3 and words[0] == "lab-host-key":
            return f"{words[1]} {words[2]}"
    raise ProviderError(f"{node}: adoption printed no host key", hint="is /etc/ssh/ssh_host_ed25519_key.pub there?")


def partition_scripts(groups: list[list[str]], addresses: dict[str, str]) -> dict[str, str]:
    """An `nft -f` script per node: drop IP to and from every node of the other groups.

    Every node gets one: a node in no group (or alone with nobody to cut off)
    has its table removed, so a new partition replaces the last one whole.
    Only the lab's node addresses are dropped: the host (and lab's SSH) still
    reach every node, as with a firewall between racks.
    """
    group_of = {node: index for index, group in enumerate(groups) for node in group}
    scripts = {}
    for node in addresses:
        reset = f"table inet {PARTITION_TABLE}\ndelete table inet {PARTITION_TABLE}\n"
        if node not in group_of:
            scripts[node] = reset
            continue
        others = sorted((addresses[other] for other, index in group_of.items() if index != group_of[node]),
                        key=lambda ip: tuple(int(part) for part in ip.split(".")))
        if not others:
            scripts[node] = reset
            continue
        peers = ", ".join(others)
        scripts[node] = (reset + f"table inet {PARTITION_TABLE} {{\n"
                         f"  chain input {{ type filter hook input priority 0; policy accept; "
                         f"ip saddr {{ {peers} }} drop; }}\n"
                         f"  chain output {{ type filter hook output priority 0; policy accept; "
                         f"ip daddr {{ {peers} }} drop; }}\n}}\n")
    return scripts


def up_concurrently(nodes: list[str], up_one: Callable[[str], None], *, first_alone: bool,
                    progress: Progress = no_progress) -> None:
    """Bring machines up at once, for providers whose `vagrant up` cannot.

    With linked clones the first `vagrant up` imports the box and makes the
    master VM every clone is taken from, so it runs alone; then one
    `vagrant up NODE` per remaining node, all at once (each its own Vagrant
    process: Vagrant locks per machine, not per project). Every node's
    failure is reported, not just the first; nodes that did come up stay up
    (the caller's rollback removes them).
    """
    failures: dict[str, str] = {}

    def attempt(node: str) -> None:
        try:
            up_one(node)
        except (CommandError, ProviderError) as exc:
            failures[node] = exc.message

    waves = [nodes[:1], nodes[1:]] if first_alone else [nodes]
    for wave in waves:
        if not wave:
            continue
        if len(wave) > 1:
            progress(f"vagrant up {' '.join(wave)}: {len(wave)} at once")
        with ThreadPoolExecutor(max_workers=len(wave)) as pool:
            list(pool.map(attempt, wave))
        if failures:
            break  # the master clone failed: the rest would fail the same way
    if failures:
        raise ProviderError(f"{len(failures)} of {len(nodes)} machines did not come up:\n"
                            + "\n".join(f"  {node}: {why}" for node, why in failures.items()),
                            hint="see each node's Vagrant output above; `lab destroy` removes what was made")


# ---------------------------------------------------------------- host checks (cheap)

# Providers whose `vagrant up` boots machines in parallel by itself, safely.
_NATIVE_PARALLEL = frozenset({"libvirt"})


def vagrant_environment(provider: str, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment every vagrant command of a lab runs with."""
    env = dict(os.environ if base is None else base)
    for name in _FOREIGN_VARIABLES:
        env.pop(name, None)
    if provider not in _NATIVE_PARALLEL:
        env["VAGRANT_NO_PARALLEL"] = "1"  # see the module docstring
    else:
        env.pop("VAGRANT_NO_PARALLEL", None)
    env.update({
        "VAGRANT_CHECKPOINT_DISABLE": "1",        # no version check against HashiCorp's servers
        "VAGRANT_BOX_UPDATE_CHECK_DISABLE": "1",  # boxes are local: no catalog to ask
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


def added_box_dirs(box: str, provider: str, version: str = "*") -> list[Path]:
    """Where Vagrant keeps an added box for a provider: ~/.vagrant.d/boxes/NAME/VERSION/[ARCH/]PROVIDER
    (the ARCH level is Vagrant 2.4's); none when it is not added."""
    directory = vagrant_home() / "boxes" / box.replace("/", "-VAGRANTSLASH-")
    return [path for pattern in (f"{version}/{provider}", f"{version}/*/{provider}")
            for path in sorted(directory.glob(pattern)) if path.is_dir()]


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

    @classmethod
    def lab_boxes_added(cls) -> bool:
        """Has any Lab OS box (lab-NAME-VERSION) of this provider's format been added to Vagrant?"""
        return any(added_box_dirs(directory.name, fmt)
                   for directory in (vagrant_home() / "boxes").glob("lab-*") for fmt in cls.box_formats)

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
            from lab.images.vagrantbox import box_options

            if self.context.spec.box.vagrant:
                # Only an owner/name is a catalog name; anything else needs a file.
                from_catalog = f"`vagrant box add {box} --provider {self.box_formats[0]}` (or a file: " \
                    if "/" in box else "("
                hint = (f"add it to Vagrant first: {from_catalog}`vagrant box add --name {box} FILE.box`), "
                        f"or drop box.vagrant to use a Lab OS box")
            elif self.name in ("libvirt", "virtualbox"):
                options = box_options(self.context.spec.box.name, self.context.spec.box.version)
                hint = (f"build it and add it to Vagrant: `lab box add --format {self.name}{options}` "
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
        nodes = [node.name for node in self.context.nodes]
        started = time.monotonic()
        self._vagrant_up(nodes, progress)
        progress(f"{len(nodes)} machine(s) booted by Vagrant in {time.monotonic() - started:.0f} s; adopting them")
        self._adopt(nodes, progress)

    def _vagrant_up(self, nodes: list[str], progress: Progress) -> None:
        """`vagrant up` returns once every machine answers SSH (as Vagrant's user)."""
        progress(f"vagrant up --provider={self.vagrant_provider} ({len(nodes)} nodes"
                 f"{', in parallel' if self.vagrant_provider in _NATIVE_PARALLEL else ''})")
        self._run(lambda v: v.up(provider=self.vagrant_provider, provision=False), progress)

    def _adopt(self, nodes: list[str], progress: Progress) -> None:
        """Authorize the lab's key for root on each machine, pin its host key, install what lab needs."""
        from lab.host.ssh import record_host_key
        from lab.host.ssh import run as ssh_run

        vagrant_endpoints = self.vagrant_ssh_endpoints()
        public_key = self.context.ssh_key.with_suffix(".pub").read_text().strip()

        def adopt(node: str) -> str:
            endpoint = vagrant_endpoints.get(node)
            if endpoint is None:
                raise ProviderError(f"{node}: `vagrant ssh-config` does not list it",
                                    hint=f"run `vagrant status` in {self.context.lab_dir}")
            script = adoption_script(public_key, node)
            result = ssh_run(endpoint, f"sudo -n sh -c {shlex.quote(script)}", timeout=ADOPT_TIMEOUT, check=True)
            host_key = parse_adoption_output(result.stdout, node)
            installed = [line.split(None, 1)[1] for line in result.stdout.splitlines()
                         if line.startswith("lab-installed ")]
            if installed:
                progress(f"{node}: installed {', '.join(installed)} (a generic box)")
            return host_key

        with ThreadPoolExecutor(max_workers=max(1, len(nodes))) as pool:
            host_keys = dict(zip(nodes, pool.map(adopt, nodes)))
        for node, host_key in host_keys.items():
            record_host_key(self.context.known_hosts, node, self.context.addresses[node], host_key)
        progress(f"adopted {', '.join(nodes)}: root@private address with the lab's key, host keys pinned")

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
        from lab.host.ssh import run_many

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
        # Adopted machines: root on the private network, host keys pinned (see `_adopt`).
        return {node.name: SSHEndpoint(node=node.name, host=self.context.addresses[node.name], port=22,
                                       user="root", identity_file=self.context.ssh_key,
                                       known_hosts=self.context.known_hosts)
                for node in self.context.nodes}

    def vagrant_ssh_endpoints(self) -> dict[str, SSHEndpoint]:
        """Vagrant's own way in (user vagrant), for adoption and diagnosis."""
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

    # -- faults: the hypervisor where a provider class knows a fast way, else Vagrant

    def reboot(self, node: str, progress: Progress = no_progress) -> None:
        """A clean reboot from inside the guest; returns once it answers SSH with a new boot id."""
        from lab.host.ssh import run as ssh_run
        from lab.host.ssh import wait_for_ssh

        self._require_created(node, "reboot")
        endpoint = self.ssh_endpoints()[node]
        old_boot = ssh_run(endpoint, f"cat {BOOT_ID_PATH}", timeout=30, check=True).stdout.strip()
        # The connection may drop before systemctl answers: that is the reboot working.
        with contextlib.suppress(ProviderError):
            ssh_run(endpoint, "systemctl reboot", timeout=30)
        deadline = time.monotonic() + VM_BOOT_TIMEOUT
        while time.monotonic() < deadline:
            wait_for_ssh(endpoint, deadline)
            with contextlib.suppress(ProviderError):
                new_boot = ssh_run(endpoint, f"cat {BOOT_ID_PATH}", timeout=10).stdout.strip()
                if new_boot and new_boot != old_boot:
                    self._reapply_partition(node)
                    progress(f"{node} rebooted")
                    return
            time.sleep(1)
        raise ProviderError(f"{node}: did not come back from a reboot within {VM_BOOT_TIMEOUT:.0f} s",
                            hint="look at the machine's console (virt-manager, VirtualBox GUI) or `lab status`")

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
        from lab.host.ssh import wait_for_ssh

        wait_for_ssh(self.ssh_endpoints()[node], time.monotonic() + VM_BOOT_TIMEOUT, poll=0.5)

    def _require_created(self, node: str, action: str) -> None:
        # Vagrant answers a fault on a machine it never made with a note and
        # exit status 0; a scenario must not believe the fault happened.
        self.context.node(node)
        if node not in self.machines_on_disk():
            raise ProviderError(f"cannot {action} {node}: Vagrant has not created it in {self.context.lab_dir}",
                                hint="run `lab up` first")

    def partition(self, groups: list[list[str]]) -> None:
        """nftables inside every guest of a group: drop all IP traffic to and from the other groups."""
        from lab.errors import UsageError

        names = [n for group in groups for n in group]
        for name in names:
            self.context.node(name)
        if len(set(names)) != len(names):
            raise UsageError("a node appears in two partition groups", hint="list every node at most once")
        self.context.state.set("partition", groups)
        scripts = partition_scripts(groups, self.context.addresses)
        failures = self._run_on_guests({node: f"nft -f - <<'LAB_EOF'\n{script}LAB_EOF"
                                        for node, script in scripts.items()})
        if failures:
            raise ProviderError("partition not applied on " + "; ".join(failures),
                                hint="check the nodes are running (`lab status`), then `lab fault heal`")

    def heal(self) -> None:
        self.context.state.set("partition", None)
        # A node that is down or paused cannot be reached now: a down one
        # loses its rules with its next boot, a paused one is healed when it
        # is resumed (`_reapply_partition`).
        failures = self._run_on_guests({node.name: f"nft delete table inet {PARTITION_TABLE} 2>/dev/null; true"
                                        for node in self.context.nodes})
        self.context.state.set("partition_stale", sorted(f.split(":", 1)[0] for f in failures))

    def _reapply_partition(self, node: str) -> None:
        """A node back from a power cycle or a pause gets the lab's current partition again.

        The rules live in the guest's kernel: a reboot or a kill drops them,
        while the lab's state still says partitioned (nspawn's live on the
        host and need none of this); a node that was paused during `heal`
        still has the old ones.
        """
        state = self.context.state
        if state is None:
            return
        groups = state.get("partition") or []
        stale = list(state.get("partition_stale") or [])
        if not groups and node not in stale:
            return
        script = partition_scripts(groups, self.context.addresses)[node]
        failures = self._run_on_guests({node: f"nft -f - <<'LAB_EOF'\n{script}LAB_EOF"})
        if failures:
            raise ProviderError("partition not restored on " + "; ".join(failures),
                                hint="`lab fault heal` or `lab fault partition ...` once the node answers")
        if node in stale:
            state.set("partition_stale", [n for n in stale if n != node])

    def _run_on_guests(self, commands: dict[str, str]) -> list[str]:
        """Run one command per node as root, in parallel; returns 'node: why' for each failure."""
        from lab.host.ssh import run as ssh_run

        endpoints = self.ssh_endpoints()

        def one(node: str) -> str | None:
            try:
                result = ssh_run(endpoints[node], commands[node], timeout=20)
            except ProviderError as exc:
                return f"{node}: {exc.message}"
            return None if result.ok else f"{node}: exit {result.exit_status}: {(result.stdout + result.stderr).strip()}"

        with ThreadPoolExecutor(max_workers=max(1, len(commands))) as pool:
            return [failure for failure in pool.map(one, list(commands)) if failure]

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

    def _vagrant_up(self, nodes: list[str], progress: Progress) -> None:
        # `vagrant up --parallel` is refused by the VirtualBox provider: one
        # process per node instead (see up_concurrently).
        up_concurrently(nodes, lambda node: self._run(
            lambda v: v.up(vm_name=node, provider=self.vagrant_provider, provision=False),
            lambda line, node=node: progress(f"{node}: {line}")),
            first_alone=self.context.spec.providers.virtualbox.linked_clone, progress=progress)

    def _vboxmanage(self, *args: str) -> None:
        binary = _virtualbox_manage()
        if binary is None:
            raise PrerequisiteError("VBoxManage not found", hint="install VirtualBox from virtualbox.org")
        try:
            result = subprocess.run([binary, *args], capture_output=True, text=True, errors="replace",
                                    stdin=subprocess.DEVNULL, timeout=60)
        except subprocess.TimeoutExpired as exc:
            raise CommandError(shlex.join(["VBoxManage", *args]), where=f"{self.name} lab {self.context.spec.name}",
                               exit_status=None, output=_text(exc.stdout) + _text(exc.stderr)) from None
        if result.returncode != 0:
            raise CommandError(shlex.join(["VBoxManage", *args]), where=f"{self.name} lab {self.context.spec.name}",
                               exit_status=result.returncode, output=result.stdout + result.stderr)

    def kill(self, node: str) -> None:
        self._require_created(node, "kill")
        self._vboxmanage("controlvm", self.machine_name(node), "poweroff")

    def pause(self, node: str) -> None:
        self._require_created(node, "pause")
        self._vboxmanage("controlvm", self.machine_name(node), "pause")

    def resume(self, node: str) -> None:
        self._require_created(node, "resume")
        self._vboxmanage("controlvm", self.machine_name(node), "resume")
        self._reapply_partition(node)


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
        from lab.images.vagrantbox import current_libvirt_volume, remove_stale_libvirt_volumes

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

    def _virsh(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        if _which("virsh") is None:
            raise PrerequisiteError("virsh not found", hint="apt-get install libvirt-clients")
        argv = ["virsh", "-q", "-c", self.context.spec.providers.libvirt.uri, *args]
        try:
            result = subprocess.run(argv, capture_output=True, text=True, errors="replace",
                                    stdin=subprocess.DEVNULL, timeout=120)
        except subprocess.TimeoutExpired as exc:
            raise CommandError(shlex.join(argv), where=f"libvirt lab {self.context.spec.name}", exit_status=None,
                               output=_text(exc.stdout) + _text(exc.stderr),
                               hint="libvirtd is not answering: restart it and run the command again") from None
        if check and result.returncode != 0:
            raise CommandError(shlex.join(argv), where=f"libvirt lab {self.context.spec.name}",
                               exit_status=result.returncode, output=result.stdout + result.stderr)
        return result

    def _domain_state(self, node: str) -> str | None:
        """virsh's state of the node's domain (running, paused, shut off), or None if there is none."""
        result = self._virsh("domstate", self.machine_name(node), check=False)
        return result.stdout.strip() if result.returncode == 0 else None

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
            if self._virsh(*exists, check=False).returncode == 0:
                progress(f"removing leftover {what}")
                for removal in removals:
                    self._virsh(*removal, check=False)
            if self._virsh(*exists, check=False).returncode == 0:
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
