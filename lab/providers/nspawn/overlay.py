"""A node's root: an overlayfs of the read-only OS image and the node's own layer.

The lower layer is the image the node was created with and never changes (A/B
updates swap the /usr bound over it); the upper layer holds everything the
node writes, starting with its identity, written before its first boot.
Host code writes there only through the mounted overlay and nodefs (the
node's root owns every path below it); the supervisor reads boot.json from
the upper layer through nodefs too.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

from lab.host.run import run
from lab.node import layout
from lab.providers.base import LabContext
from lab.providers.nspawn.nodefs import write_node_file


def metacopy_available() -> bool:
    """Whether overlayfs can copy up an inode's metadata alone (chown a tree without copying its data)."""
    return Path("/sys/module/overlay/parameters/metacopy").exists()


def mount_overlay(lower: Path, upper: Path, work: Path, merged: Path, metacopy: bool = False) -> None:
    """Mount the overlay at `merged`, unless it is mounted already."""
    if not os.path.ismount(merged):
        # metacopy (for nodes in a user namespace only) is unsafe with an upper
        # layer an attacker writes to directly; a node writes only through the
        # overlay, which refuses its trusted.overlay.* attributes.
        options = f"lowerdir={lower},upperdir={upper},workdir={work}" + (",metacopy=on" if metacopy else "")
        run(["mount", "-t", "overlay", "overlay", "-o", options, str(merged)])


def identity_files(context: LabContext, node: str, host_key: tuple[str, str]) -> dict[str, str]:
    """What makes the node itself, written once before its first boot (relative path -> text):
    machine id, SSH host key, the lab's key for root."""
    private, public = host_key
    return {
        "etc/machine-id": uuid.uuid4().hex + "\n",
        "etc/ssh/ssh_host_ed25519_key": private,
        "etc/ssh/ssh_host_ed25519_key.pub": public,
        "root/.ssh/authorized_keys": context.ssh_key.with_suffix(".pub").read_text(),
    }


def fact_files(context: LabContext, node: str) -> dict[str, str]:
    """What the lab says about the node, written at every start (relative path -> text): hostname,
    address, the other nodes (a node added later is in them after the next start), lab facts."""
    ip = context.addresses[node]
    prefix = context.subnet.split("/")[1]
    hosts = "\n".join(f"{context.addresses[n.name]}\t{n.name}" for n in context.nodes)
    return {
        "etc/hostname": f"{node}\n",
        "etc/hosts": f"127.0.0.1\tlocalhost\n127.0.1.1\t{node}\n{hosts}\n",
        "etc/systemd/network/10-host0.network":
            f"[Match]\nName=host0\n\n[Network]\nAddress={ip}/{prefix}\nLinkLocalAddressing=no\n"
            "IPv6AcceptRA=no\n",
        str(layout.NODE_INFO.relative_to("/")):
            json.dumps({"lab": context.spec.name, "lab_id": context.lab_id, "node": node, "ip": ip,
                        "peers": context.addresses, "metadata": context.node(node).metadata}) + "\n",
    }


def write_into_node(merged: Path, files: dict[str, str]) -> None:
    """Write files into the node's mounted root (before it boots); keys and authorized_keys are 0600,
    the rest 0644, all owned by the owner of the node's / (its root: uid 0, or the first uid of its
    user namespace). The node's root owns that tree: a symlink on the way is refused, never followed."""
    root = merged.stat()
    for relative, text in files.items():
        private_file = relative.endswith("_key") or "authorized_keys" in relative
        write_node_file(merged, relative, text.encode(), 0o600 if private_file else 0o644,
                        owner=(root.st_uid, root.st_gid))
