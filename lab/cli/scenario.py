"""`lab scenario` (list, scaffold and run fault scenarios) and `lab test`
(create a lab, run scenarios, destroy it). The sequences they run live in
lab.core.lifecycle; this module parses and shows results."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from typer.core import TyperGroup

from lab.cli.options import DEFAULT_FILE, FileOpt, JsonOpt, NameOpt, NodesOpt, ProviderOpt, SetOpt, flags
from lab.cli.output import out, print_json, progress, show_rows


class ScenarioGroup(TyperGroup):
    """`lab scenario NAME ...` is `lab scenario run NAME ...`: the product's usage line names a
    scenario right after the verb. A word that is a command (list, new, run) stays that command;
    an unknown name reaches `run`, whose load phase refuses it listing the scenarios there are."""

    def resolve_command(self, ctx, args):
        if args and not args[0].startswith("-") and self.get_command(ctx, args[0]) is None:
            return "run", self.get_command(ctx, "run"), args
        return super().resolve_command(ctx, args)


HELP = """\
Run fault scenarios, list them, scaffold new ones.

\b
  lab scenario NAME [OPTIONS]   run scenario NAME: the same as `lab scenario run NAME`,
                                with all its options (`lab scenario NAME --help` lists them)
  lab scenario list             the built-in scenarios and the ones in ./scenarios
  lab scenario new NAME         scaffold ./scenarios/NAME

A scenario named like a command (list, new, run) runs with `lab scenario run NAME`.
"""

app = typer.Typer(cls=ScenarioGroup, help=HELP, no_args_is_help=True, rich_markup_mode=None,
                  subcommand_metavar="NAME|COMMAND [ARGS]...")
verbs = typer.Typer(rich_markup_mode=None)  # top-level: `lab test`


@app.command("list")
def scenario_list(as_json: JsonOpt = False) -> None:
    """List built-in scenarios and the ones in ./scenarios."""
    from lab.scenarios.model import discover

    show_rows(discover(Path.cwd()), as_json, ("SCENARIO", "SOURCE", "NODES", "DESCRIPTION"),
              lambda s: (s.name, s.source, str(s.nodes or "-"), s.description), empty="no scenarios found")


@app.command("new")
def scenario_new(scenario: Annotated[str, typer.Argument(help="Name of the new scenario.")],
                 directory: Annotated[Path, typer.Option(help="Where scenarios live.")] = Path("scenarios")) -> None:
    """Scaffold ./scenarios/NAME with a commented scenario.yaml and a testinfra file.

    \b
    Steps (one key each):
      workload: start|stop          background writes/reads/CAS, recorded to history.jsonl
      sleep: SECONDS
      fault: ACTION [TARGET]        kill|start|pause|resume|reboot|partition|heal|kill-etcd|start-etcd
                                    TARGET: leader|followers|all|old-leader|NODE|node-of:UNIT (the
                                    node running UNIT), or for partition groups: node-1|node-2,node-3
      unit: {start: FILE|stop: NAME|running: NAME, within: S}
                                    through the scheduler; within: wait until active (stopped)
      run: {target: TARGET, command: CMD, expect-output: TEXT, within: S}
                                    a command on nodes over SSH; must exit 0 (and print TEXT),
                                    tried again for up to `within` seconds
      wait-until: {condition: new-leader|leader|healthy|converged|old-leader-follows|updated|
                   update-halted|service-moved, timeout: S, within: auto|S}
      service: {start: NAME, port: P, path: /, replicas: N, within: S} | stop
                                    probe http://NODE:P/path on every node from the host (every
                                    100 ms) until stop; unavailability windows in the report
      probe: {write-via: leader|old-leader|NODE, expect: ok|fail}
      check: [test_x.py]            testinfra files run on every node
    """
    from lab.scenarios.model import scaffold

    target = scaffold(scenario, directory)
    out().print(f"created {target}: edit scenario.yaml, then `lab scenario run {scenario}`")


def _run(sequence: str, names: list[str], file: Path, name, nodes, provider, sets, destroy_policy: str,
         junit: Path | None, as_json: bool, from_snapshot: bool = False, shuffle: bool = False,
         seed: int | None = None) -> None:
    """Run a lifecycle sequence, show each scenario's result; exit non-zero on any failure."""
    from lab.core.lifecycle import run_scenarios
    from lab.scenarios.report import result_json

    runs = run_scenarios(sequence, names, file, flags(name, nodes, provider, sets), destroy_policy, junit, progress,
                         from_snapshot=from_snapshot, shuffle=shuffle, seed=seed)
    if as_json:
        print_json([result_json(r) for r in runs.results])  # alone on stdout: one JSON document
    else:
        for result in runs.results:
            _print_measurements(result)
    runs.raise_for_failures()


def _print_measurements(result) -> None:
    m = result.measurements
    parts = []
    if m.get("time_to_new_leader_s"):
        parts.append("new leader after " + ", ".join(f"{t:.2f} s" for t in m["time_to_new_leader_s"]))
    if m.get("no_new_leader_after_s"):
        parts.append("no new leader after " + ", ".join(f"{t:.2f} s" for t in m["no_new_leader_after_s"]))
    windows = [w for w in m.get("write_unavailability_s") or [] if w is not None]
    if windows:
        parts.append("writes unavailable for " + ", ".join(f"{w:.2f} s" for w in windows))
    if m.get("service"):
        windows = [w["duration_s"] for w in m["service"]["windows"]]
        parts.append(f"service {m['service']['name']} unavailable for "
                     + (", ".join(f"{w:.2f} s" for w in windows) if windows else "no window"))
    if "roll_s" in m:
        parts.append(f"rolled in {m['roll_s']:.1f} s")
    if m.get("member_downtime_s"):
        parts.append("member downtime " + ", ".join(f"{n} {t:.1f} s" for n, t in m["member_downtime_s"].items()))
    if "ops" in m:
        parts.append(f"{m['ops']} ops, {m.get('errors', 0)} not acknowledged")
    if "lost_writes" in m:
        parts.append(f"{m['lost_writes']} lost writes")
    status = "[green]passed[/green]" if result.ok else "[red]FAILED[/red]"
    out().print(f"scenario {result.scenario} {status}" + (f": {'; '.join(parts)}" if parts else ""))


JunitOpt = Annotated[Optional[Path], typer.Option(help="Also write the JUnit XML report here.")]


@app.command("run")
def scenario_run(scenario: Annotated[str, typer.Argument(help="Scenario name (see `lab scenario list`).")],
                 file: FileOpt = DEFAULT_FILE, name: NameOpt = None, nodes: NodesOpt = None,
                 provider: ProviderOpt = None, sets: SetOpt = None,
                 keep: Annotated[bool, typer.Option("--keep", help="Keep a lab the scenario created.")] = False,
                 junit: JunitOpt = None, as_json: JsonOpt = False) -> None:
    """Run a scenario: faults, workload and checks, with a report in .lab/runs/.

    Uses the running lab, or creates one (removed afterwards unless --keep).
    Exits non-zero when any step or check fails, so it can gate CI.
    """
    _run("scenario", [scenario], file, name, nodes, provider, sets, "never" if keep else "always", junit, as_json)


@verbs.command("test")
def test_(scenarios: Annotated[Optional[list[str]], typer.Argument(help="Scenarios to run (default: all built-ins).")] = None,
          file: FileOpt = DEFAULT_FILE, name: NameOpt = None, nodes: NodesOpt = None,
          provider: ProviderOpt = None, sets: SetOpt = None,
          destroy_policy: Annotated[str, typer.Option("--destroy", help="always, never or passing.")] = "always",
          junit: Annotated[Optional[Path], typer.Option(help="Write JUnit XML here (one file per scenario).")] = None,
          as_json: JsonOpt = False,
          from_snapshot: Annotated[bool, typer.Option(
              "--from-snapshot", help="Snapshot the lab once bootstrapped and restore it before each scenario "
                                      "(nspawn: seconds each, instead of a new lab).")] = False,
          shuffle: Annotated[bool, typer.Option("--shuffle", help="Run the scenarios in a random order "
                                                                  "(the seed is printed).")] = False,
          seed: Annotated[Optional[int], typer.Option("--seed", min=0, max=2 ** 32 - 1,
                                                      help="The order of --shuffle: run a printed order "
                                                           "again (implies --shuffle).")] = None) -> None:
    """Create a lab, run scenarios on it, destroy it (as Molecule's test does)."""
    _run("test", scenarios or [], file, name, nodes, provider, sets, destroy_policy, junit, as_json,
         from_snapshot=from_snapshot, shuffle=shuffle, seed=seed)
