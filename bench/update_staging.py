"""What writing an update into the passive slots costs the applications: staging time per node, and
etcd's write latency (p50/p99) before and during staging, at the low weight and at everyone's weight,
in one run.

    cd PROJECT && python /path/to/bench/update_staging.py --version 2   # on the running lab there
    python bench/update_staging.py --project /tmp/vmroll --version 2 --weights 10,100

On the lab of PROJECT (nspawn or VMs, running, bootstrapped): for each weight, a baseline of
`--seconds` of writes, then every node's passive slot staged with that weight
(`updates.staging_weight`) while the same writes go on. Nothing is published: no node reboots, the
slots are written again by the next `lab update`. The writes are one client's puts through the
members in turn (what a workload's write sees: the leader's fsync and a round to a majority).
Prints per weight: staging seconds (as many nodes at once as `lab update` stages), p50/p99 before and during,
and the during/before ratios; `--save` writes them as JSON. Asserts nothing: the machine is shared
and noisy. On nspawn a slot is a link to the cached image: staging writes nothing, and the figures
show that.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lab.cluster.update import staging_concurrency  # noqa: E402
from lab.core.lab import Lab  # noqa: E402
from lab.host.ssh import parallel_map  # noqa: E402
from lab.images.cache import find_image  # noqa: E402
from lab.scenarios.expectations import latency_before_and_during  # noqa: E402


class Writer:
    """One client writing a key in a loop; (start, latency ms) of each acknowledged write."""

    def __init__(self, lab: Lab) -> None:
        self.client = lab.etcd_client(timeout=5.0)
        self.samples: list[tuple[float, float]] = []
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        n = 0
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                self.client.put("/bench/staging", str(n))
                self.samples.append((started, 1000 * (time.monotonic() - started)))
            except Exception:  # noqa: BLE001 - a timed-out write counts as an error, the loop goes on
                self.errors += 1
            n += 1
            time.sleep(0.02)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.client.close()

    def between(self, start: float, end: float) -> list[float]:
        return [latency for at, latency in self.samples if start <= at < end]


def measure(lab: Lab, version: str, weight: int, seconds: float) -> dict:
    provider = lab.provider()
    provider.context = replace(provider.context, spec=lab.spec.model_copy(
        update={"updates": lab.spec.updates.model_copy(update={"staging_weight": weight})}))
    image = find_image(lab.spec.box.name, version, provider.update_flavor)
    if image is None:
        raise SystemExit(f"the {provider.update_flavor} image of {lab.spec.box.name} {version} is not built")
    provider.prepare_update(image.rootfs, print)
    writer = Writer(lab)
    writer.start()
    try:
        time.sleep(seconds)
        staging_from = time.monotonic()
        lines: list[str] = []
        stop = threading.Event()
        parallel_map(lambda node: provider.stage_update(node, image.rootfs, lines.append, stop), lab.node_names(),
                     limit=staging_concurrency(lab.spec.updates.max_concurrent_reboots), stop=stop)
        staging_to = time.monotonic()
    finally:
        writer.stop()
    for line in lines:
        print(f"  {line}")
    return {"weight": weight, "staging_s": round(staging_to - staging_from, 2), "errors": writer.errors,
            **latency_before_and_during(writer.between(staging_from - seconds, staging_from),
                                        writer.between(staging_from, staging_to))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--project", type=Path, default=Path.cwd(), help="the directory of the lab's lab.yaml")
    parser.add_argument("--version", required=True, help="the OS version to stage (its image must be built)")
    parser.add_argument("--weights", default="10,100", help="staging weights to compare, in order")
    parser.add_argument("--seconds", type=float, default=20.0, help="baseline length before each staging")
    parser.add_argument("--save", type=Path)
    args = parser.parse_args()
    os.chdir(args.project)
    lab = Lab.open(args.project / "lab.yaml")
    results = [measure(lab, args.version, int(w), args.seconds) for w in args.weights.split(",")]
    print(f"\n{'weight':>6} {'staging s':>9} {'p50 before':>10} {'p50 during':>10} {'p99 before':>10} "
          f"{'p99 during':>10} {'p50 x':>6} {'p99 x':>6}")
    for r in results:
        b, d = r["before"], r["during"]
        print(f"{r['weight']:>6} {r['staging_s']:>9.1f} {b.get('p50_ms', 0):>10.2f} {d.get('p50_ms', 0):>10.2f} "
              f"{b.get('p99_ms', 0):>10.2f} {d.get('p99_ms', 0):>10.2f} {r.get('p50_ratio', 0):>6.2f} "
              f"{r.get('p99_ratio', 0):>6.2f}")
    if args.save:
        args.save.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
