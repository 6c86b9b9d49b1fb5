"""What etcd TLS costs: the same 3-node nspawn lab with `etcd.tls: true` and `false`, in one run.

    python bench/etcd_tls.py                       # 3 rounds x 5 s per load, then etcdctl check perf on both
    python bench/etcd_tls.py --rounds 5 --seconds 10 --threads 1,8,32 --no-check-perf

Needs root and the built node image. Both labs are up at once and measured
turn about (tls, plain, tls, plain...), so background load on a shared host
falls on both alike. Loads:
  * the host's client (lab.cluster.etcdclient, httpx) and the agents'
    client (lab.node.etcd, http.client), each with one kept-alive connection
    per thread: TLS costs the record layer and the members' peer TLS;
  * the agents' client with a new connection, hence a full TLS handshake,
    per request (what the agents did before they kept connections alive);
and `etcdctl check perf --load=s` through `lab etcdctl` on each lab.

Throughput on a small shared host moves with whatever else runs, so each
load also reports CPU time per write, which moves much less: the etcd
members' (all three, read from /proc on the nodes before and after each turn,
the agents' background traffic included) and this client process's.
Prints figures and ratios (tls / plain); asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

MODES = {"tls": True, "plain": False}


def open_lab(scratch: Path, mode: str, nodes: int):
    from lab.core.lab import Lab

    directory = scratch / mode
    directory.mkdir()
    (directory / "lab.yaml").write_text(f"name: bench-{mode}\nprovider: nspawn\nnodes:\n  count: {nodes}\n"
                                        f"etcd:\n  tls: {str(MODES[mode]).lower()}\n")
    return Lab.open(directory / "lab.yaml")


def host_client(lab):
    return lab.etcd_client(timeout=2.0)


def node_client(lab):
    """The agents' client, run from the host with the lab's client certificate."""
    from lab.cluster.etcd_bootstrap import members
    from lab.host.pki import LabPki
    from lab.node.etcd import Etcd

    pki = LabPki(lab.lab_dir / "pki")
    tls = ({"ca": str(pki.ca), "cert": str(pki.client.cert), "key": str(pki.client.key)}
           if lab.spec.etcd.tls else None)
    return Etcd([m.client_url for m in members(lab.context("nspawn"))], tls, timeout=2.0)


class ConnectionPerRequest:
    """The agents' client, closing its connection after every request."""

    def __init__(self, lab) -> None:
        self.etcd = node_client(lab)

    def put(self, key: str, value: str) -> None:
        try:
            self.etcd.put(key, value)
        finally:
            self.etcd.close()


def load(make_client, threads: int, seconds: float) -> tuple[list[float], int]:
    """`threads` writers for `seconds`: the latency of every acknowledged put, and the error count."""
    latencies: list[list[float]] = [[] for _ in range(threads)]
    errors = [0] * threads
    client = make_client()
    stop = time.perf_counter() + seconds

    def writer(index: int) -> None:
        n = 0
        while time.perf_counter() < stop:
            started = time.perf_counter()
            try:
                client.put(f"/bench/tls/{index}/{n % 1000}", "x" * 64)
                latencies[index].append(time.perf_counter() - started)
            except Exception:  # noqa: BLE001 - counted, the run goes on
                errors[index] += 1
            n += 1
        if hasattr(client, "close"):
            client.close()  # this thread's connection (the host client keeps one per thread)

    pool = [threading.Thread(target=writer, args=(i,)) for i in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    return [x for per_thread in latencies for x in per_thread], sum(errors)


# On a node: CPU seconds (user + system) used so far by its etcd.
ETCD_CPU = ("pid=$(systemctl show -p MainPID --value etcd); "
            "awk -v hz=$(getconf CLK_TCK) '{print ($14 + $15) / hz}' /proc/$pid/stat")


def etcd_cpu(lab) -> float:
    """CPU seconds used so far by the lab's etcd members, summed."""
    from lab.host.ssh import run_many

    return sum(float(r.stdout) for r in run_many(list(lab.ssh_endpoints().values()), ETCD_CPU, timeout=20))


def client_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def idle(labs: dict, seconds: float) -> None:
    """What each lab's etcd burns with no load but its agents and Raft heartbeats."""
    for mode, lab in labs.items():
        before = etcd_cpu(lab)
        time.sleep(seconds)
        print(f"  idle (agents + heartbeats)  {mode:<5}  etcd CPU {(etcd_cpu(lab) - before) / seconds * 100:5.1f} % "
              "of one CPU, 3 members together")


def percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] if ordered else float("nan")


def measure(labs: dict, loads: list[tuple[str, object, int]], rounds: int, seconds: float) -> None:
    for label, factory, threads in loads:
        latencies = {mode: [] for mode in labs}
        errors = dict.fromkeys(labs, 0)
        etcd_seconds, client_seconds = dict.fromkeys(labs, 0.0), dict.fromkeys(labs, 0.0)
        for _ in range(rounds):
            for mode, lab in labs.items():  # turn about: drift on the host hits both modes
                etcd_before, client_before = etcd_cpu(lab), client_cpu()
                done, failed = load(lambda lab=lab: factory(lab), threads, seconds)
                client_seconds[mode] += client_cpu() - client_before
                etcd_seconds[mode] += etcd_cpu(lab) - etcd_before
                latencies[mode] += done
                errors[mode] += failed
        rate, etcd_ms, client_ms = {}, {}, {}
        for mode in labs:
            writes = max(1, len(latencies[mode]))
            rate[mode] = len(latencies[mode]) / (rounds * seconds)
            etcd_ms[mode] = etcd_seconds[mode] / writes * 1000
            client_ms[mode] = client_seconds[mode] / writes * 1000
            print(f"  {label:<40} {threads:>2} thr  {mode:<5} {rate[mode]:6.0f} writes/s  "
                  f"p50 {percentile(latencies[mode], 0.50) * 1000:6.1f} ms  "
                  f"p99 {percentile(latencies[mode], 0.99) * 1000:6.1f} ms  "
                  f"CPU/write: etcd {etcd_ms[mode]:5.2f} ms, client {client_ms[mode]:5.2f} ms  errors {errors[mode]}")
        print(f"  {'':<40} {'':>6}  tls/plain: writes/s {rate['tls'] / rate['plain']:.2f}, "
              f"etcd CPU/write {etcd_ms['tls'] / etcd_ms['plain']:.2f}, "
              f"client CPU/write {client_ms['tls'] / client_ms['plain']:.2f}")


def check_perf(lab) -> None:
    """`lab etcdctl -- check perf --load=s`, through the CLI as a user runs it."""
    command = [sys.executable, "-m", "lab.cli", "etcdctl", "--file", str(lab.loaded.path), "--",
               "check", "perf", "--load=s"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=lab.loaded.project_dir)
    # Its progress bar redraws in place, and a verdict may follow it on the same line.
    verdicts = re.findall(r"(?:PASS|FAIL)(?::[^\r\n]*)?|Slowest request[^\r\n]*", result.stdout)
    outcome = "passes" if result.returncode == 0 else f"FAILS (exit {result.returncode})"
    print(f"  {lab.name}: lab etcdctl -- check perf --load=s {outcome}: {'; '.join(verdicts)}"
          + (f"\n    {result.stderr.strip()[-300:]}" if result.returncode and result.stderr.strip() else ""))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3, help="turns per mode and load")
    parser.add_argument("--seconds", type=float, default=5.0, help="length of one turn")
    parser.add_argument("--threads", default="1,8,32", help="writer threads of the host client")
    parser.add_argument("--no-check-perf", action="store_true")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("etcd_tls: needs root (it boots nspawn nodes)")
        return 1
    from lab.images.build import build_image

    build_image("labos", "1")
    threads = [int(t) for t in args.threads.split(",")]
    loads = [("host client (httpx, kept alive)", host_client, t) for t in threads]
    loads += [(label, factory, t) for label, factory in (("agents' client (kept alive)", node_client),
                                                          ("agents' client (connection per request)",
                                                           ConnectionPerRequest))
              for t in (1, 8)]
    with tempfile.TemporaryDirectory(prefix="etcd-tls-") as scratch:
        labs = {mode: open_lab(Path(scratch), mode, args.nodes) for mode in MODES}
        try:
            for mode, lab in labs.items():
                started = time.perf_counter()
                lab.up()
                print(f"lab {lab.name} ({args.nodes} nodes, etcd.tls: {str(MODES[mode]).lower()}) up in "
                      f"{time.perf_counter() - started:.1f} s")
            print(f"etcd writes (64-byte values), {args.rounds} x {args.seconds:.0f} s per mode and load, "
                  "modes measured turn about:")
            idle(labs, 10.0)
            measure(labs, loads, args.rounds, args.seconds)
            if not args.no_check_perf:
                print("etcdctl check perf (~150 writes/s from 50 clients for 60 s: a pass/fail floor, not a maximum):")
                for lab in labs.values():
                    check_perf(lab)
        finally:
            for lab in labs.values():
                lab.destroy()
    return 0


if __name__ == "__main__":
    from lab.errors import LabError

    try:
        sys.exit(main())
    except LabError as exc:
        sys.exit(f"etcd_tls: {exc}")
