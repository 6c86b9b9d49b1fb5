"""A checkout cannot point lab at the host: a symlinked `.lab`, a lab directory
of another user, or a forged state.json naming paths and host-wide names that
are not this lab's all stop the command before anything is touched.
(The same through the real CLI as root, with a real victim bridge, lives in
tests/real/nodes/test_hostile.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lab.core.lab import Lab
from lab.core.state import LabState
from lab.errors import StateError
from lab.host.network import lab_id
from lab.model.spec import Override


def open_lab(project: Path) -> Lab:
    return Lab.open(project / "lab.yaml", [Override(("provider",), "nspawn", "--provider")])


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_lab_env: None) -> Path:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    directory = tmp_path / "project"
    directory.mkdir()
    (directory / "lab.yaml").write_text("name: etc\n")
    return directory


def test_a_symlinked_labs_directory_is_refused_and_its_target_survives(project, tmp_path):
    victim = tmp_path / "victim"
    (victim / "etc").mkdir(parents=True)
    (victim / "etc" / "passwd").write_text("root:x:0:0\n")
    (project / ".lab").symlink_to(victim)
    with pytest.raises(StateError, match="is a symlink"):
        open_lab(project).destroy()
    assert (victim / "etc" / "passwd").read_text() == "root:x:0:0\n"


def test_a_symlinked_lab_directory_is_refused(project, tmp_path):
    (tmp_path / "victim").mkdir()
    (project / ".lab").mkdir()
    (project / ".lab" / "etc").symlink_to(tmp_path / "victim")
    with pytest.raises(StateError, match="is a symlink"):
        open_lab(project)
    assert (tmp_path / "victim").is_dir()


def forged(project: Path, *resources: dict) -> Path:
    lab_dir = project / ".lab" / "etc"
    lab_dir.mkdir(parents=True)
    (lab_dir / "state.json").write_text(json.dumps({
        "version": 1, "name": "etc", "provider": "nspawn", "subnet": "10.77.9.0/24", "nodes": ["node-1"],
        "resources": list(resources)}))
    return lab_dir


@pytest.mark.parametrize("resource, fragment", [
    ({"kind": "node", "id": "node-1", "dir": "/"}, "dir '/' is outside"),
    ({"kind": "node", "id": "node-1", "dir": "{lab}/nodes/../../../../victim"}, "is outside"),
    ({"kind": "node", "id": "node-1", "supervisor_pid": 1}, "not a process id"),
    ({"kind": "node", "id": "../../x"}, "not a node name"),
    ({"kind": "node", "id": "node-1", "supervisor_pid": 4242, "supervisor_start": "$(reboot)"}, "not a process start"),
    ({"kind": "libvirt-volume", "id": "etc-{id}-node-1.img", "pool": "images"}, "pool 'images' is not default"),
    ({"kind": "mount", "id": "/usr"}, "is outside"),
    ({"kind": "bridge", "id": "docker0"}, "not one of this lab's names"),
    ({"kind": "nftables", "id": "filter"}, "not one of this lab's names"),
    ({"kind": "cgroup", "id": "/sys/fs/cgroup/memory/system.slice"}, "not one of this lab's cgroups"),
    ({"kind": "cgroup", "id": "/sys/fs/cgroup/memory/../cpu/lab-{id}-x"}, "not one of this lab's cgroups"),
    ({"kind": "libvirt-domain", "id": "production-db"}, "not one of this lab's names"),
    ({"kind": "libvirt-network", "id": "default", "shared": True}, "not one of this lab's names"),
    ({"kind": "rm-rf", "id": "/"}, "unknown kind 'rm-rf'"),
    ("not a record", "not a resource record"),
])
def test_a_forged_state_file_stops_the_command(project, resource, fragment):
    lab_dir = (project / ".lab" / "etc").absolute()
    ident = lab_id(lab_dir)
    if isinstance(resource, dict):
        resource = {k: v.replace("{lab}", str(lab_dir)).replace("{id}", ident) if isinstance(v, str) else v
                    for k, v in resource.items()}
    forged(project, resource)
    with pytest.raises(StateError, match="refusing to act on a state that is not this lab's") as info:
        open_lab(project)
    assert fragment in info.value.message


def test_this_labs_own_resources_pass(project):
    lab_dir = (project / ".lab" / "etc").absolute()
    ident = lab_id(lab_dir)
    forged(project,
           {"kind": "bridge", "id": f"lab-{ident}"}, {"kind": "nftables", "id": f"lab_{ident}"},
           {"kind": "node", "id": "node-1", "dir": f"{lab_dir}/nodes/node-1", "supervisor_pid": 4242,
            "supervisor_start": "123456"},
           {"kind": "mount", "id": f"{lab_dir}/nodes/node-1/merged"},
           {"kind": "cgroup", "id": f"/sys/fs/cgroup/memory/lab/lab-{ident}-node-1"},
           {"kind": "libvirt-domain", "id": f"etc-{ident}-node-1"},
           {"kind": "libvirt-network", "id": "vagrant-libvirt", "shared": True})
    assert open_lab(project).created


@pytest.mark.parametrize("section, value", [("nodes", 5), ("nodes", ["../x"]), ("addresses", ["10.0.0.1"]),
                                            ("subnet", "nowhere"), ("partition", "all"), ("provider", None),
                                            ("etcd", {"tls": "yes"}), ("etcd", {"joined": "x"}), ("etcd", {"joined": {"node-3": {"cluster": 5}}}),
                                            ("etcd", {"initial_cluster": 5}), ("image", {"name": "labos"}),
                                            ("image", {"rootfs": "/"}), ("image", {"rootfs": "/usr/../etc/rootfs"})])
def test_a_state_section_of_the_wrong_type_stops_the_command(project, section, value):
    lab_dir = project / ".lab" / "etc"
    lab_dir.mkdir(parents=True)
    (lab_dir / "state.json").write_text(json.dumps({"version": 1, "name": "etc", "resources": [], section: value}))
    with pytest.raises(StateError, match=f"{section}[:.]"):
        open_lab(project)


@pytest.mark.parametrize("text", ["[]", "\"state\"", "{\"version\": 1, \"resources\": {}}", "{tru"])
def test_a_state_file_that_is_not_a_state_is_one_clear_error(project, text):
    lab_dir = project / ".lab" / "etc"
    lab_dir.mkdir(parents=True)
    (lab_dir / "state.json").write_text(text)
    with pytest.raises(StateError):
        LabState.load(lab_dir)


def test_what_etcd_bootstrap_records_passes(project):
    """The etcd section exactly as a lab with an added node records it."""
    lab_dir = project / ".lab" / "etc"
    lab_dir.mkdir(parents=True)
    (lab_dir / "state.json").write_text(json.dumps({"version": 1, "name": "etc", "resources": [], "etcd": {
        "initial_cluster": {"node-1": "10.77.236.11", "node-2": "10.77.236.12"},
        "joined": {"node-3": {"cluster": {"node-1": "10.77.236.11", "node-2": "10.77.236.12",
                                          "node-3": "10.77.236.13"}}},
        "tls": True, "token": "lab-e5c7ec-d37d525c"}}))
    assert open_lab(project).created
