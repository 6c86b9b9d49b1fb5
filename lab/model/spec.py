"""The lab spec: what `lab.yaml` may say, its defaults, and how it is validated.

Precedence, lowest to highest (documented in the README):
  1. built-in defaults (every key is optional),
  2. `lab.yaml`,
  3. `LAB_*` environment variables,
  4. command-line flags (`--nodes`, `--provider`, `--set key.path=value`, ...).

Every validation error names where the bad value came from (file and line,
variable or flag), the key path, and what was expected.
"""

from __future__ import annotations

import difflib
import ipaddress
import ntpath
import os
import posixpath
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Mapping

from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator,
                      model_validator)
from pydantic_core import PydanticCustomError

from lab.model import yamlsafe
from lab.model.catalog import PROVIDER_CHOICES
from lab.errors import SpecError

SPEC_FILE = "lab.yaml"
ProviderName = Literal[PROVIDER_CHOICES]  # type: ignore[valid-type] # a Literal built from the catalog

# Names become directory names, bridge and machine names and hostnames:
# a strict DNS label keeps them from escaping the lab directory ("../x"),
# and from breaking any of those uses.
_NAME_RE = r"^[a-z][a-z0-9-]{0,23}$"
Name = Annotated[str, Field(pattern=_NAME_RE)]
_NAME_HINT = "a lowercase name of 1-24 letters, digits and '-', starting with a letter (it becomes a directory and host name)"


def _no_bool(value: Any) -> Any:
    # pydantic reads true as 1: `count: yes` would silently mean one node.
    if isinstance(value, bool):
        raise PydanticCustomError("int_type", "Input should be a valid integer")
    return value


Int = Annotated[int, BeforeValidator(_no_bool)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, validate_default=True)


class NodeSpec(_Strict):
    """One node of an explicit `nodes.list`; unset fields inherit from `nodes`."""

    name: Name
    cpus: Int | None = Field(None, ge=1, le=64)
    memory: Int | None = Field(None, ge=256, le=262144, description="MiB")
    metadata: dict[str, str] = Field(default_factory=dict)


# The lab's /24 has room for 244 nodes (.11 up); past 200 a lab is better split over hosts.
MAX_NODES = 200


class Nodes(_Strict):
    count: Int = Field(3, ge=1, le=MAX_NODES, description="number of nodes (ignored when `list` is given)")
    prefix: Name = Field("node", description="nodes are named PREFIX-1 .. PREFIX-N")
    cpus: Int = Field(1, ge=1, le=64)
    memory: Int = Field(1024, ge=256, le=262144, description="MiB per node")
    metadata: dict[str, str] = Field(default_factory=dict, description="scheduler metadata of every node, e.g. role: worker")
    members: list[NodeSpec] | None = Field(None, alias="list", max_length=MAX_NODES,
                                           description="explicit nodes with per-node overrides")

    @field_validator("members")
    @classmethod
    def _unique_names(cls, members: list[NodeSpec] | None) -> list[NodeSpec] | None:
        if members is not None:
            if not members:
                raise ValueError("must list at least one node")
            seen: set[str] = set()
            for member in members:
                if member.name in seen:
                    raise ValueError(f"node name {member.name!r} appears twice")
                seen.add(member.name)
        return members


class Box(_Strict):
    name: Name = Field("labos", description="node OS image (see `lab box list`)")
    version: str = Field("1", pattern=r"^[0-9A-Za-z][0-9A-Za-z._-]{0,31}$")
    vagrant: str | None = Field(
        None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$",
        description="Vagrant providers: boot this box, already added to Vagrant (e.g. debian/bookworm64), "
                    "instead of a Lab OS box; lab installs what it lacks (etcd, python3, nftables) over SSH")
    docker: bool = Field(True, description="with `vagrant`: install Docker (docker.io) on the box too, if it lacks "
                                           "it (Lab OS boxes carry it); minutes under software emulation")
    arch: Literal["auto", "amd64", "arm64"] = Field(
        "auto", description="VM providers: the Lab OS box's architecture; auto: this machine's (an arm64 Mac or "
                            "Linux host gets arm64 boxes). Another machine's is software-emulated (slow)")

    @field_validator("version", mode="before")
    @classmethod
    def _whole_number_as_text(cls, value: Any) -> Any:
        # LAB_BOX_VERSION=2 and `--set box.version=2` are read as YAML, so they
        # arrive as the number 2. A float (1.10) is left to fail: it lost digits.
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


class Network(_Strict):
    subnet: ipaddress.IPv4Network | None = Field(
        None, description="IPv4 subnet of the lab; default: a free /24 chosen per lab so labs never collide")

    @field_validator("subnet", mode="before")
    @classmethod
    def _parse_subnet(cls, value: Any) -> Any:
        if isinstance(value, str):
            try:
                return ipaddress.IPv4Network(value, strict=True)
            except ValueError as exc:
                raise ValueError(f"must be an IPv4 network like 10.77.3.0/24 ({exc})") from None
        return value

    @field_validator("subnet")
    @classmethod
    def _private_and_sized(cls, value: ipaddress.IPv4Network | None) -> ipaddress.IPv4Network | None:
        if value is None:
            return value
        # Python counts loopback, link-local, 0/8 and 240/4 as "private": none of
        # them can carry a lab (the host would route it to itself or nowhere).
        special = ("loopback" if value.is_loopback else "link-local" if value.is_link_local
                   else "multicast" if value.is_multicast
                   else "reserved" if value.is_reserved or value.subnet_of(ipaddress.IPv4Network("0.0.0.0/8")) else None)
        if special:
            raise ValueError(f"{value} is a {special} range; use a private network (10/8, 172.16/12, 192.168/16)")
        if not value.is_private:
            raise ValueError(f"must be a private network (10/8, 172.16/12, 192.168/16), got {value}")
        if value.prefixlen > 26:
            raise ValueError(f"must be /26 or larger to hold the nodes, got /{value.prefixlen}")
        return value


# etcd advises 3 to 7 members: every member more slows each write and each election. Small labs make
# every node a member (the lab is its etcd cluster); a big one keeps 3 members and makes the rest workers.
ALL_MEMBERS_UP_TO = 5
MEMBERS_OF_A_BIG_LAB = 3


def default_members(node_count: int) -> int:
    """How many etcd members a lab of `node_count` nodes has when the spec does not say."""
    return node_count if node_count <= ALL_MEMBERS_UP_TO else MEMBERS_OF_A_BIG_LAB


class Etcd(_Strict):
    heartbeat_ms: Int = Field(100, ge=10, le=5000, description="Raft heartbeat interval")
    election_timeout_ms: Int = Field(1000, ge=50, le=50000, description="Raft election timeout")
    tls: bool = Field(True, description="per-lab CA, TLS and client-certificate auth (false: plain HTTP, open to all)")
    pre_vote: bool = Field(False, description="Raft pre-vote: a member rejoining after a partition does not "
                                              "force an election (off by default in etcd 3.4)")
    members: Int | None = Field(None, ge=1, le=64, description=(
        "how many nodes (the first ones, in node order) are etcd members; the others are workers that reach "
        f"etcd through a local gateway on 127.0.0.1:2379. Default: every node up to {ALL_MEMBERS_UP_TO} nodes, "
        f"else {MEMBERS_OF_A_BIG_LAB}"))

    @model_validator(mode="after")
    def _election_vs_heartbeat(self) -> "Etcd":
        # etcd itself refuses to start below 5x; say so before booting anything.
        if self.election_timeout_ms < 5 * self.heartbeat_ms:
            raise _KeyedValueError(("election_timeout_ms",),
                                   f"must be at least 5x heartbeat_ms ({5 * self.heartbeat_ms}), "
                                   f"got {self.election_timeout_ms}", related=(("heartbeat_ms",),))
        return self


class Updates(_Strict):
    strategy: Literal["etcd-lock", "reboot", "off"] = Field(
        "etcd-lock", description="etcd-lock: reboot holding a lock in etcd; reboot: right away; off: never")
    max_concurrent_reboots: Int = Field(1, ge=1, le=64)
    staging_weight: Int = Field(
        10, ge=1, le=10000,
        description="CPU and I/O weight of writing an update into a node's passive slot (systemd's "
                    "CPUWeight/IOWeight; every other process has 100): low, so the node's applications "
                    "keep their share while it runs")

    @field_validator("strategy", mode="before")
    @classmethod
    def _off_is_not_false(cls, value: Any) -> Any:
        # YAML 1.1 reads a bare `off` as false: `strategy: off` means "off".
        return "off" if value is False else value


class ForwardedPort(_Strict):
    guest: Int = Field(ge=1, le=65535)
    host: Int = Field(ge=1, le=65535)
    node: Name | None = Field(None, description="node to forward to; default: the first node")
    protocol: Literal["tcp", "udp"] = "tcp"


class SyncedFolder(_Strict):
    host: str = Field(min_length=1, description="directory on the host, relative to lab.yaml")
    guest: str = Field(pattern=r"^/", description="absolute path on the node")
    disabled: bool = False
    outside_project: bool = Field(False, description="allow a host directory outside the project "
                                                     "(a checkout must not share /etc or ~ by itself)")

    @model_validator(mode="after")
    def _inside_the_project(self) -> "SyncedFolder":
        # A path is judged as written; symlinks are resolved against the real
        # project directory where the Vagrantfile is rendered.
        if not self.outside_project and not self.disabled and leaves_directory(self.host):
            raise _KeyedValueError(("host",), f"{self.host!r} is outside the project directory; "
                                              "set outside_project: true to share it anyway")
        return self


def leaves_directory(path: str) -> bool:
    """Whether a path (relative to some directory) can name something outside it."""
    normal = posixpath.normpath(path.replace("\\", "/"))
    return (posixpath.isabs(normal) or ntpath.isabs(path) or normal == ".." or normal.startswith("../")
            or path.startswith("~"))


# A remote libvirt host lab accepts: qemu+ssh with a user, a port and an absolute key file at most. Other
# query parameters (command=, netcat=, socket=) run programs or open sockets a checkout names, and a
# relative keyfile= means different files to libvirt (the working directory) and vagrant-libvirt (~/.ssh).
_LIBVIRT_SSH_URI = re.compile(r"qemu\+ssh://(?:(?P<user>[A-Za-z0-9_][A-Za-z0-9_.-]*)@)?(?P<host>[A-Za-z0-9][A-Za-z0-9.-]*)"
                              r"(?::(?P<port>[0-9]{1,5}))?/system(?:\?keyfile=(?P<keyfile>/[A-Za-z0-9_./+-]+))?")


@dataclass(frozen=True)
class RemoteLibvirt:
    """The SSH login a `qemu+ssh://` URI names: libvirt, vagrant-libvirt and lab all log in with it."""

    host: str
    port: int
    user: str | None  # None: the local user's name, as ssh defaults
    keyfile: str | None  # None: the user's own key (ssh's defaults, ~/.ssh/id_*)


def remote_libvirt(uri: str) -> RemoteLibvirt | None:
    """The login of a remote libvirt URI, or None for this host's libvirt (qemu:///system, qemu:///session)."""
    found = _LIBVIRT_SSH_URI.fullmatch(uri)
    if found is None:
        return None
    return RemoteLibvirt(host=found["host"], port=int(found["port"] or 22), user=found["user"],
                         keyfile=found["keyfile"])


class LibvirtOptions(_Strict):
    driver: Literal["auto", "kvm", "qemu"] = Field(
        "auto", description="auto: kvm where a KVM guest boots on this host (checked once per host and box, "
                            "cached), else qemu (software emulation, with etcd timings that suit it); "
                            "kvm or qemu: exactly that")
    uri: str = Field("qemu:///system", description="libvirt connection: qemu:///system, qemu:///session, or "
                                                  "another host's libvirtd over SSH: "
                                                  "qemu+ssh://[user@]host[:port]/system[?keyfile=/abs/path]")

    @field_validator("uri")
    @classmethod
    def _known_transport(cls, value: str) -> str:
        if value in ("qemu:///system", "qemu:///session"):
            return value
        remote = _LIBVIRT_SSH_URI.fullmatch(value)
        if remote and 0 < int(remote["port"] or 22) < 65536:
            return value
        # qemu+tls and the like reach libvirtd but not the VMs: lab reaches those through the SSH login.
        raise ValueError(f"{value!r} is not a libvirt URI lab accepts: use qemu:///system, qemu:///session or "
                         "qemu+ssh://[user@]host[:port]/system (optionally ?keyfile=/absolute/path): lab reaches "
                         "a remote host's VMs through that SSH login")


class VirtualboxOptions(_Strict):
    linked_clone: bool = True
    gui: bool = False


class NspawnOptions(_Strict):
    privileged: bool = Field(False, description="node root is the host's root, no user namespace: needed for "
                                                "podman, privileged containers, modules, device nodes "
                                                "(Docker runs without it)")


class Registry(_Strict):
    """The lab registry every node's Docker pulls through (Docker Distribution on the host)."""

    upstream: str | None = Field(None, description="a registry URL to cache pulls from when the host has "
                                                   "internet (a pull-through cache); default: offline, "
                                                   "serving only the images lab seeded or imported")

    @field_validator("upstream")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"https?://[A-Za-z0-9.-]+(:[0-9]{1,5})?/?", value):
            raise ValueError(f"{value!r} is not a registry URL: use https://HOST[:PORT]")
        return value


class HostEntry(_Strict):
    """One existing machine of `provider: hosts`: how lab first reaches it (it then uses its own key, as root)."""

    address: ipaddress.IPv4Address = Field(description="the host's IPv4 address: etcd's peers and the "
                                                       "partitions address it, lab reaches it there over SSH")
    user: str = Field("root", pattern=r"^[a-z_][a-z0-9_-]{0,31}$",
                      description="who lab logs in as the first time; not root: password-less sudo")
    port: Int = Field(22, ge=1, le=65535)
    key: str | None = Field(None, description="private key for that first login (~ and paths relative to "
                                              "lab.yaml work); default: the user's ~/.ssh/id_ed25519, "
                                              "id_ecdsa or id_rsa")

    @field_validator("address", mode="before")
    @classmethod
    def _address_only(cls, value: Any) -> Any:
        if isinstance(value, str) and not re.fullmatch(r"[0-9.]+", value):
            raise ValueError(f"{value!r} is not an IPv4 address: give the host's address (etcd's peer URLs and "
                             "the partitions' firewall rules name it)")
        return value

    @field_validator("address")
    @classmethod
    def _a_host(cls, value: ipaddress.IPv4Address) -> ipaddress.IPv4Address:
        if value.is_loopback or value.is_multicast or value.is_unspecified or value.is_link_local:
            raise ValueError(f"{value} cannot be another machine's address")
        return value


class JumpHost(_Strict):
    """The bastion `provider: hosts` reaches the hosts through (OpenSSH's ProxyJump): SSH, etcd and a scenario's
    service probe all go through it. Lab changes nothing on it."""

    address: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9.-]{0,252}$",
                         description="the jump host's address or DNS name, as this machine reaches it")
    user: str = Field("root", pattern=r"^[a-z_][a-z0-9_-]{0,31}$", description="who lab logs in as there")
    port: Int = Field(22, ge=1, le=65535)
    key: str | None = Field(None, description="private key for that login (~ and paths relative to lab.yaml "
                                              "work); default: the user's ~/.ssh/id_ed25519, id_ecdsa or id_rsa")


class HostsOptions(_Strict):
    inventory: list[HostEntry] = Field(default_factory=list, max_length=MAX_NODES,
                                       description="provider: hosts: the machines, one node each, in node order")
    jump: JumpHost | None = Field(None, description="reach the hosts through this SSH jump host; default: "
                                                    "directly (their addresses are routable from here)")
    power_cut: bool = Field(False, description="`lab fault kill` reboots the host at once without syncing its "
                                              "disks (sysrq b), a real power cut; default: SIGKILL of lab's "
                                              "services only")


class ProviderOptions(_Strict):
    libvirt: LibvirtOptions = Field(default_factory=LibvirtOptions)
    virtualbox: VirtualboxOptions = Field(default_factory=VirtualboxOptions)
    nspawn: NspawnOptions = Field(default_factory=NspawnOptions)
    hosts: HostsOptions = Field(default_factory=HostsOptions)


class LabSpec(_Strict):
    """Everything `lab.yaml` may say. Every key is optional."""

    name: Name = Field("lab", description="name of the lab; two labs with different names never collide")
    provider: ProviderName = Field("auto", description="auto picks virtualbox, then libvirt, then nspawn")
    box: Box = Field(default_factory=Box)
    nodes: Nodes = Field(default_factory=Nodes)
    network: Network = Field(default_factory=Network)
    etcd: Etcd = Field(default_factory=Etcd)
    updates: Updates = Field(default_factory=Updates)
    forwarded_ports: list[ForwardedPort] = Field(default_factory=list)
    synced_folders: list[SyncedFolder] = Field(default_factory=list)
    providers: ProviderOptions = Field(default_factory=ProviderOptions)
    registry: Registry = Field(default_factory=Registry)

    @model_validator(mode="after")
    def _cross_checks(self) -> "LabSpec":
        if self.provider == "hosts":
            self._one_node_per_host()
        names = {node.name for node in self.node_specs()}
        for index, port in enumerate(self.forwarded_ports):
            if port.node is not None and port.node not in names:
                raise _KeyedValueError(("forwarded_ports", index, "node"),
                                       f"no node named {port.node!r}; nodes are {', '.join(sorted(names))}",
                                       related=(("nodes",),))
        hosts = [(p.host, p.protocol) for p in self.forwarded_ports]
        for index, key in enumerate(hosts):
            if key in hosts[:index]:
                raise _KeyedValueError(("forwarded_ports", index, "host"),
                                       f"host port {key[0]}/{key[1]} is forwarded twice",
                                       related=(("forwarded_ports", hosts.index(key)),))
        return self

    def _one_node_per_host(self) -> None:
        inventory = self.providers.hosts.inventory
        if not inventory:
            raise _KeyedValueError(("providers", "hosts", "inventory"),
                                   "provider: hosts needs the machines to use: list them here "
                                   "(- {address: 192.168.1.21, user: admin, key: ~/.ssh/id_ed25519})",
                                   related=(("provider",),))
        seen: dict[ipaddress.IPv4Address, int] = {}
        for index, entry in enumerate(inventory):
            if entry.address in seen:
                raise _KeyedValueError(("providers", "hosts", "inventory", index, "address"),
                                       f"{entry.address} is listed twice: one node per host",
                                       related=(("providers", "hosts", "inventory", seen[entry.address]),))
            seen[entry.address] = index
        jump = self.providers.hosts.jump
        if jump is not None and jump.address in {str(address) for address in seen}:
            raise _KeyedValueError(("providers", "hosts", "jump", "address"),
                                   f"the jump host {jump.address} is one of the hosts: a partition cuts a host "
                                   "off from the others' addresses, and lab would be cut off with them; give a "
                                   "machine that is not a node", related=(("providers", "hosts", "inventory"),))
        if not self.etcd.tls:
            # etcd on the hosts' own network, open to whoever reaches it; its agents run as root the units
            # etcd holds: plain HTTP would hand every host to anyone on that network.
            raise _KeyedValueError(("etcd", "tls"), "provider: hosts needs etcd.tls: true (etcd listens on the "
                                                    "hosts' own network, and the units in it run as root there)",
                                   related=(("provider",),))
        wanted = len(self.nodes.members) if self.nodes.members is not None else (
            self.nodes.count if "count" in self.nodes.model_fields_set else None)
        if wanted is not None and wanted > len(inventory):
            raise _KeyedValueError(("nodes",), f"{wanted} nodes asked for, but providers.hosts.inventory lists "
                                               f"{len(inventory)} host(s): one node per host",
                                   related=(("providers", "hosts", "inventory"),))
        if self.nodes.members is None and "count" not in self.nodes.model_fields_set:
            self.nodes.count = len(inventory)  # one node per host unless fewer are asked for

    def etcd_member_count(self, node_count: int | None = None) -> int:
        """How many etcd members a lab of this spec has (`node_count`: its nodes, when not the spec's).

        More members than nodes is not an error but every node: a scenario's `nodes:` may shrink the
        count of a spec written for a bigger lab, and the lab it runs on keeps its own nodes anyway.
        """
        count = len(self.node_specs()) if node_count is None else node_count
        return min(count, self.etcd.members) if self.etcd.members is not None else default_members(count)

    def node_specs(self) -> list["ResolvedNode"]:
        """Every node with inherited values filled in, in a stable order."""
        n = self.nodes
        members = n.members or [NodeSpec(name=f"{n.prefix}-{i}") for i in range(1, n.count + 1)]
        return [ResolvedNode(name=m.name, index=i, cpus=m.cpus or n.cpus, memory=m.memory or n.memory,
                             metadata={**n.metadata, **m.metadata})
                for i, m in enumerate(members, start=1)]


@dataclass(frozen=True)
class ResolvedNode:
    name: str
    index: int
    cpus: int
    memory: int
    metadata: dict[str, str] = field(default_factory=dict)


class _KeyedValueError(ValueError):
    """A cross-field error that knows which key it is about."""

    def __init__(self, path: tuple[str | int, ...], message: str,
                 related: tuple[tuple[str | int, ...], ...] = ()) -> None:
        super().__init__(message)
        self.path = path
        self.message = message
        self.related = related  # other keys the check read, relative to the same model


# ---------------------------------------------------------------- loading

@dataclass
class Override:
    """One value from outside lab.yaml, with the name of where it came from."""

    path: tuple[str, ...]
    value: Any
    origin: str  # "LAB_NODES", "--nodes", "--set nodes.count=3"


@dataclass
class LoadedSpec:
    spec: LabSpec
    path: Path  # lab.yaml (it need not exist: defaults then apply)
    exists: bool

    @property
    def project_dir(self) -> Path:
        return self.path.parent


# Shortcuts for the most used keys; any key can be set as LAB_SECTION__KEY.
ENV_SHORTCUTS = {
    "LAB_NAME": ("name",),
    "LAB_PROVIDER": ("provider",),
    "LAB_NODES": ("nodes", "count"),
    "LAB_SUBNET": ("network", "subnet"),
    "LAB_BOX_VERSION": ("box", "version"),
}
ENV_GENERIC_PREFIX = "LAB_SPEC__"


def env_overrides(environ: Mapping[str, str] | None = None) -> list[Override]:
    environ = os.environ if environ is None else environ
    overrides = []
    for var, path in ENV_SHORTCUTS.items():
        if var in environ:
            overrides.append(Override(path, parse_scalar(environ[var]), var))
    for var in sorted(environ):
        if var.startswith(ENV_GENERIC_PREFIX):
            path = tuple(part.lower() for part in var[len(ENV_GENERIC_PREFIX):].split("__") if part)
            overrides.append(Override(path, parse_scalar(environ[var]), var))
    return overrides


def parse_set_option(text: str) -> Override:
    """`--set nodes.count=5` -> Override(("nodes", "count"), 5)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise SpecError(f"--set {text!r}: expected KEY.PATH=VALUE, e.g. --set etcd.tls=true")
    path = tuple(part for part in key.strip().split(".") if part)
    return Override(path, parse_scalar(value), f"--set {text}")


def parse_scalar(text: str) -> Any:
    """Read a flag or variable value as YAML would (`true`, `3`, `[a, b]`), safely."""
    try:
        return yamlsafe.load(text).data if text.strip() else text
    except yamlsafe.YamlError:
        return text


def load_spec(path: Path | str = SPEC_FILE, overrides: list[Override] | None = None,
              *, environ: Mapping[str, str] | None = None) -> LoadedSpec:
    """Read lab.yaml (if present), apply env and flag overrides, validate.

    Raises SpecError with every problem found, each naming file/line or the
    variable/flag it came from, and the key path.
    """
    path = Path(path)
    label = path.name if path.parent == Path(".") else str(path)
    loaded = yamlsafe.LoadedYaml(data={})
    exists = path.is_file()
    if path.exists() and not exists:
        raise SpecError(f"{label}: is not a file", hint="point --file at a lab.yaml")
    if exists:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise SpecError(f"{label}: cannot be read: {exc}") from None
        try:
            loaded = yamlsafe.load(text)
        except yamlsafe.YamlError as exc:
            where = f"{label}:{exc.line}" if exc.line else label
            raise SpecError(f"{where}: {exc.message}", hint="fix the YAML syntax at that line") from None
        if loaded.data is None:
            loaded.data = {}
        if not isinstance(loaded.data, dict):
            raise SpecError(f"{label}:{loaded.line_of(()) or 1}: the top level must be a mapping of keys "
                            f"(name:, nodes:, ...), got {_type_name(loaded.data)}")
    data = loaded.data
    origins: dict[tuple, str] = {}
    for override in [*env_overrides(environ), *(overrides or [])]:
        _apply_override(data, override, origins)
    try:
        spec = LabSpec.model_validate(data)
    except ValidationError as exc:
        problems = [_describe(error, label, loaded, origins) for error in exc.errors()]
        raise SpecError(_join(label, problems)) from None
    except _KeyedValueError as exc:  # pragma: no cover - pydantic wraps it; kept for clarity
        raise SpecError(f"{label}: {_dotted(exc.path)}: {exc.message}") from None
    return LoadedSpec(spec=spec, path=path, exists=exists)


def _apply_override(data: dict, override: Override, origins: dict[tuple, str]) -> None:
    if not override.path:
        raise SpecError(f"{override.origin}: names no key")
    target = data
    for depth, key in enumerate(override.path[:-1]):
        child = target.get(key)
        if child is None:
            child = target[key] = {}
        if not isinstance(child, dict):
            raise SpecError(f"{override.origin}: {_dotted(override.path[:depth + 1])} is not a section")
        target = child
    target[override.path[-1]] = override.value
    origins[override.path] = override.origin


def _join(label: str, problems: list[str]) -> str:
    if len(problems) == 1:
        return problems[0]
    return f"{label} has {len(problems)} problems:\n" + "\n".join(f"  {p}" for p in problems)


def validation_message(exc: ValidationError, label: str, loaded: yamlsafe.LoadedYaml, root: Any,
                       origins: dict[tuple, str] | None = None) -> str:
    """One message for every problem pydantic found in a YAML file validated against `root`."""
    return _join(label, [_describe(error, label, loaded, origins or {}, root) for error in exc.errors()])


def _describe(error: Mapping[str, Any], label: str, loaded: yamlsafe.LoadedYaml,
              origins: dict[tuple, str], root: Any = None) -> str:
    loc = tuple(error["loc"])
    ctx = error.get("ctx") or {}
    original = ctx.get("error")
    related: list[tuple] = []
    if isinstance(original, _KeyedValueError):
        model_loc = loc if loc and loc[-1] != original.path[0] else ()
        loc = model_loc + original.path
        related = [model_loc + path for path in original.related]
        message = original.message
    else:
        message = _explain(error, loc, root or LabSpec)
    origin = next((origins[loc[:end]] for end in range(len(loc), 0, -1) if loc[:end] in origins), None)
    # A cross-field error is also caused by the other keys the check read:
    # name the variables and flags that set them, or the message would blame
    # only lab.yaml (which may not even exist).
    involved = sorted({o for path, o in origins.items() if o != origin
                       and any(path[:len(r)] == r or r[:len(path)] == path for r in related)})
    if involved:
        message += f" (with {', '.join(involved)})"
    if origin:
        return f"{origin}: {_dotted(loc)}: {message}"
    line = loaded.line_of(loc)
    where = f"{label}:{line}" if line else label
    return f"{where}: {_dotted(loc) or 'top level'}: {message}"


def _explain(error: Mapping[str, Any], loc: tuple, root: Any = None) -> str:
    kind = error["type"]
    ctx = error.get("ctx") or {}
    value = error.get("input")
    if kind == "extra_forbidden":
        return f"unknown key{_suggest(loc, root or LabSpec)}"
    if kind == "missing":
        return "is required"
    if kind in ("greater_than_equal", "greater_than"):
        bound = ctx.get("ge", ctx.get("gt"))
        return f"must be at least {bound}, got {value!r}"
    if kind in ("less_than_equal", "less_than"):
        bound = ctx.get("le", ctx.get("lt"))
        return f"must be at most {bound}, got {value!r}"
    if kind in ("int_parsing", "int_type", "int_from_float", "finite_number"):
        return f"must be a whole number, got {value!r}"
    if kind in ("bool_parsing", "bool_type"):
        return f"must be true or false, got {value!r}"
    if kind in ("string_type",):
        return f"must be text, got {_type_name(value)}"
    if kind in ("dict_type", "model_type", "model_attributes_type"):
        return f"must be a mapping of keys, got {_type_name(value)}"
    if kind == "list_type":
        return f"must be a list, got {_type_name(value)}"
    if kind == "literal_error":
        expected = ctx.get("expected", "")
        choices = re.findall(r"'([^']*)'", expected)
        return f"must be one of {expected}, got {value!r}{_closest(value, choices)}"
    if kind == "string_pattern_mismatch":
        if loc and loc[-1] in ("name", "prefix", "node"):
            return f"must be {_NAME_HINT}, got {value!r}"
        if loc and loc[-1] == "guest":
            return f"must be an absolute path, got {value!r}"
        return f"has an invalid format, got {value!r} (expected to match {ctx.get('pattern')})"
    if kind == "string_too_short":
        return "must not be empty"
    if kind == "invalid_key":
        return f"keys must be text, got {value!r}"
    if kind == "value_error":
        return str(error["msg"]).removeprefix("Value error, ")
    return f"{error['msg']}, got {value!r}"


def _suggest(loc: tuple, root: Any = None) -> str:
    model: Any = root or LabSpec
    for key in loc[:-1]:
        if isinstance(key, int):
            continue
        info = model.model_fields.get(key) or next(
            (f for f in model.model_fields.values() if f.alias == key), None)
        if info is None:
            return ""
        model = _inner_model(info.annotation)
        if model is None:
            return ""
    valid = [f.alias or name for name, f in model.model_fields.items()]
    close = _closest(loc[-1], valid)
    return close if close else f" (valid keys: {', '.join(valid)})"


def _inner_model(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _inner_model(arg)
        if found is not None:
            return found
    return None


def _closest(value: Any, choices: list[str]) -> str:
    match = difflib.get_close_matches(str(value), choices, n=1, cutoff=0.6)
    return f"; did you mean {match[0]!r}?" if match else ""


_dotted = yamlsafe.dotted


def _type_name(value: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "text", bool: "true/false", int: "a number",
            float: "a number", type(None): "nothing"}.get(type(value), type(value).__name__)


def json_schema() -> dict[str, Any]:
    schema = LabSpec.model_json_schema(by_alias=True)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "lab.yaml"
    return schema


def default_yaml(name: str = "lab", nodes: int = 3, provider: str = "auto") -> str:
    """The commented lab.yaml that `lab init` writes."""
    return f"""\
# lab.yaml: the lab spec. Every key is optional; these are the defaults.
# Flags (--nodes, --provider, --set key.path=value) and LAB_* variables
# override this file. Editors complete it from `lab spec schema`.
name: {name}
provider: {provider}          # {' | '.join(PROVIDER_CHOICES)}
box:
  name: labos
  version: "1"
  # vagrant: debian/bookworm64   # VMs: a box you already have instead of a Lab OS box
nodes:
  count: {nodes}
  prefix: node            # nodes are node-1, node-2, ...
  cpus: 1
  memory: 1024            # MiB
  # metadata: {{role: worker}}
  # list:                 # explicit nodes instead of count/prefix
  #   - name: node-1
  #     memory: 2048
network: {{}}
  # subnet: 10.77.3.0/24  # default: a free /24 chosen for this lab
etcd:
  heartbeat_ms: 100
  election_timeout_ms: 1000
  tls: true               # false: plain HTTP, etcd open to every local user
  # members: 3            # the first N nodes are etcd members, the others workers reaching etcd through
                          # a local gateway on 127.0.0.1:2379 (default: every node up to 5 nodes, else 3)
updates:
  strategy: etcd-lock     # etcd-lock | reboot | off
  max_concurrent_reboots: 1
forwarded_ports: []
  # - {{guest: 2379, host: 12379, node: node-1}}
synced_folders: []
  # - {{host: ./src, guest: /src}}
providers:
  libvirt:
    driver: auto          # kvm where a KVM guest boots here, else qemu (software emulation)
    # uri: qemu+ssh://admin@kvm-1.lan/system   # VMs on another machine's libvirtd, reached through it
  nspawn:
    privileged: false     # true: node root is host root (podman, privileged containers)
  # hosts:                # provider: hosts: machines you have, one node each (lab installs etcd there)
  #   inventory:
  #     - {{address: 192.168.1.21, user: admin, key: ~/.ssh/id_ed25519}}
  #   jump: {{address: 192.168.1.2, user: admin}}   # reach them through a bastion (ProxyJump)
registry:
  upstream: null          # a registry URL to cache pulls through (needs internet); default: offline
"""
