"""The cost curve of `lab up` on nspawn: wall time, each step, host memory, memory per node by role.

    sudo .venv/bin/python bench/up_scale.py --raise-inotify       # 3, 9, 27, 50, 100 nodes
    sudo .venv/bin/python bench/up_scale.py --nodes 3,9 --runs 3 --baseline
    sudo .venv/bin/python bench/up_scale.py --nodes 50 --scenario raft-failover --raise-inotify

For each size, one fresh lab per run, timed from `lab up` to every etcd
member healthy, every machine registered with the scheduler and an engine
elected (what `lab up` waits for), then destroyed:
  * wall time, and each step's time as `lab up` reports it (the boot includes
    waiting for every node to answer SSH);
  * host memory the lab takes: the drop of MemAvailable from before `lab up`
    to 5 s after it (node processes, page cache of their files, the host's
    registry and DNS);
  * memory per node by role (etcd member, worker): its memory cgroup's RSS
    and page cache, 5 s after `lab up`;
  * with --scenario, that scenario run on the lab (raft-failover on a big lab:
    its 3 members fail over while the workers keep their gateways).

--baseline also runs each size with first-boot files off in the same run:
every node then gets Docker's settings, etcd and the agents over SSH after it
boots, as on the Vagrant providers; the ratio is against that. The issue's
earlier figures (whole `lab up`, every node an etcd member, files over SSH
one round trip at a time) were 3 nodes 5.8 s, 9 nodes 10.5 s, 18 nodes
31.6 s on this machine.

Prints figures and asserts nothing: the machine is shared; compare the load
averages printed with each figure.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def mem_available_mib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    raise SystemExit("no MemAvailable in /proc/meminfo")


def node_memory_mib(lab) -> dict[str, list[float]]:
    """RSS + page cache of each node's memory cgroup, by role."""
    from lab.providers.nspawn import cgroups

    provider = lab.provider()
    roles = lab.roles()
    found: dict[str, list[float]] = {}
    for node in lab.node_names():
        memory = cgroups.controller_cgroup(provider.cgroups(node), "memory")
        stat = dict(line.split() for line in (memory / "memory.stat").read_text().splitlines())
        found.setdefault(roles.get(node, "member"), []).append((int(stat["total_rss"]) + int(stat["total_cache"])) / 2**20)
    return found


def one_lab(nodes: int, first_boot: bool, scenario: str | None) -> dict:
    from lab.core.lab import Lab
    from lab.model.spec import Override
    from lab.providers.nspawn.provider import NspawnProvider

    original = NspawnProvider.seed_first_boot
    if not first_boot:  # the provider-agnostic path: everything over SSH after the boot
        NspawnProvider.seed_first_boot = lambda self, seeds: set()
    scratch = tempfile.mkdtemp(prefix=f"up-scale-{nodes}-")
    lab = Lab.open(Path(scratch) / "lab.yaml", [Override(("nodes", "count"), nodes, "--nodes"),
                                               Override(("provider",), "nspawn", "--provider")])
    figures: dict = {"nodes": nodes, "first_boot_files": first_boot, "load1": round(os.getloadavg()[0], 1)}
    ssh_wait: list[str] = []

    def progress(message: str) -> None:
        if "answer SSH after" in message:
            ssh_wait.append(message)

    before = mem_available_mib()
    started = time.perf_counter()
    try:
        result = lab.up(progress)
        figures["up_s"] = round(time.perf_counter() - started, 2)
        figures["steps_s"] = {k: round(v, 2) for k, v in result.seconds.items() if v >= 0.01}
        figures["ssh"] = ssh_wait[-1] if ssh_wait else None
        time.sleep(5)  # boot-time jobs settle
        figures["host_memory_mib"] = round(before - mem_available_mib())
        by_role = node_memory_mib(lab)
        figures["node_memory_mib"] = {role: {"n": len(v), "median": round(statistics.median(v), 1),
                                             "max": round(max(v), 1)} for role, v in by_role.items()}
        if scenario:
            run = subprocess.run([sys.executable, "-m", "lab.cli", "scenario", "run", scenario, "--keep"],
                                 cwd=scratch, capture_output=True, text=True, timeout=1800)
            figures["scenario"] = {"name": scenario, "exit": run.returncode,
                                   "tail": (run.stdout + run.stderr).strip().splitlines()[-6:]}
    finally:
        NspawnProvider.seed_first_boot = original
        destroy_started = time.perf_counter()
        lab.destroy()
        figures["destroy_s"] = round(time.perf_counter() - destroy_started, 2)
    return figures


def show(figures: dict, baseline: dict | None) -> None:
    mode = "first-boot files" if figures["first_boot_files"] else "over SSH (baseline)"
    ratio = f", {figures['up_s'] / baseline['up_s']:.2f}x the baseline" if baseline else ""
    print(f"  {figures['nodes']:>3} nodes, {mode}: lab up {figures['up_s']:.2f} s{ratio} "
          f"(load1 {figures['load1']}), destroy {figures['destroy_s']:.1f} s", flush=True)
    print("        steps: " + ", ".join(f"{k} {v:.2f}" for k, v in figures["steps_s"].items()), flush=True)
    if figures.get("ssh"):
        print(f"        {figures['ssh']}", flush=True)
    roles = "; ".join(f"{role} x{v['n']}: median {v['median']} MiB, max {v['max']} MiB"
                      for role, v in figures["node_memory_mib"].items())
    print(f"        host memory taken {figures['host_memory_mib']} MiB; per node (rss + cache): {roles}", flush=True)
    if "scenario" in figures:
        outcome = "passed" if figures["scenario"]["exit"] == 0 else f"FAILED (exit {figures['scenario']['exit']})"
        print(f"        scenario {figures['scenario']['name']}: {outcome}", flush=True)
        if figures["scenario"]["exit"] != 0:
            print("          " + "\n          ".join(figures["scenario"]["tail"]), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", default="3,9,27,50,100", help="comma-separated lab sizes")
    parser.add_argument("--runs", type=int, default=1, help="labs of each size (the median is printed last)")
    parser.add_argument("--baseline", action="store_true",
                        help="also each size with first-boot files off (every node set up over SSH)")
    parser.add_argument("--scenario", help="run this scenario on each lab after `lab up`")
    parser.add_argument("--json", type=Path, help="also write every figure here")
    parser.add_argument("--raise-inotify", action="store_true",
                        help="raise fs.inotify.max_user_instances for the biggest lab (lab up refuses without "
                             "it past ~12 nodes on Debian's 128) and put it back afterwards")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("up_scale: needs root (nspawn nodes)")
    from lab.images.build import build_image
    from lab.providers.nspawn import limits

    build_image("labos", "1")
    sizes = [int(n) for n in args.nodes.split(",")]
    print(f"lab up on nspawn, warm image, {os.cpu_count()} CPUs, "
          f"{mem_available_mib() / 1024:.1f} GiB available", flush=True)
    original_limit = int(limits.LIMIT_FILE.read_text())
    wanted = limits.inotify_instances_used() + max(sizes) * limits.INOTIFY_PER_NODE * 2
    if args.raise_inotify and wanted > original_limit:
        limits.LIMIT_FILE.write_text(f"{wanted}\n")
        print(f"fs.inotify.max_user_instances: {original_limit} -> {wanted} for this run", flush=True)
    try:
        return run_sizes(args, sizes)
    finally:
        if int(limits.LIMIT_FILE.read_text()) != original_limit:
            limits.LIMIT_FILE.write_text(f"{original_limit}\n")
            print(f"fs.inotify.max_user_instances back to {original_limit}", flush=True)


def run_sizes(args, sizes: list[int]) -> int:
    everything = []
    for nodes in sizes:
        runs: list[dict] = []
        for _ in range(args.runs):
            baseline = one_lab(nodes, first_boot=False, scenario=None) if args.baseline else None
            if baseline:
                show(baseline, None)
                everything.append(baseline)
            figures = one_lab(nodes, first_boot=True, scenario=args.scenario)
            show(figures, baseline)
            runs.append(figures)
            everything.append(figures)
        if args.runs > 1:
            ups = [r["up_s"] for r in runs]
            print(f"  {nodes:>3} nodes: median lab up {statistics.median(ups):.2f} s over {len(ups)} runs "
                  f"(min {min(ups):.2f}, max {max(ups):.2f})", flush=True)
    if args.json:
        args.json.write_text(json.dumps(everything, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
