"""The update agent's roll back when the lab's only etcd is what broke: it goes back first and
publishes the halt from the slot it went back to (lab/node/updater.py, on fixed inputs)."""

from __future__ import annotations

import json

from lab.node import layout, updater


class FlakyEtcd:
    def __init__(self) -> None:
        self.up = False
        self.data: dict[str, str] = {}

    def put(self, key: str, value: str) -> None:
        if not self.up:
            raise ConnectionError("no etcd endpoint answered")
        self.data[key] = value


def agent(monkeypatch, tmp_path, etcd) -> updater.Updater:
    monkeypatch.setattr(layout, "BOOT_FILE", tmp_path / "boot.json")
    monkeypatch.setattr(updater, "os_version", lambda: "2-broken")
    agent = object.__new__(updater.Updater)
    agent.node, agent.strategy, agent.max_holders, agent.ab_disk = "node-1", "etcd-lock", 1, False
    agent.etcd = etcd
    agent.reboots = 0
    agent.log = lambda message: None
    agent.publish = lambda state, **extra: etcd.put(f"{layout.NODE_UPDATES}node-1", state)
    agent.release_if_holding = lambda: None
    agent.health_check = lambda: (False, "etcd failed to start")
    agent.reboot = lambda: setattr(agent, "reboots", agent.reboots + 1)
    return agent


def test_a_one_member_lab_rolls_back_first_and_halts_after(monkeypatch, tmp_path):
    etcd = FlakyEtcd()
    node = agent(monkeypatch, tmp_path, etcd)
    updater.write_boot({"slot": "a", "try": True, "previous": "b", "staging": 1.0})
    node.settle_boot()                  # the broken slot's own etcd is down: nothing can be published
    assert node.reboots == 1 and layout.HALTED not in etcd.data
    boot = json.loads(layout.BOOT_FILE.read_text())
    assert boot["slot"] == "b" and boot["halt_pending"] and boot["rolled_back_from"] == "2-broken"
    etcd.up = True                      # back on slot b: etcd runs
    node.settle_boot()
    assert json.loads(etcd.data[layout.HALTED])["version"] == "2-broken"
    assert "halt_pending" not in json.loads(layout.BOOT_FILE.read_text())
    assert etcd.data[f"{layout.NODE_UPDATES}node-1"] == "idle" and node.reboots == 1


def test_with_etcd_up_the_halt_is_published_before_the_reboot(monkeypatch, tmp_path):
    etcd = FlakyEtcd()
    etcd.up = True
    node = agent(monkeypatch, tmp_path, etcd)
    updater.write_boot({"slot": "a", "try": True, "previous": "b"})
    node.settle_boot()
    assert node.reboots == 1 and layout.HALTED in etcd.data
    assert "halt_pending" not in json.loads(layout.BOOT_FILE.read_text())
    assert etcd.data[f"{layout.NODE_UPDATES}node-1"] == "rolling-back"
