"""Fixtures shared by the test modules.

One fixture per concern, none of them autouse: a module asks for what it
needs (or opts in with `pytestmark = pytest.mark.usefixtures(...)`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import pytest

if TYPE_CHECKING:
    from typer.testing import Result


@pytest.fixture
def no_lab_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Unset every LAB_* variable, so the host's environment cannot leak into a spec."""
    for var in list(os.environ):
        if var.startswith("LAB_"):
            monkeypatch.delenv(var)


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_lab_env: None) -> Path:
    """An empty project directory under tmp_path, made the current directory."""
    directory = tmp_path / "project"
    directory.mkdir()
    monkeypatch.chdir(directory)
    return directory


@pytest.fixture
def run_lab(no_lab_env: None) -> Callable[..., "Result"]:
    """Run the real `lab` CLI in this process: run_lab("spec", "show", env={...}).

    The result has `exit_code`, `stdout`, `stderr`, `output` (both streams)
    and `exception` (SystemExit for a clean exit, anything else is a crash).
    """
    from typer.testing import CliRunner

    from lab.cli import app

    runner = CliRunner()

    def run(*args: str, env: dict[str, str] | None = None, input: str | None = None) -> "Result":
        return runner.invoke(app, list(args), env=env, input=input, prog_name="lab")

    return run
