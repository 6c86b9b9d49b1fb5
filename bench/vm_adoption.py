"""Boot to all-adopted on libvirt (QEMU software emulation here), phase by phase, for 1 and 3 VMs.

    python bench/vm_adoption.py                        # 1 VM, then 3 VMs, once each
    python bench/vm_adoption.py --runs 3               # the median of three runs of each
    python bench/vm_adoption.py --save after.json --before before.json
    python bench/vm_adoption.py --before-source /tmp/old-checkout   # before and after, run by run

Each run is `lab up --no-bootstrap` (vagrant up, then lab's adoption) in a
process of its own, in its own lab under /tmp/vmadopt-bench-*/, destroyed
afterwards. With `--before-source DIR` every run of this tree is preceded by
the same run of the lab in DIR (a copy of an earlier tree): on a shared,
noisy machine both then see about the same load.
The phases come from the progress lines, each stamped when it arrives:
- vagrant up: from `vagrant up` to Vagrant's return;
- key: Vagrant's SSH key swap (`insert_key`), per VM, from "insecure key
  detected" to "Machine booted and ready!" (0 when Vagrant does none);
- network: Vagrant's guest network setup, per VM, from "Configuring and
  enabling network interfaces" to that VM's next line (or Vagrant's return);
- adoption: lab's one SSH step per VM (key, hostname, address, host key).
Key and network are the slowest VM's. The 3-VM total is compared with the
1-VM total (goal: <= 1.3x). `--save` writes the figures as JSON, `--before`
prints an earlier run's figures next to these. Assert nothing: the machine is
shared and noisy. Needs root, libvirt, vagrant-libvirt and the Lab OS box
(`lab box add --format libvirt`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

REPO = Path(__file__).resolve().parent.parent
# A measuring child imports lab from the tree it measures.
SOURCE_VARIABLE = "VMADOPT_SOURCE"
sys.path.insert(0, os.environ.get(SOURCE_VARIABLE, str(REPO)))

GOAL_RATIO = 1.3
PHASES = ("vagrant_up", "key", "network", "adoption", "total")
_NODE_LINE = re.compile(r"^(?:==>|\s*)\s*(node-\d+):\s*(.*)$")


def phases(lines: list[tuple[float, str]], total: float) -> dict[str, float]:
    """Seconds per phase from (seconds since start, progress line) pairs."""
    up_start = next((t for t, line in lines if line.startswith("vagrant up")), 0.0)
    up_end = next((t for t, line in lines if "booted by Vagrant" in line), total)
    adopted = next((t for t, line in lines if line.startswith("adopted ")), total)
    key: dict[str, float] = {}
    network: dict[str, float] = {}
    key_start: dict[str, float] = {}
    network_start: dict[str, float] = {}
    for t, line in lines:
        match = _NODE_LINE.match(line)
        if not match:
            continue
        node, text = match.groups()
        if node in network_start:
            network[node] = t - network_start.pop(node)
        if "insecure key detected" in text:
            key_start[node] = t
        elif "booted and ready" in text and node in key_start:
            key[node] = t - key_start.pop(node)
        elif "Configuring and enabling network interfaces" in text:
            network_start[node] = t
    for node, start in network_start.items():
        network[node] = up_end - start
    return {"vagrant_up": up_end - up_start, "key": max(key.values(), default=0.0),
            "network": max(network.values(), default=0.0), "adoption": adopted - up_end, "total": total}


@contextlib.contextmanager
def default_pool(uri: str = "qemu:///system") -> Iterator[None]:
    """libvirt's `default` pool as vagrant-libvirt defines it when missing; undefined again if it was missing
    (its volumes stay on disk: the box's copy is reused by the next run)."""
    listed = subprocess.run(["virsh", "-q", "-c", uri, "pool-list", "--all", "--name"], capture_output=True,
                            text=True, timeout=60).stdout.split()
    try:
        yield
    finally:
        if "default" not in listed:
            for step in (["pool-destroy", "default"], ["pool-undefine", "default"]):
                subprocess.run(["virsh", "-q", "-c", uri, *step], capture_output=True, timeout=60)


def one_run(nodes: int) -> tuple[dict[str, float], list[tuple[float, str]]]:
    from lab.core.lab import Lab
    from lab.model.spec import Override

    lines: list[tuple[float, str]] = []
    directory = Path(tempfile.mkdtemp(prefix="vmadopt-bench-", dir="/tmp"))
    lab = Lab.open(directory / "lab.yaml", [
        Override(("nodes", "count"), nodes, "--nodes"), Override(("provider",), "libvirt", "--provider"),
        Override(("name",), f"adopt{nodes}", "--name"),
        Override(("providers", "libvirt", "driver"), "qemu", "--set providers.libvirt.driver")])
    start = time.perf_counter()
    try:
        with lab.lock("up"):
            lab.up(lambda line: lines.append((time.perf_counter() - start, line)), bootstrap=False)
        total = time.perf_counter() - start
    finally:
        with lab.lock("destroy", wait=60):
            lab.destroy()
        with contextlib.suppress(OSError):
            (directory / "lab.yaml").unlink()
            directory.rmdir()
    return phases(lines, total), lines


def median_phases(samples: list[dict[str, float]]) -> dict[str, float]:
    return {name: statistics.median(sample[name] for sample in samples) for name in PHASES}


def report(results: dict[str, dict[str, float]], before: dict[str, dict[str, float]] | None) -> None:
    print(f"  {'':<8}" + "".join(f"{name:>12}" for name in PHASES))
    for nodes, figures in results.items():
        print(f"  {nodes + ' VM':<8}" + "".join(f"{figures[name]:>11.1f}s" for name in PHASES))
        if before and nodes in before:
            print(f"  {'  before':<8}" + "".join(f"{before[nodes][name]:>11.1f}s" for name in PHASES))
    for label, figures in (("before", before), ("now", results)):
        if figures and "1" in figures and "3" in figures:
            ratio = figures["3"]["total"] / figures["1"]["total"]
            print(f"  {label}: 3 VMs / 1 VM = {ratio:.2f}x (goal <= {GOAL_RATIO}x)")
    if before:
        for nodes in results:
            if nodes in before:
                print(f"  {nodes} VM: {before[nodes]['total']:.1f} s -> {results[nodes]['total']:.1f} s "
                      f"({results[nodes]['total'] / before[nodes]['total']:.2f}x)")


def measure(nodes: int, source: Path) -> tuple[dict[str, float], list]:
    """One run in a child process importing lab from `source`."""
    result = subprocess.run([sys.executable, __file__, "--measure", str(nodes)], capture_output=True, text=True,
                            env={**os.environ, SOURCE_VARIABLE: str(source)}, timeout=3600)
    if result.returncode != 0:
        sys.exit(f"vm_adoption: {nodes} VM(s) from {source} failed:\n{(result.stdout + result.stderr)[-3000:]}")
    data = json.loads(result.stdout.splitlines()[-1])
    return data["figures"], data["lines"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--nodes", default="1,3", help="comma-separated VM counts")
    parser.add_argument("--save", type=Path, help="write the figures (and each run's timed log) as JSON")
    parser.add_argument("--before", type=Path, help="an earlier --save file to compare with")
    parser.add_argument("--before-source", type=Path, help="a copy of an earlier tree, measured run by run too")
    parser.add_argument("--measure", type=int, help=argparse.SUPPRESS)  # one run, in a child
    args = parser.parse_args()
    if args.measure:
        figures, lines = one_run(args.measure)
        print(json.dumps({"figures": figures, "lines": lines}))
        return
    if os.geteuid() != 0:
        sys.exit("vm_adoption: needs root")
    from lab.testing.hostdaemons import libvirt_problem, libvirtd_running

    problem = libvirt_problem()
    if problem:
        sys.exit(f"vm_adoption: {problem}")
    trees = {"now": REPO}
    if args.before_source:
        trees = {"before": args.before_source.resolve(), "now": REPO}
    samples: dict[str, dict[str, list]] = {label: {} for label in trees}
    logs: dict[str, list] = {}
    with libvirtd_running(), default_pool():
        for nodes in (int(n) for n in args.nodes.split(",")):
            for run in range(args.runs):
                for label, source in trees.items():
                    figures, lines = measure(nodes, source)
                    samples[label].setdefault(str(nodes), []).append(figures)
                    logs[f"{label}-{nodes}-{run}"] = lines
                    print(f"  {label:<6} {nodes} VM run {run + 1}: "
                          + ", ".join(f"{k} {v:.1f} s" for k, v in figures.items()), flush=True)
    results = {label: {nodes: median_phases(runs) for nodes, runs in by_nodes.items()}
               for label, by_nodes in samples.items()}
    before = results.get("before") or (json.loads(args.before.read_text())["median"] if args.before else None)
    print(f"libvirt (driver qemu), boot to all adopted, median of {args.runs} run(s):")
    report(results["now"], before)
    if args.save:
        args.save.write_text(json.dumps({"median": results["now"], "before": before, "logs": logs}, indent=1))


if __name__ == "__main__":
    main()
