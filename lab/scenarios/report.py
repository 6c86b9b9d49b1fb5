"""The report of one scenario run: JUnit XML, a Markdown summary, an SVG timeline, JSON.

Written into the run directory next to the history and the node journals, so
one directory holds the evidence for "did the cluster behave, and how fast
did it recover". The timeline is plain SVG written here (no plotting
dependency): ops/s and errors per 250 ms, fault windows shaded, leader
changes marked.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from html import escape
from dataclasses import asdict
from pathlib import Path
from typing import Any

from lab.scenarios.history import HistoryError, load_history
from lab.scenarios.results import RunResult

BUCKET_S = 0.25


def write_report(result: RunResult) -> None:
    ops = _load_ops(result.run_dir / "history.jsonl")
    (result.run_dir / "timeline.svg").write_text(timeline_svg(ops, result.faults, result.leader_changes))
    write_junit(result, result.run_dir / "junit.xml")
    (result.run_dir / "summary.md").write_text(summary_markdown(result))
    (result.run_dir / "result.json").write_text(json.dumps(result_json(result), indent=2, default=str) + "\n")


def _load_ops(path: Path) -> list[dict[str, Any]]:
    """The history for the timeline; a missing or malformed one draws none (the checker reports the line)."""
    try:
        return [asdict(op) for op in load_history(path)]
    except (OSError, HistoryError):
        return []


def result_json(result: RunResult) -> dict[str, Any]:
    return {"scenario": result.scenario, "ok": result.ok, "run_dir": str(result.run_dir),
            "measurements": result.measurements, "faults": result.faults,
            "leader_changes": result.leader_changes,
            "steps": [{"index": s.index, "step": s.description, "ok": s.ok, "started_s": round(s.started, 3),
                       "duration_s": round(s.duration, 3), "detail": s.detail, "measurements": s.measurements}
                      for s in result.steps]}


# ---------------------------------------------------------------- JUnit


def write_junit(result: RunResult, path: Path) -> None:
    """One testsuite for the scenario's steps and checkers, plus the testinfra cases of its check steps."""
    suites = ET.Element("testsuites")
    suite = ET.SubElement(suites, "testsuite", name=f"scenario.{result.scenario}")
    failures = 0
    for step in result.steps:
        case = ET.SubElement(suite, "testcase", classname=f"scenario.{result.scenario}",
                             name=f"{step.index:02d} {step.description}", time=f"{step.duration:.3f}")
        if not step.ok:
            failures += 1
            failure = ET.SubElement(case, "failure", message=step.detail.splitlines()[0] if step.detail else "failed")
            failure.text = step.detail
        elif step.detail:
            ET.SubElement(case, "system-out").text = step.detail
    suite.set("tests", str(len(result.steps)))
    suite.set("failures", str(failures))
    for checks in sorted(result.run_dir.glob("checks-*.xml")):
        try:
            tree = ET.parse(checks)
        except ET.ParseError:
            continue
        root = tree.getroot()
        for inner in ([root] if root.tag == "testsuite" else list(root)):
            inner.set("name", f"scenario.{result.scenario}.testinfra.{checks.stem}")
            suites.append(inner)
    ET.indent(suites)
    path.write_text(ET.tostring(suites, encoding="unicode", xml_declaration=True) + "\n")


# ---------------------------------------------------------------- summary


def summary_markdown(result: RunResult) -> str:
    m = result.measurements
    lines = [f"# Scenario `{result.scenario}`: {'PASSED' if result.ok else 'FAILED'}", ""]
    leader_times = m.get("time_to_new_leader_s") or []
    lines += ["## Measured", "", "| what | value |", "|---|---|"]
    if leader_times:
        lines.append(f"| time to new leader | {', '.join(f'{t:.2f} s' for t in leader_times)} "
                     f"(sampled every 50 ms) |")
    windows = [w for w in m.get("write_unavailability_s") or [] if w is not None]
    if windows:
        lines.append(f"| write-unavailability window (longest gap between acknowledged writes, per fault) | "
                     f"{', '.join(f'{w:.2f} s' for w in windows)} |")
    if "roll_s" in m:
        lines.append(f"| rolling update, staged to every node updated | {m['roll_s']:.1f} s |")
    if m.get("member_downtime_s"):
        lines.append("| etcd member downtime per node | "
                     + ", ".join(f"{n}: {t:.1f} s" for n, t in m["member_downtime_s"].items()) + " |")
    if "max_members_down" in m:
        lines.append(f"| most etcd members down at once | {m['max_members_down']} |")
    for key, label in (("ops", "operations"), ("errors", "operations not acknowledged (failed or unknown)"),
                       ("acknowledged_writes", "acknowledged unique writes"), ("lost_writes", "lost writes"),
                       ("checker_s", "linearizability check time (s)")):
        if key in m:
            lines.append(f"| {label} | {m[key]} |")
    if m.get("workload_by_status"):
        lines.append(f"| outcomes | {', '.join(f'{k}: {v}' for k, v in m['workload_by_status'].items())} |")
    lines += ["", "![timeline](timeline.svg)", "", "## Steps", "", "| # | at | step | result | detail |",
              "|---|---|---|---|---|"]
    for step in result.steps:
        detail = step.detail.replace("\n", "<br>").replace("|", "\\|")
        lines.append(f"| {step.index} | {step.started:.2f} s | {step.description} | "
                     f"{'ok' if step.ok else '**FAILED**'} | {detail} |")
    if result.leader_changes:
        lines += ["", "## Leader changes", ""]
        lines += [f"- {c['t']:.2f} s: {c['leader']} (term {c['term']})" for c in result.leader_changes]
    lines += ["", "## Files", "", "- `history.jsonl`: every workload operation (invoke, complete, outcome)",
              "- `junit.xml`: steps, checkers and testinfra checks", "- `nodes/NODE/journal.txt`, "
              "`nodes/NODE/etcd.log`: each node's journal", "- `result.json`: all of the above as data", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------- timeline


def timeline_svg(ops: list[dict[str, Any]], faults: list[dict[str, Any]], leader_changes: list[dict[str, Any]],
                 width: int = 900, height: int = 280) -> str:
    left, right, top, bottom = 50, 20, 30, 40
    plot_w, plot_h = width - left - right, height - top - bottom
    end = max([op["complete"] or op["invoke"] for op in ops] + [f.get("end") or f["start"] for f in faults]
              + [c["t"] for c in leader_changes] + [1.0])
    buckets = int(end / BUCKET_S) + 1
    ok_counts, err_counts = [0] * buckets, [0] * buckets
    for op in ops:
        at = op["complete"] if op["complete"] is not None else op["invoke"]
        index = min(buckets - 1, int(at / BUCKET_S))
        (ok_counts if op["status"] == "ok" else err_counts)[index] += 1
    peak = max(ok_counts + err_counts + [1]) / BUCKET_S

    def x(t: float) -> float:
        return left + plot_w * t / end

    def y(rate: float) -> float:
        return top + plot_h * (1 - rate / peak)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'font-family="sans-serif" font-size="11">',
             f'<rect x="0" y="0" width="{width}" height="{height}" fill="white"/>',
             f'<text x="{left}" y="16" font-size="13">ops/s (green: acknowledged, red: failed or unknown); '
             f'shaded: faults; blue: leader changes</text>']
    for fault in faults:
        start, stop = fault["start"], fault.get("end") or end
        parts.append(f'<rect x="{x(start):.1f}" y="{top}" width="{max(1.0, x(stop) - x(start)):.1f}" '
                     f'height="{plot_h}" fill="#f5c542" fill-opacity="0.3"/>')
        label = f'{fault["action"]} {_targets_label(fault.get("targets") or [])}'
        parts.append(f'<text x="{x(start) + 2:.1f}" y="{top + 12}">{escape(label)}</text>')
    for change in leader_changes:
        parts.append(f'<line x1="{x(change["t"]):.1f}" y1="{top}" x2="{x(change["t"]):.1f}" '
                     f'y2="{top + plot_h}" stroke="#2060d0" stroke-dasharray="4,3"/>')
        parts.append(f'<text x="{x(change["t"]) + 2:.1f}" y="{top + plot_h - 4}" fill="#2060d0">'
                     f'{escape(change["leader"])} t{change["term"]}</text>')
    for counts, color in ((ok_counts, "#2a9d4b"), (err_counts, "#d03030")):
        points = " ".join(f"{x((i + 0.5) * BUCKET_S):.1f},{y(c / BUCKET_S):.1f}" for i, c in enumerate(counts))
        parts.append(f'<polyline points="{points}" fill="none" stroke="{color}" stroke-width="1.5"/>')
    parts.append(f'<line x1="{left}" y1="{top + plot_h}" x2="{left + plot_w}" y2="{top + plot_h}" stroke="black"/>')
    parts.append(f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + plot_h}" stroke="black"/>')
    for i in range(0, int(end) + 1, max(1, int(end / 10) or 1)):
        parts.append(f'<text x="{x(i):.1f}" y="{top + plot_h + 14}" text-anchor="middle">{i}s</text>')
    for fraction in (0, 0.5, 1):
        parts.append(f'<text x="{left - 4}" y="{y(peak * fraction) + 4:.1f}" text-anchor="end">'
                     f'{peak * fraction:.0f}</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def _targets_label(targets: list) -> str:
    """node-1,node-2 for nodes; node-1 | node-2,node-3 for partition groups."""
    if targets and isinstance(targets[0], list):
        return " | ".join(",".join(group) for group in targets)
    return ",".join(str(t) for t in targets)
