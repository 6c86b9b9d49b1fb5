"""The workload's history: one `Op` per operation, read and written as JSONL, and the lost-write check.

A workload records every operation it issues into a JSONL history (one `Op`
per line, see `lab.scenarios.workload`). After a fault scenario the history
answers two questions, with no I/O beyond reading that file:

* `check_lost_writes` (here): is every acknowledged `unique` write still
  present?
* `check_linearizable` (lab.scenarios.linearizable): is there one total
  order of the read/write/cas operations, consistent with real time, in
  which each key behaves like a single register?

`simulate_history` makes linearizable histories of any size for the tests
and the benchmark.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from lab.errors import LabError
from lab.host.files import write_atomic

KINDS = ("read", "write", "cas", "unique")
STATUSES = ("ok", "fail", "unknown")
REGISTER_KINDS = ("read", "write", "cas")


class HistoryError(LabError, ValueError):
    """A history file or list of operations is malformed (also a ValueError)."""


@dataclass(frozen=True)
class Op:
    id: int
    process: int
    kind: str  # read | write | cas | unique
    key: str
    value: str | None  # written value (write, cas, unique)
    expected: str | None  # cas: the value it compares with; None means "key absent"
    invoke: float
    complete: float | None  # None when status is unknown
    status: str  # ok | fail | unknown
    output: Any  # read: value read (None: absent); cas: True/False applied


FIELDS = tuple(f.name for f in fields(Op))
_OPTIONAL_FIELDS = ("value", "expected", "complete", "output")  # may be left out of a line: null


@dataclass
class LostWriteReport:
    ok: bool
    acknowledged: int
    lost: list[Op]
    unacknowledged_present: int


# ---------------------------------------------------------------- reading and writing histories


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def problem_of(op: Op) -> str | None:
    """What is wrong with one operation, or None."""
    if not isinstance(op.id, int) or isinstance(op.id, bool):
        return f"id must be an integer, got {op.id!r}"
    if not isinstance(op.process, int) or isinstance(op.process, bool):
        return f"process must be an integer, got {op.process!r}"
    if op.kind not in KINDS:
        return f"kind must be one of {', '.join(KINDS)}, got {op.kind!r}"
    if op.status not in STATUSES:
        return f"status must be one of {', '.join(STATUSES)}, got {op.status!r}"
    if not isinstance(op.key, str):
        return f"key must be a string, got {op.key!r}"
    if not _is_number(op.invoke):
        return f"invoke must be a number of seconds, got {op.invoke!r}"
    if op.complete is not None:
        if not _is_number(op.complete):
            return f"complete must be a number of seconds or null, got {op.complete!r}"
        if op.complete < op.invoke:
            return f"complete ({op.complete}) is before invoke ({op.invoke})"
    elif op.status == "ok":
        return "status is ok but complete is null (an operation without an answer is unknown)"
    for name in ("value", "expected"):
        if isinstance(getattr(op, name), (list, dict)):
            return f"{name} must be a plain value, got {getattr(op, name)!r}"
    if op.status == "ok":
        if op.kind == "cas" and not isinstance(op.output, bool):
            return f"an ok cas needs output true or false, got {op.output!r}"
        if op.kind == "read" and isinstance(op.output, (list, dict)):
            return f"a read's output must be a plain value, got {op.output!r}"
    return None


def load_history(path: str | os.PathLike) -> list[Op]:
    """Read a JSONL history; a malformed line raises HistoryError (a ValueError) naming it."""
    path = Path(path)
    ops: list[Op] = []
    with path.open(encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise HistoryError(f"{where}: not valid JSON ({exc.msg}, column {exc.colno})",
                                   hint="each line must be one JSON object, as lab.scenarios.workload writes "
                                        "them") from None
            if not isinstance(obj, dict):
                raise HistoryError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            missing = [name for name in FIELDS if name not in obj and name not in _OPTIONAL_FIELDS]
            if missing:
                raise HistoryError(f"{where}: missing field{'s' if len(missing) > 1 else ''} {', '.join(missing)}",
                                   hint=f"an operation has the fields {', '.join(FIELDS)}")
            op = Op(**{name: obj.get(name) for name in FIELDS})
            problem = problem_of(op)
            if problem:
                raise HistoryError(f"{where}: {problem}")
            ops.append(op)
    return ops


def dump_history(ops: list[Op], path: str | os.PathLike) -> None:
    """Write a JSONL history atomically (a reader never sees half a file)."""
    write_atomic(Path(path), "".join(json.dumps(asdict(op)) + "\n" for op in ops))


# ---------------------------------------------------------------- lost writes


def check_lost_writes(ops: list[Op], final: dict[str, str]) -> LostWriteReport:
    """Every acknowledged `unique` write must be in `final` with its value.

    Unknown ones may or may not be there; those present are counted. A key
    present with another value counts as lost: unique keys are never
    overwritten.
    """
    acknowledged = 0
    lost: list[Op] = []
    present = 0
    for op in ops:
        if op.kind != "unique":
            continue
        if op.status == "ok":
            acknowledged += 1
            if op.key not in final or final[op.key] != op.value:
                lost.append(op)
        elif op.status == "unknown" and op.key in final and final[op.key] == op.value:
            present += 1
    return LostWriteReport(not lost, acknowledged, lost, present)


# ---------------------------------------------------------------- simulated histories (tests, benchmarks)


def simulate_history(rng: random.Random, n_ops: int, *, keys: int = 5, processes: int = 10,
                     read_ratio: float = 0.5, cas_ratio: float = 0.2, unknown_ratio: float = 0.0,
                     fail_ratio: float = 0.0, slow_ratio: float = 0.01) -> list[Op]:
    """A history of a real linearizable register store with random concurrency.

    Each process issues one operation at a time (latency ~ exponential, 5 ms
    mean; `slow_ratio` of them take 0.2-1 s). Every operation takes effect at
    a random instant inside its interval, and the outputs come from applying
    them in that order, so the history is linearizable by construction.
    Unknown writes/CAS take effect half of the time, at any instant after
    their invoke (possibly after the client gave up).
    """
    ops_plan = []  # (id, process, kind, key, value, expected, invoke, complete, status)
    clock = [rng.uniform(0, 0.002) for _ in range(processes)]
    last_seen: dict[tuple[int, str], Any] = {}
    for op_id in range(n_ops):
        process = min(range(processes), key=clock.__getitem__)
        invoke = clock[process]
        latency = rng.uniform(0.2, 1.0) if rng.random() < slow_ratio else rng.expovariate(1 / 0.005)
        complete = invoke + latency
        clock[process] = complete + rng.expovariate(1 / 0.001)
        key = f"r{rng.randrange(keys)}"
        roll = rng.random()
        kind = "read" if roll < read_ratio else "cas" if roll < read_ratio + cas_ratio else "write"
        value = None if kind == "read" else f"{process}-{op_id}"
        expected = last_seen.get((process, key)) if kind == "cas" else None
        roll = rng.random()
        status = "unknown" if roll < unknown_ratio else "fail" if roll < unknown_ratio + fail_ratio else "ok"
        ops_plan.append([op_id, process, kind, key, value, expected, invoke, complete, status])
        if kind != "read":
            last_seen[(process, key)] = value

    effects = []  # (instant, plan index)
    for index, plan in enumerate(ops_plan):
        invoke, complete, status = plan[6], plan[7], plan[8]
        if status == "ok":
            effects.append((rng.uniform(invoke, complete), index))
        elif status == "unknown" and plan[2] != "read" and rng.random() < 0.5:
            effects.append((invoke + rng.uniform(0, 2 * (complete - invoke)), index))
    effects.sort()
    registers: dict[str, Any] = {}
    outputs: dict[int, Any] = {}
    for _, index in effects:
        _, _, kind, key, value, expected, *_ = ops_plan[index]
        if kind == "read":
            outputs[index] = registers.get(key)
        elif kind == "write":
            registers[key] = value
        else:
            applied = registers.get(key) == expected
            if applied:
                registers[key] = value
            outputs[index] = applied

    history = []
    for index, (op_id, process, kind, key, value, expected, invoke, complete, status) in enumerate(ops_plan):
        history.append(Op(op_id, process, kind, key, value, expected, round(invoke, 6),
                          None if status == "unknown" else round(complete, 6), status,
                          outputs.get(index) if status == "ok" else None))
    return history
