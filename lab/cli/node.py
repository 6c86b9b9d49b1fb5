"""`lab node`: add or remove nodes of a running lab (etcd membership follows)."""

from __future__ import annotations

from typing import Annotated

import typer

from lab.cli.options import DEFAULT_FILE, FileOpt, NameOpt, locked_lab
from lab.cli.output import out, progress

app = typer.Typer(help="Add or remove nodes of a running lab (etcd membership follows).", no_args_is_help=True,
                  rich_markup_mode=None)


@app.command("add")
def node_add(file: FileOpt = DEFAULT_FILE, name: NameOpt = None) -> None:
    """Boot one more node and join it to the etcd cluster as a new member."""
    with locked_lab(file, name, "node add") as lab:
        new = lab.node_add(progress)
    out().print(f"{new} added")


@app.command("remove")
def node_remove(node: Annotated[str, typer.Argument(help="Node to remove.")], file: FileOpt = DEFAULT_FILE,
                name: NameOpt = None) -> None:
    """Remove NODE's etcd member cleanly, then destroy the node."""
    with locked_lab(file, name, f"node remove {node}") as lab:
        lab.node_remove(node, progress)
    out().print(f"{node} removed")
