"""What the CLI shows: the two consoles, errors, progress lines, --json, tables.

Everything a verb prints goes through here. rich is imported on first use,
so `lab --help` never loads it.
"""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

if TYPE_CHECKING:
    from lab.errors import LabError

_consoles: dict[str, Any] = {}


def out():
    """The console for results (stdout)."""
    if "out" not in _consoles:
        from rich.console import Console
        _consoles["out"] = Console(highlight=False, soft_wrap=True)
    return _consoles["out"]


def err():
    """The console for progress, errors and spinners (stderr)."""
    if "err" not in _consoles:
        from rich.console import Console
        _consoles["err"] = Console(stderr=True, highlight=False, soft_wrap=True)
    return _consoles["err"]


def print_error(exc: "LabError") -> None:
    from rich.markup import escape

    console = err()
    console.print(f"[bold red]error:[/bold red] {escape(exc.message)}")
    if exc.hint:
        console.print(f"[bold]fix:[/bold] {escape(exc.hint)}")


def progress(message: str) -> None:
    """The progress callback every core function takes: one dim line on stderr."""
    from rich.markup import escape

    err().print(f"[dim]•[/dim] {escape(message)}")


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=False) + "\n")


def table(columns: Sequence[str], rows: Iterable[Sequence[str]], title: str | None = None,
          no_wrap: Sequence[str] = ()):
    """A rich table with these column headings and rows (title, if any, on the left)."""
    from rich.table import Table

    shown = Table(title=title, title_justify="left")
    for column in columns:
        shown.add_column(column, no_wrap=column in no_wrap)
    for row in rows:
        shown.add_row(*row)
    return shown


def show_rows(rows: Sequence[Any], as_json: bool, columns: Sequence[str], cells: Callable[[Any], Sequence[str]],
              empty: str | None = None) -> None:
    """Rows as JSON (each row's fields) with --json, else as a table; EMPTY instead of an empty table if given."""
    if as_json:
        print_json([row.__dict__ for row in rows])
    else:
        out().print(table(columns, [cells(row) for row in rows]) if rows or empty is None else empty)


def node_table(statuses, title: str | None = None, roles: dict[str, str] | None = None):
    """NODE, IP, STATE, BOOT ID, ETCD (member or worker) when `roles` are given, and MEMORY (used / limit)
    when the provider reports it."""
    colors = {"running": "green", "paused": "yellow", "stopped": "red", "not_created": "dim"}
    columns = ("NODE", "IP", "STATE", "BOOT ID")
    rows = [(s.name, s.ip or "-", f"[{colors.get(s.state.value, 'white')}]{s.state.value}[/]",
             (s.boot_id or "-")[:12]) for s in statuses]
    if roles:
        columns += ("ETCD",)
        rows = [row + (roles.get(s.name, "-"),) for row, s in zip(rows, statuses)]
    if any(s.memory_bytes is not None for s in statuses):
        columns += ("MEMORY",)
        rows = [row + (memory(s.memory_bytes, s.memory_limit_bytes),) for row, s in zip(rows, statuses)]
    return table(columns, rows, title=title)


def memory(used: int | None, limit: int | None) -> str:
    """`123 MiB`, or `123 MiB / 512 MiB` with a limit; `-` when unknown."""
    if used is None:
        return "-"
    return f"{used / 2**20:.0f} MiB" + (f" / {limit / 2**20:.0f} MiB" if limit else "")


def member_table(rows):
    def role(row) -> str:
        return "[bold]leader[/]" if row.leader else ("follower" if row.member_id else "-")

    return table(("MEMBER", "ENDPOINT", "HEALTH", "ROLE", "RAFT TERM", "RAFT INDEX", "DB SIZE"),
                 [(row.node, row.endpoint, "[green]healthy[/]" if row.healthy else "[red]unhealthy[/]", role(row),
                   str(row.raft_term or "-"), str(row.raft_index or "-"),
                   f"{row.db_size / 1024:.0f} KiB" if row.db_size else "-") for row in rows],
                 title="etcd", no_wrap=("ENDPOINT",))
