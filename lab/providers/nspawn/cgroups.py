"""Per-node cgroups (v1): a freezer and a memory cgroup around each node.

The supervisor joins them before it starts systemd-nspawn, so they hold the
whole container: pause/resume freeze it, destroy kills whatever is in them,
even processes that a crash left unrecorded. They live in `lab/` below this
process's own cgroup, shared by all labs.
"""

from __future__ import annotations

import time
from pathlib import Path

from lab.errors import ProviderError
from lab.providers.nspawn.processes import read_value

CGROUP_ROOT = Path("/sys/fs/cgroup")
CGROUP_CONTROLLERS = ("freezer", "memory")  # node_cgroups() lists them in this order


def missing_controller() -> str | None:
    """The first needed controller not mounted, if any."""
    for controller in CGROUP_CONTROLLERS:
        if not (CGROUP_ROOT / controller).is_dir():
            return controller
    return None


def lab_base(controller: str) -> Path:
    """`lab/` below this process's own cgroup, so nodes stay inside whatever
    limits the caller runs under (a CI job's memory cgroup, say)."""
    own = "/"
    for line in read_value(Path("/proc/self/cgroup")).splitlines():
        _, controllers, path = line.split(":", 2)
        if controller in controllers.split(","):
            own = path
    return CGROUP_ROOT / controller / own.lstrip("/") / "lab"


def node_cgroups(machine: str) -> list[Path]:
    """The machine's cgroups, freezer first."""
    return [lab_base(c) / machine for c in CGROUP_CONTROLLERS]


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
    for controller in CGROUP_CONTROLLERS:
        base = lab_base(controller)
        for stale in base.glob(pattern):
            remove_cgroup(stale)
        try:
            base.rmdir()  # shared by all labs: goes when the last one does
        except OSError:
            pass
