"""The wait before a member's etcd starts (lab/node/etcd_prestart.py): the order of first starts, the
readiness probe against a real local HTTP server, and that nothing it meets keeps etcd from starting.
A real lab's members start in that order in tests/real/nodes (every `lab up`)."""

from __future__ import annotations

import http.server
import threading
import time

import pytest

from lab.node import etcd_prestart

CLUSTER = "node-1=https://10.77.3.11:2380,node-2=https://10.77.3.12:2380,node-3=https://10.77.3.13:2380"


@pytest.mark.parametrize("own, before", [
    ("https://10.77.3.11:2380", []),
    ("https://10.77.3.12:2380", ["https://10.77.3.11:2380"]),
    ("https://10.77.3.13:2380", ["https://10.77.3.11:2380", "https://10.77.3.12:2380"]),
    ("https://10.77.3.99:2380", []),  # not listed (a broken file): waits for nobody
])
def test_a_member_waits_for_the_members_listed_before_it(own, before):
    assert etcd_prestart.earlier_peers(CLUSTER, own) == before


def test_own_address_is_up_when_it_can_be_bound():
    assert etcd_prestart.own_address_up("127.0.0.1")
    assert not etcd_prestart.own_address_up("192.0.2.1")  # TEST-NET-1: never on this host


@pytest.fixture
def http_server():
    class Quiet(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b'{"etcdserver":"3.4.23"}')

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_a_peer_that_answers_serves(http_server):
    assert etcd_prestart.serves(http_server, None)


def test_a_peer_that_listens_but_does_not_answer_is_not_serving_yet():
    import socket

    with socket.socket() as listening:  # etcd asking its own peers: the port accepts, nothing answers
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        started = time.monotonic()
        assert not etcd_prestart.serves(f"http://127.0.0.1:{listening.getsockname()[1]}", None)
        assert time.monotonic() - started < 2


def test_a_first_start_waits_for_the_earlier_member_then_returns(http_server, tmp_path, monkeypatch):
    monkeypatch.setattr(etcd_prestart, "PEERS_WAIT", 3.0)
    environ = {"ETCD_INITIAL_ADVERTISE_PEER_URLS": "http://127.0.0.1:1",
               "ETCD_INITIAL_CLUSTER": f"node-1={http_server},node-2=http://127.0.0.1:1",
               "ETCD_DATA_DIR": str(tmp_path)}
    started = time.monotonic()
    etcd_prestart.main(environ)
    assert time.monotonic() - started < 2.5  # node-1 answered: not the 3 s bound


def test_waits_are_bounded_and_a_member_with_data_waits_for_no_peer(tmp_path, monkeypatch):
    monkeypatch.setattr(etcd_prestart, "PEERS_WAIT", 2.0)
    monkeypatch.setattr(etcd_prestart, "OWN_ADDRESS_WAIT", 0.2)
    environ = {"ETCD_INITIAL_ADVERTISE_PEER_URLS": "http://192.0.2.2:2380",  # never up here
               "ETCD_INITIAL_CLUSTER": "node-1=http://127.0.0.1:1,node-2=http://192.0.2.2:2380",
               "ETCD_DATA_DIR": str(tmp_path)}
    started = time.monotonic()
    etcd_prestart.main(environ)  # the earlier member refuses: waited for until the bound
    assert 2.0 <= time.monotonic() - started < 4.0
    (tmp_path / "member").mkdir()
    started = time.monotonic()
    etcd_prestart.main(environ)
    assert time.monotonic() - started < 1.5  # the own-address wait (0.2 s) only, not the peers' 2 s


def test_a_member_joining_a_running_cluster_waits_for_no_peer(tmp_path, monkeypatch):
    monkeypatch.setattr(etcd_prestart, "PEERS_WAIT", 2.0)
    environ = {"ETCD_INITIAL_ADVERTISE_PEER_URLS": "http://127.0.0.1:1",
               "ETCD_INITIAL_CLUSTER": "node-1=http://127.0.0.1:2,node-4=http://127.0.0.1:1",  # node-1 refuses
               "ETCD_INITIAL_CLUSTER_STATE": "existing", "ETCD_DATA_DIR": str(tmp_path)}
    started = time.monotonic()
    etcd_prestart.main(environ)
    assert time.monotonic() - started < 1.5  # not the peers' 2 s
