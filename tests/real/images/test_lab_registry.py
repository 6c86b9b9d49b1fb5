"""The lab registry for real: Docker Distribution on loopback over a storage in a temporary cache.

Needs root (the registry runs as the docker-registry user, which root starts),
docker-registry and skopeo. Seeds busybox only (a second); imports a rootfs
tarball and a `docker save` archive made here with tarfile; lists, removes,
garbage-collects; a lab's read-only instance serves pulls and refuses pushes.
Everything started is stopped; nothing touches the user's own cache.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tarfile
import time
from pathlib import Path

import pytest

from lab.errors import StateError, UsageError

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="the registry is started by root and drops to its user"),
    pytest.mark.skipif(not shutil.which("docker-registry") or not shutil.which("skopeo"),
                       reason="needs docker-registry and skopeo (tools/install.sh)"),
]


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private cache (0700 parents, as root's home is): the registry must reach it anyway."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    (tmp_path / "cache").mkdir(mode=0o700)
    return tmp_path / "cache" / "lab"


def tar_bytes(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o755
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def docker_archive(path: Path, repo_tag: str, payload: bytes) -> Path:
    """A minimal `docker save` archive: one layer, its config naming the layer's diff_id."""
    layer = tar_bytes({"hello.txt": payload})
    diff_id = "sha256:" + hashlib.sha256(layer).hexdigest()
    config = json.dumps({"architecture": "amd64", "os": "linux", "config": {"Cmd": ["/hello"]},
                         "rootfs": {"type": "layers", "diff_ids": [diff_id]}}).encode()
    config_name = hashlib.sha256(config).hexdigest() + ".json"
    manifest = json.dumps([{"Config": config_name, "RepoTags": [repo_tag], "Layers": ["layer1/layer.tar"]}]).encode()
    path.write_bytes(tar_bytes({"layer1/layer.tar": layer, config_name: config, "manifest.json": manifest}))
    return path


def storage_blobs(cache: Path) -> set[str]:
    blobs = cache / "registry/docker/registry/v2/blobs/sha256"
    return {p.name for p in blobs.glob("*/*")} if blobs.is_dir() else set()


def test_seed_import_list_remove_and_collect(cache: Path, tmp_path: Path) -> None:
    from lab.core.images import import_image, list_images, remove_image
    from lab.host.registry import REGISTRY_USER, push, stored_tags, writable
    from lab.images.containers import build_seeded, seeded_image

    busybox = seeded_image("busybox")
    start = time.monotonic()
    build_seeded({"busybox"}, progress=lambda line: None)
    with writable() as endpoint:
        push(busybox.source("latest"), endpoint, "busybox", "latest")
        push(busybox.source("latest"), endpoint, "busybox", "1.35")
    print(f"busybox built and pushed in {time.monotonic() - start:.1f} s")
    assert stored_tags("busybox") == {"latest", "1.35"}
    assert (cache / "registry").stat().st_uid == __import__("pwd").getpwnam(REGISTRY_USER).pw_uid

    rootfs = tmp_path / "mini-rootfs.tar.gz"
    with tarfile.open(rootfs, "w:gz") as archive:
        for name, data in {"bin/sh": b"#!fake\n", "etc/os-release": b"ID=mini\n"}.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    assert import_image(rootfs) == "mini-rootfs:latest"
    archive = docker_archive(tmp_path / "hello.tar", "docker.io/library/hello:1", b"hello from a docker archive\n")
    assert import_image(archive) == "hello:1"

    with pytest.raises(UsageError, match="already has hello:1"):
        import_image(archive)
    blobs_before = storage_blobs(cache)
    replacement = docker_archive(tmp_path / "hello2.tar", "hello:1", b"a different payload\n")
    assert import_image(replacement, force=True) == "hello:1"

    shown = {image.reference: image for image in list_images()}
    assert set(shown) == {"busybox:latest", "busybox:1.35", "mini-rootfs:latest", "hello:1"}
    assert shown["busybox:latest"].size_bytes > 500_000
    assert "mini-rootfs.tar.gz" in shown["mini-rootfs:latest"].labels["org.opencontainers.image.description"]

    # Removing one tag keeps the other tag of the same manifest.
    remove_image("busybox:1.35")
    assert stored_tags("busybox") == {"latest"}
    # The first hello's blobs lost their tag to --force; rm's collection sweeps them with the removed image's.
    remove_image("hello:1")
    remove_image("mini-rootfs")
    left = storage_blobs(cache)
    assert blobs_before - left, "garbage collection deleted nothing"
    assert len(left) == 3   # busybox's layer, config and manifest
    assert {image.reference for image in list_images()} == {"busybox:latest"}
    with pytest.raises(UsageError, match="no image hello:1"):
        remove_image("hello:1")


def test_a_labs_registry_serves_pulls_and_refuses_pushes(cache: Path, tmp_path: Path) -> None:
    from lab.host.daemons import daemon_alive, start_daemon, stop_daemon
    from lab.host.files import write_atomic
    from lab.host.registry import answers, free_loopback_port, push, serving_argv, serving_config, writable
    from lab.host.run import run
    from lab.images.containers import build_seeded, seeded_image

    build_seeded({"busybox"}, progress=lambda line: None)
    with writable() as endpoint:
        push(seeded_image("busybox").source("latest"), endpoint, "busybox", "latest")

    port = free_loopback_port()
    served = f"127.0.0.1:{port}"
    config = tmp_path / "registry.yml"
    write_atomic(config, serving_config("127.0.0.1", port))
    daemon = start_daemon(serving_argv(config), log=tmp_path / "registry.log", what="the lab's registry",
                          ready=lambda: answers(served))
    try:
        # It runs as the registry user, never as root.
        assert os.stat(f"/proc/{daemon.pid}").st_uid == __import__("pwd").getpwnam("docker-registry").pw_uid
        inspected = run(["skopeo", "inspect", "--tls-verify=false", f"docker://{served}/library/busybox:latest"])
        assert json.loads(inspected.stdout)["Labels"]["org.opencontainers.image.description"].startswith("BusyBox")
        pushed = run(["skopeo", "copy", "--dest-tls-verify=false", seeded_image("busybox").source("latest"),
                      f"docker://{served}/library/intruder:latest"], check=False, timeout=60)
        assert not pushed.ok
        assert "intruder" not in os.listdir(cache / "registry/docker/registry/v2/repositories/library")
    finally:
        stop_daemon(daemon.pid, daemon.start)
    assert not daemon_alive(daemon.pid, daemon.start)
    assert not answers(served)


def test_writers_queue_on_the_lock(cache: Path) -> None:
    from lab.host.registry import write_lock

    with write_lock():
        with pytest.raises(StateError, match="registry is busy"):
            with write_lock(wait=0.3):
                pass
    with write_lock(wait=0.3):
        pass
