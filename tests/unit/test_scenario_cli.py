"""`lab scenario NAME` runs the scenario, as `lab scenario run NAME` does, with all its options.

Run in-process through typer's CliRunner on lab.testing's fake provider with
the scenario run stubbed (the `fake_lab` fixture): no nodes.
"""

from __future__ import annotations

import shutil

import pytest

FAKE = ["--provider", "nspawn"]

pytestmark = pytest.mark.usefixtures("no_lab_env")


def lab_exists(project, name: str = "lab") -> bool:
    return (project / ".lab" / name / "state.json").is_file()


def test_a_scenario_name_after_the_verb_runs_it(run_lab, fake_lab, project):
    result = run_lab("scenario", "demo", *FAKE)
    assert result.exit_code == 0, result.output
    assert "scenario demo passed" in result.stdout
    assert fake_lab.calls == ["preflight", "up node-1", "up node-2", "destroy"]  # as `scenario run demo`
    assert not lab_exists(project)


def test_the_options_of_run_apply(run_lab, fake_lab, project):
    result = run_lab("scenario", "demo", "--nodes", "1", *FAKE, "--keep", "--junit", "out.xml")
    assert result.exit_code == 0, result.output
    assert fake_lab.calls == ["preflight", "up node-1"]
    assert lab_exists(project)
    assert (project / "out.xml").read_text() == "<testsuite/>\n"


def test_the_failure_of_a_scenario_is_the_exit_code(run_lab, fake_lab, project):
    fake_lab.outcome["ok"] = False
    result = run_lab("scenario", "demo", *FAKE)
    assert result.exit_code == 1, result.output
    assert "scenario demo FAILED" in result.stdout


def test_an_unknown_name_is_one_error_listing_the_scenarios(run_lab, fake_lab, project):
    result = run_lab("scenario", "rolling-updat", *FAKE)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert "no scenario named 'rolling-updat'" in result.stderr
    assert "known scenarios:" in result.stderr
    assert "demo" in result.stderr and "rolling-update" in result.stderr
    assert fake_lab.calls == [] and not (project / ".lab").exists()


def test_name_help_is_the_help_of_run(run_lab):
    result = run_lab("scenario", "rolling-update", "--help")
    assert result.exit_code == 0, result.output
    assert "Run a scenario: faults, workload and checks" in result.stdout
    assert "--keep" in result.stdout and "--nodes" in result.stdout


def test_the_group_help_teaches_the_short_form(run_lab):
    result = run_lab("scenario", "--help")
    assert result.exit_code == 0, result.output
    assert "Usage: lab scenario [OPTIONS] NAME|COMMAND [ARGS]..." in result.stdout
    assert "lab scenario NAME [OPTIONS]" in result.stdout
    assert "`lab scenario run NAME`" in result.stdout


def test_the_commands_stay_commands(run_lab, fake_lab, project):
    # A scenario named like a command: the command wins, `run NAME` reaches the scenario.
    shutil.copytree(project / "scenarios" / "demo", project / "scenarios" / "list")
    listed = run_lab("scenario", "list", "--json")
    assert listed.exit_code == 0, listed.output
    assert '"name": "demo"' in listed.stdout and fake_lab.calls == []
    ran = run_lab("scenario", "run", "list", *FAKE)
    assert ran.exit_code == 0, ran.output
    assert "scenario list passed" in ran.stdout
    created = run_lab("scenario", "new", "mine")
    assert created.exit_code == 0, created.output
    assert (project / "scenarios" / "mine" / "scenario.yaml").is_file()


def test_an_unknown_option_is_still_a_usage_error(run_lab):
    result = run_lab("scenario", "--bogus")
    assert result.exit_code == 2
    assert "No such option: --bogus" in result.output
