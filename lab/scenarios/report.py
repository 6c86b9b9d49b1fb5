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
from lab.scenarios.service_probe import WINDOW_MIN_S, unavailability_windows

BUCKET_S = 0.25
WRITE_KINDS = ("write", "unique", "cas")
LANE_LABELS = {"etcd_writes": "etcd writes", "service": "service"}


def write_report(result: RunResult) -> None:
    ops = _load_ops(result.run_dir / "history.jsonl")
    lanes = unavailability_lanes(ops, result.measurements.get("service"))
    if lanes:
        result.measurements["unavailability"] = lanes
    (result.run_dir / "timeline.svg").write_text(timeline_svg(ops, result.faults, result.leader_changes,
                                                              lanes=lanes))
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


def unavailability_lanes(ops: list[dict[str, Any]], service: dict[str, Any] | None) -> dict[str, Any]:
    """etcd's and the service's unavailability windows, measured by one rule, side by side.

    etcd: no acknowledged write (write, unique, CAS) for longer than the
    probe's minimum window, over the span the workload ran. The service: the
    windows its probe measured (lab.scenarios.service_probe). Each lane has
    its span, its windows and the longest.
    """
    lanes: dict[str, Any] = {}
    if ops:
        begin = min(op["invoke"] for op in ops)
        end = max(op["complete"] if op["complete"] is not None else op["invoke"] for op in ops)
        windows = unavailability_windows([op["complete"] for op in ops if op["kind"] in WRITE_KINDS
                                          and op["status"] == "ok" and op["complete"] is not None], begin, end,
                                         failed=[op["complete"] if op["complete"] is not None else op["invoke"]
                                                 for op in ops if op["status"] != "ok"])
        lanes["etcd_writes"] = {"begin_s": round(begin, 3), "end_s": round(end, 3),
                                "windows": [w.to_json() for w in windows],
                                "longest_s": round(max((w.duration for w in windows), default=0.0), 3)}
    if service:
        lanes["service"] = {key: service[key] for key in ("name", "begin_s", "end_s", "windows", "longest_s")
                            if key in service}
    return lanes


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
    if m.get("service_moved_s"):
        lines.append("| fault to every replica answering again on other nodes (service-moved) | "
                     + ", ".join(f"{t:.1f} s" for t in m["service_moved_s"]) + " |")
    if m.get("service"):
        lines.append(f"| longest time no replica of {m['service']['name']} answered | "
                     f"{m['service']['longest_s']:.2f} s ({len(m['service']['windows'])} window(s)) |")
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
    lanes = m.get("unavailability") or {}
    if lanes:
        lines += ["", f"## Unavailability (nothing answered for more than {WINDOW_MIN_S:g} s)", "",
                  "| what | probed | windows | longest |", "|---|---|---|---|"]
        for key, lane in lanes.items():
            shown = ", ".join(f"{w['start_s']:.2f}-{w['end_s']:.2f} s ({w['duration_s']:.2f} s"
                              + (", still down at the end" if w["open"] else "") + ")" for w in lane["windows"])
            lines.append(f"| {LANE_LABELS.get(key, key)} | {lane['begin_s']:.1f}-{lane['end_s']:.1f} s | "
                         f"{shown or 'none'} | {lane['longest_s']:.2f} s |")
        lines += ["", "```", *text_timeline(result.faults, lanes, (m.get("service") or {}).get("serving") or {},
                                            rolls=_rolls(result)), "```"]
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
              "`nodes/NODE/etcd.log`: each node's journal and etcd's log during the run", "- `result.json`: all of the above as data"]
    if m.get("service"):
        lines.append("- `service.jsonl`: every request of the service probe (node, sent, done, outcome)")
    lines.append("")
    return "\n".join(lines)


def _rolls(result: RunResult) -> list[tuple[float, float]]:
    """When each rolling update ran: from its step to the end of the `updated` wait after it."""
    rolls = []
    for index, step in enumerate(result.steps):
        if step.description.startswith("update:"):
            done = next((s for s in result.steps[index + 1:] if s.description == "wait until updated"), step)
            rolls.append((step.started, done.started + done.duration))
    return rolls


def text_timeline(faults: list[dict[str, Any]], lanes: dict[str, Any], serving: dict[str, list],
                  width: int = 72, rolls: list[tuple[float, float]] = ()) -> list[str]:
    """The run as lines of characters, one column per slice of time, on one axis:
    faults (the first letter of each, as long as it lasted; R: a rolling
    update), each lane's unavailability windows (#), and when each node
    answered the service (=)."""
    end = max([lane["end_s"] for lane in lanes.values()] + [f.get("end") or f["start"] for f in faults] + [1.0])
    step = end / width

    def row(label: str, spans: list[tuple[float, float, str]], blank: str) -> str:
        cells = [blank] * width
        for start, stop, mark in spans:
            first, last = int(start / step), int(min(stop, end - 1e-9) / step)
            for column in range(max(0, first), min(width - 1, last) + 1):
                cells[column] = mark
        return f"{label:<12}|{''.join(cells)}|"

    ruler = [" "] * (width + 1)
    for column in range(0, width, 12):
        for offset, char in enumerate(f"{column * step:.0f}s"):
            if column + offset <= width:
                ruler[column + offset] = char
    lines = [f"{'':<12} {''.join(ruler)}".rstrip(), f"{'':<12} one column = {step:.2f} s"]
    lines.append(row("faults", [(f["start"], f.get("end") or end, f["action"][0].upper()) for f in faults]
                     + [(start, stop, "R") for start, stop in rolls], "."))
    for key, lane in lanes.items():
        lines.append(row(LANE_LABELS.get(key, key), [(w["start_s"], w["end_s"], "#") for w in lane["windows"]], "."))
    for node, periods in sorted(serving.items()):
        lines.append(row(f"  {node}", [(a, b, "=") for a, b in periods], " "))
    return lines


# ---------------------------------------------------------------- timeline


def timeline_svg(ops: list[dict[str, Any]], faults: list[dict[str, Any]], leader_changes: list[dict[str, Any]],
                 width: int = 900, height: int = 280, lanes: dict[str, Any] | None = None) -> str:
    lanes = lanes or {}
    lane_h = 16
    height += lane_h * len(lanes)
    # Lanes below the axis: each one's span in green, its unavailability windows in red.
    left, right, top, bottom = 50 if not lanes else 80, 20, 30, 40 + lane_h * len(lanes)
    plot_w, plot_h = width - left - right, height - top - bottom
    end = max([op["complete"] or op["invoke"] for op in ops] + [f.get("end") or f["start"] for f in faults]
              + [c["t"] for c in leader_changes] + [lane["end_s"] for lane in lanes.values()] + [1.0])
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
             f'shaded: faults; blue: leader changes'
             + ('; below: unavailability windows in red' if lanes else '') + '</text>']
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
    for row, (key, lane) in enumerate(lanes.items()):
        lane_y = top + plot_h + 22 + row * lane_h
        parts.append(f'<text x="{left - 4}" y="{lane_y + 10}" text-anchor="end">'
                     f'{escape(LANE_LABELS.get(key, key))}</text>')
        parts.append(f'<rect x="{x(lane["begin_s"]):.1f}" y="{lane_y}" '
                     f'width="{max(1.0, x(lane["end_s"]) - x(lane["begin_s"])):.1f}" height="{lane_h - 4}" '
                     f'fill="#2a9d4b" fill-opacity="0.25"/>')
        for window in lane["windows"]:
            parts.append(f'<rect x="{x(window["start_s"]):.1f}" y="{lane_y}" '
                         f'width="{max(1.0, x(window["end_s"]) - x(window["start_s"])):.1f}" height="{lane_h - 4}" '
                         f'fill="#d03030"><title>{window["duration_s"]:.2f} s</title></rect>')
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
