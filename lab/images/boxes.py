"""Node OS images ("boxes"): build, find, list and remove them.

A box is a recipe directory shipped under `boxes/<name>/`: a `recipe.yaml`
(suite, packages, units to enable / disable / mask, per-version additions) and
a `rootfs/` tree of files copied into the image as-is. Building one runs
`debootstrap` against the host's Debian mirror and then customizes the result
so it boots under `systemd-nspawn --boot` with `/usr` bound read-only.

Images live in `cache_dir()/images/<name>-<version>-<key>/` with the root
filesystem in `rootfs/` and a `meta.json` describing the build. The key hashes
the recipe directory, so editing a recipe makes the next build a cache miss
while the old image stays usable until it is removed.
"""

from __future__ import annotations

import collections
import fcntl
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator

import yaml

from lab.errors import BoxError, PrerequisiteError
from lab.host.paths import cache_dir, resource

Progress = Callable[[str], None]

# Bumped when the customization steps in this module change in a way that
# changes the image, so the key (and therefore the cache) follows the code too.
_BUILDER_REVISION = "1"

_OUTPUT_TAIL_LINES = 25

# A plain Debian release suite: what debootstrap needs from a mirror. Suites
# like `bookworm-security` or `bookworm-updates` live elsewhere or are partial.
_DEBIAN_SUITES = frozenset({
    "buzz", "rex", "bo", "hamm", "slink", "potato", "woody", "sarge", "etch",
    "lenny", "squeeze", "wheezy", "jessie", "stretch", "buster", "bullseye",
    "bookworm", "trixie", "forky", "duke", "sid",
    "oldoldstable", "oldstable", "stable", "testing", "unstable",
})

_PACKAGE_NAME = re.compile(r"^[a-z0-9][a-z0-9+.-]+$")
_UNIT_NAME = re.compile(r"^[A-Za-z0-9@_.:\\-]+\.(service|socket|timer|target|path|mount|automount|swap|slice|device|scope)$")
_UNIT_ACTIONS = ("enable", "disable", "mask")
_RECIPE_KEYS = {"os_name", "suite", "packages", "units", "versions"}
_OPTIONAL_RECIPE_KEYS = {"vm"}
_VERSION_KEYS = {"packages", "units", "overlay"}
# An image is built for containers (nspawn nodes) or for VMs (Vagrant boxes):
# the VM flavor adds the recipe's `vm` section (a kernel, udev, Vagrant's user).
FLAVORS = ("container", "vm")


# --------------------------------------------------------------------------- #
# Images on disk
# --------------------------------------------------------------------------- #

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


def _image_path(name: str, version: str, key: str, flavor: str = "container") -> Path:
    suffix = "" if flavor == "container" else f"{flavor}-"
    return images_dir() / f"{name}-{version}-{suffix}{key}"


def _read_image(path: Path) -> Image | None:
    """The image in `path`, or None if it is incomplete or not an image at all."""
    try:
        meta = json.loads((path / "meta.json").read_text())
        image = Image(
            name=meta["name"], version=meta["version"], key=meta["key"],
            path=path, rootfs=path / "rootfs", size_bytes=int(meta["size_bytes"]),
            built_at=meta["built_at"], mirror=meta["mirror"], flavor=meta.get("flavor", "container"),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return image if image.rootfs.is_dir() else None


def find_image(name: str, version: str, flavor: str = "container") -> Image | None:
    """The cached image built from the current content of the recipe, or None."""
    key = image_key(name, version, flavor)
    return _read_image(_image_path(name, version, key, flavor))


def list_images() -> list[Image]:
    root = images_dir()
    if not root.is_dir():
        return []
    images = []
    for path in sorted(root.iterdir()):
        if ".tmp-" in path.name or ".old-" in path.name or not path.is_dir():
            continue
        image = _read_image(path)
        if image is not None:
            images.append(image)
    return images


def remove_images(name: str, version: str | None = None) -> list[Image]:
    """Delete every cached image of `name`, both flavors (optionally one version); returns them."""
    doomed = [image for image in list_images()
              if image.name == name and (version is None or image.version == version)]
    for image in doomed:
        _refuse_if_in_use(image.path)
    for image in doomed:
        _delete_tree(image.path)
        _build_lock(image.path).path.unlink(missing_ok=True)
    return doomed


# --------------------------------------------------------------------------- #
# Recipes
# --------------------------------------------------------------------------- #

@dataclass(frozen=True)
class Recipe:
    """One version of a box, with the shared and per-version sections merged."""

    name: str
    version: str
    os_name: str
    suite: str
    packages: tuple[str, ...]
    units: dict[str, tuple[str, ...]]   # "enable" / "disable" / "mask" -> units
    overlay: Path                       # rootfs/ tree copied into the image
    # versions/VERSION/rootfs/ of the recipe, copied over the shared tree: what
    # makes one OS version differ from another beyond its packages.
    version_overlay: Path | None = None
    flavor: str = "container"
    # The `vm` section's tree (VM flavor only), copied last.
    vm_overlay: Path | None = None


def recipe_dir(name: str) -> Path:
    boxes = resource("boxes")
    path = boxes / name
    if not (path / "recipe.yaml").is_file():
        known = sorted(p.name for p in boxes.iterdir() if (p / "recipe.yaml").is_file())
        raise BoxError(f"unknown box {name!r}",
                       hint=f"known boxes: {', '.join(known) or '(none)'}")
    return path


def _recipe_files(directory: Path) -> Iterator[Path]:
    for root, dirs, files in os.walk(directory):
        dirs.sort()
        for file in sorted(files):
            if file.endswith(".pyc") or "__pycache__" in root:
                continue
            yield Path(root) / file


def image_key(name: str, version: str, flavor: str = "container") -> str:
    """First 12 hex digits of a sha256 over the recipe dir's files, the version and the flavor."""
    directory = recipe_dir(name)
    digest = hashlib.sha256()
    for file in _recipe_files(directory):
        relative = file.relative_to(directory).as_posix().encode()
        # Lengths first, so no two different trees can hash the same byte stream.
        content = file.read_bytes() if not file.is_symlink() else os.readlink(file).encode()
        for part in (relative, content):
            digest.update(len(part).to_bytes(8, "big"))
            digest.update(part)
    digest.update(f"version={version}\0builder={_BUILDER_REVISION}".encode())
    if flavor != "container":  # container keys stay what they were before flavors existed
        digest.update(f"\0flavor={flavor}".encode())
    return digest.hexdigest()[:12]


def _recipe_data(name: str) -> tuple[Path, object]:
    path = recipe_dir(name) / "recipe.yaml"
    try:
        return path, yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise BoxError(f"{path}: not valid YAML: {error}") from None


def load_recipe(name: str, version: str, flavor: str = "container") -> Recipe:
    path, data = _recipe_data(name)
    return parse_recipe(data, name=name, version=version, overlay=path.parent / "rootfs",
                        source=str(path), flavor=flavor)


def recipe_versions(name: str) -> list[str]:
    """The versions recipe `name` declares (as `lab box build --version` takes them)."""
    path, data = _recipe_data(name)
    versions = data.get("versions") if isinstance(data, dict) else None
    if not isinstance(versions, dict):
        raise BoxError(f"{path}: versions must be a non-empty mapping of version -> section")
    return [str(key) for key in versions]


def parse_recipe(data: object, *, name: str, version: str, overlay: Path,
                 source: str = "recipe.yaml", flavor: str = "container") -> Recipe:
    """Validate a loaded recipe.yaml and merge the shared and `version` sections."""
    def fail(problem: str) -> BoxError:
        return BoxError(f"{source}: {problem}")

    if not isinstance(data, dict):
        raise fail("must be a mapping")
    _check_keys(data, required=_RECIPE_KEYS, allowed=_RECIPE_KEYS | _OPTIONAL_RECIPE_KEYS,
                where="top level", fail=fail)
    if flavor not in FLAVORS:
        raise BoxError(f"unknown image flavor {flavor!r}", hint=f"choose one of: {', '.join(FLAVORS)}")
    for field in ("os_name", "suite"):
        if not isinstance(data[field], str) or not data[field].strip():
            raise fail(f"{field} must be a non-empty string")
    versions = data["versions"]
    if not isinstance(versions, dict) or not versions:
        raise fail("versions must be a non-empty mapping of version -> section")
    sections = {str(key): value for key, value in versions.items()}
    if version not in sections:
        raise BoxError(f"box {name!r} has no version {version!r}",
                       hint=f"known versions: {', '.join(sorted(sections))}")
    section = sections[version] or {}
    if not isinstance(section, dict):
        raise fail(f"versions.{version} must be a mapping")
    _check_keys(section, required=set(), allowed=_VERSION_KEYS,
                where=f"versions.{version}", fail=fail)

    packages = _packages(data["packages"], "packages", fail) + \
        _packages(section.get("packages", []), f"versions.{version}.packages", fail)
    shared_units = _units(data["units"], "units", fail)
    version_units = _units(section.get("units", {}), f"versions.{version}.units", fail)
    units = {action: shared_units[action] + version_units[action] for action in _UNIT_ACTIONS}
    version_overlay = _overlay(section, f"versions.{version}", overlay.parent, fail)
    vm_overlay = None
    vm = data.get("vm") or {}
    if not isinstance(vm, dict):
        raise fail("vm must be a mapping")
    _check_keys(vm, required=set(), allowed=_VERSION_KEYS, where="vm", fail=fail)
    if flavor == "vm":
        if not vm:
            raise BoxError(f"box {name!r} has no `vm` section: it cannot be built as a VM box",
                           hint=f"add a vm: section to {source}")
        packages += _packages(vm.get("packages", []), "vm.packages", fail)
        vm_units = _units(vm.get("units", {}), "vm.units", fail)
        units = {action: units[action] + vm_units[action] for action in _UNIT_ACTIONS}
        vm_overlay = _overlay(vm, "vm", overlay.parent, fail)
    return Recipe(name=name, version=version, os_name=data["os_name"].strip(),
                  suite=data["suite"].strip(), packages=tuple(dict.fromkeys(packages)),
                  units={a: tuple(dict.fromkeys(u)) for a, u in units.items()},
                  overlay=overlay, version_overlay=version_overlay, flavor=flavor, vm_overlay=vm_overlay)


def _overlay(section: dict, where: str, recipe_root: Path, fail: Callable[[str], BoxError]) -> Path | None:
    if "overlay" not in section:
        return None
    value = section["overlay"]
    if not isinstance(value, str) or not value or ".." in Path(value).parts or Path(value).is_absolute():
        raise fail(f"{where}.overlay must be a directory inside the recipe, got {value!r}")
    path = recipe_root / value
    if not path.is_dir():
        raise fail(f"{where}.overlay: no directory {value!r} in the recipe")
    return path


def _check_keys(mapping: dict, *, required: set, allowed: set, where: str,
                fail: Callable[[str], BoxError]) -> None:
    unknown = set(map(str, mapping)) - allowed
    if unknown:
        raise fail(f"{where}: unknown keys {sorted(unknown)} (allowed: {sorted(allowed)})")
    missing = required - set(mapping)
    if missing:
        raise fail(f"{where}: missing keys {sorted(missing)}")


def _packages(value: object, where: str, fail: Callable[[str], BoxError]) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
        raise fail(f"{where} must be a list of package names")
    bad = [p for p in value if not _PACKAGE_NAME.match(p)]
    if bad:
        raise fail(f"{where}: not Debian package names: {bad}")
    return list(value)


def _units(value: object, where: str, fail: Callable[[str], BoxError]) -> dict[str, list[str]]:
    if not isinstance(value, dict):
        raise fail(f"{where} must be a mapping with keys {list(_UNIT_ACTIONS)}")
    _check_keys(value, required=set(), allowed=set(_UNIT_ACTIONS), where=where, fail=fail)
    units: dict[str, list[str]] = {}
    for action in _UNIT_ACTIONS:
        names = value.get(action) or []
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise fail(f"{where}.{action} must be a list of unit names")
        bad = [n for n in names if not _UNIT_NAME.match(n)]
        if bad:
            raise fail(f"{where}.{action}: not unit names (need a suffix like .service): {bad}")
        units[action] = list(names)
    return units


# --------------------------------------------------------------------------- #
# The host's Debian mirror
# --------------------------------------------------------------------------- #

def parse_apt_sources(text: str, deb822: bool) -> list[tuple[str, list[str]]]:
    """(uri, suites) of every enabled `deb` entry that carries the component `main`.

    `deb822` selects the `.sources` format; otherwise the one-line format of
    `sources.list` is parsed. Pure: no file access.
    """
    entries = _deb822_entries(text) if deb822 else _one_line_entries(text)
    return [(uri.rstrip("/"), suites) for uri, suites, components in entries
            if "main" in components]


def _one_line_entries(text: str) -> Iterator[tuple[str, list[str], list[str]]]:
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        # Options sit in brackets and may contain spaces: `[ arch=amd64 signed-by=/k ]`.
        line = re.sub(r"\[[^\]]*\]", " ", line)
        words = line.split()
        if len(words) >= 4 and words[0] == "deb":
            yield words[1], [words[2]], words[3:]


def _deb822_entries(text: str) -> Iterator[tuple[str, list[str], list[str]]]:
    for stanza in _deb822_stanzas(text):
        if stanza.get("enabled", "yes").strip().lower() == "no":
            continue
        if "deb" not in stanza.get("types", "").split():
            continue
        suites = stanza.get("suites", "").split()
        components = stanza.get("components", "").split()
        for uri in stanza.get("uris", "").split():
            yield uri, suites, components


def _deb822_stanzas(text: str) -> Iterator[dict[str, str]]:
    """Field -> value (lower-case field names) per blank-line separated stanza."""
    stanza: dict[str, str] = {}
    field = None
    for raw in text.splitlines():
        if raw.startswith("#"):
            continue
        if not raw.strip():
            if stanza:
                yield stanza
            stanza, field = {}, None
        elif raw[0] in " \t":
            if field is not None:   # a continuation line (e.g. an inline Signed-By key)
                stanza[field] += "\n" + raw.strip()
        elif ":" in raw:
            field, _, value = raw.partition(":")
            field = field.strip().lower()
            stanza[field] = value.strip()
    if stanza:
        yield stanza


def host_debian_mirror(sources_dir: Path = Path("/etc/apt")) -> str:
    """The first Debian mirror URI in the host's apt sources that serves a release suite."""
    for file, deb822 in _apt_source_files(sources_dir):
        try:
            text = file.read_text()
        except OSError:
            continue
        for uri, suites in parse_apt_sources(text, deb822):
            if any(suite in _DEBIAN_SUITES for suite in suites):
                return uri
    raise BoxError(f"no Debian mirror found in the apt sources under {sources_dir}",
                   hint="pass --mirror URL (a Debian mirror serving bookworm)")


def _apt_source_files(sources_dir: Path) -> Iterator[tuple[Path, bool]]:
    """Source files in the order apt reads them: sources.list, then sources.list.d/."""
    yield sources_dir / "sources.list", False
    parts = sources_dir / "sources.list.d"
    if parts.is_dir():
        for file in sorted(parts.iterdir()):
            if file.suffix in (".list", ".sources"):
                yield file, file.suffix == ".sources"


# --------------------------------------------------------------------------- #
# Building
# --------------------------------------------------------------------------- #

def build_image(name: str, version: str, *, mirror: str | None = None,
                progress: Progress | None = None, force: bool = False, flavor: str = "container") -> Image:
    """The image for `name`/`version`, built now unless the cache already has it."""
    report = progress or (lambda line: None)
    if not force and (image := find_image(name, version, flavor)) is not None:
        return image
    recipe = load_recipe(name, version, flavor)
    _check_build_prerequisites()
    mirror = (mirror or host_debian_mirror()).rstrip("/")
    key = image_key(name, version, flavor)
    final = _image_path(name, version, key, flavor)
    final.parent.mkdir(parents=True, exist_ok=True)

    # Two `lab up` at once must not both spend minutes building the same image:
    # the second waits here and then finds the first one's result.
    with _build_lock(final):
        if not force and (image := _read_image(final)) is not None:
            return image
        temp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
        _discard(temp)
        try:
            temp.mkdir()
            _debootstrap(recipe, mirror, temp / "rootfs", report)
            _customize(recipe, key, temp / "rootfs", report)
            _write_meta(temp, recipe, key, mirror)
            _install(temp, final)
        except BaseException:
            _discard(temp)
            raise
    image = _read_image(final)
    assert image is not None, f"{final} was just built but is unreadable"
    report(f"built {final.name} ({image.size_bytes / 1e6:.0f} MB)")
    return image


def _check_build_prerequisites() -> None:
    if os.geteuid() != 0:
        raise PrerequisiteError("building a node image needs root (debootstrap, chroot)",
                                hint="run lab as root, e.g. with sudo")
    for tool, package in (("debootstrap", "debootstrap"), ("chroot", "coreutils"),
                          ("umount", "mount")):
        if shutil.which(tool) is None:
            raise PrerequisiteError(f"`{tool}` is not on PATH",
                                    hint=f"apt-get install {package}")


class _build_lock:
    """An exclusive flock on a lock file next to the image, held while building."""

    def __init__(self, final: Path) -> None:
        self.path = final.with_name(f".{final.name}.lock")

    def __enter__(self) -> None:
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)   # releases the lock; the empty file may stay


def _debootstrap(recipe: Recipe, mirror: str, rootfs: Path, report: Progress) -> None:
    argv = ["debootstrap", "--variant=minbase", f"--include={','.join(recipe.packages)}",
            recipe.suite, str(rootfs), mirror]
    report(f"debootstrap {recipe.suite} from {mirror} ({len(recipe.packages)} extra packages)")
    tail: collections.deque[str] = collections.deque(maxlen=_OUTPUT_TAIL_LINES)
    # Its own session: on an interrupt we stop debootstrap *and* the dpkg and
    # chroot processes it started, before unmounting and deleting their tree.
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               stdin=subprocess.DEVNULL, text=True, errors="replace",
                               start_new_session=True)
    try:
        assert process.stdout is not None
        for line in process.stdout:
            line = line.rstrip()
            tail.append(line)
            report(line)
        status = process.wait()
    except BaseException:
        _stop(process)
        raise
    if status != 0:
        # debootstrap's own log names the package or URL that failed; its
        # console output often only says "see the log".
        log = rootfs / "debootstrap" / "debootstrap.log"
        log_tail = _tail(log.read_text(errors="replace")) if log.is_file() else ""
        raise BoxError(failure_message(argv, status, "\n".join(tail), log_tail),
                       hint="check that the mirror serves "
                            f"{recipe.suite} (pass another with --mirror URL)")


def _stop(process: subprocess.Popen) -> None:
    """Terminate a process and everything in its process group, politely first."""
    for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            continue
        # The leader is gone; give what is left of its group a moment to follow.
        deadline = time.monotonic() + grace
        while _group_alive(process.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if not _group_alive(process.pid):
            return


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _customize(recipe: Recipe, key: str, rootfs: Path, report: Progress) -> None:
    if recipe.flavor == "vm":
        # Before the overlay, which puts files into the new user's home.
        report("customize: the vagrant user")
        _chroot(rootfs, "useradd", "--create-home", "--user-group", "--shell", "/bin/bash", "vagrant")
    report("customize: copying the recipe's rootfs/ files")
    _copy_overlay(recipe.overlay, rootfs)
    if recipe.version_overlay is not None:
        _copy_overlay(recipe.version_overlay, rootfs)
    if recipe.vm_overlay is not None:
        _copy_overlay(recipe.vm_overlay, rootfs)
        _vagrant_conventions(rootfs)
        # The overlay may configure initramfs-tools (which modules): the
        # initramfs the kernel package made during debootstrap predates it.
        report("customize: regenerating the initramfs")
        _chroot(rootfs, "update-initramfs", "-u", "-k", "all")
    report("customize: os-release, identity, ssh host keys")
    _write_os_release(recipe, key, rootfs)
    _reset_identity(rootfs)
    report("customize: enabling, disabling and masking units")
    _write_preset(recipe, rootfs)
    _set_units(recipe, rootfs)
    _chroot(rootfs, "passwd", "--lock", "root")
    (rootfs / "var/log/journal").mkdir(parents=True, exist_ok=True)
    report("customize: cleaning apt caches")
    _clean_apt(rootfs)
    _mark_updated(rootfs)


def _vagrant_conventions(rootfs: Path) -> None:
    """Modes and owners Vagrant and sudo insist on (git keeps neither)."""
    ssh_dir = rootfs / "home/vagrant/.ssh"
    if ssh_dir.is_dir():
        os.chmod(ssh_dir, 0o700)
        for file in ssh_dir.iterdir():
            os.chmod(file, 0o600)
        _chroot(rootfs, "chown", "-R", "vagrant:vagrant", "/home/vagrant")
    for sudoers in (rootfs / "etc/sudoers.d").glob("*"):
        os.chmod(sudoers, 0o440)


def _copy_overlay(overlay: Path, rootfs: Path) -> None:
    """Copy files one by one: merged-/usr symlinks (/lib -> usr/lib) must stay links."""
    if not overlay.is_dir():
        return
    for source in _recipe_files(overlay):
        target = rootfs / source.relative_to(overlay)
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.is_symlink() or target.exists():
            target.unlink()
        shutil.copy2(source, target, follow_symlinks=False)


def _write_os_release(recipe: Recipe, key: str, rootfs: Path) -> None:
    v = recipe.version
    fields = {
        "NAME": recipe.os_name, "ID": recipe.name, "ID_LIKE": "debian",
        "VERSION_ID": v, "VERSION": f"{v} ({recipe.suite})",
        "PRETTY_NAME": f"{recipe.os_name} {v}", "VERSION_CODENAME": recipe.suite,
        "IMAGE_ID": recipe.name, "IMAGE_VERSION": v, "BUILD_ID": key,
    }
    text = "".join(f'{k}="{value}"\n' for k, value in fields.items())
    usr_os_release = rootfs / "usr/lib/os-release"
    usr_os_release.unlink(missing_ok=True)
    usr_os_release.write_text(text)
    etc_os_release = rootfs / "etc/os-release"
    etc_os_release.unlink(missing_ok=True)
    etc_os_release.symlink_to("../usr/lib/os-release")


def _reset_identity(rootfs: Path) -> None:
    """Nothing that must differ between nodes may be baked into the shared image."""
    for host_key in (rootfs / "etc/ssh").glob("ssh_host_*"):
        host_key.unlink()
    # Empty (not absent): systemd then treats each node's first boot as such and
    # gives it a fresh machine id, while the file stays a valid mount point.
    (rootfs / "etc/machine-id").write_text("")
    (rootfs / "var/lib/dbus/machine-id").unlink(missing_ok=True)
    (rootfs / "etc/hostname").write_text("localhost\n")
    # debootstrap copies the build host's resolv.conf; nspawn provides one per node.
    (rootfs / "etc/resolv.conf").unlink(missing_ok=True)


def _write_preset(recipe: Recipe, rootfs: Path) -> None:
    """A preset matching the recipe: systemd applies presets on a node's first
    boot (empty machine-id) and must not re-enable what the recipe disables."""
    lines = [f"enable {u}" for u in recipe.units["enable"]]
    lines += [f"disable {u}" for u in recipe.units["disable"]]
    preset = rootfs / "usr/lib/systemd/system-preset/10-labos.preset"
    preset.parent.mkdir(parents=True, exist_ok=True)
    preset.write_text(f"# {recipe.os_name}: from boxes/{recipe.name}/recipe.yaml\n"
                      + "\n".join(lines) + "\n")


def _set_units(recipe: Recipe, rootfs: Path) -> None:
    # systemctl enable/disable/mask only edit symlinks, which works in a chroot
    # without a running systemd; the image's own systemctl knows its own layout.
    for action in _UNIT_ACTIONS:
        if recipe.units[action]:
            _chroot(rootfs, "systemctl", action, *recipe.units[action])


def _clean_apt(rootfs: Path) -> None:
    for archive in (rootfs / "var/cache/apt/archives").glob("*.deb"):
        archive.unlink()
    for cache in (rootfs / "var/cache/apt").glob("*.bin"):
        cache.unlink()
    lists = rootfs / "var/lib/apt/lists"
    if lists.is_dir():
        for entry in lists.iterdir():
            if entry.name in ("partial", "lock"):
                continue
            entry.unlink() if not entry.is_dir() or entry.is_symlink() else shutil.rmtree(entry)


def _mark_updated(rootfs: Path) -> None:
    """Record that /etc and /var match this /usr, as systemd-update-done would.

    Units with ConditionNeedsUpdate= (systemd-sysusers here) otherwise run on
    every node's boot and copy files up into its layer; dpkg already did their
    work. Debian ships no systemd-update-done, so write its stamp ourselves.
    Runs last: the stamp must carry /usr's final mtime.
    """
    usr_mtime_ns = (rootfs / "usr").stat().st_mtime_ns
    stamp = ("# Written by lab's image builder in place of systemd-update-done.\n"
             f"TIMESTAMP_NSEC={usr_mtime_ns}\n")
    for directory in ("etc", "var"):
        updated = rootfs / directory / ".updated"
        updated.write_text(stamp)
        os.utime(updated, ns=(usr_mtime_ns, usr_mtime_ns))


def _chroot(rootfs: Path, *command: str) -> None:
    argv = ["chroot", str(rootfs), *command]
    result = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, text=True, errors="replace")
    if result.returncode != 0:
        raise BoxError(failure_message(argv, result.returncode, result.stdout))


def _write_meta(temp: Path, recipe: Recipe, key: str, mirror: str) -> None:
    meta = {
        "name": recipe.name, "version": recipe.version, "key": key, "mirror": mirror, "flavor": recipe.flavor,
        "built_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "size_bytes": _disk_usage(temp / "rootfs"),
    }
    (temp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")


def _install(temp: Path, final: Path) -> None:
    """Move a finished build into place; with force, replace the old image."""
    if final.exists():
        _refuse_if_in_use(final)
        old = final.with_name(f"{final.name}.old-{os.getpid()}")
        final.rename(old)
        temp.rename(final)
        _delete_tree(old)
    else:
        temp.rename(final)


def _disk_usage(path: Path) -> int:
    """Bytes allocated below `path`, each hard-linked file counted once, like du."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            stat = os.lstat(os.path.join(root, name))
            if (stat.st_dev, stat.st_ino) in seen:
                continue
            seen.add((stat.st_dev, stat.st_ino))
            total += stat.st_blocks * 512
    return total


def failure_message(argv: list[str], status: int, output: str, log_tail: str = "") -> str:
    message = f"`{shlex.join(argv)}` exited {status}"
    for title, text in (("output", output), ("debootstrap.log", log_tail)):
        text = _tail(text)
        if text:
            message += f"\n  last lines of {title}:\n" + "\n".join(
                "    " + line for line in text.splitlines())
    return message


def _tail(text: str, lines: int = _OUTPUT_TAIL_LINES) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


# --------------------------------------------------------------------------- #
# Mounts and deletion
# --------------------------------------------------------------------------- #

@dataclass(frozen=True)
class _Mount:
    mount_point: Path
    fs_type: str
    super_options: str


def _unescape_mountinfo(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as \\ooo octal."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _mounts() -> list[_Mount]:
    mounts = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        before, _, after = line.partition(" - ")
        fields, tail = before.split(), after.split()
        if len(fields) < 5 or len(tail) < 3:
            continue
        mounts.append(_Mount(Path(_unescape_mountinfo(fields[4])), tail[0],
                             _unescape_mountinfo(tail[2])))
    return mounts


def _is_below(path: Path, top: Path) -> bool:
    return path == top or top in path.parents


def _refuse_if_in_use(path: Path) -> None:
    """Nodes boot from overlays whose lower layer is an image: never pull it away."""
    rootfs_names = {str(path / "rootfs"), str(path.resolve() / "rootfs")}
    for mount in _mounts():
        if mount.fs_type == "overlay" and any(r in mount.super_options for r in rootfs_names):
            raise BoxError(f"image {path.name} is in use by the overlay at {mount.mount_point}",
                           hint="stop the labs using it (lab down) first")


def _unmount_below(top: Path) -> None:
    """Unmount everything mounted at or below `top`, deepest first."""
    below = sorted({m.mount_point for m in _mounts() if _is_below(m.mount_point, top)},
                   key=lambda p: len(p.parts), reverse=True)
    for mount_point in below:
        result = subprocess.run(["umount", str(mount_point)], capture_output=True)
        if result.returncode != 0:
            # Busy (a process of an interrupted build still inside): detach it
            # now; the kernel finishes the unmount when the last user is gone.
            subprocess.run(["umount", "--lazy", str(mount_point)], capture_output=True)


def _delete_tree(path: Path) -> None:
    path = path.resolve()
    _unmount_below(path)
    if any(_is_below(m.mount_point, path) for m in _mounts()):
        raise BoxError(f"cannot delete {path}: something is still mounted below it",
                       hint=f"see `findmnt -R {path}`")
    shutil.rmtree(path, ignore_errors=False)


def _discard(temp: Path) -> None:
    """Remove a half-built image, whatever state the failed build left it in."""
    if temp.exists():
        _delete_tree(temp)
