"""What the `lab image` verbs do: the container images in the lab registry.

Every verb writes (or reads) through the short-lived writable registry of
`lab.host.registry.writable()`, so the labs' read-only registries see the
result at once and nothing a node sends can change the storage.
"""

from __future__ import annotations

import shutil
import tarfile
import tempfile
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from lab.errors import PrerequisiteError, UsageError
from lab.host.registry import ImageInfo, catalog, describe, garbage_collect, push, remove, writable
from lab.host.run import run
from lab.images.containers import (DESCRIPTION, STAND_IN, default_name, detect_image_file, parse_reference,
                                   rootfs_layout, seeded_image)
from lab.providers.base import Progress, no_progress

if TYPE_CHECKING:
    from lab.core.lab import Lab

# `docker build` on a node pulls its base image through the lab registry and may run apt from the mirror.
BUILD_TIMEOUT = 30 * 60
SAVE_TIMEOUT = 10 * 60


def list_images() -> list[ImageInfo]:
    with writable() as endpoint:
        return catalog(endpoint)


def what_it_is(image: ImageInfo, short: bool = False) -> str:
    """What the image really is, from its labels: a stand-in says so first.

    `short` keeps the description up to its first parenthesis, for a table.
    """
    labels = image.labels
    description = labels.get(DESCRIPTION) or labels.get("org.opencontainers.image.title") or "-"
    if short:
        description = description.split(" (", 1)[0]
    return f"STAND-IN for {labels[STAND_IN]}: {description}" if STAND_IN in labels else description


def import_image(file: Path, reference: str | None = None, *, force: bool = False,
                 progress: Progress = no_progress) -> str:
    """Put the image FILE holds (docker save, OCI archive or rootfs tarball) into the registry as NAME:TAG."""
    image_file = detect_image_file(file)
    reference = reference or default_name(image_file)
    if reference is None:
        raise UsageError(f"{file} does not say what its image is called", hint=f"lab image import {file} --name NAME[:TAG]")
    name, tag = parse_reference(reference)
    progress(f"{file.name}: {image_file.kind.replace('-', ' ')}")
    with tempfile.TemporaryDirectory(prefix="lab-image-") as scratch:
        source = image_file.skopeo_source()
        if image_file.kind == "rootfs":
            progress(f"wrapping {file.name} into a one-layer image")
            source = rootfs_layout(image_file, Path(scratch) / "layout")
        _push_unless_taken(source, name, tag, force, progress)
    return f"{name}:{tag}"


def load_image(source: str, reference: str | None = None, *, force: bool = False,
               progress: Progress = no_progress) -> str:
    """Copy an image from this host's own docker daemon into the lab registry (as kind's `load docker-image`)."""
    docker_name, docker_tag = parse_reference(source)
    name, tag = parse_reference(reference or source)
    if shutil.which("docker") is None:
        raise PrerequisiteError("there is no docker on this host to load an image from",
                                hint="import a file instead: lab image import FILE (from `docker save` elsewhere)")
    info = run(["docker", "info", "--format", "{{.ServerVersion}}"], check=False, timeout=20)
    if not info.ok:
        raise PrerequisiteError("this host's docker daemon does not answer: nothing to load from",
                                hint="start it (systemctl start docker), or import a file: lab image import FILE")
    _check_name_free(name, tag, force)
    with tempfile.TemporaryDirectory(prefix="lab-image-") as scratch:
        archive = Path(scratch) / "image.tar"
        progress(f"docker save {docker_name}:{docker_tag}")
        saved = run(["docker", "save", "-o", str(archive), f"{docker_name}:{docker_tag}"], check=False,
                    timeout=SAVE_TIMEOUT)
        if not saved.ok:
            raise UsageError(f"this host's docker has no image {docker_name}:{docker_tag}",
                             hint=f"see `docker images`; docker said: {saved.stderr.strip()[-300:]}")
        _push_unless_taken(f"docker-archive:{archive}", name, tag, force, progress)
    return f"{name}:{tag}"


def build_image(lab: "Lab", directory: Path, reference: str, *, node: str | None = None, force: bool = False,
                progress: Progress = no_progress) -> str:
    """`docker build` DIRECTORY on a node of the lab, and push the result into the lab registry."""
    from lab.cluster.remote import check, run_bounded
    from lab.host.ssh import connect

    name, tag = parse_reference(reference)
    if not (directory / "Dockerfile").is_file():
        raise UsageError(f"{directory} has no Dockerfile", hint="give the directory holding the Dockerfile")
    lab.require_created("build images on")
    _check_name_free(name, tag, force)
    endpoints = lab.ssh_endpoints()
    if node is not None and node not in endpoints:
        raise UsageError(f"no node {node!r} in lab {lab.name}", hint=f"nodes: {', '.join(endpoints)}")
    endpoint = endpoints[node or next(iter(endpoints))]
    build_id = uuid.uuid4().hex[:12]
    remote_dir, remote_tar = f"/var/tmp/lab-build-{build_id}", f"/var/tmp/lab-build-{build_id}.tar"
    local_tag = f"lab-build-{build_id}:latest"
    with tempfile.TemporaryDirectory(prefix="lab-image-") as scratch:
        context, image = Path(scratch) / "context.tar", Path(scratch) / "image.tar"
        with tarfile.open(context, "w") as tar:
            tar.add(directory, arcname=".")
        with connect(endpoint) as connection:
            try:
                progress(f"{endpoint.node}: uploading {directory} ({context.stat().st_size / 2**20:.1f} MiB)")
                check(connection, f"mkdir -p {remote_dir}", endpoint.node)
                connection.put(str(context), remote=f"{remote_dir}.context.tar")
                check(connection, f"tar -xf {remote_dir}.context.tar -C {remote_dir}", endpoint.node)
                progress(f"{endpoint.node}: docker build")
                check(connection, f"docker build --quiet -t {local_tag} {remote_dir}", endpoint.node,
                      timeout=BUILD_TIMEOUT)
                check(connection, f"docker save -o {remote_tar} {local_tag}", endpoint.node, timeout=SAVE_TIMEOUT)
                progress(f"{endpoint.node}: copying the image back")
                connection.get(remote_tar, local=str(image))
            finally:
                run_bounded(connection, f"docker rmi {local_tag} >/dev/null 2>&1; rm -rf {remote_dir} "
                                        f"{remote_dir}.context.tar {remote_tar}", endpoint.node)
        _push_unless_taken(f"docker-archive:{image}", name, tag, force, progress)
    return f"{name}:{tag}"


def remove_image(reference: str, progress: Progress = no_progress) -> str:
    """Untag NAME[:TAG] and delete the blobs nothing else uses."""
    name, tag = parse_reference(reference)
    with writable() as endpoint:
        remove(endpoint, name, tag)
        progress("collecting unreferenced blobs")
        garbage_collect()
    if seeded_image(name) is not None:
        progress(f"{name} is a seeded image: the next `lab up` puts {name}:{tag} back")
    return f"{name}:{tag}"


def _refuse_if_taken(endpoint: str, name: str, tag: str, force: bool, progress: Progress) -> None:
    """A name already in the registry is kept unless --force; a seeded stand-in makes way for the real image."""
    existing = describe(endpoint, name, tag)
    if existing is None or force:
        return
    if STAND_IN not in existing.labels:
        raise UsageError(f"the lab registry already has {name}:{tag}",
                         hint="pass --force to replace it, or --name another NAME:TAG (see `lab image list`)")
    progress(f"replacing the seeded stand-in {name}:{tag}")


def _check_name_free(name: str, tag: str, force: bool) -> None:
    """Before minutes of work (a build, a save): fail at once if the result could not be pushed."""
    with writable() as endpoint:
        _refuse_if_taken(endpoint, name, tag, force, no_progress)


def _push_unless_taken(source: str, name: str, tag: str, force: bool, progress: Progress) -> None:
    with writable() as endpoint:
        _refuse_if_taken(endpoint, name, tag, force, progress)
        progress(f"pushing {name}:{tag} into the lab registry")
        push(source, endpoint, name, tag)
