"""Rolling updates: the reboot semaphore against a real etcd (its pure logic: tests/unit/test_semaphore.py)."""

from __future__ import annotations

import os
import shutil
import threading

import pytest

from lab.node.semaphore import Semaphore, try_acquire

needs_nodes = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("systemd-nspawn") is None,
                                 reason="needs root and systemd-nspawn")


# ---------------------------------------------------------------- against a real etcd


@pytest.fixture(scope="module")
def lab1(tmp_path_factory):
    if os.geteuid() != 0 or shutil.which("systemd-nspawn") is None:
        pytest.skip("needs root and systemd-nspawn")
    from lab.images.build import build_image
    from lab.core.lab import Lab
    from lab.model.spec import Override

    build_image("labos", "1")
    lab = Lab.open(tmp_path_factory.mktemp("sem") / "lab.yaml",
                   [Override(("nodes", "count"), 1, "--nodes"), Override(("provider",), "nspawn", "--provider")])
    lab.up()
    try:
        yield lab
    finally:
        lab.destroy()


@pytest.fixture(scope="module")
def etcd(lab1):
    """A new etcd client of the lab each call (the host's own, with the lab's certificates when TLS is on)."""
    return lambda: lab1.etcd_client()


def contend(etcd, key: str, max_holders: int, contenders: int) -> list[str]:
    """`contenders` threads try to acquire at once, each with its own client; returns who got it."""
    barrier = threading.Barrier(contenders)
    won: list[str] = []
    lock = threading.Lock()

    def attempt(name: str) -> None:
        semaphore = Semaphore(etcd(), key)
        barrier.wait()
        if semaphore.acquire(name, max_holders):
            with lock:
                won.append(name)

    threads = [threading.Thread(target=attempt, args=(f"node-{i}",)) for i in range(contenders)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return won


@needs_nodes
@pytest.mark.parametrize("max_holders", [1, 2])
def test_concurrent_acquirers_never_exceed_max_holders(etcd, max_holders):
    key = f"/test/semaphore-{max_holders}"
    won = contend(etcd, key, max_holders, contenders=8)
    assert len(won) == max_holders
    current, _ = Semaphore(etcd(), key).read(max_holders)
    assert sorted(current["holders"]) == sorted(won)


@needs_nodes
def test_a_dead_holder_blocks_until_unlocked_then_the_next_gets_in(etcd):
    key = "/test/semaphore-dead"
    dead = Semaphore(etcd(), key)
    assert dead.acquire("node-dead", 1)
    # node-dead never releases (its machine died holding the lock).
    waiting = Semaphore(etcd(), key)
    assert not waiting.acquire("node-2", 1)
    # What `lab update unlock node-dead` does:
    Semaphore(etcd(), key).release("node-dead", 1)
    assert waiting.acquire("node-2", 1)
    assert waiting.holds("node-2", 1) and not waiting.holds("node-dead", 1)


@needs_nodes
def test_stale_compare_and_swap_is_refused(etcd):
    key = "/test/semaphore-cas"
    semaphore = Semaphore(etcd(), key)
    current, revision = semaphore.read(1)
    assert semaphore.swap(revision, try_acquire(current, "node-1"))
    # A second writer that read the old revision must lose.
    assert not semaphore.swap(revision, try_acquire(current, "node-2"))
    assert semaphore.read(1)[0]["holders"] == ["node-1"]


@needs_nodes
def test_unlock_refuses_a_live_holder_unless_forced(lab1, etcd):
    from lab.cluster.update import unlock
    from lab.errors import UsageError

    semaphore = Semaphore(etcd())
    max_holders = lab1.spec.updates.max_concurrent_reboots
    assert semaphore.acquire("node-1", max_holders)  # as node-1's update agent does before rebooting
    try:
        with pytest.raises(UsageError, match="node-1 holds the reboot lock and is running") as info:
            unlock(lab1, "node-1")
        assert "--force" in info.value.hint and semaphore.holds("node-1", max_holders)
        assert unlock(lab1, "node-1", force=True) is True
        assert not semaphore.holds("node-1", max_holders)
        assert unlock(lab1, "node-1") is False  # nothing held: nothing to refuse
    finally:
        semaphore.release("node-1", max_holders)
