"""`lab update`: roll the lab to another OS version, node by node."""

from __future__ import annotations

import time
from typing import Annotated, Optional

import typer

from lab.cli.options import DEFAULT_FILE, FileOpt, JsonOpt, NameOpt, locked_lab, open_lab
from lab.cli.output import err, out, print_json, progress, table
from lab.errors import UsageError

app = typer.Typer(rich_markup_mode=None, help="""\
Roll the lab to another OS version, node by node (A/B slots + etcd reboot lock).

\b
  lab box build --version 2      build the new version first
  lab update --to 2              stage it on every node and wait for the roll
  lab update status              each node's version, slot and state; lock holders
  lab update unlock node-2       free the lock a dead node holds
The strategy (updates.strategy: etcd-lock | reboot | off) and the number of
nodes that may reboot at once (updates.max_concurrent_reboots) come from lab.yaml.
""")


@app.callback(invoke_without_command=True)
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
    from lab.core import lifecycle

    lifecycle.roll(open_lab(file, name), to, progress, wait, timeout)
    out().print(f"[green]every node runs {to}[/green]" if wait else f"rolling to {to}; follow it with `lab update status`")


@app.command("status")
def update_status(file: FileOpt = DEFAULT_FILE, name: NameOpt = None, as_json: JsonOpt = False) -> None:
    """Each node's OS version, slot and update state; the reboot lock's holders."""
    from lab.cluster.update import status

    current = status(open_lab(file, name))
    if as_json:
        print_json({"target": current.target, "staging_since": current.staging_since,
                    "strategy": current.strategy, "holders": current.holders,
                    "max_holders": current.max_holders, "halted": current.halted,
                    "nodes": [n.__dict__ for n in current.nodes]})
        return
    staging = (f" (staging into the passive slots for {time.time() - current.staging_since:.0f} s)"
               if current.staging_since else "")
    title = (f"target {current.target or '-'}{staging}; strategy {current.strategy}; lock "
             f"{len(current.holders)}/{current.max_holders} held"
             + (f" by {', '.join(current.holders)}" if current.holders else ""))
    out().print(table(("NODE", "VERSION", "SLOT", "STATE", "DETAIL"),
                      [(n.node, n.version, n.slot, n.state, n.detail) for n in current.nodes], title=title))
    if current.halted:
        err().print(f"[red]halted:[/red] {current.halted['node']} rolled back from {current.halted['version']}: "
                    f"{current.halted['reason']}")


@app.command("unlock")
def update_unlock(node: Annotated[str, typer.Argument(help="Node whose reboot lock to free.")],
                  force: Annotated[bool, typer.Option("--force", help="Free it even though NODE is running "
                                                      "(its agent may be mid-reboot).")] = False,
                  file: FileOpt = DEFAULT_FILE, name: NameOpt = None) -> None:
    """Free the reboot lock held by NODE (a node that died while holding it; a live holder needs --force)."""
    from lab.cluster.update import unlock

    with locked_lab(file, name, f"update unlock {node}") as lab:
        held = unlock(lab, node, force=force)
    out().print(f"freed the reboot lock held by {node}" if held else f"{node} held no reboot lock")
