"""`lab snapshot save|restore|list|rm`: the whole lab at one moment (lab.core.snapshots)."""

from __future__ import annotations

from typing import Annotated

import typer

from lab.cli.options import DEFAULT_FILE, FileOpt, JsonOpt, NameOpt, locked_lab, open_lab
from lab.cli.output import out, print_json, progress, show_rows

app = typer.Typer(help="Save the whole lab at one moment and go back to it in seconds (nspawn labs).",
                  no_args_is_help=True, rich_markup_mode=None)
SnapshotArg = Annotated[str, typer.Argument(help="Snapshot name.", metavar="SNAPSHOT")]


@app.command("save")
def snapshot_save(snapshot: SnapshotArg, file: FileOpt = DEFAULT_FILE, name: NameOpt = None,
                  force: Annotated[bool, typer.Option("--force", help="Replace a snapshot of that name.")] = False,
                  as_json: JsonOpt = False) -> None:
    """Freeze every node together, copy what each has written, thaw them (a few seconds)."""
    from lab.core import snapshots

    with locked_lab(file, name, f"snapshot save {snapshot}") as lab:
        saved = snapshots.save(lab, snapshot, force, progress)
    if as_json:
        print_json(saved.to_json())
        return
    out().print(f"saved snapshot {saved.name} of lab {lab.name}: {', '.join(saved.node_names)}; nodes frozen "
                f"{saved.frozen_s:.2f} s; {saved.size_bytes / 2**20:.0f} MiB")


@app.command("restore")
def snapshot_restore(snapshot: SnapshotArg, file: FileOpt = DEFAULT_FILE, name: NameOpt = None,
                     as_json: JsonOpt = False) -> None:
    """Put every node back to the snapshot's moment, start them, wait until etcd is healthy."""
    from lab.core import snapshots

    with locked_lab(file, name, f"snapshot restore {snapshot}") as lab:
        result = snapshots.restore(lab, snapshot, progress)
    if as_json:
        print_json(result.__dict__)
        return
    out().print(f"restored snapshot {result.name} of lab {lab.name} in {result.took_s:.1f} s "
                f"(nodes up after {result.nodes_s:.1f} s, etcd healthy {result.etcd_s:.1f} s later; "
                f"the next restore prepared in {result.prepared_s:.1f} s more)")


@app.command("list")
def snapshot_list(file: FileOpt = DEFAULT_FILE, name: NameOpt = None, as_json: JsonOpt = False) -> None:
    """The lab's snapshots, oldest first."""
    from lab.core import snapshots

    show_rows(snapshots.rows(open_lab(file, name)), as_json, ("SNAPSHOT", "TAKEN", "NODES", "SIZE", "FROZEN"),
              lambda r: (r.name, r.created_at, ", ".join(r.nodes) if r.complete else "(incomplete: rm it)",
                         f"{r.size_bytes / 2**20:.0f} MiB", f"{r.frozen_s:.2f} s"),
              empty="no snapshots (take one with `lab snapshot save NAME`)")


@app.command("rm")
def snapshot_rm(snapshot: SnapshotArg, file: FileOpt = DEFAULT_FILE, name: NameOpt = None) -> None:
    """Remove a snapshot."""
    from lab.core import snapshots

    with locked_lab(file, name, f"snapshot rm {snapshot}") as lab:
        snapshots.remove(lab, snapshot)
    out().print(f"removed snapshot {snapshot} of lab {lab.name}")
