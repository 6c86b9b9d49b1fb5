"""Scenarios: testinfra suites run against a lab's nodes.

A scenario is a directory with a `scenario.yaml` (description, node count)
and `test_*.py` files written with testinfra's standard `host` fixture, one
host per node. Built-ins ship in `scenarios/`; a project's own live in
`./scenarios/`. Faults, workloads and the history checker are layered on this
by the scenario engine.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from . import yamlsafe
from .errors import LabError, UsageError
from .paths import resource

SCENARIO_FILE = "scenario.yaml"


class ScenarioFailed(LabError):
    exit_code = 1


@dataclass(frozen=True)
class Scenario:
    name: str
    source: str  # "built-in" or the local directory
    description: str
    path: str
    nodes: int | None = None  # node count for a lab the scenario creates


def _read(directory: Path, source: str) -> Scenario:
    spec_file = directory / SCENARIO_FILE
    try:
        data = yamlsafe.load(spec_file.read_text(encoding="utf-8")).data or {}
    except yamlsafe.YamlError as exc:
        raise UsageError(f"{spec_file}:{exc.line}: {exc.message}") from None
    if not isinstance(data, dict):
        raise UsageError(f"{spec_file}: must be a mapping with a description")
    nodes = data.get("nodes")
    if nodes is not None and (not isinstance(nodes, int) or isinstance(nodes, bool) or nodes < 1):
        raise UsageError(f"{spec_file}: nodes: must be a whole number of at least 1, got {nodes!r}")
    return Scenario(directory.name, source, str(data.get("description", "")).strip(), str(directory), nodes)


def discover(project_dir: Path) -> list[Scenario]:
    found: dict[str, Scenario] = {}
    for root, source in ((resource("scenarios"), "built-in"), (project_dir / "scenarios", "local")):
        if root.is_dir():
            for directory in sorted(p for p in root.iterdir() if (p / SCENARIO_FILE).is_file()):
                found[directory.name] = _read(directory, source)  # local ones shadow built-ins
    return sorted(found.values(), key=lambda s: s.name)


def find(name: str, project_dir: Path) -> Scenario:
    scenarios = {s.name: s for s in discover(project_dir)}
    if name not in scenarios:
        raise UsageError(f"no scenario named {name!r}",
                         hint=f"known scenarios: {', '.join(scenarios) or 'none'} (see `lab scenario list`)")
    return scenarios[name]


def pytest_argv(scenario: Scenario, nodes: list[str], ssh_config: Path, junit: Path | None) -> list[str]:
    # testinfra's ssh backend (not paramiko) so host keys are verified through
    # the lab's ssh_config; its ControlPath keeps one connection per node.
    argv = [sys.executable, "-m", "pytest", scenario.path, "-p", "no:cacheprovider", "-q",
            f"--rootdir={scenario.path}", f"--hosts={','.join('ssh://' + n for n in nodes)}",
            f"--ssh-config={ssh_config}"]
    if junit is not None:
        argv.append(f"--junitxml={junit}")
    return argv


def run_checks(scenario: Scenario, nodes: list[str], ssh_config: Path, junit: Path | None = None) -> None:
    """Run the scenario's testinfra files on every node; raise ScenarioFailed on any failure."""
    from .ssh import close_masters

    try:
        result = subprocess.run(pytest_argv(scenario, nodes, ssh_config, junit), check=False)
    finally:
        close_masters(ssh_config, nodes)
    if result.returncode != 0:
        raise ScenarioFailed(f"scenario {scenario.name}: checks failed (pytest exit {result.returncode})",
                             hint="the failing checks are listed above" + (f"; JUnit report: {junit}" if junit else ""))

