"""The etcd configuration each member is started with (pure: fixed input, no nodes)."""

from __future__ import annotations

from lab.cluster.etcd_bootstrap import EtcdMember, etcd_environment


def test_etcd_environment_is_static_and_ordered():
    cluster = [EtcdMember("node-2", "10.0.0.12", False), EtcdMember("node-1", "10.0.0.11", False)]
    text = etcd_environment(cluster[1], cluster, "tok", 100, 1000)
    assert "ETCD_NAME=node-1\n" in text
    assert "ETCD_INITIAL_CLUSTER=node-1=http://10.0.0.11:2380,node-2=http://10.0.0.12:2380\n" in text
    assert "ETCD_INITIAL_CLUSTER_STATE=new\n" in text
    assert "ETCD_LISTEN_CLIENT_URLS=http://10.0.0.11:2379,http://127.0.0.1:2379\n" in text
    assert "ETCD_HEARTBEAT_INTERVAL=100\nETCD_ELECTION_TIMEOUT=1000\n" in text
    assert "CERT" not in text


def test_etcd_environment_with_tls_turns_on_client_certificate_auth():
    member = EtcdMember("node-1", "10.0.0.11", True)
    text = etcd_environment(member, [member], "tok", 50, 500, cluster_state="existing")
    assert "https://10.0.0.11:2380" in text
    assert "ETCD_CLIENT_CERT_AUTH=true" in text and "ETCD_PEER_CLIENT_CERT_AUTH=true" in text
    assert "ETCD_INITIAL_CLUSTER_STATE=existing" in text
