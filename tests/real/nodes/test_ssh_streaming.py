"""run_with_input, the stream `lab update` writes a VM's slot through, against a real sshd on loopback
(lab.testing.loopback_sshd): what arrives is what was sent, the command's words and exit come back, a
command that stops reading is noticed, and a cancel (Ctrl-C) closes the session within a second whether
the node is reading slowly or busy after its input ended."""

from __future__ import annotations

import hashlib
import io
import os
import threading
import time

import pytest

from lab.host.ssh import Cancelled, SSHEndpoint, run_with_input
from lab.testing.loopback_sshd import loopback_sshd, sshd_problem

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or sshd_problem() is not None,
                                reason=f"needs root and OpenSSH's sshd: {sshd_problem()}")


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory):
    with loopback_sshd(tmp_path_factory.mktemp("sshd")) as sshd:
        yield SSHEndpoint(node="loop", host="127.0.0.1", port=sshd.port, user="root",
                          identity_file=sshd.client_key, known_hosts=sshd.known_hosts)


def cancel_after(seconds: float) -> threading.Event:
    event = threading.Event()
    threading.Timer(seconds, event.set).start()
    return event


def test_what_arrives_is_what_was_sent_and_the_commands_words_come_back(endpoint):
    data = os.urandom(24 * 2**20 + 12345)  # not a whole number of chunks
    result = run_with_input(endpoint, "sha256sum; echo on stderr >&2", io.BytesIO(data), timeout=60)
    assert result.exit_status == 0
    assert result.stdout.split()[0] == hashlib.sha256(data).hexdigest()
    assert result.stderr.strip().endswith("on stderr")  # after what this sshd logs at DEBUG1


def test_a_command_that_stops_reading_is_heard_with_its_reason(endpoint):
    result = run_with_input(endpoint, "head -c 1000 >/dev/null; echo slot refused >&2; exit 3",
                            io.BytesIO(os.urandom(64 * 2**20)), timeout=60)
    assert result.exit_status == 3 and "slot refused" in result.stderr


@pytest.mark.parametrize("command, size", [
    ("sleep 30", 8 * 2**20),                   # never reads: the window fills, the sender waits
    ("cat >/dev/null; sleep 30", 2**20),      # reads it all at once, then works on without a word (a sync)
])
def test_a_cancel_closes_the_session_within_a_second(endpoint, command, size):
    started = time.monotonic()
    with pytest.raises(Cancelled, match="loop: stopped half-way"):
        run_with_input(endpoint, command, io.BytesIO(os.urandom(size)), timeout=60, cancel=cancel_after(1.0))
    assert time.monotonic() - started < 3.0


def test_a_cancel_set_before_the_session_opens_none(endpoint):
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(Cancelled):
        run_with_input(endpoint, "touch /tmp/lab-test-must-not-exist", io.BytesIO(b"x"), timeout=60, cancel=cancel)


def test_a_jump_connection_that_drops_under_a_handshake_is_opened_again(endpoint, monkeypatch):
    """Behind a jump host (here the same sshd, reached through itself), every node's connection goes
    through one shared SSH connection to it; when that drops during a handshake, the open is tried once
    more on a new one instead of failing every node at once."""
    import dataclasses

    from lab.host import ssh

    jump = dataclasses.replace(endpoint, node="jump")
    behind = dataclasses.replace(endpoint, node="behind", jump=jump)
    real_channel_to = ssh.channel_to
    opened = []

    def drops_the_first_time(jump_endpoint, host, port, timeout=None):
        channel = real_channel_to(jump_endpoint, host, port, timeout)
        opened.append(channel)
        if len(opened) == 1:
            channel.get_transport().close()  # the shared jump connection dies under the handshake
        return channel

    monkeypatch.setattr(ssh, "channel_to", drops_the_first_time)
    result = ssh.run(behind, "echo through the jump", timeout=60)
    assert result.ok and result.stdout.strip() == "through the jump"
    assert len(opened) == 2 and opened[0].get_transport() is not opened[1].get_transport()
