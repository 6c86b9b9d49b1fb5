"""etcd on real nodes: bootstrap, TLS, membership, re-runs, failures.

Every test talks to a real etcd cluster on real nspawn nodes, through lab's
client, the host's etcdctl and etcdctl on the nodes over SSH.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from lab.cluster.etcd_bootstrap import EtcdBootstrap
from lab.cluster.remote import BootstrapError
from lab.core.lab import Lab
from lab.cluster.etcdclient import EtcdClient, EtcdError
from lab.model.spec import Override

needs_nodes = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("systemd-nspawn") is None,
                                 reason="needs root and systemd-nspawn")


# ---------------------------------------------------------------- real clusters


def open_lab(directory, nodes=3, **values) -> Lab:
    overrides = [Override(("nodes", "count"), nodes, "--nodes"), Override(("provider",), "nspawn", "--provider")]
    overrides += [Override(tuple(k.split("__")), v, f"--set {k}") for k, v in values.items()]
    return Lab.open(directory / "lab.yaml", overrides)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if os.geteuid() != 0 or shutil.which("systemd-nspawn") is None:
        pytest.skip("needs root and systemd-nspawn")
    from lab.images.build import build_image

    build_image("labos", "1")
    lab = open_lab(tmp_path_factory.mktemp("etcd"))
    try:
        lab.up()
        yield lab
    finally:
        lab.destroy()


def etcdctl_on(lab: Lab, node: str, args: str) -> str:
    from lab.host.ssh import run

    result = run(lab.ssh_endpoints()[node], f"ETCDCTL_API=3 etcdctl --endpoints=http://127.0.0.1:2379 {args}",
                 timeout=20)
    assert result.ok, result.stderr
    return result.stdout.strip()


@needs_nodes
def test_every_member_is_healthy_with_exactly_one_leader(cluster):
    rows = cluster.etcd_status()
    assert [r.node for r in rows] == ["node-1", "node-2", "node-3"]
    assert all(r.healthy for r in rows)
    assert sum(r.leader for r in rows) == 1
    assert len({r.raft_term for r in rows}) == 1


@needs_nodes
def test_a_put_on_one_node_is_read_on_the_others(cluster):
    etcdctl_on(cluster, "node-1", "put /lab/test/greeting hello-from-node-1")
    for node in ("node-2", "node-3"):
        assert etcdctl_on(cluster, node, "get --print-value-only /lab/test/greeting") == "hello-from-node-1"


@needs_nodes
def test_client_fails_over_past_a_dead_endpoint(cluster):
    live = [m.endpoint for m in cluster.etcd_status()]
    dead = live[0].rsplit(":", 1)[0].rsplit(".", 1)[0] + ".250:2379"  # an unused address of the lab subnet
    client = EtcdClient([dead, *live], timeout=1.0)
    client.put("/lab/test/failover", "ok")
    assert client.get("/lab/test/failover") == "ok"


@needs_nodes
def test_compare_and_set_only_applies_on_the_expected_value(cluster):
    client = cluster.etcd_client()
    client.delete("/lab/test/register")
    assert client.compare_and_set("/lab/test/register", None, "1")
    assert not client.compare_and_set("/lab/test/register", None, "2")
    assert not client.compare_and_set("/lab/test/register", "7", "2")
    assert client.compare_and_set("/lab/test/register", "1", "2")
    assert client.get("/lab/test/register") == "2"


@needs_nodes
def test_running_up_again_changes_nothing(cluster):
    from lab.host.ssh import run_many

    endpoints = list(cluster.ssh_endpoints().values())
    pids = [r.stdout for r in run_many(endpoints, "systemctl show -p MainPID --value etcd")]
    terms = [r.raft_term for r in cluster.etcd_status()]
    messages: list[str] = []
    cluster.up(messages.append)
    assert "etcd: configuration unchanged" in messages
    assert [r.stdout for r in run_many(endpoints, "systemctl show -p MainPID --value etcd")] == pids
    assert [r.raft_term for r in cluster.etcd_status()] == terms


@needs_nodes
def test_etcdctl_check_perf_small_load_passes(cluster):
    if shutil.which("etcdctl") is None:
        pytest.skip("etcdctl not installed on the host (apt-get install etcd-client)")
    env = {**os.environ, **cluster.etcdctl_env()}
    result = subprocess.run(["etcdctl", "check", "perf", "--load=s"], env=env, capture_output=True, text=True,
                            timeout=150)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "PASS: Throughput" in result.stdout


@needs_nodes
def test_membership_add_then_remove_keeps_the_cluster_healthy(cluster):
    cluster.etcd_client().put("/lab/test/before-join", "written-by-3")
    new = cluster.node_add()
    assert new == "node-4"
    rows = cluster.etcd_status()
    assert [r.node for r in rows] == ["node-1", "node-2", "node-3", "node-4"]
    assert all(r.healthy for r in rows)
    assert etcdctl_on(cluster, "node-4", "get --print-value-only /lab/test/before-join") == "written-by-3"
    cluster.node_remove("node-4")
    assert [m["name"] for m in cluster.etcd_client().members()].count("node-4") == 0
    rows = cluster.etcd_status()
    assert [r.node for r in rows] == ["node-1", "node-2", "node-3"] and all(r.healthy for r in rows)


@needs_nodes
def test_tls_lab_refuses_clients_without_certificates(tmp_path):
    import httpx

    from lab.images.build import build_image

    build_image("labos", "1")
    lab = open_lab(tmp_path, nodes=1, etcd__tls=True)
    try:
        lab.up()
        row = lab.etcd_status()[0]
        assert row.healthy and row.endpoint.startswith("https://")
        pki = lab.lab_dir / "pki"
        assert all((pki / name).stat().st_mode & 0o777 == 0o600 for name in ("ca.key", "client.key", "node-1.key"))
        # The server certificate verifies against the lab CA, but no client certificate: refused.
        with pytest.raises((httpx.HTTPError, EtcdError)):
            import ssl

            verify = ssl.create_default_context(cafile=str(pki / "ca.crt"))
            response = httpx.post(f"{row.endpoint}/v3/kv/range", json={"key": "YQ=="}, verify=verify)
            if response.status_code != 200:
                raise EtcdError(response.text)
        client = lab.etcd_client()
        client.put("/lab/test/tls", "secure")
        assert client.get("/lab/test/tls") == "secure"
        if shutil.which("etcdctl"):
            env = {**os.environ, **lab.etcdctl_env()}
            out = subprocess.run(["etcdctl", "get", "--print-value-only", "/lab/test/tls"], env=env,
                                 capture_output=True, text=True, timeout=30)
            assert out.stdout.strip() == "secure", out.stderr
    finally:
        lab.destroy()


@needs_nodes
def test_a_node_whose_etcd_cannot_start_gives_a_clear_bootstrap_error(tmp_path):
    from lab.images.build import build_image
    from lab.host.ssh import run

    build_image("labos", "1")
    lab = open_lab(tmp_path, nodes=1)
    try:
        lab.up(bootstrap=False)
        context = lab.context("nspawn")
        endpoint = lab.ssh_endpoints()["node-1"]
        ip = context.addresses["node-1"]
        # Something else already holds etcd's peer port.
        assert run(endpoint, f"systemd-run --unit=squatter python3 -m http.server 2380 --bind {ip}").ok
        run(endpoint, f"for i in $(seq 50); do ss -ltn | grep -q {ip}:2380 && break; sleep 0.1; done")
        with pytest.raises(BootstrapError) as raised:
            EtcdBootstrap(context, lab.ssh_endpoints()).run(timeout=30)
        message = raised.value.message
        assert "node-1" in message
        assert "failed to start" in message or "address already in use" in message
    finally:
        lab.destroy()
