"""Per-node cgroups: each node in its own cgroup in every hierarchy the host has.

The supervisor joins them before it starts systemd-nspawn (`--keep-unit`
keeps the cgroup it is started in), so they hold the whole container:

  * every v1 controller: freezer (pause/resume), memory and cpu (the node's
    `memory` and `cpus` from the spec become a limit and a CFS quota), and
    the others so no two nodes share a cgroup anywhere;
  * `name=systemd` and the unified cgroup2: the node's own systemd makes its
    units' cgroups there (nspawn puts the container in `payload/` below its
    own cgroup). Nodes sharing one would make and remove each other's
    `system.slice/*.service` directories.

Destroy kills whatever is in them, even processes a crash left unrecorded.
They live in `lab/` below this process's own cgroup of each hierarchy, shared
by all labs, named after the machine (lab-<labid>-<node>).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from lab.errors import ProviderError
from lab.host.mounts import mounted
from lab.providers.nspawn.processes import read_value

CGROUP_ROOT = Path("/sys/fs/cgroup")
REQUIRED_CONTROLLERS = ("freezer", "memory", "cpu")
CFS_PERIOD_US = 100_000
MIB = 1024 * 1024


@dataclass(frozen=True)
class Hierarchy:
    controllers: frozenset[str]  # {"cpu"}, {"name=systemd"}; empty for the unified cgroup2
    mount: Path
    own: str  # this process's cgroup in it


def parse_own_cgroups(text: str) -> dict[frozenset[str], str]:
    """/proc/self/cgroup as {controllers: path} (pure); the unified hierarchy's key is empty."""
    own = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3:
            own[frozenset(c for c in parts[1].split(",") if c)] = parts[2]
    return own


def hierarchies() -> list[Hierarchy]:
    """Every cgroup hierarchy mounted below /sys/fs/cgroup, each once, freezer first."""
    own = parse_own_cgroups(read_value(Path("/proc/self/cgroup")) or "")
    found: dict[frozenset[str], Hierarchy] = {}
    for mount in mounted(("cgroup", "cgroup2")):
        if CGROUP_ROOT not in mount.mount_point.parents:
            continue
        options = set(mount.super_options.split(","))
        for controllers, path in own.items():
            if (mount.fs_type == "cgroup2") == (not controllers) and controllers <= options:
                found.setdefault(controllers, Hierarchy(controllers, mount.mount_point, path))
    return sorted(found.values(), key=lambda h: ("freezer" not in h.controllers, sorted(h.controllers)))


def hierarchy(controller: str) -> Hierarchy | None:
    for found in hierarchies():
        if controller in found.controllers:
            return found
    return None


def missing_controller() -> str | None:
    """The first needed controller not mounted, if any."""
    for controller in REQUIRED_CONTROLLERS:
        if hierarchy(controller) is None:
            return controller
    return None


def lab_base(found: Hierarchy) -> Path:
    """`lab/` below this process's own cgroup, so nodes stay inside whatever
    limits the caller runs under (a CI job's memory cgroup, say)."""
    return found.mount / found.own.lstrip("/") / "lab"


def node_cgroups(machine: str) -> list[Path]:
    """The machine's cgroups, one per hierarchy, freezer first."""
    return [lab_base(h) / machine for h in hierarchies()]


def controller_cgroup(node_cgroups: list[Path], controller: str) -> Path:
    """Of a node's cgroups, the one in the hierarchy of a v1 controller ("freezer", "memory", "cpu")."""
    found = hierarchy(controller)
    for cgroup in node_cgroups:
        if found is not None and found.mount in cgroup.parents:
            return cgroup
    raise ProviderError(f"no {controller} cgroup for {node_cgroups[0].name if node_cgroups else 'the node'}",
                        hint=f"the nspawn provider needs the {', '.join(REQUIRED_CONTROLLERS)} controllers "
                             f"mounted below {CGROUP_ROOT}; restart the node with `lab up`")


def make_cgroup(path: Path) -> None:
    """Create the cgroup and its missing parents; in cpuset, each new one gets its parent's cpus
    and mems (a v1 cpuset starts empty, and no process may join an empty one)."""
    missing = [p for p in (path, *path.parents) if not p.exists()]
    for directory in reversed(missing):
        directory.mkdir()
        for name in ("cpuset.cpus", "cpuset.mems"):
            if (directory / name).exists() and not read_value(directory / name):
                (directory / name).write_text(read_value(directory.parent / name) or "")


def set_limits(node_cgroups: list[Path], memory_mib: int, cpus: int) -> None:
    """The node's memory limit (its spec's `memory`, MiB) and CPU quota (`cpus` CPUs' worth per period)."""
    memory = controller_cgroup(node_cgroups, "memory")
    limit = str(memory_mib * MIB)
    swap = memory / "memory.memsw.limit_in_bytes"  # only with swap accounting; must stay >= the limit
    if swap.exists():
        swap.write_text("-1")
    (memory / "memory.limit_in_bytes").write_text(limit)
    if swap.exists():
        swap.write_text(limit)  # no swapping past the limit either
    cpu = controller_cgroup(node_cgroups, "cpu")
    (cpu / "cpu.cfs_period_us").write_text(str(CFS_PERIOD_US))
    (cpu / "cpu.cfs_quota_us").write_text(str(cpus * CFS_PERIOD_US))


def delegate(node_cgroups: list[Path], uid: int) -> None:
    """Give the node's root (host uid `uid`, its user namespace's 0) its cgroup directories in every v1
    controller, so Docker in the node can make a cgroup per container below them.

    Only the directories: their files (the node's own limits, cgroup.procs)
    stay the host's, so a node can make and remove child cgroups, which its
    own limits still bound, but never raise those limits. nspawn hands over
    `name=systemd` and the unified cgroup itself.
    """
    v1 = [h.mount for h in hierarchies() if h.controllers and not any(c.startswith("name=") for c in h.controllers)]
    for cgroup in node_cgroups:
        if any(mount in cgroup.parents for mount in v1) and cgroup.is_dir() and cgroup.stat().st_uid != uid:
            os.chown(cgroup, uid, uid)


def memory_use(node_cgroups: list[Path]) -> tuple[int | None, int | None]:
    """Bytes the node uses now (page cache included, as the limit counts it) and its limit."""
    memory = controller_cgroup(node_cgroups, "memory")

    def number(name: str) -> int | None:
        value = read_value(memory / name)
        return int(value) if value and value.isdigit() else None

    return number("memory.usage_in_bytes"), number("memory.limit_in_bytes")


def is_frozen(freezer: Path) -> bool:
    return read_value(freezer / "freezer.state") == "FROZEN"


def set_freezer(freezer: Path, value: str, node: str) -> None:
    """FROZEN or THAWED, and wait until the kernel says so. Thawing a node without a freezer is a no-op."""
    state_file = freezer / "freezer.state"
    if not state_file.exists():
        if value == "THAWED":
            return
        raise ProviderError(f"{node}: no freezer cgroup", hint="restart the node with `lab up`")
    state_file.write_text(value)
    deadline = time.monotonic() + 10
    while read_value(state_file) != value and time.monotonic() < deadline:
        time.sleep(0.02)


def pids_in(cgroups: list[Path]) -> set[int]:
    """Every process in these cgroups and their children cgroups."""
    pids: set[int] = set()
    for cgroup in cgroups:
        if cgroup.is_dir():
            for procs in cgroup.rglob("cgroup.procs"):
                pids.update(int(p) for p in (read_value(procs) or "").split())
    return pids


def remove_cgroup(path: Path) -> None:
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


def remove_stale(pattern: str) -> None:
    """Remove the cgroups matching a glob (a lab's nodes), then `lab/` itself if no lab is left in it."""
    for found in hierarchies():
        base = lab_base(found)
        for stale in base.glob(pattern):
            remove_cgroup(stale)
        try:
            base.rmdir()  # shared by all labs: goes when the last one does
        except OSError:
            pass
