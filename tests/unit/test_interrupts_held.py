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


def test_a_sigterm_the_command_turned_into_an_interrupt_is_held_too_and_raised_as_terminated():
    from lab.host.processes import Terminated, raise_terminated

    previous = signal.signal(signal.SIGTERM, raise_terminated)
    try:
        finished = []
        with pytest.raises(Terminated):
            with interrupts_held():
                os.kill(os.getpid(), signal.SIGTERM)
                for _ in range(1000):
                    pass
                finished.append(True)
        assert finished == [True]
        assert signal.getsignal(signal.SIGTERM) is raise_terminated
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_the_cli_exits_143_on_sigterm_and_says_so(tmp_path):
    import subprocess
    import sys
    import time

    # A verb that waits, added for the test: what is tested is the CLI's handler, whatever the verb.
    script = ("import time, typer\n"
              "from lab.cli.main import app\n"
              "@app.command('nap', hidden=True)\n"
              "def nap():\n"
              "    print('napping', flush=True)\n"
              "    time.sleep(30)\n"
              "app(['nap'])\n")
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    assert child.stdout.readline().strip() == "napping"
    time.sleep(0.1)
    child.terminate()
    _, stderr = child.communicate(timeout=20)
    assert child.returncode == 143 and "terminated" in stderr and "Traceback" not in stderr, stderr
