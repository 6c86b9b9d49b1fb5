"""After the steps: the history checkers and the scenario's `expect:`, each a result of its own.

`verify_history` waits for the cluster to be healthy again, then checks the
workload's history: no acknowledged write lost, registers linearizable, and
measures write-unavailability around each fault. `check_expectations`
judges the rest of `expect:` from what the invariant sampler saw during the
run and from the nodes' state at the end.

Both take the `ScenarioRun` (lab.scenarios.engine) and add their results to
it with `run.conclude`: what they read of it is its public state.

Expectations are relative to the state the run found (`starting_state`,
read before the first step): `final_version: previous` is the version each
node ran then, `rolled_back` counts the nodes that rolled back during this
run, so the built-ins pass in any order on one lab. Beside them: no leader
elected from a stale log (from the leader monitor's committed indexes) and
the scenario's latency objective (`slo:`), judged over all its samples.
"""

from __future__ import annotations

import math
from typing import Any

from lab.errors import LabError
from lab.scenarios.monitor import stale_leaders

# What a node reports: its OS version, then its boot.json (the slot, and a rollback's mark).
NODE_STATE_COMMAND = ". /usr/lib/os-release; echo $VERSION_ID; cat /etc/lab/boot.json 2>/dev/null || true"


def read_node_states(run) -> dict[str, dict[str, str]]:
    """Each node's OS version and boot.json text, over SSH (a node that does not answer: version "?")."""
    from lab.host.ssh import run_many

    outputs = run_many(list(run.provider.ssh_endpoints().values()), NODE_STATE_COMMAND)
    states = {}
    for result in outputs:
        lines = result.stdout.splitlines() if result.ok else []
        states[result.node] = {"version": (lines or ["?"])[0].strip() or "?", "boot": "\n".join(lines[1:]).strip()}
    return states


def starting_state(run) -> dict[str, dict[str, str]]:
    """What the run found, for expectations relative to it; empty when the nodes cannot be read."""
    try:
        return read_node_states(run)
    except LabError as exc:
        run.progress(f"could not read the nodes' versions before the steps: {exc.message}")
        return {}


def choose_version(candidates: list[str], versions: dict[str, str]) -> str:
    """The first candidate version not every node runs already (the last one if every node runs each)."""
    for version in candidates:
        if not versions or any(v != version for v in versions.values()):
            return version
    return candidates[-1]


def percentile(samples: list[float], fraction: float) -> float:
    """Nearest-rank percentile: the smallest sample at or above `fraction` of them (inf counts as a sample)."""
    ordered = sorted(samples)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def staging_latency(ops, window: tuple[float, float]) -> dict[str, Any]:
    """The workload's latency (acknowledged operations, by when they began) before an update's
    staging and during it: p50/p99 in ms and counts, and the ratios during/before. Staging writes a
    new /usr into every node's passive slot at a low weight; this is what it cost the applications."""
    start, end = window
    done = [op for op in ops if op.status == "ok" and op.complete is not None]
    return {"window_s": round(end - start, 2),
            **latency_before_and_during([1000 * (op.complete - op.invoke) for op in done if op.invoke < start],
                                        [1000 * (op.complete - op.invoke) for op in done
                                         if start <= op.invoke < end])}


def latency_before_and_during(before: list[float], during: list[float]) -> dict[str, Any]:
    """Two sets of latencies (ms): the ops, p50 and p99 of each, and the during/before ratios."""
    found: dict[str, Any] = {}
    for name, samples in (("before", before), ("during", during)):
        found[name] = ({"ops": len(samples), "p50_ms": round(percentile(samples, 0.5), 2),
                        "p99_ms": round(percentile(samples, 0.99), 2)} if samples else {"ops": 0})
    if found["before"]["ops"] and found["during"]["ops"]:
        for key in ("p50", "p99"):
            found[f"{key}_ratio"] = round(found["during"][f"{key}_ms"] / max(found["before"][f"{key}_ms"], 1e-3), 2)
    return found


def availability(ops, faults: list[dict[str, Any]]) -> dict[str, Any]:
    """Write-unavailability: the longest gap between acknowledged writes around each fault."""
    writes = sorted(op.complete for op in ops if op.kind in ("write", "unique", "cas") and op.status == "ok"
                    and op.complete is not None)
    total = len(ops)
    errors = sum(1 for op in ops if op.status != "ok")
    windows = []
    for fault in faults:
        start = fault["start"]
        end = (fault["end"] or start) + 30.0
        around = [t for t in writes if start - 1.0 <= t <= end]
        if len(around) < 2:
            windows.append(None)
            continue
        gap = max(b - a for a, b in zip(around, around[1:]))
        windows.append(round(gap, 3))
    return {"ops": total, "errors": errors, "write_unavailability_s": windows}


def verify_history(run) -> None:
    """Run the history checkers: no acknowledged write lost, registers linearizable."""
    from lab.cluster.etcd_bootstrap import EtcdBootstrap

    history = run.run_dir / "history.jsonl"
    if not history.exists():
        return
    try:
        EtcdBootstrap(run.context, run.provider.ssh_endpoints()).wait_healthy(timeout=60)
    except LabError as exc:
        run.conclude("cluster healthy again after the faults", False, run.clock(), exc.message, duration=0.0,
                     quiet=True)
        return
    from lab.scenarios.history import check_lost_writes, load_history
    from lab.scenarios.linearizable import check_linearizable
    from lab.scenarios.workload import read_final_uniques

    ops = load_history(history)
    run.measurements.update(availability(ops, run.faults.records))
    if getattr(run, "staging_window", None) is not None:  # an update step ran
        run.measurements["staging_latency"] = staging_latency(ops, run.staging_window)
    if run.spec.expect.no_lost_writes:
        started = run.clock()
        client = run.client_factory(5.0)
        try:
            final = read_final_uniques(client, run.run_dir.name)
        finally:
            client.close()
        report = check_lost_writes(ops, final)
        run.measurements["acknowledged_writes"] = report.acknowledged
        run.measurements["lost_writes"] = len(report.lost)
        detail = (f"{report.acknowledged} acknowledged unique writes, {len(report.lost)} lost"
                  + (f": {', '.join(op.key for op in report.lost[:5])}" if report.lost else ""))
        run.conclude("no acknowledged write lost", report.ok, started, detail)
    if run.spec.expect.linearizable:
        started = run.clock()
        report = check_linearizable(ops)
        run.measurements["checker_s"] = round(report.elapsed_s, 3)
        failing = [r for r in report.registers if not r.linearizable]
        detail = (f"{sum(r.ops for r in report.registers)} register ops on {len(report.registers)} keys, "
                  f"checked in {report.elapsed_s:.2f} s")
        if failing:
            detail += "\n" + "\n".join(r.explanation for r in failing)
        run.conclude("register history is linearizable", report.ok, started, detail,
                     summary=f"linearizable: {detail.splitlines()[0]}")


def check_expectations(run) -> None:
    """The scenario's `expect:` beyond the history checkers, each as a result of its own."""
    expect = run.spec.expect
    sampled = run.invariants
    run.measurements["max_members_down"] = sampled.max_down
    run.measurements["member_downtime_s"] = {node: round(t, 2) for node, t in sorted(sampled.downtime.items())}
    results = _sampled(run) + _end_state(run) + _leaders(run)
    if expect.units_running or expect.units_moved:
        results += _units(run)
    if expect.service_max_unavailable_s is not None:
        results.append(service_expectation(run, expect.service_max_unavailable_s))
    if run.spec.slo is not None:
        results += slo_results(run.spec.slo, run.measurements, run.earlier)
    for description, ok, detail in results:
        run.conclude(description, ok, run.clock(), detail, duration=0.0)


def _leaders(run) -> list[tuple[str, bool, str]]:
    """No leader elected from a stale log, judged from the monitor's committed indexes."""
    if not run.spec.expect.no_stale_leader or not any(f.get("leader") for f in run.faults.records):
        return []
    stale = stale_leaders(run.faults.records, run.monitor.changes, run.monitor.committed_before)
    judged = sum(1 for f in run.faults.records if f.get("leader"))
    return [("no leader elected from a stale log", not stale,
             "; ".join(stale) if stale else f"every new leader's committed index passed what was committed "
                                            f"before its fault ({judged} fault(s) with a leader)")]


def slo_results(slo, measurements: dict[str, Any], earlier: list[dict[str, Any]]) -> list[tuple[str, bool, str]]:
    """The latency objective over every new-leader wait of this run and of `earlier` runs' measurements
    (the same scenario, earlier in one `lab test`). A wait that saw no leader counts as infinitely slow."""
    samples: list[float] = []
    for measured in [*earlier, measurements]:
        samples += [t for t in measured.get("time_to_new_leader_s") or [] if t is not None]
        samples += [math.inf] * len(measured.get("no_new_leader_after_s") or [])
    results = []
    for name, fraction, limit in (("p99", 0.99, slo.new_leader_p99), ("p50", 0.5, slo.new_leader_p50)):
        if limit is None:
            continue
        description = f"SLO: time to new leader {name} <= {limit:g} s"
        runs = f"{len(earlier) + 1} run(s)"
        if len(samples) < max(1, slo.min_samples):
            results.append((description, False, f"{len(samples)} sample(s) over {runs}, fewer than min_samples "
                                                f"{slo.min_samples}: not measurable"))
            continue
        value = percentile(samples, fraction)
        shown = ", ".join(f"{t:.2f}" for t in sorted(samples)[-5:])
        results.append((description, value <= limit,
                        f"{name} {value:.2f} s over {len(samples)} sample(s) from {runs} (slowest: {shown} s)"))
    return results


def _sampled(run) -> list[tuple[str, bool, str]]:
    """max_down and quorum, from the invariant sampler."""
    expect, sampled = run.spec.expect, run.invariants
    majority = len(run.members) // 2 + 1
    results = []
    if expect.max_down is not None:
        bound = run.lab.spec.updates.max_concurrent_reboots if expect.max_down == "auto" else expect.max_down
        results.append((f"never more than {bound} etcd member(s) down at once", sampled.max_down <= bound,
                        f"at most {sampled.max_down} down at once ({sampled.samples} samples"
                        + (f"; worst at {sampled.max_down_at:.2f} s: {', '.join(sampled.max_down_nodes)}"
                           if sampled.max_down else "") + ")"))
    if expect.quorum:
        lost = sampled.quorum_lost
        results.append((f"etcd quorum ({majority} of {len(run.members)}) never lost", not lost,
                        f"{sampled.samples} samples" + (f"; lost at {', '.join(f'{t:.2f} s' for t in lost[:5])}"
                                                        if lost else "")))
    return results


def _end_state(run) -> list[tuple[str, bool, str]]:
    """rebooted, final_version and rolled_back, from the nodes as they are now."""
    expect = run.spec.expect
    results = []
    statuses = {s.name: s for s in run.provider.status()}
    if expect.rebooted is not None:
        changed = [n for n, s in statuses.items() if s.boot_id and s.boot_id != run.boot_ids_start.get(n)]
        wanted = len(statuses) if expect.rebooted == "all" else expect.rebooted
        results.append((f"{expect.rebooted} node(s) rebooted (boot id changed)", len(changed) == wanted,
                        f"rebooted: {', '.join(changed) or 'none'}"))
    if expect.final_version is not None or expect.rolled_back is not None:
        now = read_node_states(run)
        before = run.start_state
        versions = {node: state["version"] for node, state in now.items()}
        if expect.final_version is not None:
            results.append(_final_version(expect.final_version, versions, before,
                                          run.conditions.update_target))
        if expect.rolled_back is not None:
            # During this run: boot.json now marks a rollback and is not what it was before the steps
            # (a node rolled back by an earlier run keeps its mark).
            rolled = sorted(node for node, state in now.items() if "rolled_back_from" in state["boot"]
                            and state["boot"] != before.get(node, {}).get("boot"))
            results.append((f"{expect.rolled_back} node(s) rolled back during this run",
                            len(rolled) == expect.rolled_back, f"rolled back: {', '.join(rolled) or 'none'}"))
    return results


def _final_version(wanted: str, versions: dict[str, str], before: dict[str, dict[str, str]],
                   target: str | None) -> tuple[str, bool, str]:
    """final_version: a version, `previous` (each node's version before the steps) or `target`."""
    found = ", ".join(f"{n}: {v}" for n, v in sorted(versions.items()))
    if wanted == "previous":
        if not before:
            return "every node runs the OS version it ran before", False, f"{found} (the versions before the " \
                                                                          f"steps could not be read)"
        expected = {node: state["version"] for node, state in before.items()}
        ok = all(versions.get(node) == version for node, version in expected.items())
        was = ", ".join(f"{n}: {v}" for n, v in sorted(expected.items()))
        return "every node runs the OS version it ran before", ok, f"now {found}; before {was}"
    if wanted == "target":
        if target is None:
            return "every node runs the version it rolled to", False, f"{found} (no update step ran)"
        wanted = target
    return f"every node runs OS version {wanted}", all(v == wanted for v in versions.values()), found


def _units(run) -> list[tuple[str, bool, str]]:
    """units_running from the cluster now; units_moved from the placements sampled during the run."""
    from lab.cluster.units import list_units

    expect = run.spec.expect
    results = []
    client = run.client_factory(2.0)
    try:
        rows = {r.name: r for r in list_units(client)}
    finally:
        client.close()
    for name in expect.units_running:
        row = rows.get(name)
        ok = row is not None and row.active == "active"
        results.append((f"{name} is running", ok,
                        f"on {','.join(row.machines)}: {row.active}/{row.sub}" if row else "not found"))
    if expect.units_moved:
        moves = run.invariants.unit_moves()
        results.append(("units moved off rebooting machines", bool(moves),
                        "; ".join(f"{u}: {' -> '.join(path)}" for u, path in moves.items()) or "no unit moved"))
    return results


def service_expectation(run, bound: float) -> tuple[str, bool, str]:
    """service_max_unavailable_s, from the windows the service probe measured."""
    description = f"the service never unavailable for more than {bound:g} s"
    measured = run.measurements.get("service")
    if not measured:
        return description, False, "no service was probed (a `service: {start: ...}` step is needed)"
    windows = measured["windows"]
    shown = ", ".join(f"{w['duration_s']:.2f} s at {w['start_s']:.2f} s"
                      + (f" ({w['unobserved_s']:.2f} s of it unobserved: the host sent nothing)"
                         if w.get("unobserved_s") else "")
                      + (" (still down at the end)" if w["open"] else "") for w in windows)
    # Judged on what the probe saw: a host too starved to ask is not a service that did not answer.
    longest = measured.get("longest_observed_s", measured["longest_s"])
    return (description, longest <= bound,
            f"longest {longest:.2f} s observed over {measured['end_s'] - measured['begin_s']:.0f} s probed, "
            f"{measured['requests']} requests; windows: {shown or 'none'}")
