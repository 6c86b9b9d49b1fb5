"""`lab update`: roll a running lab to another OS version, node by node.

The host's part is small on purpose: it stages the new image in every node's
passive slot (through the provider) and publishes what it staged in etcd.
Each node's update agent (`lab/node/updater.py`) then takes the reboot lock,
reboots into the new slot, checks its health and confirms or rolls back, so
the roll goes on even if the `lab` command that started it is gone.
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass

from lab.cluster.etcdclient import EtcdError
from lab.cluster.records import json_record
from lab.errors import LabError, PrerequisiteError, UsageError
from lab.host.ssh import parallel_map
from lab.images.cache import find_image
from lab.node.layout import HALTED, NODE_UPDATES, SEMAPHORE, STAGED
from lab.node.semaphore import Semaphore
from lab.providers.base import NodeState, Progress, no_progress


class UpdateError(LabError):
    exit_code = 9


@dataclass
class NodeUpdate:
    node: str
    version: str
    slot: str
    state: str  # idle | rebooting | updated | rolling-back | rolled-back | failed | unknown
    boot_id: str
    detail: str = ""


@dataclass
class UpdateStatus:
    target: str | None
    nodes: list[NodeUpdate]
    holders: list[str]
    max_holders: int
    strategy: str
    halted: dict | None
    staging_since: float | None = None  # a `lab update` is writing the passive slots (still running)


# Nodes whose passive slot is written at once, at most: a VM's staging is a gigabyte through its SSH
# session. The lab's disruption budget bounds it too (staging_concurrency).
STAGING_CONCURRENCY = 4


def staging_concurrency(max_concurrent_reboots: int) -> int:
    """As many nodes stage at once as may be down at once. Three VMs staging together on a two-core
    host under emulation starved each other's etcd until quorum was lost twice (2026-12-02): a node's
    low staging weight shares its own CPU, not the host's, and staging one node leaves the others a core."""
    return max(1, min(STAGING_CONCURRENCY, max_concurrent_reboots))


def start_roll(lab, version: str, progress: Progress = no_progress) -> float:
    """Stage `version` on every node and let the update agents roll; the seconds staging took."""
    lab.require_created("update")
    box = lab.spec.box
    provider = lab.provider()
    flavor = provider.update_flavor  # what a node's slot holds: an nspawn image's /usr, a VM image's
    problem = provider.update_problem()
    if problem:
        raise PrerequisiteError(problem[0], hint=problem[1])
    image = find_image(box.name, version, flavor)
    if image is None:
        build = f"lab box build --name {box.name} --version {version}"
        if flavor == "vm":  # any box format builds the VM image; the lab's own is the one it may boot later
            build += f" --format {provider.name if provider.name in ('libvirt', 'virtualbox') else 'libvirt'}"
        raise PrerequisiteError(f"the node OS image {box.name} {version}{' (VM)' if flavor == 'vm' else ''} "
                                "is not built", hint=build)
    if lab.spec.updates.strategy == "off":
        raise UsageError("updates.strategy is off: the nodes would never reboot into the new version",
                         hint="set updates.strategy to etcd-lock (or reboot) in lab.yaml and run `lab up`")
    client = lab.etcd_client()
    Semaphore(client).resize(lab.spec.updates.max_concurrent_reboots)
    nodes = lab.node_names()
    # What an earlier roll staged goes first: a node must not reboot into its passive slot while that
    # slot is being written again (the halt it may be waiting behind is cleared only once all is staged).
    for node in nodes:
        client.delete(f"{STAGED}{node}")
    # Every node's passive slot is written first (as many at once as may reboot at once), and only then
    # is anything published: no node reboots while another is still staging, so the staging's cost to the
    # applications is measured alone (the scenario's staging window) and a failed staging leaves no node
    # half-way into a roll. `lab update status` shows the staging while it lasts (minutes per VM).
    earlier = lab.state.get("update")
    lab.state.set("update", {"target": version, "staging_since": time.time(), "staging_pid": os.getpid(),
                             "staging_pid_started": _process_started(os.getpid())})
    try:
        staging_s, slots = _stage_everywhere(lab, provider, image, nodes, progress)
    except BaseException:
        lab.state.set("update", earlier)
        raise
    if client.get(HALTED):
        progress("clearing the halt left by an earlier failed roll")
        client.delete(HALTED)
    for node, slot in zip(nodes, slots):
        client.put(f"{STAGED}{node}", json.dumps({"version": version, "slot": slot, "at": time.time()}))
        progress(f"{node}: {box.name} {version} staged in slot {slot}")
    lab.state.set("update", {"target": version, "started_at": time.time()})
    return staging_s


def _stage_everywhere(lab, provider, image, nodes: list[str], progress: Progress) -> tuple[float, list[str]]:
    """Every node's passive slot written; (the seconds it took, each node's slot)."""
    provider.prepare_update(image.rootfs, progress)
    started = time.monotonic()
    # After a failure or Ctrl-C, stagings under way stop too (their slots were never published).
    stop = threading.Event()
    slots = parallel_map(lambda node: provider.stage_update(node, image.rootfs, progress, stop), nodes,
                         limit=staging_concurrency(lab.spec.updates.max_concurrent_reboots), stop=stop)
    return time.monotonic() - started, slots


def status(lab) -> UpdateStatus:
    lab.require_created("show updates of")
    client = lab.etcd_client()
    reported = {}
    for key, value in client.get_prefix(NODE_UPDATES).items():
        record = json_record(key, value, {"node": str}, dict.fromkeys(("version", "slot", "state", "boot_id"), str))
        reported[record["node"]] = record
    rows = []
    for node in lab.node_names():
        record = reported.get(node, {})
        detail = ""
        if record.get("state") in ("rolling-back", "rolled-back"):
            detail = f"rolled back from {record.get('failed_version')}: {record.get('reason')}"
        rows.append(NodeUpdate(node, record.get("version", "?"), record.get("slot", "?"),
                               record.get("state", "unknown"), record.get("boot_id", ""), detail))
    if client.get(SEMAPHORE) is not None:  # a garbled lock is one clear error, not a traceback
        json_record(SEMAPHORE, client.get(SEMAPHORE), {"max": int, "holders": list[str]})
    semaphore, _ = Semaphore(client).read(lab.spec.updates.max_concurrent_reboots)
    halted = client.get(HALTED)
    update = lab.state.get("update") or {}
    return UpdateStatus(target=update.get("target"), nodes=rows, staging_since=_staging_since(update),
                        holders=semaphore["holders"], max_holders=semaphore["max"],
                        strategy=lab.spec.updates.strategy,
                        halted=json_record(HALTED, halted, dict.fromkeys(("node", "version", "reason"), str))
                        if halted else None)


def unlock(lab, node: str, force: bool = False) -> bool:
    """Free the reboot lock a dead node holds. Returns whether it held one.

    A holder that is alive (running, or paused and about to go on) is in the
    middle of its reboot: freeing its lock would let another node reboot too,
    so that takes `force`.
    """
    lab.context(lab.selection().name).node(node)
    client = lab.etcd_client()
    if client.get(SEMAPHORE) is not None:  # a garbled lock is one clear error, not a traceback
        json_record(SEMAPHORE, client.get(SEMAPHORE), {"max": int, "holders": list[str]})
    semaphore = Semaphore(client)
    held = semaphore.holds(node, lab.spec.updates.max_concurrent_reboots)
    if not held:
        return False
    state = next((s.state for s in lab.provider().status() if s.name == node), NodeState.UNKNOWN)
    if state in (NodeState.RUNNING, NodeState.PAUSED) and not force:
        raise UsageError(f"{node} holds the reboot lock and is {state.value}: its update agent may be rebooting it",
                         hint=f"wait for it (`lab update status`), or `lab update unlock {node} --force` "
                              "if you know its agent is stuck")
    semaphore.release(node, lab.spec.updates.max_concurrent_reboots)
    return True


def wait(lab, version: str, progress: Progress = no_progress, timeout: float = 600.0) -> UpdateStatus:
    """Until every node runs `version`, or the roll halted."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        try:
            current = status(lab)
        except EtcdError:
            time.sleep(0.5)  # a node's member is rebooting: ask again
            continue
        line = ", ".join(f"{n.node} {n.version} ({n.state})" for n in current.nodes)
        if line != last:
            progress(line + (f"; lock held by {', '.join(current.holders)}" if current.holders else ""))
            last = line
        if current.halted:
            return current
        if all(n.version == version and n.state in ("updated", "idle") for n in current.nodes):
            return current
        time.sleep(0.5)
    raise UpdateError(f"the roll to {version} did not finish in {timeout:.0f} s", hint="see `lab update status`")


def _staging_since(update: dict) -> float | None:
    """When the staging recorded began, if the `lab update` doing it still runs (kill -9 leaves the record;
    the process's start time tells a pid used again since)."""
    since, pid = update.get("staging_since"), update.get("staging_pid")
    if not isinstance(since, (int, float)) or not isinstance(pid, int):
        return None
    started = _process_started(pid)
    if started is None or started != update.get("staging_pid_started"):
        return None
    return float(since)


def _process_started(pid: int) -> float | None:
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None
