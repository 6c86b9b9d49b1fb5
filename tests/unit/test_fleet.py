"""lab.node.fleet: unit files with [X-Fleet] options, and where each unit runs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from lab.node.fleet import FleetOptions, Machine, Plan, Unit, UnitError, parse_unit, place

FLEET_PY = Path(__file__).resolve().parents[2] / "lab" / "node" / "fleet.py"

HELLO = """\
[Unit]
Description=Hello World
[Service]
ExecStart=/bin/bash -c "while true; do echo Hello World; sleep 1; done"
"""


def unit(name: str, xfleet: str = "") -> Unit:
    text = "[Service]\nExecStart=/bin/true\n"
    if xfleet:
        text += f"[X-Fleet]\n{xfleet}\n"
    return parse_unit(name, text)


def machine(name: str, **metadata: str) -> Machine:
    return Machine(id=f"id-{name}", name=name, ip=f"10.0.0.{name[-1]}", metadata=metadata)


def refused(name: str, text: str) -> UnitError:
    with pytest.raises(UnitError) as info:
        parse_unit(name, text)
    return info.value


NODES = [machine("node-1"), machine("node-2"), machine("node-3")]


# ---------------------------------------------------------------- parsing


def test_hello_world_has_no_fleet_options():
    hello = parse_unit("hello.service", HELLO)
    assert hello == Unit(name="hello.service", text=HELLO, options=FleetOptions())
    assert not hello.is_template


def test_every_option_comments_and_continuations():
    text = """\
# a comment before any section
; and the other comment style
[Unit]
Description=A long \\
  description

[Service]
ExecStart=/bin/web \\
# a comment inside a continuation is skipped
  --port 80

[X-Fleet]
MachineID=abc123
MachineOf=db.service
Conflicts=web@*.service \\
  cache*.service
Conflicts=batch?.service
MachineMetadata="region=us-east" disk=ssd
MachineMetadata=region=us-west
Global=false
"""
    web = parse_unit("web@1.service", text)
    assert web.text == text
    assert web.options == FleetOptions(
        machine_id="abc123",
        machine_of=("db.service",),
        conflicts=("web@*.service", "cache*.service", "batch?.service"),
        global_=False,
        metadata=(("region", ("us-east", "us-west")), ("disk", ("ssd",))),
    )


@pytest.mark.parametrize("value", ["true", "yes", "1", "on", "True", "t"])
def test_global_true_spellings(value):
    assert parse_unit("mon.service", f"[X-Fleet]\nGlobal={value}\nMachineMetadata=role=mon\n").options == \
        FleetOptions(global_=True, metadata=(("role", ("mon",)),))


@pytest.mark.parametrize("value", ["false", "no", "0", "off"])
def test_global_false_spellings(value):
    assert not parse_unit("mon.service", f"[X-Fleet]\nGlobal={value}\nMachineID=x\n").options.global_


def test_specifiers_make_sidekicks():
    sidekick = parse_unit("web-discovery@2.service",
                          "[X-Fleet]\nMachineOf=web@%i.service\nConflicts=%p@*.service %N.x %n.y 100%%\n")
    assert sidekick.options.machine_of == ("web@2.service",)
    assert sidekick.options.conflicts == ("web-discovery@*.service", "web-discovery@2.x",
                                          "web-discovery@2.service.y", "100%")


def test_systemd_sections_and_keys_are_not_fleet_business():
    text = "[Unit]\nWhatever=1\n[Socket]\nListenStream=80\n[Install]\nWantedBy=multi-user.target\n[X-Other]\nX=y\n"
    assert parse_unit("web.socket", text).options == FleetOptions()


def test_backslashes_in_values_are_kept():
    assert unit("a.service", r"Conflicts=foo\x2dbar*.service").options.conflicts == (r"foo\x2dbar*.service",)


@pytest.mark.parametrize("name", ["hello.service", "web@1.service", "a.b:c_d-e.socket", "t.timer", "x.target",
                                  "p.path", "var-lib.mount", "hello@.service"])
def test_valid_names(name):
    assert parse_unit(name, "[Unit]\n").name == name


def test_template_is_valid_but_marked():
    assert parse_unit("hello@.service", HELLO).is_template


@pytest.mark.parametrize("name, problem", [
    ("hello", "must end in one of .service"),
    ("hello.txt", "must end in one of"),
    ("", "cannot be empty"),
    ("a/b.service", "cannot contain '/'"),
    ("@1.service", "nothing before @"),
    (".service", "nothing before .service"),
    ("a@b@c.service", "may only use letters"),
    ("he llo.service", "may only use letters"),
    ("x" * 300 + ".service", "at most 255"),
])
def test_invalid_names(name, problem):
    error = refused(name, HELLO)
    assert str(error).startswith(f"{name}: invalid unit name: ")
    assert problem in str(error)
    assert error.line is None


@pytest.mark.parametrize("text, line, problem", [
    ("", 1, "empty unit file"),
    ("\n# only\n; comments\n\n", 1, "empty unit file"),
    ("Description=x\n[Unit]\n", 1, "'Description=x' is outside any section"),
    ("[Unit]\nDescription=x\njust words\n", 3, "'just words' is not an assignment"),
    ("[Unit]\n=x\n", 2, "no key before '='"),
    ("[Unit\nA=b\n", 1, "malformed section header '[Unit'"),
    ("[]\n", 1, "malformed section header"),
    ("[Unit]\n[X-fleet]\nGlobal=true\n", 2, "did you mean [X-Fleet]?"),
    ("[X-Fleet]\nMachineMetdata=a=b\n", 2, "unknown [X-Fleet] key 'MachineMetdata': did you mean MachineMetadata?"),
    ("[X-Fleet]\nmachineid=x\n", 2, "did you mean MachineID?"),
    ("[X-Fleet]\nReplaces=x.service\n", 2, "known keys: MachineID, MachineOf, MachineMetadata, Conflicts, Global"),
    ("[X-Fleet]\nX-ConditionMachineOf=db.service\n", 2, "old name for MachineOf=: use MachineOf="),
    ("[X-Fleet]\nGlobal=maybe\n", 2, "Global=maybe is not a boolean"),
    ("[X-Fleet]\nGlobal=true\nMachineID=abc\n", 3, "MachineID= cannot be combined with Global=true (line 2)"),
    ("[X-Fleet]\nMachineOf=db.service\nGlobal=yes\n", 2, "MachineOf= cannot be combined with Global=true (line 3)"),
    ("[X-Fleet]\nGlobal=true\nConflicts=x*\n", 3, "Conflicts= cannot be combined with Global=true"),
    ("[X-Fleet]\nGlobal=true\nGlobal=false\n", 3, "Global= takes a single value (already set on line 2)"),
    ("[X-Fleet]\nMachineOf=a.service\nMachineOf=b.service\n", 3, "MachineOf= takes a single value (already set on line 2)"),
    ("[X-Fleet]\nMachineOf=a.service b.service\n", 2, "MachineOf= takes a single value (got 2 values)"),
    ("[X-Fleet]\nMachineOf=hello.service\n", 2, "a unit cannot follow itself"),
    ("[X-Fleet]\nMachineOf=db\n", 2, "MachineOf=db: a unit name must end in one of"),
    ("[X-Fleet]\nMachineOf=db@.service\n", 2, "it is a template, which never runs; name an instance such as db@1.service"),
    ("[X-Fleet]\nMachineID=a\nMachineID=b\n", 3, "MachineID= takes a single value"),
    ("[X-Fleet]\nConflicts=\n", 2, "Conflicts= needs a value"),
    ("[X-Fleet]\nMachineMetadata=role\n", 2, "MachineMetadata: 'role' is not key=value"),
    ("[X-Fleet]\nMachineMetadata=role=\n", 2, "'role=' is not key=value"),
    ("[X-Fleet]\nMachineMetadata=\"role=db\n", 2, "No closing quotation"),
    ("[X-Fleet]\nMachineOf=db@%x.service\n", 2, "unknown specifier %x"),
    ("[X-Fleet]\nConflicts=50%\n", 2, "a lone % at the end"),
    ("[Unit]\nDescription=a \\\n  b\n[X-Fleet]\nConflicts=a \\\n  b\nGlobal=nope\n", 7, "Global=nope"),
    ("[X-Fleet]\nGlobal=\\\n  nope\n", 2, "Global=nope"),
])
def test_errors_name_the_unit_and_line(text, line, problem):
    error = refused("hello.service", text)
    assert isinstance(error, ValueError)
    assert str(error).startswith(f"hello.service:{line}: "), str(error)
    assert problem in str(error)
    assert (error.unit, error.line) == ("hello.service", line)


# ---------------------------------------------------------------- placement


def test_hello_goes_to_the_first_machine_by_name():
    plan = place([parse_unit("hello.service", HELLO)], list(reversed(NODES)), {})
    assert plan == Plan(assignments={"hello.service": "id-node-1"}, pending={}, global_targets={})


def test_least_loaded_spreads_six_units_two_per_machine():
    units = [unit(f"u{i}.service") for i in range(6)]
    plan = place(units, NODES, {})
    per_machine = sorted(list(plan.assignments.values()).count(m.id) for m in NODES)
    assert per_machine == [2, 2, 2] and not plan.pending
    assert plan.assignments["u0.service"] == "id-node-1" and plan.assignments["u1.service"] == "id-node-2"


def test_same_inputs_in_any_order_give_the_same_plan():
    units = [unit("a.service"), unit("b.service", "MachineOf=c.service"), unit("c.service", "Conflicts=a*"),
             unit("d.service", "MachineMetadata=role=db"), unit("g.service", "Global=true")]
    machines = [machine("node-1", role="db"), machine("node-2"), machine("node-3", role="db")]
    first = place(units, machines, {"a.service": "id-node-3"})
    second = place(list(reversed(units)), list(reversed(machines)), {"a.service": "id-node-3"})
    assert first == second


def test_machine_id_is_exact():
    plan = place([unit("a.service", "MachineID=id-node-3")], NODES, {})
    assert plan.assignments == {"a.service": "id-node-3"}


def test_machine_id_of_no_machine_is_pending():
    plan = place([unit("a.service", "MachineID=abc")], NODES, {})
    assert plan.assignments == {}
    assert plan.pending["a.service"].startswith("MachineID=abc: no such machine (machines: node-1=id-node-1, ")


def test_metadata_keys_are_and():
    machines = [machine("node-1", role="db"), machine("node-2", region="east"), machine("node-3", role="db", region="east")]
    plan = place([unit("a.service", "MachineMetadata=role=db region=east")], machines, {})
    assert plan.assignments == {"a.service": "id-node-3"}


def test_metadata_values_of_one_key_are_or():
    machines = [machine("node-1", region="east"), machine("node-2", region="west"), machine("node-3", region="north")]
    units = [unit(f"u{i}.service", "MachineMetadata=region=east region=west") for i in range(4)]
    plan = place(units, machines, {})
    assert sorted(plan.assignments.values()) == ["id-node-1", "id-node-1", "id-node-2", "id-node-2"]


def test_metadata_no_machine_matches_is_pending_with_every_machine_described():
    machines = [machine("node-1", role="web"), machine("node-2")]
    plan = place([unit("db.service", "MachineMetadata=role=db")], machines, {})
    assert plan.pending == {
        "db.service": "no machine has metadata role=db (machines: node-1 role=web, node-2 (no metadata))"}


def test_machine_of_follows_its_target_placed_in_the_same_plan():
    # Names sort the follower first: the target is still placed before it.
    units = [unit("a-sidekick.service", "MachineOf=z-db.service"), unit("z-db.service"), unit("b.service")]
    plan = place(units, NODES, {"b.service": "id-node-1"})
    assert plan.assignments["z-db.service"] == "id-node-2"
    assert plan.assignments["a-sidekick.service"] == "id-node-2"


def test_machine_of_chain():
    units = [unit("a.service", "MachineOf=b.service"), unit("b.service", "MachineOf=c.service"),
             unit("c.service", "MachineMetadata=role=db")]
    machines = NODES + [machine("node-4", role="db")]
    plan = place(units, machines, {})
    assert plan.assignments == {"a.service": "id-node-4", "b.service": "id-node-4", "c.service": "id-node-4"}


def test_machine_of_missing_target_is_pending():
    plan = place([unit("side.service", "MachineOf=db.service")], NODES, {"side.service": "id-node-1"})
    assert plan.assignments == {}
    assert plan.pending == {"side.service": "MachineOf=db.service: db.service is not scheduled (no such unit)"}


def test_machine_of_pending_target_makes_the_follower_pending():
    units = [unit("db.service", "MachineID=gone"), unit("side.service", "MachineOf=db.service")]
    plan = place(units, NODES, {})
    assert plan.pending["side.service"] == "MachineOf=db.service: db.service is not scheduled (it is pending)"


def test_machine_of_cycle_is_pending_and_so_is_what_follows_it():
    units = [unit("a.service", "MachineOf=b.service"), unit("b.service", "MachineOf=a.service"),
             unit("c.service", "MachineOf=a.service"), unit("d.service")]
    plan = place(units, NODES, {"a.service": "id-node-1", "b.service": "id-node-1"})
    assert plan.assignments == {"d.service": "id-node-1"}
    assert plan.pending["a.service"] == plan.pending["b.service"] == \
        "MachineOf cycle: a.service -> b.service -> a.service"
    assert plan.pending["c.service"] == "MachineOf=a.service: a.service is not scheduled (it is pending)"


def test_machine_of_target_machine_lacking_metadata_is_pending():
    units = [unit("db.service"), unit("side.service", "MachineOf=db.service\nMachineMetadata=role=x")]
    plan = place(units, NODES, {})
    assert plan.pending["side.service"] == ("MachineOf=db.service: db.service runs on node-1; no machine has "
                                            "metadata role=x (machines: node-1 (no metadata))")


def test_machine_of_a_global_unit_picks_one_of_its_machines():
    machines = [machine("node-1"), machine("node-2", role="mon"), machine("node-3", role="mon")]
    units = [unit("agent.service", "Global=true\nMachineMetadata=role=mon"),
             unit("side.service", "MachineOf=agent.service"), unit("a.service", "MachineID=id-node-2")]
    plan = place(units, machines, {})
    assert plan.global_targets == {"agent.service": ["id-node-2", "id-node-3"]}
    assert plan.assignments["side.service"] == "id-node-3"


def test_followers_move_with_their_target():
    units = [unit("db.service"), unit("side.service", "MachineOf=db.service")]
    plan = place(units, NODES[1:], {"db.service": "id-node-1", "side.service": "id-node-1"})
    assert plan.assignments == {"db.service": "id-node-2", "side.service": "id-node-2"}


def test_conflicts_glob_spreads_instances_and_the_extra_one_is_pending():
    units = [unit(f"web@{i}.service", "Conflicts=web@*.service") for i in range(1, 5)]
    plan = place(units, NODES, {})
    assert sorted(plan.assignments.values()) == ["id-node-1", "id-node-2", "id-node-3"]
    assert plan.pending == {"web@4.service": (
        "Conflicts=web@*.service: every matching machine runs a conflicting unit "
        "(node-1: web@1.service, node-2: web@2.service, node-3: web@3.service)")}


def test_conflicts_are_symmetric():
    # backup.service declares nothing, yet stays off the machine of db.service.
    units = [unit("db.service", "Conflicts=backup*"), unit("other.service"), unit("backup.service")]
    plan = place(units, NODES[:2], {"db.service": "id-node-1", "other.service": "id-node-2"})
    assert plan.assignments["backup.service"] == "id-node-2"


def test_symmetric_conflict_everywhere_names_the_other_units_glob():
    units = [unit("db.service", "Conflicts=backup*"), unit("backup.service")]
    plan = place(units, NODES[:1], {"db.service": "id-node-1"})
    assert plan.pending == {"backup.service": "every matching machine runs a conflicting unit "
                                              "(node-1: db.service (its Conflicts=backup*))"}


def test_conflicting_units_found_together_are_separated_first_name_stays():
    units = [unit("a.service", "Conflicts=b.service"), unit("b.service")]
    plan = place(units, NODES[:2], {"a.service": "id-node-1", "b.service": "id-node-1"})
    assert plan.assignments == {"a.service": "id-node-1", "b.service": "id-node-2"}


def test_conflicts_count_global_units():
    machines = [machine("node-1", role="mon"), machine("node-2"), machine("node-3", role="mon")]
    units = [unit("monitor.service", "Global=true\nMachineMetadata=role=mon"),
             unit("web.service", "Conflicts=monitor.service"), unit("web2.service", "Conflicts=monitor.service")]
    plan = place(units, machines, {"web.service": "id-node-1"})
    assert plan.assignments == {"web.service": "id-node-2", "web2.service": "id-node-2"}


def test_global_unit_runs_on_every_matching_machine_and_counts_as_load():
    machines = [machine("node-1", role="mon"), machine("node-2", role="web"), machine("node-3", role="mon")]
    units = [unit("agent.service", "Global=true"), unit("mon.service", "Global=true\nMachineMetadata=role=mon"),
             unit("a.service"), unit("b.service")]
    plan = place(units, machines, {})
    assert plan.global_targets == {"agent.service": ["id-node-1", "id-node-2", "id-node-3"],
                                   "mon.service": ["id-node-1", "id-node-3"]}
    # node-2 carries one global unit, the others two: both new units start there.
    assert plan.assignments == {"a.service": "id-node-2", "b.service": "id-node-1"}
    assert not plan.pending


def test_global_unit_matching_no_machine_is_pending():
    plan = place([unit("mon.service", "Global=true\nMachineMetadata=role=mon")], NODES[:1], {})
    assert plan.global_targets == {"mon.service": []}
    assert plan.pending == {"mon.service": "no machine has metadata role=mon (machines: node-1 (no metadata))"}


def test_stability_keeps_valid_assignments_even_when_uneven():
    units = [unit(f"u{i}.service") for i in range(3)] + [unit("new.service")]
    current = {f"u{i}.service": "id-node-3" for i in range(3)}
    plan = place(units, NODES, current)
    assert plan.assignments == {**current, "new.service": "id-node-1"}


def test_a_new_unit_cannot_push_a_kept_one_away():
    # a.service sorts first and conflicts with z.service: it must go elsewhere, not evict it.
    units = [unit("a.service", "Conflicts=z.service"), unit("z.service")]
    plan = place(units, NODES[:2], {"z.service": "id-node-1"})
    assert plan.assignments == {"z.service": "id-node-1", "a.service": "id-node-2"}


def test_assignment_that_no_longer_fits_moves():
    machines = [machine("node-1", role="web"), machine("node-2", role="db")]
    plan = place([unit("db.service", "MachineMetadata=role=db")], machines, {"db.service": "id-node-1"})
    assert plan.assignments == {"db.service": "id-node-2"}


def test_units_of_a_vanished_machine_move_the_rest_stay():
    units = [unit(f"u{i}.service") for i in range(4)]
    current = {"u0.service": "id-node-1", "u1.service": "id-node-2", "u2.service": "id-node-3", "u3.service": "id-node-3"}
    plan = place(units, NODES[:2], current)
    assert plan.assignments == {"u0.service": "id-node-1", "u1.service": "id-node-2",
                                "u2.service": "id-node-1", "u3.service": "id-node-2"}


def test_no_machines_everything_pending():
    plan = place([unit("a.service"), unit("g.service", "Global=true")], [], {})
    assert plan.pending == {"a.service": "no machines in the cluster", "g.service": "no machines in the cluster"}
    assert plan.global_targets == {"g.service": []}


def test_templates_are_never_placed():
    plan = place([parse_unit("hello@.service", HELLO)], NODES, {"hello@.service": "id-node-1"})
    assert plan.assignments == {}
    assert plan.pending == {"hello@.service": "hello@.service is a template: it never runs itself, "
                                              "start an instance such as hello@1.service"}


def test_unknown_units_in_current_are_ignored():
    plan = place([unit("a.service")], NODES, {"gone.service": "id-node-1"})
    assert plan.assignments == {"a.service": "id-node-1"}


def test_duplicate_names_are_refused():
    with pytest.raises(ValueError, match="unit a.service is listed twice"):
        place([unit("a.service"), unit("a.service")], NODES, {})
    with pytest.raises(ValueError, match="machine id id-node-1 is listed twice"):
        place([], [NODES[0], NODES[0]], {})


def test_machine_is_hashable_and_keeps_its_own_metadata():
    metadata = {"role": "db"}
    node = Machine(id="m1", name="node-1", ip="10.0.0.1", metadata=metadata)
    metadata["role"] = "web"
    assert node.metadata == {"role": "db"}
    assert {node} == {Machine(id="m1", name="node-1", ip="10.0.0.1", metadata={"role": "db"})}


# ---------------------------------------------------------------- runs alone on the nodes
# (standard library only: tests/unit/test_layers.py checks every file of lab/node/)


def test_runs_as_a_lone_file_in_an_isolated_interpreter(tmp_path):
    lone = tmp_path / "fleet.py"
    lone.write_text(FLEET_PY.read_text())
    code = ("import runpy; ns = runpy.run_path('fleet.py');"
            "u = ns['parse_unit']('a.service', '[Service]\\nExecStart=/bin/true\\n');"
            "print(ns['place']([u], [ns['Machine'](id='m', name='n', ip='1', metadata={})], {}).assignments)")
    result = subprocess.run([sys.executable, "-I", "-c", code], cwd=tmp_path, capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "{'a.service': 'm'}"
