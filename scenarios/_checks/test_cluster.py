"""After the faults: every node reaches one healthy etcd cluster, through its own member or (a worker)
through its local etcd gateway on 127.0.0.1:2379: the same unit and the same checks answer on both.

`host` is testinfra's; `etcdctl` runs etcdctl on the node with the lab's
certificates when TLS is on (lab.scenarios.checks_plugin).
"""

import json


def test_etcd_runs(host):
    assert host.service("etcd").is_running


def test_member_is_healthy(etcdctl):
    result = etcdctl("endpoint health")
    assert result.rc == 0 and "is healthy" in result.stdout + result.stderr, result.stderr


def test_every_member_is_started(etcdctl):
    members = json.loads(etcdctl("member list -w json").stdout)["members"]
    assert len(members) >= 3
    assert all(m.get("name") for m in members), "a member that never started has no name"


def test_member_agrees_on_a_leader(etcdctl):
    status = json.loads(etcdctl("endpoint status -w json").stdout)[0]["Status"]
    assert status["leader"] != 0
