"""JSON records the host reads from etcd, checked before use.

The agents write these keys, but so can anyone who can reach etcd (`lab
etcdctl -- put`, a buggy agent, a half-written record): the host never
trusts a value to hold what lab writes there. A record that does not is one
error naming the key and how to remove it, never a traceback.
"""

from __future__ import annotations

import json
from types import GenericAlias
from typing import Any

from lab.errors import StateError


class RecordError(StateError):
    """An etcd key under lab's prefixes does not hold the record lab writes there."""


def bad_record(key: str, value: str | None, why: str, hint: str | None = None) -> RecordError:
    shown = (value or "")[:60] + ("..." if len(value or "") > 60 else "")
    return RecordError(f"etcd key {key} does not hold what lab writes there ({why}): {shown!r}",
                       hint=hint or f"remove it: `lab etcdctl -- del {key}` (the agent that owns it writes it "
                                    "again)")


def json_record(key: str, value: str | None, required: dict[str, Any], optional: dict[str, Any] | None = None,
                hint: str | None = None) -> dict[str, Any]:
    """The JSON object in `value`, with each required field of its type and each optional one, if present,
    of its type (a type, a tuple of types, or `list[str]`); else RecordError naming `key`."""
    try:
        record = json.loads(value) if value is not None else None
    except (ValueError, RecursionError):
        raise bad_record(key, value, "not JSON", hint) from None
    if not isinstance(record, dict):
        raise bad_record(key, value, "not a JSON object", hint)
    for name, kind in {**required, **(optional or {})}.items():
        if (name in required or name in record) and not _is(record.get(name), kind):
            wanted = kind.__name__ if type(kind) is type else (
                str(kind) if isinstance(kind, GenericAlias) else " or ".join(k.__name__ for k in kind))
            raise bad_record(key, value, f"{name!r} should be {wanted}", hint)
    return record


def _is(value: Any, kind: Any) -> bool:
    if isinstance(kind, GenericAlias):  # list[str]: a list of those
        return isinstance(value, kind.__origin__) and all(_is(item, kind.__args__[0]) for item in value)
    # JSON's true is no count of anything, though Python's bool is an int
    return isinstance(value, kind) and not (isinstance(value, bool) and kind is not bool)
