"""After the failed roll: no node runs the broken version, each boots a confirmed slot, etcd is healthy.

Which version the nodes run is the scenario's `final_version: previous`
(the one each ran before the roll), checked from outside.
"""

import json


def test_does_not_run_the_broken_version(host):
    assert 'VERSION_ID="2-broken"' not in host.file("/usr/lib/os-release").content_string


def test_boots_a_confirmed_slot(host):
    boot = host.file("/etc/lab/boot.json")  # absent on a node that never rolled: its first slot, confirmed
    assert not boot.exists or not json.loads(boot.content_string).get("try")


def test_etcd_and_agents_run(host):
    assert host.service("etcd").is_running
    assert host.service("lab-agent").is_running and host.service("lab-update").is_running
