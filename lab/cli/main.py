"""The `lab` command: the typer app, its one error handler, --version, and the
verb groups put together (see ARCHITECTURE.md).

Kept thin on purpose: every verb parses its arguments, calls one function of
`lab.core` (or of the layer that owns what it asks for) and shows what came
back, as a table for people or JSON for machines. Errors are `LabError`s raised
below the CLI; `LabGroup.invoke` is the one place that turns them into a
message and an exit code.

Heavy modules (pydantic, fabric, vagrant, jinja2) are imported inside the
verbs that need them, so `lab --help` starts fast.
"""

from __future__ import annotations

from typing import Annotated

import typer
from typer.core import TyperGroup

from lab.cli import box, doctor, fault, image, node, scenario, snapshot, spec, unit, update
from lab.cli import lab as lab_verbs
from lab.cli.output import err, print_error
from lab.errors import LabError


class LabGroup(TyperGroup):
    """The root group: every verb below it runs inside this handler."""

    def invoke(self, ctx):  # noqa: D401 - click API
        import signal
        import threading

        from lab.host.processes import Terminated, raise_terminated

        # SIGTERM (a CI runner cancelling the job) stops lab as a Ctrl-C does, rollback and cleanup
        # included, instead of killing it halfway.
        if (threading.current_thread() is threading.main_thread()
                and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL):
            signal.signal(signal.SIGTERM, raise_terminated)
        try:
            return super().invoke(ctx)
        except LabError as exc:
            print_error(exc)
            raise typer.Exit(exc.exit_code) from None
        except Terminated:
            err().print("[yellow]terminated[/yellow]")
            raise typer.Exit(143) from None
        except KeyboardInterrupt:
            err().print("[yellow]interrupted[/yellow]")
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
  lab scenario rolling-update a fault scenario with its checks (lab scenario list)
  lab destroy                 remove everything the lab created
  lab doctor                  what this host can run, and how to fix what it lacks

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


# Top-level verbs first, then the groups: the order `lab --help` lists them in.
for verbs in (lab_verbs.verbs, unit.verbs, scenario.verbs, doctor.verbs):
    app.add_typer(verbs)
for name, group in (("box", box.app), ("fault", fault.app), ("image", image.app), ("scenario", scenario.app),
                    ("snapshot", snapshot.app), ("spec", spec.app), ("node", node.app), ("unit", unit.app),
                    ("update", update.app)):
    app.add_typer(group, name=name)


def main() -> None:
    app()
