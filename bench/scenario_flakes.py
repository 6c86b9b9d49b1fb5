"""Flake report: each built-in scenario N times on one lab, with and without a CPU hog.

    sudo .venv/bin/python bench/scenario_flakes.py                      # every built-in, 20 runs, both modes
    sudo .venv/bin/python bench/scenario_flakes.py --runs 3 --scenarios raft-failover,partition --both
    sudo .venv/bin/python bench/scenario_flakes.py --runs 10 --hog --json flakes.json --keep

A CI gate is only useful if its verdict is right every time, so this asks how
often a correct cluster fails each scenario, on a quiet machine and on a noisy
CI runner. Needs root and the built node image. One lab (`--nodes`, nspawn)
is made in a fresh /tmp/flakes-* directory; every run goes through
`lab.core.lifecycle.run_scenarios`, the sequence `lab scenario run NAME` runs
on a running lab (load, verify, keep), and its figures come from the run's
result.json. Runs are interleaved (round 1 of every scenario and mode, then
round 2, ...) so that a disturbance from other work on the machine falls on
both modes alike.

The hog is os.cpu_count() busy-loop processes at normal priority, started
just before a hog-mode run and ended by pid just after it (and in a `finally`).

The lab gets the union of the chosen scenarios' `lab:` blocks (two blocks
setting one key differently stop the bench): the settings a `lab scenario
run` would give a lab it creates for each of them, printed at the start. A
scenario that rolls to another OS version (`update: {to: V}`) needs that image:
it is built first (as `lab box build --version V`), or with --no-build the
scenario is skipped with a line saying so.

Prints per scenario and mode: pass rate, wall time (p50, max), every leader
and fault-latency figure the runs' result.json measured (n, p50, p90, p99,
max; nearest-rank percentiles, so p99 of fewer than 100 samples is the
maximum), the host's 1-minute load average before the runs (the machine may
be shared), and the failed runs' messages grouped by their wording with the
numbers taken out. Asserts nothing. The run directories stay in the work
directory (printed) as evidence, about 4 MB a run (journals); the lab is
destroyed unless --keep.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lab.errors import LabError  # noqa: E402

LAB_NAME = "flakes"
MODES = {"no-hog": "no hog", "hog": "CPU hog"}
# A figure of result.json's measurements is a leader or fault timing when its key path says so.
TIMING_KEY = re.compile(r"leader|election|fault")
# Shown first when present: time to a leader from the fault, as the engine measures it now or
# (the verdicts' redesign) from the moment the fault is in place.
PREFERRED_FIGURES = ("time_to_leader_s", "time_to_new_leader_s", "fault_latency_s", "no_new_leader_after_s")
HOG_LOOP = "while True: pass"


# ---------------------------------------------------------------- figures (pure)


def percentile(samples: list[float], p: float) -> float:
    """Nearest-rank percentile: a value that was measured, never an interpolation."""
    ordered = sorted(samples)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def distribution(samples: list[float]) -> dict[str, Any]:
    if not samples:
        return {"n": 0}
    return {"n": len(samples), "p50": percentile(samples, 50), "p90": percentile(samples, 90),
            "p99": percentile(samples, 99), "max": max(samples)}


def timing_figures(result: dict[str, Any]) -> dict[str, list[float]]:
    """Every leader/election/fault timing in a result.json, by key path (read defensively).

    Numbers, lists of numbers and lists of records are all taken: the engine
    records `time_to_new_leader_s` as a list today, and a redesign may record
    one record per fault. A path counts when some key on it ends in `_s` and
    the path names a leader, an election or a fault; keys below the last `_s`
    key (a node name, say) are merged into it. The run's own measurements are
    read; the steps' only if those have none (they repeat them).
    """
    found: dict[str, list[float]] = {}

    def walk(value: Any, path: tuple[str, ...]) -> None:
        if isinstance(value, bool) or value is None:
            return
        if isinstance(value, (int, float)):
            seconds = [i for i, key in enumerate(path) if key.endswith("_s")]
            name = ".".join(path[:seconds[-1] + 1]) if seconds else ""
            if name and TIMING_KEY.search(name) and math.isfinite(value):
                found.setdefault(name, []).append(float(value))
        elif isinstance(value, list):
            for item in value:
                walk(item, path)
        elif isinstance(value, dict):
            for key, item in value.items():
                walk(item, path + (str(key),))

    walk(result.get("measurements") or {}, ())
    if not found:
        for step in result.get("steps") or []:
            if isinstance(step, dict):
                walk(step.get("measurements") or {}, ())
    return found


def step_bounds(result: dict[str, Any]) -> list[float]:
    """The bounds the run's new-leader steps were judged against (`bound_s`), if it records them."""
    bounds = {step["measurements"]["bound_s"] for step in result.get("steps") or []
              if isinstance(step, dict) and isinstance(step.get("measurements"), dict)
              and isinstance(step["measurements"].get("bound_s"), (int, float))}
    return sorted(bounds)


def failure_messages(result: dict[str, Any] | None, error: str | None) -> list[str]:
    messages = [f"{s.get('step', '?')}: {s.get('detail', '')}".strip()
                for s in (result or {}).get("steps") or [] if isinstance(s, dict) and not s.get("ok", True)]
    if error:
        messages.append(f"error: {error}")
    if result is None and error is None:
        messages.append("no result.json was written")
    return messages


def message_group(message: str) -> str:
    """The wording of a failure without its numbers: `after 2.62 s` and `after 2.53 s` group together."""
    first = message.strip().splitlines()[0] if message.strip() else message
    return re.sub(r"\d+(\.\d+)?", "#", first)[:300]


# ---------------------------------------------------------------- runs


@dataclass
class Run:
    scenario: str
    mode: str
    round: int
    ok: bool
    wall_s: float
    load1: float  # the host's 1-minute load average just before the run
    run_dir: str | None
    figures: dict[str, list[float]] = field(default_factory=dict)
    bounds: list[float] = field(default_factory=list)  # what the new-leader steps were judged against
    failures: list[str] = field(default_factory=list)


class CpuHog:
    """os.cpu_count() busy loops at normal priority: a CI runner whose other jobs want every core."""

    def __init__(self, processes: int) -> None:
        self.count = processes
        self.processes: list[subprocess.Popen] = []

    def __enter__(self) -> "CpuHog":
        try:
            for _ in range(self.count):
                self.processes.append(subprocess.Popen([sys.executable, "-S", "-c", HOG_LOOP],
                                                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                                       stderr=subprocess.DEVNULL))
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        """End each of our own processes by its pid: SIGTERM, then SIGKILL if it lingers."""
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
        for process in self.processes:
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)
        self.processes = []


class Progress:
    """The engine's progress lines, kept in a log file in the work directory rather than on screen."""

    def __init__(self, path: Path) -> None:
        self.file = path.open("a", encoding="utf-8")
        self.label = ""

    def __call__(self, message: str) -> None:
        self.file.write(f"{datetime.datetime.now():%H:%M:%S} {self.label} {message}\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def run_dirs(workdir: Path) -> set[Path]:
    runs = workdir / ".lab" / "runs"
    return set(runs.iterdir()) if runs.is_dir() else set()


def run_scenario(file: Path, name: str, nodes: int, progress: Progress) -> tuple[bool, dict | None, str | None, str | None]:
    """One `lab scenario run NAME --keep` on the running lab: (ok, result.json, error, run dir)."""
    from lab.core.lifecycle import Flags, run_scenarios

    before = run_dirs(file.parent)
    error = None
    try:
        runs = run_scenarios("scenario", [name], file, Flags(nodes=nodes), "never", None, progress)
        run_dir = runs.results[0].run_dir if runs.results else None
    except LabError as exc:  # no leader at the start, a missing image: this run failed, the next may not
        error, run_dir = exc.message, None
    except Exception as exc:  # a bug must cost one run, not the other hundreds
        error, run_dir = f"{type(exc).__name__}: {exc}", None
    if run_dir is None:
        made = sorted(run_dirs(file.parent) - before)
        run_dir = made[-1] if made else None
    result = None
    if run_dir is not None and (run_dir / "result.json").is_file():
        try:
            result = json.loads((run_dir / "result.json").read_text())
        except (OSError, ValueError) as exc:
            error = error or f"unreadable result.json: {exc}"
    ok = error is None and bool(result and result.get("ok"))
    return ok, result, error, str(run_dir) if run_dir else None


def schedule(scenarios: list[str], modes: list[str], runs: int) -> Iterator[tuple[int, str, str]]:
    for round_ in range(1, runs + 1):
        for name in scenarios:
            for mode in modes:
                yield round_, name, mode


# ---------------------------------------------------------------- set-up


def lab_settings(chosen: list[tuple[Any, Any]]) -> tuple[dict[str, Any], list[str]]:
    """The union of the scenarios' `lab:` blocks, as `lab test` merges them, and who asked for what
    (SystemExit on a conflict)."""
    from lab.core.lifecycle import merged_lab_settings
    from lab.errors import UsageError

    try:
        merged = merged_lab_settings(chosen)
    except UsageError as exc:
        raise SystemExit(f"scenario_flakes: {exc.message}: run them in separate benches") from None
    settings: dict[str, Any] = {}
    for path, (value, _) in merged.items():
        node = settings
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return settings, [f"{'.'.join(p)}={v!r} ({who})" for p, (v, who) in merged.items()]


def prepare_images(box: str, chosen: list[tuple[Any, Any]], build: bool) -> dict[str, str]:
    """Build what the scenarios roll to (or not); returns scenario -> why it is skipped."""
    from lab.core.lifecycle import rolled_versions
    from lab.images.build import build_image
    from lab.images.cache import find_image

    skipped: dict[str, str] = {}
    for scenario, spec in chosen:
        for version in rolled_versions(spec):
            if find_image(box, version) is not None:
                continue
            command = f"lab box build --version {version}"
            if not build:
                skipped[scenario.name] = f"needs the {box} {version} image, not built (`{command}`; or drop --no-build)"
                break
            print(f"building {box} {version} for {scenario.name} (as `{command}`) ...", flush=True)
            started = time.monotonic()
            try:
                build_image(box, version)
            except LabError as exc:
                skipped[scenario.name] = f"needs the {box} {version} image; `{command}` failed: {exc.message}"
                break
            print(f"  built in {time.monotonic() - started:.0f} s", flush=True)
    return skipped


# ---------------------------------------------------------------- report


def summarize(runs: list[Run], scenarios: list[str], modes: list[str]) -> dict[str, dict[str, Any]]:
    summary: dict[str, dict[str, Any]] = {}
    for name in scenarios:
        for mode in modes:
            mine = [r for r in runs if r.scenario == name and r.mode == mode]
            if not mine:
                continue
            figures: dict[str, list[float]] = {}
            for run in mine:
                for key, values in run.figures.items():
                    figures.setdefault(key, []).extend(values)
            groups: dict[str, dict[str, Any]] = {}
            for run in mine:
                for message in run.failures:
                    group = groups.setdefault(message_group(message), {"count": 0, "example": message, "runs": []})
                    group["count"] += 1
                    if run.round not in group["runs"]:
                        group["runs"].append(run.round)
            walls = [r.wall_s for r in mine]
            passed = sum(r.ok for r in mine)
            summary.setdefault(name, {})[mode] = {
                "runs": len(mine), "passed": passed, "pass_rate": round(passed / len(mine), 3),
                "wall_s": {"p50": round(statistics.median(walls), 2), "max": round(max(walls), 2)},
                "load1_median": round(statistics.median(r.load1 for r in mine), 2),
                "leader_bounds_s": sorted({b for r in mine for b in r.bounds}),
                "figures": {key: {**distribution(values), "samples": values}
                            for key, values in sorted(figures.items(), key=lambda kv: figure_order(kv[0]))},
                "failures": sorted(groups.values(), key=lambda g: -g["count"]),
                "failed_run_dirs": [r.run_dir for r in mine if not r.ok and r.run_dir],
            }
    return summary


def figure_order(name: str) -> tuple[int, str]:
    return (PREFERRED_FIGURES.index(name) if name in PREFERRED_FIGURES else len(PREFERRED_FIGURES), name)


def print_summary(summary: dict[str, dict[str, Any]], skipped: dict[str, str]) -> None:
    for name, modes in summary.items():
        print(f"\n{name}")
        for mode, s in modes.items():
            print(f"  {MODES[mode]:<8} {s['passed']:>3}/{s['runs']:<3} passed ({s['pass_rate'] * 100:5.1f}%)   "
                  f"wall p50 {s['wall_s']['p50']:6.1f} s  max {s['wall_s']['max']:6.1f} s   "
                  f"load1 before runs (median) {s['load1_median']:.1f}"
                  + (f"   new-leader bound {', '.join(f'{b:g}' for b in s['leader_bounds_s'])} s"
                     if s["leader_bounds_s"] else ""))
            for key, d in s["figures"].items():
                if d["n"]:
                    print(f"           {key:<34} n={d['n']:<4} p50 {d['p50']:6.2f}  p90 {d['p90']:6.2f}  "
                          f"p99 {d['p99']:6.2f}  max {d['max']:6.2f} s")
            for group in s["failures"]:
                rounds = ",".join(str(r) for r in group["runs"])
                print(f"           {group['count']}x {group['example'].splitlines()[0][:220]}   [round {rounds}]")
    for name, why in skipped.items():
        print(f"\n{name}\n  SKIPPED: {why}")


# ---------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20, help="runs of each scenario in each mode (default 20)")
    parser.add_argument("--scenarios", help="comma-separated names (default: every built-in scenario)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--hog", dest="modes", action="store_const", const=["hog"], help="only with the CPU hog")
    mode.add_argument("--no-hog", dest="modes", action="store_const", const=["no-hog"], help="only without it")
    mode.add_argument("--both", dest="modes", action="store_const", const=["no-hog", "hog"],
                      help="without and with the hog (default)")
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--keep", action="store_true", help="keep the lab (and print how to destroy it)")
    parser.add_argument("--no-build", dest="build", action="store_false",
                        help="skip scenarios whose OS version is not built instead of building it")
    parser.add_argument("--json", type=Path, help="also write the figures and every run as JSON here")
    args = parser.parse_args()
    modes = args.modes or ["no-hog", "hog"]
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    if args.json is not None and not args.json.parent.is_dir():
        parser.error(f"--json {args.json}: directory {args.json.parent} does not exist")
    if os.geteuid() != 0:
        print("scenario_flakes: needs root (nspawn nodes)", file=sys.stderr)
        return 2

    from lab.core.lab import Lab
    from lab.core.lifecycle import destroy as destroy_lab, Flags
    from lab.images.build import build_image
    from lab.scenarios.model import discover, find

    workdir = Path(tempfile.mkdtemp(prefix="flakes-", dir="/tmp"))
    try:
        if args.scenarios:
            chosen_names = [n.strip() for n in args.scenarios.split(",") if n.strip()]
            found = [find(n, workdir) for n in chosen_names]
        else:
            found = [s for s in discover(workdir) if s.source == "built-in"]
        chosen = [(s, s.load()) for s in found]
    except LabError as exc:
        shutil.rmtree(workdir)
        print(f"scenario_flakes: {exc.message}" + (f" ({exc.hint})" if exc.hint else ""), file=sys.stderr)
        return 2
    settings, origins = lab_settings(chosen)

    file = workdir / "lab.yaml"
    import yaml

    file.write_text(yaml.safe_dump({"name": LAB_NAME, "provider": "nspawn", "nodes": {"count": args.nodes},
                                    **settings}, sort_keys=False))
    lab = Lab.open(file)
    started_at = datetime.datetime.now().isoformat(timespec="seconds")
    print(f"scenario flakes: {len(chosen)} scenario(s) x {args.runs} run(s) x {len(modes)} mode(s) "
          f"({', '.join(MODES[m] for m in modes)}) on one {args.nodes}-node nspawn lab; "
          f"{os.cpu_count()} CPUs; hog = {os.cpu_count()} x `python -S -c '{HOG_LOOP}'`")
    print(f"work directory (lab.yaml, run reports in .lab/runs/, progress.log): {workdir}")
    print("lab settings from the scenarios' lab: blocks: " + (", ".join(origins) or "none (defaults)"))
    progress = Progress(workdir / "progress.log")
    runs: list[Run] = []
    skipped: dict[str, str] = {}
    interrupted = False
    try:
        build_image(lab.spec.box.name, lab.spec.box.version)
        skipped = prepare_images(lab.spec.box.name, chosen, args.build)
        for name, why in skipped.items():
            print(f"SKIP {name}: {why}", flush=True)
        names = [s.name for s, _ in chosen if s.name not in skipped]
        if not names:
            print("nothing to run: every chosen scenario was skipped", flush=True)
            shutil.rmtree(workdir / ".lab", ignore_errors=True)
            return 1
        up_started = time.monotonic()
        progress.label = "up"
        with lab.lock("up"):
            lab.up(progress)
        print(f"lab up: {time.monotonic() - up_started:.1f} s", flush=True)
        total = len(names) * len(modes) * args.runs
        for index, (round_, name, mode) in enumerate(schedule(names, modes, args.runs), 1):
            progress.label = f"[{mode} {name} {round_}]"
            load1 = os.getloadavg()[0]
            started = time.monotonic()
            if mode == "hog":
                with CpuHog(os.cpu_count() or 1):
                    ok, result, error, run_dir = run_scenario(file, name, args.nodes, progress)
            else:
                ok, result, error, run_dir = run_scenario(file, name, args.nodes, progress)
            run = Run(name, mode, round_, ok, round(time.monotonic() - started, 2), round(load1, 2), run_dir,
                      timing_figures(result or {}), step_bounds(result or {}),
                      [] if ok else failure_messages(result, error))
            runs.append(run)
            shown = "; ".join(f"{k} " + ", ".join(f"{v:.2f}" for v in vals) for k, vals in run.figures.items())
            print(f"[{index}/{total}] {name} {MODES[mode]} round {round_}: {'passed' if ok else 'FAILED'} "
                  f"in {run.wall_s:.1f} s (load1 {load1:.1f})" + (f"; {shown}" if shown else "")
                  + ("" if ok else f"; {run.failures[0][:160] if run.failures else ''}"), flush=True)
    except KeyboardInterrupt:
        interrupted = True
        print(f"\ninterrupted after {len(runs)} run(s): the figures below are of those", flush=True)
    except LabError as exc:
        print(f"scenario_flakes: {exc.message}" + (f" ({exc.hint})" if exc.hint else ""), file=sys.stderr)
        return 1
    finally:
        progress.label = "destroy"
        if args.keep:
            print(f"lab kept: cd {workdir} && lab destroy", flush=True)
        else:
            try:
                destroy_lab(file, Flags(), progress)
            except LabError as exc:
                print(f"scenario_flakes: could not destroy the lab: {exc.message} "
                      f"(cd {workdir} && lab destroy)", file=sys.stderr)
        progress.close()

    scenario_names = [s.name for s, _ in chosen]
    summary = summarize(runs, scenario_names, modes)
    print_summary(summary, skipped)
    print(f"\nrun reports: {workdir / '.lab' / 'runs'}; the machine may be shared: "
          "compare the load averages before reading much into a difference")
    if args.json is not None:
        document = {"command": " ".join(sys.argv), "started_at": started_at,
                    "finished_at": datetime.datetime.now().isoformat(timespec="seconds"),
                    "interrupted": interrupted, "cpus": os.cpu_count(), "nodes": args.nodes,
                    "lab_settings": settings, "workdir": str(workdir),
                    "hog": {"processes": os.cpu_count(), "argv": [sys.executable, "-S", "-c", HOG_LOOP]},
                    "skipped": skipped, "summary": summary, "runs": [asdict(r) for r in runs]}
        args.json.write_text(json.dumps(document, indent=2) + "\n")
        print(f"JSON: {args.json}")
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
