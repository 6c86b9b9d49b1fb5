"""Vagrant boxes of the node OS: one VM image, packaged per hypervisor.

`lab box build --format libvirt|virtualbox` builds the VM flavor of a node OS
image (lab.images.build), turns it into a disk that boots by itself
(lab.images.vmdisk) and packs what Vagrant expects of a box of that provider
into a `.box` file (a tar archive; Vagrant also takes gzip, but the disk
inside is already as small as it gets and packing stays fast):

- libvirt: `metadata.json` (provider, format qcow2, virtual size in GiB),
  `box.img` (qcow2), a `Vagrantfile` (vagrant-libvirt's box format v1).
- virtualbox: `box.ovf` (OVF 1.0 describing one VM with a SATA disk and a
  NAT NIC), `box-disk001.vmdk` (stream-optimized, as OVF packages carry),
  `metadata.json` (provider) and a `Vagrantfile` setting `base_mac`.

Box files are cached beside the images, keyed by the image key: a recipe
change makes the next build a miss. `lab box add` registers one with Vagrant
under the name lab's Vagrantfiles use (`lab-NAME-VERSION`), and removes the
copies vagrant-libvirt made of earlier builds in libvirt's storage pool.
"""

from __future__ import annotations

import json
import os
import shutil
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from xml.sax.saxutils import escape

from lab.errors import BoxError, LabError
from lab.host.files import write_atomic
from lab.host.paths import cache_dir
from lab.host.run import Result, run
from lab.host.vagrant import added_box_dirs, vagrant_box, vagrant_home

Progress = Callable[[str], None]

BOX_FORMATS = ("libvirt", "virtualbox")
# The MAC of the OVF's NIC; Vagrant gives it back to NIC 1 of every clone.
VIRTUALBOX_BASE_MAC = "0800274C4142"

_LIBVIRT_VAGRANTFILE = """\
# Lab OS box for vagrant-libvirt, written by `lab box build --format libvirt`.
Vagrant.configure("2") do |config|
  # Debian underneath: Vagrant configures its networks with systemd-networkd.
  config.vm.guest = :debian
  config.vm.provider :libvirt do |libvirt|
    libvirt.disk_bus = "virtio"
    libvirt.nic_model_type = "virtio"
  end
end
"""

_VIRTUALBOX_VAGRANTFILE = f"""\
# Lab OS box for VirtualBox, written by `lab box build --format virtualbox`.
Vagrant.configure("2") do |config|
  config.vm.guest = :debian
  config.vm.base_mac = "{VIRTUALBOX_BASE_MAC}"
end
"""


@dataclass(frozen=True)
class BoxFile:
    path: Path
    format: str
    name: str          # the recipe, e.g. labos
    version: str
    key: str           # the VM image's key
    size_bytes: int
    arch: str = "amd64"

    @property
    def vagrant_name(self) -> str:
        return vagrant_box_name_for(self.name, self.version, self.arch)


def vagrant_box_name_for(name: str, version: str, arch: str = "amd64") -> str:
    """The name a Lab OS box of recipe `name`, version `version`, is added to Vagrant under.

    Added from a file, a box has no version of its own (Vagrant shows 0), so
    the version is part of the name; no `/` in it, which Vagrant would take
    for a catalog's owner/name (lab.providers.vagrant.render.vagrant_box_name).
    """
    return f"lab-{name}-{version}" + ("" if arch == "amd64" else f"-{arch}")


def lab_boxes_added(formats: tuple[str, ...]) -> bool:
    """Has any Lab OS box (lab-NAME-VERSION) of one of these formats been added to Vagrant?"""
    return any(added_box_dirs(directory.name, fmt)
               for directory in (vagrant_home() / "boxes").glob(vagrant_box_name_for("*", "*")) for fmt in formats)


def box_options(name: str, version: str, arch: str = "") -> str:
    """The `lab box` options naming a box, as hints print them (defaults, this machine's arch, left out)."""
    from lab.images.recipes import native_arch

    return ((f" --version {version}" if version != "1" else "") + (f" --name {name}" if name != "labos" else "")
            + (f" --arch {arch}" if arch and arch != native_arch() else ""))


def boxes_dir() -> Path:
    return cache_dir() / "boxes"


def _box_path(name: str, version: str, key: str, fmt: str) -> Path:
    return boxes_dir() / f"{name}-{version}-{key}-{fmt}.box"


def _check_format(fmt: str) -> None:
    if fmt not in BOX_FORMATS:
        raise BoxError(f"unknown box format {fmt!r}", hint=f"choose one of: {', '.join(BOX_FORMATS)}")


def find_box(name: str, version: str, fmt: str, arch: str = "amd64") -> BoxFile | None:
    """The box file built from the current recipe, or None."""
    from lab.images.cache import image_key

    _check_format(fmt)
    key = image_key(name, version, "vm", arch)
    path = _box_path(name, version, key, fmt)
    if not path.is_file():
        return None
    return BoxFile(path=path, format=fmt, name=name, version=version, key=key, size_bytes=path.stat().st_size,
                   arch=arch)


def list_boxes() -> list[BoxFile]:
    found = []
    for path in sorted(boxes_dir().glob("*.box")) if boxes_dir().is_dir() else []:
        # NAME-VERSION-KEY-FORMAT.box; the version may itself contain dashes.
        stem = path.name[:-len(".box")]
        head, _, fmt = stem.rpartition("-")
        rest, _, key = head.rpartition("-")
        name, _, version = rest.partition("-")
        if fmt in BOX_FORMATS and len(key) == 12 and name and version:
            found.append(BoxFile(path=path, format=fmt, name=name, version=version, key=key,
                                 size_bytes=path.stat().st_size))
    return found


def remove_boxes(name: str, version: str | None = None) -> list[BoxFile]:
    doomed = [box for box in list_boxes() if box.name == name and version in (None, box.version)]
    for box in doomed:
        box.path.unlink(missing_ok=True)
    return doomed


def build_box(name: str, version: str, fmt: str, *, mirror: str | None = None,
              progress: Progress = lambda line: None, force: bool = False,
              disk_gib: int | None = None, arch: str = "amd64") -> BoxFile:
    """Build (or find cached) the `fmt` box of `name`/`version` for `arch` (amd64, arm64)."""
    from lab.images import vmdisk
    from lab.images.build import build_image
    from lab.images.recipes import load_recipe

    _check_format(fmt)
    vmdisk.check_tools()
    if arch != "amd64" and fmt != "libvirt":
        raise BoxError(f"{arch} boxes are built for libvirt only so far",
                       hint=f"lab box build --arch {arch} --format libvirt (README: arm64)")
    if not force and (box := find_box(name, version, fmt, arch)) is not None:
        return box
    image = build_image(name, version, mirror=mirror, progress=progress, force=force, flavor="vm", arch=arch)
    final = _box_path(name, version, image.key, fmt)
    final.parent.mkdir(parents=True, exist_ok=True)
    work = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    try:
        raw = work / "disk.raw"
        vmdisk.make_raw_disk(image.rootfs, raw, disk_gib=disk_gib or vmdisk.DEFAULT_DISK_GIB,
                             kind=load_recipe(name, version, "vm").vm_disk, arch=arch, progress=progress)
        progress(f"packing the {fmt} box")
        content = work / "box"
        content.mkdir()
        if fmt == "libvirt":
            vmdisk.convert(raw, content / "box.img", "qcow2")
            raw.unlink()
            size = vmdisk.virtual_size(content / "box.img")
            # `architecture`: Vagrant 2.4's box metadata (older ones ignore it); lab's own
            # name for the box carries it too (lab-labos-1-arm64), which every Vagrant understands.
            metadata = {"provider": "libvirt", "format": "qcow2", "virtual_size": -(-size // 2**30),
                        "architecture": arch}
            (content / "Vagrantfile").write_text(_LIBVIRT_VAGRANTFILE)
        else:
            disk = content / "box-disk001.vmdk"
            vmdisk.convert(raw, disk, "vmdk")
            raw.unlink()
            capacity = vmdisk.virtual_size(disk)
            (content / "box.ovf").write_text(ovf_descriptor(
                vm_name=f"{name}-{version}", disk_file=disk.name, disk_bytes=disk.stat().st_size,
                capacity_bytes=capacity))
            metadata = {"provider": "virtualbox", "architecture": arch}
            (content / "Vagrantfile").write_text(_VIRTUALBOX_VAGRANTFILE)
        (content / "metadata.json").write_text(json.dumps(metadata, indent=2) + "\n")
        packed = work / "packed.box"
        with tarfile.open(packed, "w") as archive:
            for member in sorted(content.iterdir()):
                archive.add(member, arcname=member.name)
        packed.rename(final)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    progress(f"built {final.name} ({final.stat().st_size / 2**20:.0f} MiB)")
    return BoxFile(path=final, format=fmt, name=name, version=version, key=image.key,
                   size_bytes=final.stat().st_size, arch=arch)


def ovf_descriptor(*, vm_name: str, disk_file: str, disk_bytes: int, capacity_bytes: int,
                   cpus: int = 1, memory_mib: int = 1024) -> str:
    """An OVF 1.0 envelope for one VM: SATA (AHCI) disk, one NAT NIC (E1000), Debian 64-bit.

    Only the generic OVF sections: VirtualBox imports them as they are, and
    Vagrant sets CPUs, memory, NICs and the name of every clone itself.
    """
    vm = escape(vm_name)
    return f"""<?xml version="1.0" encoding="UTF-8"?>
<!-- Written by lab box build for VirtualBox. -->
<Envelope ovf:version="1.0" xml:lang="en-US" xmlns="http://schemas.dmtf.org/ovf/envelope/1"
    xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1"
    xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData"
    xmlns:vssd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_VirtualSystemSettingData"
    xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">
  <References>
    <File ovf:id="file1" ovf:href="{escape(disk_file)}" ovf:size="{disk_bytes}"/>
  </References>
  <DiskSection>
    <Info>List of the virtual disks used in the package</Info>
    <Disk ovf:capacity="{capacity_bytes}" ovf:diskId="vmdisk1" ovf:fileRef="file1"
        ovf:format="http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"/>
  </DiskSection>
  <NetworkSection>
    <Info>Logical networks used in the package</Info>
    <Network ovf:name="NAT">
      <Description>Logical network used by this appliance.</Description>
    </Network>
  </NetworkSection>
  <VirtualSystem ovf:id="{vm}">
    <Info>A virtual machine</Info>
    <OperatingSystemSection ovf:id="96">
      <Info>The kind of installed guest operating system</Info>
      <Description>Debian_64</Description>
    </OperatingSystemSection>
    <VirtualHardwareSection>
      <Info>Virtual hardware requirements for a virtual machine</Info>
      <System>
        <vssd:ElementName>Virtual Hardware Family</vssd:ElementName>
        <vssd:InstanceID>0</vssd:InstanceID>
        <vssd:VirtualSystemIdentifier>{vm}</vssd:VirtualSystemIdentifier>
        <vssd:VirtualSystemType>virtualbox-2.2</vssd:VirtualSystemType>
      </System>
      <Item>
        <rasd:Caption>{cpus} virtual CPU</rasd:Caption>
        <rasd:Description>Number of virtual CPUs</rasd:Description>
        <rasd:ElementName>{cpus} virtual CPU</rasd:ElementName>
        <rasd:InstanceID>1</rasd:InstanceID>
        <rasd:ResourceType>3</rasd:ResourceType>
        <rasd:VirtualQuantity>{cpus}</rasd:VirtualQuantity>
      </Item>
      <Item>
        <rasd:AllocationUnits>MegaBytes</rasd:AllocationUnits>
        <rasd:Caption>{memory_mib} MB of memory</rasd:Caption>
        <rasd:Description>Memory Size</rasd:Description>
        <rasd:ElementName>{memory_mib} MB of memory</rasd:ElementName>
        <rasd:InstanceID>2</rasd:InstanceID>
        <rasd:ResourceType>4</rasd:ResourceType>
        <rasd:VirtualQuantity>{memory_mib}</rasd:VirtualQuantity>
      </Item>
      <Item>
        <rasd:Address>0</rasd:Address>
        <rasd:Caption>sataController0</rasd:Caption>
        <rasd:Description>SATA Controller</rasd:Description>
        <rasd:ElementName>sataController0</rasd:ElementName>
        <rasd:InstanceID>3</rasd:InstanceID>
        <rasd:ResourceSubType>AHCI</rasd:ResourceSubType>
        <rasd:ResourceType>20</rasd:ResourceType>
      </Item>
      <Item>
        <rasd:AddressOnParent>0</rasd:AddressOnParent>
        <rasd:Caption>disk1</rasd:Caption>
        <rasd:Description>Disk Image</rasd:Description>
        <rasd:ElementName>disk1</rasd:ElementName>
        <rasd:HostResource>/disk/vmdisk1</rasd:HostResource>
        <rasd:InstanceID>4</rasd:InstanceID>
        <rasd:Parent>3</rasd:Parent>
        <rasd:ResourceType>17</rasd:ResourceType>
      </Item>
      <Item>
        <rasd:AutomaticAllocation>true</rasd:AutomaticAllocation>
        <rasd:Caption>Ethernet adapter on 'NAT'</rasd:Caption>
        <rasd:Connection>NAT</rasd:Connection>
        <rasd:ElementName>Ethernet adapter on 'NAT'</rasd:ElementName>
        <rasd:InstanceID>5</rasd:InstanceID>
        <rasd:ResourceSubType>E1000</rasd:ResourceSubType>
        <rasd:ResourceType>10</rasd:ResourceType>
      </Item>
    </VirtualHardwareSection>
  </VirtualSystem>
</Envelope>
"""


def add_box(box: BoxFile, *, progress: Progress = lambda line: None) -> str:
    """Register a built box with Vagrant (replacing an older build); returns its Vagrant name."""
    name = box.vagrant_name
    progress(f"vagrant box add --name {name} {box.path.name}")
    vagrant_box("add", "--force", "--name", name, str(box.path))
    for directory in added_box_dirs(name, box.format):  # which build Vagrant now has: lab up compares it
        write_atomic(directory / ADDED_MARKER, json.dumps({"recipe": box.name, "version": box.version,
                                                           "key": box.key, "arch": box.arch}) + "\n")
    if box.format == "libvirt":
        for volume in remove_stale_libvirt_volumes(name):
            progress(f"removed {volume}, the libvirt copy of the box it replaces")
    return name


# Written by `lab box add` beside the box in Vagrant's directory (Vagrant ignores it): the build it added.
ADDED_MARKER = "lab-box.json"


def stale_added_box(name: str, version: str, fmt: str, arch: str = "amd64") -> str | None:
    """The key of the build Vagrant has of this Lab OS box when the recipe now gives another, else None
    (also None when lab cannot tell: not added, or added by hand)."""
    from lab.images.cache import image_key

    for directory in added_box_dirs(vagrant_box_name_for(name, version, arch), fmt):
        try:
            added = json.loads((directory / ADDED_MARKER).read_text())["key"]
            current = image_key(name, version, "vm", arch)
        except (OSError, ValueError, KeyError, TypeError, BoxError):
            continue
        if added != current:
            return added
    return None


def added_boxes() -> list[tuple[str, str]]:
    """(Vagrant name, provider) of every box added to Vagrant."""
    found, name = [], None
    for line in vagrant_box("list", "--machine-readable").splitlines():
        fields = line.split(",", 3)
        if len(fields) == 4 and fields[2] == "box-name":
            name = fields[3]
        elif len(fields) == 4 and fields[2] == "box-provider" and name is not None:
            found.append((name, fields[3]))
    return found


def remove_from_vagrant(name: str, version: str | None = None) -> list[str]:
    """Remove lab's boxes of recipe `name` from Vagrant, and libvirt's copies of them no VM uses.

    Returns what was removed, as "vagrant box NAME (PROVIDER)" and pool volume names.
    """
    # Exact names only: recipe names and versions may both hold dashes, so a
    # prefix would also catch another recipe's boxes (labos-dev for labos).
    from lab.images.recipes import ARCHES

    wanted = {vagrant_box_name_for(name, v, arch) for v in ([version] if version else _known_versions(name))
              for arch in ARCHES}
    removed = []
    for box, provider in added_boxes():
        if box in wanted:
            vagrant_box("remove", "--force", "--all", "--provider", provider, box)
            removed.append(f"vagrant box {box} ({provider})")
            if provider == "libvirt":
                removed += remove_stale_libvirt_volumes(box)
    return removed


def _known_versions(name: str) -> set[str]:
    """Versions of recipe `name`: in its recipe, and of images and box files built from it."""
    from lab.images.cache import list_images
    from lab.images.recipes import recipe_versions

    versions = {b.version for b in list_boxes() if b.name == name}
    versions |= {i.version for i in list_images() if i.name == name}
    try:
        versions |= set(recipe_versions(name))
    except (BoxError, OSError):
        pass  # a recipe removed or broken since: what was built from it still counts
    return versions


def _pool_volume_prefix(vagrant_name: str) -> str:
    return vagrant_name.replace("/", "-VAGRANTSLASH-") + "_vagrant_box_image_"


def current_libvirt_volume(vagrant_name: str) -> str | None:
    """The pool volume vagrant-libvirt makes of the box now added as `vagrant_name`.

    Lab's boxes are added without a version, and for those vagrant-libvirt
    names the copy after the box image's mtime (handle_box_image.rb).
    """
    for directory in added_box_dirs(vagrant_name, "libvirt", version="0"):
        try:
            return f"{_pool_volume_prefix(vagrant_name)}0_{int((directory / 'box.img').stat().st_mtime)}_box.img"
        except OSError:
            continue
    return None


def remove_stale_libvirt_volumes(vagrant_name: str, uri: str = "qemu:///system", keep: str | None = None) -> list[str]:
    """Delete the storage-pool copies of earlier builds of a box that no domain uses.

    vagrant-libvirt uploads a box into the `default` pool once, as
    `NAME_vagrant_box_image_VERSION_box.img` (for a box without a version:
    `0_MTIME`), and leaves it there; a box added again under the same name
    gets a new copy at its first `vagrant up`. A copy still backing some
    domain's disk is kept, and so is `keep` (the current build's copy).
    Best effort: without virsh or libvirtd, nothing (`lab up` tries again).
    """
    if shutil.which("virsh") is None:
        return []

    def virsh(*args: str) -> Result:
        return run(["virsh", "-q", "-c", uri, *args], check=False, timeout=60)

    try:
        return _remove_unused_volumes(vagrant_name, keep, virsh)
    except (LabError, OSError, ValueError):
        return []  # qemu-img missing, libvirtd hanging: best effort, as documented


def _remove_unused_volumes(vagrant_name: str, keep: str | None,
                           virsh: Callable[..., Result]) -> list[str]:
    listing = virsh("vol-list", "default")
    if not listing.ok:
        return []
    prefix = _pool_volume_prefix(vagrant_name)
    candidates = {words[0]: words[1] for words in (line.split() for line in listing.stdout.splitlines())
                  if len(words) >= 2 and words[0].startswith(prefix) and words[0] != keep}
    if not candidates:
        return []
    in_use = set()
    for domain in virsh("list", "--all", "--name").stdout.split():
        for line in virsh("domblklist", domain, "--details").stdout.splitlines():
            words = line.split()
            if len(words) >= 4 and words[1] == "disk" and words[3].startswith("/"):
                info = run(["qemu-img", "info", "-U", "--output=json", "--backing-chain", words[3]],
                           check=False, timeout=60)
                if not info.ok:
                    return []  # a disk whose backing chain we cannot read might use any of them: keep all
                in_use.update(layer.get("filename", "") for layer in json.loads(info.stdout))
    removed = []
    for volume, path in sorted(candidates.items()):
        if path not in in_use and virsh("vol-delete", "--pool", "default", volume).ok:
            removed.append(volume)
    return removed
