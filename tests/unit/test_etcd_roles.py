"""etcd members and workers without nodes: how many members a spec makes, which nodes they are, what a
lab recorded before roles existed means, the agents' endpoints, a worker's gateway files, the role of an
added node, the state's check of the members list, and the scenario targets members, workers, followers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lab.cluster.etcd_bootstrap import (GATEWAY_DROPIN_TEXT, MEMBER, WORKER, EtcdMember, agent_endpoints,
                                        gateway_environment, member_names, members, new_node_role, roles)
from lab.core.state import LabState, section_problems
from lab.errors import LabError, SpecError, StateError
from lab.model.spec import LabSpec, default_members, default_yaml, load_spec
from lab.scenarios.faults import FaultInjector
from lab.scenarios.model import Fault
from lab.testing.contexts import make_context
from lab.testing.fake import FakeProvider

pytestmark = pytest.mark.usefixtures("no_lab_env")


def context(count: int, members_wanted: int | None = None, tls: bool = True, state: LabState | None = None):
    data = {"nodes": {"count": count}, "etcd": {"tls": tls}}
    if members_wanted is not None:
        data["etcd"]["members"] = members_wanted
    made = make_context(Path("/nonexistent"), data, lab_id="r0r0r0", subnet="10.77.9.0/24")
    made.state = state
    return made


# ---------------------------------------------------------------- the spec


@pytest.mark.parametrize(("nodes", "expected"), [(1, 1), (2, 2), (3, 3), (4, 4), (5, 5), (6, 3), (9, 3), (64, 3)])
def test_every_node_is_a_member_up_to_five_nodes_then_three(nodes, expected):
    assert default_members(nodes) == expected
    assert LabSpec.model_validate({"nodes": {"count": nodes}}).etcd_member_count() == expected


def test_an_explicit_member_count_wins_and_never_exceeds_the_nodes(tmp_path):
    spec = LabSpec.model_validate({"nodes": {"count": 5}, "etcd": {"members": 3}})
    assert spec.etcd_member_count() == 3 and spec.etcd_member_count(9) == 3 and spec.etcd_member_count(2) == 2
    # More members than nodes (a scenario's `nodes: 3` over a spec written for a bigger lab): every node.
    (tmp_path / "lab.yaml").write_text("nodes:\n  count: 3\netcd:\n  members: 4\n")
    assert load_spec(tmp_path / "lab.yaml", [], environ={}).spec.etcd_member_count() == 3
    (tmp_path / "lab.yaml").write_text("etcd:\n  members: 0\n")
    with pytest.raises(SpecError, match="etcd.members"):
        load_spec(tmp_path / "lab.yaml", [], environ={})


def test_lab_init_says_how_many_members_a_lab_has_by_default(tmp_path):
    text = default_yaml()
    assert "# members: 3" in text and "every node up to 5 nodes, else 3" in text and "127.0.0.1:2379" in text
    (tmp_path / "lab.yaml").write_text(text)
    assert load_spec(tmp_path / "lab.yaml", [], environ={}).spec.etcd.members is None  # commented: the default


# ---------------------------------------------------------------- who is a member


def test_a_lab_not_created_yet_takes_the_first_nodes_as_members():
    assert member_names(context(3)) == ["node-1", "node-2", "node-3"]
    assert member_names(context(9)) == ["node-1", "node-2", "node-3"]
    assert roles(context(5, members_wanted=3)) == {"node-1": MEMBER, "node-2": MEMBER, "node-3": MEMBER,
                                                    "node-4": WORKER, "node-5": WORKER}
    assert [m.node for m in members(context(5, members_wanted=3))] == ["node-1", "node-2", "node-3"]


def test_the_state_decides_for_a_lab_and_a_lab_recorded_before_roles_is_all_members(tmp_path):
    state = LabState(tmp_path, {"version": 1, "resources": [], "etcd": {"tls": True, "token": "t"}})
    # A lab made before nodes had roles: every node is a member, whatever the spec says now.
    assert member_names(context(9, state=state)) == [f"node-{i}" for i in range(1, 10)]
    state.data["etcd"]["members"] = ["node-4", "node-1", "node-2"]
    assert member_names(context(5, state=state)) == ["node-1", "node-2", "node-4"]  # node order
    assert roles(context(5, state=state))["node-3"] == WORKER


def test_agents_use_their_own_member_first_or_the_workers_local_gateway():
    lab = context(5, members_wanted=3)
    ips = lab.addresses
    assert agent_endpoints(lab, "node-2") == [f"https://{ips['node-2']}:2379", f"https://{ips['node-1']}:2379",
                                              f"https://{ips['node-3']}:2379"]
    assert agent_endpoints(lab, "node-4") == ["https://127.0.0.1:2379"]
    assert agent_endpoints(context(5, members_wanted=3, tls=False), "node-5") == ["http://127.0.0.1:2379"]


def test_a_workers_gateway_forwards_to_every_member_starting_from_its_own_turn():
    cluster = [EtcdMember(f"node-{i}", f"10.0.0.1{i}", True) for i in (1, 2, 3)]
    assert gateway_environment(0, cluster).endswith(
        "ETCD_GATEWAY_ENDPOINTS=10.0.0.11:2379,10.0.0.12:2379,10.0.0.13:2379\n")
    assert gateway_environment(4, cluster).endswith(
        "ETCD_GATEWAY_ENDPOINTS=10.0.0.12:2379,10.0.0.13:2379,10.0.0.11:2379\n")
    # etcd.service becomes the gateway: not Type=notify (the gateway never notifies), on 127.0.0.1 only.
    assert "Type=simple\nExecStart=\nExecStart=/usr/bin/etcd gateway start --listen-addr=127.0.0.1:2379 " \
           "--endpoints=${ETCD_GATEWAY_ENDPOINTS} --retry-delay=1s\n" in GATEWAY_DROPIN_TEXT


@pytest.mark.parametrize(("count", "members_wanted", "members_now", "expected"), [
    (3, None, 3, MEMBER),   # 4 nodes: still every node a member, as `lab node add` always did
    (5, None, 5, WORKER),   # 6 nodes: 3 members wanted, there are 5
    (5, 3, 3, WORKER),
    (5, 3, 2, MEMBER),      # a member was removed: the next node fills its place
])
def test_an_added_node_is_a_member_until_the_lab_has_the_members_it_wants(count, members_wanted, members_now,
                                                                         expected):
    spec = context(count, members_wanted).spec
    assert new_node_role(spec, members_now, count + 1) == expected


def test_the_state_refuses_a_members_list_that_is_not_node_names():
    assert section_problems({"etcd": {"members": ["node-1", "node-2"]}}) == []
    for bad in ([], ["../x"], "node-1", [1]):
        assert section_problems({"etcd": {"members": bad}}), bad


def test_a_state_with_a_forged_members_list_is_refused_on_load(tmp_path):
    (tmp_path / "state.json").write_text(json.dumps({"version": 1, "resources": [], "etcd": {"members": ["/"]}}))
    with pytest.raises(StateError, match="etcd"):
        LabState.load(tmp_path)


# ---------------------------------------------------------------- scenario targets


class LeaderIs:
    def __init__(self, leader: str | None) -> None:
        self._leader = leader

    def leader(self):
        return self._leader, 7


def injector(count: int, members_wanted: int | None, leader: str | None = "node-2") -> FaultInjector:
    lab = context(count, members_wanted)
    return FaultInjector(FakeProvider(lab), lab, LeaderIs(leader), clock=lambda: 0.0)


def test_members_workers_leader_and_followers_resolve_by_role():
    faults = injector(5, 3)
    assert faults.targets("members") == ["node-1", "node-2", "node-3"]
    assert faults.targets("workers") == ["node-4", "node-5"]
    assert faults.targets("leader") == ["node-2"]
    assert faults.targets("followers") == ["node-1", "node-3"]  # workers follow no one
    assert faults.targets("all") == [f"node-{i}" for i in range(1, 6)]
    assert faults.partition_groups("workers") == [["node-4", "node-5"], ["node-1", "node-2", "node-3"]]


def test_workers_of_a_lab_without_any_is_a_clear_error():
    faults = injector(3, None)
    assert faults.targets("followers") == ["node-1", "node-3"]
    with pytest.raises(LabError, match="no workers"):
        faults.targets("workers")


@pytest.mark.parametrize("target", ["members", "workers", "followers", "leader"])
def test_the_scenario_format_accepts_the_role_targets(target):
    assert Fault(action="kill", target=target).target == target
    assert Fault.model_validate({"action": "partition", "target": target}).target == target


# ---------------------------------------------------------------- what `lab up` records


def test_a_new_lab_records_its_members_and_shows_each_nodes_role(tmp_path, monkeypatch):
    from lab.core import up as up_module
    from lab.core.lab import Lab
    from lab.model.spec import Override
    from lab.testing.fake import fake_provider

    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.chdir(tmp_path)
    with fake_provider("nspawn"):
        lab = Lab.open(tmp_path / "lab.yaml", [Override(("provider",), "nspawn", "--provider"),
                                                Override(("nodes", "count"), 6, "--nodes")])
        assert lab.roles() == {f"node-{i}": MEMBER if i <= 3 else WORKER for i in range(1, 7)}  # not created yet
        up_module.run_steps(up_module.UpRun(lab=lab, progress=lambda _m: None, new_lab=True),
                            up_module.up_steps(bootstrap=False))
        state = json.loads((lab.lab_dir / "state.json").read_text())
        assert state["etcd"] == {"tls": True, "members": ["node-1", "node-2", "node-3"]}
        # The state decides from now on: a spec asking for every node as a member changes no role.
        again = Lab.open(tmp_path / "lab.yaml", [Override(("nodes", "count"), 6, "--nodes"),
                                                 Override(("etcd", "members"), 6, "--set etcd.members")])
        assert [n for n, r in again.roles().items() if r == WORKER] == ["node-4", "node-5", "node-6"]
        lab.destroy()


# ---------------------------------------------------------------- the node's client behind a gateway


def test_the_nodes_client_drops_a_connection_that_answered_an_error():
    """Behind a worker's gateway a connection stays with the member it reached: one that answers errors
    (a member cut off from the others) must not keep the client, so the next request opens a new one."""
    import http.server
    import threading

    from lab.node.etcd import Etcd

    connections: list[int] = []

    class Member(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as etcd's gateway forwards it

        def setup(self):
            super().setup()
            connections.append(self.client_address[1])

        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            body = b'{"error":"etcdserver: no leader"}' if len(connections) == 1 else b'{"kvs":[]}'
            self.send_response(503 if len(connections) == 1 else 200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Member)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        client = Etcd([f"http://127.0.0.1:{server.server_port}"], None, timeout=2.0)
        with pytest.raises(ConnectionError, match="503"):
            client.get("/a")
        assert client.get("/a") is None and client.get("/b") is None
        assert len(connections) == 2  # a new connection after the error, then kept alive
        client.close()
    finally:
        server.shutdown()
        server.server_close()


def test_a_member_change_whose_answer_was_lost_is_settled_by_the_member_list_not_sent_again():
    from lab.cluster.etcd_bootstrap import EtcdBootstrap
    from lab.cluster.etcdclient import EtcdUnknown

    sent: list[str] = []

    def add() -> None:
        sent.append("add")
        raise EtcdUnknown("https://10.77.78.12:2379: no answer to cluster/member/add (ReadTimeout)")

    assert EtcdBootstrap._reconfigure(add, applied=lambda: True) is None
    assert sent == ["add"]


def test_a_member_change_that_did_not_apply_is_tried_again_then_its_error_stands():
    from lab.cluster.etcd_bootstrap import EtcdBootstrap
    from lab.cluster.etcdclient import EtcdUnknown

    sent: list[str] = []

    def add() -> None:
        sent.append("add")
        raise EtcdUnknown("no answer to cluster/member/add (ReadTimeout)")

    with pytest.raises(EtcdUnknown):
        EtcdBootstrap._reconfigure(add, applied=lambda: False, timeout=0.6)
    assert len(sent) >= 2


def test_reconfiguration_waits_as_long_as_etcd_itself_would():
    from lab.cluster.etcd_bootstrap import EtcdBootstrap

    bootstrap = EtcdBootstrap.__new__(EtcdBootstrap)
    bootstrap.context = context(3)
    assert bootstrap._reconfigure_timeout() == 5.0 + 2 * bootstrap.context.spec.etcd.election_timeout_ms / 1000
