"""After the failed roll: every node runs version 1 and a healthy etcd."""


def test_runs_version_1(host):
    assert 'VERSION_ID="1"' in host.file("/usr/lib/os-release").content_string


def test_etcd_and_agents_run(host):
    assert host.service("etcd").is_running
    assert host.service("lab-agent").is_running and host.service("lab-update").is_running
