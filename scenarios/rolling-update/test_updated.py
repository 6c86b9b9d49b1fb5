"""After the roll: every node runs Lab OS 2 from its new slot, with its state kept."""

import json


def test_runs_version_2(host):
    assert 'VERSION_ID="2"' in host.file("/usr/lib/os-release").content_string


def test_version_2_brought_its_package_and_notes(host):
    assert host.exists("jq")
    assert "Lab OS 2" in host.file("/usr/lib/labos/release-notes").content_string


def test_boots_from_a_confirmed_slot(host):
    boot = json.loads(host.file("/etc/lab/boot.json").content_string)
    assert boot["slot"] == "b" and not boot.get("try")


def test_usr_is_still_read_only(host):
    assert host.run("touch /usr/lab-write-test").rc != 0


def test_etcd_kept_its_data_and_membership(host, etcdctl):
    listed = etcdctl("member list -w json")
    assert listed.rc == 0, listed.stderr
    members = json.loads(listed.stdout)["members"]
    assert len(members) == 3
    assert host.service("etcd").is_running and host.service("lab-agent").is_running
