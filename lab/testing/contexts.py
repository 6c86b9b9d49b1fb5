"""A `LabContext` built from spec data, for tests of code below the core
(renderers, providers' pure parts) that need one without a lab on disk."""

from __future__ import annotations

import ipaddress
from pathlib import Path

from lab.host.network import node_addresses
from lab.model.spec import LabSpec
from lab.providers.base import LabContext


def make_context(tmp_path: Path, data: dict, *, lab_id: str, subnet: str) -> LabContext:
    """The context of a lab named by `data` living in tmp_path/project (nothing is created)."""
    spec = LabSpec.model_validate(data)
    nodes = spec.node_specs()
    lab_dir = tmp_path / "project" / ".lab" / spec.name
    return LabContext(spec=spec, lab_dir=lab_dir, lab_id=lab_id, nodes=nodes,
                      addresses=node_addresses(ipaddress.IPv4Network(subnet), [n.name for n in nodes]),
                      subnet=subnet, ssh_key=lab_dir / "ssh" / "id_ed25519",
                      known_hosts=lab_dir / "ssh" / "known_hosts")
