"""lab.host.run: the one runner every host command goes through (real, tiny commands)."""

from __future__ import annotations

import pytest

from lab.errors import CommandError, PrerequisiteError
from lab.host.run import run


def test_a_result_carries_output_and_exit_code():
    result = run(["sh", "-c", "echo out; echo err >&2"])
    assert (result.ok, result.stdout, result.stderr, result.argv[0]) == (True, "out\n", "err\n", "sh")


def test_a_failure_names_the_command_where_it_ran_its_status_and_output_tail():
    with pytest.raises(CommandError) as info:
        run(["sh", "-c", "seq 1 40; exit 3"], where="node-2")
    error = info.value
    assert error.exit_status == 3 and error.where == "node-2"
    assert "node-2: `sh -c 'seq 1 40; exit 3'` exited 3" in error.message
    assert "    40" in error.message and "    25" not in error.message  # the tail only


def test_check_false_returns_the_failure():
    assert run(["false"], check=False).exit_code == 1


def test_a_timeout_is_a_command_error_without_a_status():
    with pytest.raises(CommandError, match="timed out") as info:
        run(["sleep", "5"], timeout=0.2)
    assert info.value.exit_status is None and "did not finish" in info.value.hint


def test_a_missing_program_is_a_prerequisite_error_naming_it():
    with pytest.raises(PrerequisiteError, match="no-such-tool-xyz is not installed"):
        run(["no-such-tool-xyz", "--version"], missing_hint="apt-get install xyz")
