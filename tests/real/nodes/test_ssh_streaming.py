"""run_with_input, the stream `lab update` writes a VM's slot through, against a real sshd on loopback
(lab.testing.loopback_sshd): what arrives is what was sent, the command's words and exit come back, a
command that stops reading is noticed, and a cancel (Ctrl-C) closes the session within a second whether
the node is reading slowly or busy after its input ended. wait_for_ssh, against the same sshd behind a port
that delays its greeting: a node slow to greet is waited for; one that never does is named."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import os
import socket
import threading
import time

import pytest

from lab.errors import ProviderError
from lab.host.ssh import Cancelled, SSHEndpoint, run_with_input, wait_for_ssh
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


@contextlib.contextmanager
def greeting_delayed_by(seconds: float | None, port: int, then_silent: bool = False):
    """A loopback port in front of the sshd whose greeting reaches the client `seconds` late (None: never):
    a node too loaded to fork and exec its sshd at once. `then_silent`: the greeting, then nothing more."""
    listener = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []

    def relay(source: socket.socket, target: socket.socket, delay: float, first_line_only: bool = False) -> None:
        time.sleep(delay)
        try:
            if first_line_only:
                greeting = b""
                while not greeting.endswith(b"\n"):
                    greeting += source.recv(1)
                target.sendall(greeting)
                return  # both ends stay open: the client waits for a key exchange that never comes
            while data := source.recv(65536):
                target.sendall(data)
        except OSError:
            pass
        finally:
            if not first_line_only:
                for end in (source, target):
                    with contextlib.suppress(OSError):
                        end.shutdown(socket.SHUT_RDWR)  # wakes the other relay's recv: a close alone does not
                    end.close()

    def serve() -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            accepted.append(client)
            if seconds is None:
                continue  # accepted, never answered
            server = socket.create_connection(("127.0.0.1", port))
            threading.Thread(target=relay, args=(client, server, 0), daemon=True).start()
            threading.Thread(target=relay, args=(server, client, seconds, then_silent), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield listener.getsockname()[1], accepted
    finally:
        listener.shutdown(socket.SHUT_RDWR)  # wakes the accept: a close alone leaves it on a reusable fd number
        listener.close()
        for client in accepted:
            client.close()


def peer_closed(client: socket.socket) -> bool:
    """Whether the other end closed: what it sent (paramiko's own greeting) read, then the end of it."""
    try:
        client.settimeout(0)
        while client.recv(65536):
            pass
        return True
    except BlockingIOError:
        return False  # open, and silent
    except OSError:
        return True  # closed here by the relay, on hearing the other end close


def relayed(endpoint: SSHEndpoint, port: int, tmp_path, through_jump: bool) -> SSHEndpoint:
    """The endpoint at another port of the same sshd (its host key listed there too), reached directly or
    through the sshd itself as a jump host."""
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(endpoint.known_hosts.read_text().replace(f"]:{endpoint.port} ", f"]:{port} "))
    jump = dataclasses.replace(endpoint, node="jump") if through_jump else None
    return dataclasses.replace(endpoint, port=port, known_hosts=known_hosts, jump=jump)


@pytest.mark.parametrize("through_jump", [False, True], ids=["direct", "through-a-jump-host"])
def test_a_node_slow_to_greet_is_waited_for_not_abandoned_every_two_seconds(endpoint, tmp_path, through_jump):
    # Before, each try gave the greeting 2 s: a node that took longer was never reached (CI, 2026-12-03,
    # through a jump host).
    with greeting_delayed_by(4.0, endpoint.port) as (port, accepted):
        wait_for_ssh(relayed(endpoint, port, tmp_path, through_jump), time.monotonic() + 60)
        assert len(accepted) == 1  # the first try waited


@pytest.mark.parametrize("through_jump", [False, True], ids=["direct", "through-a-jump-host"])
def test_a_node_that_never_greets_is_named_with_the_tries_it_had(endpoint, tmp_path, through_jump):
    with greeting_delayed_by(None, endpoint.port) as (port, accepted):
        with pytest.raises(ProviderError, match=r"loop: did not answer SSH on 127\.0\.0\.1:\d+ in time \(\d tr(y|ies) in "
                                                r"\d s: \dx Error reading SSH protocol banner\)\n  fix: a hint"):
            wait_for_ssh(relayed(endpoint, port, tmp_path, through_jump), time.monotonic() + 4, hint="a hint")
        # every try's connection was closed when it was given up, not left to the sshd's LoginGraceTime
        time.sleep(0.5)
        assert all(peer_closed(client) for client in accepted)


@pytest.mark.parametrize("through_jump", [False, True], ids=["direct", "through-a-jump-host"])
def test_a_try_given_up_mid_negotiation_closes_its_connection(endpoint, tmp_path, through_jump):
    """paramiko goes on with a negotiation its caller gave up: the node's sshd kept each such try's
    connection until its LoginGraceTime, and with enough of them (MaxStartups) dropped new ones."""
    with greeting_delayed_by(0, endpoint.port, then_silent=True) as (port, accepted):
        with pytest.raises(ProviderError, match=r"loop: did not answer SSH .*: 1x no SSH session within 5 s \(the "
                                                r"node greeted, the key exchange did not finish\)"):
            wait_for_ssh(relayed(endpoint, port, tmp_path, through_jump), time.monotonic() + 4)
        time.sleep(0.5)
        assert len(accepted) == 1 and peer_closed(accepted[0])


def test_the_transport_log_keeps_paramikos_account_of_the_block_only(endpoint, tmp_path):
    import logging

    from lab.host.ssh import run, transport_log

    log = tmp_path / "ssh.log"
    level = logging.getLogger("paramiko").level
    with transport_log(log):
        assert run(endpoint, "true", timeout=30).ok
    run(endpoint, "true", timeout=30)  # after the block: not logged
    assert log.read_text().count("Authentication (publickey) successful") == 1
    assert logging.getLogger("paramiko").level == level
