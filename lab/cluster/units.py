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

from lab.cluster.records import json_record
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


def unit_source(path: Path) -> Path | None:
    """The file a unit's text comes from: `path` itself or, as fleetctl does, for an instance
    (`web@1.service`) with no file of its own, its template (`web@.service`) beside it."""
    if path.is_file():
        return path
    prefix, at, rest = path.name.partition("@")
    instance, dot, suffix = rest.rpartition(".")
    if at and instance and dot:
        template = path.with_name(f"{prefix}@.{suffix}")
        if template.is_file():
            return template
    return None


def _read_unit_file(path: Path) -> fleet.Unit:
    source = unit_source(path) or path
    try:
        # Text mode reads a CRLF checkout's unit as LF: the text stored in etcd is what nodes write.
        text = source.read_text(encoding="utf-8")
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
        if path.suffix and unit_source(path) is not None:
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
    key = f"{layout.UNITS}{name}"
    value = client.get(key)
    if value is None:
        known = sorted(k.rsplit("/", 1)[1] for k in client.get_prefix(layout.UNITS))
        raise UnitUsageError(f"no unit named {name!r}",
                             hint=f"submitted units: {', '.join(known) or 'none'}; submit one with "
                                  "`lab unit submit FILE` or `lab unit start FILE`")
    return unit_record(key, value)


def unit_record(key: str, value: str) -> dict:
    return json_record(key, value, {"name": str, "text": str, "desired": str},
                       hint=f"remove it (`lab etcdctl -- del {key}`), then submit the unit again "
                            "(`lab unit start FILE`)")


def machines(client) -> list[MachineRow]:
    engine = client.get(layout.ENGINE)
    rows = [json_record(k, v, {"id": str, "name": str, "ip": str}, {"metadata": dict})
            for k, v in client.get_prefix(layout.MACHINES).items()]
    return sorted((MachineRow(m["id"], m["name"], m["ip"], m.get("metadata", {}), m["id"] == engine) for m in rows),
                  key=lambda m: m.name)


def list_units(client) -> list[UnitRow]:
    records = (unit_record(key, value) for key, value in client.get_prefix(layout.UNITS).items())
    units = {record["name"]: record for record in records}
    names = {m.id: m.name for m in machines(client)}
    schedule = {k.rsplit("/", 1)[1]: v for k, v in client.get_prefix(layout.SCHEDULE).items()}
    pending = {k.rsplit("/", 1)[1]: v for k, v in client.get_prefix(layout.PENDING).items()}
    states: dict[str, dict[str, dict]] = {}
    for key, value in client.get_prefix(layout.STATES).items():
        _, _, rest = key.partition(layout.STATES)
        unit, _, machine = rest.rpartition("/")
        states.setdefault(unit, {})[machine] = json_record(key, value, {"active": str, "sub": str})
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


def unit_endpoints(client, name: str, endpoints: dict) -> list:
    """The SSH endpoints (of `endpoints`, the lab's nodes by name) of the machines running a unit.

    A machine that is no longer one of the lab's nodes (removed a moment ago,
    or a record no agent wrote) is an error naming it, not a KeyError.
    """
    found = machine_of(client, name)
    gone = [m for m in found if m.name not in endpoints]
    if gone:
        listed = ", ".join(f"{m.name} ({m.id[:12]})" for m in gone)
        raise UnitUsageError(
            f"{name} is on machine {listed}, which is not a node of this lab (nodes: {', '.join(endpoints)})",
            hint="the scheduler moves the unit once that machine's lease runs out, in seconds (see `lab unit "
                 "list`); a machine that stays in `lab machines` is a stale record: "
                 + "; ".join(f"`lab etcdctl -- del {layout.MACHINES}{m.id}`" for m in gone))
    return [endpoints[m.name] for m in found]
