"""fleet's unit files and scheduler, as pure functions.

Two places use this module: the engine (the elected agent on a node) to
decide where units run, and the `lab` CLI on the host to validate unit files
and explain why a unit is pending. On the nodes it is copied next to agent.py;
it imports nothing, not even its siblings, but the Python standard library.

Semantics follow CoreOS fleet's [X-Fleet] section (MachineID, MachineOf,
MachineMetadata, Conflicts, Global, with %n %N %p %i specifiers), with
stricter parsing: where fleet silently ignored a malformed option, this
raises a UnitError naming the unit file and line.

Scheduling decisions taken here (fleet left them implicit):
- Global units are placed first, on every machine whose metadata matches,
  and never move for anything. They cannot declare Conflicts (fleet forbids
  any option but MachineMetadata on them), but a non-global unit's Conflicts=
  does count a global unit running on a machine: `Conflicts=monitor.service`
  keeps a unit off the machines that run the global monitor.
- A healthy assignment never moves: current placements that still satisfy
  every constraint are kept before anything new is placed, so new units see
  the real load and cannot push an existing unit off its machine.
- Units are processed by MachineOf depth, then name: a unit's MachineOf
  target is always decided before the unit itself.
"""

from __future__ import annotations

import difflib
import fnmatch
import re
import shlex
from dataclasses import dataclass, field

UNIT_SUFFIXES = (".service", ".socket", ".timer", ".target", ".path", ".mount")
FLEET_SECTION = "X-Fleet"
FLEET_KEYS = ("MachineID", "MachineOf", "MachineMetadata", "Conflicts", "Global")

# Names fleet <= 0.8 accepted; refused here with the modern name to use.
_DEPRECATED_KEYS = {
    "X-ConditionMachineID": "MachineID",
    "X-ConditionMachineBootID": "MachineID",
    "X-ConditionMachineOf": "MachineOf",
    "X-ConditionMachineMetadata": "MachineMetadata",
    "X-Conflicts": "Conflicts",
}
_TRUE = ("1", "yes", "y", "true", "t", "on")
_FALSE = ("0", "no", "n", "false", "f", "off")
_NAME_CHARS = re.compile(r"[A-Za-z0-9:_.\\-]+")
_MAX_NAME = 255
_MAX_LISTED = 8  # machines or units listed in one pending reason


class UnitError(ValueError):
    """A unit file or unit name fleet cannot accept: `hello.service:4: what is wrong`."""

    def __init__(self, unit: str, line: int | None, problem: str) -> None:
        super().__init__(unit, line, problem)
        self.unit = unit
        self.line = line
        self.problem = problem

    def __str__(self) -> str:
        where = self.unit if self.line is None else f"{self.unit}:{self.line}"
        return f"{where}: {self.problem}"


@dataclass(frozen=True)
class FleetOptions:
    """The [X-Fleet] section of a unit, specifiers already expanded."""

    machine_id: str | None = None
    machine_of: tuple[str, ...] = ()
    conflicts: tuple[str, ...] = ()
    global_: bool = False
    # ((key, (value, ...)), ...): any value of a key matches, every key must.
    metadata: tuple[tuple[str, tuple[str, ...]], ...] = ()


@dataclass(frozen=True)
class Unit:
    name: str
    text: str
    options: FleetOptions

    @property
    def is_template(self) -> bool:
        """`hello@.service`: a pattern for instances, never scheduled itself."""
        return _split_name(self.name)[1] == ""


@dataclass(frozen=True)
class Machine:
    id: str
    name: str
    ip: str
    # Left out of the hash so a Machine stays hashable; equality still compares it.
    metadata: dict[str, str] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "metadata", dict(self.metadata))


@dataclass
class Plan:
    """Where every unit goes.

    assignments: non-global unit -> machine id.
    pending: unit -> why it cannot run now. A global unit matching no machine
        is listed here too (and in global_targets with an empty list).
    global_targets: global unit -> ids of every machine it runs on, sorted by
        machine name.
    """

    assignments: dict[str, str] = field(default_factory=dict)
    pending: dict[str, str] = field(default_factory=dict)
    global_targets: dict[str, list[str]] = field(default_factory=dict)


# ---------------------------------------------------------------- unit names


def _split_name(name: str) -> tuple[str, str | None, str]:
    """`prefix@instance.suffix` -> (prefix, instance or None, suffix); ValueError if invalid."""
    if not name:
        raise ValueError("a unit name cannot be empty")
    if len(name) > _MAX_NAME:
        raise ValueError(f"a unit name is at most {_MAX_NAME} characters")
    if "/" in name:
        raise ValueError("a unit name cannot contain '/'")
    stem, dot, kind = name.rpartition(".")
    suffix = dot + kind
    if not dot or suffix not in UNIT_SUFFIXES:
        raise ValueError(f"a unit name must end in one of {', '.join(UNIT_SUFFIXES)}")
    prefix, at, instance = stem.partition("@")
    if not prefix:
        raise ValueError(f"nothing before {'@' if at else suffix}")
    if not _NAME_CHARS.fullmatch(prefix) or (instance and not _NAME_CHARS.fullmatch(instance)):
        raise ValueError("a unit name may only use letters, digits and : _ . \\ - (plus one @)")
    return prefix, (instance if at else None), suffix


def _specifiers(name: str) -> dict[str, str]:
    prefix, instance, suffix = _split_name(name)
    return {"n": name, "N": name[: -len(suffix)], "p": prefix, "i": instance or "", "%": "%"}


def _expand(token: str, specifiers: dict[str, str]) -> str:
    def one(match: re.Match[str]) -> str:
        letter = match.group(1)
        if not letter:
            raise ValueError("a lone % at the end (write %% for a literal %)")
        if letter not in specifiers:
            raise ValueError(f"unknown specifier %{letter} (fleet knows %n %N %p %i; write %% for a literal %)")
        return specifiers[letter]

    return re.sub(r"%(.?)", one, token)


# ---------------------------------------------------------------- parsing


def _words(value: str) -> list[str]:
    """Split on whitespace, honouring quotes; backslashes stay (systemd escapes like \\x2d)."""
    lexer = shlex.shlex(value, posix=True)
    lexer.whitespace_split = True
    lexer.escape = ""
    lexer.commenters = ""
    return list(lexer)


def _logical_lines(name: str, text: str):
    """Yield (line number, section, key, value) for every assignment in the file.

    systemd syntax: a trailing backslash joins the next line (with a space),
    comment lines inside a continuation are skipped, the line number is the
    first physical line of the joined one.
    """
    lines = text.splitlines()
    section: str | None = None
    content = False
    index = 0
    while index < len(lines):
        number = index + 1
        line = lines[index].strip()
        index += 1
        if not line or line[0] in "#;":
            continue
        while line.endswith("\\"):
            line = line[:-1] + " "
            while index < len(lines) and lines[index].strip()[:1] in ("#", ";"):
                index += 1
            if index == len(lines):
                break
            line += lines[index].strip()
            index += 1
        line = line.strip()
        content = True
        if line.startswith("["):
            inner = line[1:-1]
            if not line.endswith("]") or not inner or "[" in inner or "]" in inner:
                raise UnitError(name, number,
                                f"malformed section header {line!r}: write it as [Name], e.g. [{FLEET_SECTION}]")
            if inner != FLEET_SECTION and difflib.get_close_matches(inner.lower(), [FLEET_SECTION.lower()], cutoff=0.8):
                raise UnitError(name, number, f"unknown section [{inner}]: did you mean [{FLEET_SECTION}]?")
            section = inner
            continue
        if section is None:
            raise UnitError(name, number, f"{line!r} is outside any section: put it under a header "
                                          f"such as [Unit], [Service] or [{FLEET_SECTION}]")
        key, equals, value = line.partition("=")
        if not equals:
            raise UnitError(name, number, f"{line!r} is not an assignment: expected Key=value")
        if not key.strip():
            raise UnitError(name, number, f"{line!r} has no key before '='")
        yield number, section, key.strip(), value.strip()
    if not content:
        raise UnitError(name, 1, "empty unit file: expected at least a [Unit] or [Service] section")


def _unknown_key(key: str) -> str:
    if key in _DEPRECATED_KEYS:
        return f"{key}= is fleet's old name for {_DEPRECATED_KEYS[key]}=: use {_DEPRECATED_KEYS[key]}="
    lowered = {known.lower(): known for known in FLEET_KEYS}
    close = difflib.get_close_matches(key.lower(), list(lowered), n=1)
    hint = f"did you mean {lowered[close[0]]}?" if close else f"known keys: {', '.join(FLEET_KEYS)}"
    return f"unknown [{FLEET_SECTION}] key {key!r}: {hint}"


def parse_unit(name: str, text: str) -> Unit:
    """Parse a unit file and its [X-Fleet] options; raise UnitError naming name:line."""
    try:
        specifiers = _specifiers(name)
    except ValueError as exc:
        raise UnitError(name, None, f"invalid unit name: {exc}") from None

    machine_id: tuple[str, int] | None = None
    machine_of: tuple[str, int] | None = None
    global_: tuple[bool, int] | None = None
    conflicts: list[tuple[str, int]] = []
    metadata: dict[str, list[str]] = {}

    for number, section, key, value in _logical_lines(name, text):
        if section != FLEET_SECTION:
            continue  # systemd's own keys are systemd's business
        if key not in FLEET_KEYS:
            raise UnitError(name, number, _unknown_key(key))
        try:
            tokens = [_expand(token, specifiers) for token in _words(value)]
        except ValueError as exc:
            raise UnitError(name, number, f"{key}={value}: {exc}") from None
        if not tokens:
            raise UnitError(name, number, f"{key}= needs a value")

        if key in ("MachineID", "MachineOf", "Global"):
            earlier = {"MachineID": machine_id, "MachineOf": machine_of, "Global": global_}[key]
            if earlier is not None or len(tokens) > 1:
                where = f"already set on line {earlier[1]}" if earlier is not None else f"got {len(tokens)} values"
                raise UnitError(name, number, f"{key}= takes a single value ({where})")
            token = tokens[0]
            if key == "MachineID":
                machine_id = (token, number)
            elif key == "MachineOf":
                try:
                    if _split_name(token)[1] == "":
                        raise ValueError("it is a template, which never runs; name an instance such as "
                                         f"{token.replace('@.', '@1.')}")
                except ValueError as exc:
                    raise UnitError(name, number, f"MachineOf={token}: {exc}") from None
                if token == name:
                    raise UnitError(name, number, f"MachineOf={token}: a unit cannot follow itself")
                machine_of = (token, number)
            else:
                if token.lower() not in _TRUE + _FALSE:
                    raise UnitError(name, number, f"Global={token} is not a boolean: use true or false")
                global_ = (token.lower() in _TRUE, number)
        elif key == "Conflicts":
            conflicts.extend((token, number) for token in tokens)
        else:  # MachineMetadata
            for token in tokens:
                meta_key, equals, meta_value = token.partition("=")
                if not equals or not meta_key or not meta_value:
                    raise UnitError(name, number, f"MachineMetadata: {token!r} is not key=value")
                values = metadata.setdefault(meta_key, [])
                if meta_value not in values:
                    values.append(meta_value)

    if global_ is not None and global_[0]:
        others = [("MachineID", machine_id[1] if machine_id else None),
                  ("MachineOf", machine_of[1] if machine_of else None),
                  ("Conflicts", conflicts[0][1] if conflicts else None)]
        for option, number in others:
            if number is not None:
                raise UnitError(name, number, f"{option}= cannot be combined with Global=true (line {global_[1]}): "
                                "a global unit runs on every machine matching its MachineMetadata, "
                                "the only option it may have")
    return Unit(name=name, text=text, options=FleetOptions(
        machine_id=machine_id[0] if machine_id else None,
        machine_of=(machine_of[0],) if machine_of else (),
        conflicts=tuple(dict.fromkeys(glob for glob, _ in conflicts)),
        global_=bool(global_ and global_[0]),
        metadata=tuple((key, tuple(values)) for key, values in metadata.items()),
    ))


# ---------------------------------------------------------------- placement


def _matches_metadata(machine: Machine, required: tuple[tuple[str, tuple[str, ...]], ...]) -> bool:
    return all(machine.metadata.get(key) in values for key, values in required)


def _format_required(required: tuple[tuple[str, tuple[str, ...]], ...]) -> str:
    return " ".join(f"{key}={'|'.join(values)}" for key, values in required)


def _listed(items: list[str]) -> str:
    shown = items[:_MAX_LISTED]
    more = len(items) - len(shown)
    return ", ".join(shown) + (f", ... ({more} more)" if more else "")


def _describe_metadata(machines: list[Machine]) -> str:
    return _listed([f"{m.name} " + (",".join(f"{k}={v}" for k, v in sorted(m.metadata.items())) or "(no metadata)")
                    for m in machines])


class _Scheduler:
    """One run of place(): the plan so far and what runs where."""

    def __init__(self, units: list[Unit], machines: list[Machine]) -> None:
        self.units: dict[str, Unit] = {}
        for unit in units:
            if unit.name in self.units:
                raise ValueError(f"unit {unit.name} is listed twice")
            self.units[unit.name] = unit
        self.machines = sorted(machines, key=lambda m: (m.name, m.id))
        self.by_id: dict[str, Machine] = {}
        for machine in self.machines:
            if machine.id in self.by_id:
                raise ValueError(f"machine id {machine.id} is listed twice ({self.by_id[machine.id].name}, {machine.name})")
            self.by_id[machine.id] = machine
        self.plan = Plan()
        self.residents: dict[str, list[str]] = {m.id: [] for m in self.machines}  # machine id -> unit names

    def assign(self, unit: Unit, machine: Machine) -> None:
        self.plan.assignments[unit.name] = machine.id
        self.residents[machine.id].append(unit.name)

    def clashes(self, unit: Unit, machine: Machine) -> list[str]:
        """Units on `machine` that `unit` conflicts with, in either direction."""
        found = []
        for other in sorted(self.residents[machine.id]):
            if other == unit.name:
                continue
            if any(fnmatch.fnmatchcase(other, glob) for glob in unit.options.conflicts):
                found.append(other)
                continue
            other_unit = self.units[other]
            reverse = [glob for glob in other_unit.options.conflicts if fnmatch.fnmatchcase(unit.name, glob)]
            if reverse:
                found.append(f"{other} (its Conflicts={reverse[0]})")
        return found

    def candidates(self, unit: Unit, pool: list[Machine]) -> tuple[list[Machine], str]:
        """The machines of `pool` that `unit` may run on, or ([], why not)."""
        options = unit.options
        if not pool:
            return [], "no machines in the cluster"
        if options.machine_id is not None:
            pool = [m for m in pool if m.id == options.machine_id]
            if not pool:
                known = _listed([f"{m.name}={m.id}" for m in self.machines])
                return [], f"MachineID={options.machine_id}: no such machine (machines: {known})"
        prefix = ""
        if options.machine_of:
            target = options.machine_of[0]
            hosts = ([self.plan.assignments[target]] if target in self.plan.assignments
                     else self.plan.global_targets.get(target, []))
            if not hosts:
                why = ("no such unit" if target not in self.units
                       else "it is pending" if target in self.plan.pending else "it is not placed yet")
                return [], f"MachineOf={target}: {target} is not scheduled ({why})"
            host_names = ", ".join(self.by_id[h].name for h in hosts)
            pool = [m for m in pool if m.id in hosts]
            if not pool:
                return [], f"MachineOf={target}: {target} runs on {host_names}, not on MachineID={options.machine_id}"
            prefix = f"MachineOf={target}: {target} runs on {host_names}; "
        if options.metadata:
            matching = [m for m in pool if _matches_metadata(m, options.metadata)]
            if not matching:
                return [], (f"{prefix}no machine has metadata {_format_required(options.metadata)} "
                            f"(machines: {_describe_metadata(pool)})")
            pool = matching
        free, blocked = [], []
        for machine in pool:
            clashes = self.clashes(unit, machine)
            if clashes:
                blocked.append(f"{machine.name}: {', '.join(clashes)}")
            else:
                free.append(machine)
        if not free:
            header = f"Conflicts={' '.join(options.conflicts)}: " if options.conflicts else ""
            return [], f"{prefix}{header}every matching machine runs a conflicting unit ({_listed(blocked)})"
        return free, ""

    def load(self, machine: Machine) -> int:
        return len(self.residents[machine.id])

    def order(self, names: list[str]) -> list[str]:
        """Non-global units, each after its MachineOf target; cycle members become pending."""
        inside = set(names)

        def target(name: str) -> str | None:
            of = self.units[name].options.machine_of
            return of[0] if of and of[0] in inside else None

        depth: dict[str, int] = {}
        for start in sorted(names):
            path: list[str] = []
            position: dict[str, int] = {}
            current: str | None = start
            while current is not None and current not in depth:
                if current in position:
                    cycle = path[position[current]:]
                    reason = "MachineOf cycle: " + " -> ".join(cycle + [current])
                    for member in cycle:
                        depth[member] = 0
                        self.plan.pending[member] = reason
                    del path[position[current]:]
                    break
                position[current] = len(path)
                path.append(current)
                current = target(current)
            for name in reversed(path):
                parent = target(name)
                depth[name] = 0 if parent is None else depth[parent] + 1
        return sorted((n for n in names if n not in self.plan.pending), key=lambda n: (depth[n], n))


def place(units: list[Unit], machines: list[Machine], current: dict[str, str]) -> Plan:
    """Decide where every unit runs.

    `current` maps unit name -> machine id of the existing assignments; those
    still valid are kept, the rest (and new units) go to the least loaded
    machine that satisfies MachineID, MachineOf, MachineMetadata and
    Conflicts, ties broken by machine name. Pure: same inputs, same plan.
    """
    run = _Scheduler(units, machines)
    plan = run.plan

    for name in sorted(run.units):
        unit = run.units[name]
        if unit.is_template:
            plan.pending[name] = (f"{name} is a template: it never runs itself, "
                                  f"start an instance such as {name.replace('@.', '@1.')}")
        elif unit.options.global_:
            targets = [m for m in run.machines if _matches_metadata(m, unit.options.metadata)]
            plan.global_targets[name] = [m.id for m in targets]
            for machine in targets:
                run.residents[machine.id].append(name)
            if not run.machines:
                plan.pending[name] = "no machines in the cluster"
            elif not targets:
                plan.pending[name] = (f"no machine has metadata {_format_required(unit.options.metadata)} "
                                      f"(machines: {_describe_metadata(run.machines)})")

    order = run.order([n for n, u in run.units.items() if not u.options.global_ and not u.is_template])

    # Keep every assignment that is still valid before placing anything, so
    # new units see the real load and cannot take a kept unit's place.
    for name in order:
        machine = run.by_id.get(current.get(name))
        if machine is not None:
            fits, _ = run.candidates(run.units[name], [machine])
            if fits:
                run.assign(run.units[name], machine)

    for name in order:
        if name in plan.assignments:
            continue
        fits, reason = run.candidates(run.units[name], run.machines)
        if fits:
            run.assign(run.units[name], min(fits, key=lambda m: (run.load(m), m.name, m.id)))
        else:
            plan.pending[name] = reason
    return plan
