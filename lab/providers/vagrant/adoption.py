"""Adopting machines after `vagrant up`: from then on they are reached like any lab node.

Vagrant's own SSH access (user vagrant, the key Vagrant inserted, no host key
to check) is used once per machine, to run `adoption_script` as root: it
authorizes the lab's own key for root, sets the hostname, installs what lab
needs on a generic box (etcd, python3, nftables, Docker) and prints the machine's
host key, which lab pins in the lab's known_hosts. Everything afterwards
(bootstrap, scenarios, testinfra, `lab ssh`) goes to root@PRIVATE-IP with
host keys verified, exactly as on nspawn nodes.
"""

from __future__ import annotations

import shlex
from concurrent.futures import ThreadPoolExecutor

from lab.errors import ProviderError
from lab.host.ssh import SSHEndpoint, record_host_key
from lab.host.ssh import run as ssh_run
from lab.providers.base import LabContext, Progress

# Adoption may install packages on a generic box (apt-get over the VM's NAT).
ADOPT_TIMEOUT = 900.0

# What lab needs on a node, by command, and the Debian/Ubuntu package that brings it.
NODE_COMMANDS = {"python3": "python3", "nft": "nftables", "etcd": "etcd-server", "etcdctl": "etcd-client"}
DOCKER_COMMANDS = {"docker": "docker.io"}


def adoption_script(public_key: str, hostname: str, docker: bool = True) -> str:
    """Shell run as root on a fresh machine: lab's key for root, its hostname, missing tools, the host key.

    Prints `lab-installed PKG...` when it had to install packages (a generic
    box), and always `lab-host-key TYPE DATA` last. The hostname is set here
    rather than by Vagrant (`config.vm.hostname`), whose Debian way ends in a
    restart of the guest's networking: ~12 s per VM under software emulation.
    """
    key = shlex.quote(public_key)
    name = shlex.quote(hostname)
    commands = {**NODE_COMMANDS, **(DOCKER_COMMANDS if docker else {})}
    checks = "\n".join(f"command -v {cmd} >/dev/null 2>&1 || missing=\"$missing {pkg}\""
                       for cmd, pkg in commands.items())
    return f"""set -e
install -d -m 0700 /root/.ssh
touch /root/.ssh/authorized_keys
chmod 0600 /root/.ssh/authorized_keys
grep -qxF {key} /root/.ssh/authorized_keys || printf '%s\\n' {key} >> /root/.ssh/authorized_keys
printf '%s\\n' {name} > /etc/hostname
hostname {name}
touch /etc/hosts
sed -i '/^127\\.0\\.1\\.1[[:space:]]/d' /etc/hosts
[ -z "$(tail -c 1 /etc/hosts)" ] || echo >> /etc/hosts
printf '127.0.1.1\\t%s\\n' {name} >> /etc/hosts
missing=""
{checks}
if [ -n "$missing" ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq --no-install-recommends $missing >/dev/null
  # Debian's etcd-server starts a default single-member etcd; lab configures its own.
  case "$missing" in *etcd-server*) systemctl disable --now etcd >/dev/null 2>&1 || true ;; esac
  # Docker as on the Lab OS: socket-activated, so an idle node runs no daemon.
  case "$missing" in *docker.io*) systemctl disable --now docker.service containerd.service >/dev/null 2>&1 || true
    systemctl enable --now docker.socket >/dev/null 2>&1 || true ;; esac
  echo "lab-installed$missing"
fi
test -f /etc/ssh/ssh_host_ed25519_key.pub || ssh-keygen -A >/dev/null
echo "lab-host-key $(cat /etc/ssh/ssh_host_ed25519_key.pub)"
"""


def parse_adoption_output(stdout: str, node: str) -> str:
    """`TYPE DATA` of the host key the adoption script printed."""
    for line in reversed(stdout.splitlines()):
        words = line.split()
        if len(words) >= 3 and words[0] == "lab-host-key":
            return f"{words[1]} {words[2]}"
    raise ProviderError(f"{node}: adoption printed no host key", hint="is /etc/ssh/ssh_host_ed25519_key.pub there?")


def adopt(context: LabContext, nodes: list[str], vagrant_endpoints: dict[str, SSHEndpoint],
          progress: Progress) -> None:
    """Authorize the lab's key for root on each machine, pin its host key, install what lab needs."""
    public_key = context.ssh_key.with_suffix(".pub").read_text().strip()

    def adopt_one(node: str) -> str:
        endpoint = vagrant_endpoints.get(node)
        if endpoint is None:
            raise ProviderError(f"{node}: `vagrant ssh-config` does not list it",
                                hint=f"run `vagrant status` in {context.lab_dir}")
        script = adoption_script(public_key, node, docker=context.spec.box.docker)
        result = ssh_run(endpoint, f"sudo -n sh -c {shlex.quote(script)}", timeout=ADOPT_TIMEOUT, check=True)
        host_key = parse_adoption_output(result.stdout, node)
        installed = [line.split(None, 1)[1] for line in result.stdout.splitlines()
                     if line.startswith("lab-installed ")]
        if installed:
            progress(f"{node}: installed {', '.join(installed)} (a generic box)")
        return host_key

    with ThreadPoolExecutor(max_workers=max(1, len(nodes))) as pool:
        host_keys = dict(zip(nodes, pool.map(adopt_one, nodes)))
    for node, host_key in host_keys.items():
        record_host_key(context.known_hosts, node, context.addresses[node], host_key)
    progress(f"adopted {', '.join(nodes)}: root@private address with the lab's key, host keys pinned")
