"""Per-lab subnets and host-level names that never collide between labs.

Every lab gets a short id (a hash of its directory) used in host-wide names
(bridge, machine names), and a /24 of its own. Subnets are claimed in a
per-user registry (one file per lab under `state_home()/labs`) under a lock,
so two `lab up` running at once in different projects still pick different
subnets, and a subnet already routed on the host is never used.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from lab.errors import PrerequisiteError, StateError
from lab.host.locks import holding
from lab.host.paths import private_dir, state_home
from lab.host.processes import alive, start_time
from lab.host.files import write_atomic
from lab.host.run import run

# 10.77.0.0/16 keeps clear of the usual Docker, libvirt and home ranges.
DEFAULT_POOL = ipaddress.IPv4Network("10.77.0.0/16")
# VirtualBox (6.1.28+) only allows host-only networks in 192.168.56.0/21 by default.
VIRTUALBOX_POOL = ipaddress.IPv4Network("192.168.56.0/21")
FIRST_NODE_HOST = 11  # node-1 is .11, node-2 .12, ...; .1 is the host's side
# A claim holds the registry lock for milliseconds plus one `ip route` (itself bounded at 30 s).
REGISTRY_LOCK_WAIT = 60.0


def host_address(subnet: str) -> str:
    """The host's own address on a lab network (.1): where the lab registry and DNS answer nodes."""
    return str(ipaddress.IPv4Network(subnet).network_address + 1)


def lab_id(lab_dir: Path) -> str:
    return hashlib.sha256(str(lab_dir.resolve()).encode()).hexdigest()[:6]


def node_addresses(subnet: ipaddress.IPv4Network, node_names: list[str]) -> dict[str, str]:
    """Addresses of a new lab's nodes: node-1 is .11, node-2 .12, ..."""
    return assign_addresses(subnet, node_names, {})


def assign_addresses(subnet: ipaddress.IPv4Network, node_names: list[str],
                     recorded: dict[str, str]) -> dict[str, str]:
    """Keep recorded addresses; give each other node the lowest free one from .11 up."""
    addresses = {name: recorded[name] for name in node_names if name in recorded}
    used = set(addresses.values())
    candidates = (str(subnet.network_address + host)
                  for host in range(FIRST_NODE_HOST, subnet.num_addresses - 1))
    for name in node_names:
        if name in addresses:
            continue
        for candidate in candidates:
            if candidate not in used:
                addresses[name] = candidate
                used.add(candidate)
                break
        else:
            raise PrerequisiteError(f"network.subnet {subnet} has no address left for {name}",
                                    hint="choose a larger network.subnet (e.g. a /24)")
    return {name: addresses[name] for name in node_names}


@dataclass(frozen=True)
class Claim:
    lab_id: str
    lab_dir: str
    name: str
    subnet: str


def _registry_dir() -> Path:
    return private_dir(state_home() / "labs")


@contextmanager
def _registry_lock() -> Iterator[None]:
    path = _registry_dir() / ".lock"
    with holding(path, f"a lab command (pid {os.getpid()}) claiming a subnet", REGISTRY_LOCK_WAIT,
                 busy=lambda holder: StateError(f"the registry of lab subnets ({path}) is busy: {holder} still holds "
                                                f"it after {REGISTRY_LOCK_WAIT:.0f} s",
                                                hint="wait for that command to finish, then retry")):
        yield


def claims() -> list[Claim]:
    """Subnets held by labs that still exist (a deleted lab directory frees its claim)."""
    found = []
    for path in sorted(_registry_dir().glob("*.json")):
        try:
            fields = json.loads(path.read_text())
            claimer = fields.pop("claimer", None)
            claim = Claim(**fields)
            ipaddress.IPv4Network(claim.subnet), Path(claim.lab_dir)  # a garbled subnet or directory: corrupt too
        except (OSError, ValueError, TypeError, AttributeError):
            continue  # a corrupt entry claims nothing; the next claim of that lab rewrites it
        # A claim holds while its lab exists, or while the `lab up` that made it
        # still runs: between the claim and the first state.json, a second
        # `lab up` must not take the same subnet.
        if (Path(claim.lab_dir) / "state.json").exists() or process_alive(claimer):
            found.append(claim)
    return found


def process_alive(claimer: object) -> bool:
    """Whether the process that wrote a claim ({"pid", "start"}) is still the same running process."""
    if not isinstance(claimer, dict) or not isinstance(claimer.get("pid"), int):
        return False
    return alive(claimer["pid"], claimer.get("start"))


def host_networks(ignore_devices: set[str] = frozenset()) -> list[tuple[ipaddress.IPv4Network, str]]:
    """IPv4 networks routed on this host, with the device carrying each."""
    if shutil.which("ip") is None:
        return []
    result = run(["ip", "-j", "-4", "route", "show", "table", "all"], check=False, timeout=30)
    if not result.ok:
        return []
    return parse_routes(result.stdout, ignore_devices)


def parse_routes(text: str, ignore_devices: set[str] = frozenset()) -> list[tuple[ipaddress.IPv4Network, str]]:
    networks = []
    for route in json.loads(text or "[]"):
        dst, dev = route.get("dst", ""), route.get("dev", "")
        if dst in ("default", "") or dev in ignore_devices or route.get("type") in ("local", "broadcast"):
            continue
        try:
            network = ipaddress.IPv4Network(dst, strict=False)
        except ValueError:
            continue
        if network.prefixlen > 0:
            networks.append((network, dev))
    return networks


def choose_subnet(ident: str, pool: ipaddress.IPv4Network,
                  taken: list[ipaddress.IPv4Network]) -> ipaddress.IPv4Network:
    """The first free /24 of `pool`, starting at a place derived from the lab id.

    Starting from the id (not from the pool's start) keeps a lab on the same
    subnet across destroy/up even when other labs come and go.
    """
    candidates = list(pool.subnets(new_prefix=24))
    start = int(ident, 16) % len(candidates)
    for offset in range(len(candidates)):
        candidate = candidates[(start + offset) % len(candidates)]
        if not any(candidate.overlaps(other) for other in taken):
            return candidate
    raise PrerequisiteError(f"no free /24 left in {pool}",
                            hint="destroy labs you no longer need (`lab destroy`) or set network.subnet")


def claim_subnet(lab_dir: Path, name: str, requested: ipaddress.IPv4Network | None,
                 pool: ipaddress.IPv4Network, own_devices: set[str]) -> ipaddress.IPv4Network:
    ident = lab_id(lab_dir)
    with _registry_lock():
        others = [c for c in claims() if c.lab_id != ident]
        routed = host_networks(ignore_devices=own_devices)
        if requested is not None:
            for claim in others:
                if requested.overlaps(ipaddress.IPv4Network(claim.subnet)):
                    raise PrerequisiteError(
                        f"network.subnet {requested} overlaps {claim.subnet} of lab {claim.name!r} in {claim.lab_dir}",
                        hint="pick another network.subnet, or leave it unset to get a free one")
            for network, dev in routed:
                if requested.overlaps(network):
                    raise PrerequisiteError(f"network.subnet {requested} is already in use on this host "
                                            f"({network} on {dev})",
                                            hint="pick another network.subnet, or leave it unset to get a free one")
            subnet = requested
        else:
            taken = [ipaddress.IPv4Network(c.subnet) for c in others] + [n for n, _ in routed]
            subnet = choose_subnet(ident, pool, taken)
        claim = Claim(lab_id=ident, lab_dir=str(lab_dir.resolve()), name=name, subnet=str(subnet))
        record = {**claim.__dict__, "claimer": {"pid": os.getpid(), "start": start_time(os.getpid())}}
        write_atomic(_registry_dir() / f"{ident}.json", json.dumps(record, indent=2) + "\n")
        return subnet


def release_subnet(lab_dir: Path) -> None:
    with _registry_lock():
        (_registry_dir() / f"{lab_id(lab_dir)}.json").unlink(missing_ok=True)


def ensure_claim_matches(lab_dir: Path, subnet: str) -> None:
    """Refuse to reuse a subnet another lab took while this one was destroyed or moved."""
    ident = lab_id(lab_dir)
    for claim in claims():
        if claim.lab_id != ident and ipaddress.IPv4Network(claim.subnet).overlaps(ipaddress.IPv4Network(subnet)):
            raise StateError(f"subnet {subnet} of this lab is now claimed by lab {claim.name!r} in {claim.lab_dir}",
                             hint="`lab destroy` this lab and `lab up` again to get a new subnet")
