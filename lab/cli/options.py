"""Options shared by verbs (--file, --name, --nodes, --provider, --set, --json),
and the lab they name."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Iterator, Optional

import typer

if TYPE_CHECKING:
    from lab.core.lab import Lab
    from lab.core.lifecycle import Flags

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


def flags(name: str | None = None, nodes: int | None = None, provider: str | None = None,
          sets: list[str] | None = None) -> "Flags":
    from lab.core.lifecycle import Flags

    return Flags(name=name, nodes=nodes, provider=provider, sets=tuple(sets or ()))


def open_lab(file: Path, name: str | None = None, nodes: int | None = None, provider: str | None = None,
             sets: list[str] | None = None) -> "Lab":
    return flags(name, nodes, provider, sets).open(file)


@contextmanager
def locked_lab(file: Path, name: str | None, command: str) -> Iterator["Lab"]:
    """The lab, under its lock (its state read again once held), for a verb that changes it."""
    from lab.core.lab import CHANGE_WAIT

    with open_lab(file, name).lock(command, wait=CHANGE_WAIT) as lab:
        yield lab
