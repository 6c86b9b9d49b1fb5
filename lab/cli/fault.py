"""`lab fault`: inject faults into a running lab.

The verbs are the provider rows of the scenarios' fault registry
(`lab.scenarios.faults.FAULTS`): its help, and its scope decides the
argument (nodes, groups, or none). A new fault is one row there (and, if the
provider does not have it yet, one method of the provider interface).
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Annotated, Any, Callable, Iterator

import typer

from lab.cli.options import DEFAULT_FILE, FileOpt, NameOpt, locked_lab
from lab.cli.output import out
from lab.scenarios.faults import FAULTS, FaultAction

if TYPE_CHECKING:
    from lab.core.lab import Lab

app = typer.Typer(help="Inject faults into a running lab.", no_args_is_help=True, rich_markup_mode=None)

NodesArg = Annotated[list[str], typer.Argument(help="Node names.")]
GroupsArg = Annotated[list[str], typer.Argument(help="Groups of nodes, comma-separated: node-1 node-2,node-3")]


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


def on_the_lab(action: str) -> Callable[["Lab", None], Iterator[str]]:
    def call(lab: "Lab", _: None) -> Iterator[str]:
        getattr(lab.provider(), action)()
        yield {"heal": "healed"}.get(action, action)

    return call


# scope -> (the verb's argument, if any; how it is applied)
SCOPES: dict[str, tuple[tuple[str, Any] | None, Callable[[str], Callable[["Lab", Any], Iterator[str]]]]] = {
    "nodes": (("nodes", NodesArg), on_each_node),
    "groups": (("groups", GroupsArg), lambda _method: partition),
    "lab": (None, on_the_lab),
}


def command(action: str, fault: FaultAction) -> Callable[..., None]:
    """The typer verb of a fault: its argument (if any), then --file and --name."""
    argument, applied = SCOPES[fault.scope]
    call = applied(fault.method)

    def verb(file, name, **given) -> None:
        with locked_lab(file, name, f"fault {action}") as lab:
            for line in call(lab, next(iter(given.values()), None)):
                out().print(line)

    parameters = [inspect.Parameter(argument[0], inspect.Parameter.KEYWORD_ONLY,
                                    annotation=argument[1])] if argument else []
    parameters += [inspect.Parameter("file", inspect.Parameter.KEYWORD_ONLY, default=DEFAULT_FILE, annotation=FileOpt),
                   inspect.Parameter("name", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=NameOpt)]
    verb.__signature__ = inspect.Signature(parameters, return_annotation=None)
    verb.__name__ = verb.__qualname__ = f"fault_{action}"
    verb.__doc__ = fault.help
    return verb


for action, row in FAULTS.items():
    if row.via == "provider":  # the SSH ones (kill-etcd) need a scenario's injector
        app.command(action, help=row.help)(command(action, row))
