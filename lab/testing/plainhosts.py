"""Existing Debian hosts for `provider: hosts` tests: made here, outside the lab under test.

Each host is a node of an nspawn lab of the plain Debian image (boxes/debian:
systemd, sshd, no etcd, python3 or nftables), booted without lab's bootstrap,
then provisioned as a site would provision its machines:
- /usr writable: an nspawn node's /usr is its image's, bound read-only (lab's
  A/B slots); a oneshot unit mounts an overlay over it at every boot, its
  upper layer on the node's own directory, so packages installed there stay
  installed across reboots, as on a real disk. Hence privileged nodes: the
  mount happens inside the node.
- apt through an HTTP proxy on the lab bridge (lab.testing.aptproxy), which
  forwards to this machine's Debian mirror only.
Root logs in with the outer lab's key: that is the inventory's `key:`. On the
last host, so does `admin`, a user with password-less sudo (as cloud images
have), which that host's inventory entry names; the second host's sshd also
listens on port 2222, which its entry names. With `bastions`, the last hosts
are left out of the inventory: machines to reach the others through (a jump
host is never one of the hosts).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import yaml

from lab.core.lab import Lab
from lab.host.ssh import SSHEndpoint
from lab.host.ssh import run as ssh_run
from lab.images.recipes import host_debian_mirror
from lab.testing.aptproxy import AptProxy

IMAGE = ("debian", "12")
SUDO_USER = "admin"
OTHER_PORT = 2222
WRITABLE_USR = "/var/lib/docker/usr-rw"  # the node's Docker directory: a plain host directory, not overlayfs
USR_UNIT = f"""[Unit]
Description=test host: a writable /usr over the node's read-only one
DefaultDependencies=no
Before=local-fs.target

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/bin/sh -c 'mkdir -p {WRITABLE_USR}/upper {WRITABLE_USR}/work && mount -t overlay overlay -o lowerdir=/usr,upperdir={WRITABLE_USR}/upper,workdir={WRITABLE_USR}/work /usr'

[Install]
WantedBy=local-fs.target
"""


@dataclass
class PlainHosts:
    lab: Lab  # the lab whose nodes are the hosts
    endpoints: dict[str, SSHEndpoint]  # root on each host, with the outer lab's key
    addresses: dict[str, str]
    key: Path
    proxy: AptProxy

    sudo_host: str  # the host whose entry logs in as SUDO_USER
    port_host: str  # the host whose entry names OTHER_PORT
    bastions: dict[str, str]  # hosts left out of the inventory: node -> address (root with `key` logs in)

    def inventory(self, extra: list[dict] | None = None) -> list[dict]:
        """providers.hosts.inventory naming every host (root, or SUDO_USER on `sudo_host`, with the outer
        lab's key), then `extra`."""
        return [{"address": self.addresses[n], "key": str(self.key),
                 **({"user": SUDO_USER} if n == self.sudo_host else {}),
                 **({"port": OTHER_PORT} if n == self.port_host else {})}
                for n in sorted(self.addresses)] + (extra or [])

    def lab_yaml(self, name: str, extra: list[dict] | None = None, **more) -> str:
        return yaml.safe_dump({"name": name, "provider": "hosts",
                               "providers": {"hosts": {"inventory": self.inventory(extra)}}, **more},
                              sort_keys=False)

    def run(self, node: str, command: str, timeout: float = 60) -> str:
        result = ssh_run(self.endpoints[node], command, timeout=timeout)
        assert result.ok, f"{node}: {command}: {result.stdout}{result.stderr}"
        return result.stdout


@contextmanager
def plain_debian_hosts(directory: Path, count: int = 3, bastions: int = 0) -> Iterator[PlainHosts]:
    from lab.images.build import build_image

    build_image(*IMAGE)
    directory.mkdir(parents=True, exist_ok=True)
    spec = directory / "lab.yaml"
    spec.write_text(yaml.safe_dump({"name": "plainhosts", "provider": "nspawn",
                                    "box": {"name": IMAGE[0], "version": IMAGE[1]},
                                    "nodes": {"count": count + bastions},
                                    "providers": {"nspawn": {"privileged": True}}}))
    lab = Lab.open(spec)
    try:
        with lab.lock("up"):
            lab.up(bootstrap=False)
        context = lab.context("nspawn")
        every = lab.ssh_endpoints()
        names = [node.name for node in context.nodes]  # node order: node-10 after node-9
        endpoints = {node: every[node] for node in names[:count]}
        with AptProxy(context.host_address, host_debian_mirror()) as proxy:
            hosts = PlainHosts(lab, endpoints, {node: context.addresses[node] for node in endpoints},
                               context.ssh_key, proxy, sudo_host=names[count - 1], port_host=names[1],
                               bastions={node: context.addresses[node] for node in names[count:]})
            hosts.run(hosts.port_host, f"printf 'Port 22\\nPort {OTHER_PORT}\\n' > /etc/ssh/sshd_config.d/90-test.conf && "
                                       "systemctl restart ssh")
            for node in endpoints:
                hosts.run(node, f"cat > /etc/systemd/system/usr-writable.service <<'EOF'\n{USR_UNIT}EOF\n"
                                "systemctl enable --now --quiet usr-writable.service\n"
                                f"echo 'Acquire::http::Proxy \"{proxy.url}\";' > /etc/apt/apt.conf.d/90proxy")
            public_key = context.ssh_key.with_suffix(".pub").read_text().strip()
            hosts.run(hosts.sudo_host, f"export DEBIAN_FRONTEND=noninteractive; apt-get update -qq >/dev/null && "
                                       f"apt-get install -y -qq --no-install-recommends sudo >/dev/null && "
                                       f"useradd --create-home --shell /bin/sh {SUDO_USER} && "
                                       f"install -d -m 0700 -o {SUDO_USER} -g {SUDO_USER} /home/{SUDO_USER}/.ssh && "
                                       f"echo '{public_key}' > /home/{SUDO_USER}/.ssh/authorized_keys && "
                                       f"chown {SUDO_USER}: /home/{SUDO_USER}/.ssh/authorized_keys && "
                                       f"echo '{SUDO_USER} ALL=(ALL) NOPASSWD: ALL' > /etc/sudoers.d/{SUDO_USER}",
                      timeout=300)
            yield hosts
    finally:
        lab.destroy()
