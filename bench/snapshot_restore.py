"""Lab snapshots: how long a save and a restore of a whole lab take, against `lab up`.

    sudo .venv/bin/python bench/snapshot_restore.py                 # 3 nodes, 5 restores
    sudo .venv/bin/python bench/snapshot_restore.py --nodes 5 --restores 10

Issue 15 asks for a restore of a 3-node lab in under 5 s with the cluster
healthy and its data back. Needs root and the built node image. In a fresh
/tmp/snapbench-* directory it brings up an nspawn lab, writes a key through
etcd, saves snapshot `bench` (every node frozen together), then repeatedly:
overwrites the key, restores, and reads the key back through etcd (a restore
that brought back the wrong moment, or an unhealthy cluster, is counted as a
failure and printed, not hidden).

Prints the save time (and how long the nodes stood frozen), each restore's
time to the cluster back (nodes answering SSH, then every etcd member healthy)
and the spare copy prepared afterwards for the next restore, their p50 and
max, and the baseline measured in the same run: `lab destroy` + `lab up` of
the same lab, the other way to get a clean cluster back. The ratio is restore
p50 / baseline. Asserts nothing; the host's load average is printed because
the machine may be shared. The lab is destroyed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lab.errors import LabError  # noqa: E402

KEY = "/bench/snapshot-marker"


def quiet(message: str) -> None:
    pass


def etcdctl(workdir: Path, *args: str) -> str:
    """The host's etcdctl against the lab, as a user runs it (`lab etcdctl -- ...`)."""
    lab_cli = Path(sys.executable).with_name("lab")
    result = subprocess.run([str(lab_cli), "etcdctl", "--", *args], cwd=workdir, capture_output=True, text=True,
                            timeout=60)
    if result.returncode != 0:
        raise RuntimeError(f"lab etcdctl {' '.join(args)}: {result.stderr.strip() or result.stdout.strip()}")
    return result.stdout


def up(file: Path) -> float:
    from lab.core.lab import Lab

    lab = Lab.open(file)
    started = time.monotonic()
    with lab.lock("up") as locked:
        locked.up(quiet)
    return time.monotonic() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--restores", type=int, default=5)
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("snapshot_restore: needs root (nspawn nodes)", file=sys.stderr)
        return 2

    from lab.core import snapshots
    from lab.core.lab import Lab
    from lab.core.lifecycle import Flags, destroy

    workdir = Path(tempfile.mkdtemp(prefix="snapbench-", dir="/tmp"))
    file = workdir / "lab.yaml"
    file.write_text(f"name: snapbench\nprovider: nspawn\nnodes: {{count: {args.nodes}}}\n")
    print(f"snapshot bench: {args.nodes}-node nspawn lab, {args.restores} restores; {os.cpu_count()} CPUs; "
          f"load average {os.getloadavg()[0]:.2f}; work directory {workdir}", flush=True)
    failures: list[str] = []
    restores: list[snapshots.RestoreResult] = []
    try:
        first_up = up(file)
        print(f"lab up (new lab): {first_up:.1f} s", flush=True)
        etcdctl(workdir, "put", KEY, "saved")
        lab = Lab.open(file)
        started = time.monotonic()
        with lab.lock("snapshot") as locked:
            taken = snapshots.save(locked, "bench", progress=quiet)
        save_s = time.monotonic() - started
        print(f"snapshot save: {save_s:.1f} s (nodes frozen {taken.frozen_s:.2f} s, "
              f"{taken.size_bytes / 2**20:.0f} MiB)", flush=True)
        for round_ in range(1, args.restores + 1):
            etcdctl(workdir, "put", KEY, f"overwritten-{round_}")
            load1 = os.getloadavg()[0]
            lab = Lab.open(file)
            with lab.lock("snapshot") as locked:
                result = snapshots.restore(locked, "bench", progress=quiet)
            restores.append(result)
            value = etcdctl(workdir, "get", KEY, "--print-value-only").strip()
            # etcdctl prints the table form of `endpoint health` on stderr; its JSON on stdout.
            health = json.loads(etcdctl(workdir, "endpoint", "health", "--cluster", "-w", "json"))
            healthy = sum(1 for member in health if member.get("health"))
            verdict = "ok"
            if value != "saved" or healthy != args.nodes:
                verdict = f"WRONG: key {value!r}, {healthy}/{args.nodes} members healthy"
                failures.append(f"restore {round_}: {verdict}")
            print(f"restore {round_}: {result.took_s:.2f} s (nodes answer SSH {result.nodes_s:.2f} s, etcd healthy "
                  f"+{result.etcd_s:.2f} s; next restore's copy prepared in {result.prepared_s:.1f} s after; "
                  f"load1 {load1:.1f}): {verdict}", flush=True)
        destroy(file, Flags(), quiet)
        baseline = up(file)
        print(f"baseline, lab destroy + lab up (image warm): up {baseline:.1f} s", flush=True)
    except (LabError, RuntimeError, subprocess.TimeoutExpired) as exc:
        message = getattr(exc, "message", str(exc))
        print(f"snapshot_restore: {message}", file=sys.stderr)
        return 1
    finally:
        try:
            destroy(file, Flags(), quiet)
        except LabError as exc:
            print(f"could not destroy the lab: {exc.message} (cd {workdir} && lab destroy)", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    took = [r.took_s for r in restores]
    p50 = statistics.median(took)
    print(f"\nrestore of {args.nodes} nodes to healthy etcd: p50 {p50:.2f} s, max {max(took):.2f} s over {len(took)}; "
          f"baseline lab up {baseline:.1f} s; restore p50 / up = {p50 / baseline:.2f}")
    print(f"failures: {len(failures)}" + "".join(f"\n  {f}" for f in failures))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
