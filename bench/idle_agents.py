"""What an idle lab's scheduler agents cost etcd and the nodes: this tree's agent against an earlier one's.

    sudo .venv/bin/python bench/idle_agents.py                  # 3 nspawn nodes, agent of 030a6d7~1 as before
    sudo .venv/bin/python bench/idle_agents.py --before-rev REV --seconds 30 --rounds 3

One 3-node nspawn lab, no units: turn about (before, now, before, now...),
the agents on every node run one version's agent.py (copied over
/var/lib/lab/agent.py, lab-agent restarted, a settling pause), then over
`--seconds`: etcd's revision and raft index growth per second (writes the
agents make; the raft index also counts lease grants) and the CPU seconds
per second used by the agents and the etcd members, summed over the nodes
(read from /proc on the nodes). A turn with the agents stopped is the
floor. Under software emulation the same rounds kept three VMs' CPUs busy
(README, "VMs"); here, on nspawn, the CPU figures are small and the write
rates are the point. Prints figures and ratios; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

DEFAULT_BEFORE = "030a6d7~1"  # the agent before its idle rounds stopped writing
# On a node: CPU seconds (user + system) used so far by the agent and by etcd, one line each.
CPU = ("hz=$(getconf CLK_TCK); for unit in lab-agent etcd; do pid=$(systemctl show -p MainPID --value $unit); "
       "if [ \"$pid\" != 0 ]; then awk -v hz=$hz '{print ($14 + $15) / hz}' /proc/$pid/stat; else echo 0; fi; done")


def cpu(lab) -> tuple[float, float]:
    from lab.host.ssh import run_many

    agent = etcd = 0.0
    for result in run_many(list(lab.ssh_endpoints().values()), CPU, timeout=30):
        a, e = result.stdout.split()
        agent, etcd = agent + float(a), etcd + float(e)
    return agent, etcd


def raft_position(lab) -> tuple[int, int]:
    client = lab.etcd_client(timeout=5.0)
    try:
        header = client.call("maintenance/status", {}, endpoint=client.endpoints[0])["header"]
        status = client.status(client.endpoints[0])
        return int(header["revision"]), status.raft_index
    finally:
        client.close()


def install_agent(lab, source: str | None) -> None:
    """`source`: agent.py's text for every node, or None for the agents stopped."""
    from lab.host.ssh import run_many

    endpoints = list(lab.ssh_endpoints().values())
    if source is None:
        run_many(endpoints, "systemctl stop lab-agent", timeout=60)
        return
    with tempfile.NamedTemporaryFile("w", suffix=".py") as handle:
        handle.write(source)
        handle.flush()
        for node, endpoint in lab.ssh_endpoints().items():
            subprocess.run(["scp", "-q", "-F", str(lab.lab_dir / "ssh_config"), handle.name,
                            f"{node}:/var/lib/lab/agent.py"], check=True, timeout=60)
    run_many(endpoints, "rm -rf /var/lib/lab/__pycache__; systemctl restart lab-agent", timeout=60)


def turn(lab, seconds: float) -> dict[str, float]:
    first_agent, first_etcd = cpu(lab)
    first_revision, first_index = raft_position(lab)
    time.sleep(seconds)
    last_agent, last_etcd = cpu(lab)
    last_revision, last_index = raft_position(lab)
    return {"revisions_per_s": (last_revision - first_revision) / seconds,
            "raft_entries_per_s": (last_index - first_index) / seconds,
            "agent_cpu": (last_agent - first_agent) / seconds, "etcd_cpu": (last_etcd - first_etcd) / seconds}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2, help="turns per version")
    parser.add_argument("--seconds", type=float, default=20.0, help="length of one turn")
    parser.add_argument("--settle", type=float, default=5.0, help="pause after switching agents")
    parser.add_argument("--before-rev", default=DEFAULT_BEFORE, help="the git revision whose agent is 'before'")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("idle_agents: needs root (it boots nspawn nodes)")
        return 1
    from lab.core.lab import Lab
    from lab.images.build import build_image

    before = subprocess.run(["git", "-C", str(REPO), "show", f"{args.before_rev}:lab/node/agent.py"],
                            capture_output=True, text=True, check=True).stdout
    versions = {f"before ({args.before_rev})": before, "now": (REPO / "lab/node/agent.py").read_text(),
                "agents stopped": None}
    build_image("labos", "1")
    results: dict[str, list[dict[str, float]]] = {name: [] for name in versions}
    with tempfile.TemporaryDirectory(prefix="idle-agents-") as scratch:
        (Path(scratch) / "lab.yaml").write_text(f"name: bench-idle\nprovider: nspawn\nnodes:\n  count: {args.nodes}\n")
        lab = Lab.open(Path(scratch) / "lab.yaml")
        try:
            started = time.perf_counter()
            lab.up()
            print(f"lab {lab.name} ({args.nodes} nodes) up in {time.perf_counter() - started:.1f} s; "
                  f"{args.rounds} x {args.seconds:.0f} s per version, turn about")
            for _ in range(args.rounds):
                for name, source in versions.items():
                    install_agent(lab, source)
                    time.sleep(args.settle)
                    results[name].append(turn(lab, args.seconds))
        finally:
            lab.destroy()
    means = {name: {key: sum(r[key] for r in runs) / len(runs) for key in runs[0]} for name, runs in results.items()}
    print(f"{'':24} {'revisions/s':>12} {'raft entries/s':>15} {'agents CPU':>11} {'etcd CPU':>9}  (CPU: s per s, all nodes)")
    for name, mean in means.items():
        print(f"{name:24} {mean['revisions_per_s']:12.2f} {mean['raft_entries_per_s']:15.2f} "
              f"{mean['agent_cpu']:11.3f} {mean['etcd_cpu']:9.3f}")
    old, new = means[f"before ({args.before_rev})"], means["now"]
    ratio = (lambda a, b: f"{a / b:.1f}x" if b else ("none now" if a else "-"))
    print(f"before / now: revisions {ratio(old['revisions_per_s'], new['revisions_per_s'])}, "
          f"agents CPU {ratio(old['agent_cpu'], new['agent_cpu'])}, etcd CPU {ratio(old['etcd_cpu'], new['etcd_cpu'])}")
    print(json.dumps(means))
    return 0


if __name__ == "__main__":
    from lab.errors import LabError

    try:
        sys.exit(main())
    except LabError as exc:
        sys.exit(f"idle_agents: {exc}")
