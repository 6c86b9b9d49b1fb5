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


def test_the_error_raised_is_the_one_that_stopped_the_others():
    stop = threading.Event()
    b_failed = threading.Event()

    def work(item):
        if item == "b":
            b_failed.set()
            raise RuntimeError("b: no A/B slots")
        b_failed.wait(5)  # "a" runs on, hears the stop as a staging does, and raises its own error
        if stop.is_set():
            raise InterruptedError("a: stopped half-way")
        return item

    with pytest.raises(RuntimeError, match="b: no A/B slots"):
        parallel_map(work, ["a", "b"], limit=2, stop=stop)
