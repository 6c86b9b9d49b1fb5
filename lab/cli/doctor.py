"""`lab doctor`: what this host can run (lab.core.doctor), as tables for people or one JSON document."""

from __future__ import annotations

import typer

from lab.cli.options import DEFAULT_FILE, FileOpt, JsonOpt, NodesOpt, ProviderOpt, flags
from lab.cli.output import out, print_json, table

verbs = typer.Typer(rich_markup_mode=None)


@verbs.command()
def doctor(file: FileOpt = DEFAULT_FILE, nodes: NodesOpt = None, provider: ProviderOpt = None,
           as_json: JsonOpt = False) -> None:
    """Which providers this host can run, why not, the command that fixes each gap, and whether memory
    and disk suffice for `lab up --nodes N`. Exits 1 when no provider is usable (with --provider: when that
    one is not)."""
    from lab.core.doctor import run_doctor

    asked = provider if provider and provider != "auto" else None
    report = run_doctor(file, flags(nodes=nodes, provider=provider).overrides(), asked)
    if as_json:
        print_json(report.to_json())
    else:
        show(report)
    raise typer.Exit(report.exit_code)


def show(report) -> None:
    from rich.markup import escape

    console = out()
    rows = []
    for verdict in report.verdicts:
        mark = "[green]yes[/]" if verdict.usable else "[red]no[/]"
        name = verdict.provider + (" *" if verdict.provider == report.recommendation.provider else "")
        fix = "\n".join(escape(f) for f in verdict.fixes) or "-"
        if verdict.usable and verdict.next_step:
            fix = (fix + "\n" if verdict.fixes else "") + "next: " + escape(verdict.next_step)
        rows.append((name, mark, escape(verdict.reason), fix))
    console.print(table(("PROVIDER", "USABLE", "WHY", "FIX"), rows, title=f"lab doctor: {escape(report.host_line())}",
                        no_wrap=("PROVIDER", "USABLE")))
    recommendation = report.recommendation
    if recommendation.provider:
        line = f"recommended: [bold]{recommendation.provider}[/] ({escape(recommendation.why)})"
        if recommendation.auto and recommendation.auto != recommendation.provider:
            line += f"; provider: auto picks {recommendation.auto}: pass --provider {recommendation.provider}"
        console.print(line)
    else:
        console.print(f"[red]{escape(recommendation.why)}[/]")
    if report.needs:
        console.print(f"for `lab up --nodes {report.nodes}` on {report.resources_provider}:")
        for need in report.needs:
            verdict = "[green]ok[/]" if need.ok else "[red]short[/]" if need.ok is False else "unknown"
            free = "available" if need.what == "memory" else f"free at {escape(need.path or '?')}"
            console.print(f"  {need.what:<14} {verdict}: needs {mib(need.needed_mib)}, {mib(need.available_mib)} "
                          f"{free}  [dim]({escape(need.basis)})[/]")


def mib(value: int | None) -> str:
    if value is None:
        return "?"
    return f"{value / 1024:.1f} GiB" if value >= 1024 else f"{value} MiB"
