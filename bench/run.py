"""lab benchmarks: print figures, assert nothing (these machines are shared and noisy).

    python bench/run.py            # cli, render, boot (needs root + the built image)
    python bench/run.py cli render # only some
    python bench/run.py etcd       # bootstrap time, writes/s, etcdctl check perf (~2 min)
    python bench/run.py failover   # scheduler: machine loss to unit running elsewhere (LAB_BENCH_RUNS=5)
    python bench/run.py scenarios  # scenario wall times, time to new leader over LAB_BENCH_RUNS=10 runs
    python bench/run.py update     # rolling update 1 -> 2: roll time, per-node downtime (LAB_BENCH_RUNS=3)
    python bench/run.py build      # cold image build into a throwaway cache (~1 min)
    python bench/run.py vm         # libvirt VMs: 1 VM, then 3 in parallel; box build (~10 min)
    python bench/run.py vm-update  # rolling update of 3 libvirt VMs: staging, roll, latency (~45 min)
    python bench/run.py arm64      # cold arm64 box build, one arm64 VM booted under emulation (~30 min)

Each figure comes with the baseline measured in the same run where there is
one, and the ratio to it.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LAB = [sys.executable, "-m", "lab.cli"]


def timed(argv: list[str], runs: int, **kwargs) -> list[float]:
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        result = subprocess.run(argv, capture_output=True, text=True, **kwargs)
        if result.returncode != 0:
            command = "lab " + " ".join(argv[3:]) if argv[:3] == LAB else " ".join(argv)
            raise SystemExit(f"bench: `{command}` failed "
                             f"(exit {result.returncode}):\n{(result.stdout + result.stderr)[-2000:]}")
        samples.append(time.perf_counter() - start)
    return samples


def show(label: str, samples: list[float], baseline: float | None = None) -> float:
    median = statistics.median(samples)
    ratio = f"  ({median / baseline:.2f}x baseline)" if baseline else ""
    print(f"  {label:<44} median {median * 1000:8.1f} ms  min {min(samples) * 1000:8.1f} ms"
          f"  n={len(samples)}{ratio}")
    return median


def bench_cli() -> None:
    print("lab --help start-up")
    base = show("python -c pass (baseline)", timed([sys.executable, "-c", "pass"], 15))
    show("python -c 'import typer' (framework floor)", timed([sys.executable, "-c", "import typer"], 15), base)
    show("lab --help", timed([*LAB, "--help"], 15), base)
    show("lab box --help", timed([*LAB, "box", "--help"], 15), base)


def bench_render() -> None:
    print("lab render (writes .lab/lab/Vagrantfile)")
    with tempfile.TemporaryDirectory() as scratch:
        env = {**os.environ, "XDG_STATE_HOME": scratch}
        base = show("lab spec show --nodes 3 (load + validate only)",
                    timed([*LAB, "spec", "show", "--nodes", "3", "-f", f"{scratch}/lab.yaml"], 7, env=env))
        per_node = {}
        for nodes in (3, 20, 64):
            median = show(f"lab render --nodes {nodes} --provider virtualbox",
                          timed([*LAB, "render", "--nodes", str(nodes), "--provider", "virtualbox",
                                 "-f", f"{scratch}/lab.yaml"], 7, env=env), base)
            per_node[nodes] = median
        # 64 is the most nodes a lab may have.
        print(f"  marginal cost per node: 3 -> 20: {(per_node[20] - per_node[3]) / 17 * 1e6:.0f} us/node, "
              f"20 -> 64: {(per_node[64] - per_node[20]) / 44 * 1e6:.0f} us/node (linear if these agree)")


def bench_render_in_process() -> None:
    """Rendering alone, without interpreter start-up: the cost that grows with nodes."""
    sys.path.insert(0, str(REPO))
    from lab.core.lab import Lab
    from lab.providers.vagrant.render import render_vagrantfile
    from lab.model.spec import Override

    print("render_vagrantfile() in process (no start-up)")
    with tempfile.TemporaryDirectory() as scratch:
        os.environ["XDG_STATE_HOME"] = scratch
        medians = {}
        for nodes in (3, 16, 32, 64):
            lab = Lab.open(Path(scratch) / "lab.yaml", [Override(("nodes", "count"), nodes, "--nodes"),
                                                        Override(("provider",), "virtualbox", "--provider")])
            context = lab.context("virtualbox")
            render_vagrantfile(context, "virtualbox")  # warm the template cache
            samples = []
            for _ in range(30):
                start = time.perf_counter()
                render_vagrantfile(context, "virtualbox")
                samples.append(time.perf_counter() - start)
            medians[nodes] = show(f"{nodes} nodes", samples)
        # Fixed cost (template compile) plus a per-node cost: the slope is what grows.
        print(f"  marginal cost: 3 -> 16 nodes {(medians[16] - medians[3]) / 13 * 1e6:.1f} us/node, "
              f"16 -> 64 nodes {(medians[64] - medians[16]) / 48 * 1e6:.1f} us/node "
              f"(linear if these agree); fixed cost ~{(medians[3] - 3 * (medians[64] - medians[3]) / 61) * 1e3:.1f} ms")


def bench_boot() -> None:
    if os.geteuid() != 0:
        print("boot: skipped (needs root)")
        return
    sys.path.insert(0, str(REPO))
    from lab.images.build import build_image
    from lab.core.lab import Lab
    from lab.model.spec import Override

    build_image("labos", "1")
    print("lab up to every node answering SSH (warm image), nspawn")
    for nodes, goal in ((3, 5.0), (9, 15.0)):
        samples, memory = [], []
        for _ in range(3):
            with tempfile.TemporaryDirectory() as scratch:
                lab = Lab.open(Path(scratch) / "lab.yaml", [Override(("nodes", "count"), nodes, "--nodes"),
                                                            Override(("provider",), "nspawn", "--provider")])
                start = time.perf_counter()
                try:
                    lab.up()
                    samples.append(time.perf_counter() - start)
                    time.sleep(2)  # let boot-time jobs settle before measuring memory
                    memory.append(_memory_per_node(lab))
                finally:
                    lab.destroy()
        median = statistics.median(samples)
        print(f"  {nodes} nodes: median {median:.2f} s, min {min(samples):.2f} s, n={len(samples)} "
              f"(goal <= {goal:.0f} s: {'met' if median <= goal else 'NOT met'})")
        rss = statistics.median(m[0] for m in memory)
        cache = statistics.median(m[1] for m in memory)
        print(f"  {nodes} nodes: memory per node: {rss / 2**20:.1f} MiB RSS + {cache / 2**20:.1f} MiB page cache")


def _memory_per_node(lab) -> tuple[float, float]:
    provider = lab.provider()
    rss, cache = [], []
    for node in lab.node_names():
        memory_cgroup = provider.cgroups(node)[1]
        stat = dict(line.split() for line in (memory_cgroup / "memory.stat").read_text().splitlines())
        rss.append(int(stat["total_rss"]))
        cache.append(int(stat["total_cache"]))
    return statistics.mean(rss), statistics.mean(cache)


def bench_etcd() -> None:
    """Bootstrap time, lab client writes/s, and etcdctl check perf, on one 3-node lab."""
    if os.geteuid() != 0:
        print("etcd: skipped (needs root)")
        return
    import shutil

    sys.path.insert(0, str(REPO))
    from lab.images.build import build_image
    from lab.core.lab import Lab
    from lab.model.spec import Override

    build_image("labos", "1")
    print("etcd on a 3-node nspawn lab")
    with tempfile.TemporaryDirectory() as scratch:
        lab = Lab.open(Path(scratch) / "lab.yaml", [Override(("nodes", "count"), 3, "--nodes"),
                                                    Override(("provider",), "nspawn", "--provider")])
        try:
            marks: dict[str, float] = {}

            def progress(message: str) -> None:
                if "answer SSH" in message:
                    marks["ssh"] = time.perf_counter()
                if "members healthy" in message and "after" in message:
                    marks["healthy"] = time.perf_counter()

            lab.up(progress)
            print(f"  nodes ready -> cluster healthy: {marks['healthy'] - marks['ssh']:.2f} s")
            for threads in (1, 8, 32):
                writes, errors = _write_load(lab, threads, seconds=5.0)
                print(f"  lab client (JSON gateway, {threads:>2} threads): {writes / 5.0:7.0f} acked writes/s, "
                      f"{errors} errors (goal >= 1000/s)")
            if shutil.which("etcdctl"):
                env = {**os.environ, **lab.etcdctl_env()}
                out = subprocess.run(["etcdctl", "check", "perf", "--load=s"], env=env, capture_output=True,
                                     text=True, timeout=300).stdout
                # Its progress bar redraws with carriage returns: split on those too.
                for line in out.replace("\r", "\n").splitlines():
                    if line.startswith(("PASS", "FAIL")):
                        print(f"  etcdctl check perf --load=s: {line.strip()}")
                print("  (check perf --load=s drives a fixed ~150 writes/s from 50 clients and checks that the "
                      "cluster keeps up; it is a pass/fail floor, not a maximum)")
        finally:
            lab.destroy()


def _write_load(lab, threads: int, seconds: float) -> tuple[int, int]:
    import threading

    client = lab.etcd_client(timeout=2.0)
    stop = time.perf_counter() + seconds
    counts = [0] * threads
    errors = [0] * threads

    def worker(index: int) -> None:
        n = 0
        while time.perf_counter() < stop:
            try:
                client.put(f"/bench/{index}/{n}", "x" * 64)
                counts[index] += 1
            except Exception:
                errors[index] += 1
            n += 1
        client.close()

    pool = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    return sum(counts), sum(errors)


def _lab(scratch: str, nodes: int = 3):
    sys.path.insert(0, str(REPO))
    from lab.images.build import build_image
    from lab.core.lab import Lab
    from lab.model.spec import Override

    build_image("labos", "1")
    return Lab.open(Path(scratch) / "lab.yaml", [Override(("nodes", "count"), nodes, "--nodes"),
                                                Override(("provider",), "nspawn", "--provider")])


def bench_failover() -> None:
    """Scheduler: machine loss to the unit running elsewhere, over repeated kills."""
    if os.geteuid() != 0:
        print("failover: skipped (needs root)")
        return
    from lab.cluster.agents import AGENT_TTL
    from lab.cluster.units import set_desired

    runs = int(os.environ.get("LAB_BENCH_RUNS", "5"))
    print(f"scheduler failover: kill the machine running a unit, time until it is active elsewhere "
          f"(lease TTL {AGENT_TTL} s, goal <= TTL + 2 s), {runs} runs, polled every 50 ms")
    with tempfile.TemporaryDirectory() as scratch:
        lab = _lab(scratch)
        try:
            lab.up()
            unit = Path(scratch) / "bench.service"
            unit.write_text("[Service]\nExecStart=/bin/sh -c 'while true; do sleep 1; done'\n")
            set_desired(lab.etcd_client(), [str(unit)], "launched")
            provider = lab.provider()
            samples = []
            for _ in range(runs):
                where = _wait_unit(lab, "bench.service", avoid=None)
                provider.kill(where)
                killed = time.perf_counter()
                _wait_unit(lab, "bench.service", avoid=where)
                samples.append(time.perf_counter() - killed)
                provider.start(where)
            samples.sort()
            print(f"  median {statistics.median(samples):.2f} s, worst {samples[-1]:.2f} s, best {samples[0]:.2f} s "
                  f"(goal {AGENT_TTL + 2} s: {'met' if samples[-1] <= AGENT_TTL + 2 else 'NOT met'} at worst)")
        finally:
            lab.destroy()


def _wait_unit(lab, name: str, avoid: str | None, timeout: float = 60) -> str:
    from lab.cluster.etcdclient import EtcdError
    from lab.cluster.units import list_units

    deadline = time.perf_counter() + timeout
    client = lab.etcd_client(timeout=1.0)
    while time.perf_counter() < deadline:
        try:
            row = next(r for r in list_units(client) if r.name == name)
        except (EtcdError, StopIteration):
            row = None
        if row and row.active == "active" and row.machines and row.machines[0] != avoid:
            return row.machines[0]
        time.sleep(0.05)
    raise RuntimeError(f"{name} did not run within {timeout} s")


def bench_scenarios() -> None:
    """Wall time of each built-in scenario, and time to a new leader over repeated raft-failover runs."""
    if os.geteuid() != 0:
        print("scenarios: skipped (needs root)")
        return
    runs = int(os.environ.get("LAB_BENCH_RUNS", "10"))
    sys.path.insert(0, str(REPO))
    from lab.scenarios.engine import ScenarioRun
    from lab.scenarios.monitor import SAMPLE_INTERVAL
    from lab.scenarios.model import find

    print("scenarios on a 3-node nspawn lab (lab creation excluded)")
    with tempfile.TemporaryDirectory() as scratch:
        lab = _lab(scratch)
        try:
            lab.up()
            leader_times, throughput = [], []
            for name in ("raft-failover", "partition", "full-restart"):
                scenario = find(name, REPO)
                started = time.perf_counter()
                result = ScenarioRun(lab, scenario, scenario.load(), lambda _m: None).run()
                wall = time.perf_counter() - started
                print(f"  {name:<14} {'passed' if result.ok else 'FAILED'} in {wall:5.1f} s "
                      f"({result.measurements.get('ops', 0)} ops)")
            for _ in range(runs):
                scenario = find("raft-failover", REPO)
                result = ScenarioRun(lab, scenario, scenario.load(), lambda _m: None).run()
                leader_times += result.measurements.get("time_to_new_leader_s", [])
                ops_ok = (result.measurements.get("workload_by_status") or {}).get("ok", 0)
                span = max((s.started + s.duration for s in result.steps), default=1.0)
                throughput.append(ops_ok / span)
            leader_times.sort()
            p90 = leader_times[max(0, int(round(0.9 * len(leader_times))) - 1)]
            print(f"  time to new leader over {runs} raft-failover runs ({len(leader_times)} leader kills): "
                  f"median {statistics.median(leader_times):.2f} s, p90 {p90:.2f} s, max {leader_times[-1]:.2f} s; "
                  f"resolution {SAMPLE_INTERVAL * 1000:.0f} ms sampling + fault-injection latency; "
                  f"election timeout {lab.spec.etcd.election_timeout_ms} ms")
            print(f"  workload: median {statistics.median(throughput):.0f} acknowledged ops/s over a run "
                  f"(6 clients pausing 10 ms between operations)")
        finally:
            lab.destroy()


def bench_update() -> None:
    """Rolling update 1 -> 2 on 3 nspawn nodes: total roll time and per-node etcd member downtime."""
    if os.geteuid() != 0:
        print("update: skipped (needs root)")
        return
    runs = int(os.environ.get("LAB_BENCH_RUNS", "3"))
    sys.path.insert(0, str(REPO))
    from lab.images.build import build_image
    from lab.scenarios.engine import ScenarioRun
    from lab.scenarios.model import find

    build_image("labos", "2")
    print(f"rolling update 1 -> 2, 3 nodes, max 1 reboot at a time, under the workload ({runs} runs; "
          "goal: roll <= 60 s)")
    rolls, downtimes = [], []
    for _ in range(runs):
        with tempfile.TemporaryDirectory() as scratch:
            lab = _lab(scratch)
            try:
                lab.up()
                scenario = find("rolling-update", REPO)
                result = ScenarioRun(lab, scenario, scenario.load(), lambda _m: None).run()
                rolls.append(result.measurements.get("roll_s", float("nan")))
                downtimes += list((result.measurements.get("member_downtime_s") or {}).values())
                if not result.ok:
                    print("  run FAILED: " + "; ".join(f.description for f in result.failures))
            finally:
                lab.destroy()
    print(f"  roll time: median {statistics.median(rolls):.1f} s, max {max(rolls):.1f} s")
    print(f"  etcd member downtime per node reboot: median {statistics.median(downtimes):.2f} s, "
          f"max {max(downtimes):.2f} s (sampled every 50 ms from the host)")


def bench_build() -> None:
    if os.geteuid() != 0:
        print("build: skipped (needs root)")
        return
    sys.path.insert(0, str(REPO))
    print("cold node OS image build (debootstrap from the host's mirror) into a throwaway cache")
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR", "/var/tmp")) as scratch:
        env = {**os.environ, "XDG_CACHE_HOME": scratch}
        cold = timed([*LAB, "box", "build"], 1, env=env)[0]
        warm = timed([*LAB, "box", "build"], 3, env=env)
        print(f"  cold build: {cold:.1f} s")
        show("warm build (cache hit, whole CLI)", warm)


def libvirt_ready(bench: str) -> bool:
    """Root and a libvirtd lab can use; else says why `bench` is skipped."""
    if os.geteuid() != 0:
        print(f"{bench}: skipped (needs root)")
        return False
    sys.path.insert(0, str(REPO))
    from lab.testing.hostdaemons import libvirt_problem

    problem = libvirt_problem()
    if problem:
        print(f"{bench}: skipped ({problem})")
    return problem is None


def bench_vm() -> None:
    """libvirt (QEMU software emulation here): wall time to boot 1 VM and 3 VMs in parallel, box build time.

    Boot = `lab up --no-bootstrap`: vagrant up until every machine answers SSH,
    then lab's adoption. The 1-VM run is the baseline of the 3-VM run (goal:
    3 VMs <= 1.5x one VM). LAB_BENCH_RUNS=N repeats each (default 1).
    """
    if not libvirt_ready("vm"):
        return
    from lab.testing.hostdaemons import libvirtd_running

    runs = int(os.environ.get("LAB_BENCH_RUNS", "1"))
    print("libvirt box: build (VM image cached by recipe; disk, qcow2 and packing every time) and add")
    build = timed([*LAB, "box", "build", "--format", "libvirt", "--force"], 1)[0]
    warm = timed([*LAB, "box", "build", "--format", "libvirt"], 1)[0]
    add = timed([*LAB, "box", "add", "--format", "libvirt"], 1)[0]
    print(f"  cold build (debootstrap with a kernel, disk, box): {build:.1f} s; "
          f"cached: {warm:.1f} s; vagrant box add: {add:.1f} s")
    with libvirtd_running():
        medians = {}
        # The first boot after `lab box add` also uploads the box into
        # libvirt's pool (~700 MB): reported on its own, not in the baseline.
        for nodes, label in ((1, "first"), (1, ""), (3, "")):
            samples = []
            for _ in range(1 if label else runs):
                with tempfile.TemporaryDirectory() as scratch:
                    common = ["--provider", "libvirt", "--nodes", str(nodes), "--name", f"bench{nodes}",
                              "--set", "providers.libvirt.driver=qemu", "-f", f"{scratch}/lab.yaml"]
                    start = time.perf_counter()
                    try:
                        subprocess.run([*LAB, "up", "--no-bootstrap", *common], check=True, capture_output=True)
                        samples.append(time.perf_counter() - start)
                    finally:
                        subprocess.run([*LAB, "destroy", "-f", f"{scratch}/lab.yaml", "--name", f"bench{nodes}"],
                                       capture_output=True)
            if label:
                print(f"  1 VM, first boot after box add (includes the upload into the pool): {samples[0]:.1f} s")
                continue
            medians[nodes] = statistics.median(samples)
            print(f"  {nodes} VM(s) to all adopted (lab up --no-bootstrap): median {medians[nodes]:.1f} s "
                  f"n={len(samples)}" + (f"  ({medians[nodes] / medians[1]:.2f}x one VM; goal <= 1.5x)"
                                         if nodes > 1 else "  (baseline)"))


# What lab up asks for under software emulation (README: Raft under software emulation).
EMULATED = ["--set", "providers.libvirt.driver=qemu", "--set", "etcd.pre_vote=true",
            "--set", "etcd.heartbeat_ms=250", "--set", "etcd.election_timeout_ms=2500"]


def bench_vm_update() -> None:
    """Rolling update of 3 libvirt VMs (A/B slots): `lab scenario run rolling-update`, its staging, roll and
    wall time, and the workload's latency during the staging against before (~45 min under emulation).
    Adds the libvirt box to Vagrant as `lab box add` does (replacing an older build of it)."""
    if not libvirt_ready("vm-update"):
        return
    import json

    from lab.testing.hostdaemons import libvirtd_running

    for version in ("1", "2"):
        subprocess.run([*LAB, "box", "build", "--format", "libvirt", "--version", version], check=True,
                       capture_output=True)
    subprocess.run([*LAB, "box", "add", "--format", "libvirt"], check=True, capture_output=True)
    print("rolling update of 3 libvirt VMs, 1 -> 2, under the scenario's workload (QEMU emulation)")
    with libvirtd_running(), tempfile.TemporaryDirectory() as scratch:
        start = time.perf_counter()
        done = subprocess.run([*LAB, "scenario", "run", "rolling-update", "--json", "--provider", "libvirt",
                               "--nodes", "3", "--name", "benchroll", "-f", f"{scratch}/lab.yaml", *EMULATED],
                              capture_output=True, text=True)
        wall = time.perf_counter() - start
    try:
        [result] = json.loads(done.stdout)
    except ValueError:
        print(f"  FAILED to run (exit {done.returncode}): {done.stderr.strip().splitlines()[-1:]}")
        return
    m = result["measurements"]
    latency = m.get("staging_latency") or {}
    print(f"  {'passed' if result['ok'] else 'FAILED'}; wall (lab up to destroy) {wall:.0f} s; staging "
          f"{m.get('staging_s', float('nan')):.0f} s; roll {m.get('roll_s', float('nan')):.0f} s")
    if latency:
        print(f"  workload latency during staging vs before: {json.dumps(latency)}")
    if m.get("member_downtime_s"):
        print(f"  etcd member downtime per node: {m['member_downtime_s']}")
    if not result["ok"]:
        print("  failed steps: " + "; ".join(s["step"] for s in result["steps"] if not s["ok"]))


def bench_arm64() -> None:
    """arm64 on this amd64 host: a cold arm64 libvirt box build (foreign debootstrap under qemu-user-static,
    into a throwaway cache: 15-30 min), then one arm64 VM booted under emulation to SSH (lab up
    --no-bootstrap) and to etcd healthy (lab up)."""
    if not libvirt_ready("arm64"):
        return
    from lab.errors import PrerequisiteError
    from lab.images.build import check_foreign_arch
    from lab.testing.hostdaemons import libvirtd_running

    try:
        check_foreign_arch("arm64")
    except PrerequisiteError as exc:  # binfmt's qemu-aarch64 missing: tools/install.sh registers it
        print(f"arm64: skipped ({exc.message})")
        return
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR", "/var/tmp")) as cache:
        env = {**os.environ, "XDG_CACHE_HOME": cache}
        build = timed([*LAB, "box", "build", "--arch", "arm64", "--format", "libvirt"], 1, env=env)[0]
        add = timed([*LAB, "box", "add", "--arch", "arm64", "--format", "libvirt"], 1, env=env)[0]
    print(f"  cold arm64 libvirt box build: {build:.0f} s; vagrant box add: {add:.1f} s")
    with libvirtd_running():
        for bootstrap, what in ((["--no-bootstrap"], "to SSH"), ([], "to etcd healthy")):
            with tempfile.TemporaryDirectory() as scratch:
                common = ["--provider", "libvirt", "--nodes", "1", "--name", "bencharm", "-f", f"{scratch}/lab.yaml",
                          "--set", "box.arch=arm64", *EMULATED]
                start = time.perf_counter()
                try:
                    subprocess.run([*LAB, "up", *bootstrap, *common], check=True, capture_output=True)
                    print(f"  1 arm64 VM {what} (lab up {' '.join(bootstrap)}): {time.perf_counter() - start:.0f} s")
                finally:
                    subprocess.run([*LAB, "destroy", "-f", f"{scratch}/lab.yaml", "--name", "bencharm"],
                                   capture_output=True)


BENCHES = {"cli": bench_cli, "render": bench_render, "render-core": bench_render_in_process,
           "boot": bench_boot, "etcd": bench_etcd, "failover": bench_failover, "scenarios": bench_scenarios, "update": bench_update,
           "build": bench_build, "vm": bench_vm, "vm-update": bench_vm_update, "arm64": bench_arm64}

if __name__ == "__main__":
    chosen = sys.argv[1:] or ["cli", "render", "render-core", "boot"]
    unknown = [name for name in chosen if name not in BENCHES]
    if unknown:
        sys.exit(f"unknown benchmark {unknown[0]!r}; choose from {', '.join(BENCHES)}")
    for name in chosen:
        BENCHES[name]()
