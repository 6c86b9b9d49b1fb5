"""A recorded workload against etcd, for scenarios: writes, reads and CAS with a history.

Several client "processes" (threads, each with its own connection pool and
endpoint failover) run while faults happen:
  * unique writers put keys that are never overwritten, for the lost-write
    check;
  * register clients read, write and compare-and-set a few shared keys, for
    the linearizability check.
Every operation is recorded with its invoke and completion time (one
monotonic clock) and outcome: ok, fail (surely not applied: no endpoint took
the connection) or unknown (sent, no answer: maybe applied). The history is
written as JSONL in the format `lab.scenarios.history` reads.
"""

from __future__ import annotations

import json
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from lab.cluster.etcdclient import EtcdClient, EtcdError, EtcdUnavailable, EtcdUnknown

PREFIX = "/lab/workload"


@dataclass
class WorkloadConfig:
    register_clients: int = 4
    unique_writers: int = 2
    registers: int = 3
    pause_s: float = 0.01  # between a client's operations: keeps histories checkable
    op_timeout_s: float = 1.0
    seed: int = 1


@dataclass
class WorkloadStats:
    ops: int = 0
    by_status: dict[str, int] = field(default_factory=dict)  # ok / fail / unknown
    by_kind: dict[str, int] = field(default_factory=dict)


class Workload:
    def __init__(self, client_factory: Callable[[float], EtcdClient], history_path: Path,
                 config: WorkloadConfig | None = None, clock: Callable[[], float] = time.monotonic,
                 run_id: str = "run") -> None:
        self.client_factory = client_factory
        # Keys of one run never meet another's: the checkers assume registers
        # start absent, and count only this run's unique writes.
        self.prefix = f"{PREFIX}/{run_id}"
        self.history_path = history_path
        self.config = config or WorkloadConfig()
        self.clock = clock
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._next_id = 0
        self._file = None
        self.stats = WorkloadStats()

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self.history_path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.history_path, "a", encoding="utf-8")
        rng = random.Random(self.config.seed)
        process = 0
        for _ in range(self.config.register_clients):
            self._spawn(self._register_op, process, random.Random(rng.random()))
            process += 1
        for _ in range(self.config.unique_writers):
            self._spawn(self._unique_op, process, random.Random(rng.random()))
            process += 1

    def stop(self) -> WorkloadStats:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=self.config.op_timeout_s * 3 + 5)
        if self._file is not None:
            self._file.close()
            self._file = None
        return self.stats

    def _spawn(self, one_op, process: int, rng: random.Random) -> None:
        thread = threading.Thread(target=self._client, args=(one_op, process, rng), name=f"workload-{process}",
                                  daemon=True)
        self._threads.append(thread)
        thread.start()

    # ------------------------------------------------------------ clients

    def _client(self, one_op, process: int, rng: random.Random) -> None:
        """One client process: its own connection, one operation at a time (the n-th) until stopped."""
        client = self.client_factory(self.config.op_timeout_s)
        n = 0
        try:
            while not self._stop.is_set():
                one_op(client, process, rng, n)
                n += 1
                self._stop.wait(self.config.pause_s)
        finally:
            client.close()

    def _register_op(self, client: EtcdClient, process: int, rng: random.Random, n: int) -> None:
        key = f"r{rng.randrange(self.config.registers)}"
        path = f"{self.prefix}/register/{key}"
        choice = rng.random()
        if choice < 0.4:
            self._record(process, "read", key, None, None, lambda: client.get(path))
        elif choice < 0.7:
            value = f"{process}-{n}"
            self._record(process, "write", key, value, None, lambda: (client.put(path, value), None)[1])
        else:
            expected = f"{rng.randrange(self.config.register_clients)}-{max(0, n - rng.randrange(3))}"
            value = f"{process}-{n}"
            self._record(process, "cas", key, value, expected, lambda: client.compare_and_set(path, expected, value))

    def _unique_op(self, client: EtcdClient, process: int, rng: random.Random, n: int) -> None:
        key = f"{self.prefix}/unique/{process}/{n}"
        value = f"{process}-{n}"
        self._record(process, "unique", key, value, None, lambda: (client.put(key, value), None)[1])

    # ------------------------------------------------------------ recording

    def _record(self, process: int, kind: str, key: str, value: str | None, expected: str | None,
                call: Callable[[], Any]) -> None:
        invoke = self.clock()
        status, output, complete = "ok", None, None
        try:
            output = call()
            complete = self.clock()
        except EtcdUnavailable:
            status, complete = "fail", self.clock()
        except EtcdUnknown:
            status = "unknown"
        except EtcdError:
            # etcd answered with an error: for a read nothing happened; for a
            # write the proposal may still have been committed.
            status = "fail" if kind == "read" else "unknown"
            complete = self.clock() if status == "fail" else None
        with self._lock:
            op_id = self._next_id
            self._next_id += 1
            entry = {"id": op_id, "process": process, "kind": kind, "key": key, "value": value,
                     "expected": expected, "invoke": round(invoke, 6),
                     "complete": None if complete is None else round(complete, 6),
                     "status": status, "output": output}
            self._file.write(json.dumps(entry) + "\n")
            self.stats.ops += 1
            self.stats.by_status[status] = self.stats.by_status.get(status, 0) + 1
            self.stats.by_kind[kind] = self.stats.by_kind.get(kind, 0) + 1


def read_final_uniques(client: EtcdClient, run_id: str) -> dict[str, str]:
    """Every unique key of a run present after it (for the lost-write check)."""
    return client.get_prefix(f"{PREFIX}/{run_id}/unique/")
