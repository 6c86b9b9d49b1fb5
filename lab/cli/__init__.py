"""The `lab` command line: typer verbs only (see ARCHITECTURE.md)."""

from lab.cli.main import app, main

__all__ = ["app", "main"]
