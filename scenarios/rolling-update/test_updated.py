"""After the roll: every node runs the version staged for it, from its new slot, with its state kept.

The roll goes to whichever version the lab did not run (1 to 2, or 2 back to
1), so the checks read what was staged for the node from etcd instead of
naming a version.
"""

import json


def staged_for(host, etcdctl) -> dict:
    # update.json: the update agent's configuration, on every provider's nodes (node.json is nspawn's)
    node = json.loads(host.file("/etc/lab/update.json").content_string)["name"]
    got = etcdctl(f"get --print-value-only /lab/update/staged/{node}")
    assert got.rc == 0 and got.stdout.strip(), got.stderr
    return json.loads(got.stdout)


def os_version(host) -> str:
    fields = dict(line.split("=", 1) for line in host.file("/usr/lib/os-release").content_string.splitlines()
                  if "=" in line)
    return fields["VERSION_ID"].strip('"')


def test_runs_the_version_staged_for_it_from_a_confirmed_slot(host, etcdctl):
    staged = staged_for(host, etcdctl)
    boot = json.loads(host.file("/etc/lab/boot.json").content_string)
    assert os_version(host) == staged["version"]
    assert boot["slot"] == staged["slot"] and not boot.get("try")


def test_the_versions_own_files_came_with_it(host, etcdctl):
    # Version 2 adds jq and release notes; back on 1 they are gone: /usr is the slot's, not a mix.
    on_2 = staged_for(host, etcdctl)["version"] == "2"
    assert host.exists("jq") == on_2
    assert host.file("/usr/lib/labos/release-notes").exists == on_2


def test_usr_is_still_read_only(host):
    assert host.run("touch /usr/lab-write-test").rc != 0


def test_etcd_kept_its_data_and_membership(host, etcdctl):
    listed = etcdctl("member list -w json")
    assert listed.rc == 0, listed.stderr
    members = json.loads(listed.stdout)["members"]
    assert len(members) == 3
    assert host.service("etcd").is_running and host.service("lab-agent").is_running
