"""The lab's host network: one bridge per lab, and nftables for partitions.

The bridge `lab-<id>` carries the lab subnet (the host side is .1); each
node's veth (`vb-<machine>`, made by systemd-nspawn) is enslaved to it. A
partition is one nftables table of the `bridge` family, created on first use:
traffic between groups is dropped on the bridge itself.
"""

from __future__ import annotations

from pathlib import Path

from lab.host.network import host_address
from lab.host.run import run
from lab.providers.base import Progress


def link_exists(name: str) -> bool:
    return Path(f"/sys/class/net/{name}").exists()


def delete_link(name: str) -> None:
    """Delete a network link by name or altname, if it exists."""
    run(["ip", "link", "delete", name], check=False)


def ensure_bridge(bridge: str, subnet: str, progress: Progress) -> None:
    """The bridge exists, carries the host's address (.1) in the subnet and is up."""
    if not link_exists(bridge):
        progress(f"creating bridge {bridge} for {subnet}")
        run(["ip", "link", "add", "name", bridge, "type", "bridge"])
    prefix = subnet.split("/")[1]
    host_ip = host_address(subnet)
    addresses = run(["ip", "-4", "-o", "addr", "show", "dev", bridge]).stdout
    if f" {host_ip}/{prefix} " not in addresses:
        run(["ip", "addr", "add", f"{host_ip}/{prefix}", "dev", bridge])
    run(["ip", "link", "set", bridge, "up"])


def delete_bridge(bridge: str) -> None:
    if link_exists(bridge):
        run(["ip", "link", "delete", bridge, "type", "bridge"], check=False)


def partition_script(table: str, groups: list[list[str]], addresses: dict[str, str]) -> str:
    """An `nft -f` script that (re)creates the table dropping IP between every two groups."""
    rules = []
    for i, group in enumerate(groups):
        for other in groups[i + 1:]:
            if not group or not other:
                continue
            a = ", ".join(addresses[n] for n in group)
            b = ", ".join(addresses[n] for n in other)
            rules.append(f"ip saddr {{ {a} }} ip daddr {{ {b} }} drop")
            rules.append(f"ip saddr {{ {b} }} ip daddr {{ {a} }} drop")
            # ARP keeps working; only IP is cut, as with a firewall between racks.
    return (f"table bridge {table}\ndelete table bridge {table}\n"
            f"table bridge {table} {{\n  chain forward {{\n"
            f"    type filter hook forward priority 0; policy accept;\n"
            + "".join(f"    {rule}\n" for rule in rules) + "  }\n}\n")


def load_ruleset(script: str) -> None:
    run(["nft", "-f", "-"], input=script)


def delete_table(table: str) -> None:
    """Remove the partition table, if there is one: every node reaches every other again."""
    run(["nft", "delete", "table", "bridge", table], check=False)
