"""Box recipes: load and validate `boxes/<name>/recipe.yaml`, and find the host's Debian mirror.

A box is a recipe directory shipped under `boxes/<name>/`: a `recipe.yaml`
(suite, packages, units to enable / disable / mask, per-version additions) and
a `rootfs/` tree of files copied into the image as-is. `load_recipe` merges the
shared and per-version sections into one `Recipe`, which lab/images/build.py
turns into an image.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterator

import yaml

from lab.errors import BoxError
from lab.host.paths import resource

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
UNIT_ACTIONS = ("enable", "disable", "mask")
_RECIPE_KEYS = {"os_name", "suite", "packages", "units", "versions"}
_OPTIONAL_RECIPE_KEYS = {"vm", "container"}
_VERSION_KEYS = {"packages", "units", "overlay"}
# An image is built for containers (nspawn nodes) or for VMs (Vagrant boxes):
# the VM flavor adds the recipe's `vm` section (a kernel, udev, Vagrant's user).
FLAVORS = ("container", "vm")
# Debian architectures lab builds images for: amd64 natively; arm64 on an amd64 host through
# qemu-user-static and binfmt_misc (a foreign debootstrap), natively on an arm64 host.
ARCHES = ("amd64", "arm64")
# What a VM image needs on an architecture beyond the recipe: arm64 boxes boot by UEFI (edk2) with
# systemd-boot, where amd64 boxes boot from a BIOS with SYSLINUX (lab/images/vmdisk.py).
ARCH_VM_PACKAGES = {"amd64": (), "arm64": ("systemd-boot-efi",)}


def host_arch() -> str:
    """This machine's Debian architecture name (amd64, arm64; another machine's name as it is)."""
    import platform

    machine = platform.machine().lower()
    return {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}.get(machine, machine)


def native_arch() -> str:
    """The architecture images are built for when none is named: this machine's (an arm64 host's nspawn
    nodes run arm64 images), amd64 where lab builds nothing for this machine's."""
    found = host_arch()
    return found if found in ARCHES else "amd64"


def for_arch(package: str, arch: str) -> str:
    """A recipe names architecture-specific packages by their amd64 name (linux-image-amd64): the
    same package of `arch` (linux-image-arm64)."""
    return package[: -len("-amd64")] + f"-{arch}" if package.endswith("-amd64") else package


# A VM disk: "root" (one root file system: the generic Debian box) or "usr-ab" (boot, USR-A, USR-B, root).
VM_DISK_LAYOUTS = ("root", "usr-ab")


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
    # How a VM disk of it is laid out (vmdisk.DISK_LAYOUTS): one root file system, or CoreOS's
    # two /usr slots beside a root that keeps /etc and /var (what `lab update` on a VM needs).
    vm_disk: str = "root"
    arch: str = "amd64"


def recipe_dir(name: str) -> Path:
    boxes = resource("boxes")
    path = boxes / name
    if not (path / "recipe.yaml").is_file():
        known = sorted(p.name for p in boxes.iterdir() if (p / "recipe.yaml").is_file())
        raise BoxError(f"unknown box {name!r}",
                       hint=f"known boxes: {', '.join(known) or '(none)'}")
    return path


def recipe_files(directory: Path) -> Iterator[Path]:
    for root, dirs, files in os.walk(directory):
        dirs.sort()
        for file in sorted(files):
            if file.endswith(".pyc") or "__pycache__" in root:
                continue
            yield Path(root) / file


def _recipe_data(name: str) -> tuple[Path, object]:
    path = recipe_dir(name) / "recipe.yaml"
    try:
        return path, yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise BoxError(f"{path}: not valid YAML: {error}") from None


def load_recipe(name: str, version: str, flavor: str = "container", arch: str = "amd64") -> Recipe:
    path, data = _recipe_data(name)
    recipe = parse_recipe(data, name=name, version=version, overlay=path.parent / "rootfs",
                          source=str(path), flavor=flavor)
    if arch not in ARCHES:
        raise BoxError(f"unknown architecture {arch!r}", hint=f"one of {', '.join(ARCHES)}")
    if arch == "amd64":
        return recipe
    extra = ARCH_VM_PACKAGES[arch] if flavor == "vm" else ()
    packages = tuple(dict.fromkeys([for_arch(p, arch) for p in recipe.packages] + list(extra)))
    return replace(recipe, packages=packages, arch=arch)


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
    units = {action: shared_units[action] + version_units[action] for action in UNIT_ACTIONS}
    version_overlay = _overlay(section, f"versions.{version}", overlay.parent, fail)
    vm_overlay = None
    vm = data.get("vm") or {}
    if not isinstance(vm, dict):
        raise fail("vm must be a mapping")
    _check_keys(vm, required=set(), allowed=_VERSION_KEYS | {"disk"}, where="vm", fail=fail)
    vm_disk = vm.get("disk", "root")
    if vm_disk not in VM_DISK_LAYOUTS:
        raise fail(f"vm.disk must be one of {', '.join(VM_DISK_LAYOUTS)}, not {vm_disk!r}")
    if flavor == "vm":
        if not vm:
            raise BoxError(f"box {name!r} has no `vm` section: it cannot be built as a VM box",
                           hint=f"add a vm: section to {source}")
        packages += _packages(vm.get("packages", []), "vm.packages", fail)
        vm_units = _units(vm.get("units", {}), "vm.units", fail)
        units = {action: units[action] + vm_units[action] for action in UNIT_ACTIONS}
        vm_overlay = _overlay(vm, "vm", overlay.parent, fail)
    container = data.get("container") or {}
    if not isinstance(container, dict):
        raise fail("container must be a mapping")
    _check_keys(container, required=set(), allowed={"units"}, where="container", fail=fail)
    if flavor == "container":  # what nspawn nodes need that a VM must not lose (its ACPI power button)
        container_units = _units(container.get("units", {}), "container.units", fail)
        units = {action: units[action] + container_units[action] for action in UNIT_ACTIONS}
    return Recipe(name=name, version=version, os_name=data["os_name"].strip(),
                  suite=data["suite"].strip(), packages=tuple(dict.fromkeys(packages)),
                  units={a: tuple(dict.fromkeys(u)) for a, u in units.items()},
                  overlay=overlay, version_overlay=version_overlay, flavor=flavor, vm_overlay=vm_overlay,
                  vm_disk=vm_disk)


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
        raise fail(f"{where} must be a mapping with keys {list(UNIT_ACTIONS)}")
    _check_keys(value, required=set(), allowed=set(UNIT_ACTIONS), where=where, fail=fail)
    units: dict[str, list[str]] = {}
    for action in UNIT_ACTIONS:
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
