"""`lab unit` (systemd units placed by the cluster's scheduler, like fleetctl)
and `lab machines` (the machines the scheduler knows)."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Iterator

import typer

from lab.cli.options import DEFAULT_FILE, FileOpt, JsonOpt, NameOpt, locked_lab, open_lab
from lab.cli.output import out, show_rows

app = typer.Typer(no_args_is_help=True, rich_markup_mode=None, help="""\
Run systemd units on the cluster, placed by the scheduler (like fleetctl).

\b
Unit files are ordinary systemd units, with optional [X-Fleet] placement:
  MachineID=ID            only on that machine
  MachineMetadata=k=v     only on machines with that metadata (nodes.metadata)
  MachineOf=other.service on the same machine as another unit
  Conflicts=glob*         never beside units matching the glob
  Global=true             on every (matching) machine
Otherwise the least-loaded machine. A unit whose machine dies moves
elsewhere after the machine's lease (5 s) expires.
""")
verbs = typer.Typer(rich_markup_mode=None)  # top-level: `lab machines`
UnitsArg = Annotated[list[str], typer.Argument(help="Unit files (to submit) or names of submitted units.")]
UnitArg = Annotated[str, typer.Argument(help="Unit name.")]


def _unit_client(file: Path, name: str | None):
    lab = open_lab(file, name)
    return lab, lab.etcd_client()


@contextmanager
def _changing(file: Path, name: str | None, command: str) -> Iterator:
    """The lab's etcd client, under the lab's lock: a verb that changes the cluster's units."""
    with locked_lab(file, name, command) as lab:
        yield lab.etcd_client()


@app.command("submit")
def unit_submit(units: UnitsArg, file: FileOpt = DEFAULT_FILE, name: NameOpt = None) -> None:
    """Store unit files in the cluster without starting them."""
    from lab.cluster.units import submit

    with _changing(file, name, "unit submit") as client:
        for unit in submit(client, [Path(u) for u in units], "inactive"):
            out().print(f"submitted {unit}")


@app.command("start")
def unit_start(units: UnitsArg, file: FileOpt = DEFAULT_FILE, name: NameOpt = None) -> None:
    """Submit (if a file is given) and start units: the engine places them, an agent starts them."""
    from lab.cluster.units import set_desired

    with _changing(file, name, "unit start") as client:
        for unit in set_desired(client, units, "launched"):
            out().print(f"started {unit} (see `lab unit list`)")


@app.command("stop")
def unit_stop(units: UnitsArg, file: FileOpt = DEFAULT_FILE, name: NameOpt = None) -> None:
    """Stop units; they stay placed on their machine (loaded)."""
    from lab.cluster.units import set_desired

    with _changing(file, name, "unit stop") as client:
        for unit in set_desired(client, units, "loaded"):
            out().print(f"stopped {unit}")


@app.command("destroy")
def unit_destroy(units: UnitsArg, file: FileOpt = DEFAULT_FILE, name: NameOpt = None) -> None:
    """Stop units and remove them from the cluster."""
    from lab.cluster.units import destroy

    with _changing(file, name, "unit destroy") as client:
        for unit in destroy(client, units):
            out().print(f"destroyed {unit}")


@app.command("list")
def unit_list(file: FileOpt = DEFAULT_FILE, name: NameOpt = None, as_json: JsonOpt = False) -> None:
    """Every unit: machine, active and sub state, and why a unit is pending."""
    from lab.cluster.units import list_units

    _, client = _unit_client(file, name)
    show_rows(list_units(client), as_json, ("UNIT", "MACHINE", "ACTIVE", "SUB", "DESIRED", "PENDING BECAUSE"),
              lambda r: (r.name, ",".join(r.machines) or "-", r.active, r.sub, r.desired, r.reason),
              empty="no units; start one with `lab unit start FILE`")


@app.command("status")
def unit_status(unit: UnitArg, file: FileOpt = DEFAULT_FILE, name: NameOpt = None) -> None:
    """`systemctl status` of a unit, from the machine(s) running it."""
    from lab.cluster.units import unit_endpoints
    from lab.host.ssh import run_many

    lab, client = _unit_client(file, name)
    run_many(unit_endpoints(client, unit, lab.ssh_endpoints()), f"systemctl status --no-pager {unit}", echo=True)


@app.command("journal")
def unit_journal(unit: UnitArg, file: FileOpt = DEFAULT_FILE, name: NameOpt = None,
                 follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing new lines.")] = False,
                 lines: Annotated[int, typer.Option("--lines", "-n", help="Lines of history.")] = 10) -> None:
    """The unit's journal from whichever machine runs it (-f follows it live)."""
    import shlex

    from lab.cluster.units import unit_endpoints
    from lab.host.ssh import exec_interactive, run_many, ssh_argv

    lab, client = _unit_client(file, name)
    found = unit_endpoints(client, unit, lab.ssh_endpoints())
    command = f"journalctl --no-pager -o short -u {shlex.quote(unit)} -n {lines}" + (" -f" if follow else "")
    if follow and len(found) == 1:
        lab.write_ssh_config(lab.provider())
        # ssh hands the remote shell one string: pass the command as one.
        raise typer.Exit(exec_interactive(ssh_argv(found[0], lab.ssh_config_path, [command])))
    run_many(found, command, echo=True)


@verbs.command("machines")
def machines_(file: FileOpt = DEFAULT_FILE, name: NameOpt = None, as_json: JsonOpt = False) -> None:
    """Machines registered with the scheduler: id, IP, metadata, and which one is the engine."""
    from lab.cluster.units import machines

    _, client = _unit_client(file, name)
    show_rows(machines(client), as_json, ("MACHINE", "ID", "IP", "METADATA", "ENGINE"),
              lambda r: (r.name, r.id[:12], r.ip, ",".join(f"{k}={v}" for k, v in r.metadata.items()) or "-",
                         "yes" if r.engine else ""))
