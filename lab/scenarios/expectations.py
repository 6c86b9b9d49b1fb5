"""After the steps: the history checkers and the scenario's `expect:`, each a result of its own.

`verify_history` waits for the cluster to be healthy again, then checks the
workload's history: no acknowledged write lost, registers linearizable, and
measures write-unavailability around each fault. `check_expectations`
judges the rest of `expect:` from what the invariant sampler saw during the
run and from the nodes' state at the end.

Both take the `ScenarioRun` (lab.scenarios.engine) and add their results to
it with `run.conclude`: what they read of it is its public state.
"""

from __future__ import annotations

from typing import Any

from lab.errors import LabError


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
    results = _sampled(run) + _end_state(run)
    if expect.units_running or expect.units_moved:
        results += _units(run)
    if expect.service_max_unavailable_s is not None:
        results.append(service_expectation(run, expect.service_max_unavailable_s))
    for description, ok, detail in results:
        run.conclude(description, ok, run.clock(), detail, duration=0.0)


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
        from lab.host.ssh import run_many

        outputs = run_many(list(run.provider.ssh_endpoints().values()),
                           ". /usr/lib/os-release; echo $VERSION_ID; cat /etc/lab/boot.json 2>/dev/null || true")
        versions = {r.node: (r.stdout.splitlines() or ["?"])[0] for r in outputs}
        rolled = [r.node for r in outputs if "rolled_back_from" in r.stdout]
        if expect.final_version is not None:
            ok = all(v == expect.final_version for v in versions.values())
            results.append((f"every node runs OS version {expect.final_version}", ok,
                            ", ".join(f"{n}: {v}" for n, v in sorted(versions.items()))))
        if expect.rolled_back is not None:
            results.append((f"{expect.rolled_back} node(s) rolled back", len(rolled) == expect.rolled_back,
                            f"rolled back: {', '.join(rolled) or 'none'}"))
    return results


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
    shown = ", ".join(f"{w['duration_s']:.2f} s at {w['start_s']:.2f} s" + (" (still down at the end)" if w["open"]
                                                                            else "") for w in windows)
    return (description, measured["longest_s"] <= bound,
            f"longest {measured['longest_s']:.2f} s over {measured['end_s'] - measured['begin_s']:.0f} s probed, "
            f"{measured['requests']} requests; windows: {shown or 'none'}")
