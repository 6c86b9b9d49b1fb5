"""`lab fault`: inject faults into a running lab.

Every verb comes from one table, FAULTS: its help, its positional argument and
the call that does it. A new fault is one row here (and, if the provider does
not have it yet, one method of the provider interface).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Callable, Iterator

import typer

from lab.cli.options import DEFAULT_FILE, FileOpt, NameOpt, locked_lab
from lab.cli.output import out

if TYPE_CHECKING:
    from lab.core.lab import Lab

app = typer.Typer(help="Inject faults into a running lab.", no_args_is_help=True, rich_markup_mode=None)

NodesArg = Annotated[list[str], typer.Argument(help="Node names.")]
GroupsArg = Annotated[list[str], typer.Argument(help="Groups of nodes, comma-separated: node-1 node-2,node-3")]


@dataclass(frozen=True)
class Fault:
    help: str
    call: Callable[["Lab", Any], Iterator[str]]  # does it, yielding a line to show as each part is done
    argument: tuple[str, Any] | None = ("nodes", NodesArg)  # (name, typer annotation), or none


def on_each_node(action: str) -> Callable[["Lab", list[str]], Iterator[str]]:
    """The provider method ACTION, node after node."""

    def call(lab: "Lab", nodes: list[str]) -> Iterator[str]:
        provider = lab.provider()
        context = lab.context(lab.selection().name)
        for node in nodes:
            context.node(node)  # unknown names fail before anything is done
        for node in nodes:
            getattr(provider, action)(node)
            yield f"{action}: {node}"

    return call


def partition(lab: "Lab", groups: list[str]) -> Iterator[str]:
    context = lab.context(lab.selection().name)
    parsed = [[n for n in group.split(",") if n] for group in groups]
    if len(parsed) < 2:
        # One group means "this group against everyone else".
        parsed.append([n.name for n in context.nodes if n.name not in parsed[0]])
    for group in parsed:
        for node in group:
            context.node(node)
    lab.provider().partition(parsed)
    yield "partitioned: " + " | ".join(",".join(g) for g in parsed)


def heal(lab: "Lab", _: None) -> Iterator[str]:
    lab.provider().heal()
    yield "healed"


FAULTS = {
    "kill": Fault("Stop nodes at once, as if their power were pulled (`lab fault start` brings them back).",
                  on_each_node("kill")),
    "start": Fault("Start killed or halted nodes again and wait for SSH.", on_each_node("start")),
    "pause": Fault("Freeze every process of the nodes.", on_each_node("pause")),
    "resume": Fault("Thaw paused nodes.", on_each_node("resume")),
    "reboot": Fault("Reboot nodes cleanly, one after the other.", on_each_node("reboot")),
    "partition": Fault("Cut the network between groups: `lab fault partition node-1 node-2,node-3`.", partition,
                       ("groups", GroupsArg)),
    "heal": Fault("Remove every partition.", heal, None),
}


def command(action: str, fault: Fault) -> Callable[..., None]:
    """The typer verb of a fault: its argument (if any), then --file and --name."""

    def verb(file, name, **argument) -> None:
        with locked_lab(file, name, f"fault {action}") as lab:
            for line in fault.call(lab, next(iter(argument.values()), None)):
                out().print(line)

    parameters = [inspect.Parameter(fault.argument[0], inspect.Parameter.KEYWORD_ONLY,
                                    annotation=fault.argument[1])] if fault.argument else []
    parameters += [inspect.Parameter("file", inspect.Parameter.KEYWORD_ONLY, default=DEFAULT_FILE, annotation=FileOpt),
                   inspect.Parameter("name", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=NameOpt)]
    verb.__signature__ = inspect.Signature(parameters, return_annotation=None)
    verb.__name__ = verb.__qualname__ = f"fault_{action}"
    verb.__doc__ = fault.help
    return verb


for action, row in FAULTS.items():
    app.command(action, help=row.help)(command(action, row))
