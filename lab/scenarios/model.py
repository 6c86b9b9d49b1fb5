"""Scenarios: what a scenario file may say, and where scenarios are found.

A scenario is a directory with a `scenario.yaml` and `test_*.py` files
written with testinfra's standard `host` fixture (one host per node).
Built-ins ship in `scenarios/`; a project's own live in `./scenarios/` and
shadow built-ins of the same name. `lab.scenarios.engine` runs them.

    description: Kill the etcd leader; a new one must be elected in time.
    nodes: 3
    lab:                      # lab.yaml overrides for a lab the scenario creates
      etcd: {election_timeout_ms: 1000}
    steps:
      - workload: start
      - sleep: 2
      - fault: kill-etcd leader          # ACTION [TARGET]
      - wait-until: {condition: new-leader, timeout: 10, within: auto}
      - fault: start-etcd all
      - wait-until: healthy
      - probe: {write-via: leader, expect: ok}
      - workload: stop
      - unit: {start: hello.service, within: 60}     # through the scheduler; wait until active
      - fault: reboot node-of:hello.service          # the node the scheduler runs it on
      - run: {target: node-of:hello.service, command: journalctl -u hello.service --since=-5s,
              expect-output: Hello World, within: 60}
      - unit: {stop: hello.service, within: 15}
      - check: [test_cluster.py]
    expect:
      linearizable: true
      no_lost_writes: true
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from lab.model import yamlsafe
from lab.errors import LabError, UsageError
from lab.cluster.units import unit_source
from lab.host.paths import resource
from lab.scenarios.faults import FAULTS

SCENARIO_FILE = "scenario.yaml"
NAME_RE = re.compile(r"^[a-z][a-z0-9-]{0,39}$")

# Targets resolved at run time: the leader as observed just before the fault,
# its followers (the other etcd members), every node, the etcd members, the
# workers (nodes that reach etcd through a local gateway), a node by name, or
# the node(s) a scheduled unit runs on ("node-of:hello.service"). Partition
# also takes groups: "partition node-1|node-2,node-3".
SPECIAL_TARGETS = ("leader", "followers", "all", "members", "workers", "old-leader")
NODE_OF = "node-of:"
UNIT_NAME_RE = re.compile(r"^[A-Za-z0-9:_.@\\-]{1,255}$")
TARGET_HELP = "leader, followers, all, members, workers, old-leader, node-of:UNIT or a node name"


def check_target(target: str) -> str:
    """A step's node target as scenario.yaml may spell it (resolved when the step runs)."""
    if target.startswith(NODE_OF) and UNIT_NAME_RE.match(target[len(NODE_OF):]):
        return target
    if target not in SPECIAL_TARGETS and not NAME_RE.match(target):
        raise ValueError(f"target must be {TARGET_HELP}, got {target!r}")
    return target


class ScenarioFailed(LabError):
    exit_code = 1


class ScenarioError(UsageError):
    """A scenario file is malformed."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class Fault(_Strict):
    action: Literal[tuple(FAULTS)]  # type: ignore[valid-type] - the registry's names, in its order
    target: str = "all"

    @model_validator(mode="after")
    def _target_shape(self) -> "Fault":
        if self.action == "heal":
            return self
        if self.action == "partition" and "|" in self.target:
            groups = [g for g in self.target.split("|")]
            if any(not g for g in groups):
                raise ValueError(f"partition groups must not be empty: {self.target!r}")
            return self
        check_target(self.target)
        return self


class WaitUntil(_Strict):
    # updated: every node reports the version of the last `update` step;
    # update-halted: a node rolled back and the roll stopped;
    # new-leader: a member other than the last fault's leader leads a later term;
    # leader: a majority agrees on a leader; healthy: every member answers /health;
    # converged: every member agrees on leader and term, indexes within 5;
    # old-leader-follows: the last fault's leader is back as a follower;
    # service-moved: the probed service's replicas all answer again, not all
    # from the nodes that served when the last fault came (a replica moved).
    condition: Literal["new-leader", "leader", "healthy", "converged", "old-leader-follows", "updated",
                       "update-halted", "service-moved"]
    timeout: float = Field(30.0, gt=0, le=600, description="seconds before the step fails "
                                                          "(at least `within` and a second)")
    # new-leader: "auto": the liveness bound Raft promises for the lab's election
    # timeout, heartbeat and members (lab.scenarios.conditions.liveness_bound);
    # a number: a strict bound in seconds on this one sample. The time is
    # measured and reported either way; the step fails past the bound.
    within: float | Literal["auto"] | None = None


class Probe(_Strict):
    write_via: str = Field(alias="write-via", description="leader, old-leader or a node: write through that member only")
    expect: Literal["ok", "fail"]
    timeout: float = Field(2.0, gt=0, le=60)


class UnitStep(_Strict):
    """One of start, stop, running; `within` makes the step wait (and fail if it takes longer)."""

    start: str | None = Field(None, description="unit file in the scenario directory, started on the cluster")
    stop: str | None = Field(None, description="a started unit's name: stopped, it stays placed")
    running: str | None = Field(None, description="a unit's name: wait until the scheduler reports it active")
    within: float | None = Field(None, gt=0, le=600, description="seconds until the unit is active (start, "
                                                                 "running) or inactive (stop); default: no wait")

    @model_validator(mode="after")
    def _one_action(self) -> "UnitStep":
        given = [name for name in ("start", "stop", "running") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError("a unit step is exactly one of start, stop, running")
        if self.running is not None and self.within is None:
            self.within = 60.0
        return self

    @property
    def action(self) -> str:
        return next(name for name in ("start", "stop", "running") if getattr(self, name) is not None)

    @property
    def name(self) -> str:
        return Path(getattr(self, self.action)).name


class RunStep(_Strict):
    """A shell command on nodes over SSH: it passes when it exits 0 on every target node (and prints
    `expect-output`), tried again until `within` seconds have passed."""

    target: str = Field(description=f"{TARGET_HELP}; resolved at every attempt")
    command: str = Field(min_length=1)
    expect_output: str | None = Field(None, alias="expect-output", description="text its stdout must contain")
    within: float = Field(0, ge=0, le=600, description="keep trying this long (0: once)")
    timeout: float = Field(60, gt=0, le=600, description="seconds one attempt may take")

    @field_validator("target")
    @classmethod
    def _target(cls, value: str) -> str:
        return check_target(value)


class ServiceStart(_Strict):
    """Probe a replicated HTTP service from the host on every node until `service: stop`."""

    start: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$", description="the service's name in the report")
    port: int = Field(ge=1, le=65535, description="the port every node serves it on")
    path: str = Field("/", pattern=r"^/[^\s]*$")
    replicas: int = Field(1, ge=1, le=64, description="how many nodes must answer before the step passes")
    within: float = Field(120.0, gt=0, le=600, description="seconds to wait for them (an image pull included)")


VERSION_PATTERN = r"^[0-9A-Za-z][0-9A-Za-z._-]{0,31}$"


class UpdateStep(_Strict):
    """`to: "2"`, or a list: the first of these versions not every node runs already (`to: ["2", "1"]`
    rolls a lab on 1 to 2 and a lab a previous scenario left on 2 to 1)."""

    to: list[str] = Field(min_length=1, description="OS version to roll to, or versions to choose from")

    @field_validator("to", mode="before")
    @classmethod
    def _one_or_more(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("to")
    @classmethod
    def _versions(cls, value: list[str]) -> list[str]:
        for version in value:
            if not re.match(VERSION_PATTERN, version):
                raise ValueError(f"an OS version is letters, digits, '.', '_' and '-', got {version!r}")
        return value


class Step(_Strict):
    workload: Literal["start", "stop"] | None = None
    unit: UnitStep | None = None
    run: RunStep | None = None
    update: UpdateStep | None = None
    sleep: float | None = Field(None, ge=0, le=600)
    fault: Fault | None = None
    wait_until: WaitUntil | None = Field(None, alias="wait-until")
    probe: Probe | None = None
    check: list[str] | None = None
    service: ServiceStart | Literal["stop"] | None = None

    @field_validator("fault", mode="before")
    @classmethod
    def _fault_shorthand(cls, value: Any) -> Any:
        if isinstance(value, str):  # "kill-etcd leader"
            action, _, target = value.strip().partition(" ")
            return {"action": action, "target": target.strip() or ("all" if action != "heal" else "all")}
        return value

    @field_validator("wait_until", mode="before")
    @classmethod
    def _wait_shorthand(cls, value: Any) -> Any:
        return {"condition": value} if isinstance(value, str) else value

    @field_validator("check", mode="before")
    @classmethod
    def _check_shorthand(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _exactly_one(self) -> "Step":
        given = [name for name in STEP_KINDS if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"each step is exactly one of: {', '.join(k.replace('_', '-') for k in STEP_KINDS)}"
                             + (f" (got {', '.join(given)})" if given else ""))
        return self

    @property
    def kind(self) -> str:
        return next(name for name in STEP_KINDS if getattr(self, name) is not None)

    def describe(self) -> str:
        return STEP_DESCRIPTIONS[self.kind](getattr(self, self.kind))


# Every kind of step (a field of Step), in the order errors list them, and how it is shown.
STEP_DESCRIPTIONS: dict[str, Callable[[Any], str]] = {
    "workload": lambda action: f"workload: {action}",
    "unit": lambda unit: f"unit: {unit.action} {unit.name}" + (f" (within {unit.within:g} s)" if unit.within else ""),
    "run": lambda run: f"run on {run.target}: {run.command}",
    "update": lambda update: f"update: roll to {' or '.join(update.to)}",
    "sleep": lambda seconds: f"sleep {seconds:g} s",
    "fault": lambda fault: f"fault: {fault.action}" + ("" if fault.action == "heal" else f" {fault.target}"),
    "wait_until": lambda wait: f"wait until {wait.condition}",
    "probe": lambda probe: f"probe: a write via {probe.write_via} must {'succeed' if probe.expect == 'ok' else 'fail'}",
    "check": lambda files: f"check: {', '.join(files)}",
    "service": lambda service: "service: stop probing" if service == "stop" else (
        f"service: probe {service.start} on :{service.port}{service.path} ({service.replicas} replica(s))"),
}
STEP_KINDS = tuple(STEP_DESCRIPTIONS)


class Expect(_Strict):
    linearizable: bool = True
    no_lost_writes: bool = True
    # Sampled all through the run from outside the nodes (every 50 ms):
    max_down: int | Literal["auto"] | None = Field(
        None, description="never more etcd members down at once; auto: updates.max_concurrent_reboots")
    quorum: bool = Field(False, description="a majority of members answered at every sample")
    # Checked at the end, against the state the scenario found (any order, any lab):
    final_version: str | None = Field(
        None, description="every node runs this OS version; `previous`: the version it ran when the scenario "
                          "started; `target`: the version the last update step rolled to")
    rebooted: int | Literal["all"] | None = Field(None, description="how many nodes' boot ids changed")
    rolled_back: int | None = Field(None, description="how many nodes rolled back during this run")
    no_stale_leader: bool = Field(True, description="no leader elected after a fault with a log missing what "
                                                    "was committed before it")
    units_running: list[str] = Field(default_factory=list, description="units active at the end")
    units_moved: bool = Field(False, description="some unit changed machine during the run")
    service_max_unavailable_s: float | None = Field(
        None, gt=0, description="the probed service never had no replica answering for longer than this")


class Slo(_Strict):
    """A latency objective, judged over every sample of the run (and of earlier runs of the same scenario
    in one `lab test`), never over one sample unless asked: the verdict's default is liveness only."""

    new_leader_p99: float | None = Field(None, gt=0, le=600, description="seconds: the 99th percentile "
                                                                         "(nearest rank) of time to new leader")
    new_leader_p50: float | None = Field(None, gt=0, le=600, description="seconds: the median")
    min_samples: int = Field(1, ge=1, le=10000, description="fewer samples than this: the objective fails as "
                                                            "not measurable")

    @field_validator("new_leader_p99", "new_leader_p50", mode="before")
    @classmethod
    def _seconds(cls, value: Any) -> Any:
        # "2.5s" reads as 2.5: the way the objective is usually written.
        if isinstance(value, str) and value.strip().endswith("s"):
            try:
                return float(value.strip()[:-1])
            except ValueError:
                return value
        return value


class WorkloadOptions(_Strict):
    register_clients: int = Field(4, ge=0, le=32)
    unique_writers: int = Field(2, ge=0, le=32)
    registers: int = Field(3, ge=1, le=100)
    pause_ms: float = Field(10, ge=0, le=10000)


class ScenarioSpec(_Strict):
    description: str = ""
    nodes: int | None = Field(None, ge=1, le=64)
    lab: dict[str, Any] = Field(default_factory=dict, description="lab.yaml overrides for a lab it creates")
    workload: WorkloadOptions = Field(default_factory=WorkloadOptions)
    steps: list[Step] = Field(default_factory=list)
    expect: Expect = Field(default_factory=Expect)
    slo: Slo | None = None


@dataclass(frozen=True)
class Scenario:
    name: str
    source: str  # "built-in" or "local"
    description: str
    path: str
    nodes: int | None = None  # node count for a lab the scenario creates

    def load(self) -> ScenarioSpec:
        return parse(Path(self.path) / SCENARIO_FILE)


def parse(spec_file: Path) -> ScenarioSpec:
    """Read and validate a scenario.yaml; errors name the file, line and key path."""
    from lab.model.spec import validation_message

    label = str(spec_file)
    try:
        loaded = yamlsafe.load(spec_file.read_text(encoding="utf-8"))
    except yamlsafe.YamlError as exc:
        raise ScenarioError(f"{label}:{exc.line}: {exc.message}") from None
    except OSError as exc:
        raise ScenarioError(f"{label}: cannot be read ({exc})") from None
    data = loaded.data if loaded.data is not None else {}
    if not isinstance(data, dict):
        raise ScenarioError(f"{label}:1: must be a mapping (description:, steps:, ...)")
    try:
        spec = ScenarioSpec.model_validate(data)
    except ValidationError as exc:
        raise ScenarioError(validation_message(exc, label, loaded, ScenarioSpec),
                            hint="see the scenario format in `lab scenario new --help`") from None
    for index, step in enumerate(spec.steps):
        for name in (step.check or []) + ([step.unit.start] if step.unit and step.unit.start else []):
            if unit_source(spec_file.parent / name) is None:
                line = loaded.line_of(("steps", index, "check"))
                raise ScenarioError(f"{label}:{line}: steps[{index}].check: no file {name!r} in {spec_file.parent}")
    return spec


def _summary(directory: Path, source: str) -> Scenario:
    spec = parse(directory / SCENARIO_FILE)
    return Scenario(directory.name, source, spec.description.strip(), str(directory), spec.nodes)


def discover(project_dir: Path) -> list[Scenario]:
    found: dict[str, Scenario] = {}
    for root, source in ((resource("scenarios"), "built-in"), (project_dir / "scenarios", "local")):
        if root.is_dir():
            for directory in sorted(p for p in root.iterdir() if (p / SCENARIO_FILE).is_file()):
                found[directory.name] = _summary(directory, source)
    return sorted(found.values(), key=lambda s: s.name)


def find(name: str, project_dir: Path) -> Scenario:
    scenarios = {s.name: s for s in discover(project_dir)}
    if name not in scenarios:
        raise UsageError(f"no scenario named {name!r}",
                         hint=f"known scenarios: {', '.join(scenarios) or 'none'} (see `lab scenario list`)")
    return scenarios[name]


TEMPLATE_YAML = """\
description: {description}
nodes: 3
# lab:                      # lab.yaml overrides for a lab this scenario creates
#   etcd: {{election_timeout_ms: 1000}}
steps:
  - workload: start         # background writes, reads and CAS, recorded to history.jsonl
  - sleep: 2
  - fault: kill-etcd leader # {actions}
  - wait-until: {{condition: new-leader, timeout: 10, within: auto}}
  - fault: start-etcd all
  - wait-until: healthy
  - workload: stop
  - check: [test_{module}.py]
expect:
  linearizable: true        # the register history passes the linearizability checker
  no_lost_writes: true      # every acknowledged write is still there
"""

TEMPLATE_TEST = '''\
"""Checks run on every node after the steps.

Fixtures: testinfra's `host`, and `etcdctl` (etcdctl on the node against its
own member, with the lab's certificates when TLS is on).
"""


def test_etcd_is_running(host):
    assert host.service("etcd").is_running


def test_member_is_healthy(etcdctl):
    result = etcdctl("endpoint health")
    assert result.rc == 0 and "is healthy" in result.stdout + result.stderr, result.stderr
'''


def scaffold(name: str, directory: Path) -> Path:
    """Write a new scenario directory with a commented scenario.yaml and a testinfra file."""
    if not NAME_RE.match(name):
        raise UsageError(f"scenario name {name!r} must be lowercase letters, digits and '-', starting with a letter")
    target = directory / name
    if target.exists():
        raise UsageError(f"{target} already exists", hint="pick another name or edit that scenario")
    target.mkdir(parents=True)
    module = name.replace("-", "_")
    (target / SCENARIO_FILE).write_text(TEMPLATE_YAML.format(description=f"What {name} shows.", module=module,
                                                                actions=" | ".join(FAULTS)))
    (target / f"test_{module}.py").write_text(TEMPLATE_TEST)
    parse(target / SCENARIO_FILE)  # what we write must be valid
    return target
