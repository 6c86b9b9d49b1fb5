"""lab's laptop path on a simulated Windows and a simulated macOS (see interpreter/sitecustomize.py).

The tests read the reports of conftest's `foreign_runs` (driver.py run once per
system). A failure shows the command, its output and, for a crash, the traceback.
"""

from __future__ import annotations

import pytest

SYSTEMS = ("Windows", "Darwin")


def command(run: dict, *args: str) -> dict:
    return next(c for c in run["report"]["commands"] if c["args"] == list(args))


def shown(result: dict) -> str:
    return f"`lab {' '.join(result['args'])}` exited {result['exit_code']}:\n{result['output']}\n{result['crash'] or ''}"


@pytest.fixture(params=SYSTEMS)
def run(request: pytest.FixtureRequest, foreign_runs: dict[str, dict]) -> dict:
    return foreign_runs[request.param]


def test_it_is_a_simulation_of_that_system(run: dict) -> None:
    report = run["report"]
    assert (report["platform"], report["system"]) in {("win32", "Windows"), ("darwin", "Darwin")}
    assert report["blocked_still"] == {"geteuid": False, "fork": False, "killpg": False}


@pytest.mark.parametrize("args", [["init"], ["render", "--provider", "virtualbox"],
                                  ["validate", "--provider", "virtualbox"], ["spec", "show"], ["status"],
                                  ["destroy"], ["box", "list"]])
def test_commands_of_the_laptop_path_work(run: dict, args: list[str]) -> None:
    result = command(run, *args)
    assert result["crash"] is None and result["exit_code"] == 0, shown(result)


def test_the_vagrantfile_is_rendered_and_validated_by_vagrant(run: dict) -> None:
    vagrantfile = run["report"]["vagrantfile"]
    assert vagrantfile is not None and 'config.vm.provider "virtualbox" do |vb|' in vagrantfile
    assert ["vagrant", "validate", "--machine-readable"] in run["calls"]


def test_up_gets_as_far_as_vagrant_and_rolls_back(run: dict) -> None:
    result = command(run, "up", "--provider", "virtualbox")
    assert result["crash"] is None and result["exit_code"] != 0, shown(result)
    assert "Traceback" not in result["output"]
    # Every node booted through Vagrant (node-1 first, alone: it makes the linked clones' master) ...
    ups = [call for call in run["calls"] if call[1] == "up"]
    assert ups[0][2] == "node-1" and sorted(call[2] for call in ups) == ["node-1", "node-2", "node-3"]
    assert all("--provider=virtualbox" in call for call in ups)
    # ... then the fake's ssh-config stopped it, and the rollback destroyed the machines through Vagrant.
    assert "the simulated host stops before SSH" in result["output"]
    assert any(call[1] == "destroy" for call in run["calls"])
    assert not list((run["host"]["project"] / ".lab").glob("*/state.json"))


def test_doctor_answers(run: dict) -> None:
    result = command(run, "doctor")  # its verdicts are tests/unit/test_doctor.py's; here: it runs there
    assert result["crash"] is None and "virtualbox" in result["output"], shown(result)


@pytest.mark.parametrize("provider", ["nspawn", "libvirt"])
def test_linux_only_providers_say_so(run: dict, provider: str) -> None:
    result = command(run, "up", "--provider", provider)
    assert result["crash"] is None and result["exit_code"] != 0, shown(result)
    assert f"the {provider} provider runs on Linux only" in result["output"]
    assert "--provider virtualbox" in result["output"]


def test_per_user_files_live_where_that_system_keeps_them(run: dict) -> None:
    home, dirs = run["host"]["home"], run["report"]["dirs"]
    if run["report"]["system"] == "Windows":
        local = home / "AppData" / "Local" / "lab"
        assert (dirs["cache"], dirs["state"]) == (str(local / "Cache"), str(local))
    else:
        assert (dirs["cache"], dirs["state"]) == (str(home / "Library" / "Caches" / "lab"),
                                                  str(home / "Library" / "Application Support" / "lab"))
        assert dirs["runtime"] == str(home / "Library" / "Caches" / "lab" / "run")
    assert not (home / ".cache").exists() and not (home / ".local").exists()


def test_lab_ssh_runs_ssh_as_a_child_on_windows(foreign_runs: dict[str, dict]) -> None:
    windows = foreign_runs["Windows"]
    interactive = windows["report"]["interactive"]
    assert interactive == {"exit_code": windows["ssh_exit"], "crash": None}, interactive["crash"]
    assert ["ssh", "-V"] in windows["calls"]
