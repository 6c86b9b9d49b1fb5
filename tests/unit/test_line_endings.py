"""A Windows clone (core.autocrlf=true) must not ship CRLF into nodes or images.

Two guards: `.gitattributes` keeps the shipped files LF in every checkout
(checked with git itself), and every point where lab sends a file to a node
or writes one into an image makes text LF (`lab.host.files.to_lf`). The
second is exercised here on a copy of the tree turned CRLF, as a checkout
that ignored the attributes has it, through the real shipping functions
with a temporary directory standing in for the node or the image.
"""

from __future__ import annotations

import io
import os
import pwd
import shutil
import stat
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

from lab.testing.crlf import crlf_copy as copy_as_crlf

from lab.host.files import to_lf

REPO = Path(__file__).resolve().parents[2]
# What lab ships to nodes or into images, as trees of the checkout.
SHIPPED_TREES = ("boxes", "scenarios", "lab/node")
SHIPPED_FILES = ("Vagrantfile.j2", ".ci/run", *(str(p.relative_to(REPO)) for p in (REPO / "tools").glob("*.sh")))


def is_text(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return b"\0" not in data


def shipped_paths() -> list[str]:
    """Every file of the shipped trees on disk (tracked or not, so a new file is covered too)."""
    found = [str(path.relative_to(REPO)) for tree in SHIPPED_TREES for path in sorted((REPO / tree).rglob("*"))
             if path.is_file() and "__pycache__" not in path.parts]
    return found + list(SHIPPED_FILES)


def crlf_copy(source: Path, target: Path) -> Path:
    """`source` as a Windows clone with core.autocrlf=true has it: every text file CRLF, modes kept."""
    return copy_as_crlf(source, target, is_text)


def assert_all_lf(root: Path) -> None:
    # The checkout's files, not git's own: a compressed object may hold the bytes CR LF by chance.
    with_cr = [str(p.relative_to(root)) for p in sorted(root.rglob("*"))
               if ".git" not in p.relative_to(root).parts and p.is_file() and not p.is_symlink()
               and b"\r\n" in p.read_bytes()]
    assert not with_cr, f"CRLF shipped: {with_cr}"


# ---------------------------------------------------------------- the helper


@pytest.mark.parametrize("data, expected", [
    (b"[Unit]\r\nDescription=x\r\n", b"[Unit]\nDescription=x\n"),
    (b"already\nlf\n", b"already\nlf\n"),
    ("caf\u00e9\r\n".encode(), "caf\u00e9\n".encode()),
    (b"\x7fELF\0\0\r\n\x01", b"\x7fELF\0\0\r\n\x01"),       # a NUL byte: binary, untouched
    (b"\xff\xfe\r\n\x80", b"\xff\xfe\r\n\x80"),              # not UTF-8: binary, untouched
    (b"", b""),
], ids=["crlf", "lf", "utf-8", "nul", "not-utf-8", "empty"])
def test_to_lf_changes_text_only(data, expected):
    assert to_lf(data) == expected


# ---------------------------------------------------------------- .gitattributes


def git(*argv: str, cwd: Path) -> str:
    # No user or system config: the test sees only what it sets (and git's defaults).
    env = {"PATH": os.environ["PATH"], "HOME": str(cwd), "GIT_CONFIG_NOSYSTEM": "1",
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    return subprocess.run(["git", *argv], cwd=cwd, env=env, capture_output=True, text=True, check=True,
                          timeout=60).stdout


def test_gitattributes_keep_every_shipped_file_lf():
    paths = shipped_paths()
    assert len(paths) > 50 and "lab/node/agent.py" in paths and "boxes/labos/recipe.yaml" in paths
    answers = git("check-attr", "eol", "--", *paths, cwd=REPO).splitlines()
    not_lf = [line for line in answers if not line.endswith(": eol: lf")]
    assert len(answers) == len(paths) and not not_lf, "\n".join(not_lf)


def test_gitattributes_mark_disk_images_binary():
    answers = git("check-attr", "text", "--", "x.qcow2", "x.box", "x.tar.gz", "x.png", cwd=REPO).splitlines()
    assert all(line.endswith(": text: unset") for line in answers), answers


def test_a_clone_with_autocrlf_checks_out_the_shipped_files_lf(tmp_path):
    """The attributes win over core.autocrlf=true; without them the same clone is CRLF (the control)."""
    def clone_of(attributes: bool) -> Path:
        origin = tmp_path / f"origin-{attributes}"
        for path in shipped_paths():
            target = origin / path
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / path, target)
        if attributes:
            shutil.copy2(REPO / ".gitattributes", origin / ".gitattributes")
        git("init", "-q", cwd=origin)
        git("add", "-A", cwd=origin)
        git("commit", "-q", "-m", "tree", cwd=origin)
        clone = tmp_path / f"clone-{attributes}"
        git("-c", "core.autocrlf=true", "clone", "-q", "-c", "core.autocrlf=true", str(origin), str(clone),
            cwd=tmp_path)
        return clone

    assert_all_lf(clone_of(attributes=True))
    with pytest.raises(AssertionError, match="CRLF shipped"):
        assert_all_lf(clone_of(attributes=False))


# ---------------------------------------------------------------- files copied into images


@pytest.fixture
def crlf_boxes(tmp_path, monkeypatch) -> Path:
    """boxes/ turned CRLF, found by the recipe loader where it looks for boxes/."""
    from lab.images import recipes

    boxes = crlf_copy(REPO / "boxes", tmp_path / "crlf" / "boxes")
    monkeypatch.setattr(recipes, "resource", lambda name: boxes if name == "boxes" else None)
    return boxes


@pytest.mark.parametrize("version, flavor", [("1", "container"), ("2-broken", "vm")])
def test_an_image_built_from_a_crlf_checkout_gets_lf_files(crlf_boxes, tmp_path, version, flavor):
    from lab.images import build
    from lab.images.recipes import load_recipe

    recipe = load_recipe("labos", version, flavor=flavor)  # recipe.yaml itself is CRLF too
    rootfs = tmp_path / "rootfs"
    overlays = [recipe.overlay, recipe.version_overlay, recipe.vm_overlay]
    for overlay in [o for o in overlays if o is not None]:
        build._copy_overlay(overlay, rootfs)  # what the build does after debootstrap
    copied = [p for p in rootfs.rglob("*") if p.is_file()]
    assert len(copied) >= 10
    assert_all_lf(rootfs)
    script = rootfs / "usr/lib/labos/cgroups-writable"
    assert script.read_bytes() == (REPO / "boxes/labos/rootfs/usr/lib/labos/cgroups-writable").read_bytes()
    assert stat.S_IMODE(script.stat().st_mode) == stat.S_IMODE((crlf_boxes / "labos/rootfs/usr/lib/labos/"
                                                                "cgroups-writable").stat().st_mode)


def test_a_binary_in_a_recipe_is_copied_untouched(tmp_path):
    from lab.images import build

    overlay = tmp_path / "overlay"
    (overlay / "usr/bin").mkdir(parents=True)
    binary = b"\x7fELF\x02\x01\x01\0\0\r\n\r\n\xff" * 100
    (overlay / "usr/bin/tool").write_bytes(binary)
    build._copy_overlay(overlay, tmp_path / "rootfs")
    assert (tmp_path / "rootfs/usr/bin/tool").read_bytes() == binary


def test_a_crlf_checkout_names_the_same_image(crlf_boxes, monkeypatch):
    """The image key hashes the recipe as the build copies it (LF): both checkouts share one image."""
    from lab.images import recipes
    from lab.images.cache import image_key

    crlf_keys = [image_key("labos", "1"), image_key("labos", "2", "vm")]
    monkeypatch.setattr(recipes, "resource", lambda name: REPO / name)
    assert crlf_keys == [image_key("labos", "1"), image_key("labos", "2", "vm")]


# ---------------------------------------------------------------- files uploaded to nodes


class LocalNode:
    """A connection whose node is this machine: `put_files` runs for real, into a temp directory."""

    def run(self, command: str, warn: bool, hide: bool, in_stream: bool, timeout: float):
        done = subprocess.run(["sh", "-c", command], capture_output=True, text=True, timeout=timeout)
        return SimpleNamespace(exited=done.returncode, stdout=done.stdout, stderr=done.stderr)

    def sftp(self):
        return SimpleNamespace(get_channel=lambda: SimpleNamespace(settimeout=lambda seconds: None))

    def put(self, local: io.BytesIO, remote: str) -> None:
        Path(remote).write_bytes(local.read())


ME = pwd.getpwuid(os.getuid()).pw_name


def test_the_node_agents_from_a_crlf_checkout_reach_nodes_lf(tmp_path, monkeypatch):
    from lab.cluster import agents
    from lab.cluster.remote import put_files
    from lab.providers.base import NodeFile

    monkeypatch.setattr(agents, "NODE_SOURCES", crlf_copy(REPO / "lab/node", tmp_path / "crlf" / "node"))
    node_dir = tmp_path / "node" / "var/lib/lab"
    sources = agents.node_sources()  # what bootstrap ships: the CRLF copies
    assert sources and all(b"\r\n" in p.read_bytes() for p in sources)
    files = [NodeFile(str(node_dir / p.name), p.read_bytes(), 0o644, owner=ME) for p in sources]
    assert put_files(LocalNode(), files, "node-1") is True
    for path in sources:
        assert (node_dir / path.name).read_bytes() == (REPO / "lab/node" / path.name).read_bytes()
    # Compared as shipped (LF): a second run finds nothing to change, so nothing restarts.
    assert put_files(LocalNode(), files, "node-1") is False


def test_a_binary_reaches_a_node_untouched(tmp_path):
    from lab.cluster.remote import put_files
    from lab.providers.base import NodeFile

    binary = b"\0\x01\r\n\xfe" * 50
    target = tmp_path / "node" / "opt" / "blob"
    assert put_files(LocalNode(), [NodeFile(str(target), binary, 0o600, owner=ME)], "node-1")
    assert target.read_bytes() == binary and stat.S_IMODE(target.stat().st_mode) == 0o600


def test_written_files_names_only_the_files_whose_content_changed(tmp_path):
    from lab.cluster.remote import written_files
    from lab.providers.base import NodeFile

    first, second = tmp_path / "node" / "etc" / "a.json", tmp_path / "node" / "etc" / "b.json"
    files = [NodeFile(str(first), b"1\n", 0o644, owner=ME), NodeFile(str(second), b"2\n", 0o644, owner=ME)]
    assert written_files(LocalNode(), files, "node-1") == [str(first), str(second)]
    files[1] = NodeFile(str(second), b"3\n", 0o644, owner=ME)
    assert written_files(LocalNode(), files, "node-1") == [str(second)]  # agents.install restarts on this
    assert written_files(LocalNode(), files, "node-1") == []


class RecordingEtcd:
    def __init__(self) -> None:
        self.values: dict[str, str] = {}

    def put(self, key: str, value: str) -> None:
        self.values[key] = value


@pytest.mark.parametrize("unit", ["rolling-update/web.service", "first-look/hello.service",
                                  "container-service/web@.service"])
def test_a_unit_file_from_a_crlf_checkout_is_stored_lf(tmp_path, unit):
    """`lab unit` and a scenario's unit steps store the unit's text in etcd; the agents write it on nodes."""
    import json

    from lab.cluster.units import submit

    copy = crlf_copy(REPO / "scenarios" / unit, tmp_path / Path(unit).name)
    name = "web@1.service" if "@" in unit else copy.name  # an instance reads its template
    etcd = RecordingEtcd()
    assert submit(etcd, [copy.with_name(name)]) == [name]
    (record,) = [json.loads(value) for value in etcd.values.values()]
    assert record["text"] == (REPO / "scenarios" / unit).read_text()


def test_a_vagrantfile_from_a_crlf_template_is_the_same(tmp_path, monkeypatch):
    from lab.providers.vagrant import render
    from lab.testing import contexts

    context = contexts.make_context(tmp_path, {"name": "crlf", "nodes": {"count": 2}}, lab_id="c0ffee",
                                    subnet="10.77.3.0/24")
    expected = render.write_vagrantfile(context, "libvirt").read_bytes()
    template = crlf_copy(REPO / "Vagrantfile.j2", tmp_path / "crlf" / "Vagrantfile.j2")
    monkeypatch.setattr(render, "resource", lambda name: template)
    assert render.write_vagrantfile(context, "libvirt").read_bytes() == expected
    assert b"\r" not in expected
