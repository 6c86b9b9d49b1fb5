"""The reboot semaphore's pure logic: who may hold the lock (the compare-and-swap against etcd: tests/real)."""

from __future__ import annotations

from lab.node.semaphore import new_semaphore, release, try_acquire


def test_semaphore_admits_up_to_max_holders():
    s = new_semaphore(2)
    s = try_acquire(s, "node-1")
    s = try_acquire(s, "node-2")
    assert s["holders"] == ["node-1", "node-2"]
    assert try_acquire(s, "node-3") is None
    assert try_acquire(s, "node-1") is s, "holding already counts as acquired"
    s = release(s, "node-1")
    assert try_acquire(s, "node-3")["holders"] == ["node-2", "node-3"]


def test_release_of_a_non_holder_changes_nothing():
    s = try_acquire(new_semaphore(1), "node-1")
    assert release(s, "node-9") == s
