"""`lab node`: add or remove nodes of a running lab (etcd membership follows)."""

from __future__ import annotations

from enum import Enum
from typing import Annotated, Optional

import typer

from lab.cli.options import DEFAULT_FILE, FileOpt, NameOpt, locked_lab
from lab.cli.output import out, progress

app = typer.Typer(help="Add or remove nodes of a running lab (etcd membership follows).", no_args_is_help=True,
                  rich_markup_mode=None)


class Role(str, Enum):
    member = "member"
    worker = "worker"


@app.command("add")
def node_add(file: FileOpt = DEFAULT_FILE, name: NameOpt = None,
             role: Annotated[Optional[Role], typer.Option(
                 "--role", help="member: joins the etcd cluster; worker: reaches it through a local gateway. "
                                "Default: member while the lab has fewer members than etcd.members wants, "
                                "else worker.")] = None) -> None:
    """Boot one more node: a new etcd member (added to the cluster before its etcd starts) or a worker."""
    with locked_lab(file, name, "node add") as lab:
        new = lab.node_add(progress, role=role.value if role else None)
        added_as = lab.roles().get(new, "node")
    out().print(f"{new} added as an etcd {added_as}")


@app.command("remove")
def node_remove(node: Annotated[str, typer.Argument(help="Node to remove.")], file: FileOpt = DEFAULT_FILE,
                name: NameOpt = None) -> None:
    """Remove NODE from etcd cleanly (a member: from the cluster and the workers' gateways), then destroy it."""
    with locked_lab(file, name, f"node remove {node}") as lab:
        lab.node_remove(node, progress)
    out().print(f"{node} removed")
