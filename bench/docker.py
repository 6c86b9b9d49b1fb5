"""Docker on nspawn nodes: what it costs and how fast the seed's first container runs.

    python bench/docker.py              # a 3-node lab, then a 9-node one (~3 min warm)
    python bench/docker.py --big 0      # the 3-node lab only

Needs root, the built node image and the seeded lab registry (`lab up` seeds it
once per machine). Prints figures, asserts nothing; every lab is destroyed.

  * `lab up --nodes 3`: the time of each up step; the baseline in the same run
    is the same `lab up` without the step Docker added (containers: the lab
    registry and DNS, each node's daemon.json), the ratio is total / baseline;
  * the seed's first `docker run ubuntu /bin/echo hello world` on a fresh node
    (Docker socket-activated, the image pulled through the lab registry), and
    the same split into daemon start, pull and run on another fresh node;
  * distributing an image (`docker pull debian` on every node at once) to 3
    and to 9 nodes;
  * a node's memory (its cgroup's rss + cache) idle, with Docker
    socket-activated but never used, then with dockerd and containerd running
    idle: the baseline is the idle node.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lab.core.lab import Lab  # noqa: E402
from lab.core.up import UpRun, up_steps  # noqa: E402
from lab.host import ssh  # noqa: E402
from lab.providers.nspawn import cgroups  # noqa: E402

DOCKER_STEPS = ("containers",)  # the lab registry and DNS, and every node's daemon.json


def make_lab(directory: Path, nodes: int) -> tuple[Lab, dict[str, float]]:
    (directory / "lab.yaml").write_text(f"name: dockerbench\nprovider: nspawn\nnodes: {{count: {nodes}, memory: 512}}\n")
    lab = Lab.open(directory / "lab.yaml")
    run = UpRun(lab=lab, progress=lambda message: None, new_lab=True)
    steps: dict[str, float] = {}
    with lab.lock("up"):
        for step in up_steps(bootstrap=True):
            if step.existing_lab_only:
                continue
            start = time.perf_counter()
            step.run(run)
            steps[step.name] = time.perf_counter() - start
    return lab, steps


def timed_on(lab: Lab, node: str, command: str) -> float:
    endpoint = lab.provider().ssh_endpoints()[node]
    start = time.perf_counter()
    result = ssh.run(endpoint, command, timeout=300)
    elapsed = time.perf_counter() - start
    if not result.ok:
        raise SystemExit(f"bench: `{command}` failed on {node}:\n{result.stdout}{result.stderr}")
    return elapsed


def distribute(lab: Lab, nodes: list[str], image: str) -> float:
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=len(nodes)) as pool:
        list(pool.map(lambda n: timed_on(lab, n, f"docker pull -q {image} >/dev/null"), nodes))
    return time.perf_counter() - start


def memory_mib(lab: Lab, node: str) -> float:
    memory = cgroups.controller_cgroup(lab.provider().cgroups(node), "memory")
    stat = dict(line.split() for line in (memory / "memory.stat").read_text().splitlines())
    return (int(stat["total_rss"]) + int(stat["total_cache"])) / 2**20


def bench_three(directory: Path) -> None:
    lab, steps = make_lab(directory, 3)
    try:
        total = sum(steps.values())
        baseline = total - sum(steps.get(s, 0.0) for s in DOCKER_STEPS)
        print(f"lab up --nodes 3 (warm): {total:.1f} s; without the Docker steps {baseline:.1f} s; "
              f"ratio {total / baseline:.2f}x")
        print("  steps: " + ", ".join(f"{name} {seconds:.2f} s" for name, seconds in steps.items()))
        # Idle memory first: nothing has touched Docker on node-3 yet.
        time.sleep(5)
        idle = memory_mib(lab, "node-3")
        timed_on(lab, "node-3", "docker info >/dev/null")
        time.sleep(5)
        running = memory_mib(lab, "node-3")
        print(f"node memory (rss + cache): idle with docker.socket {idle:.0f} MiB; dockerd + containerd running "
              f"{running:.0f} MiB; ratio {running / idle:.2f}x")
        first = timed_on(lab, "node-1", "docker run ubuntu /bin/echo hello world")
        print(f"first `docker run ubuntu /bin/echo hello world` on a fresh node: {first:.2f} s (goal <= 3 s)")
        start = timed_on(lab, "node-2", "docker info >/dev/null")
        pull = timed_on(lab, "node-2", "docker pull -q ubuntu >/dev/null")
        run = timed_on(lab, "node-2", "docker run ubuntu /bin/echo hello world")
        again = timed_on(lab, "node-2", "docker run --rm ubuntu /bin/echo hello world")
        print(f"  split on node-2: daemon start {start:.2f} s, pull {pull:.2f} s, run {run:.2f} s; "
              f"a later run {again:.2f} s")
        nodes = [n.name for n in lab.context(lab.selection().name).nodes]
        print(f"distribute debian to 3 nodes at once: {distribute(lab, nodes, 'debian:bookworm'):.2f} s")
    finally:
        with lab.lock("destroy"):
            lab.destroy()


def bench_big(directory: Path, count: int) -> None:
    lab, steps = make_lab(directory, count)
    try:
        print(f"lab up --nodes {count} (warm): {sum(steps.values()):.1f} s")
        nodes = [n.name for n in lab.context(lab.selection().name).nodes]
        print(f"distribute debian to {count} nodes at once: {distribute(lab, nodes, 'debian:bookworm'):.2f} s")
    finally:
        with lab.lock("destroy"):
            lab.destroy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--big", type=int, default=9, help="nodes of the second lab (0: skip it)")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="lab-bench-docker-"))
    try:
        (workdir / "three").mkdir()
        bench_three(workdir / "three")
        if args.big:
            (workdir / "big").mkdir()
            bench_big(workdir / "big", args.big)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
