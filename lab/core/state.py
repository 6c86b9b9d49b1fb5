"""The lab's state on disk: what exists, written before it is created.

`state.json` in the lab directory is rewritten atomically (temp file, fsync,
rename) after every change, so a crash or Ctrl-C at any point leaves a file
that lists everything that may exist. `destroy` walks that list; every
removal is idempotent, so a resource recorded but never created is fine.

A per-lab lock (flock on `lock`) keeps two lab commands from changing the same
lab at once. The lock dies with its process, so a kill -9 never leaves it held.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from lab.errors import StateError
from lab.host.files import write_atomic

STATE_FILE = "state.json"
SCHEMA_VERSION = 1


class LabState:
    """A JSON document with a `resources` list and free-form sections.

    Resources are {"kind": ..., "id": ..., ...} records, appended before the
    resource is created and removed after it is gone, in creation order so
    destroy can undo them in reverse.
    """

    def __init__(self, lab_dir: Path, data: dict[str, Any] | None = None) -> None:
        self.lab_dir = lab_dir
        self.data: dict[str, Any] = data or {"version": SCHEMA_VERSION, "resources": []}

    @property
    def path(self) -> Path:
        return self.lab_dir / STATE_FILE

    @classmethod
    def load(cls, lab_dir: Path) -> "LabState | None":
        path = lab_dir / STATE_FILE
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise StateError(f"{path}: cannot be read ({exc})",
                             hint=f"remove {lab_dir} by hand after checking nothing of it runs") from None
        if data.get("version") != SCHEMA_VERSION:
            raise StateError(f"{path}: state version {data.get('version')} is not {SCHEMA_VERSION}",
                             hint="destroy the lab with the lab version that created it")
        return cls(lab_dir, data)

    def save(self) -> None:
        write_atomic(self.path, json.dumps(self.data, indent=2, sort_keys=True) + "\n")

    def __getitem__(self, key: str) -> Any:
        return self.data[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.data.get(key, default)

    def set(self, key: str, value: Any) -> None:
        self.data[key] = value
        self.save()

    # -- resources

    @property
    def resources(self) -> list[dict[str, Any]]:
        return self.data.setdefault("resources", [])

    def record(self, kind: str, ident: str, **details: Any) -> dict[str, Any]:
        """Record a resource before creating it (updates details if already recorded)."""
        for res in self.resources:
            if res["kind"] == kind and res["id"] == ident:
                res.update(details)
                break
        else:
            res = {"kind": kind, "id": ident, **details}
            self.resources.append(res)
        self.save()
        return res

    def find(self, kind: str, ident: str | None = None) -> list[dict[str, Any]]:
        return [r for r in self.resources if r["kind"] == kind and (ident is None or r["id"] == ident)]

    def forget(self, kind: str, ident: str) -> None:
        self.data["resources"] = [r for r in self.resources if not (r["kind"] == kind and r["id"] == ident)]
        self.save()


@contextmanager
def lab_lock(lab_dir: Path, command: str, wait: float = 0.0) -> Iterator[None]:
    # The lock lives outside the lab directory, so a command refused for bad
    # input leaves nothing in the project, and destroy can remove the lab
    # directory while holding it.
    from lab.host.network import lab_id
    from lab.host.paths import state_home

    locks = state_home() / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    with open(locks / f"{lab_id(lab_dir)}.lock", "a+") as handle:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() < deadline:
                    time.sleep(0.1)
                    continue
            handle.seek(0)
            holder = handle.read().strip() or "another lab command"
            raise StateError(f"lab {lab_dir.name} ({lab_dir}) is busy: {holder} is running on it",
                             hint="wait for it to finish (or stop it with Ctrl-C), then retry") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"`lab {command}` (pid {os.getpid()})\n")
        handle.flush()
        try:
            yield
        finally:
            handle.seek(0)
            handle.truncate()
