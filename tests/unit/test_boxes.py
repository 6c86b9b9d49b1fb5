"""Fast, pure tests of lab.images: apt sources, image keys, recipes, the cache. No root, no network."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import yaml

import lab.images.cache as image_cache
from lab.errors import BoxError, PrerequisiteError
from lab.host.mounts import Mount
from lab.images import build, recipes

MIRROR = "http://mirror.example/debian"


# --------------------------------------------------------------------------- #
# apt sources
# --------------------------------------------------------------------------- #

ONE_LINE = f"""\
# the main archive
deb [arch=amd64 signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] {MIRROR}/ bookworm main contrib
deb-src {MIRROR} bookworm main
deb http://security.example/debian-security bookworm-security main  # security
deb [ arch=amd64 ] https://vendor.example/apt cloud-sdk-bookworm main
#deb http://commented.example/debian bookworm main
"""

DEB822 = f"""\
Types: deb deb-src
# a comment between fields
URIs: {MIRROR}
Suites: bookworm bookworm-updates
Components: main non-free-firmware
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://security.example/debian-security
Suites: bookworm-security
Components: main

Types: deb
URIs: https://vendor.example/node_20.x
Suites: nodistro
Components: main
Architectures: amd64
Signed-By:
 -----BEGIN PGP PUBLIC KEY BLOCK-----
 .
 mQINBFEOJ0sBEAC
 -----END PGP PUBLIC KEY BLOCK-----

Enabled: no
Types: deb
URIs: http://disabled.example/debian
Suites: bookworm
Components: main
"""


def test_one_line_sources_parse_options_comments_and_types():
    assert recipes.parse_apt_sources(ONE_LINE, deb822=False) == [
        (MIRROR, ["bookworm"]),
        ("http://security.example/debian-security", ["bookworm-security"]),
        ("https://vendor.example/apt", ["cloud-sdk-bookworm"]),
    ]


def test_deb822_sources_parse_stanzas_continuations_and_enabled():
    assert recipes.parse_apt_sources(DEB822, deb822=True) == [
        (MIRROR, ["bookworm", "bookworm-updates"]),
        ("http://security.example/debian-security", ["bookworm-security"]),
        ("https://vendor.example/node_20.x", ["nodistro"]),
    ]


def test_entries_without_main_are_not_mirrors():
    text = "deb http://firmware.example/debian bookworm non-free-firmware\n"
    assert recipes.parse_apt_sources(text, deb822=False) == []


def _apt_dir(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = tmp_path / "apt" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path / "apt"


def test_host_mirror_skips_security_and_third_party(tmp_path):
    apt = _apt_dir(tmp_path, {
        "sources.list": "deb http://security.example/debian-security bookworm-security main\n",
        "sources.list.d/a-vendor.list": "deb https://vendor.example/apt cloud-sdk-bookworm main\n",
        "sources.list.d/b-node.sources": DEB822.split("\n\n")[2],
        "sources.list.d/debian.sources": DEB822,
    })
    assert recipes.host_debian_mirror(apt) == MIRROR


def test_host_mirror_ignores_files_apt_ignores(tmp_path):
    apt = _apt_dir(tmp_path, {
        "sources.list.d/old.list.disabled": f"deb {MIRROR} bookworm main\n",
        "sources.list.d/z.list": "deb http://other.example/debian stable main\n",
    })
    assert recipes.host_debian_mirror(apt) == "http://other.example/debian"


def test_host_mirror_reads_sources_list_first(tmp_path):
    apt = _apt_dir(tmp_path, {
        "sources.list": "deb http://first.example/debian trixie main\n",
        "sources.list.d/debian.sources": DEB822,
    })
    assert recipes.host_debian_mirror(apt) == "http://first.example/debian"


def test_no_mirror_is_a_box_error_with_a_hint(tmp_path):
    apt = _apt_dir(tmp_path, {"sources.list.d/vendor.list":
                              "deb https://vendor.example/apt cloud-sdk-bookworm main\n"})
    with pytest.raises(BoxError) as error:
        recipes.host_debian_mirror(apt)
    assert "--mirror" in error.value.hint
    with pytest.raises(BoxError):
        recipes.host_debian_mirror(tmp_path / "missing")


# --------------------------------------------------------------------------- #
# Recipes and keys
# --------------------------------------------------------------------------- #

@pytest.fixture
def recipe_copy(tmp_path, monkeypatch) -> Path:
    """A private copy of boxes/labos that recipe_dir("labos") points to."""
    copy = tmp_path / "boxes" / "labos"
    shutil.copytree(recipes.recipe_dir("labos"), copy)
    monkeypatch.setattr(recipes, "recipe_dir", lambda name: copy)
    return copy


def test_shipped_recipe_is_valid():
    recipe = recipes.load_recipe("labos", "1")
    assert recipe.suite == "bookworm"
    for package in ("systemd", "systemd-sysv", "openssh-server", "etcd-server", "python3"):
        assert package in recipe.packages
    assert "etcd.service" in recipe.units["disable"]
    assert {"ssh.service", "systemd-networkd.service"} <= set(recipe.units["enable"])
    assert (recipe.overlay / "etc/ssh/sshd_config.d").is_dir()


def test_unknown_box_lists_known_boxes():
    with pytest.raises(BoxError) as error:
        recipes.recipe_dir("nope")
    assert "labos" in error.value.hint


def test_unknown_version_lists_known_versions():
    with pytest.raises(BoxError) as error:
        recipes.load_recipe("labos", "99")
    assert "99" in error.value.message and "1" in error.value.hint


def test_image_key_is_stable_and_12_hex(recipe_copy):
    key = image_cache.image_key("labos", "1")
    assert key == image_cache.image_key("labos", "1")
    assert len(key) == 12 and int(key, 16) >= 0


def test_image_key_follows_version_and_recipe_files(recipe_copy):
    key = image_cache.image_key("labos", "1")
    assert image_cache.image_key("labos", "2") != key

    sshd = recipe_copy / "rootfs/etc/ssh/sshd_config.d/10-labos.conf"
    sshd.write_text(sshd.read_text() + "# changed\n")
    changed = image_cache.image_key("labos", "1")
    assert changed != key

    (recipe_copy / "rootfs/etc/motd").write_text("hello\n")
    assert image_cache.image_key("labos", "1") not in (key, changed)


def test_image_key_sees_renames(recipe_copy):
    key = image_cache.image_key("labos", "1")
    conf = recipe_copy / "rootfs/etc/ssh/sshd_config.d/10-labos.conf"
    conf.rename(conf.with_name("20-labos.conf"))
    assert image_cache.image_key("labos", "1") != key


def _parse(data, version="1"):
    return recipes.parse_recipe(data, name="labos", version=version, overlay=Path("/nowhere"))


def _minimal() -> dict:
    return {"os_name": "Lab OS", "suite": "bookworm", "packages": ["systemd"],
            "units": {"enable": ["ssh.service"]}, "versions": {"1": None}}


def test_version_sections_add_packages_and_units():
    data = _minimal()
    data["versions"]["2"] = {"packages": ["curl", "systemd"],
                             "units": {"mask": ["fstrim.timer"]}}
    one, two = _parse(data, "1"), _parse(data, "2")
    assert one.packages == ("systemd",) and two.packages == ("systemd", "curl")
    assert one.units["mask"] == () and two.units["mask"] == ("fstrim.timer",)
    assert two.units["enable"] == ("ssh.service",)


def test_the_container_section_is_for_nspawn_images_only():
    data = _minimal()
    data["container"] = {"units": {"mask": ["systemd-logind.service"]}}
    data["vm"] = {"packages": ["linux-image-amd64"]}
    container = _parse(data)
    vm = recipes.parse_recipe(data, name="labos", version="1", overlay=Path("/nowhere"), flavor="vm")
    assert container.units["mask"] == ("systemd-logind.service",) and vm.units["mask"] == ()
    data["container"] = {"packages": ["x"]}  # units only: a package belongs to both images
    with pytest.raises(BoxError, match="unknown"):
        _parse(data)


def test_unquoted_yaml_versions_still_match():
    data = yaml.safe_load("os_name: X\nsuite: bookworm\npackages: []\nunits: {}\n"
                          "versions:\n  1: {}\n")
    assert _parse(data, "1").version == "1"


@pytest.mark.parametrize("mutate, problem", [
    (lambda d: d.pop("suite"), "missing"),
    (lambda d: d.update(extra=1), "unknown"),
    (lambda d: d.update(packages="systemd"), "list"),
    (lambda d: d.update(packages=["Bad Name"]), "package names"),
    (lambda d: d.update(units={"start": ["ssh.service"]}), "unknown"),
    (lambda d: d.update(units={"enable": ["ssh"]}), "unit names"),
    (lambda d: d.update(versions={}), "non-empty"),
    (lambda d: d.update(versions={"1": {"packages": ["x"], "mirror": "y"}}), "unknown"),
    (lambda d: d.update(os_name=""), "os_name"),
])
def test_invalid_recipes_are_rejected(mutate, problem):
    data = _minimal()
    mutate(data)
    with pytest.raises(BoxError, match=problem):
        _parse(data)


def test_recipe_must_be_a_mapping():
    with pytest.raises(BoxError, match="mapping"):
        _parse(["not", "a", "mapping"])


# --------------------------------------------------------------------------- #
# The image cache (fake images: a meta.json and an empty rootfs/)
# --------------------------------------------------------------------------- #

@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache" / "lab" / "images"


def _fake_image(cache: Path, name: str, version: str, key: str) -> Path:
    path = cache / f"{name}-{version}-{key}"
    (path / "rootfs/usr/lib").mkdir(parents=True)
    (path / "rootfs/usr/lib/os-release").write_text(
        'NAME="Lab OS"\nID=labos\nVERSION="1 (bookworm)"\n# comment\n')
    (path / "meta.json").write_text(json.dumps({
        "name": name, "version": version, "key": key, "mirror": MIRROR,
        "built_at": "2025-01-01T00:00:00+00:00", "size_bytes": 123}))
    return path


def test_find_list_and_remove_images(cache, recipe_copy):
    key = image_cache.image_key("labos", "1")
    _fake_image(cache, "labos", "1", key)
    _fake_image(cache, "labos", "2", "0123456789ab")
    _fake_image(cache, "other", "1", "ba9876543210")
    (cache / f"labos-1-{key}.tmp-42").mkdir()       # an interrupted build
    (cache / "labos-1-deadbeefdead").mkdir()        # no meta.json: not an image

    found = image_cache.find_image("labos", "1")
    assert found is not None and found.key == key and found.mirror == MIRROR
    assert found.os_release == {"NAME": "Lab OS", "ID": "labos", "VERSION": "1 (bookworm)"}
    assert [(i.name, i.version) for i in image_cache.list_images()] == \
        [("labos", "1"), ("labos", "2"), ("other", "1")]

    removed = image_cache.remove_images("labos", "2")
    assert [i.version for i in removed] == ["2"] and not removed[0].path.exists()
    assert [i.name for i in image_cache.remove_images("labos")] == ["labos"]
    assert [i.name for i in image_cache.list_images()] == ["other"]


def test_find_image_misses_when_recipe_changes(cache, recipe_copy):
    _fake_image(cache, "labos", "1", image_cache.image_key("labos", "1"))
    assert image_cache.find_image("labos", "1") is not None
    (recipe_copy / "recipe.yaml").write_text((recipe_copy / "recipe.yaml").read_text() + "\n#\n")
    assert image_cache.find_image("labos", "1") is None


def test_build_returns_a_cache_hit_without_prerequisites(cache, recipe_copy, monkeypatch):
    _fake_image(cache, "labos", "1", image_cache.image_key("labos", "1"))
    monkeypatch.setattr(build.shutil, "which", lambda tool: None)   # no debootstrap
    assert build.build_image("labos", "1").version == "1"


def test_build_needs_debootstrap(cache, recipe_copy, monkeypatch):
    monkeypatch.setattr(build.os, "geteuid", lambda: 0)
    monkeypatch.setattr(build.shutil, "which", lambda tool: None)
    with pytest.raises(PrerequisiteError) as error:
        build.build_image("labos", "1", mirror=MIRROR)
    assert "debootstrap" in error.value.hint


def test_build_needs_root(cache, recipe_copy, monkeypatch):
    monkeypatch.setattr(build.os, "geteuid", lambda: 1000)
    with pytest.raises(PrerequisiteError, match="root"):
        build.build_image("labos", "1", mirror=MIRROR)


def test_failed_build_leaves_nothing_behind(cache, recipe_copy, monkeypatch):
    """A failing debootstrap: BoxError with the command and output tail, no temp dir."""
    monkeypatch.setattr(build.os, "geteuid", lambda: 0)
    fake = recipe_copy.parent / "bin" / "debootstrap"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho 'I: Retrieving InRelease'\n"
                    "mkdir -p \"$4/debootstrap\"\necho 'E: no such suite' >&2\n"
                    "echo 'log: 404 Not Found' > \"$4/debootstrap/debootstrap.log\"\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}:{os.environ['PATH']}")
    lines: list[str] = []
    with pytest.raises(BoxError) as error:
        build.build_image("labos", "1", mirror=MIRROR, progress=lines.append)
    message = error.value.message
    assert "debootstrap --variant=minbase" in message and MIRROR in message
    assert "E: no such suite" in message and "404 Not Found" in message
    assert "I: Retrieving InRelease" in lines
    assert [p.name for p in cache.iterdir() if not p.name.startswith(".")] == []


def test_images_in_use_by_a_node_overlay_are_not_removed(cache, recipe_copy, monkeypatch):
    path = _fake_image(cache, "labos", "1", image_cache.image_key("labos", "1"))
    node = Mount(Path("/run/lab/node1/merged"), "overlay",
                        f"rw,lowerdir={path}/rootfs,upperdir=/u,workdir=/w")
    monkeypatch.setattr(image_cache, "mounted", lambda: [node])
    with pytest.raises(BoxError, match="in use") as error:
        image_cache.remove_images("labos")
    assert "`lab halt` or `lab destroy`" in error.value.hint and path.exists()


# --------------------------------------------------------------------------- #
# Versions of the shipped recipe
# --------------------------------------------------------------------------- #

def test_versions_differ_visibly():
    one, two, broken = (recipes.load_recipe("labos", v) for v in ("1", "2", "2-broken"))
    assert "jq" in two.packages and "jq" not in one.packages
    assert two.version_overlay is not None and (two.version_overlay / "usr/lib/labos/release-notes").exists()
    assert broken.version_overlay is not None
    assert os.access(broken.version_overlay / "usr/bin/etcd", os.X_OK)
