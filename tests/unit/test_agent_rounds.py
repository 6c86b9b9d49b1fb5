"""What one round of the scheduler agent asks of etcd: an idle round a keepalive and one read, no write.

The agent's logic against an in-memory etcd and a recorded systemctl (the
real agent on real nodes and etcd is tests/real/nodes/test_scheduler.py).
Under software emulation the old rounds (two writes and seven reads per
node per second) kept three VMs' CPUs busy and starved etcd.
"""

from __future__ import annotations

import json
import subprocess

import pytest

from lab.node import agent as agent_module
from lab.node import layout

UNIT = "[Service]\nExecStart=/bin/sleep infinity\n"


class MemoryEtcd:
    """The calls the agent makes, on a dict; every call is recorded by name."""

    def __init__(self) -> None:
        self.kv: dict[str, str] = {}
        self.leases: dict[str, set[str]] = {}
        self.calls: list[str] = []
        self._next = 100

    def get_prefix(self, prefix: str) -> dict[str, str]:
        self.calls.append("range")
        return {k: v for k, v in self.kv.items() if k.startswith(prefix)}

    def get(self, key: str) -> str | None:
        self.calls.append("range")
        return self.kv.get(key)

    def put(self, key: str, value: str, lease: str | None = None) -> None:
        self.calls.append("put")
        self.kv[key] = value
        if lease:
            self.leases[lease].add(key)

    def delete(self, key: str) -> None:
        self.calls.append("delete")
        self.kv.pop(key, None)

    def create_if_absent(self, key: str, value: str, lease: str) -> bool:
        self.calls.append("txn")
        if key in self.kv:
            return False
        self.put(key, value, lease)
        self.calls.pop()
        return True

    def grant(self, ttl: int) -> str:
        self.calls.append("grant")
        self._next += 1
        self.leases[str(self._next)] = set()
        return str(self._next)

    def keepalive(self, lease: str) -> int:
        self.calls.append("keepalive")
        return 5 if lease in self.leases else 0

    def expire(self, lease: str) -> None:
        for key in self.leases.pop(lease):
            self.kv.pop(key, None)

    def writes(self) -> list[str]:
        return [c for c in self.calls if c in ("put", "delete", "txn", "grant")]


@pytest.fixture
def node(tmp_path, monkeypatch):
    """An agent whose node is tmp_path: its unit directory, drain flag and managed list there."""
    monkeypatch.setattr(layout, "UNIT_DIR", tmp_path / "units")
    monkeypatch.setattr(layout, "MANAGED", tmp_path / "agent-units.json")
    monkeypatch.setattr(layout, "DRAIN_FLAG", tmp_path / "draining")
    machine_id = tmp_path / "machine-id"
    machine_id.write_text("m1\n")
    monkeypatch.setattr(layout, "MACHINE_ID", machine_id)
    (tmp_path / "units").mkdir()
    active: dict[str, str] = {}
    ran: list[list[str]] = []

    def systemctl(*args: str) -> subprocess.CompletedProcess:
        ran.append(list(args))
        if args[0] == "start":
            active[args[-1]] = "active"
        if args[0] == "show":
            names = list(args[args.index("--") + 1:])
            out = "\n\n".join(f"Id={n}\nActiveState={active.get(n, 'inactive')}\nSubState=x\nLoadState=loaded"
                              for n in names)
            return subprocess.CompletedProcess(args, 0, out + "\n", "")
        return subprocess.CompletedProcess(args, 0, "", "")

    monkeypatch.setattr(agent_module, "systemctl", systemctl)
    monkeypatch.setattr(agent_module, "machine_has_unit", lambda name: False)
    etcd = MemoryEtcd()
    monkeypatch.setattr(agent_module, "Etcd", lambda *a, **k: etcd)
    agent = agent_module.Agent({"name": "node-1", "ip": "10.0.0.11", "endpoints": ["http://10.0.0.11:2379"]})
    agent.log = lambda message: None
    return agent, etcd, ran


def test_an_idle_round_is_a_keepalive_and_one_read(node):
    agent, etcd, ran = node
    agent.tick()  # the first: lease, registration, engine election
    assert etcd.writes() == ["grant", "put", "txn"]
    assert etcd.kv[f"{layout.ENGINE}"] == "m1"
    etcd.calls.clear()
    for _ in range(5):
        agent.tick()
    assert etcd.calls == ["keepalive", "range"] * 5
    assert ran == []  # no unit: no systemctl either


def test_a_unit_is_placed_started_and_reported_in_one_round_then_left_alone(node):
    agent, etcd, ran = node
    agent.tick()
    etcd.kv[f"{layout.UNITS}hello.service"] = json.dumps({"name": "hello.service", "text": UNIT,
                                                          "desired": "launched"})
    etcd.calls.clear()
    agent.tick()
    assert etcd.kv[f"{layout.SCHEDULE}hello.service"] == "m1"
    assert ["start", "--no-block", "hello.service"] in ran
    state = json.loads(etcd.kv[f"{layout.STATES}hello.service/m1"])
    assert state == {"active": "active", "sub": "x", "load": "loaded", "machine": "m1"}
    assert (agent_module.layout.UNIT_DIR / "hello.service").read_text() == UNIT
    etcd.calls.clear()
    ran.clear()
    agent.tick()
    assert etcd.calls == ["keepalive", "range"]
    assert [r[0] for r in ran] == ["show"]  # one systemctl for every unit of the machine


def test_keys_gone_with_an_expired_lease_are_written_again(node):
    agent, etcd, ran = node
    agent.tick()
    etcd.kv[f"{layout.UNITS}hello.service"] = json.dumps({"name": "hello.service", "text": UNIT,
                                                          "desired": "launched"})
    agent.tick()
    etcd.expire(agent.lease)  # machine key, engine key and unit state go with it
    etcd.calls.clear()
    agent.tick()
    assert etcd.kv[f"{layout.MACHINES}m1"] and etcd.kv[layout.ENGINE] == "m1"
    assert f"{layout.STATES}hello.service/m1" in etcd.kv
    assert etcd.writes() == ["grant", "put", "txn", "put"]


def test_a_machine_key_deleted_by_someone_else_is_written_again(node):
    agent, etcd, _ = node
    agent.tick()
    del etcd.kv[f"{layout.MACHINES}m1"]
    agent.tick()
    assert json.loads(etcd.kv[f"{layout.MACHINES}m1"])["name"] == "node-1"


def test_unit_states_matches_blocks_by_id_and_says_nothing_when_systemctl_fails(monkeypatch):
    shown = ("Id=b.service\nActiveState=failed\nSubState=failed\nLoadState=loaded\n\n"
             "Id=a.service\nActiveState=active\nSubState=running\nLoadState=loaded\n")
    monkeypatch.setattr(agent_module, "systemctl", lambda *args: subprocess.CompletedProcess(args, 0, shown, ""))
    states = agent_module.unit_states(["a.service", "b.service"])
    assert states["a.service"]["active"] == "active" and states["b.service"]["active"] == "failed"
    assert agent_module.unit_states([]) == {}
    monkeypatch.setattr(agent_module, "systemctl", lambda *args: subprocess.CompletedProcess(args, 1, "", "timeout"))
    assert agent_module.unit_states(["a.service"]) == {"a.service": None}


def test_when_systemctl_does_not_answer_nothing_is_started_or_reported(node, monkeypatch):
    agent, etcd, ran = node
    agent.tick()
    etcd.kv[f"{layout.UNITS}hello.service"] = json.dumps({"name": "hello.service", "text": UNIT,
                                                          "desired": "launched"})
    monkeypatch.setattr(agent_module, "systemctl", lambda *args: subprocess.CompletedProcess(args, 1, "", "busy"))
    agent.tick()
    assert f"{layout.STATES}hello.service/m1" not in etcd.kv


def test_a_restarted_agent_writes_its_machine_key_under_its_own_lease(node):
    """The key its previous run left lives under that run's lease, which ends soon: written again."""
    agent, etcd, _ = node
    agent.tick()
    old_lease = agent.lease
    again = agent_module.Agent(dict(agent.config))
    again.log = lambda message: None
    etcd.calls.clear()
    again.tick()
    assert again.lease != old_lease and "put" in etcd.calls
    etcd.expire(old_lease)
    again.tick()
    assert f"{layout.MACHINES}m1" in etcd.kv


def test_an_agent_that_is_not_the_engine_schedules_nothing(node):
    agent, etcd, _ = node
    etcd.kv[layout.ENGINE] = "someone-else"
    etcd.kv[f"{layout.UNITS}hello.service"] = json.dumps({"name": "hello.service", "text": UNIT,
                                                          "desired": "launched"})
    agent.tick()
    assert not any(k.startswith(layout.SCHEDULE) for k in etcd.kv)
    assert "txn" not in etcd.calls  # an engine exists: no election attempt
