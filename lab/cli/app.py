"""`lab` command line: parse, call one core function, render the result.

Kept thin on purpose: every verb packs its arguments, calls into `lab.core`
(or `lab.boxes`, ...) and shows what came back, as a table for people or JSON
for machines. Errors are `LabError`s raised by the core; `LabGroup.invoke`
is the one place that turns them into a message and an exit code.

Heavy modules (pydantic, fabric, vagrant, jinja2) are imported inside the
verbs that need them, so `lab --help` starts fast.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer
from typer.core import TyperGroup

from lab.errors import LabError, UsageError

if TYPE_CHECKING:
    from lab.core.lab import Lab


class LabGroup(TyperGroup):
    def invoke(self, ctx):  # noqa: D401 - click API
        try:
            return super().invoke(ctx)
        except LabError as exc:
            _print_error(exc)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            _err().print("[yellow]interrupted[/yellow]")
            raise typer.Exit(130) from None


HELP = """\
Boot a real cluster of a CoreOS-style container OS on this machine, and test
how it behaves when things go wrong.

\b
Typical use:
  lab init                    write a commented lab.yaml (every key optional)
  lab up --nodes 3            boot 3 nodes (nspawn here, VMs with Vagrant)
  lab status                  nodes, their IPs and state
  lab exec -- uptime          run a command on every node
  lab fault kill node-2       hurt the cluster
  lab destroy                 remove everything the lab created

Settings come from, lowest to highest: defaults, lab.yaml, LAB_* variables,
flags (--nodes, --provider, --name, --set key.path=value).
"""

app = typer.Typer(cls=LabGroup, help=HELP, no_args_is_help=True, add_completion=False,
                  pretty_exceptions_enable=False, rich_markup_mode=None)


def _show_version(value: bool) -> None:
    if value:
        from lab import __version__

        typer.echo(f"lab {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: Annotated[bool, typer.Option("--version", callback=_show_version, is_eager=True,
                                                help="Print lab's version and exit.")] = False) -> None:
    pass
box_app = typer.Typer(cls=LabGroup, help="Build and manage node OS images.", no_args_is_help=True,
                    rich_markup_mode=None)
fault_app = typer.Typer(cls=LabGroup, help="Inject faults into a running lab.", no_args_is_help=True,
                      rich_markup_mode=None)
scenario_app = typer.Typer(cls=LabGroup, help="List and run fault scenarios.", no_args_is_help=True,
                         rich_markup_mode=None)
spec_app = typer.Typer(cls=LabGroup, help="Inspect the lab.yaml format.", no_args_is_help=True,
                     rich_markup_mode=None)
app.add_typer(box_app, name="box")
app.add_typer(fault_app, name="fault")
app.add_typer(scenario_app, name="scenario")
app.add_typer(spec_app, name="spec")

# ---------------------------------------------------------------- options shared by verbs

FileOpt = Annotated[Path, typer.Option("--file", "-f", envvar="LAB_FILE", help="lab spec to use.",
                                       show_default=True)]
NameOpt = Annotated[Optional[str], typer.Option("--name", help="Lab name (overrides `name:`).")]
NodesOpt = Annotated[Optional[int], typer.Option("--nodes", "-n", help="Number of nodes (overrides `nodes.count`).")]
ProviderOpt = Annotated[Optional[str], typer.Option(
    "--provider", "-p", help="auto, nspawn, virtualbox, libvirt, hyperv, vmware_desktop or parallels.")]
SetOpt = Annotated[Optional[list[str]], typer.Option(
    "--set", help="Override any key: --set etcd.tls=true (repeatable).", metavar="KEY.PATH=VALUE")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for machines instead of a table.")]

DEFAULT_FILE = Path("lab.yaml")


def _flag_overrides(name: str | None = None, nodes: int | None = None, provider: str | None = None,
                    sets: list[str] | None = None) -> list:
    from lab.model.spec import Override, parse_set_option

    overrides = [parse_set_option(item) for item in sets or []]
    for flag, path, value in (("--name", ("name",), name), ("--nodes", ("nodes", "count"), nodes),
                              ("--provider", ("provider",), provider)):
        if value is not None:
            overrides.append(Override(path, value, f"{flag} {value}"))
    return overrides


def _open_lab(file: Path, name: str | None = None, nodes: int | None = None, provider: str | None = None,
              sets: list[str] | None = None) -> "Lab":
    from lab.core.lab import Lab

    return Lab.open(file, _flag_overrides(name, nodes, provider, sets))


# ---------------------------------------------------------------- output helpers

_consoles: dict[str, Any] = {}


def _out():
    if "out" not in _consoles:
        from rich.console import Console
        _consoles["out"] = Console(highlight=False, soft_wrap=True)
    return _consoles["out"]


def _err():
    if "err" not in _consoles:
        from rich.console import Console
        _consoles["err"] = Console(stderr=True, highlight=False, soft_wrap=True)
    return _consoles["err"]


def _print_error(exc: LabError) -> None:
    from rich.markup import escape

    console = _err()
    console.print(f"[bold red]error:[/bold red] {escape(exc.message)}")
    if exc.hint:
        console.print(f"[bold]fix:[/bold] {escape(exc.hint)}")


def _progress(message: str) -> None:
    from rich.markup import escape

    _err().print(f"[dim]•[/dim] {escape(message)}")


def _print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=False) + "\n")


def _node_table(statuses, title: str | None = None):
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for column in ("NODE", "IP", "STATE", "BOOT ID"):
        table.add_column(column)
    colors = {"running": "green", "paused": "yellow", "stopped": "red", "not_created": "dim"}
    for status in statuses:
        state = status.state.value
        table.add_row(status.name, status.ip or "-", f"[{colors.get(state, 'white')}]{state}[/]",
                      (status.boot_id or "-")[:12])
    return table


# ---------------------------------------------------------------- verbs


@app.command()
def init(file: FileOpt = DEFAULT_FILE, name: NameOpt = None, nodes: NodesOpt = None,
         provider: ProviderOpt = None,
         force: Annotated[bool, typer.Option("--force", help="Overwrite an existing file.")] = False) -> None:
    """Write a commented lab.yaml with every default spelled out."""
    from lab.model.spec import Override, default_yaml, load_spec
    from lab.host.files import write_atomic

    if file.exists() and not force:
        raise UsageError(f"{file} already exists", hint="edit it, or pass --force to overwrite it")
    # Check the flags against the spec's rules first, so a bad --name or
    # --nodes is reported against the flag and init never writes a broken file.
    flags = [Override(path, value, f"{flag} {value}") for flag, path, value in (
        ("--name", ("name",), name), ("--nodes", ("nodes", "count"), nodes), ("--provider", ("provider",), provider))
        if value is not None]
    spec = load_spec(file.parent / ".lab-init-does-not-exist.yaml", flags, environ={}).spec
    text = default_yaml(name=spec.name, nodes=spec.nodes.count, provider=spec.provider)
    write_atomic(file, text)
    _out().print(f"wrote {file}; next: `lab up`")


@app.command()
def render(file: FileOpt = DEFAULT_FILE, name: NameOpt = None, nodes: NodesOpt = None,
           provider: ProviderOpt = None, sets: SetOpt = None,
           stdout: Annotated[bool, typer.Option("--stdout", help="Print instead of writing the file.")] = False,
           ) -> None:
    """Render the Vagrantfile of the lab into its directory (.lab/NAME/Vagrantfile)."""
    lab = _open_lab(file, name, nodes, provider, sets)
    result = lab.render(write=not stdout)
    if result.note:
        _progress(result.note)
    if stdout:
        sys.stdout.write(result.text)
    else:
        _out().print(f"rendered {result.path} for provider {result.provider}")


@app.command()
def validate(file: FileOpt = DEFAULT_FILE, name: NameOpt = None, nodes: NodesOpt = None,
             provider: ProviderOpt = None, sets: SetOpt = None) -> None:
    """Validate lab.yaml, and the rendered Vagrantfile with `vagrant validate` when vagrant is installed."""
    lab = _open_lab(file, name, nodes, provider, sets)
    for line in lab.validate():
        _out().print(line)


@app.command()
def up(file: FileOpt = DEFAULT_FILE, name: NameOpt = None, nodes: NodesOpt = None,
       provider: ProviderOpt = None, sets: SetOpt = None, as_json: JsonOpt = False,
       no_bootstrap: Annotated[bool, typer.Option("--no-bootstrap", help="Boot the nodes only: no etcd.")] = False,
       ) -> None:
    """Create the lab (or start it again), wait for SSH, and bootstrap the etcd cluster."""
    lab = _open_lab(file, name, nodes, provider, sets)
    with lab.lock("up"):
        result = lab.up(_progress, bootstrap=not no_bootstrap)
    if as_json:
        _print_json({"lab": lab.name, "provider": result.selection.name,
                     "ssh_config": str(result.ssh_config), "nodes": [s.to_json() for s in result.nodes]})
        return
    out = _out()
    out.print(_node_table(result.nodes, title=f"lab {lab.name} is up ({result.selection.name})"))
    first = result.nodes[0].name if result.nodes else "node-1"
    if not no_bootstrap:
        out.print(_member_table(lab.etcd_status()))
    out.print(f"  shell:    lab ssh {first}\n"
              f"  command:  lab exec -- uptime\n"
              f"  etcd:     lab etcdctl -- endpoint status   (endpoints {lab.etcdctl_env()['ETCDCTL_ENDPOINTS']})\n"
              f"  ssh:      ssh -F {result.ssh_config} {first}\n"
              f"  testinfra: pytest --hosts={','.join('ssh://' + s.name for s in result.nodes)} "
              f"--ssh-config={result.ssh_config}")


def _member_table(rows):
    from rich.table import Table

    table = Table(title="etcd", title_justify="left")
    for column in ("MEMBER", "ENDPOINT", "HEALTH", "ROLE", "RAFT TERM", "RAFT INDEX", "DB SIZE"):
        table.add_column(column, no_wrap=column == "ENDPOINT")
    for row in rows:
        health = "[green]healthy[/]" if row.healthy else "[red]unhealthy[/]"
        role = "[bold]leader[/]" if row.leader else ("follower" if row.member_id else "-")
        table.add_row(row.node, row.endpoint, health, role, str(row.raft_term or "-"), str(row.raft_index or "-"),
                      f"{row.db_size / 1024:.0f} KiB" if row.db_size else "-")
    return table


@app.command()
def status(file: FileOpt = DEFAULT_FILE, name: NameOpt = None, as_json: JsonOpt = False) -> None:
    """Show every node (state, IP, boot id) and every etcd member (health, leader, Raft term and index)."""
    lab = _open_lab(file, name)
    statuses = lab.status()
    running = any(s.state.value == "running" for s in statuses)
    members = lab.etcd_status() if lab.created and running else []
    if as_json:
        _print_json({"lab": lab.name, "created": lab.created,
                     "provider": lab.state.get("provider") if lab.state else None,
                     "nodes": [s.to_json() for s in statuses],
                     "etcd": [m.__dict__ for m in members]})
        return
    _out().print(_node_table(statuses, title=f"lab {lab.name}"
                             + (f" ({lab.state.get('provider')})" if lab.state else " (not created)")))
    if members:
        _out().print(_member_table(members))


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def etcdctl(ctx: typer.Context, file: FileOpt = DEFAULT_FILE, name: NameOpt = None) -> None:
    """Run the host's etcdctl against the lab: `lab etcdctl -- endpoint status -w table`."""
    import os
    import shutil

    from lab.errors import PrerequisiteError

    binary = shutil.which("etcdctl")
    if binary is None:
        raise PrerequisiteError("etcdctl not found on this host", hint="apt-get install etcd-client")
    lab = _open_lab(file, name)
    env = {**os.environ, **lab.etcdctl_env()}
    os.execve(binary, [binary, *ctx.args], env)


@app.command()
def halt(file: FileOpt = DEFAULT_FILE, name: NameOpt = None) -> None:
    """Power every node off cleanly; `lab up` starts them again with their state."""
    lab = _open_lab(file, name)
    with lab.lock("halt"):
        lab.halt(_progress)
    _out().print(f"lab {lab.name} halted")


@app.command()
def destroy(file: FileOpt = DEFAULT_FILE, name: NameOpt = None) -> None:
    """Remove every node, mount, bridge, rule and file the lab created."""
    from lab.errors import SpecError

    try:
        lab = _open_lab(file, name)
    except SpecError as exc:
        # A broken lab.yaml must not keep a lab alive: destroy works from the
        # state the lab recorded, when it is clear which lab is meant.
        lab = _lab_from_state(file, name)
        if lab is None:
            raise
        _progress(f"{exc.message.splitlines()[0]}; destroying lab {lab.name!r} from its recorded state")
    # destroy waits a little: a command killed a moment ago may still be letting go.
    with lab.lock("destroy", wait=10):
        existed = lab.destroy(_progress)
    _out().print(f"lab {lab.name} destroyed" if existed else f"lab {lab.name} does not exist; nothing to do")


def _lab_from_state(file: Path, name: str | None):
    from lab.core.lab import LABS_DIR, Lab
    from lab.model.spec import LabSpec, LoadedSpec

    labs = file.parent / LABS_DIR
    found = sorted(d.name for d in labs.iterdir() if (d / "state.json").is_file()) if labs.is_dir() else []
    chosen = name if name in found else (found[0] if len(found) == 1 and name is None else None)
    if chosen is None:
        return None
    return Lab(LoadedSpec(spec=LabSpec(name=chosen), path=file, exists=False))


@app.command("ssh-config")
def ssh_config(file: FileOpt = DEFAULT_FILE, name: NameOpt = None) -> None:
    """Print an ssh_config for the nodes (for `ssh -F` and `pytest --ssh-config`)."""
    sys.stdout.write(_open_lab(file, name).ssh_config())


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def ssh(node: Annotated[str, typer.Argument(help="Node to open a shell on.")], ctx: typer.Context,
        file: FileOpt = DEFAULT_FILE, name: NameOpt = None) -> None:
    """Open a shell on NODE (or run `lab ssh NODE -- CMD`)."""
    from lab.host.ssh import exec_interactive, ssh_argv

    lab = _open_lab(file, name)
    endpoints = lab.ssh_endpoints()
    if node not in endpoints:
        raise UsageError(f"no node named {node!r} in lab {lab.name!r}", hint=f"nodes are: {', '.join(endpoints)}")
    lab.write_ssh_config(lab.provider())
    exec_interactive(ssh_argv(endpoints[node], lab.ssh_config_path, list(ctx.args) or None))


@app.command("exec", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def exec_(ctx: typer.Context, file: FileOpt = DEFAULT_FILE, name: NameOpt = None,
          node: Annotated[Optional[list[str]], typer.Option("--node", help="Only on this node (repeatable).")] = None,
          timeout: Annotated[Optional[float], typer.Option(help="Seconds before a command is given up.")] = None,
          as_json: JsonOpt = False) -> None:
    """Run a command on every node in parallel: `lab exec -- uptime`. Output is prefixed by node."""
    import shlex

    from lab.host.ssh import run_many

    if not ctx.args:
        raise UsageError("no command given", hint="put the command after --, e.g. `lab exec -- uptime`")
    lab = _open_lab(file, name)
    endpoints = lab.ssh_endpoints()
    unknown = [n for n in node or [] if n not in endpoints]
    if unknown:
        raise UsageError(f"no node named {unknown[0]!r} in lab {lab.name!r}", hint=f"nodes are: {', '.join(endpoints)}")
    chosen = [endpoints[n] for n in (node or endpoints)]
    command = shlex.join(ctx.args) if len(ctx.args) > 1 else ctx.args[0]
    results = run_many(chosen, command, timeout=timeout, echo=not as_json)
    if as_json:
        _print_json([r.__dict__ for r in results])
    failed = [r for r in results if not r.ok]
    for result in failed:
        reason = "unreachable: " + result.stderr.strip() if result.exit_status is None and not result.stdout \
            else f"exit {result.exit_status}"
        _err().print(f"[red]{result.node}: {reason}[/red]")
    if failed:
        raise typer.Exit(1)


@app.command()
def reboot(node: Annotated[str, typer.Argument(help="Node to reboot.")], file: FileOpt = DEFAULT_FILE,
           name: NameOpt = None) -> None:
    """Reboot NODE cleanly and wait until it answers SSH again."""
    lab = _open_lab(file, name)
    provider = lab.provider()
    lab.context(lab.selection().name).node(node)
    provider.reboot(node, _progress)
    _out().print(f"{node} rebooted")


# ---------------------------------------------------------------- lab node

node_app = typer.Typer(cls=LabGroup, help="Add or remove nodes of a running lab (etcd membership follows).",
                       no_args_is_help=True, rich_markup_mode=None)
app.add_typer(node_app, name="node")


@node_app.command("add")
def node_add(file: FileOpt = DEFAULT_FILE, name: NameOpt = None) -> None:
    """Boot one more node and join it to the etcd cluster as a new member."""
    lab = _open_lab(file, name)
    with lab.lock("node add"):
        new = lab.node_add(_progress)
    _out().print(f"{new} added")


@node_app.command("remove")
def node_remove(node: Annotated[str, typer.Argument(help="Node to remove.")], file: FileOpt = DEFAULT_FILE,
                name: NameOpt = None) -> None:
    """Remove NODE's etcd member cleanly, then destroy the node."""
    lab = _open_lab(file, name)
    with lab.lock("node remove"):
        lab.node_remove(node, _progress)
    _out().print(f"{node} removed")


# ---------------------------------------------------------------- lab unit / lab machines

unit_app = typer.Typer(cls=LabGroup, no_args_is_help=True, rich_markup_mode=None, help="""\
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
app.add_typer(unit_app, name="unit")
UnitsArg = Annotated[list[str], typer.Argument(help="Unit files (to submit) or names of submitted units.")]


def _unit_client(file: Path, name: str | None):
    lab = _open_lab(file, name)
    return lab, lab.etcd_client()


@unit_app.command("submit")
def unit_submit(units: UnitsArg, file: FileOpt = DEFAULT_FILE, name: NameOpt = None) -> None:
    """Store unit files in the cluster without starting them."""
    from lab.cluster.units import submit

    _, client = _unit_client(file, name)
    for unit in submit(client, [Path(u) for u in units], "inactive"):
        _out().print(f"submitted {unit}")


@unit_app.command("start")
def unit_start(units: UnitsArg, file: FileOpt = DEFAULT_FILE, name: NameOpt = None) -> None:
    """Submit (if a file is given) and start units: the engine places them, an agent starts them."""
    from lab.cluster.units import set_desired

    _, client = _unit_client(file, name)
    for unit in set_desired(client, units, "launched"):
        _out().print(f"started {unit} (see `lab unit list`)")


@unit_app.command("stop")
def unit_stop(units: UnitsArg, file: FileOpt = DEFAULT_FILE, name: NameOpt = None) -> None:
    """Stop units; they stay placed on their machine (loaded)."""
    from lab.cluster.units import set_desired

    _, client = _unit_client(file, name)
    for unit in set_desired(client, units, "loaded"):
        _out().print(f"stopped {unit}")


@unit_app.command("destroy")
def unit_destroy(units: UnitsArg, file: FileOpt = DEFAULT_FILE, name: NameOpt = None) -> None:
    """Stop units and remove them from the cluster."""
    from lab.cluster.units import destroy

    _, client = _unit_client(file, name)
    for unit in destroy(client, units):
        _out().print(f"destroyed {unit}")


@unit_app.command("list")
def unit_list(file: FileOpt = DEFAULT_FILE, name: NameOpt = None, as_json: JsonOpt = False) -> None:
    """Every unit: machine, active and sub state, and why a unit is pending."""
    from rich.table import Table

    from lab.cluster.units import list_units

    _, client = _unit_client(file, name)
    rows = list_units(client)
    if as_json:
        _print_json([r.__dict__ for r in rows])
        return
    table = Table()
    for column in ("UNIT", "MACHINE", "ACTIVE", "SUB", "DESIRED", "PENDING BECAUSE"):
        table.add_column(column)
    for row in rows:
        table.add_row(row.name, ",".join(row.machines) or "-", row.active, row.sub, row.desired, row.reason)
    _out().print(table if rows else "no units; start one with `lab unit start FILE`")


@unit_app.command("status")
def unit_status(unit: Annotated[str, typer.Argument(help="Unit name.")], file: FileOpt = DEFAULT_FILE,
                name: NameOpt = None) -> None:
    """`systemctl status` of a unit, from the machine(s) running it."""
    from lab.host.ssh import run_many
    from lab.cluster.units import machine_of

    lab, client = _unit_client(file, name)
    endpoints = lab.ssh_endpoints()
    chosen = [endpoints[m.name] for m in machine_of(client, unit)]
    run_many(chosen, f"systemctl status --no-pager {unit}", echo=True)


@unit_app.command("journal")
def unit_journal(unit: Annotated[str, typer.Argument(help="Unit name.")], file: FileOpt = DEFAULT_FILE,
                 name: NameOpt = None,
                 follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing new lines.")] = False,
                 lines: Annotated[int, typer.Option("--lines", "-n", help="Lines of history.")] = 10) -> None:
    """The unit's journal from whichever machine runs it (-f follows it live)."""
    import shlex

    from lab.host.ssh import exec_interactive, run_many, ssh_argv
    from lab.cluster.units import machine_of

    lab, client = _unit_client(file, name)
    endpoints = lab.ssh_endpoints()
    found = machine_of(client, unit)
    command = f"journalctl --no-pager -o short -u {shlex.quote(unit)} -n {lines}" + (" -f" if follow else "")
    if follow and len(found) == 1:
        lab.write_ssh_config(lab.provider())
        # ssh hands the remote shell one string: pass the command as one.
        exec_interactive(ssh_argv(endpoints[found[0].name], lab.ssh_config_path, [command]))
    run_many([endpoints[m.name] for m in found], command, echo=True)


@app.command("machines")
def machines_(file: FileOpt = DEFAULT_FILE, name: NameOpt = None, as_json: JsonOpt = False) -> None:
    """Machines registered with the scheduler: id, IP, metadata, and which one is the engine."""
    from rich.table import Table

    from lab.cluster.units import machines

    _, client = _unit_client(file, name)
    rows = machines(client)
    if as_json:
        _print_json([r.__dict__ for r in rows])
        return
    table = Table()
    for column in ("MACHINE", "ID", "IP", "METADATA", "ENGINE"):
        table.add_column(column)
    for row in rows:
        table.add_row(row.name, row.id[:12], row.ip, ",".join(f"{k}={v}" for k, v in row.metadata.items()) or "-",
                      "yes" if row.engine else "")
    _out().print(table)


# ---------------------------------------------------------------- lab update

update_app = typer.Typer(cls=LabGroup, rich_markup_mode=None, help="""\
Roll the lab to another OS version, node by node (A/B slots + etcd reboot lock).

\b
  lab box build --version 2      build the new version first
  lab update --to 2              stage it on every node and wait for the roll
  lab update status              each node's version, slot and state; lock holders
  lab update unlock node-2       free the lock a dead node holds
The strategy (updates.strategy: etcd-lock | reboot | off) and the number of
nodes that may reboot at once (updates.max_concurrent_reboots) come from lab.yaml.
""")
app.add_typer(update_app, name="update")


@update_app.callback(invoke_without_command=True)
def update_(ctx: typer.Context,
            to: Annotated[Optional[str], typer.Option("--to", help="OS version to roll to.")] = None,
            file: FileOpt = DEFAULT_FILE, name: NameOpt = None,
            wait: Annotated[bool, typer.Option("--wait/--no-wait", help="Wait until the roll is done.")] = True,
            timeout: Annotated[float, typer.Option(help="Seconds to wait for the roll.")] = 600.0) -> None:
    """Start a rolling update with --to VERSION (see the commands below for more)."""
    if ctx.invoked_subcommand is not None:
        return
    if to is None:
        raise UsageError("which version?", hint="lab update --to VERSION (see `lab box list`), or `lab update status`")
    from lab.cluster.update import start_roll, wait as wait_roll

    lab = _open_lab(file, name)
    with lab.lock("update"):
        start_roll(lab, to, _progress)
    if not wait:
        _out().print(f"rolling to {to}; follow it with `lab update status`")
        return
    result = wait_roll(lab, to, _progress, timeout)
    if result.halted:
        from lab.cluster.update import UpdateError

        raise UpdateError(f"the roll to {to} stopped: {result.halted['node']} failed its health check on "
                          f"{result.halted['version']} ({result.halted['reason']}) and rolled back",
                          hint="fix the image, then `lab update --to` again (that clears the halt)")
    _out().print(f"[green]every node runs {to}[/green]")


@update_app.command("status")
def update_status(file: FileOpt = DEFAULT_FILE, name: NameOpt = None, as_json: JsonOpt = False) -> None:
    """Each node's OS version, slot and update state; the reboot lock's holders."""
    from rich.table import Table

    from lab.cluster.update import status

    current = status(_open_lab(file, name))
    if as_json:
        _print_json({"target": current.target, "strategy": current.strategy, "holders": current.holders,
                     "max_holders": current.max_holders, "halted": current.halted,
                     "nodes": [n.__dict__ for n in current.nodes]})
        return
    table = Table(title=f"target {current.target or '-'}; strategy {current.strategy}; lock "
                        f"{len(current.holders)}/{current.max_holders} held"
                        + (f" by {', '.join(current.holders)}" if current.holders else ""), title_justify="left")
    for column in ("NODE", "VERSION", "SLOT", "STATE", "DETAIL"):
        table.add_column(column)
    for node in current.nodes:
        table.add_row(node.node, node.version, node.slot, node.state, node.detail)
    _out().print(table)
    if current.halted:
        _err().print(f"[red]halted:[/red] {current.halted['node']} rolled back from {current.halted['version']}: "
                     f"{current.halted['reason']}")


@update_app.command("unlock")
def update_unlock(node: Annotated[str, typer.Argument(help="Node whose reboot lock to free.")],
                  file: FileOpt = DEFAULT_FILE, name: NameOpt = None) -> None:
    """Free the reboot lock held by NODE (e.g. a node that died while holding it)."""
    from lab.cluster.update import unlock

    held = unlock(_open_lab(file, name), node)
    _out().print(f"freed the reboot lock held by {node}" if held else f"{node} held no reboot lock")


# ---------------------------------------------------------------- lab fault

NodesArg = Annotated[list[str], typer.Argument(help="Node names.")]


def _fault(file: Path, name: str | None, nodes: list[str], action: str) -> None:
    lab = _open_lab(file, name)
    provider = lab.provider()
    context = lab.context(lab.selection().name)
    for node in nodes:
        context.node(node)  # unknown names fail before anything is done
    for node in nodes:
        getattr(provider, action)(node)
        _out().print(f"{action}: {node}")


@fault_app.command("kill")
def fault_kill(nodes: NodesArg, file: FileOpt = DEFAULT_FILE, name: NameOpt = None) -> None:
    """Stop nodes at once, as if their power were pulled (`lab fault start` brings them back)."""
    _fault(file, name, nodes, "kill")


@fault_app.command("start")
def fault_start(nodes: NodesArg, file: FileOpt = DEFAULT_FILE, name: NameOpt = None) -> None:
    """Start killed or halted nodes again and wait for SSH."""
    _fault(file, name, nodes, "start")


@fault_app.command("pause")
def fault_pause(nodes: NodesArg, file: FileOpt = DEFAULT_FILE, name: NameOpt = None) -> None:
    """Freeze every process of the nodes."""
    _fault(file, name, nodes, "pause")


@fault_app.command("resume")
def fault_resume(nodes: NodesArg, file: FileOpt = DEFAULT_FILE, name: NameOpt = None) -> None:
    """Thaw paused nodes."""
    _fault(file, name, nodes, "resume")


@fault_app.command("reboot")
def fault_reboot(nodes: NodesArg, file: FileOpt = DEFAULT_FILE, name: NameOpt = None) -> None:
    """Reboot nodes cleanly, one after the other."""
    _fault(file, name, nodes, "reboot")


@fault_app.command("partition")
def fault_partition(
        groups: Annotated[list[str], typer.Argument(help="Groups of nodes, comma-separated: node-1 node-2,node-3")],
        file: FileOpt = DEFAULT_FILE, name: NameOpt = None) -> None:
    """Cut the network between groups: `lab fault partition node-1 node-2,node-3`."""
    lab = _open_lab(file, name)
    context = lab.context(lab.selection().name)
    parsed = [[n for n in group.split(",") if n] for group in groups]
    if len(parsed) < 2:
        # One group means "this group against everyone else".
        rest = [n.name for n in context.nodes if n.name not in parsed[0]]
        parsed.append(rest)
    for group in parsed:
        for node in group:
            context.node(node)
    lab.provider().partition(parsed)
    _out().print("partitioned: " + " | ".join(",".join(g) for g in parsed))


@fault_app.command("heal")
def fault_heal(file: FileOpt = DEFAULT_FILE, name: NameOpt = None) -> None:
    """Remove every partition."""
    _open_lab(file, name).provider().heal()
    _out().print("healed")


# ---------------------------------------------------------------- lab box


BoxFormatOpt = Annotated[str, typer.Option(
    "--format", help="container: the nspawn image; libvirt or virtualbox: a Vagrant box of the same OS.")]


@box_app.command("build")
def box_build(version: Annotated[str, typer.Option(help="OS version to build.")] = "1",
              box: Annotated[str, typer.Option("--name", help="Recipe under boxes/.")] = "labos",
              fmt: BoxFormatOpt = "container",
              mirror: Annotated[Optional[str], typer.Option(
                  help="Debian mirror URL; default: the one this host's apt sources name.")] = None,
              force: Annotated[bool, typer.Option("--force", help="Rebuild even if cached.")] = False) -> None:
    """Build the node OS image or a Vagrant box of it (cached: a second build with the same recipe is instant).

    \b
    lab box build                        the image nspawn nodes boot (~1 min cold)
    lab box build --format libvirt       a qcow2 box for vagrant-libvirt (~2 min cold)
    lab box build --format virtualbox    an OVF/VMDK box for VirtualBox
    lab box add --format libvirt         then register it with Vagrant
    """
    import time

    from lab.images.boxes import build_image
    from lab.images.vagrantbox import BOX_FORMATS, box_options

    if fmt not in ("container", *BOX_FORMATS):
        raise UsageError(f"--format {fmt!r}: unknown format", hint=f"choose one of: container, {', '.join(BOX_FORMATS)}")
    start = time.monotonic()
    with _err().status(f"building {box} {version} ({fmt})") as spinner:
        def progress(line: str) -> None:
            spinner.update(f"building {box} {version} ({fmt}): {line.strip()[:100]}")
        if fmt == "container":
            image = build_image(box, version, mirror=mirror, progress=progress, force=force)
            _out().print(f"{image.name} {image.version} ready at {image.rootfs} "
                         f"({image.size_bytes / 2**20:.0f} MiB, {time.monotonic() - start:.1f} s)")
            return
        from lab.images.vagrantbox import build_box

        built = build_box(box, version, fmt, mirror=mirror, progress=progress, force=force)
    _out().print(f"{built.name} {built.version} {fmt} box ready at {built.path} "
                 f"({built.size_bytes / 2**20:.0f} MiB, {time.monotonic() - start:.1f} s)\n"
                 f"register it with Vagrant: lab box add --format {fmt}{box_options(box, version)}")


@box_app.command("add")
def box_add(version: Annotated[str, typer.Option(help="OS version of the box.")] = "1",
            box: Annotated[str, typer.Option("--name", help="Recipe under boxes/.")] = "labos",
            fmt: Annotated[str, typer.Option("--format", help="libvirt or virtualbox.")] = "libvirt",
            build: Annotated[bool, typer.Option("--build/--no-build",
                                                help="Build the box first if it is not built yet.")] = True) -> None:
    """Register a built box with Vagrant under the name lab's Vagrantfiles use.

    That name is lab-NAME-VERSION: lab-labos-1 for the default box.
    """
    from lab.images.vagrantbox import add_box, box_options, build_box, find_box

    found = find_box(box, version, fmt)
    if found is None and not build:
        raise UsageError(f"the {fmt} box of {box} {version} is not built",
                         hint=f"lab box build --format {fmt}{box_options(box, version)}")
    with _err().status(f"adding {box} {version} ({fmt})") as spinner:
        def progress(line: str) -> None:
            spinner.update(f"{box} {version} ({fmt}): {line.strip()[:100]}")
        found = found or build_box(box, version, fmt, progress=progress)
        name = add_box(found, progress=progress)
    _out().print(f"Vagrant box {name} ({fmt}) added from {found.path}")


@box_app.command("list")
def box_list(as_json: JsonOpt = False) -> None:
    """List built node OS images and Vagrant box files."""
    from rich.table import Table

    from lab.images.boxes import list_images
    from lab.images.vagrantbox import list_boxes

    images, boxes = list_images(), list_boxes()
    if as_json:
        _print_json([{"name": i.name, "version": i.version, "key": i.key, "format": i.flavor,
                      "size_bytes": i.size_bytes, "built_at": i.built_at, "path": str(i.path)} for i in images]
                    + [{"name": b.name, "version": b.version, "key": b.key, "format": f"{b.format} box",
                        "size_bytes": b.size_bytes, "path": str(b.path)} for b in boxes])
        return
    table = Table()
    for column in ("NAME", "VERSION", "FORMAT", "KEY", "SIZE", "BUILT"):
        table.add_column(column)
    for image in images:
        table.add_row(image.name, image.version, "image" if image.flavor == "container" else "vm image",
                      image.key, f"{image.size_bytes / 2**20:.0f} MiB", image.built_at)
    for built in boxes:
        table.add_row(built.name, built.version, f"{built.format} box", built.key,
                      f"{built.size_bytes / 2**20:.0f} MiB", "")
    _out().print(table if images or boxes else "no images built yet; build one with `lab box build`")


@box_app.command("rm")
def box_rm(box: Annotated[str, typer.Argument(help="Image name, e.g. labos.")],
           version: Annotated[Optional[str], typer.Option(help="Only this version.")] = None,
           vagrant: Annotated[bool, typer.Option(
               "--vagrant", help="Also remove the boxes added to Vagrant (lab-NAME-VERSION) and the copies "
                                 "libvirt keeps of them in its storage pool, unless a VM still uses one.")] = False,
           ) -> None:
    """Remove built images and box files; with --vagrant, what `lab box add` registered too."""
    from lab.images.boxes import remove_images
    from lab.images.vagrantbox import remove_boxes, remove_from_vagrant

    # Vagrant first: if it fails, the files it was added from are still there.
    registered = remove_from_vagrant(box, version) if vagrant else []
    removed = remove_images(box, version)
    files = remove_boxes(box, version)
    if not removed and not files and not registered:
        raise UsageError(f"no built image {box}{' ' + version if version else ''}",
                         hint="see `lab box list`" + ("" if vagrant else "; `--vagrant` for boxes added to Vagrant"))
    for what in registered:
        _out().print(f"removed {what}")
    for image in removed:
        _out().print(f"removed {image.name} {image.version} {image.flavor} image ({image.key})")
    for built in files:
        _out().print(f"removed {built.path}")


# ---------------------------------------------------------------- lab spec / scenario


@spec_app.command("schema")
def spec_schema() -> None:
    """Print the JSON Schema of lab.yaml (for editor completion)."""
    from lab.model.spec import json_schema

    _print_json(json_schema())


@spec_app.command("show")
def spec_show(file: FileOpt = DEFAULT_FILE, name: NameOpt = None, nodes: NodesOpt = None,
              provider: ProviderOpt = None, sets: SetOpt = None) -> None:
    """Print the effective spec: defaults, lab.yaml, LAB_* variables and flags combined."""
    lab = _open_lab(file, name, nodes, provider, sets)
    _print_json(lab.spec.model_dump(mode="json", by_alias=True))


@scenario_app.command("list")
def scenario_list(as_json: JsonOpt = False) -> None:
    """List built-in scenarios and the ones in ./scenarios."""
    from lab.scenarios.model import discover

    found = discover(Path.cwd())
    if as_json:
        _print_json([s.__dict__ for s in found])
        return
    from rich.table import Table

    table = Table()
    for column in ("SCENARIO", "SOURCE", "NODES", "DESCRIPTION"):
        table.add_column(column)
    for scenario in found:
        table.add_row(scenario.name, scenario.source, str(scenario.nodes or "-"), scenario.description)
    _out().print(table if found else "no scenarios found")


@scenario_app.command("new")
def scenario_new(scenario: Annotated[str, typer.Argument(help="Name of the new scenario.")],
                 directory: Annotated[Path, typer.Option(help="Where scenarios live.")] = Path("scenarios")) -> None:
    """Scaffold ./scenarios/NAME with a commented scenario.yaml and a testinfra file.

    \b
    Steps (one key each):
      workload: start|stop          background writes/reads/CAS, recorded to history.jsonl
      sleep: SECONDS
      fault: ACTION [TARGET]        kill|start|pause|resume|reboot|partition|heal|kill-etcd|start-etcd
                                    TARGET: leader|followers|all|old-leader|NODE, or for partition
                                    groups: node-1|node-2,node-3
      wait-until: {condition: new-leader|leader|healthy|converged|old-leader-follows,
                   timeout: S, within: auto|S}
      probe: {write-via: leader|old-leader|NODE, expect: ok|fail}
      check: [test_x.py]            testinfra files run on every node
    """
    from lab.scenarios.model import scaffold

    target = scaffold(scenario, directory)
    _out().print(f"created {target}: edit scenario.yaml, then `lab scenario run {scenario}`")


def _scenario_lab(found, spec, file, name, nodes, provider, sets):
    """The lab a scenario runs on: flags win over the scenario's own lab: overrides."""
    from lab.model.spec import Override

    lab = _open_lab(file, name, nodes or spec.nodes, provider, sets)
    if spec.lab and not lab.created:
        from lab.core.lab import Lab

        scenario_overrides = [Override(tuple(path), value, f"{found.path}/scenario.yaml lab:")
                              for path, value in _flatten(spec.lab)]
        lab = Lab.open(file, scenario_overrides + _flag_overrides(name, nodes or spec.nodes, provider, sets))
    return lab


def _flatten(data: dict, prefix: tuple = ()) -> list[tuple[tuple, Any]]:
    items = []
    for key, value in data.items():
        if isinstance(value, dict) and value:
            items += _flatten(value, prefix + (key,))
        else:
            items.append((prefix + (key,), value))
    return items


def run_scenarios(names: list[str], file: Path, name, nodes, provider, sets, keep_policy: str,
                  junit: Path | None, as_json: bool) -> None:
    """Create the lab if needed, run scenarios on it, remove it per policy; exit non-zero on any failure."""
    from lab.scenarios.engine import ScenarioRun
    from lab.scenarios.report import result_json
    from lab.scenarios.model import ScenarioFailed, find

    project = file.parent if str(file.parent) else Path.cwd()
    chosen = [find(n, project) for n in names]
    specs = [c.load() for c in chosen]
    lab = _scenario_lab(chosen[0], specs[0], file, name, nodes, provider, sets)
    created_here = not lab.created
    results = []
    with lab.lock(f"scenario run {' '.join(names)}"):
        try:
            if created_here or sets:
                # On a running lab, --set changes (etcd settings, say) are applied
                # first: `up` is idempotent and restarts only what changed.
                lab.up(_progress)
            for found, spec in zip(chosen, specs):
                _progress(f"scenario {found.name}: {found.description}")
                result = ScenarioRun(lab, found, spec, _progress).run()
                results.append(result)
                _progress(f"report: {result.run_dir / 'summary.md'}")
                if junit is not None:
                    import shutil

                    shutil.copyfile(result.run_dir / "junit.xml", junit if len(chosen) == 1
                                    else junit.with_name(f"{junit.stem}-{found.name}{junit.suffix}"))
        finally:
            passed = bool(results) and all(r.ok for r in results) and len(results) == len(chosen)
            remove = created_here and (keep_policy == "always" or (keep_policy == "passing" and passed))
            if remove:
                _progress("removing the lab this run created (--keep / --destroy never keeps it)")
                lab.destroy(_progress)
    if as_json:
        _print_json([result_json(r) for r in results])
    for result in results:
        _print_measurements(result)
    failed = [r for r in results if not r.ok]
    if failed:
        lines = [f"{r.scenario}: " + "; ".join(s.description for s in r.failures) for r in failed]
        raise ScenarioFailed("scenario failed:\n  " + "\n  ".join(lines),
                             hint=f"see {failed[0].run_dir / 'summary.md'} and junit.xml beside it")


def _print_measurements(result) -> None:
    m = result.measurements
    parts = []
    if m.get("time_to_new_leader_s"):
        parts.append("new leader after " + ", ".join(f"{t:.2f} s" for t in m["time_to_new_leader_s"]))
    windows = [w for w in m.get("write_unavailability_s") or [] if w is not None]
    if windows:
        parts.append("writes unavailable for " + ", ".join(f"{w:.2f} s" for w in windows))
    if "roll_s" in m:
        parts.append(f"rolled in {m['roll_s']:.1f} s")
    if m.get("member_downtime_s"):
        parts.append("member downtime " + ", ".join(f"{n} {t:.1f} s" for n, t in m["member_downtime_s"].items()))
    if "ops" in m:
        parts.append(f"{m['ops']} ops, {m.get('errors', 0)} not acknowledged")
    if "lost_writes" in m:
        parts.append(f"{m['lost_writes']} lost writes")
    status = "[green]passed[/green]" if result.ok else "[red]FAILED[/red]"
    _out().print(f"scenario {result.scenario} {status}" + (f": {'; '.join(parts)}" if parts else ""))


@scenario_app.command("run")
def scenario_run(scenario: Annotated[str, typer.Argument(help="Scenario name (see `lab scenario list`).")],
                 file: FileOpt = DEFAULT_FILE, name: NameOpt = None, nodes: NodesOpt = None,
                 provider: ProviderOpt = None, sets: SetOpt = None,
                 keep: Annotated[bool, typer.Option("--keep", help="Keep a lab the scenario created.")] = False,
                 junit: Annotated[Optional[Path], typer.Option(help="Also write the JUnit XML report here.")] = None,
                 as_json: JsonOpt = False) -> None:
    """Run a scenario: faults, workload and checks, with a report in .lab/runs/.

    Uses the running lab, or creates one (removed afterwards unless --keep).
    Exits non-zero when any step or check fails, so it can gate CI.
    """
    run_scenarios([scenario], file, name, nodes, provider, sets, "never" if keep else "always", junit, as_json)


@app.command("test")
def test_(scenarios: Annotated[Optional[list[str]], typer.Argument(help="Scenarios to run (default: all built-ins).")] = None,
          file: FileOpt = DEFAULT_FILE, name: NameOpt = None, nodes: NodesOpt = None,
          provider: ProviderOpt = None, sets: SetOpt = None,
          destroy_policy: Annotated[str, typer.Option("--destroy", help="always, never or passing.")] = "always",
          junit: Annotated[Optional[Path], typer.Option(help="Write JUnit XML here (one file per scenario).")] = None,
          as_json: JsonOpt = False) -> None:
    """Create a lab, run scenarios on it, destroy it (as Molecule's test does)."""
    from lab.scenarios.model import discover

    if destroy_policy not in ("always", "never", "passing"):
        raise UsageError(f"--destroy {destroy_policy!r}: must be always, never or passing")
    names = scenarios or [s.name for s in discover(Path.cwd()) if s.source == "built-in"]
    lab = _open_lab(file, name, nodes, provider, sets)
    if lab.created:
        raise UsageError(f"lab {lab.name!r} already exists; `lab test` creates its own",
                         hint="`lab destroy` first, use another --name, or `lab scenario run` on the running lab")
    run_scenarios(names, file, name, nodes, provider, sets, destroy_policy, junit, as_json)


def main() -> None:
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
