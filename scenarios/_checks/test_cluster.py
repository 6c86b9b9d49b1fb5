"""After the faults: every node runs a healthy etcd member of one cluster."""

import json

PKI = "/etc/etcd/pki"


def etcdctl(host, args):
    """etcdctl against the node's own member, with the lab's certificates when TLS is on."""
    if host.file(f"{PKI}/node.crt").exists:
        flags = (f"--endpoints=https://127.0.0.1:2379 --cacert={PKI}/ca.crt "
                 f"--cert={PKI}/node.crt --key={PKI}/node.key")
    else:
        flags = "--endpoints=http://127.0.0.1:2379"
    return host.run(f"ETCDCTL_API=3 etcdctl {flags} {args}")


def test_etcd_runs(host):
    assert host.service("etcd").is_running


def test_member_is_healthy(host):
    result = etcdctl(host, "endpoint health")
    assert result.rc == 0 and "is healthy" in result.stdout + result.stderr, result.stderr


def test_every_member_is_started(host):
    members = json.loads(etcdctl(host, "member list -w json").stdout)["members"]
    assert len(members) >= 3
    assert all(m.get("name") for m in members), "a member that never started has no name"


def test_member_agrees_on_a_leader(host):
    status = json.loads(etcdctl(host, "endpoint status -w json").stdout)[0]["Status"]
    assert status["leader"] != 0
