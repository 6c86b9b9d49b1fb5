"""Bounds a real test judges a lab against, derived from the lab's own timings (not a lucky sample)."""

from __future__ import annotations

from lab.cluster.agents import unit_move_bound
from lab.scenarios.conditions import liveness_bound


def unit_move_seconds(lab) -> float:
    """How long a unit of `lab` may take to run elsewhere once its machine is killed (any machine,
    the etcd leader's included)."""
    etcd = lab.spec.etcd
    election = liveness_bound(etcd.election_timeout_ms, etcd.heartbeat_ms, lab.spec.etcd_member_count(), etcd.pre_vote).seconds
    return unit_move_bound(election, etcd.election_timeout_ms / 1000)
