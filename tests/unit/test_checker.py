"""lab.scenarios.history and .linearizable: lost writes and linearizable registers, on fixed and generated
histories."""

from __future__ import annotations

import dataclasses
import json
import random
from functools import lru_cache
from pathlib import Path

import pytest

from lab.scenarios.history import HistoryError, Op, check_lost_writes, dump_history, load_history, simulate_history
from lab.scenarios.linearizable import check_linearizable

HISTORIES = Path(__file__).parent / "histories"


def history(name: str) -> list[Op]:
    return load_history(HISTORIES / f"{name}.jsonl")


def op(id: int, process: int, kind: str, value=None, expected=None, invoke=0.0, complete=1.0,
       status="ok", output=None, key="x") -> Op:
    return Op(id, process, kind, key, value, expected, invoke, complete, status, output)


def explanation(ops: list[Op], **kwargs) -> str:
    report = check_linearizable(ops, **kwargs)
    assert not report.ok and not report.timed_out
    failing = [r for r in report.registers if not r.linearizable]
    assert len(failing) == 1
    return failing[0].explanation


def change(ops: list[Op], op_id: int, **fields) -> list[Op]:
    return [dataclasses.replace(o, **fields) if o.id == op_id else o for o in ops]


# ---------------------------------------------------------------- linearizable histories


@pytest.mark.parametrize("name", ["sequential", "concurrent_ok", "cas"])
def test_valid_histories_are_accepted(name):
    report = check_linearizable(history(name))
    assert report.ok and not report.timed_out
    assert all(r.linearizable for r in report.registers)


def test_registers_are_checked_one_key_at_a_time():
    report = check_linearizable(history("sequential"))
    assert [(r.key, r.ops) for r in report.registers] == [("r0", 6), ("r1", 3)]  # the failed read is left out


def test_cas_outputs_are_checked_both_ways():
    ops = history("cas")
    assert "op 1 " in explanation(change(ops, 1, output=True))  # two CAS from absent cannot both apply
    assert "op 4 " in explanation(change(ops, 4, output=True))  # expected "0-0" was gone by then
    assert "op 3 " in explanation(change(ops, 3, output=False))  # it held "0-0": it must have applied


def test_cas_expected_null_means_absent():
    assert check_linearizable([op(1, 0, "cas", "a", None, 0, 1, output=True)]).ok
    assert not check_linearizable([op(1, 0, "cas", "a", None, 0, 1, output=False)]).ok
    assert check_linearizable([op(1, 0, "cas", "a", None, 0, 1, output=False)], initial={"x": "z"}).ok


def test_initial_values():
    ops = [op(1, 0, "read", invoke=0, complete=1, output="seed")]
    assert not check_linearizable(ops).ok
    assert check_linearizable(ops, initial={"x": "seed"}).ok


def test_touching_operations_count_as_concurrent():
    # The read is invoked at the instant the write completes: either order is possible.
    ops = [op(1, 0, "write", "a", invoke=0, complete=1), op(2, 1, "read", invoke=1, complete=2, output=None)]
    assert check_linearizable(ops).ok
    assert not check_linearizable(change(ops, 2, invoke=1.000001)).ok


def test_an_empty_history_is_linearizable():
    report = check_linearizable([])
    assert report.ok and report.registers == []


# ---------------------------------------------------------------- known non-linearizable histories


def test_stale_read_is_rejected():
    text = explanation(history("stale_read"))
    assert "op 12 " in text and "cannot be linearized" in text
    assert 'needs the register to hold "a"' in text and 'could only hold: "b"' in text
    assert "op 11 " in text and "op 10 " in text  # who wrote "b" and "a"


def test_read_of_a_value_never_written_is_rejected():
    text = explanation(history("never_written"))
    assert "op 22 " in text and 'no operation on this key ever sets "ghost"' in text


def test_two_cas_from_the_same_value_are_rejected():
    text = explanation(history("double_cas"))
    assert "op 32 " in text and "op 31 " in text
    # concurrent ones cannot both succeed either
    both = [op(1, 0, "cas", "p", None, 0, 2, output=True), op(2, 1, "cas", "q", None, 1, 3, output=True)]
    assert "op 2 " in explanation(both) or "op 1 " in explanation(both)


def test_read_your_write_violation_is_rejected():
    # Process 1 wrote "mine", then read null although only "mine" and "x" could be there.
    text = explanation(history("read_your_write"))
    assert "op 42 " in text and "op 41 " in text


def test_flip_flop_is_rejected():
    text = explanation(history("flip_flop"))
    assert "op 53 " in text and "op 52 " in text  # "a" seen after both writes, then "b"


def test_explanation_lists_the_window_with_times_and_processes():
    text = explanation(history("stale_read"))
    assert "(process 0) write \"b\"" in text and "[2.000000, 3.000000] ok" in text
    assert text.startswith("key 'r0': not linearizable.")
    assert "op 12's completion at 5.000000" in text


# ---------------------------------------------------------------- fail and unknown operations


def test_failed_operations_did_not_happen():
    ops = [op(1, 0, "write", "a", invoke=0, complete=1),
           op(2, 1, "write", "b", invoke=2, complete=3, status="fail"),
           op(3, 2, "read", invoke=4, complete=5, output="a")]
    assert check_linearizable(ops).ok
    # ...so nobody can have read their value
    assert "op 4 " in explanation(ops + [op(4, 2, "read", invoke=6, complete=7, output="b")])


def test_unknown_reads_are_ignored():
    ops = [op(1, 0, "write", "a"), op(2, 1, "read", invoke=2, complete=None, status="unknown", output="junk")]
    report = check_linearizable(ops)
    assert report.ok and report.registers[0].ops == 1


def test_unknown_write_that_must_have_taken_effect_is_accepted():
    ops = history("unknown_took_effect")
    assert check_linearizable(ops).ok
    assert not check_linearizable(change(ops, 61, status="fail", complete=2.5)).ok


def test_unknown_write_that_must_not_have_taken_effect_is_accepted():
    ops = history("unknown_not_applied")
    assert check_linearizable(ops).ok
    assert not check_linearizable(change(ops, 71, status="ok", complete=2.5)).ok


def test_unknown_write_seen_before_its_invoke_is_rejected():
    text = explanation(history("unknown_before_invoke"))
    assert "op 81 " in text and "op 82 " in text and "after op 81 completed" in text


def test_unknown_cas_applies_only_from_its_expected_value():
    ops = [op(1, 0, "write", "a", invoke=0, complete=1),
           op(2, 1, "cas", "c", "a", invoke=2, complete=None, status="unknown"),
           op(3, 2, "read", invoke=3, complete=4, output="c")]
    assert check_linearizable(ops).ok
    assert not check_linearizable(change(ops, 2, expected="b")).ok


def test_unknown_write_may_land_long_after_its_process_moved_on():
    ops = [op(1, 0, "write", "late", invoke=0, complete=None, status="unknown"),
           op(2, 0, "write", "next", invoke=5, complete=6),
           op(3, 1, "read", invoke=7, complete=8, output="next"),
           op(4, 1, "read", invoke=20, complete=21, output="late")]
    assert check_linearizable(ops).ok


# ---------------------------------------------------------------- time budget


def test_timeout_is_inconclusive_never_linearizable():
    ops = simulate_history(random.Random(3), 3000, keys=2, processes=10)
    report = check_linearizable(ops, timeout_s=0.0)
    assert report.timed_out and not report.ok
    first, second = report.registers
    assert not first.linearizable and "inconclusive" in first.explanation and "timeout_s" in first.explanation
    assert not second.linearizable and "not checked" in second.explanation
    assert check_linearizable(ops).ok  # it was linearizable all along


# ---------------------------------------------------------------- lost writes


def test_lost_writes():
    ops = history("unique_writes")
    final = {"/lab/workload/unique/5/0": "5-0", "/lab/workload/unique/5/1": "5-1",
             "/lab/workload/unique/6/0": "6-0", "/lab/workload/unique/6/2": "6-2"}
    report = check_lost_writes(ops, final)
    assert report.ok and report.acknowledged == 3 and report.lost == [] and report.unacknowledged_present == 1

    del final["/lab/workload/unique/5/1"]
    final["/lab/workload/unique/6/2"] = "something else"
    report = check_lost_writes(ops, final)
    assert not report.ok and [o.id for o in report.lost] == [91, 95]


def test_unknown_unique_writes_may_be_missing():
    report = check_lost_writes(history("unique_writes"), {"/lab/workload/unique/5/0": "5-0",
                                                          "/lab/workload/unique/5/1": "5-1",
                                                          "/lab/workload/unique/6/2": "6-2"})
    assert report.ok and report.unacknowledged_present == 0


# ---------------------------------------------------------------- generated histories


@pytest.mark.parametrize("seed", range(12))
def test_generated_linearizable_histories_are_accepted_and_a_ghost_read_rejected(seed):
    rng = random.Random(seed)
    ops = simulate_history(rng, rng.randint(100, 400), keys=rng.randint(1, 3), processes=rng.randint(2, 8),
                           unknown_ratio=0.03, fail_ratio=0.02, slow_ratio=0.05)
    report = check_linearizable(ops)
    assert report.ok, [r.explanation for r in report.registers if not r.linearizable]

    reads = [o for o in ops if o.kind == "read" and o.status == "ok"]
    ghost = rng.choice(reads)
    text = explanation(change(ops, ghost.id, output="never-written"))
    assert f"op {ghost.id} " in text and "cannot be linearized" in text


def _brute_force(ops: list[Op]) -> bool:
    """Linearizable by trying every order (tiny histories only): the reference for the search."""
    ops = [o for o in ops if o.status == "ok" or (o.status == "unknown" and o.kind != "read")]

    @lru_cache(maxsize=None)
    def fits(remaining: frozenset, state) -> bool:
        if not any(ops[i].status == "ok" for i in remaining):
            return True  # unknown ones left over never took effect
        for i in remaining:
            x = ops[i]
            if any(ops[k].status == "ok" and ops[k].complete < x.invoke for k in remaining):
                continue  # something still pending had already completed before x began
            if x.kind == "read":
                ok, new = x.output == state, state
            elif x.kind == "write":
                ok, new = True, x.value
            elif x.status == "ok":
                ok, new = x.output == (state == x.expected), x.value if x.output else state
            else:
                ok, new = state == x.expected, x.value
            if ok and fits(remaining - {i}, new):
                return True
        return False

    return fits(frozenset(range(len(ops))), None)


def _small_history(rng: random.Random) -> list[Op]:
    """A few ops on one key over a tiny alphabet, from a real execution; half of them then corrupted."""
    ops = []
    for i in range(rng.randint(1, 12)):
        invoke = round(rng.uniform(0, 10), 1)
        complete = round(invoke + rng.choice([0, rng.uniform(0, 3), rng.uniform(0, 8)]), 1)
        kind = rng.choice(["read", "write", "cas", "cas"])
        status = rng.choices(["ok", "unknown", "fail"], [7, 3, 1])[0]
        ops.append(op(i, i, kind, None if kind == "read" else rng.choice(["a", "b", "c", f"v{i}"]),
                      rng.choice(["a", "b", "c", None]) if kind == "cas" else None,
                      invoke, None if status == "unknown" else complete, status))
    # Outputs from applying the ops at random instants inside their intervals
    # (unknown ones: half of them, at any instant after their invoke).
    effects = sorted((rng.uniform(o.invoke, o.complete) if o.complete is not None else o.invoke + rng.uniform(0, 10),
                      o.id) for o in ops if o.status == "ok" or (o.status == "unknown" and rng.random() < 0.5))
    state, outputs = None, {}
    for _, i in effects:
        o = ops[i]
        if o.kind == "read":
            outputs[i] = state
        elif o.kind == "write":
            state = o.value
        else:
            outputs[i] = state == o.expected
            state = o.value if outputs[i] else state
    ops = [dataclasses.replace(o, output=outputs.get(o.id) if o.status == "ok" else None) for o in ops]
    victim = rng.choice(ops)
    if rng.random() < 0.5 and victim.status == "ok" and victim.kind != "write":
        wrong = rng.choice(["a", "b", "c", None]) if victim.kind == "read" else not victim.output
        ops = change(ops, victim.id, output=wrong)
    return ops


def test_search_agrees_with_brute_force_on_small_histories():
    rng = random.Random(2024)
    verdicts = []
    for _ in range(3000):
        ops = _small_history(rng)
        expected = _brute_force(ops)
        assert check_linearizable(ops).ok == expected, "\n".join(map(str, ops))
        verdicts.append(expected)
    assert 0.2 < sum(verdicts) / len(verdicts) < 0.9  # both kinds were exercised


# ---------------------------------------------------------------- files


def test_dump_and_load_round_trip(tmp_path):
    ops = simulate_history(random.Random(5), 200, unknown_ratio=0.05, fail_ratio=0.05)
    ops += history("unique_writes")
    path = tmp_path / "history.jsonl"
    dump_history(ops, path)
    assert load_history(path) == ops
    assert [p.name for p in tmp_path.iterdir()] == ["history.jsonl"]


def test_load_skips_blank_lines_and_allows_optional_fields_left_out(tmp_path):
    path = tmp_path / "h.jsonl"
    path.write_text('{"id": 1, "process": 0, "kind": "read", "key": "r0", "invoke": 1, "complete": 2, '
                    '"status": "ok", "output": null}\n\n')
    assert load_history(path) == [Op(1, 0, "read", "r0", None, None, 1, 2, "ok", None)]


GOOD = json.dumps({"id": 1, "process": 0, "kind": "write", "key": "r0", "value": "a", "expected": None,
                   "invoke": 1.0, "complete": 2.0, "status": "ok", "output": None})


@pytest.mark.parametrize("bad, message", [
    ('{"id": 2, "process": 0,', "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    (GOOD.replace('"kind": "write", ', ""), "missing field kind"),
    (GOOD.replace('"write"', '"delete"'), "kind must be one of read, write, cas, unique"),
    (GOOD.replace('"ok"', '"maybe"'), "status must be one of ok, fail, unknown"),
    (GOOD.replace('"complete": 2.0', '"complete": null'), "status is ok but complete is null"),
    (GOOD.replace('"complete": 2.0', '"complete": 0.5'), "complete (0.5) is before invoke (1.0)"),
    (GOOD.replace('"invoke": 1.0', '"invoke": "soon"'), "invoke must be a number"),
    (GOOD.replace('"write"', '"cas"'), "an ok cas needs output true or false"),
])
def test_malformed_line_names_the_line(tmp_path, bad, message):
    path = tmp_path / "h.jsonl"
    path.write_text(GOOD + "\n" + GOOD.replace('"id": 1', '"id": 2') + "\n" + bad + "\n")
    with pytest.raises(ValueError) as info:
        load_history(path)
    assert isinstance(info.value, HistoryError)
    assert f"{path}:3: " in str(info.value) and message in str(info.value)


def test_check_refuses_malformed_operations():
    with pytest.raises(HistoryError, match="op 1: the id is used twice"):
        check_linearizable([op(1, 0, "write", "a"), op(1, 1, "write", "b")])
    with pytest.raises(HistoryError, match="op 7: status is ok but complete is null"):
        check_linearizable([op(7, 0, "read", complete=None)])
