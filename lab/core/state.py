"""The lab's state on disk: what exists, written before it is created.

`state.json` in the lab directory is rewritten atomically (temp file, fsync,
rename) after every change, so a crash or Ctrl-C at any point leaves a file
that lists everything that may exist. `destroy` walks that list; every
removal is idempotent, so a resource recorded but never created is fine.

A per-lab lock (flock on `lock`) keeps two lab commands from changing the same
lab at once. The lock dies with its process, so a kill -9 never leaves it held.
"""

from __future__ import annotations

import json
import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from lab.errors import StateError
from lab.host.files import write_atomic
from lab.host.locks import holding
from lab.images.cache import is_cached_rootfs

LABS_DIR = ".lab"  # next to lab.yaml: one directory per lab, LABS_DIR/NAME
STATE_FILE = "state.json"
SCHEMA_VERSION = 1


class LabState:
    """A JSON document with a `resources` list and free-form sections.

    Resources are {"kind": ..., "id": ..., ...} records, appended before the
    resource is created and removed after it is gone, in creation order so
    destroy can undo them in reverse.
    """

    def __init__(self, lab_dir: Path, data: dict[str, Any] | None = None) -> None:
        self.lab_dir = lab_dir
        self.data: dict[str, Any] = data or {"version": SCHEMA_VERSION, "resources": []}

    @property
    def path(self) -> Path:
        return self.lab_dir / STATE_FILE

    @classmethod
    def load(cls, lab_dir: Path) -> "LabState | None":
        path = lab_dir / STATE_FILE
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise StateError(f"{path}: cannot be read ({exc})",
                             hint=f"remove {lab_dir} by hand after checking nothing of it runs") from None
        if not isinstance(data, dict):
            raise StateError(f"{path}: not a JSON object", hint=f"remove {lab_dir} by hand after checking nothing "
                                                                 "of it runs")
        if data.get("version") != SCHEMA_VERSION:
            raise StateError(f"{path}: state version {data.get('version')} is not {SCHEMA_VERSION}",
                             hint="destroy the lab with the lab version that created it")
        problems = section_problems(data) + resource_problems(data.get("resources"), lab_dir)
        if problems:
            # A checkout can carry a forged state.json: never act on one that
            # names anything outside this lab.
            raise StateError(f"{path}: refusing to act on a state that is not this lab's:\n  "
                             + "\n  ".join(problems),
                             hint=f"check who wrote {path}; remove the lab's resources by hand, then the file")
        return cls(lab_dir, data)

    def save(self) -> None:
        write_atomic(self.path, json.dumps(self.data, indent=2, sort_keys=True) + "\n")

    def __getitem__(self, key: str) -> Any:
        return self.data[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.data.get(key, default)

    def set(self, key: str, value: Any) -> None:
        self.data[key] = value
        self.save()

    # -- resources

    @property
    def resources(self) -> list[dict[str, Any]]:
        return self.data.setdefault("resources", [])

    def record(self, kind: str, ident: str, **details: Any) -> dict[str, Any]:
        """Record a resource before creating it (updates details if already recorded)."""
        res = self._remember(kind, ident, details)
        self.save()
        return res

    def record_all(self, kind: str, idents: list[str]) -> None:
        """Record several resources of one kind before creating them, in one write of the state (a node's
        cgroups: one write instead of one per hierarchy, which made a 100-node `lab up` write it ~1 500 times)."""
        for ident in idents:
            self._remember(kind, ident, {})
        self.save()

    def _remember(self, kind: str, ident: str, details: dict[str, Any]) -> dict[str, Any]:
        for res in self.resources:
            if res["kind"] == kind and res["id"] == ident:
                res.update(details)
                return res
        res = {"kind": kind, "id": ident, **details}
        self.resources.append(res)
        return res

    def find(self, kind: str, ident: str | None = None) -> list[dict[str, Any]]:
        return [r for r in self.resources if r["kind"] == kind and (ident is None or r["id"] == ident)]

    def forget(self, kind: str, ident: str) -> None:
        self.data["resources"] = [r for r in self.resources if not (r["kind"] == kind and r["id"] == ident)]
        self.save()


# ---------------------------------------------------------------- what a state file may name

# vagrant-libvirt's management network, shared by every Vagrant lab on the host.
SHARED_LIBVIRT_NETWORK = "vagrant-libvirt"
LIBVIRT_POOL = "default"  # the only storage pool vagrant-libvirt (and so lab) puts volumes in
SERVICE_NAMES = ("registry", "dns")  # lab.core.services: what a lab runs on the host for its nodes
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
PACKAGE = re.compile(r"[a-z0-9][a-z0-9+.-]{0,99}(:[a-z0-9]+)?")  # a Debian package name (with :arch)
ResourceRule = Callable[[dict[str, Any], Path, str], "str | None"]


def inside(path: str, root: Path) -> bool:
    """Whether path, with every symlink resolved, lies inside root (itself resolved)."""
    real, base = os.path.realpath(path), os.path.realpath(root)
    return os.path.isabs(path) and os.path.commonpath([real, base]) == base


def _path_inside_lab(key: str) -> ResourceRule:
    def rule(res: dict[str, Any], lab_dir: Path, lab_id: str) -> str | None:
        value = res.get(key)
        return None if isinstance(value, str) and inside(value, lab_dir) else f"{key} {value!r} is outside {lab_dir}"
    return rule


def _named(*patterns: str, key: str = "id") -> ResourceRule:
    def rule(res: dict[str, Any], lab_dir: Path, lab_id: str) -> str | None:
        value = res.get(key)
        wanted = [p.format(id=re.escape(lab_id)) for p in patterns]
        ok = isinstance(value, str) and any(re.fullmatch(w, value) for w in wanted)
        return None if ok else f"{key} {value!r} is not one of this lab's names (lab id {lab_id})"
    return rule


def _node(res: dict[str, Any], lab_dir: Path, lab_id: str) -> str | None:
    if not (isinstance(res.get("id"), str) and NAME.fullmatch(res["id"])):
        return f"node name {res.get('id')!r} is not a node name"
    for key in ("dir", "docker_dir"):
        if key in res and not (isinstance(res[key], str) and inside(res[key], lab_dir)):
            return f"{key} {res[key]!r} is outside {lab_dir}"
    pid = res.get("supervisor_pid")
    if pid is not None and not (isinstance(pid, int) and not isinstance(pid, bool) and pid > 1):
        return f"supervisor_pid {pid!r} is not a process id"
    # A pid alone could name any host process: destroy signals it only when
    # the start time proves it is the supervisor lab started (lab.host.processes.alive).
    start = res.get("supervisor_start")
    if pid is not None and not (start is None or (isinstance(start, str) and start.isdigit())):
        return f"supervisor_start {start!r} is not a process start time"
    return None


def _service(res: dict[str, Any], lab_dir: Path, lab_id: str) -> str | None:
    if res.get("id") not in SERVICE_NAMES:
        return f"{res.get('id')!r} is not a lab service ({', '.join(SERVICE_NAMES)})"
    if not (isinstance(res.get("log"), str) and inside(res["log"], lab_dir)):
        return f"log {res.get('log')!r} is outside {lab_dir}"
    if "records" in res and not _str_map(res["records"]):
        return f"records {res['records']!r} is not a map of names to addresses"
    pid, start = res.get("pid"), res.get("start")
    if pid is not None and not (isinstance(pid, int) and not isinstance(pid, bool) and pid > 1):
        return f"pid {pid!r} is not a process id"
    # As for node supervisors: a pid is signalled only while its start time matches (lab.host.daemons).
    if start is not None and not (isinstance(start, str) and start.isdigit()):
        return f"start {start!r} is not a process start time"
    return None


SNAPSHOTS_DIR = "snapshots"  # lab.core.snapshots: each snapshot is a directory of LAB_DIR/snapshots/


def _snapshot(res: dict[str, Any], lab_dir: Path, lab_id: str) -> str | None:
    name = res.get("id")
    if not (isinstance(name, str) and NAME.fullmatch(name)):
        return f"snapshot name {name!r} is not a snapshot name"
    directory = res.get("dir")
    if not (isinstance(directory, str) and inside(directory, lab_dir)
            and os.path.realpath(directory) == os.path.realpath(lab_dir / SNAPSHOTS_DIR / name)):
        return f"dir {directory!r} is not {lab_dir / SNAPSHOTS_DIR / name}"
    if "created_at" in res and not isinstance(res["created_at"], str):
        return f"created_at {res['created_at']!r} is not a time"
    return None


def _cgroup(res: dict[str, Any], lab_dir: Path, lab_id: str) -> str | None:
    value = res.get("id")
    if not isinstance(value, str) or os.path.normpath(value) != value or not value.startswith("/sys/fs/cgroup/") \
            or not Path(value).name.startswith(f"lab-{lab_id}-"):
        return f"cgroup {value!r} is not one of this lab's cgroups (/sys/fs/cgroup/.../lab-{lab_id}-*)"
    return None


def _host(res: dict[str, Any], lab_dir: Path, lab_id: str) -> str | None:
    """An existing machine lab adopted (provider: hosts): destroy logs in there as root and removes what
    lab installed, so a forged record must not name a package lab never installs (openssh-server, say)."""
    import ipaddress

    from lab.node.layout import LAB_DIRS

    if not (isinstance(res.get("id"), str) and NAME.fullmatch(res["id"])):
        return f"node name {res.get('id')!r} is not a node name"
    try:
        ipaddress.IPv4Address(res.get("address"))
    except ValueError:
        return f"address {res.get('address')!r} is not an IPv4 address"
    # What lab's install brought, dependencies too. Destroy purges only the packages the host's own record
    # (written by the adoption, before installing) names as well: a forged list here removes nothing more.
    installed = res.get("installed", [])
    if not (isinstance(installed, list) and all(isinstance(p, str) and PACKAGE.fullmatch(p) for p in installed)):
        return f"installed {installed!r} is not a list of Debian package names"
    port = res.get("port", 22)
    if not (isinstance(port, int) and not isinstance(port, bool) and 1 <= port <= 65535):
        return f"port {port!r} is not a TCP port"
    preexisting = res.get("preexisting", [])
    if not (isinstance(preexisting, list) and all(p in LAB_DIRS for p in preexisting)):
        return f"preexisting {preexisting!r} names directories lab never writes in (only {', '.join(LAB_DIRS)})"
    return None


def _libvirt_network(res: dict[str, Any], lab_dir: Path, lab_id: str) -> str | None:
    if res.get("shared") is True and res.get("id") == SHARED_LIBVIRT_NETWORK:
        return None
    return _named("lab-{id}")(res, lab_dir, lab_id)


def _str_map(value: Any) -> bool:
    return isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items())


ETCD_FIELDS: dict[str, Callable[[Any], bool]] = {
    "tls": lambda v: isinstance(v, bool),
    "token": lambda v: isinstance(v, str),
    # node -> what it joined ({"cluster": {member: ip}}): read by `lab node add` when it re-runs
    "joined": lambda v: isinstance(v, dict) and all(isinstance(k, str) and isinstance(j, dict)
                                                    and _str_map(j.get("cluster")) for k, j in v.items()),
    "initial_cluster": _str_map,
    # The nodes that are etcd members, in node order; the others are workers (a local etcd gateway).
    # Absent in a lab created before roles existed: every node is a member.
    "members": lambda v: isinstance(v, list) and bool(v) and all(isinstance(n, str) and NAME.fullmatch(n)
                                                                 for n in v),
}

# The sections every lab's state has, with their types: a state file whose
# sections have other types is refused at load, not met as a traceback later.
SECTIONS: dict[str, Callable[[Any], bool]] = {
    "name": lambda v: isinstance(v, str),
    "lab_id": lambda v: isinstance(v, str),
    "provider": lambda v: isinstance(v, str),
    "created_at": lambda v: isinstance(v, str),
    "subnet": lambda v: isinstance(v, str),
    "nodes": lambda v: isinstance(v, list) and all(isinstance(n, str) and NAME.fullmatch(n) for n in v),
    "addresses": lambda v: isinstance(v, dict) and all(isinstance(k, str) and isinstance(a, str)
                                                       for k, a in v.items()),
    "partition": lambda v: v is None or (isinstance(v, list) and all(
        isinstance(g, list) and all(isinstance(n, str) for n in g) for g in v)),
    "etcd": lambda v: isinstance(v, dict) and all(ok(v.get(k)) for k, ok in ETCD_FIELDS.items() if k in v),
    "image": lambda v: isinstance(v, dict) and isinstance(v.get("rootfs"), str)
    and all(isinstance(v.get(k), str) for k in ("name", "version", "key") if k in v),
    "update": lambda v: v is None or isinstance(v, dict),
}


def section_problems(data: dict[str, Any]) -> list[str]:
    import ipaddress

    problems = [f"{key}: {data[key]!r} is not what a lab records there" for key, ok in SECTIONS.items()
                if key in data and not ok(data[key])]
    image = data.get("image")
    if isinstance(image, dict) and isinstance(image.get("rootfs"), str) and not is_cached_rootfs(image["rootfs"]):
        # The overlay's lower layer and /usr of every node: only an image lab built, never a path a checkout names.
        problems.append(f"image.rootfs: {image['rootfs']!r} is not an image in lab's cache")
    if isinstance(data.get("subnet"), str):
        try:
            ipaddress.IPv4Network(data["subnet"])
        except ValueError:
            problems.append(f"subnet: {data['subnet']!r} is not an IPv4 network")
    return problems


# kind -> rule; a kind nobody registered is refused. Providers' kinds are
# listed here (not in the providers) so a state file is checked before any
# provider is even imported.
RESOURCE_RULES: dict[str, ResourceRule] = {
    "node": _node,
    "host": _host,
    "mount": _path_inside_lab("id"),
    "cgroup": _cgroup,
    "service": _service,
    "snapshot": _snapshot,
    "bridge": _named("lab-{id}"),
    "nftables": _named("lab_{id}"),
    "libvirt-network": _libvirt_network,
    "libvirt-domain": _named(r"[a-z0-9][a-z0-9-]*-{id}-[A-Za-z0-9_.-]+"),
    "libvirt-volume": lambda res, lab_dir, lab_id: (
        _named(r"[a-z0-9][a-z0-9-]*-{id}-[A-Za-z0-9_.-]+")(res, lab_dir, lab_id)
        or (None if res.get("pool", LIBVIRT_POOL) == LIBVIRT_POOL else f"pool {res.get('pool')!r} is not {LIBVIRT_POOL}")),
}


def register_resource_kind(kind: str, rule: ResourceRule) -> None:
    """Let a provider outside this list (lab.testing's fake) record resources of its own kind."""
    RESOURCE_RULES[kind] = rule


def resource_problems(resources: Any, lab_dir: Path) -> list[str]:
    from lab.host.network import lab_id as id_of

    if resources is None:
        return []
    if not isinstance(resources, list):
        return ["resources is not a list"]
    lab_id = id_of(lab_dir)
    problems = []
    for index, res in enumerate(resources):
        if not isinstance(res, dict) or not isinstance(res.get("kind"), str):
            problems.append(f"resources[{index}]: not a resource record")
            continue
        rule = RESOURCE_RULES.get(res["kind"])
        problem = f"unknown kind {res['kind']!r}" if rule is None else rule(res, lab_dir, lab_id)
        if problem:
            problems.append(f"resources[{index}] ({res['kind']} {res.get('id')!r}): {problem}")
    return problems


@contextmanager
def lab_lock(lab_dir: Path, command: str, wait: float = 0.0) -> Iterator[None]:
    # The lock lives outside the lab directory, so a command refused for bad
    # input leaves nothing in the project, and destroy can remove the lab
    # directory while holding it.
    from lab.host.network import lab_id
    from lab.host.paths import private_dir, state_home

    locks = private_dir(state_home() / "locks")
    with holding(locks / f"{lab_id(lab_dir)}.lock", f"`lab {command}` (pid {os.getpid()})", wait,
                 busy=lambda holder: StateError(f"lab {lab_dir.name} ({lab_dir}) is busy: {holder} is running on it",
                                                hint="wait for it to finish (or stop it with Ctrl-C), then retry")):
        yield
