"""History checker benchmark: print figures, assert nothing (these machines are shared and noisy).

    python bench/checker_bench.py          # all cases (~1 min)
    python bench/checker_bench.py main     # only the 10,000-op target case, linearizable and not

Histories come from `lab.scenarios.history.simulate_history`: a real register store
applied at a random instant inside each operation's interval, so they are
linearizable by construction; the non-linearizable variants change one read
at 90% of the history (to a value never written, or to a stale one), which
makes the search explore everything before it. Each line is the median of
a few seeds (min and max shown).
"""

from __future__ import annotations

import dataclasses
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lab.scenarios.history import Op, simulate_history  # noqa: E402
from lab.scenarios.linearizable import check_linearizable  # noqa: E402

SEEDS = (1, 2, 3, 4, 5)


def ghost_read(ops: list[Op]) -> list[Op]:
    """One read at 90% of the history returns a value nobody wrote."""
    reads = [i for i, op in enumerate(ops) if op.kind == "read" and op.status == "ok"]
    index = reads[int(len(reads) * 0.9)]
    changed = list(ops)
    changed[index] = dataclasses.replace(ops[index], output="never-written")
    return changed


def stale_read(ops: list[Op]) -> list[Op]:
    """One read at 90% returns the value of a write that completed well before another one did."""
    reads = [i for i, op in enumerate(ops) if op.kind == "read" and op.status == "ok"]
    index = reads[int(len(reads) * 0.9)]
    read = ops[index]
    writes = [op for op in ops[:index] if op.key == read.key and op.kind == "write" and op.status == "ok"
              and op.complete < read.invoke - 0.1]
    changed = list(ops)
    changed[index] = dataclasses.replace(read, output=writes[-2].value)
    return changed


def case(label: str, make, seeds=SEEDS, timeout_s: float = 60.0) -> None:
    samples, verdicts, sizes = [], set(), set()
    for seed in seeds:
        ops = make(random.Random(seed))
        start = time.perf_counter()
        report = check_linearizable(ops, timeout_s=timeout_s)
        samples.append(time.perf_counter() - start)
        verdicts.add("inconclusive" if report.timed_out else "linearizable" if report.ok else "NOT linearizable")
        unknown = sum(op.status == "unknown" for op in ops)
        sizes.add((len(ops), len({op.key for op in ops}), unknown))
    median = statistics.median(samples)
    n_ops = statistics.median(size[0] for size in sizes)
    keys = "/".join(sorted({str(size[1]) for size in sizes}))
    unknown = "-".join(str(x) for x in sorted({min(s[2] for s in sizes), max(s[2] for s in sizes)}))
    print(f"  {label:<52} {n_ops:>6.0f} ops {keys:>2} keys {unknown:>7} unknown  "
          f"median {median * 1000:8.1f} ms  min {min(samples) * 1000:8.1f}  max {max(samples) * 1000:8.1f}  "
          f"{n_ops / median:>9.0f} ops/s  {', '.join(sorted(verdicts))}")


def main(which: list[str]) -> None:
    target = dict(keys=5, processes=10, unknown_ratio=0.0005, fail_ratio=0.001, slow_ratio=0.01)
    print("target: 10,000 ops, 5 keys, 10 processes, ~5 unknown, 1% of ops slow (0.2-1 s)")
    case("linearizable", lambda rng: simulate_history(rng, 10_000, **target))
    case("one ghost read at 90%", lambda rng: ghost_read(simulate_history(rng, 10_000, **target)))
    case("one stale read at 90%", lambda rng: stale_read(simulate_history(rng, 10_000, **target)))
    if "main" in which:
        return

    print("like lab's workload: 3 registers, 4 clients, 10 ms pause")
    workload = dict(keys=3, processes=4, unknown_ratio=0.005, fail_ratio=0.005, slow_ratio=0.01)
    case("linearizable", lambda rng: simulate_history(rng, 10_000, **workload))
    case("one ghost read at 90%", lambda rng: ghost_read(simulate_history(rng, 10_000, **workload)))

    print("scaling (linearizable)")
    for n_ops in (1_000, 10_000, 50_000):
        case(f"{n_ops} ops, 5 keys, 10 processes", lambda rng, n=n_ops: simulate_history(rng, n, **target),
             seeds=SEEDS[:3])

    print("harder: every op on one key")
    one_key = dict(keys=1, processes=10, unknown_ratio=0.01, fail_ratio=0.001, slow_ratio=0.05)
    case("1 key, 10 processes, 1% unknown, 5% slow", lambda rng: simulate_history(rng, 10_000, **one_key))
    case("  ...with one ghost read at 90%", lambda rng: ghost_read(simulate_history(rng, 10_000, **one_key)),
         seeds=SEEDS[:3])
    crowded = dict(keys=1, processes=20, unknown_ratio=0.01, fail_ratio=0.001, slow_ratio=0.1)
    case("1 key, 20 processes, 10% slow (~18 pending at once)", lambda rng: simulate_history(rng, 10_000, **crowded),
         seeds=SEEDS[:3])
    case("  ...with one ghost read at 90%", lambda rng: ghost_read(simulate_history(rng, 10_000, **crowded)),
         seeds=SEEDS[:3])
    case("many unknowns: 5 keys, 10% unknown, 10% slow",
         lambda rng: simulate_history(rng, 10_000, keys=5, processes=10, unknown_ratio=0.1, slow_ratio=0.1))
    case("  ...with one ghost read at 90%",
         lambda rng: ghost_read(simulate_history(rng, 10_000, keys=5, processes=10, unknown_ratio=0.1,
                                                 slow_ratio=0.1)))


if __name__ == "__main__":
    main(sys.argv[1:])
