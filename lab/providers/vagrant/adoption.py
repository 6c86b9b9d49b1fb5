"""Adopting machines after `vagrant up`: from then on they are reached like any lab node.

`vagrant up` leaves the guest alone once it answers SSH: the Vagrantfile has
`config.ssh.insert_key = false` (no key swap) and its private network
`auto_config: false` (the NIC exists, with a MAC lab chose, but Vagrant
configures nothing in the guest). Each was several SSH round trips of
Vagrant's per machine (~12 s and ~14 s under software emulation).

Lab does all of it in one SSH session per machine instead, over Vagrant's
first access (user vagrant, the box's well-known insecure key, no host key to
check): `adoption_script` runs as root and
- authorizes the lab's own key for root, and for Vagrant's user in place of the
  insecure key, which it removes;
- sets the hostname;
- gives the private NIC (found by its MAC) the node's address with a
  systemd-networkd `.network` file, applied at once and at every boot;
- installs what lab needs on a generic box (etcd, python3, nftables, Docker);
- prints the machine's host key, which lab pins in the lab's known_hosts.
Then lab copies its key to `.vagrant/machines/NODE/PROVIDER/private_key`,
where Vagrant looks for a machine's own key (as after its own key swap), so
`vagrant halt`, `vagrant up` of a stopped machine and `vagrant ssh` keep
working. Everything else (bootstrap, scenarios, testinfra, `lab ssh`) goes to
root@PRIVATE-IP with host keys verified, exactly as on nspawn nodes.
"""

from __future__ import annotations

import ipaddress
import shlex
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

from lab.errors import CommandError, ProviderError
from lab.host.files import write_atomic
from lab.host.ssh import NodeUnreachable, SSHEndpoint, record_host_key
from lab.host.ssh import run as ssh_run
from lab.node.layout import DOCKER_COMMANDS, NODE_COMMANDS
from lab.providers.base import LabContext, Progress
from lab.providers.guest import install_missing, printed_host_key, printed_reasons, printed_words
from lab.providers.vagrant.render import private_mac

# Adoption may install packages on a generic box (apt-get over the VM's NAT).
ADOPT_TIMEOUT = 900.0
# Sorts before every .network file a box or Vagrant ships (Lab OS's
# 90-lab-dhcp.network matches every ethernet NIC; Vagrant wrote 50-vagrant-*):
# networkd applies the first file that matches a link.
PRIVATE_NETWORK_FILE = "/etc/systemd/network/10-lab-private.network"
# Docker as on the Lab OS once installed on a generic box: socket-activated, so an idle node runs no daemon.
DOCKER_AS_ON_LAB_OS = """\
  case "$missing" in *docker.io*) systemctl disable --now docker.service containerd.service >/dev/null 2>&1 || true
    systemctl enable --now docker.socket >/dev/null 2>&1 || true ;; esac
"""
# How long the script waits for networkd to put the address on the NIC.
ADDRESS_WAIT_SECONDS = 20



@dataclass(frozen=True)
class PrivateAddress:
    """The node's address on the lab's private network and the NIC that carries it."""

    mac: str         # aa:bb:cc:dd:ee:ff, as /sys/class/net/*/address shows it
    address: str     # 10.77.9.11
    prefixlen: int   # 24


def colon_mac(mac: str) -> str:
    """`0A1B2C3D4E5F` (Vagrant's form) as `0a:1b:2c:3d:4e:5f` (the kernel's)."""
    digits = mac.replace(":", "").lower()
    return ":".join(digits[i:i + 2] for i in range(0, 12, 2))


def network_file(private: PrivateAddress) -> str:
    """The systemd-networkd file that gives the private NIC its address, at once and at every boot."""
    return (f"# Written by lab at adoption: the lab's private network.\n"
            f"[Match]\nMACAddress={private.mac}\n\n"
            f"[Network]\nAddress={private.address}/{private.prefixlen}\n"
            f"LinkLocalAddressing=no\nIPv6AcceptRA=no\n")


def adoption_script(public_key: str, hostname: str, docker: bool = True, *, private: PrivateAddress,
                    vagrant_user: str = "vagrant", replaced_keys: tuple[str, ...] = ()) -> str:
    """Shell run as root on a fresh machine: keys, hostname, private address, missing tools, the host key.

    `replaced_keys` are the base64 key data of the keys Vagrant's user loses
    (the insecure key Vagrant came in with); the lab's key takes their place.
    Prints `lab-installed PKG...` when it had to install packages (a generic
    box), and always `lab-host-key TYPE DATA` last. Running it again changes
    nothing, and the private address is reapplied only if it is missing or its
    file changed, so a running node's network never blinks.

    The hostname is set here rather than by Vagrant (`config.vm.hostname`),
    whose Debian way ends in a restart of the guest's networking. A guest where
    systemd-networkd is not running (a generic box on ifupdown) gets it
    started and enabled: it manages only the links a `.network` file matches,
    here the private NIC alone.
    """
    key = shlex.quote(public_key)
    key_data = shlex.quote(public_key.split()[1])
    name = shlex.quote(hostname)
    user = shlex.quote(vagrant_user)
    mac = shlex.quote(private.mac)
    drop = " ".join(f"-e {shlex.quote(data)}" for data in (*replaced_keys, public_key.split()[1]))
    commands = {**NODE_COMMANDS, **(DOCKER_COMMANDS if docker else {})}
    return f"""set -e
install -d -m 0700 /root/.ssh
touch /root/.ssh/authorized_keys
chmod 0600 /root/.ssh/authorized_keys
grep -qF {key_data} /root/.ssh/authorized_keys || printf '%s\\n' {key} >> /root/.ssh/authorized_keys
home=$(getent passwd {user} | cut -d: -f6)
if [ -n "$home" ] && [ -d "$home" ]; then
  install -d -m 0700 -o {user} -g "$(id -gn {user})" "$home/.ssh"
  keys="$home/.ssh/authorized_keys"
  {{ grep -vF {drop} "$keys" 2>/dev/null || true; printf '%s\\n' {key}; }} > "$keys.lab-new"
  chown {user}: "$keys.lab-new"
  chmod 0600 "$keys.lab-new"
  mv -f "$keys.lab-new" "$keys"
fi
printf '%s\\n' {name} > /etc/hostname
hostname {name}
touch /etc/hosts
sed -i '/^127\\.0\\.1\\.1[[:space:]]/d' /etc/hosts
[ -z "$(tail -c 1 /etc/hosts)" ] || echo >> /etc/hosts
printf '127.0.1.1\\t%s\\n' {name} >> /etc/hosts
iface=""
for link in /sys/class/net/*; do
  if [ "$(cat "$link/address" 2>/dev/null)" = {mac} ]; then iface=${{link##*/}}; fi
done
if [ -z "$iface" ]; then
  echo "lab-error: no network interface has MAC {private.mac} (the lab's private network)" >&2
  exit 3
fi
install -d -m 0755 /etc/systemd/network
cat > {PRIVATE_NETWORK_FILE}.lab-new <<'LAB_EOF'
{network_file(private)}LAB_EOF
changed=0
cmp -s {PRIVATE_NETWORK_FILE}.lab-new {PRIVATE_NETWORK_FILE} || changed=1
mv -f {PRIVATE_NETWORK_FILE}.lab-new {PRIVATE_NETWORK_FILE}
has_address() {{ ip -4 -o addr show dev "$iface" | grep -qF " {private.address}/"; }}
if [ "$changed" = 1 ] || ! has_address; then
  if ! systemctl is-active -q systemd-networkd; then
    systemctl enable -q --now systemd-networkd
  fi
  # reload and reconfigure: systemd 244 and later; before, a restart rereads the files
  networkctl reload 2>/dev/null || systemctl restart systemd-networkd
  networkctl reconfigure "$iface" 2>/dev/null || true
  waited=0
  until has_address; do
    waited=$((waited + 1))
    if [ "$waited" -gt {ADDRESS_WAIT_SECONDS * 10} ]; then
      echo "lab-error: $iface did not get {private.address} from systemd-networkd in {ADDRESS_WAIT_SECONDS} s" >&2
      networkctl status --no-pager "$iface" >&2 || true
      exit 4
    fi
    sleep 0.1
  done
fi
{install_missing(commands, then=DOCKER_AS_ON_LAB_OS)}test -f /etc/ssh/ssh_host_ed25519_key.pub || ssh-keygen -A >/dev/null
echo "lab-host-key $(cat /etc/ssh/ssh_host_ed25519_key.pub)"
"""


def adoption_failure(node: str, exit_status: int | None, output: str, vagrant_provider: str) -> CommandError:
    """The error of a failed adoption script: what it said went wrong (its `lab-error:` lines) and what to do."""
    reasons = printed_reasons(output)
    if "no network interface has MAC" in reasons and vagrant_provider == "hyperv":
        hint = ("Vagrant's Hyper-V provider makes no private network (it ignores network settings), so lab "
                "cannot give Hyper-V machines the lab's addresses: use virtualbox, vmware_desktop or libvirt")
    elif "no network interface has MAC" in reasons:
        hint = ("the machine has no NIC on the lab's private network: `lab render` shows the Vagrantfile's "
                "private_network of each node (with its MAC); `lab destroy` and `lab up` make the machine anew")
    elif "systemd-networkd" in reasons:
        hint = "the box needs systemd-networkd (Debian and Ubuntu have it): see networkctl's status above"
    elif exit_status is None:
        hint = f"the adoption did not finish in {ADOPT_TIMEOUT:.0f} s: installing packages on a generic box?"
    else:
        hint = "Vagrant's user needs password-less sudo (a box convention); the output above says what failed"
    return CommandError("the adoption script (sudo -n sh -c ...)", where=node, exit_status=exit_status,
                        output=output, hint=hint)


def public_key_data(private_key: Path) -> str | None:
    """The base64 data of the public half of an SSH private key file (OpenSSH or PEM), or None if unreadable."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization

    try:
        text = private_key.read_bytes()
    except OSError:
        return None
    for load in (serialization.load_ssh_private_key, serialization.load_pem_private_key):
        try:
            key = load(text, password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm):
            continue
        return key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                             serialization.PublicFormat.OpenSSH).decode().split()[1]
    return None


def private_addresses(context: LabContext, vagrant_provider: str) -> dict[str, PrivateAddress]:
    """Each node's private NIC (the MAC the Vagrantfile gives it) and address."""
    prefixlen = ipaddress.IPv4Network(context.subnet).prefixlen
    return {node.name: PrivateAddress(mac=colon_mac(private_mac(vagrant_provider, context.lab_id, node.index)),
                                      address=context.addresses[node.name], prefixlen=prefixlen)
            for node in context.nodes}


def machine_key_path(lab_dir: Path, node: str, vagrant_provider: str) -> Path:
    """Where Vagrant looks for a machine's own private key (it removes the directory's files at destroy)."""
    return lab_dir / ".vagrant" / "machines" / node / vagrant_provider / "private_key"


def adopt(context: LabContext, nodes: list[str], vagrant_endpoints: dict[str, SSHEndpoint],
          progress: Progress, *, vagrant_provider: str,
          vagrant_identities: dict[str, tuple[Path, ...]] | None = None) -> None:
    """Make each machine a lab node in one SSH session: keys, hostname, private address, tools, host key.

    `vagrant_identities` are the key files Vagrant reports for each machine
    (every IdentityFile of `vagrant ssh-config`): their public halves are
    removed from Vagrant's user, which keeps the lab's key only.
    """
    public_key = context.ssh_key.with_suffix(".pub").read_text().strip()
    private = private_addresses(context, vagrant_provider)
    identities = vagrant_identities or {}

    def adopt_one(node: str) -> str:
        endpoint = vagrant_endpoints.get(node)
        if endpoint is None:
            raise ProviderError(f"{node}: `vagrant ssh-config` does not list it",
                                hint=f"run `vagrant status` in {context.lab_dir}")
        replaced = tuple(sorted({data for path in (*identities.get(node, ()), endpoint.identity_file)
                                 if (data := public_key_data(path)) is not None}))
        script = adoption_script(public_key, node, docker=context.spec.box.docker, private=private[node],
                                 vagrant_user=endpoint.user, replaced_keys=replaced)
        command = f"sudo -n sh -c {shlex.quote(script)}"
        try:
            result = ssh_run(endpoint, command, timeout=ADOPT_TIMEOUT)
        except NodeUnreachable as exc:
            import paramiko

            # Adopted before, and the copy of lab's key where Vagrant looks is
            # gone (or was never written): the guest takes the lab's key.
            if not isinstance(exc.cause, paramiko.AuthenticationException) or endpoint.identity_file == context.ssh_key:
                raise
            result = ssh_run(replace(endpoint, identity_file=context.ssh_key), command, timeout=ADOPT_TIMEOUT)
        if not result.ok:
            raise adoption_failure(node, result.exit_status, result.stdout + result.stderr, vagrant_provider)
        host_key = printed_host_key(result.stdout, node)
        # Vagrant's own key for the machine from now on (it prefers this file to the insecure key).
        write_atomic(machine_key_path(context.lab_dir, node, vagrant_provider), context.ssh_key.read_text(),
                     mode=0o600)
        installed = printed_words(result.stdout, "lab-installed")
        if installed:
            progress(f"{node}: installed {' '.join(installed)} (a generic box)")
        return host_key

    with ThreadPoolExecutor(max_workers=max(1, len(nodes))) as pool:
        host_keys = dict(zip(nodes, pool.map(adopt_one, nodes)))
    for node, host_key in host_keys.items():
        record_host_key(context.known_hosts, node, context.addresses[node], host_key)
    progress(f"adopted {', '.join(nodes)}: root@private address with the lab's key, host keys pinned")
