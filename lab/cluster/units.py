"""`lab unit` and `lab machines`: the host's side of the scheduler, like fleetctl.

Units are stored in etcd (see `lab/node/agent.py` for the layout); the engine on
the nodes places them and the agents run them. These functions read and
write that state through lab's etcd client, and reach a unit's machine over
SSH for its status and journal.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from lab.errors import UsageError
from lab.node import fleet, layout


class UnitUsageError(UsageError):
    pass


@dataclass
class UnitRow:
    name: str
    desired: str
    machines: list[str]  # node names running it (several for a global unit)
    active: str
    sub: str
    reason: str  # why it is pending, if it is


@dataclass
class MachineRow:
    id: str
    name: str
    ip: str
    metadata: dict[str, str]
    engine: bool


def _read_unit_file(path: Path) -> fleet.Unit:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise UnitUsageError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    try:
        return fleet.parse_unit(path.name, text)
    except fleet.UnitError as exc:
        raise UnitUsageError(str(exc), hint="fix the unit file; `lab unit --help` lists the [X-Fleet] options") from None


def submit(client, paths: list[Path], desired: str = "loaded") -> list[str]:
    """Store unit files in etcd (validated first: nothing is stored if one is bad)."""
    units = [_read_unit_file(path) for path in paths]
    for unit in units:
        client.put(f"{layout.UNITS}{unit.name}",
                   json.dumps({"name": unit.name, "text": unit.text, "desired": desired}, sort_keys=True))
    return [unit.name for unit in units]


def set_desired(client, targets: list[str], desired: str) -> list[str]:
    """start / stop: FILE submits then sets; NAME must be a unit already submitted."""
    names = []
    for target in targets:
        path = Path(target)
        if path.suffix and path.exists():
            names += submit(client, [path], desired)
            continue
        record = _unit_record(client, target)
        record["desired"] = desired
        client.put(f"{layout.UNITS}{record['name']}", json.dumps(record, sort_keys=True))
        names.append(record["name"])
    return names


def destroy(client, names: list[str]) -> list[str]:
    for name in names:
        _unit_record(client, Path(name).name)
    for name in names:
        client.delete(f"{layout.UNITS}{Path(name).name}")
    return names


def _unit_record(client, name: str) -> dict:
    value = client.get(f"{layout.UNITS}{name}")
    if value is None:
        known = sorted(k.rsplit("/", 1)[1] for k in client.get_prefix(layout.UNITS))
        raise UnitUsageError(f"no unit named {name!r}",
                             hint=f"submitted units: {', '.join(known) or 'none'}; submit one with "
                                  "`lab unit submit FILE` or `lab unit start FILE`")
    return json.loads(value)


def machines(client) -> list[MachineRow]:
    engine = client.get(layout.ENGINE)
    rows = [json.loads(v) for v in client.get_prefix(layout.MACHINES).values()]
    return sorted((MachineRow(m["id"], m["name"], m["ip"], m.get("metadata", {}), m["id"] == engine) for m in rows),
                  key=lambda m: m.name)


def list_units(client) -> list[UnitRow]:
    units = {json.loads(v)["name"]: json.loads(v) for v in client.get_prefix(layout.UNITS).values()}
    names = {m.id: m.name for m in machines(client)}
    schedule = {k.rsplit("/", 1)[1]: v for k, v in client.get_prefix(layout.SCHEDULE).items()}
    pending = {k.rsplit("/", 1)[1]: v for k, v in client.get_prefix(layout.PENDING).items()}
    states: dict[str, dict[str, dict]] = {}
    for key, value in client.get_prefix(layout.STATES).items():
        _, _, rest = key.partition(layout.STATES)
        unit, _, machine = rest.rpartition("/")
        states.setdefault(unit, {})[machine] = json.loads(value)
    rows = []
    for name in sorted(units):
        record = units[name]
        running = states.get(name, {})
        where = sorted(names.get(m, m[:8]) for m in running) or (
            [names.get(schedule[name], schedule[name][:8])] if name in schedule else [])
        active = ",".join(sorted({s["active"] for s in running.values()})) or "-"
        sub = ",".join(sorted({s["sub"] for s in running.values()})) or "-"
        reason = pending.get(name, "")
        if record["desired"] == "inactive" and not reason:
            reason = "submitted, not started"
        rows.append(UnitRow(name, record["desired"], where, active, sub, reason))
    return rows


def machine_of(client, name: str) -> list[MachineRow]:
    """The machines running a unit (one, or several for a global unit)."""
    _unit_record(client, name)
    states = client.get_prefix(f"{layout.STATES}{name}/")
    ids = {key.rsplit("/", 1)[1] for key in states}
    schedule = client.get(f"{layout.SCHEDULE}{name}")
    if not ids and schedule:
        ids = {schedule}
    found = [m for m in machines(client) if m.id in ids]
    if not found:
        reason = client.get(f"{layout.PENDING}{name}") or "it is not scheduled yet"
        raise UnitUsageError(f"{name} runs on no machine: {reason}", hint="see `lab unit list`")
    return found
