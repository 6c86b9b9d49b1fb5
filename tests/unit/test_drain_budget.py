"""A rolling update drains a node only once the units placed on other nodes run (a disruption budget)."""

import json

from lab.node import layout
from lab.node.updater import units_starting_elsewhere

ME, OTHER, THIRD = "m-me", "m-other", "m-third"


def etcd(units: dict[str, str], schedule: dict[str, str], states: dict[tuple[str, str], str]):
    return ({f"{layout.UNITS}{n}": json.dumps({"name": n, "text": "", "desired": d}) for n, d in units.items()},
            {f"{layout.SCHEDULE}{n}": m for n, m in schedule.items()},
            {f"{layout.STATES}{n}/{m}": json.dumps({"active": a, "sub": "x", "machine": m})
             for (n, m), a in states.items()})


def test_a_replica_still_starting_on_another_node_holds_the_drain():
    kv = etcd({"web@1.service": "launched", "web@2.service": "launched"},
              {"web@1.service": ME, "web@2.service": OTHER},
              {("web@1.service", ME): "active", ("web@2.service", OTHER): "activating"})
    assert units_starting_elsewhere(*kv, ME) == ["web@2.service"]


def test_a_unit_placed_elsewhere_with_no_state_yet_is_starting():
    kv = etcd({"web@2.service": "launched"}, {"web@2.service": THIRD}, {})
    assert units_starting_elsewhere(*kv, ME) == ["web@2.service"]


def test_running_units_elsewhere_and_this_nodes_own_units_let_it_drain():
    kv = etcd({"web@1.service": "launched", "web@2.service": "launched", "db.service": "launched"},
              {"web@1.service": ME, "web@2.service": OTHER, "db.service": THIRD},
              {("web@1.service", ME): "activating", ("web@2.service", OTHER): "active",
               ("db.service", THIRD): "active"})
    assert units_starting_elsewhere(*kv, ME) == []


def test_pending_and_loaded_units_are_not_waited_for():
    kv = etcd({"web@3.service": "launched", "batch.service": "loaded"},
              {"batch.service": OTHER},
              {("batch.service", OTHER): "inactive"})
    assert units_starting_elsewhere(*kv, ME) == []


def test_a_state_left_from_another_machine_does_not_count():
    kv = etcd({"web@2.service": "launched"}, {"web@2.service": OTHER},
              {("web@2.service", THIRD): "active"})
    assert units_starting_elsewhere(*kv, ME) == ["web@2.service"]


def test_garbage_in_etcd_is_skipped_not_fatal():
    units = {f"{layout.UNITS}bad.service": "{not json", f"{layout.UNITS}list.service": "[]"}
    schedule = {f"{layout.SCHEDULE}bad.service": OTHER}
    states = {f"{layout.STATES}bad.service/{OTHER}": "nope"}
    assert units_starting_elsewhere(units, schedule, states, ME) == []
