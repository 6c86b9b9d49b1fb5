"""Run lab's laptop path inside the simulated interpreter and write what happened as JSON.

Started by test_foreign_systems.py as `python driver.py REPORT.json` with
FOREIGN_SYSTEM set (interpreter/sitecustomize.py has made this process look
like Windows or macOS before this file runs). Each lab command runs through
the real CLI, one after another in this one process (a process per command
costs a second each); an exception that is not a clean exit is recorded with
its traceback, which is what the tests look for first.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

COMMANDS = [
    ["init"],
    ["render", "--provider", "virtualbox"],
    ["validate", "--provider", "virtualbox"],
    ["spec", "show"],
    ["status"],
    ["up", "--provider", "virtualbox"],
    ["destroy"],
    ["box", "list"],
    ["up", "--provider", "nspawn"],
    ["up", "--provider", "libvirt"],
    ["doctor"],
]


def run_lab(args: list[str]) -> dict:
    from typer.testing import CliRunner

    from lab.cli import app

    started = time.monotonic()
    result = CliRunner().invoke(app, args, prog_name="lab")
    crash = None
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        crash = "".join(traceback.format_exception(result.exception))
    return {"args": args, "exit_code": result.exit_code, "output": result.output, "crash": crash,
            "seconds": round(time.monotonic() - started, 2)}


def run_interactive() -> dict:
    """What `lab ssh` does once it has an endpoint: hand the terminal to ssh and come back with its status."""
    from lab.host.ssh import exec_interactive

    try:
        return {"exit_code": exec_interactive(["ssh", "-V"]), "crash": None}
    except BaseException:  # noqa: BLE001 - the test reports whatever happened
        return {"exit_code": None, "crash": traceback.format_exc()}


def main() -> None:
    report: dict = {"platform": sys.platform, "system": platform.system(), "commands": []}
    for args in COMMANDS:
        report["commands"].append(run_lab(args))
        if args[0] == "render":  # `up`'s rollback removes it again
            vagrantfile = Path(".lab", "lab", "Vagrantfile")
            report["vagrantfile"] = vagrantfile.read_text() if vagrantfile.exists() else None
    from lab.host.paths import cache_dir, runtime_dir, state_home

    report["dirs"] = {"cache": str(cache_dir()), "state": str(state_home()), "runtime": str(runtime_dir())}
    if sys.platform == "win32":  # on "macOS" exec_interactive would replace this very process
        report["interactive"] = run_interactive()
    report["blocked_still"] = {name: hasattr(os, name) for name in ("geteuid", "fork", "killpg")}
    Path(sys.argv[1]).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
