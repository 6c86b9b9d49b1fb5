"""The foreign-system tier: lab's laptop path in an interpreter that looks like Windows or macOS.

Pure like tests/unit (no root, no nodes, no network, a few seconds), so the
fast tier (`-m "not nodes and not vm"`) runs it; every test here is marked
`foreign` too, so `-m foreign` runs it alone. The simulation itself is
interpreter/sitecustomize.py; what it covers and what it does not is said
there and in the README.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
INTERPRETER = HERE / "interpreter"
CHECKOUT = HERE.parent.parent  # the lab next to these tests is the one under test

# Stand-ins for vagrant, VBoxManage and ssh. They run on the real interpreter
# (-I: no PYTHONPATH, so no simulation), record their argv as a JSON line and
# behave as far as lab needs: `vagrant up` makes the machine's record under
# .vagrant, `status` and `destroy` follow it, `ssh-config` fails, so `lab up`
# stops right after Vagrant "booted" the machines and rolls back.
FAKE_VAGRANT = """\
import json, os, shutil, sys
from pathlib import Path

with open(os.environ["FOREIGN_CALLS"], "a") as calls:
    calls.write(json.dumps(["vagrant", *sys.argv[1:]]) + "\\n")
args = [a for a in sys.argv[1:] if not a.startswith("-")]
machines = Path(".vagrant/machines")
if args[:1] == ["up"]:
    for node in args[1:]:
        (machines / node / "virtualbox").mkdir(parents=True, exist_ok=True)
        (machines / node / "virtualbox" / "id").write_text("fake-" + node)
        print(f"==> {node}: Booting VM... (fake vagrant)")
elif args[:1] == ["status"]:
    for record in sorted(machines.glob("*/virtualbox/id")):
        print(f"1700000000,{record.parent.parent.name},provider-name,virtualbox")
        print(f"1700000000,{record.parent.parent.name},state,running")
elif args[:1] == ["destroy"]:
    for node in args[1:] or [p.name for p in machines.glob("*")]:
        shutil.rmtree(machines / node, ignore_errors=True)
elif args[:1] == ["ssh-config"]:
    sys.exit("fake vagrant: the simulated host stops before SSH")
"""
FAKE_TOOL = """\
import json, os, sys

with open(os.environ["FOREIGN_CALLS"], "a") as calls:
    calls.write(json.dumps([{name!r}, *sys.argv[1:]]) + "\\n")
sys.exit({exit_code})
"""
# `ssh` exits with this, so a test sees its status come back through `lab ssh`'s code.
FAKE_SSH_EXIT = 7
SYSTEMS = ("Windows", "Darwin")
RUN_TIMEOUT = 120


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "foreign: lab's laptop path under a simulated Windows or macOS interpreter")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.foreign)


def write_tool(bin_dir: Path, name: str, source: str) -> None:
    """`name` and `name.exe` (what shutil.which finds on "Windows", PATHEXT being .exe there)."""
    for file_name in (name, f"{name}.exe"):
        path = bin_dir / file_name
        path.write_text(f"#!{sys.executable} -I\n{source}")
        path.chmod(0o755)


def make_foreign_host(directory: Path) -> dict[str, Path]:
    """A home, a project and a PATH holding only the fake tools; a Vagrant box "added" for virtualbox."""
    home, project, bin_dir = directory / "home", directory / "project", directory / "bin"
    for path in (home, project, bin_dir):
        path.mkdir(parents=True)
    (home / ".vagrant.d" / "boxes" / "lab-labos-1" / "0" / "virtualbox").mkdir(parents=True)
    write_tool(bin_dir, "vagrant", FAKE_VAGRANT)
    write_tool(bin_dir, "VBoxManage", FAKE_TOOL.format(name="VBoxManage", exit_code=0))
    write_tool(bin_dir, "ssh", FAKE_TOOL.format(name="ssh", exit_code=FAKE_SSH_EXIT))
    return {"home": home, "project": project, "bin": bin_dir, "tmp": directory}


def foreign_environment(system: str, host: dict[str, Path]) -> dict[str, str]:
    """The whole environment of a simulated run: nothing of this machine's leaks in (no XDG_*, no LAB_*)."""
    env = {"FOREIGN_SYSTEM": system, "PYTHONPATH": os.pathsep.join([str(INTERPRETER), str(CHECKOUT)]),
           "PATH": str(host["bin"]), "HOME": str(host["home"]), "FOREIGN_CALLS": str(host["tmp"] / "calls.jsonl"),
           "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1"}
    if system == "Windows":
        env.update(LOCALAPPDATA=str(host["home"] / "AppData" / "Local"),
                   APPDATA=str(host["home"] / "AppData" / "Roaming"), USERPROFILE=str(host["home"]),
                   USERNAME="dev")
    return env


@pytest.fixture(scope="session")
def foreign_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """driver.py's report, the fake tools' calls and the host dirs, per simulated system.

    Both simulations run at once, each one subprocess running every command of driver.py."""
    started = {}
    for system in SYSTEMS:
        host = make_foreign_host(tmp_path_factory.mktemp(system))
        report = host["tmp"] / "report.json"
        process = subprocess.Popen([sys.executable, str(HERE / "driver.py"), str(report)], cwd=host["project"],
                                   env=foreign_environment(system, host), stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True)
        started[system] = (process, host, report)
    found = {}
    for system, (process, host, report) in started.items():
        output, _ = process.communicate(timeout=RUN_TIMEOUT)
        assert process.returncode == 0 and report.exists(), f"{system}: the driver itself failed:\n{output}"
        calls_file = host["tmp"] / "calls.jsonl"
        calls = [json.loads(line) for line in calls_file.read_text().splitlines()] if calls_file.exists() else []
        found[system] = {"report": json.loads(report.read_text()), "calls": calls, "host": host,
                         "ssh_exit": FAKE_SSH_EXIT}
    return found
