"""Why a register is not linearizable, in words: the operation no order gets past, and what ran around it.

The linearizability search (lab.scenarios.linearizable) reports the deepest
point it reached: the return of an operation that no configuration got past,
and the values the register could hold there. `explain` turns that into the
operation, the values it could see, the operations that wrote them, and its
neighbours in time.
"""

from __future__ import annotations

import json
from typing import Any

from lab.scenarios.history import Op


def _v(value: Any) -> str:
    return json.dumps(value)


def describe(op: Op) -> str:
    """One line for an operation: id, process, what it did, when, status."""
    if op.kind == "read":
        what = f"read -> {_v(op.output) if op.status == 'ok' else '?'}"
    elif op.kind == "cas":
        result = _v(op.output) if op.status == "ok" else "?"
        what = f"cas {_v(op.expected)} -> {_v(op.value)}: {result}"
    else:
        what = f"{op.kind} {_v(op.value)}"
    end = "?" if op.complete is None else f"{op.complete:.6f}"
    return f"op {op.id} (process {op.process}) {what:<28} [{op.invoke:.6f}, {end}] {op.status}"


def _sets(op: Op, value: Any) -> bool:
    """Whether op may leave `value` in the register."""
    if op.value != value or op.kind not in ("write", "cas"):
        return False
    return op.status == "unknown" or op.kind == "write" or op.output is True


def explain(key: str, known: list[Op], unknown: list[Op], init: Any, blocking: Op | None,
            states: set) -> str:
    """Why the history up to `blocking`'s completion fits no order; `states`: what the register could hold."""
    if blocking is None:  # pragma: no cover - the search always records a frontier
        return f"key {key!r}: not linearizable"
    end = blocking.complete
    everything = known + unknown
    invoked = sum(1 for op in everything if op.invoke <= end)
    lines = [f"key {key!r}: not linearizable. The history up to op {blocking.id}'s completion at "
             f"{end:.6f} ({invoked} of its {len(everything)} operations invoked by then) has no valid "
             f"order; every operation that completed before it does fit one."]

    if blocking.kind == "read":
        needs = f"the register to hold {_v(blocking.output)}"
        needed = [blocking.output]
    elif blocking.output:
        needs = f"the register to hold {_v(blocking.expected)}"
        needed = [blocking.expected]
    else:
        needs = f"the register to hold anything but {_v(blocking.expected)}"
        needed = []
    held = ", ".join(sorted(_v(s) for s in states))
    if needed and needed[0] in states or not needed and states - {blocking.expected}:
        # it could take effect there, but every such order fails further on
        lines.append(f"  op {blocking.id} ({_describe_short(blocking)}) needs {needs}; the register could "
                     f"hold {held} when it had to take effect, but no order of the operations around it fits.")
    else:
        lines.append(f"  op {blocking.id} ({_describe_short(blocking)}) needs {needs}, but when it had to "
                     f"take effect the register could only hold: {held}.")

    # Who set the values involved: the last op invoked before `end` that may have.
    marks: dict[int, str] = {blocking.id: "<- cannot be linearized"}
    chosen: list[Op] = [blocking]
    for value in list(dict.fromkeys([*needed, *sorted(states, key=_v)])):
        writers = [op for op in everything if op.invoke <= end and _sets(op, value)]
        later = sorted((op for op in everything if op.invoke > end and _sets(op, value)), key=lambda op: op.invoke)
        if writers:
            writer = max(writers, key=lambda op: op.invoke)
            marks.setdefault(writer.id, f"(last to set {_v(value)})")
            chosen.append(writer)
        elif value == init:
            lines.append(f"  {_v(value)} is the register's initial value.")
        elif later:
            lines.append(f"  no operation invoked by then sets {_v(value)}; the first that does, op {later[0].id}, "
                         f"was invoked at {later[0].invoke:.6f}, after op {blocking.id} completed.")
            marks.setdefault(later[0].id, f"(sets {_v(value)}, too late)")
            chosen.append(later[0])
        else:
            lines.append(f"  no operation on this key ever sets {_v(value)}.")

    # What ran around it: from the earliest of those writers to the blocking op.
    start = min(op.invoke for op in chosen)
    around = [op for op in everything
              if op.invoke <= end and (op.complete is None or op.complete >= start) and op.id not in marks
              and (op.status == "ok" or op.invoke >= start)]
    around.sort(key=lambda op: abs(op.invoke - blocking.invoke))
    limit = max(0, 14 - len(chosen))
    shown = {op.id: op for op in chosen}
    for op in around[:limit]:
        shown[op.id] = op
    lines.append("  operations involved (by invoke time):")
    for op in sorted(shown.values(), key=lambda op: (op.invoke, op.id)):
        lines.append(f"    {describe(op)} {marks.get(op.id, '')}".rstrip())
    if len(around) > limit:
        lines.append(f"    ... and {len(around) - limit} more operations in that window")
    return "\n".join(lines)


def _describe_short(op: Op) -> str:
    if op.kind == "read":
        return f"process {op.process}, read -> {_v(op.output)}"
    if op.kind == "cas":
        return f"process {op.process}, cas {_v(op.expected)} -> {_v(op.value)}: {_v(op.output)}"
    return f"process {op.process}, {op.kind} {_v(op.value)}"
