"""The faults a scenario may inject: one table, and the injector that applies it.

Each fault is a row of `FAULTS`: the method that injects it (a provider
primitive, or an SSH command on the node for etcd's process), what it is
applied to, which fault undoes it, and whether it opens a fault window.
A window is recorded (shaded in the timeline, the origin of time-to-new-
leader, the `old-leader` of later steps) from when the fault is surely in
place until its undo, or the end of the run. The same scenario runs the same
on nspawn nodes and on Vagrant VMs because only provider methods are used.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

from lab.errors import LabError

KILL_ETCD_DROPIN = "/run/systemd/system/etcd.service.d/lab-fault.conf"
# A `systemctl daemon-reload` in a VM under software emulation took 14-42 s on a loaded host (CI, 3
# VMs); the time to the new leader is measured from the fault in place, so a slow fault costs no
# verdict, and this is only a guard against a hung command. (Readying the drop-in before the fault
# was tried: the reload starved the leader's etcd, whose status went stale, and the re-check of
# `leader` found none. A drop-in written once at configuration, ConditionPathExists on a flag file,
# would need no reload at all.)
ETCD_FAULT_TIMEOUT = 120


@dataclass(frozen=True)
class FaultAction:
    via: Literal["provider", "ssh"]  # a Provider method, or the injector's own (a command over SSH)
    method: str
    # nodes: called once per target node, in parallel; groups: once with the
    # partition's groups; lab: once, with nothing.
    scope: Literal["nodes", "groups", "lab"] = "nodes"
    undo: str | None = None  # the fault that ends this one's window
    opens_window: bool = False
    ends_at_once: bool = False  # the fault is over when the call returns (a reboot)
    help: str = ""  # what it does, for `lab fault --help` (whose verbs are the provider rows of this table)


FAULTS: dict[str, FaultAction] = {
    "kill": FaultAction("provider", "kill", undo="start", opens_window=True,
                        help="Stop nodes at once, as if their power were pulled (`lab fault start` brings them back)."),
    "start": FaultAction("provider", "start", help="Start killed or halted nodes again and wait for SSH."),
    "pause": FaultAction("provider", "pause", undo="resume", opens_window=True,
                         help="Freeze every process of the nodes."),
    "resume": FaultAction("provider", "resume", help="Thaw paused nodes."),
    "reboot": FaultAction("provider", "reboot", opens_window=True, ends_at_once=True,
                          help="Reboot nodes cleanly, one after the other."),
    "partition": FaultAction("provider", "partition", scope="groups", undo="heal", opens_window=True,
                             help="Cut the network between groups: `lab fault partition node-1 node-2,node-3`."),
    "heal": FaultAction("provider", "heal", scope="lab", help="Remove every partition."),
    "kill-etcd": FaultAction("ssh", "kill_etcd", undo="start-etcd", opens_window=True),
    "start-etcd": FaultAction("ssh", "start_etcd"),
}
UNDOES = {action.undo: name for name, action in FAULTS.items() if action.undo}  # undo -> the fault it ends


class FaultInjector:
    """Applies faults by name, records their windows, and undoes whatever is left at the end."""

    def __init__(self, provider, context, monitor, clock: Callable[[], float]) -> None:
        self.provider = provider
        self.context = context  # the provider's LabContext: the nodes and their names
        self.monitor = monitor  # LeaderMonitor: who leads, for `leader` and `followers`
        self.clock = clock
        self.records: list[dict[str, Any]] = []  # {"start", "requested", "end", "action", "targets", "leader", "term"}
        self.last: dict[str, Any] | None = None  # the latest window opened
        self.killed_etcd: set[str] = set()

    def targets(self, target: str) -> list[str]:
        """The nodes `leader`, `followers`, `all`, `members`, `workers`, `old-leader` or a node name stand for
        right now. Followers are the members the leader leads; workers are no one's followers."""
        from lab.cluster.etcd_bootstrap import member_names

        nodes = [n.name for n in self.context.nodes]
        if target == "all":
            return nodes
        members = member_names(self.context)
        if target in ("members", "workers"):
            chosen = members if target == "members" else [n for n in nodes if n not in members]
            if not chosen:
                raise LabError(f"lab {self.context.spec.name!r} has no {target}: every node is an etcd member",
                               hint="set etcd.members below the node count, or add one with `lab node add "
                                    "--role worker`")
            return chosen
        if target in ("leader", "followers"):
            leader, _ = self.monitor.leader()
            if leader is None:
                raise LabError("no leader to target right now")
            return [leader] if target == "leader" else [n for n in members if n != leader]
        if target == "old-leader":
            if not self.last or not self.last.get("leader"):
                raise LabError("no earlier fault recorded a leader")
            return [self.last["leader"]]
        self.context.node(target)
        return [target]

    def inject(self, name: str, target: str) -> str:
        """Apply fault `name` to `target` (a node, a special target or partition groups); returns a detail line."""
        action = FAULTS[name]
        leader, term = self.monitor.leader()
        requested = self.clock()
        record = {"start": requested, "requested": requested, "end": None, "action": name,
                  "leader": leader, "term": term}
        method = getattr(self.provider if action.via == "provider" else self, action.method)
        targets: list = []
        if action.scope == "groups":
            targets = self.partition_groups(target)
        elif action.scope == "nodes":
            targets = self.targets(target)
        if action.scope != "lab":
            record["targets"] = targets
        if action.opens_window:
            # Recorded before the call: the window shows, and restore ends it, even when the call fails half-way.
            self.records.append(record)
            self.last = record
        if action.scope == "nodes":
            with ThreadPoolExecutor(max_workers=max(1, len(targets))) as pool:
                list(pool.map(method, targets))
        else:
            method(*([targets] if action.scope == "groups" else []))
        # Measured from when the fault is surely in place (the kill returned
        # once the process was gone): times to recover are lower bounds by at
        # most the injection latency, never inflated by it.
        record["start"] = self.clock()
        if name in UNDOES:
            self.close(UNDOES[name], targets if action.scope == "nodes" else None)
        if action.ends_at_once:
            record["end"] = self.clock()
        if action.scope == "groups":
            return " | ".join(",".join(g) for g in targets)
        if action.scope == "lab":
            return ""
        return ", ".join(targets) + (f" (leader was {leader}, term {term})" if leader else "")

    def partition_groups(self, target: str) -> list[list[str]]:
        """`node-1|node-2,node-3` as given, or the targets of `leader` (say) against everyone else."""
        nodes = [n.name for n in self.context.nodes]
        if "|" in target:
            groups = [[n for n in group.split(",") if n] for group in target.split("|")]
            for group in groups:
                for node in group:
                    self.context.node(node)
            return groups
        isolated = self.targets(target)
        return [isolated, [n for n in nodes if n not in isolated]]

    def close(self, action: str, targets: list[str] | None = None) -> None:
        """End the open windows of `action` on these targets (on any, when None)."""
        now = self.clock()
        for record in self.records:
            if record["action"] == action and record["end"] is None and (
                    targets is None or set(record.get("targets") or []) <= set(targets)):
                record["end"] = now

    def kill_etcd(self, node: str) -> None:
        """SIGKILL the node's etcd and keep systemd from restarting it until start-etcd."""
        from lab.host.ssh import run

        # kill -9 of the main PID, not `systemctl kill`: on cgroup v1 hosts the
        # latter also signals the unit's cgroup and fails with EIO here.
        script = (f"mkdir -p {Path(KILL_ETCD_DROPIN).parent} && "
                  f"printf '[Service]\\nRestart=no\\n' > {KILL_ETCD_DROPIN} && systemctl daemon-reload && "
                  "pid=$(systemctl show -p MainPID --value etcd) && [ \"$pid\" != 0 ] && kill -9 \"$pid\" && "
                  "for i in $(seq 100); do systemctl is-active --quiet etcd || exit 0; sleep 0.05; done; exit 1")
        self.killed_etcd.add(node)  # before: restore must undo even a half-done kill
        run(self.provider.ssh_endpoints()[node], script, timeout=ETCD_FAULT_TIMEOUT, check=True)

    def start_etcd(self, node: str) -> None:
        from lab.host.ssh import run

        script = (f"rm -f {KILL_ETCD_DROPIN} && systemctl daemon-reload && systemctl reset-failed etcd; "
                  "systemctl start --no-block etcd")
        run(self.provider.ssh_endpoints()[node], script, timeout=ETCD_FAULT_TIMEOUT, check=True)
        self.killed_etcd.discard(node)

    def restore(self) -> None:
        """Leave the lab as healthy as it was: heal, resume, start whatever a fault left down.

        Every window still open ends now. Raises LabError when the lab cannot be restored.
        """
        self.provider.heal()
        for status in self.provider.status():
            if status.state.value == "paused":
                self.provider.resume(status.name)
            elif status.state.value == "stopped":
                self.provider.start(status.name)
        for node in list(self.killed_etcd):
            self.start_etcd(node)
        self.close("partition")
        for record in self.records:
            if record["end"] is None:
                record["end"] = self.clock()
