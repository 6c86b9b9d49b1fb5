"""What every VirtualBox box's OVF descriptor must say, checked the same way on
fixed inputs (tests/unit) and on real built boxes (tests/real/vm)."""

from __future__ import annotations

import xml.etree.ElementTree as ET

OVF = "{http://schemas.dmtf.org/ovf/envelope/1}"
RASD = "{http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData}"


def check_ovf(text: str, files: dict[str, int]) -> ET.Element:
    """The OVF parses, names only files that exist with their sizes, and wires a disk to a SATA controller."""
    root = ET.fromstring(text)
    references = {f.get(f"{OVF}href"): int(f.get(f"{OVF}size")) for f in root.iter(f"{OVF}File")}
    assert references == {name: size for name, size in files.items() if name.endswith(".vmdk")}
    disk = root.find(f"{OVF}DiskSection/{OVF}Disk")
    assert disk.get(f"{OVF}fileRef") == "file1" and disk.get(f"{OVF}diskId") == "vmdisk1"
    items = {item.findtext(f"{RASD}InstanceID"): item for item in root.iter(f"{OVF}Item")}
    by_type = {item.findtext(f"{RASD}ResourceType"): item for item in items.values()}
    controller, hard_disk, nic = by_type["20"], by_type["17"], by_type["10"]
    assert controller.findtext(f"{RASD}ResourceSubType") == "AHCI"
    assert hard_disk.findtext(f"{RASD}Parent") == controller.findtext(f"{RASD}InstanceID")
    assert hard_disk.findtext(f"{RASD}HostResource") == "/disk/vmdisk1"
    assert nic.findtext(f"{RASD}Connection") == "NAT"
    return root
