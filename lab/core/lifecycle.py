"""A lab's life around the `Lab` facade, for the CLI: a lab.yaml written by
`lab init`, a lab opened with the command line's flags, `lab destroy` (from the
recorded state too when lab.yaml is broken), a roll to another OS version, and
the sequences `lab test` and `lab scenario run` go through.

A sequence is data, as Molecule's are: a list of named phases that
`run_sequence` runs in order. After a failure only the phases marked `always`
(the clean-up) still run; then the failure is raised.

    lab test           check, load, create, verify, destroy
    lab scenario run          load, create, verify, destroy

`destroy` removes only a lab the run created, by its policy: always, passing
(only when every scenario passed) or never (`--keep`).
"""

from __future__ import annotations

import random
import shutil
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from lab.core.lab import CHANGE_WAIT, LABS_DIR, Lab
from lab.errors import SpecError, UsageError
from lab.host.files import write_atomic
from lab.model.spec import LabSpec, LoadedSpec, Override, default_yaml, load_spec, parse_set_option
from lab.providers.base import Progress

DESTROY_POLICIES = ("always", "never", "passing")


@dataclass(frozen=True)
class Flags:
    """The spec flags of the command line: --name, --nodes, --provider, --set."""

    name: str | None = None
    nodes: int | None = None
    provider: str | None = None
    sets: tuple[str, ...] = ()

    def overrides(self) -> list[Override]:
        """--set values first, then the named flags (which win), each labelled as it was typed."""
        overrides = [parse_set_option(item) for item in self.sets]
        for flag, path, value in (("--name", ("name",), self.name), ("--nodes", ("nodes", "count"), self.nodes),
                                  ("--provider", ("provider",), self.provider)):
            if value is not None:
                overrides.append(Override(path, value, f"{flag} {value}"))
        return overrides

    def open(self, file: Path) -> Lab:
        return Lab.open(file, self.overrides())


def init(file: Path, flags: Flags, force: bool = False) -> None:
    """Write a commented lab.yaml with every default spelled out, the flags' values in it."""
    if file.exists() and not force:
        raise UsageError(f"{file} already exists", hint="edit it, or pass --force to overwrite it")
    # Check the flags against the spec's rules first, so a bad --name or
    # --nodes is reported against the flag and init never writes a broken file.
    spec = load_spec(file.parent / ".lab-init-does-not-exist.yaml", flags.overrides(), environ={}).spec
    try:
        write_atomic(file, default_yaml(name=spec.name, nodes=spec.nodes.count, provider=spec.provider))
    except OSError as exc:
        why = (f"{file.parent} is not a directory" if file.parent.exists() and not file.parent.is_dir()
               else exc.strerror or str(exc))
        raise UsageError(f"cannot write {file}: {why}",
                         hint="run `lab init` in a directory you can write to, or name a file there with --file"
                         ) from None


def destroy(file: Path, flags: Flags, progress: Progress, forget_unreachable: bool = False) -> tuple[str, bool]:
    """Remove the lab; returns its name and whether there was anything to remove."""
    try:
        lab = flags.open(file)
    except SpecError as exc:
        # A broken lab.yaml must not keep a lab alive: destroy works from the
        # state the lab recorded, when it is clear which lab is meant.
        lab = _recorded_lab(file, flags.name)
        if lab is None:
            raise
        progress(f"{exc.message.splitlines()[0]}; destroying lab {lab.name!r} from its recorded state")
    # destroy waits a little: a command killed a moment ago may still be letting go.
    with lab.lock("destroy", wait=10):
        return lab.name, lab.destroy(progress, forget_unreachable=forget_unreachable)


def _recorded_lab(file: Path, name: str | None) -> Lab | None:
    labs = file.parent / LABS_DIR
    found = sorted(d.name for d in labs.iterdir() if (d / "state.json").is_file()) if labs.is_dir() else []
    chosen = name if name in found else (found[0] if len(found) == 1 and name is None else None)
    if chosen is None:
        return None
    try:
        spec = LabSpec(name=chosen)
    except ValueError:  # pydantic's ValidationError: a directory no lab of lab's could have made
        return None
    return Lab(LoadedSpec(spec=spec, path=file, exists=False))


def roll(lab: Lab, version: str, progress: Progress, wait: bool = True, timeout: float = 600.0) -> None:
    """Stage VERSION on every node; with wait, until every node runs it (UpdateError if the roll halts)."""
    from lab.cluster.update import UpdateError, start_roll, wait as wait_roll

    with lab.lock(f"update --to {version}", wait=CHANGE_WAIT):
        start_roll(lab, version, progress)
    if not wait:
        return
    halted = wait_roll(lab, version, progress, timeout).halted
    if halted:
        raise UpdateError(f"the roll to {version} stopped: {halted['node']} failed its health check on "
                          f"{halted['version']} ({halted['reason']}) and rolled back",
                          hint="fix the image, then `lab update --to` again (that clears the halt)")


# ---------------------------------------------------------------- scenario sequences


@dataclass
class ScenarioRuns:
    """What one `lab test` / `lab scenario run` has found and made so far; phases read and fill it in."""

    names: list[str]
    file: Path
    flags: Flags
    destroy_policy: str
    junit: Path | None
    progress: Progress
    scenarios: list[tuple[Any, Any]] = field(default_factory=list)  # (Scenario, ScenarioSpec)
    lab: Lab | None = None
    created_here: bool = False
    results: list[Any] = field(default_factory=list)  # RunResult of each scenario run so far
    held: ExitStack = field(default_factory=ExitStack)  # the lab's lock, from `load` to the end
    from_snapshot: bool = False  # `lab test --from-snapshot`: each scenario starts from the post-bootstrap snapshot

    @property
    def passed(self) -> bool:
        return bool(self.results) and all(r.ok for r in self.results) and len(self.results) == len(self.scenarios)

    def raise_for_failures(self) -> None:
        """ScenarioFailed naming each failed scenario's failures, if any failed (so CI fails)."""
        from lab.scenarios.model import ScenarioFailed

        failed = [r for r in self.results if not r.ok]
        if failed:
            lines = [f"{r.scenario}: " + "; ".join(s.description for s in r.failures) for r in failed]
            raise ScenarioFailed("scenario failed:\n  " + "\n  ".join(lines),
                                 hint=f"see {failed[0].run_dir / 'summary.md'} and junit.xml beside it")


@dataclass(frozen=True)
class Phase:
    name: str
    run: Callable[[ScenarioRuns], None]
    always: bool = False  # clean-up: runs after an earlier phase failed too


def _check_new(runs: ScenarioRuns) -> None:
    """`lab test` creates its own lab: one that exists already is refused, untouched."""
    lab = runs.flags.open(runs.file)
    if lab.created:
        raise UsageError(f"lab {lab.name!r} already exists; `lab test` creates its own",
                         hint="`lab destroy` first, use another --name, or `lab scenario run` on the running lab")


def _load(runs: ScenarioRuns) -> None:
    """Find and parse the scenarios, open the lab they run on and take its lock."""
    from lab.scenarios.model import find

    project = runs.file.parent if str(runs.file.parent) else Path.cwd()
    chosen = [find(n, project) for n in runs.names]
    runs.scenarios = [(found, found.load()) for found in chosen]
    lab = _scenario_lab(runs.scenarios, runs.file, runs.flags)
    runs.held.enter_context(lab.lock(f"scenario run {' '.join(runs.names)}"))
    runs.lab, runs.created_here = lab, not lab.created  # as the state read under the lock says


def _scenario_lab(scenarios: list[tuple[Any, Any]], file: Path, flags: Flags) -> Lab:
    """The lab the scenarios run on: for a lab they create, every scenario's `lab:` overrides
    together (in any order the same lab; two scenarios asking for different values of one
    setting are refused), the most nodes any asks for; flags win over both."""
    counts = [spec.nodes for _, spec in scenarios if spec.nodes]
    flags = replace(flags, nodes=flags.nodes or (max(counts) if counts else None))
    lab = flags.open(file)
    if lab.created or not any(spec.lab for _, spec in scenarios):
        return lab
    merged = merged_lab_settings(scenarios)
    scenario_overrides = [Override(path, value, label) for path, (value, label) in merged.items()]
    return Lab.open(file, scenario_overrides + flags.overrides())


def merged_lab_settings(scenarios: list[tuple[Any, Any]]) -> dict[tuple, tuple[Any, str]]:
    """Every scenario's `lab:` settings together, as key path -> (value, who asked for it); a UsageError
    if two scenarios ask for different values of one setting."""
    merged: dict[tuple, tuple[Any, str]] = {}
    for found, spec in scenarios:
        label = f"{found.path}/scenario.yaml lab:"
        for path, value in flatten_settings(spec.lab):
            if path in merged and merged[path][0] != value:
                raise UsageError(f"scenarios disagree on the lab they need: {merged[path][1]} sets "
                                 f"{'.'.join(path)}: {merged[path][0]!r}, {label} sets {value!r}",
                                 hint="run them in separate `lab test` commands")
            merged.setdefault(path, (value, label))
    return merged


def unmet_settings(spec: LabSpec, wanted: dict) -> list[str]:
    """The settings of a scenario's `lab:` that the lab's spec does not have, each as `path: wanted (has)`."""
    unmet = []
    for path, value in flatten_settings(wanted):
        current: Any = spec
        for key in path:
            current = getattr(current, key, None)
        if current != value:
            unmet.append(f"{'.'.join(path)}: {value!r} (the lab has {current!r})")
    return unmet


def flatten_settings(data: dict, prefix: tuple = ()) -> list[tuple[tuple, Any]]:
    items = []
    for key, value in data.items():
        if isinstance(value, dict) and value:
            items += flatten_settings(value, prefix + (key,))
        else:
            items.append((prefix + (key,), value))
    return items


def rolled_versions(spec: Any) -> list[str]:
    """The OS versions a scenario may roll to: its `update: {to: V}` steps (V, or a list to choose from)."""
    versions: set[str] = set()
    for step in spec.steps:
        if step.kind == "update":
            targets = step.update.to
            versions.update([targets] if isinstance(targets, str) else targets)
    return sorted(versions)


def _images(runs: ScenarioRuns) -> None:
    """Build the OS versions the scenarios roll to that this host has not built yet, before anything is
    created: `lab scenario rolling-update` works as written where only `lab box build` was run. Only the
    nspawn provider rolls today; on another a scenario's update step says so itself."""
    from lab.images.cache import find_image

    box = runs.lab.spec.box.name
    missing = [v for v in sorted({v for _, spec in runs.scenarios for v in rolled_versions(spec)})
               if find_image(box, v) is None]
    if not missing or runs.lab.selection().name != "nspawn":
        return
    from lab.images.build import build_image

    for version in missing:
        runs.progress(f"building the node OS image {box} {version}, which a scenario rolls to (as `lab box build"
                      f"{'' if box == 'labos' else ' --name ' + box} --version {version}`; once per host, ~1 min)")
        build_image(box, version, progress=runs.progress)


def _create(runs: ScenarioRuns) -> None:
    if runs.created_here or runs.flags.sets:
        # On a running lab, --set changes (etcd settings, say) are applied
        # first: `up` is idempotent and restarts only what changed.
        runs.lab.up(runs.progress)


# `lab test --from-snapshot` saves the lab it created under this name (kept with --destroy never).
BASE_SNAPSHOT = "lab-test-base"


def _verify(runs: ScenarioRuns) -> None:
    """Run each scenario; its report goes to .lab/runs/, its JUnit XML also where --junit says.
    With --from-snapshot, the freshly bootstrapped lab is saved first and restored before each scenario."""
    from lab.core import snapshots
    from lab.scenarios.engine import ScenarioRun

    if runs.from_snapshot:
        snapshots.save(runs.lab, BASE_SNAPSHOT, force=True, progress=runs.progress)
    for found, spec in runs.scenarios:
        if runs.from_snapshot:
            # Before the first scenario too: every one starts on nodes just booted from the same moment.
            snapshots.restore(runs.lab, BASE_SNAPSHOT, runs.progress)
        runs.progress(f"scenario {found.name}: {found.description}")
        unmet = unmet_settings(runs.lab.spec, spec.lab)
        if unmet:
            # Its lab: settings apply to a lab it creates; on this one its verdicts may not hold.
            runs.progress(f"warning: scenario {found.name} asks for {'; '.join(unmet)}; its `lab:` settings apply "
                          "only to a lab it creates (apply them with --set, or run it with `lab test`)")
        earlier = [r.measurements for r in runs.results if r.scenario == found.name]  # for its slo:
        result = ScenarioRun(runs.lab, found, spec, runs.progress, earlier=earlier).run()
        runs.results.append(result)
        runs.progress(f"report: {result.run_dir / 'summary.md'}")
        if runs.junit is not None:
            shutil.copyfile(result.run_dir / "junit.xml", runs.junit if len(runs.scenarios) == 1
                            else runs.junit.with_name(f"{runs.junit.stem}-{found.name}{runs.junit.suffix}"))


def _destroy(runs: ScenarioRuns) -> None:
    policy = runs.destroy_policy
    if runs.created_here and (policy == "always" or (policy == "passing" and runs.passed)):
        runs.progress("removing the lab this run created (--keep / --destroy never keeps it)")
        runs.lab.destroy(runs.progress)


PHASES = {phase.name: phase for phase in (
    Phase("check", _check_new),
    Phase("load", _load),
    Phase("images", _images),
    Phase("create", _create),
    Phase("verify", _verify),
    Phase("destroy", _destroy, always=True),
)}
SEQUENCES = {
    "test": ("check", "load", "images", "create", "verify", "destroy"),
    "scenario": ("load", "images", "create", "verify", "destroy"),
}


def run_sequence(phases: list[Phase], runs: ScenarioRuns) -> None:
    """Run the phases in order; after a failure only the `always` ones. The lock is held to the end.

    A clean-up that fails itself raises its own error, chained to the first,
    as a `finally:` block would.
    """
    failure: BaseException | None = None
    with runs.held:
        for phase in phases:
            if failure is not None and not phase.always:
                continue
            try:
                phase.run(runs)
            except BaseException as exc:  # Ctrl-C too: the clean-up still runs
                if failure is not None and exc.__context__ is None:
                    exc.__context__ = failure
                failure = exc
    if failure is not None:
        raise failure


def shuffled(names: list[str], seed: int | None) -> tuple[list[str], int]:
    """The names in a random order, and the seed that gives it (a new one when None)."""
    if seed is None:
        seed = random.SystemRandom().randrange(2 ** 32)
    order = list(names)
    random.Random(seed).shuffle(order)
    return order, seed


def run_scenarios(sequence: str, names: list[str], file: Path, flags: Flags, destroy_policy: str,
                  junit: Path | None, progress: Progress, from_snapshot: bool = False,
                  shuffle: bool = False, seed: int | None = None) -> ScenarioRuns:
    """Run SEQUENCES[sequence] over the named scenarios (no names: every built-in one); with from_snapshot
    (`lab test` only), each scenario starts from a snapshot of the lab taken right after it was created.

    `shuffle` runs them in a random order (from `seed`, printed so that a failing order can be run
    again). Returns what ran; `raise_for_failures()` on it turns failed scenarios into an error.
    """
    if destroy_policy not in DESTROY_POLICIES:
        raise UsageError(f"--destroy {destroy_policy!r}: must be always, never or passing")
    if junit is not None and (not junit.parent.is_dir() or junit.is_dir()):
        # checked first: a report that cannot be written must not cost a whole run
        where = f"{junit} is a directory" if junit.is_dir() else f"directory {junit.parent} does not exist"
        raise UsageError(f"--junit {junit}: {where}",
                         hint="give a file in an existing directory (mkdir -p it first), e.g. --junit report.xml")
    if not names:
        from lab.scenarios.model import discover

        names = [s.name for s in discover(Path.cwd()) if s.source == "built-in"]
    if shuffle or seed is not None:
        names, seed = shuffled(names, seed)
        progress(f"scenarios in a shuffled order (--seed {seed}): {', '.join(names)}")
    if from_snapshot and "check" not in SEQUENCES[sequence]:
        raise UsageError("--from-snapshot is for `lab test`, which creates the lab it snapshots",
                         hint="on a running lab: `lab snapshot save NAME`, then `lab snapshot restore NAME` "
                              "before each `lab scenario run`")
    runs = ScenarioRuns(names, file, flags, destroy_policy, junit, progress, from_snapshot=from_snapshot)
    run_sequence([PHASES[name] for name in SEQUENCES[sequence]], runs)
    return runs
