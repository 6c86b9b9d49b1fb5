"""Host paths a Windows laptop hands to Vagrant and ssh: drive letters and backslashes, written with `/`.

The inputs are PureWindowsPath values, as a WindowsPath on Windows would be;
nothing here needs Windows.
"""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath, PureWindowsPath

import pytest

from lab.host.ssh import SSHEndpoint, config_path, render_ssh_config
from lab.providers.vagrant.render import render_vagrantfile, ruby_path, vagrant_host_path
from lab.testing import contexts

WINDOWS_PROJECT = PureWindowsPath(r"C:\Users\Dev User\work\project")
WINDOWS_LAB = WINDOWS_PROJECT / ".lab" / "lab"


@pytest.mark.parametrize("host, rendered", [
    ("src", "../../src"),
    (r".\src\app", "../../src/app"),
    (r"src\app\..\lib", "../../src/lib"),
    (r"..\shared", "../../../shared"),
    (r"C:\data\lab files", "C:/data/lab files"),
    ("D:/data", "D:/data"),
    (r"\\fileserver\share\lab", "//fileserver/share/lab"),
    (r"~\src", "~/src"),
])
def test_a_windows_synced_folder_is_written_with_forward_slashes(host: str, rendered: str) -> None:
    assert vagrant_host_path(host, WINDOWS_PROJECT, WINDOWS_LAB) == rendered


def test_a_posix_synced_folder_keeps_what_it_was() -> None:
    project = PurePosixPath("/home/dev/project")
    lab = project / ".lab" / "lab"
    assert vagrant_host_path("./src", project, lab) == "../../src"
    assert vagrant_host_path("/srv/shared", project, lab) == "/srv/shared"
    assert vagrant_host_path("~/src", project, lab) == "~/src"
    # On Linux a backslash is a character of a file name, not a separator.
    assert vagrant_host_path("odd\\name", project, lab) == "../../odd\\name"


def test_a_vagrantfile_rendered_on_windows_has_no_backslash_path() -> None:
    data = {"name": "lab", "synced_folders": [
        {"host": r"src\app", "guest": "/app"},
        {"host": r"C:\Users\Dev User\data#1", "guest": "/data", "outside_project": True},
    ]}
    context = contexts.make_context(WINDOWS_PROJECT.parent, data, lab_id="c0ffee", subnet="192.168.56.0/24")
    assert context.lab_dir == WINDOWS_LAB
    text = render_vagrantfile(context, "virtualbox")
    folders = re.findall(r"^  config\.vm\.synced_folder (.*)$", text, re.M)
    assert folders == ['".", "/vagrant", disabled: true',
                       '"../../src/app", "/app", disabled: false',
                       # `#` escaped as everywhere: no Ruby interpolation from a path either
                       '"C:/Users/Dev User/data\\#1", "/data", disabled: false']


def test_ruby_path_is_a_forward_slash_ruby_string() -> None:
    assert ruby_path(PureWindowsPath(r"C:\Users\dev\project\.lab\lab\ssh\id_ed25519")) == \
        '"C:/Users/dev/project/.lab/lab/ssh/id_ed25519"'
    assert ruby_path(PurePosixPath("/home/dev/.lab/key")) == '"/home/dev/.lab/key"'


def test_ssh_config_names_windows_keys_with_forward_slashes() -> None:
    ssh_dir = WINDOWS_LAB / "ssh"
    endpoint = SSHEndpoint(node="node-1", host="192.168.56.11", port=22, user="root",
                           identity_file=ssh_dir / "id_ed25519", known_hosts=ssh_dir / "known_hosts")
    text = render_ssh_config([endpoint])
    assert '  IdentityFile "C:/Users/Dev User/work/project/.lab/lab/ssh/id_ed25519"' in text
    assert '  UserKnownHostsFile "C:/Users/Dev User/work/project/.lab/lab/ssh/known_hosts"' in text
    assert "\\" not in text
    assert config_path(Path("/home/dev/key")) == "/home/dev/key"


def test_windows_ssh_gets_no_control_path(monkeypatch: pytest.MonkeyPatch) -> None:
    from lab.host import ssh

    monkeypatch.setattr(ssh.sys, "platform", "win32")  # Windows' OpenSSH has no multiplexing
    assert ssh.control_path("c0ffee") is None
