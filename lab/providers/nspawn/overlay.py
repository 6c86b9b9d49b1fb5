"""A node's root: an overlayfs of the read-only OS image and the node's own layer.

The lower layer is the image the node was created with and never changes (A/B
updates swap the /usr bound over it); the upper layer holds everything the
node writes, starting with its identity, written before its first boot.
Host code writes there only through the mounted overlay and nodefs (the
node's root owns every path below it); the supervisor reads boot.json from
the upper layer through nodefs too.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

from lab.host.files import to_lf
from lab.host.run import run
from lab.node import layout
from lab.providers.base import LabContext, NodeSeed
from lab.providers.nspawn import nodefs
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
        str(layout.NODE_INFO.relative_to("/")): context.node_info(node),
    }


def write_seed(merged: Path, image: Path, seed: NodeSeed) -> None:
    """A node's first-boot files and enabled units (see NodeSeed), written into its layer before it first
    boots, as `systemctl enable` would leave them. A file's owner is a user of the node's own passwd; ids
    are offset like the owner of the node's / (nspawn shifts them all into its user namespace at boot)."""
    root = merged.stat()
    users = _users(merged)
    for file in seed.files:
        if file.owner not in users:
            raise nodefs.UnsafeNodePath(f"{file.path}: no user {file.owner!r} in the node's /etc/passwd")
        uid = users[file.owner][0]  # the group stays root's, as `chown USER` over SSH leaves it
        nodefs.write_node_file(merged, file.path.lstrip("/"), to_lf(file.content), file.mode,
                               owner=(root.st_uid + uid, root.st_gid))
    seeded = {file.path for file in seed.files}
    for unit in seed.enabled_units:
        nodefs.link_node_file(merged, f"etc/systemd/system/multi-user.target.wants/{unit}",
                              _unit_path(unit, seeded, merged, image), owner=(root.st_uid, root.st_gid))


def _users(merged: Path) -> dict[str, tuple[int, int]]:
    users = {}
    for line in (nodefs.read_node_text(merged, "etc/passwd", cap=1 << 20) or "").splitlines():
        fields = line.split(":")
        if len(fields) >= 4 and fields[2].isdigit() and fields[3].isdigit():
            users[fields[0]] = (int(fields[2]), int(fields[3]))
    return users


def _unit_path(unit: str, seeded: set[str], merged: Path, image: Path) -> str:
    """Where the node finds `unit`, as the target of its enablement link: a seeded file, the node's /etc,
    or the image's /usr (read from the image: a node in a user namespace has its /usr masked)."""
    local = f"/etc/systemd/system/{unit}"
    if local in seeded or (merged / local.lstrip("/")).is_file():
        return local
    for directory in ("/lib/systemd/system", "/usr/lib/systemd/system"):  # where Debian's systemctl links
        if (image / directory.lstrip("/") / unit).is_file():
            return f"{directory}/{unit}"
    raise nodefs.UnsafeNodePath(f"no unit {unit} in the image {image} nor in the node's /etc")


def write_into_node(merged: Path, files: dict[str, str]) -> None:
    """Write files into the node's mounted root (before it boots); keys and authorized_keys are 0600,
    the rest 0644, all owned by the owner of the node's / (its root: uid 0, or the first uid of its
    user namespace). The node's root owns that tree: a symlink on the way is refused, never followed."""
    root = merged.stat()
    for relative, text in files.items():
        private_file = relative.endswith("_key") or "authorized_keys" in relative
        write_node_file(merged, relative, text.encode(), 0o600 if private_file else 0o644,
                        owner=(root.st_uid, root.st_gid))
