"""The reboot lock: locksmith's semaphore in etcd, as pure functions and a compare-and-swap. Standard library only.

Copied to /var/lib/lab/ with the agents: the update agent on each node takes
and releases it; the host (`lab update`) sets its size and frees the lock of
a dead node, through its own etcd client. Both clients offer the gateway's
`call(path, body) -> dict`, which is all `Semaphore` uses.

The semaphore is one JSON key {"max": N, "holders": [...]}, changed only by a
transaction that compares its mod revision: two writers that read the same
revision cannot both win.
"""

from __future__ import annotations

import json

try:  # in the lab package on the host; beside this file on a node
    from .etcd import b64, unb64
    from .layout import SEMAPHORE
except ImportError:  # pragma: no cover - the node's way
    from etcd import b64, unb64  # type: ignore[no-redef]
    from layout import SEMAPHORE  # type: ignore[no-redef]


def new_semaphore(max_holders: int) -> dict:
    return {"max": max_holders, "holders": []}


def try_acquire(semaphore: dict, holder: str) -> dict | None:
    """The semaphore with `holder` added, or None if it is full (holding already counts as acquired)."""
    if holder in semaphore["holders"]:
        return semaphore
    if len(semaphore["holders"]) >= semaphore["max"]:
        return None
    return {**semaphore, "holders": [*semaphore["holders"], holder]}


def release(semaphore: dict, holder: str) -> dict:
    return {**semaphore, "holders": [h for h in semaphore["holders"] if h != holder]}


class Semaphore:
    """locksmith's semaphore: one JSON key, changed only by compare-and-swap on its mod revision."""

    def __init__(self, etcd, key: str = SEMAPHORE) -> None:
        self.etcd = etcd  # anything with the gateway's call(path, body) -> dict
        self.key = key

    def read(self, default_max: int) -> tuple[dict, str]:
        kvs = self.etcd.call("kv/range", {"key": b64(self.key)}).get("kvs") or []
        if not kvs:
            return new_semaphore(default_max), "0"
        return json.loads(unb64(kvs[0]["value"])), kvs[0]["mod_revision"]

    def swap(self, revision: str, value: dict) -> bool:
        """Write `value` if the key is still at `revision` ("0": still absent). Returns whether it was."""
        if revision == "0":
            compare = {"key": b64(self.key), "target": "CREATE", "result": "EQUAL", "create_revision": "0"}
        else:
            compare = {"key": b64(self.key), "target": "MOD", "result": "EQUAL", "mod_revision": revision}
        data = self.etcd.call("kv/txn", {"compare": [compare], "success": [
            {"request_put": {"key": b64(self.key), "value": b64(json.dumps(value, sort_keys=True))}}]})
        return bool(data.get("succeeded"))

    def acquire(self, holder: str, default_max: int) -> bool:
        while True:
            current, revision = self.read(default_max)
            wanted = try_acquire(current, holder)
            if wanted is None:
                return False
            if wanted is current or self.swap(revision, wanted):
                return True

    def release(self, holder: str, default_max: int) -> None:
        while True:
            current, revision = self.read(default_max)
            if holder not in current["holders"] or self.swap(revision, release(current, holder)):
                return

    def holds(self, holder: str, default_max: int) -> bool:
        return holder in self.read(default_max)[0]["holders"]

    def resize(self, max_holders: int) -> None:
        """Set how many may hold the lock at once (creating the semaphore if it is absent)."""
        current, revision = self.read(max_holders)
        if revision == "0" or current.get("max") != max_holders:
            self.swap(revision, {**current, "max": max_holders})
