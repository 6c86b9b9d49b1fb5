"""A node's root: an overlayfs of the read-only OS image and the node's own layer.

The lower layer is the image the node was created with and never changes (A/B
updates swap the /usr bound over it); the upper layer holds everything the
node writes, starting with its identity, written before its first boot.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

from lab.host.run import run
from lab.node import layout
from lab.providers.base import LabContext


def mount_overlay(lower: Path, upper: Path, work: Path, merged: Path) -> None:
    """Mount the overlay at `merged`, unless it is mounted already."""
    if not os.path.ismount(merged):
        run(["mount", "-t", "overlay", "overlay", "-o",
             f"lowerdir={lower},upperdir={upper},workdir={work}", str(merged)])


def _mkdirs_like(upper: Path, relative: Path, lower: Path) -> None:
    """Create parents in the upper layer with the lower layer's mode, so /root stays 0700."""
    current_upper, current_lower = upper, lower
    for part in relative.parts:
        current_upper, current_lower = current_upper / part, current_lower / part
        if not current_upper.exists():
            current_upper.mkdir()
            mode = current_lower.stat().st_mode & 0o7777 if current_lower.exists() else 0o755
            os.chmod(current_upper, mode)


def identity_files(context: LabContext, node: str, host_key: tuple[str, str]) -> dict[str, str]:
    """Per-node identity (relative path -> text): hostname, address, host key, lab facts."""
    private, public = host_key
    ip = context.addresses[node]
    prefix = context.subnet.split("/")[1]
    hosts = "\n".join(f"{context.addresses[n.name]}\t{n.name}" for n in context.nodes)
    return {
        "etc/hostname": f"{node}\n",
        "etc/hosts": f"127.0.0.1\tlocalhost\n127.0.1.1\t{node}\n{hosts}\n",
        "etc/machine-id": uuid.uuid4().hex + "\n",
        "etc/systemd/network/10-host0.network":
            f"[Match]\nName=host0\n\n[Network]\nAddress={ip}/{prefix}\nLinkLocalAddressing=no\n"
            "IPv6AcceptRA=no\n",
        "etc/ssh/ssh_host_ed25519_key": private,
        "etc/ssh/ssh_host_ed25519_key.pub": public,
        "root/.ssh/authorized_keys": context.ssh_key.with_suffix(".pub").read_text(),
        str(layout.NODE_INFO.relative_to("/")):
            json.dumps({"lab": context.spec.name, "lab_id": context.lab_id, "node": node, "ip": ip,
                        "peers": context.addresses, "metadata": context.node(node).metadata}) + "\n",
    }


def write_into_layer(upper: Path, lower: Path, files: dict[str, str]) -> None:
    """Write files into the upper layer; keys and authorized_keys are 0600, the rest 0644."""
    for relative, text in files.items():
        target = upper / relative
        _mkdirs_like(upper, Path(relative).parent, lower)
        target.write_text(text)
        private_file = relative.endswith("_key") or "authorized_keys" in relative
        os.chmod(target, 0o600 if private_file else 0o644)
