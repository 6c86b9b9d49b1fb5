"""etcd on real nodes: bootstrap, TLS, membership, re-runs, failures.

Every test talks to a real etcd cluster on real nspawn nodes, through lab's
client, the host's etcdctl and etcdctl on the nodes over SSH. The shared
cluster has the default spec, so TLS with client-certificate auth; one lab
of its own runs `etcd.tls: false`.
"""

from __future__ import annotations

import os
import re
import shutil
import ssl
import subprocess
import sys

import pytest

from lab.cluster.etcd_bootstrap import EtcdBootstrap
from lab.cluster.remote import BootstrapError
from lab.core.lab import Lab
from lab.cluster.etcdclient import EtcdClient
from lab.errors import UsageError
from lab.host.pki import LabPki
from lab.model.spec import Override
from lab.node import layout

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


def on_node(lab: Lab, node: str, command: str):
    from lab.host.ssh import run

    return run(lab.ssh_endpoints()[node], command, timeout=20)


def etcdctl_on(lab: Lab, node: str, args: str) -> str:
    """etcdctl on a node against its own member, with the member's certificate on a TLS lab."""
    pki = layout.NODE_PKI_DIR
    flags = (f"--endpoints=https://127.0.0.1:2379 --cacert={pki}/ca.crt --cert={pki}/node.crt --key={pki}/node.key"
             if lab.spec.etcd.tls else "--endpoints=http://127.0.0.1:2379")
    result = on_node(lab, node, f"ETCDCTL_API=3 etcdctl {flags} {args}")
    assert result.ok, result.stderr
    return result.stdout.strip()


def run_cli(directory, *args: str, **environ: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lab.cli", *args], cwd=directory, capture_output=True, text=True,
                          timeout=300, env={**os.environ, **environ})


def assert_one_clean_error(result: subprocess.CompletedProcess, *expected: str) -> None:
    assert result.returncode != 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    for text in expected:
        assert text in result.stderr, result.stderr


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
    client = EtcdClient([dead, *live], tls=cluster.etcd_client().tls, timeout=1.0)
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
def test_nodes_boot_with_etcd_and_the_agents_in_place_as_ssh_would_leave_them(cluster):
    """`lab up` writes etcd's and the agents' files into new nspawn nodes before they boot (no SSH round
    trip): enabled as `systemctl enable` does, owned by the node's own users. The re-run test below
    shows the SSH path then finds every file's content already right."""
    from lab.host.ssh import run_many

    endpoints = list(cluster.ssh_endpoints().values())
    command = (f"systemctl is-enabled etcd {layout.AGENT_SERVICE} {layout.UPDATE_SERVICE}; "
               f"stat -c '%U %a %n' {layout.NODE_PKI_DIR}/node.key /etc/default/etcd /etc/docker/daemon.json "
               f"{layout.AGENT_CONFIG}")
    for result in run_many(endpoints, command):
        assert result.ok, result.stderr
        assert result.stdout.split() == [
            "enabled", "enabled", "enabled",
            "etcd", "600", f"{layout.NODE_PKI_DIR}/node.key", "root", "644", "/etc/default/etcd",
            "root", "644", "/etc/docker/daemon.json", "root", "644", str(layout.AGENT_CONFIG)], result.node


@needs_nodes
def test_every_node_has_a_uid_range_of_its_own(cluster):
    """Kernel quotas charged per uid (kernel.keys.maxkeys: 200 keys, one per systemd service start and
    Docker container) must not be shared by the nodes: one range for a whole lab ran out of keys at
    13 nodes (16 keys each after boot)."""
    from pathlib import Path

    bases = []
    for status in cluster.status():
        init = int(status.detail.split()[-1])  # "init pid N"
        first, base, count = Path(f"/proc/{init}/uid_map").read_text().split()[:3]
        assert first == "0" and int(base) > 0 and int(count) == 65536, status.name
        bases.append(int(base))
    assert len(set(bases)) == len(bases) == 3


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
def test_etcdctl_check_perf_runs_through_the_labs_tls_endpoints(cluster):
    """The host's etcdctl reaches the lab with `lab etcdctl`'s settings and runs etcd's own benchmark.
    Its PASS or FAIL is a speed verdict for bench/ (bench/run.py etcd prints it): on a shared 2-core
    host under load it fails a correct cluster, so this test only checks that it measured."""
    if shutil.which("etcdctl") is None:
        pytest.skip("etcdctl not installed on the host (apt-get install etcd-client)")
    env = {**os.environ, **cluster.etcdctl_env()}
    result = subprocess.run(["etcdctl", "check", "perf", "--load=s"], env=env, capture_output=True, text=True,
                            timeout=150)
    verdicts = re.findall(r"(?:PASS|FAIL): [^\r\n]*", result.stdout)  # after a progress bar on the same line
    print("\n".join(verdicts))
    assert any(" Throughput" in verdict for verdict in verdicts), result.stdout[-2000:] + result.stderr[-2000:]


def refused(call) -> bool:
    """Whether etcd turned the request away: a failed TLS handshake, or an answer that is not a success."""
    import httpx

    try:
        response = call()
    except (httpx.HTTPError, ssl.SSLError, OSError):
        return True
    return response.status_code != 200 or response.json().get("health") not in (None, "true")


@needs_nodes
def test_tls_is_the_default_and_members_refuse_clients_without_a_lab_certificate(cluster, tmp_path):
    import httpx

    assert cluster.spec.etcd.tls and cluster.state["etcd"]["tls"] is True
    rows = cluster.etcd_status()
    assert all(r.healthy and r.endpoint.startswith("https://") for r in rows)
    pki = LabPki(cluster.lab_dir / "pki")
    for key in (pki.ca_key, pki.client.key, *(pki.node(r.node).key for r in rows)):
        assert key.stat().st_mode & 0o777 == 0o600, key
    ca = ssl.create_default_context(cafile=str(pki.ca))
    ip = rows[0].endpoint.split("//")[1].rsplit(":", 1)[0]
    # The server verifies against the lab CA, but without a client certificate nothing gets through:
    # not /health, not the KV API, not the peer port.
    assert refused(lambda: httpx.get(f"https://{ip}:2379/health", verify=ca, timeout=5))
    assert refused(lambda: httpx.post(f"https://{ip}:2379/v3/kv/range", json={"key": "YQ=="}, verify=ca, timeout=5))
    assert refused(lambda: httpx.get(f"https://{ip}:2380/members", verify=ca, timeout=5))
    # Plain HTTP to a TLS port is refused too.
    assert refused(lambda: httpx.get(f"http://{ip}:2379/health", timeout=5))
    assert refused(lambda: httpx.post(f"http://{ip}:2379/v3/kv/range", json={"key": "YQ=="}, timeout=5))
    # A certificate of another CA (another lab's) is refused.
    other = LabPki(tmp_path / "other-pki")
    other.ensure("other", {})
    stranger = ssl.create_default_context(cafile=str(pki.ca))
    stranger.load_cert_chain(str(other.client.cert), str(other.client.key))
    assert refused(lambda: httpx.get(f"https://{ip}:2379/health", verify=stranger, timeout=5))
    if shutil.which("curl"):
        plain = subprocess.run(["curl", "-sS", "--max-time", "5", "--cacert", str(pki.ca),
                                f"https://{ip}:2379/health"], capture_output=True, text=True)
        assert plain.returncode != 0 or '"health":"true"' not in plain.stdout, plain.stdout
        # ...and curl with the lab's client certificate gets in.
        good = subprocess.run(["curl", "-sS", "--max-time", "5", "--cacert", str(pki.ca), "--cert",
                               str(pki.client.cert), "--key", str(pki.client.key), f"https://{ip}:2379/health"],
                              capture_output=True, text=True)
        assert '"health":"true"' in good.stdout, good.stdout + good.stderr
    client = cluster.etcd_client()
    client.put("/lab/test/tls", "secure")
    assert client.get("/lab/test/tls") == "secure"
    if shutil.which("etcdctl"):
        env = {**os.environ, **cluster.etcdctl_env()}
        out = subprocess.run(["etcdctl", "get", "--print-value-only", "/lab/test/tls"], env=env,
                             capture_output=True, text=True, timeout=30)
        assert out.stdout.strip() == "secure", out.stderr


@needs_nodes
def test_agents_registered_over_tls_and_the_scheduler_elected_an_engine(cluster):
    import json

    client = cluster.etcd_client()
    machines = {json.loads(v)["name"] for v in client.get_prefix(layout.MACHINES).values()}
    assert machines == {"node-1", "node-2", "node-3"}
    assert client.get(layout.ENGINE)
    for node in machines:
        config = json.loads(on_node(cluster, node, f"cat {layout.AGENT_CONFIG}").stdout)
        assert config["tls"] and all(url.startswith("https://") for url in config["endpoints"])
        assert on_node(cluster, node, f"systemctl is-active {layout.AGENT_SERVICE} {layout.UPDATE_SERVICE}").ok


@needs_nodes
def test_a_tls_lab_whose_spec_now_says_plain_http_gives_one_clear_error(cluster):
    flipped = Lab.open(cluster.loaded.path, [Override(("nodes", "count"), 3, "--nodes"),
                                             Override(("etcd", "tls"), False, "--set etcd.tls")])
    with pytest.raises(UsageError) as raised:
        flipped.etcd_status()
    assert "created with etcd.tls: true" in raised.value.message and "etcd.tls back to true" in raised.value.hint
    result = run_cli(cluster.loaded.project_dir, "status", LAB_SPEC__ETCD__TLS="false")
    assert_one_clean_error(result, "created with etcd.tls: true", "etcd.tls: false", "lab destroy")


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
def test_a_plain_http_lab_warns_and_refuses_a_spec_that_turns_tls_on(tmp_path):
    import httpx

    from lab.images.build import build_image

    build_image("labos", "1")
    lab = open_lab(tmp_path, nodes=1, etcd__tls=False)
    try:
        messages: list[str] = []
        lab.up(messages.append)
        warnings = [m for m in messages if "etcd.tls is false" in m]
        assert len(warnings) == 1 and "every local user" in warnings[0]
        assert lab.state["etcd"]["tls"] is False and not (lab.lab_dir / "pki").exists()
        row = lab.etcd_status()[0]
        assert row.healthy and row.endpoint.startswith("http://")
        assert httpx.get(f"{row.endpoint}/health", timeout=5).json()["health"] == "true"
        assert "is healthy" in etcdctl_on(lab, "node-1", "endpoint health 2>&1")
        # The spec flips to the default (TLS): status and up stop with one message naming the fix.
        (tmp_path / "lab.yaml").write_text("provider: nspawn\nnodes:\n  count: 1\n")
        for verb in ("status", "up"):
            result = run_cli(tmp_path, verb)
            assert_one_clean_error(result, "created with etcd.tls: false", "etcd.tls: true",
                                   "etcd.tls back to false", "lab destroy")
        assert httpx.get(f"{row.endpoint}/health", timeout=5).json()["health"] == "true"  # untouched
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
