"""`lab spec`: the lab.yaml format and the spec in effect."""

from __future__ import annotations

import typer

from lab.cli.options import DEFAULT_FILE, FileOpt, NameOpt, NodesOpt, ProviderOpt, SetOpt, open_lab
from lab.cli.output import print_json

app = typer.Typer(help="Inspect the lab.yaml format.", no_args_is_help=True, rich_markup_mode=None)


@app.command("schema")
def spec_schema() -> None:
    """Print the JSON Schema of lab.yaml (for editor completion)."""
    from lab.model.spec import json_schema

    print_json(json_schema())


@app.command("show")
def spec_show(file: FileOpt = DEFAULT_FILE, name: NameOpt = None, nodes: NodesOpt = None,
              provider: ProviderOpt = None, sets: SetOpt = None) -> None:
    """Print the effective spec: defaults, lab.yaml, LAB_* variables and flags combined."""
    print_json(open_lab(file, name, nodes, provider, sets).spec.model_dump(mode="json", by_alias=True))
