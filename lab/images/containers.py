"""Container images lab makes itself: the seeded ones, and the files `lab image import` accepts.

Seeded images are built offline from the host's Debian mirror, never from
the internet: `busybox` from the busybox-static package, `debian:bookworm`
(and `latest`) by a minbase debootstrap, and `ubuntu` as a *stand-in* made of
the same Debian root filesystem, labelled as such, so the seed's `docker run
ubuntu ...` works on a machine that cannot fetch a real one (`lab image
import` replaces it). Each is written as an OCI image layout (one gzip layer,
a config, a manifest, addressed by sha256) under the cache, and pushed into
the lab registry only where its storage lacks the tag.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import json
import lzma
import os
import re
import shutil
import tarfile
import tempfile
import zlib
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Callable

from lab.errors import PrerequisiteError, UsageError
from lab.host.paths import cache_dir
from lab.host.run import run

Progress = Callable[[str], None]

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
REF_NAME = "org.opencontainers.image.ref.name"
DESCRIPTION = "org.opencontainers.image.description"
STAND_IN = "lab.stand-in"
DEFAULT_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
CHUNK = 1 << 20
SEED_SUITE = "bookworm"
# debootstrap from a slow mirror; lab.images.build bounds debootstrap itself at 30 minutes.
BUILD_WAIT = 40 * 60
# Tar members of a root filesystem that a container must not carry: device nodes (a user-namespaced
# dockerd cannot create them), and what debootstrap leaves behind for apt.
ROOTFS_EXCLUDES = ("./dev/*", "./proc/*", "./sys/*", "./run/*", "./tmp/*", "./var/cache/apt/*.bin",
                   "./var/cache/apt/archives/*.deb", "./var/lib/apt/lists/*", "./debootstrap")

# Names as docker writes them: lowercase path components, then an optional tag.
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
NAME_PATTERN = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*$")
TAG_PATTERN = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")


# ---------------------------------------------------------------- names


def parse_reference(text: str) -> tuple[str, str]:
    """NAME[:TAG] -> (name, tag), tag `latest` by default; a UsageError saying what a name may be."""
    name, _, tag = text.rpartition(":") if ":" in text.rsplit("/", 1)[-1] else (text, "", "latest")
    if not NAME_PATTERN.match(name) or len(name) > 200:
        raise UsageError(f"{text!r} is not an image name",
                         hint="use NAME or NAME:TAG, e.g. myapp:1.0 (lowercase letters, digits, and . _ - "
                              "between them; / for a path like team/app)")
    if not TAG_PATTERN.match(tag):
        raise UsageError(f"{text!r}: tag {tag!r} is not a tag",
                         hint="a tag is up to 128 letters, digits, _ . - (not starting with . or -)")
    return name, tag


def strip_registry(reference: str) -> str:
    """A reference as a foreign registry wrote it, as the lab registry keeps it:
    `docker.io/library/ubuntu:22.04` -> `ubuntu:22.04`, `localhost/app:1` -> `app:1`."""
    first, _, rest = reference.partition("/")
    if rest and ("." in first or ":" in first or first == "localhost"):
        reference = rest
    return reference.removeprefix("library/")


# ---------------------------------------------------------------- OCI image layouts


@dataclass(frozen=True)
class Blob:
    digest: str          # sha256:HEX of the bytes stored
    size: int
    diff_id: str = ""    # for a layer: sha256 of the uncompressed tar


@dataclass(frozen=True)
class ImageSpec:
    """What goes into an image's config besides its layers."""

    cmd: tuple[str, ...] = ("sh",)
    labels: dict[str, str] = field(default_factory=dict)
    env: tuple[str, ...] = (DEFAULT_PATH,)
    created_by: str = "lab"


class _HashingWriter:
    """A file-like sink that hashes and counts what passes through to `target`."""

    def __init__(self, target: IO[bytes]) -> None:
        self.target, self.hash, self.size = target, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self.hash.update(data)
        self.size += len(data)
        return self.target.write(data)

    def flush(self) -> None:
        self.target.flush()


def blobs_dir(layout: Path) -> Path:
    return layout / "blobs" / "sha256"


def blob_path(layout: Path, digest: str) -> Path:
    return blobs_dir(layout) / digest.removeprefix("sha256:")


def write_blob(layout: Path, data: bytes) -> Blob:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    path = blob_path(layout, digest)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        path.write_bytes(data)
    return Blob(digest, len(data))


def write_layer(layout: Path, tar_stream: IO[bytes]) -> Blob:
    """gzip an uncompressed tar stream into the layout's blobs; digest and diff_id in one pass."""
    blobs = blobs_dir(layout)
    blobs.mkdir(parents=True, exist_ok=True)
    diff = hashlib.sha256()
    fd, temp = tempfile.mkstemp(dir=blobs, prefix=".layer-")
    try:
        with os.fdopen(fd, "wb") as raw:
            counted = _HashingWriter(raw)
            # mtime 0 and no file name: the same tar always gives the same blob.
            with gzip.GzipFile(fileobj=counted, mode="wb", compresslevel=6, mtime=0, filename="") as zipped:
                while chunk := tar_stream.read(CHUNK):
                    diff.update(chunk)
                    zipped.write(chunk)
        blob = Blob("sha256:" + counted.hash.hexdigest(), counted.size, "sha256:" + diff.hexdigest())
        os.replace(temp, blob_path(layout, blob.digest))
        return blob
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def image_config(layers: list[Blob], spec: ImageSpec, created: str | None = None,
                 architecture: str | None = None) -> dict:
    created = created or datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    return {
        "created": created,
        "architecture": architecture or host_architecture(),
        "os": "linux",
        "config": {"Env": list(spec.env), "Cmd": list(spec.cmd), "Labels": dict(spec.labels)},
        "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in layers]},
        "history": [{"created": created, "created_by": spec.created_by}],
    }


def write_image(layout: Path, layers: list[Blob], config: dict, tags: tuple[str, ...]) -> str:
    """Config, manifest and index.json (one entry per tag) for layers already in the layout;
    returns the manifest's digest."""
    config_blob = write_blob(layout, _canonical(config))
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": config_blob.digest, "size": config_blob.size},
        "layers": [{"mediaType": OCI_LAYER_GZIP, "digest": layer.digest, "size": layer.size} for layer in layers],
    }
    manifest_blob = write_blob(layout, _canonical(manifest))
    (layout / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": [
        {"mediaType": OCI_MANIFEST, "digest": manifest_blob.digest, "size": manifest_blob.size,
         "annotations": {REF_NAME: tag}} for tag in tags]}
    (layout / "index.json").write_text(json.dumps(index, indent=1))
    return manifest_blob.digest


def _canonical(document: dict) -> bytes:
    return json.dumps(document, sort_keys=True, separators=(",", ":")).encode()


def host_architecture() -> str:
    """The host's architecture in OCI's spelling (what a node's docker asks for)."""
    machine = os.uname().machine
    return {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "i686": "386", "i386": "386"}.get(machine, machine)


def tar_rootfs(rootfs: Path, out: Path, *, owned_by_root: bool = False) -> None:
    """An uncompressed tar of a root filesystem, in a stable order, without device nodes and caches."""
    argv = ["tar", "--create", "--file", str(out), "--directory", str(rootfs), "--numeric-owner", "--sort=name",
            "--one-file-system", *[f"--exclude={pattern}" for pattern in ROOTFS_EXCLUDES]]
    if owned_by_root:
        argv += ["--owner=0", "--group=0"]
    run([*argv, "."], timeout=15 * 60)


def layout_from_rootfs_tar(layout: Path, tar_stream: IO[bytes], spec: ImageSpec, tags: tuple[str, ...]) -> str:
    layer = write_layer(layout, tar_stream)
    return write_image(layout, [layer], image_config([layer], spec), tags)


# ---------------------------------------------------------------- files `lab image import` accepts


@dataclass(frozen=True)
class ImageFile:
    """What a file given to `lab image import` turned out to be."""

    kind: str                      # "docker-archive", "oci-archive" or "rootfs"
    path: Path
    names: tuple[str, ...] = ()    # references the file names (docker RepoTags, OCI ref names)

    def skopeo_source(self) -> str:
        return f"{self.kind}:{self.path}"


ROOTFS_TOP = frozenset({"bin", "etc", "usr", "lib", "sbin", "opt"})
EXPECTED = ("a `docker save` archive (manifest.json at its top), an OCI archive (oci-layout at its top) "
            "or a root filesystem tarball (bin/, etc/ or usr/ at its top; .tar, .tar.gz, .tar.xz, .tar.bz2)")


def detect_image_file(path: Path) -> ImageFile:
    """Tell a docker-archive, an OCI archive and a plain rootfs tarball apart by their members."""
    if not path.is_file():
        raise UsageError(f"{path}: no such file", hint=f"give {EXPECTED}")
    try:
        with tarfile.open(path, mode="r:*") as archive:
            top: set[str] = set()
            for member in archive:
                name = member.name.removeprefix("./").rstrip("/")
                if name == "manifest.json" and member.isfile():
                    return ImageFile("docker-archive", path, _docker_archive_names(archive, member, path))
                if name == "oci-layout" and member.isfile():
                    if _compression(path) is not None:
                        raise UsageError(f"{path} is a compressed OCI archive",
                                         hint="decompress it first (skopeo reads plain oci-archive tars)")
                    return ImageFile("oci-archive", path, _oci_archive_names(path))
                if name:
                    top.add(name.split("/", 1)[0])
    except (tarfile.TarError, EOFError, OSError, lzma.LZMAError, zlib.error) as exc:
        # tarfile's ReadError lists every compression it tried: noise to a user who gave a text file.
        detail = "" if isinstance(exc, tarfile.ReadError) else f" ({exc})"
        raise UsageError(f"{path} is not a tar archive lab can read{detail}", hint=f"give {EXPECTED}") from None
    if top & ROOTFS_TOP:
        return ImageFile("rootfs", path)
    shown = ", ".join(sorted(top)[:6]) or "nothing"
    raise UsageError(f"{path} is a tar archive but not an image: its top holds {shown}", hint=f"give {EXPECTED}")


def _docker_archive_names(archive: tarfile.TarFile, member: tarfile.TarInfo, path: Path) -> tuple[str, ...]:
    handle = archive.extractfile(member)
    try:
        entries = json.load(handle) if handle else None
    except ValueError:
        entries = None
    if not isinstance(entries, list) or not entries:
        raise UsageError(f"{path}: its manifest.json is not a `docker save` manifest", hint=f"give {EXPECTED}")
    if len(entries) > 1:
        raise UsageError(f"{path} holds {len(entries)} images; lab imports one image per file",
                         hint="save one image per file: docker save NAME:TAG -o FILE")
    return tuple(strip_registry(tag) for tag in entries[0].get("RepoTags") or ())


def _oci_archive_names(path: Path) -> tuple[str, ...]:
    with tarfile.open(path) as archive:
        try:
            handle = archive.extractfile(archive.getmember("index.json"))
        except KeyError:
            handle = None
            for member in archive:
                if member.name.removeprefix("./") == "index.json":
                    handle = archive.extractfile(member)
        try:
            index = json.load(handle) if handle else {}
        except ValueError:
            index = {}
    manifests = index.get("manifests") if isinstance(index, dict) else None
    if not manifests:
        raise UsageError(f"{path}: an OCI archive without an index.json listing an image", hint=f"give {EXPECTED}")
    if len(manifests) > 1:
        raise UsageError(f"{path} holds {len(manifests)} images; lab imports one image per file",
                         hint="export one image per file")
    ref = (manifests[0].get("annotations") or {}).get(REF_NAME, "")
    # A bare tag (`latest`) names no image; a full reference (`docker.io/library/x:1`) does.
    return (strip_registry(ref),) if "/" in ref or ":" in ref else ()


def _compression(path: Path) -> str | None:
    with open(path, "rb") as handle:
        magic = handle.read(6)
    if magic.startswith(b"\x1f\x8b"):
        return "gzip"
    if magic.startswith(b"\xfd7zXZ"):
        return "xz"
    if magic.startswith(b"BZh"):
        return "bzip2"
    return None


def open_uncompressed(path: Path) -> IO[bytes]:
    """The tar inside `path` as a stream, whatever compression tarfile accepted."""
    opener = {"gzip": gzip.open, "xz": lzma.open, "bzip2": bz2.open}.get(_compression(path) or "", open)
    return opener(path, "rb")


def default_name(image_file: ImageFile) -> str | None:
    """The NAME:TAG an import uses without --name: the file's own, else one made of a rootfs file's name."""
    if image_file.names:
        return image_file.names[0]
    if image_file.kind != "rootfs":
        return None
    stem = image_file.path.name.split(".tar")[0].split(".tgz")[0].lower()
    stem = re.sub(r"[^a-z0-9._-]+", "-", stem).strip("._-")
    return stem if stem and NAME_PATTERN.match(stem) else None


def rootfs_layout(image_file: ImageFile, work: Path) -> str:
    """Wrap a rootfs tarball into a one-layer OCI layout in `work`; returns the skopeo source."""
    labels = {DESCRIPTION: f"root filesystem imported by lab from {image_file.path.name}"}
    spec = ImageSpec(cmd=("/bin/sh",), labels=labels, created_by=f"lab image import {image_file.path.name}")
    with open_uncompressed(image_file.path) as stream:
        layout_from_rootfs_tar(work, stream, spec, ("import",))
    return f"oci:{work}:import"


# ---------------------------------------------------------------- the seeded images


@dataclass(frozen=True)
class SeededImage:
    name: str
    tags: tuple[str, ...]
    rootfs: str                    # which root filesystem: "busybox" or "debian"
    spec: ImageSpec

    @property
    def layout(self) -> Path:
        return container_images_dir() / self.name

    def source(self, tag: str) -> str:
        return f"oci:{self.layout}:{tag}"


SEEDED = (
    SeededImage("busybox", ("latest",), "busybox", ImageSpec(
        cmd=("sh",), created_by="lab: busybox-static from the host's Debian mirror",
        labels={DESCRIPTION: "BusyBox from Debian's busybox-static package (built offline by lab)"})),
    SeededImage("debian", (SEED_SUITE, "latest"), "debian", ImageSpec(
        cmd=("bash",), created_by=f"lab: debootstrap --variant=minbase {SEED_SUITE}",
        labels={DESCRIPTION: f"Debian {SEED_SUITE} minbase (built offline by lab from the host's mirror)"})),
    SeededImage("ubuntu", ("latest",), "debian", ImageSpec(
        cmd=("bash",), created_by=f"lab: debootstrap --variant=minbase {SEED_SUITE}, standing in for ubuntu",
        labels={DESCRIPTION: f"Debian {SEED_SUITE} minbase standing in for ubuntu (built offline by lab; "
                             "import a real one with `lab image import`)",
                STAND_IN: "ubuntu"})),
)


def container_images_dir() -> Path:
    return cache_dir() / "container-images"


def seeded_image(name: str) -> SeededImage | None:
    return next((image for image in SEEDED if image.name == name), None)


def is_built(image: SeededImage) -> bool:
    return (image.layout / "index.json").is_file()


def ensure_seeded(progress: Progress = lambda line: None) -> list[str]:
    """Build the seeded images the cache lacks and push the tags the registry storage lacks.

    Returns the NAME:TAGs pushed (none on a warm run, which reads only files). The first run
    costs one minbase debootstrap from the host's mirror (a minute or two); later ones are instant.
    """
    from lab.host.registry import push, stored_tags, writable

    missing = [(image, tag) for image in SEEDED for tag in image.tags if tag not in stored_tags(image.name)]
    if not missing:
        return []
    build_seeded({image.name for image, _ in missing}, progress)
    pushed = []
    with writable() as endpoint:
        for image, tag in missing:
            if tag in stored_tags(image.name):
                continue  # another `lab up` pushed it while this one waited for the lock
            progress(f"pushing {image.name}:{tag} into the lab registry")
            push(image.source(tag), endpoint, image.name, tag)
            pushed.append(f"{image.name}:{tag}")
    return pushed


def build_seeded(names: set[str], progress: Progress) -> None:
    """Write the OCI layouts of the named seeded images that are not cached yet."""
    from lab.host.registry import write_lock

    if all(is_built(image) for image in SEEDED if image.name in names):
        return
    if os.geteuid() != 0:
        raise PrerequisiteError("building the seeded container images needs root (debootstrap, dpkg-deb)",
                                hint="run lab as root, e.g. with sudo")
    root = container_images_dir()
    root.mkdir(parents=True, exist_ok=True)
    # Two `lab up` at once: the second waits for the first's build and then finds it done.
    with write_lock(BUILD_WAIT, root / ".build.lock", "building the seeded container images"), \
            tempfile.TemporaryDirectory(dir=root, prefix=".build-") as scratch:
        wanted = [image for image in SEEDED if image.name in names and not is_built(image)]
        work = Path(scratch)
        layers: dict[str, Blob] = {}
        for image in wanted:
            if image.rootfs not in layers:
                layers[image.rootfs] = _build_layer(image.rootfs, work, progress)
            _install_layout(image, work / f"{image.rootfs}.layer", layers[image.rootfs])


def _build_layer(rootfs_kind: str, work: Path, progress: Progress) -> Blob:
    """One gzip layer of the named root filesystem, in `work/KIND.layer/` (an OCI blobs tree)."""
    rootfs = work / f"{rootfs_kind}.rootfs"
    rootfs.mkdir()
    try:
        if rootfs_kind == "busybox":
            progress("busybox: unpacking busybox-static from the host's mirror")
            busybox_rootfs(rootfs, work)
        else:
            from lab.images.build import debootstrap
            from lab.images.recipes import host_debian_mirror

            debian_rootfs(rootfs, host_debian_mirror().rstrip("/"), debootstrap, progress)
        tar = work / f"{rootfs_kind}.tar"
        progress(f"{rootfs_kind}: packing the layer")
        tar_rootfs(rootfs, tar, owned_by_root=rootfs_kind == "busybox")
        with open(tar, "rb") as stream:
            layer = write_layer(work / f"{rootfs_kind}.layer", stream)
        tar.unlink()
        return layer
    finally:
        from lab.images.cache import delete_tree

        delete_tree(rootfs)  # unmounts whatever an interrupted debootstrap left mounted


def _install_layout(image: SeededImage, layer_tree: Path, layer: Blob) -> None:
    """Write the image's layout next to its final place, then move it there in one rename."""
    temp = image.layout.with_name(f".{image.name}.tmp-{os.getpid()}")
    shutil.rmtree(temp, ignore_errors=True)
    try:
        blob = blob_path(temp, layer.digest)
        blob.parent.mkdir(parents=True)
        os.link(blob_path(layer_tree, layer.digest), blob)  # debian and ubuntu share one layer file
        write_image(temp, [layer], image_config([layer], image.spec), image.tags)
        if image.layout.exists():
            shutil.rmtree(image.layout)
        temp.rename(image.layout)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise


def busybox_rootfs(rootfs: Path, work: Path) -> None:
    """/bin/busybox from busybox-static (apt-get download: the host's own mirror) and one link per applet."""
    download = work / "deb"
    download.mkdir()
    run(["apt-get", "download", "busybox-static"], cwd=download, timeout=300,
        hint="busybox comes from the host's apt mirror: check `apt-get update` works")
    debs = list(download.glob("busybox-static_*.deb"))
    if not debs:
        raise PrerequisiteError("apt-get download busybox-static fetched no package",
                                hint="check the host's apt sources (apt-cache policy busybox-static)")
    unpacked = work / "deb-unpacked"
    run(["dpkg-deb", "-x", str(debs[0]), str(unpacked)], timeout=120)
    binary = next((p for p in (unpacked / "bin/busybox", unpacked / "usr/bin/busybox") if p.is_file()), None)
    if binary is None:
        raise PrerequisiteError(f"{debs[0].name} holds no bin/busybox", hint="apt-cache show busybox-static")
    applets = run([str(binary), "--list"], timeout=30).stdout.split()
    fill_busybox_rootfs(rootfs, binary, applets)


def fill_busybox_rootfs(rootfs: Path, binary: Path, applets: list[str]) -> None:
    bin_dir = rootfs / "bin"
    bin_dir.mkdir(parents=True)
    shutil.copy2(binary, bin_dir / "busybox")
    os.chmod(bin_dir / "busybox", 0o755)
    for applet in applets:
        if applet != "busybox" and "/" not in applet:
            (bin_dir / applet).symlink_to("busybox")
    for directory, mode in (("etc", 0o755), ("root", 0o700), ("tmp", 0o1777), ("var", 0o755), ("home", 0o755),
                            ("proc", 0o555), ("sys", 0o555), ("dev", 0o755), ("usr", 0o755)):
        (rootfs / directory).mkdir(exist_ok=True)
        os.chmod(rootfs / directory, mode)
    (rootfs / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n"
                                       "nobody:x:65534:65534:nobody:/home:/bin/false\n")
    (rootfs / "etc/group").write_text("root:x:0:\nnogroup:x:65534:\n")


def debian_rootfs(rootfs: Path, mirror: str, debootstrap: Callable[..., None], progress: Progress) -> None:
    """A minbase Debian, trimmed of what a container image does not carry."""
    debootstrap(SEED_SUITE, mirror, rootfs, progress)
    for leftover in ("etc/hostname", "etc/resolv.conf", "etc/machine-id"):
        path = rootfs / leftover
        if path.is_file() or path.is_symlink():
            path.unlink()
    (rootfs / "etc/machine-id").write_text("")
