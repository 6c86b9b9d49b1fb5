"""The scheduler agent that runs on every node (fleet, reborn), standard library only.

Copied with its siblings (fleet.py, etcd.py, layout.py) to /var/lib/lab/
on each node and run by the `lab-agent` systemd unit. Each agent, every round
(its configuration's `interval`: AGENT_INTERVAL in lab/cluster/agents.py),
reads every scheduler key at once and writes only what changed (an idle
round: a lease keepalive and one read), and:
  * keeps its machine registered in etcd under a lease (id, name, IP,
    metadata); if the lease cannot be renewed for most of its TTL it stops
    its units, so a cut-off machine never runs a unit someone else now runs;
  * takes part in the engine election (a key held under its lease): the
    winner assigns units to machines with `fleet.place` and writes the
    schedule, including why a unit is pending;
  * runs the units assigned to it through the node's systemd (unit files in
    /etc/systemd/system, `systemctl start/stop`) and reports their states.

etcd layout, under /lab/fleet (the keys are in layout.py):
  machines/ID          machine JSON, under the machine's lease
  units/NAME           {"name", "text", "desired": "loaded" | "launched"}
  schedule/NAME        machine id (written by the engine)
  pending/NAME         reason the unit has no machine (written by the engine)
  states/NAME/ID       {"active", "sub", "load"} under the machine's lease
  engine               id of the machine whose agent is the engine, under its lease
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

try:  # in the lab package on the host; beside this file on a node
    from . import fleet, layout
    from .etcd import Etcd
except ImportError:  # pragma: no cover - the node's way
    import fleet  # type: ignore[no-redef]
    import layout  # type: ignore[no-redef]
    from etcd import Etcd  # type: ignore[no-redef]


def systemctl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["systemctl", *args], capture_output=True, text=True, check=False)


# Where systemd finds a machine's own units (the agent writes its own into /etc/systemd/system).
SYSTEM_UNIT_DIRS = (Path("/etc/systemd/system"), Path("/run/systemd/system"), Path("/lib/systemd/system"),
                    Path("/usr/lib/systemd/system"))


def machine_has_unit(name: str, directories: tuple[Path, ...] = SYSTEM_UNIT_DIRS) -> bool:
    """Whether a unit of this name exists on the machine already (one the agent did not write)."""
    return any((directory / name).exists() for directory in directories)


class Agent:
    def __init__(self, config: dict) -> None:
        self.config = config
        self.id = layout.machine_id()
        self.ttl = int(config.get("ttl", 5))
        # Short per-endpoint timeouts: one call that tries every endpoint must
        # fail well inside the lease, so a cut-off machine fences itself before
        # the engine gives its units to another.
        per_endpoint = max(0.2, min(2.0, 0.3 * self.ttl / max(1, len(config["endpoints"]))))
        self.etcd = Etcd(config["endpoints"], config.get("tls"), timeout=per_endpoint)
        self.interval = float(config.get("interval", 1.0))
        self.lease: str | None = None
        self.last_renewal = time.monotonic()
        self.fenced = False
        self.refused: set[str] = set()  # scheduled units that are named like one of the machine's own
        self.written: dict[str, tuple[str | None, str]] = {}  # key -> (lease, value) last written under a lease

    def log(self, message: str) -> None:
        print(message, flush=True)  # journald keeps it, with the unit's name

    # ------------------------------------------------------------ the loop

    def run_forever(self) -> None:
        self.log(f"agent {self.config['name']} ({self.id}) starting; lease TTL {self.ttl} s")
        while True:
            started = time.monotonic()
            try:
                self.tick()
            except (ConnectionError, KeyError, ValueError) as exc:
                self.log(f"etcd unreachable: {exc}")
                self.fence_if_expired()
            except Exception as exc:  # noqa: BLE001 - the agent must outlive any one bad tick
                self.log(f"tick failed: {type(exc).__name__}: {exc}")
                self.fence_if_expired()
            time.sleep(max(0.05, self.interval - (time.monotonic() - started)))

    def tick(self) -> None:
        self.fence_if_expired()
        if layout.DRAIN_FLAG.exists():
            self.drain()
            return
        self.renew()
        fleet_keys = self.read_fleet()
        self.register(fleet_keys)
        engine = fleet_keys.get(layout.ENGINE)
        if engine is None and self.etcd.create_if_absent(layout.ENGINE, self.id, self.lease):
            self.log("became the engine")
            engine = self.id
        if engine == self.id and self.reconcile(fleet_keys):
            fleet_keys = self.read_fleet()  # what it just scheduled, so its own units start this round
        self.apply(fleet_keys)

    def read_fleet(self) -> dict[str, str]:
        """Every scheduler key, in one read at one revision: an idle round costs a keepalive and
        this, and writes nothing (under emulation a round of writes and reads per node per second
        kept the VMs' CPUs busy)."""
        return self.etcd.get_prefix(f"{layout.FLEET}/")

    def renew(self) -> None:
        if self.lease is not None and self.etcd.keepalive(self.lease) <= 0:
            self.log("lease expired; registering again")
            self.lease = None
        if self.lease is None:
            self.lease = self.etcd.grant(self.ttl)
        self.last_renewal = time.monotonic()
        self.fenced = False

    def register(self, fleet_keys: dict[str, str]) -> None:
        machine = json.dumps({"id": self.id, "name": self.config["name"], "ip": self.config["ip"],
                              "metadata": self.config.get("metadata", {})}, sort_keys=True)
        self.keep(f"{layout.MACHINES}{self.id}", machine, fleet_keys)

    def keep(self, key: str, value: str, fleet_keys: dict[str, str]) -> None:
        """`key` = `value` under this agent's lease, written only when etcd lacks it or this agent last
        wrote it under another lease (a new lease, or a key left by this machine's previous agent, which
        goes when that lease ends)."""
        if self.written.get(key) != (self.lease, value) or fleet_keys.get(key) != value:
            self.etcd.put(key, value, self.lease)
            fleet_keys[key] = value
            self.written[key] = (self.lease, value)

    def drain(self) -> None:
        if self.lease is None:
            return
        for name in sorted(self.managed()):
            self.log(f"draining: stopping {name}")
            systemctl("stop", name)
            # Its file goes with it: a unit file here that the agent does not list as its own is the
            # machine's (apply never takes one), so none of the agent's may stay unlisted.
            (layout.UNIT_DIR / name).unlink(missing_ok=True)
        systemctl("daemon-reload")
        self.save_managed(set())
        # Revoking the lease removes our machine key, our unit states and the
        # engine key if we held it, all at once.
        self.etcd.revoke(self.lease)
        self.lease = None
        self.log("drained: deregistered from the scheduler")

    def fence_if_expired(self) -> None:
        """Cut off from etcd for most of a TTL: the engine will give our units to others. Stop them first."""
        if self.fenced or time.monotonic() - self.last_renewal < self.ttl * 0.6:
            return
        for name in sorted(self.managed()):
            self.log(f"fencing: stopping {name} (no lease renewal for {time.monotonic() - self.last_renewal:.1f} s)")
            systemctl("stop", "--no-block", name)
        self.lease = None
        self.fenced = True

    # ------------------------------------------------------------ engine

    def units(self, fleet_keys: dict[str, str]) -> dict[str, tuple[fleet.Unit, str]]:
        found = {}
        for key, value in under(fleet_keys, layout.UNITS).items():
            record = json.loads(value)
            try:
                found[record["name"]] = (fleet.parse_unit(record["name"], record["text"]), record["desired"])
            except fleet.UnitError as exc:
                self.log(f"ignoring {key}: {exc}")
        return found

    @staticmethod
    def machines(fleet_keys: dict[str, str]) -> list[fleet.Machine]:
        return [fleet.Machine(id=m["id"], name=m["name"], ip=m["ip"], metadata=m.get("metadata", {}))
                for m in (json.loads(v) for v in under(fleet_keys, layout.MACHINES).values())]

    def reconcile(self, fleet_keys: dict[str, str]) -> bool:
        """Place the units and write what changed; True if anything was written."""
        units = self.units(fleet_keys)
        machines = self.machines(fleet_keys)
        schedule = under(fleet_keys, layout.SCHEDULE)
        schedulable = [unit for unit, desired in units.values() if desired in ("loaded", "launched")]
        plan = fleet.place(schedulable, machines, schedule)
        names = {m.id: m.name for m in machines}
        wrote = False
        for name, machine in plan.assignments.items():
            if schedule.get(name) != machine:
                self.log(f"engine: {name} -> {names.get(machine, machine)}"
                         + (f" (was {names.get(schedule[name], schedule[name])})" if name in schedule else ""))
                self.etcd.put(f"{layout.SCHEDULE}{name}", machine)
                wrote = True
        for name in schedule:
            if name not in plan.assignments:
                self.etcd.delete(f"{layout.SCHEDULE}{name}")
                wrote = True
        pending = under(fleet_keys, layout.PENDING)
        for name, reason in plan.pending.items():
            if pending.get(name) != reason:
                self.etcd.put(f"{layout.PENDING}{name}", reason)
        for name in pending:
            if name not in plan.pending:
                self.etcd.delete(f"{layout.PENDING}{name}")
        return wrote

    # ------------------------------------------------------------ agent

    def managed(self) -> set[str]:
        try:
            return set(json.loads(layout.MANAGED.read_text()))
        except (OSError, ValueError):
            return set()

    def save_managed(self, names: set[str]) -> None:
        layout.MANAGED.parent.mkdir(parents=True, exist_ok=True)
        tmp = layout.MANAGED.with_suffix(".tmp")
        tmp.write_text(json.dumps(sorted(names)))
        os.replace(tmp, layout.MANAGED)

    def apply(self, fleet_keys: dict[str, str]) -> None:
        units = self.units(fleet_keys)
        schedule = under(fleet_keys, layout.SCHEDULE)
        mine = {name for name, machine in schedule.items() if machine == self.id and name in units}
        global_units = [unit for unit, desired in units.values()
                        if unit.options.global_ and desired in ("loaded", "launched")]
        if global_units:
            plan = fleet.place(global_units, self.machines(fleet_keys), {})
            mine |= {name for name, targets in plan.global_targets.items() if self.id in targets}
        managed = self.managed()
        # A unit the machine has of its own (ssh.service, on an existing host nginx.service) is never
        # overwritten, killed by a fault or removed at destroy as if it were the scheduler's.
        theirs = {name for name in mine if name not in managed and machine_has_unit(name)}
        for name in sorted(theirs - self.refused):
            self.log(f"agent: {name} is a unit of this machine's own: not running the scheduler's unit of that name")
        self.refused = theirs
        mine -= theirs
        # Recorded as ours before any file is written: an agent killed between the two (a fault) must not
        # find its own unit file next time and take it for the machine's.
        self.save_managed(managed | mine)
        reload = False
        for name in sorted(mine):
            path = layout.UNIT_DIR / name
            text = units[name][0].text
            if not path.exists() or path.read_text() != text:
                path.write_text(text)
                reload = True
        for name in sorted(managed - mine):
            self.log(f"agent: {name} is no longer ours: stopping it")
            systemctl("stop", name)
            (layout.UNIT_DIR / name).unlink(missing_ok=True)
            self.etcd.delete(f"{layout.STATES}{name}/{self.id}")
            self.written.pop(f"{layout.STATES}{name}/{self.id}", None)
            reload = True
        if reload:
            systemctl("daemon-reload")
        self.save_managed(mine)
        states = unit_states(sorted(mine))
        acted = []
        for name in sorted(mine):
            if states[name] is None:
                continue  # systemctl did not say (busy): next round
            desired = units[name][1]
            active = states[name]["active"] in ("active", "reloading", "refreshing")
            if desired == "launched" and not active:
                self.log(f"agent: starting {name}")
                systemctl("start", "--no-block", name)
                acted.append(name)
            elif desired == "loaded" and active:
                self.log(f"agent: stopping {name}")
                systemctl("stop", "--no-block", name)
                acted.append(name)
        states.update(unit_states(acted))
        for name in sorted(mine):
            if states[name] is not None:
                self.report(name, states[name], fleet_keys)

    def report(self, name: str, state: dict[str, str], fleet_keys: dict[str, str]) -> None:
        """The unit's state here, written only when it changed (or went with an old lease)."""
        self.keep(f"{layout.STATES}{name}/{self.id}", json.dumps({**state, "machine": self.id}, sort_keys=True),
                  fleet_keys)


def under(fleet_keys: dict[str, str], prefix: str) -> dict[str, str]:
    """The keys below `prefix` by the rest of their name (units/web.service -> web.service)."""
    return {key[len(prefix):]: value for key, value in fleet_keys.items() if key.startswith(prefix)}


def unit_states(names: list[str]) -> dict[str, dict[str, str] | None]:
    """{"active", "sub", "load"} of each unit, from one `systemctl show` (a process per unit and
    round is dear on an emulated CPU); None for a unit systemctl did not answer for."""
    states: dict[str, dict[str, str] | None] = {name: None for name in names}
    if not names:
        return states
    shown = systemctl("show", "-p", "Id", "-p", "ActiveState", "-p", "SubState", "-p", "LoadState",
                      "--", *names)
    if shown.returncode != 0:
        return states
    # One block per unit, separated by an empty line; matched by Id (a unit's own name here).
    for block in shown.stdout.strip().split("\n\n"):
        fields = dict(line.split("=", 1) for line in block.splitlines() if "=" in line)
        if fields.get("Id") in states:
            states[fields["Id"]] = {"active": fields.get("ActiveState", "unknown"),
                                    "sub": fields.get("SubState", "unknown"),
                                    "load": fields.get("LoadState", "unknown")}
    return states


def main(argv: list[str]) -> int:
    Agent(layout.read_config(argv)).run_forever()
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(sys.argv))
