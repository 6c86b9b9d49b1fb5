"""Count systemd's "Failed at step CGROUP" unit failures over many nspawn node boots.

    python bench/cgroup_failures.py                      # 3 nodes, 1 + 70 rounds: 213 node boots
    python bench/cgroup_failures.py --nodes 3 --rounds 100 --restart-every 10 --no-bootstrap
    python bench/cgroup_failures.py --privileged         # nodes without a user namespace

Needs root and the built node image. Boots a lab, then each round reboots every
node at once (a clean reboot: the supervisor starts nspawn again); every
`--restart-every` rounds it halts and starts the lab instead, so supervisors,
nspawn processes and cgroups are made anew. After every boot it reads that
boot's journal on each node and counts the units that failed "at step CGROUP"
(the race the provider's retry of failed units once worked around), whether or
not something started them again afterwards. Prints figures, asserts nothing;
the lab is destroyed at the end.

Measured on a 2-core cgroup-v1 (hybrid) host, `--nodes 3 --rounds 100
--restart-every 10`, 303 node boots each: nodes sharing the host's
`name=systemd` and unified cgroups (before issue 13): 10 boots with a CGROUP
failure, 11 failed unit starts; each node in its own cgroup everywhere: 0 and
0, with user namespaces and with `--privileged` alike.
"""

from __future__ import annotations

import argparse
import collections
import re
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lab.core.lab import Lab  # noqa: E402
from lab.host.ssh import run_many  # noqa: E402
from lab.model.spec import Override  # noqa: E402

JOURNAL = "journalctl -b 0 -o cat --no-pager | grep -F 'Failed at step CGROUP' || true"
UNIT = re.compile(r"^(\S+?):")


class Tally:
    def __init__(self) -> None:
        self.boots = 0
        self.failed_boots = 0
        self.failures = 0
        self.units: collections.Counter[str] = collections.Counter()

    def count(self, lab: Lab) -> None:
        endpoints = lab.ssh_endpoints()
        for result in run_many(list(endpoints.values()), JOURNAL, timeout=30):
            lines = [line for line in result.stdout.splitlines() if line.strip()]
            self.boots += 1
            self.failed_boots += bool(lines)
            self.failures += len(lines)
            self.units.update(m.group(1) for m in map(UNIT.match, lines) if m)

    def line(self) -> str:
        return (f"{self.boots} node boots, {self.failed_boots} with a CGROUP failure, "
                f"{self.failures} failed unit starts")


def reboot_all(lab: Lab) -> None:
    provider = lab.provider()
    names = lab.node_names()
    with ThreadPoolExecutor(max_workers=len(names)) as pool:
        list(pool.map(provider.reboot, names))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=70, help="reboot rounds after the first boot")
    parser.add_argument("--restart-every", type=int, default=10,
                        help="every N rounds, halt and start the lab instead of rebooting (0: never)")
    parser.add_argument("--no-bootstrap", action="store_true", help="boot bare nodes: no etcd, no agents")
    parser.add_argument("--privileged", action="store_true", help="nodes whose root is the host's (no user namespace)")
    args = parser.parse_args()
    project = Path(tempfile.mkdtemp(prefix="lab-cgroup-bench-"))
    (project / "lab.yaml").write_text("name: cgbench\nprovider: nspawn\n")
    overrides = [Override(("nodes", "count"), args.nodes, "--nodes")]
    if args.privileged:
        overrides.append(Override(("providers", "nspawn", "privileged"), True, "--privileged"))
    lab = Lab.open(project / "lab.yaml", overrides)
    tally = Tally()
    started = time.monotonic()
    try:
        with lab.lock("up"):
            lab.up(bootstrap=not args.no_bootstrap)
        tally.count(lab)
        for round_ in range(1, args.rounds + 1):
            if args.restart_every and round_ % args.restart_every == 0:
                lab.halt()
                lab.up(bootstrap=not args.no_bootstrap)
            else:
                reboot_all(lab)
            tally.count(lab)
            print(f"round {round_}/{args.rounds}: {tally.line()}", flush=True)
    except BaseException:
        for log in sorted(lab.lab_dir.glob("nodes/*/console.log")):  # destroy removes them
            print(f"--- {log}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-15:]), flush=True)
        raise
    finally:
        lab.destroy()
        shutil.rmtree(project, ignore_errors=True)
    print(f"\n{args.nodes} {'privileged ' if args.privileged else ''}nodes, {args.rounds} rounds "
          f"(restart every {args.restart_every}), bootstrap {'off' if args.no_bootstrap else 'on'}, "
          f"{time.monotonic() - started:.0f} s")
    print(tally.line())
    for unit, count in tally.units.most_common():
        print(f"  {unit:<44} {count}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
