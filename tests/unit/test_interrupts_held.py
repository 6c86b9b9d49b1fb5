"""A Ctrl-C during `interrupts_held` is delivered when the block ends, never inside it."""

import os
import signal
import threading

import pytest

from lab.host.processes import interrupts_held


def test_a_ctrl_c_inside_the_block_is_raised_after_it():
    finished = []
    with pytest.raises(KeyboardInterrupt):
        with interrupts_held():
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(1000):  # many bytecodes: Python would have run the handler here
                pass
            finished.append(True)
    assert finished == [True]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_without_a_ctrl_c_nothing_is_raised_and_the_handler_is_restored():
    with interrupts_held():
        pass
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_outside_the_main_thread_it_holds_nothing_and_swaps_nothing():
    seen = []

    def worker():
        with interrupts_held():
            seen.append(signal.getsignal(signal.SIGINT))

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert seen == [signal.default_int_handler]
