"""parallel_map: results in order, the first error raised, and no item started after it."""

import threading

import pytest

from lab.host.ssh import parallel_map


def test_results_come_back_in_the_order_of_the_items():
    assert parallel_map(lambda n: n * n, [3, 1, 2], limit=2) == [9, 1, 4]


def test_the_first_error_raises_and_no_item_starts_after_it():
    started = []
    later_started = threading.Event()

    def work(item):
        started.append(item)
        if item == "b":
            raise RuntimeError("b broke")
        if item == "a":
            later_started.wait(1)  # "a" is still running when "b" fails: a free worker must not take "c"
        else:
            later_started.set()
        return item

    with pytest.raises(RuntimeError, match="b broke"):
        parallel_map(work, ["a", "b", "c", "d", "e"], limit=2)
    assert sorted(started) == ["a", "b"]
