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
import shutil
import uuid
from pathlib import Path

from lab.host.run import run
from lab.node import layout
from lab.providers.base import LabContext
from lab.providers.nspawn.nodefs import write_node_file


def metacopy_available() -> bool:
    """Whether overlayfs can copy up an inode's metadata alone (chown a tree without copying its data)."""
    return Path("/sys/module/overlay/parameters/metacopy").exists()


def usr_mask(directory: Path, image: Path) -> Path:
    """A layer holding only an opaque /usr with the image's os-release (nspawn checks for it before it
    binds /usr): put above the image, it hides the image's /usr, which the slot's /usr is bound over
    anyway, so chowning a node's tree into its user namespace skips 10 000 files."""
    usr = directory / "usr"
    if not (usr / "lib" / "os-release").is_file():
        (usr / "lib").mkdir(parents=True, exist_ok=True)
        os.setxattr(usr, "trusted.overlay.opaque", b"y")
        shutil.copyfile(image / "usr" / "lib" / "os-release", usr / "lib" / "os-release")
    return directory


def mount_overlay(lower: Path, upper: Path, work: Path, merged: Path, unprivileged: Path | None = None) -> None:
    """Mount the overlay at `merged`, unless it is mounted already. For a node in a user namespace,
    `unprivileged` is its usr_mask() layer, and metacopy is on: chown copies up inodes, not data."""
    if not os.path.ismount(merged):
        # metacopy is unsafe with an upper layer an attacker writes to
        # directly; a node writes only through the overlay, which refuses its
        # trusted.overlay.* attributes.
        lowers = f"{unprivileged}:{lower}" if unprivileged else str(lower)
        options = f"lowerdir={lowers},upperdir={upper},workdir={work}" + (",metacopy=on" if unprivileged else "")
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
