"""What a scenario run produces: one result per step and checker, and the run's result.

Shared by the engine, which fills them in, and the report writers, which
render them; neither needs the other to read them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# What a step handler returns: passed, a one-line (or longer) detail, the
# step's own measurements.
Outcome = tuple[bool, str, dict[str, Any]]


@dataclass
class StepResult:
    index: int
    description: str
    ok: bool
    started: float  # seconds since the run began
    duration: float
    detail: str = ""
    measurements: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunResult:
    scenario: str
    run_dir: Path
    ok: bool
    steps: list[StepResult]
    measurements: dict[str, Any]
    faults: list[dict[str, Any]]  # {"start", "end", "action", "targets"}
    leader_changes: list[dict[str, Any]]  # {"t", "leader", "term"}

    @property
    def failures(self) -> list[StepResult]:
        return [s for s in self.steps if not s.ok]


def progress_line(at: float, ok: bool, text: str) -> str:
    """How a finished step or checker is shown while the run goes on."""
    return f"[{at:6.2f}s] {'ok' if ok else 'FAILED':6} {text}"
