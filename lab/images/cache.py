"""The image cache: find, list and remove built node images; each image's key.

Images live in `cache_dir()/images/<name>-<version>-<key>/` with the root
filesystem in `rootfs/` and a `meta.json` describing the build. The key hashes
the recipe directory, so editing a recipe makes the next build a cache miss
while the old image stays usable until it is removed. An image a node's
overlay still uses, or a lab boots or has staged, is never removed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from lab.errors import BoxError
from lab.host.files import to_lf
from lab.host.mounts import is_below, mounted, unmount_below
from lab.host.paths import cache_dir
from lab.images import recipes

# Bumped when the customization steps of lab/images/build.py change in a way
# that changes the image, so the key (and therefore the cache) follows the code too.
BUILDER_REVISION = "1"


@dataclass(frozen=True)
class Image:
    name: str
    version: str
    key: str
    path: Path
    rootfs: Path
    size_bytes: int
    built_at: str
    mirror: str
    flavor: str = "container"
    arch: str = "amd64"

    @property
    def os_release(self) -> dict[str, str]:
        return parse_os_release((self.rootfs / "usr/lib/os-release").read_text())


def parse_os_release(text: str) -> dict[str, str]:
    """KEY=value lines with shell quoting, as os-release(5) defines them."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        words = shlex.split(value) if value else [""]
        fields[key] = words[0] if words else ""
    return fields


def images_dir() -> Path:
    return cache_dir() / "images"


def is_cached_rootfs(path: str | Path) -> bool:
    """Whether path (symlinks resolved) is the rootfs of an image lab built: `<cache>/images/<entry>/rootfs`
    with the entry's meta.json beside it. Any user's cache counts (a lab keeps the image it was made with
    when XDG_CACHE_HOME changes); `/`, `/usr` or a directory that is not an image entry never does."""
    real = Path(os.path.realpath(path))
    return (real.name == "rootfs" and real.parent.parent.name == "images" and real.is_dir()
            and (real.parent / "meta.json").is_file())


def image_path(name: str, version: str, key: str, flavor: str = "container", arch: str = "amd64") -> Path:
    suffix = ("" if flavor == "container" else f"{flavor}-") + ("" if arch == "amd64" else f"{arch}-")
    return images_dir() / f"{name}-{version}-{suffix}{key}"


def read_image(path: Path) -> Image | None:
    """The image in `path`, or None if it is incomplete or not an image at all."""
    try:
        meta = json.loads((path / "meta.json").read_text())
        image = Image(
            name=meta["name"], version=meta["version"], key=meta["key"],
            path=path, rootfs=path / "rootfs", size_bytes=int(meta["size_bytes"]),
            built_at=meta["built_at"], mirror=meta["mirror"], flavor=meta.get("flavor", "container"),
            arch=meta.get("arch", "amd64"),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return image if image.rootfs.is_dir() else None


def find_image(name: str, version: str, flavor: str = "container", arch: str | None = None) -> Image | None:
    """The cached image built from the current content of the recipe, or None (arch: this machine's)."""
    arch = arch or recipes.native_arch()
    key = image_key(name, version, flavor, arch)
    return read_image(image_path(name, version, key, flavor, arch))


def list_images() -> list[Image]:
    root = images_dir()
    if not root.is_dir():
        return []
    images = []
    for path in sorted(root.iterdir()):
        if ".tmp-" in path.name or ".old-" in path.name or not path.is_dir():
            continue
        image = read_image(path)
        if image is not None:
            images.append(image)
    return images


def matching_images(name: str, version: str | None = None) -> list[Image]:
    """Every cached image of `name`, both flavors (optionally one version)."""
    return [image for image in list_images() if image.name == name and (version is None or image.version == version)]


def remove_images(name: str, version: str | None = None, users: Mapping[str, list[str]] | None = None) -> list[Image]:
    """Delete every cached image of `name`, both flavors (optionally one version); returns them.

    `users`: the labs that boot or have staged each image rootfs (real path ->
    labs, from `lab.core`); an image any of them uses is refused, as is one
    a mounted overlay still uses.
    """
    doomed = matching_images(name, version)
    for image in doomed:
        refuse_if_in_use(image.path, users)
    for image in doomed:
        delete_tree(image.path)
        lock_path(image.path).unlink(missing_ok=True)
    return doomed


def image_key(name: str, version: str, flavor: str = "container", arch: str = "amd64") -> str:
    """First 12 hex digits of a sha256 over the recipe dir's files, the version, the flavor and the arch."""
    directory = recipes.recipe_dir(name)
    digest = hashlib.sha256()
    for file in recipes.recipe_files(directory):
        relative = file.relative_to(directory).as_posix().encode()
        # Lengths first, so no two different trees can hash the same byte stream.
        # As the build copies it (LF): a CRLF checkout builds, and so names, the same image.
        content = to_lf(file.read_bytes()) if not file.is_symlink() else os.readlink(file).encode()
        for part in (relative, content):
            digest.update(len(part).to_bytes(8, "big"))
            digest.update(part)
    digest.update(f"version={version}\0builder={BUILDER_REVISION}".encode())
    if flavor != "container":  # container keys stay what they were before flavors existed
        digest.update(f"\0flavor={flavor}".encode())
    if arch != "amd64":  # amd64 keys stay what they were before architectures existed
        digest.update(f"\0arch={arch}".encode())
    return digest.hexdigest()[:12]


def lock_path(final: Path) -> Path:
    """The lock file a build of the image at `final` holds (beside it, so it outlives a failed build)."""
    return final.with_name(f".{final.name}.lock")


def refuse_if_in_use(path: Path, users: Mapping[str, list[str]] | None = None) -> None:
    """Nodes boot from overlays whose lower layer is an image: never pull it away, from a running
    node (its overlay) or from a lab that boots it again or has it staged (`users`, see remove_images)."""
    labs = (users or {}).get(os.path.realpath(path / "rootfs"))
    if labs:
        raise BoxError(f"image {path.name} is in use by {', '.join(labs)}",
                       hint="destroy the labs using it first (`lab destroy` in their project): a halted lab "
                            "boots it again on `lab up`, a staged update on its next reboot")
    rootfs_names = {str(path / "rootfs"), str(path.resolve() / "rootfs")}
    for mount in mounted():
        if mount.fs_type == "overlay" and any(r in mount.super_options for r in rootfs_names):
            raise BoxError(f"image {path.name} is in use by the overlay at {mount.mount_point}",
                           hint="halt or destroy the labs using it first (`lab halt` or `lab destroy` in their project)")


def delete_tree(path: Path) -> None:
    """Delete an image's directory (or a half-built one), unmounting what a build left mounted in it."""
    path = path.resolve()
    unmount_below(path)
    if any(is_below(m.mount_point, path) for m in mounted()):
        raise BoxError(f"cannot delete {path}: something is still mounted below it",
                       hint=f"see `findmnt -R {path}`")
    shutil.rmtree(path, ignore_errors=False)
