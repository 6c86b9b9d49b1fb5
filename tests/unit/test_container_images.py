"""Container images without a registry or root: OCI layouts and their digests, what an import
file is, image names, the registry's config text, and the `lab image` help."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest
import yaml

from lab.errors import UsageError
from lab.host.registry import ImageInfo, repository, serving_config, shown_name, writable_config
from lab.images.containers import (DESCRIPTION, REF_NAME, STAND_IN, ImageSpec, blob_path, default_name,
                                   detect_image_file, image_config, parse_reference, strip_registry,
                                   write_image, write_layer)


def make_tar(path: Path, files: dict[str, bytes], compress: bool = False) -> Path:
    with tarfile.open(path, "w:gz" if compress else "w") as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------- names


@pytest.mark.parametrize("text, expected", [
    ("ubuntu", ("ubuntu", "latest")),
    ("ubuntu:22.04", ("ubuntu", "22.04")),
    ("team/app:v1_2", ("team/app", "v1_2")),
    ("my-app.x__y", ("my-app.x__y", "latest")),
])
def test_references_parse(text: str, expected: tuple[str, str]) -> None:
    assert parse_reference(text) == expected


@pytest.mark.parametrize("text", ["Ubuntu", "ubuntu:", "-app", "app:-x", "a//b", "app:" + "x" * 129, "",
                                  "app@sha256:00", "app:1:2"])
def test_bad_references_say_what_a_name_may_be(text: str) -> None:
    with pytest.raises(UsageError) as raised:
        parse_reference(text)
    assert raised.value.hint


@pytest.mark.parametrize("written, kept", [
    ("docker.io/library/ubuntu:22.04", "ubuntu:22.04"),
    ("localhost/app:1", "app:1"),
    ("registry.example:5000/team/app:v1", "team/app:v1"),
    ("team/app:v1", "team/app:v1"),
    ("busybox:latest", "busybox:latest"),
])
def test_foreign_registry_names_are_dropped(written: str, kept: str) -> None:
    assert strip_registry(written) == kept


def test_plain_names_live_under_library() -> None:
    assert repository("ubuntu") == "library/ubuntu"
    assert repository("team/app") == "team/app"
    assert shown_name("library/ubuntu") == "ubuntu"


# ---------------------------------------------------------------- OCI layouts


def test_a_layer_is_gzip_of_the_tar_with_both_digests(tmp_path: Path) -> None:
    tar = make_tar(tmp_path / "rootfs.tar", {"bin/hello": b"#!/bin/sh\necho hi\n"}).read_bytes()
    layer = write_layer(tmp_path / "layout", io.BytesIO(tar))
    stored = blob_path(tmp_path / "layout", layer.digest).read_bytes()
    assert layer.digest == sha256(stored) and layer.size == len(stored)
    assert layer.diff_id == sha256(tar)
    assert gzip.decompress(stored) == tar
    # Reproducible: the same tar gives the same blob (no timestamp in the gzip header).
    assert write_layer(tmp_path / "other", io.BytesIO(tar)).digest == layer.digest


def test_an_image_layout_names_each_tag_and_addresses_every_blob(tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    tar = make_tar(tmp_path / "rootfs.tar", {"etc/os-release": b"ID=test\n"}).read_bytes()
    layer = write_layer(layout, io.BytesIO(tar))
    spec = ImageSpec(cmd=("bash",), labels={DESCRIPTION: "a test"})
    config = image_config([layer], spec, created="2026-01-01T00:00:00Z", architecture="amd64")
    digest = write_image(layout, [layer], config, ("bookworm", "latest"))

    assert json.loads((layout / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}
    index = json.loads((layout / "index.json").read_text())
    assert [m["annotations"][REF_NAME] for m in index["manifests"]] == ["bookworm", "latest"]
    assert {m["digest"] for m in index["manifests"]} == {digest}
    manifest_bytes = blob_path(layout, digest).read_bytes()
    assert sha256(manifest_bytes) == digest
    manifest = json.loads(manifest_bytes)
    assert manifest["layers"] == [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                                   "digest": layer.digest, "size": layer.size}]
    config_bytes = blob_path(layout, manifest["config"]["digest"]).read_bytes()
    assert sha256(config_bytes) == manifest["config"]["digest"] and len(config_bytes) == manifest["config"]["size"]
    stored = json.loads(config_bytes)
    assert stored["rootfs"] == {"type": "layers", "diff_ids": [sha256(tar)]}
    assert stored["config"]["Cmd"] == ["bash"] and stored["config"]["Labels"] == {DESCRIPTION: "a test"}
    assert any(e.startswith("PATH=") for e in stored["config"]["Env"])
    assert (stored["os"], stored["architecture"]) == ("linux", "amd64")


# ---------------------------------------------------------------- import files


def test_a_docker_save_archive_is_recognised_with_its_name(tmp_path: Path) -> None:
    manifest = [{"Config": "abc.json", "RepoTags": ["docker.io/library/ubuntu:22.04"], "Layers": ["l/layer.tar"]}]
    file = make_tar(tmp_path / "ubuntu.tar", {"l/layer.tar": b"", "manifest.json": json.dumps(manifest).encode()})
    found = detect_image_file(file)
    assert (found.kind, found.names) == ("docker-archive", ("ubuntu:22.04",))
    assert found.skopeo_source() == f"docker-archive:{file}"
    assert default_name(found) == "ubuntu:22.04"


def test_a_docker_archive_of_several_images_is_refused(tmp_path: Path) -> None:
    manifest = [{"RepoTags": ["a:1"]}, {"RepoTags": ["b:1"]}]
    file = make_tar(tmp_path / "two.tar", {"manifest.json": json.dumps(manifest).encode()})
    with pytest.raises(UsageError, match="holds 2 images"):
        detect_image_file(file)


def test_an_oci_archive_is_recognised(tmp_path: Path) -> None:
    index = {"schemaVersion": 2, "manifests": [{"digest": "sha256:00", "annotations": {REF_NAME: "docker.io/x/app:2"}}]}
    file = make_tar(tmp_path / "app.oci.tar", {"oci-layout": b'{"imageLayoutVersion":"1.0.0"}',
                                               "index.json": json.dumps(index).encode()})
    found = detect_image_file(file)
    assert (found.kind, found.names) == ("oci-archive", ("x/app:2",))


def test_a_rootfs_tarball_is_recognised_compressed_and_named_after_the_file(tmp_path: Path) -> None:
    file = make_tar(tmp_path / "Alpine-MiniRootFS_3.19.tar.gz", {"./bin/sh": b"x", "./etc/passwd": b""},
                    compress=True)
    found = detect_image_file(file)
    assert found.kind == "rootfs"
    assert default_name(found) == "alpine-minirootfs_3.19"


@pytest.mark.parametrize("make, message", [
    (lambda p: p.write_text("just text\n"), "not a tar archive"),
    (lambda p: make_tar(p, {"src/main.c": b"int main;"}), "not an image: its top holds src"),
    (lambda p: make_tar(p, {}), "not an image: its top holds nothing"),
])
def test_anything_else_is_refused_naming_the_file_and_what_was_expected(tmp_path: Path, make, message) -> None:
    file = tmp_path / "thing.tar"
    make(file)
    with pytest.raises(UsageError, match=message) as raised:
        detect_image_file(file)
    assert str(file) in raised.value.message
    assert "docker save" in raised.value.hint and "root filesystem" in raised.value.hint


def test_a_missing_file_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="no such file"):
        detect_image_file(tmp_path / "absent.tar")


# ---------------------------------------------------------------- the registry's configs


def test_a_labs_registry_is_read_only_and_bound_to_its_address() -> None:
    config = yaml.safe_load(serving_config("10.77.138.1"))
    assert config["http"]["addr"] == "10.77.138.1:5000"
    assert config["storage"]["maintenance"]["readonly"] == {"enabled": True}
    assert config["storage"]["delete"] == {"enabled": False}
    assert "auth" not in config and "proxy" not in config
    assert config["log"]["level"] == "warn"
    assert config["health"]["storagedriver"]["enabled"] is False


def test_a_pull_through_cache_only_with_a_given_upstream() -> None:
    config = yaml.safe_load(serving_config("10.77.138.1", 5001, upstream="https://mirror.internal"))
    assert config["proxy"] == {"remoteurl": "https://mirror.internal"}
    assert "readonly" not in config["storage"]["maintenance"]
    assert config["http"]["addr"] == "10.77.138.1:5001"


def test_the_writable_registry_listens_on_loopback_and_may_delete() -> None:
    config = yaml.safe_load(writable_config(40123))
    assert config["http"]["addr"] == "127.0.0.1:40123"
    assert config["storage"]["delete"] == {"enabled": True}
    assert "readonly" not in config["storage"]["maintenance"]


def test_a_stand_in_says_what_it_really_is() -> None:
    from lab.core.images import what_it_is

    stand_in = ImageInfo("ubuntu", "latest", "sha256:00", 1, labels={
        STAND_IN: "ubuntu", DESCRIPTION: "Debian bookworm minbase standing in for ubuntu (built offline)"})
    assert what_it_is(stand_in, short=True) == \
        "STAND-IN for ubuntu: Debian bookworm minbase standing in for ubuntu"
    assert what_it_is(ImageInfo("app", "1", "sha256:00", 1)) == "-"


# ---------------------------------------------------------------- the CLI


def test_image_help_teaches_the_verbs(run_lab) -> None:
    result = run_lab("image", "--help")
    assert result.exit_code == 0
    for word in ("STAND-IN", "import", "load", "build", "rm", "list", "docker save"):
        assert word in result.output


def test_a_bad_name_is_one_clear_message(run_lab, tmp_path: Path) -> None:
    file = make_tar(tmp_path / "rootfs.tar", {"bin/sh": b"x"})
    result = run_lab("image", "import", str(file), "--name", "Bad Name")
    assert result.exit_code == 2
    assert "is not an image name" in result.output and "Traceback" not in result.output


def test_importing_something_that_is_not_an_image_is_one_clear_message(run_lab, tmp_path: Path) -> None:
    file = tmp_path / "notes.txt"
    file.write_text("hello\n")
    result = run_lab("image", "import", str(file))
    assert result.exit_code == 2
    assert "not a tar archive" in result.output and "Traceback" not in result.output
