"""provider: hosts: machines that exist already (cloud, Terraform, bare metal), reached over SSH.

As Jepsen drives a set of SSH-reachable machines, lab adopts the hosts listed
in `providers.hosts.inventory` (one node each, in node order) instead of
making nodes:
- first contact as the inventory's user with its key (root, or a user with
  password-less sudo); the host key is checked against the user's own
  ~/.ssh/known_hosts when it lists the host, else accepted on first use and
  pinned in the lab's known_hosts, as `ssh -o StrictHostKeyChecking=accept-new`;
- one adoption script as root: the lab's own key for root, what lab needs
  from the host's own apt sources (python3, nftables, etcd), the host key.
  From then on everything goes to root@ADDRESS with the lab's key, exactly as
  on nspawn nodes and VMs, and etcd, the agents and every scenario run
  unchanged.

Faults act on lab's services only, never on the machine's other work:
kill = SIGKILL of etcd, the agents and the units the scheduler runs there
(then stopped until `lab fault start`); with `providers.hosts.power_cut`,
an immediate reboot without syncing (sysrq b), a real power cut; pause =
SIGSTOP of the same processes; partition = nftables on the hosts
(lab.providers.guest); reboot = a real reboot.

`lab destroy` removes only what lab put there, as recorded in the lab's
state: its services and files, the packages it installed, its partition
table, its key. A host that does not answer keeps its record, and `lab
destroy` says which and tries again next time.

Hosts behind a bastion (`providers.hosts.jump`) are reached through it for
everything: SSH, etcd and the service probe (lab.host.reach).

Not here (see the README): OS updates (the hosts run their own OS, not lab's
A/B slots), lab's registry and DNS (the hosts' Docker is theirs: lab writes
no daemon.json there).
"""

from __future__ import annotations

import secrets
import shlex
import threading
import time
from pathlib import Path
from typing import ClassVar

from lab.errors import PrerequisiteError, ProviderError, UsageError
from lab.host import jumphost
from lab.host.jumphost import jump_endpoint, login_key
from lab.host.ssh import (NodeUnreachable, SSHEndpoint, known_hosts_name, parallel_map, public_key_line,
                          record_host_key, wait_for_ssh)
from lab.host.ssh import run as ssh_run
from lab.model.spec import HostEntry, LabSpec
from lab.node import layout
from lab.providers.base import Availability, NodeState, NodeStatus, Progress, Provider, no_progress
from lab.providers.guest import (BOOT_ID_PATH, PARTITION_TABLE, GuestPartitions, install_missing, printed_host_key,
                                 printed_reasons, printed_words, reboot_over_ssh)

RESOURCE = "host"
# Installing etcd and python3 from a slow mirror takes minutes.
ADOPT_TIMEOUT = 900.0
PROBE_TIMEOUT = 15.0
REBOOT_TIMEOUT = 600.0
# Hosts answered lab moments before (the adoption): a minute of failed tries is a loaded host or a sick sshd.
SSH_AFTER_ADOPTION_TIMEOUT = 120.0
# Files lab writes on a host, besides the units the scheduler agent writes (it lists them in layout.MANAGED).
ETCD_DEFAULTS = "/etc/default/etcd"
SAVED_SUFFIX = ".lab-saved"  # the host's own /etc/default/etcd, put back at destroy
OWNER_FILE = layout.CONFIG_DIR / "owner"  # the random token of the lab that adopted the host (in its state)
INSTALLED_FILE = layout.CONFIG_DIR / "installed"  # every package lab's install brought, written before it
LAB_FILES = (layout.NODE_PKI_DIR, "/var/lib/etcd/lab", f"{layout.UNIT_DIR}/{layout.AGENT_SERVICE}.service",
             f"{layout.UNIT_DIR}/{layout.UPDATE_SERVICE}.service", "/etc/systemd/system/etcd.service.d/10-lab.conf")
# What lab puts in each of layout.LAB_DIRS: all that goes from a directory that was there before lab.
NODE_MODULES = tuple(sorted(path.name for path in Path(layout.__file__).parent.glob("*.py") if path.name != "__init__.py"))
OWN_FILES = {
    str(layout.CONFIG_DIR): (layout.AGENT_CONFIG.name, layout.UPDATE_CONFIG.name, layout.NODE_INFO.name,
                             OWNER_FILE.name, INSTALLED_FILE.name),
    str(layout.NODE_DIR): (*NODE_MODULES, layout.MANAGED.name, "__pycache__"),
    "/etc/etcd": ("pki", layout.ETCD_PRESTART.rsplit("/", 1)[1]),
    "/run/lab": (layout.DRAIN_FLAG.name,),
}
LAB_SERVICES = f"etcd {layout.AGENT_SERVICE} {layout.UPDATE_SERVICE}"
# The unit names the agent records (a checkout or a node must not slip a path or an option in).
MANAGED_UNITS = (f"python3 -c \"import json,re,sys; print(' '.join(u for u in json.load(open('{layout.MANAGED}')) "
                 f"if re.fullmatch(r'[A-Za-z0-9@._:-]+[.](service|socket|timer|path|mount|target)', u)))\" "
                 "2>/dev/null || true")


def as_root(user: str, script: str) -> str:
    """A command that runs `script` as root: directly for root, through password-less sudo otherwise."""
    return f"sh -c {shlex.quote(script)}" if user == "root" else f"sudo -n sh -c {shlex.quote(script)}"


# ---------------------------------------------------------------- what a host has (pure, unit-tested)

PROBE_SCRIPT = f"""\
command -v systemctl >/dev/null 2>&1 && echo lab-fact systemd
command -v apt-get >/dev/null 2>&1 && echo lab-fact apt
for c in {' '.join(layout.NODE_COMMANDS)}; do command -v "$c" >/dev/null 2>&1 && echo "lab-fact has $c"; done
systemctl is-active -q etcd 2>/dev/null && echo lab-fact etcd-active
test -f {OWNER_FILE} && echo "lab-fact owner $(head -c 64 {OWNER_FILE})"
test -e /etc/etcd/pki && echo lab-fact etcd-pki
true
"""


def host_problems(facts: set[str], owner: str | None) -> list[str]:
    """What keeps a host from becoming a node of the lab whose owner token is `owner` (None: a lab not
    created yet, which owns no host), from PROBE_SCRIPT's `lab-fact` lines."""
    problems = []
    if "systemd" not in facts:
        problems.append("has no systemd (systemctl): lab runs etcd and its agents as systemd units")
    missing = [command for command in layout.NODE_COMMANDS if f"has {command}" not in facts]
    if missing and "apt" not in facts:
        problems.append(f"lacks {', '.join(missing)} and has no apt-get to install "
                        f"{', '.join(layout.NODE_COMMANDS[c] for c in missing)}: a Debian or Ubuntu host, or one with "
                        "them installed")
    owners = [fact.split()[1] for fact in facts if fact.startswith("owner ") and len(fact.split()) > 1]
    if owners and owners[0] != owner:
        problems.append(f"belongs to another lab ({OWNER_FILE} names it): `lab destroy` that lab first")
    elif not owners and "etcd-active" in facts:
        problems.append("runs an etcd lab did not set up: lab would reconfigure it; stop it "
                        "(`systemctl disable --now etcd`) or use another host")
    elif not owners and "etcd-pki" in facts:
        problems.append("has etcd certificates of its own in /etc/etcd/pki, which lab would replace: "
                        "move them or use another host")
    return problems


def facts_of(output: str) -> set[str]:
    return {line.split(None, 1)[1].strip() for line in output.splitlines()
            if line.startswith("lab-fact ") and len(line.split(None, 1)) == 2}


def adoption_script(public_key: str, owner: str) -> str:
    """Shell run as root on a host: the lab's key for root, the host's etcd defaults kept aside, what lab
    needs from the host's apt sources; prints `lab-installed PKG...` and `lab-host-key TYPE DATA` last.
    A host another lab holds, or with an etcd of its own, is refused before anything changes (the probe
    says so first, but `lab node add` adopts without one). Running it again changes nothing."""
    key = shlex.quote(public_key)
    key_data = shlex.quote(public_key.split()[1])
    token = shlex.quote(owner)
    return f"""set -e
found=$(head -c 64 {OWNER_FILE} 2>/dev/null || true)
if [ -n "$found" ] && [ "$found" != {token} ]; then
  echo "lab-error: belongs to another lab ({OWNER_FILE} names it): run lab destroy in that lab first" >&2; exit 3
fi
if [ -z "$found" ] && systemctl is-active -q etcd 2>/dev/null; then
  echo "lab-error: runs an etcd lab did not set up: stop it (systemctl disable --now etcd) or use another host" >&2
  exit 3
fi
if [ -z "$found" ] && [ -e /etc/etcd/pki ]; then
  echo "lab-error: has etcd certificates of its own in /etc/etcd/pki: move them or use another host" >&2; exit 3
fi
install -d -m 0700 /root/.ssh
touch /root/.ssh/authorized_keys
chmod 0600 /root/.ssh/authorized_keys
grep -qF {key_data} /root/.ssh/authorized_keys || printf '%s\\n' {key} >> /root/.ssh/authorized_keys
if [ ! -e {OWNER_FILE} ]; then
  echo lab-first-adoption
  for directory in {' '.join(layout.LAB_DIRS)}; do [ ! -e "$directory" ] || echo "lab-preexisting $directory"; done
  ! systemctl is-enabled -q etcd 2>/dev/null || echo lab-etcd-was-enabled
fi
install -d -m 0755 {layout.CONFIG_DIR}
printf '%s\\n' {token} > {OWNER_FILE}
if [ -e {ETCD_DEFAULTS} ] && [ ! -e {ETCD_DEFAULTS}{SAVED_SUFFIX} ]; then cp -p {ETCD_DEFAULTS} {ETCD_DEFAULTS}{SAVED_SUFFIX}; fi
{install_missing(layout.NODE_COMMANDS, record_to=str(INSTALLED_FILE))}test -f /etc/ssh/ssh_host_ed25519_key.pub || ssh-keygen -A >/dev/null
echo "lab-host-key $(cat /etc/ssh/ssh_host_ed25519_key.pub)"
"""


def cleanup_script(public_key: str, installed: list[str], preexisting: list[str], etcd_was_enabled: bool) -> str:
    """Shell run as root at destroy: stop and remove what lab put on the host (in a directory that was
    there before lab, only lab's own files), put back what it set aside, remove the packages it installed
    (and only those), then its key."""
    key_data = shlex.quote(public_key.split()[1])
    listed = " ".join(shlex.quote(p) for p in installed)
    paths = list(LAB_FILES)
    for directory in layout.LAB_DIRS:
        paths += [f"{directory}/{name}" for name in OWN_FILES[directory]] if directory in preexisting else [directory]
    paths = " ".join(shlex.quote(p) for p in paths)
    # Purged: what both the lab's state and the host's own record name (a forged state adds nothing),
    # and only if apt would remove nothing else (a package the owner installed since, depending on them).
    return f"""managed=$({MANAGED_UNITS})
purge=""
for package in {listed}; do
  if grep -qxF "$package" {INSTALLED_FILE} 2>/dev/null && dpkg -s "$package" >/dev/null 2>&1; then
    purge="$purge $package"
  fi
done
systemctl kill --signal=SIGCONT {LAB_SERVICES} $managed >/dev/null 2>&1
systemctl disable --now {layout.AGENT_SERVICE} {layout.UPDATE_SERVICE} $managed >/dev/null 2>&1
systemctl {'stop' if etcd_was_enabled else 'disable --now'} etcd >/dev/null 2>&1
for unit in $managed; do rm -f "{layout.UNIT_DIR}/$unit"; done
rm -rf {paths}
rmdir /etc/systemd/system/etcd.service.d 2>/dev/null
if [ -e {ETCD_DEFAULTS}{SAVED_SUFFIX} ]; then mv -f {ETCD_DEFAULTS}{SAVED_SUFFIX} {ETCD_DEFAULTS}; fi
nft delete table inet {PARTITION_TABLE} >/dev/null 2>&1
systemctl daemon-reload
# A service that ended badly when stopped (etcd, with its peers gone) leaves no "failed" state behind.
systemctl reset-failed {LAB_SERVICES} $managed >/dev/null 2>&1
set -e
if [ -n "$purge" ]; then
  more=""
  for removed in $(apt-get -s purge $purge 2>/dev/null | awk '/^(Purg|Remv) /{{print $2}}'); do
    case " $purge " in *" $removed "*) ;; *) more="$more $removed" ;; esac
  done
  if [ -n "$more" ]; then
    echo "lab-kept:$purge (removing them would also remove$more)"
  else
    DEBIAN_FRONTEND=noninteractive apt-get purge -y -qq $purge >/dev/null
    echo "lab-purged$purge"
  fi
fi
if [ -f /root/.ssh/authorized_keys ]; then
  grep -vF {key_data} /root/.ssh/authorized_keys > /root/.ssh/authorized_keys.lab-new || true
  chmod 0600 /root/.ssh/authorized_keys.lab-new
  mv -f /root/.ssh/authorized_keys.lab-new /root/.ssh/authorized_keys
fi
echo lab-cleaned
"""


def signal_script(signal: str, then: str = "") -> str:
    """Send `signal` to every process of lab's services and of the units the scheduler runs on the host."""
    return f"managed=$({MANAGED_UNITS})\nsystemctl kill --signal={signal} {LAB_SERVICES} $managed\n{then}"


# ---------------------------------------------------------------- the provider


class HostsProvider(GuestPartitions, Provider):
    name: ClassVar[str] = "hosts"
    configures_docker: ClassVar[bool] = False

    def __init__(self, context) -> None:
        super().__init__(context)
        self._recording = threading.Lock()  # hosts are adopted in parallel; the state is one document

    def _record(self, node: str, **details) -> None:
        with self._recording:
            self.context.state.record(RESOURCE, node, **details)

    def owner(self) -> str | None:
        """The token this lab writes on its hosts: random, kept in the lab's state (a lab id is a hash of
        the lab's path, the same for two checkouts at one path on two machines)."""
        state = self.context.state
        return (state.get("hosts") or {}).get("owner") if state is not None else None

    def public_key(self) -> str:
        """The lab's public key, derived from its private key (not read from a .pub a checkout could swap)."""
        return public_key_line(self.context.ssh_key.read_bytes(), f"lab-{self.context.spec.name}").strip()

    @classmethod
    def availability(cls) -> Availability:
        return Availability(True, "reaches existing machines over SSH (never picked by `provider: auto`)")

    @classmethod
    def fixed_addresses(cls, spec: LabSpec, nodes: list[str], recorded: dict[str, str]) -> dict[str, str]:
        """A node keeps the host it was given; a new node takes the next host of the inventory no node has."""
        free = [str(entry.address) for entry in spec.providers.hosts.inventory
                if str(entry.address) not in recorded.values()]
        addresses = {}
        for node in nodes:
            if node in recorded:
                addresses[node] = recorded[node]
            elif free:
                addresses[node] = free.pop(0)
            else:
                raise UsageError(f"no host left for {node}: every host of providers.hosts.inventory is a node",
                                 hint="add a machine to providers.hosts.inventory in lab.yaml, then retry")
        return addresses

    # -- who is where

    def records(self) -> dict[str, dict]:
        """Each adopted (or half-adopted) host's record in the lab's state, by node."""
        state = self.context.state
        return {res["id"]: res for res in state.find(RESOURCE)} if state is not None else {}

    def entry(self, node: str) -> HostEntry:
        address = self.context.addresses.get(node) or self.records().get(node, {}).get("address")
        for entry in self.context.spec.providers.hosts.inventory:
            if str(entry.address) == address:
                return entry
        raise UsageError(f"{node} ({address}) is no longer in providers.hosts.inventory",
                         hint=f"put {address} back in lab.yaml's inventory: lab needs its login to adopt or "
                              "clean it")

    def first_key(self, entry: HostEntry) -> Path:
        return login_key(entry.key, self.context.lab_dir.parent.parent, f"{entry.user}@{entry.address}",
                         "that host of providers.hosts.inventory")

    @classmethod
    def jump_host(cls, spec: LabSpec, lab_dir: Path, known_hosts: Path) -> SSHEndpoint | None:
        """providers.hosts.jump as an endpoint; its host key pinned in the lab's known_hosts (lab.host.jumphost)."""
        jump = spec.providers.hosts.jump
        if jump is None:
            return None
        key = login_key(jump.key, lab_dir.parent.parent, f"{jump.user}@{jump.address}", "providers.hosts.jump")
        return jump_endpoint(jump.address, jump.port, jump.user, key, lab_dir, known_hosts)

    def first_contact(self, node: str) -> SSHEndpoint:
        """The inventory's login: the host key checked against the user's known_hosts when it lists the host."""
        entry = self.entry(node)
        # The lab's own pin once it adopted the host (a retry, a cleanup), else the user's, else none yet.
        known = jumphost.listing(str(entry.address), entry.port, self.context.known_hosts)
        return SSHEndpoint(node=node, host=str(entry.address), port=entry.port, user=entry.user,
                           identity_file=self.first_key(entry), known_hosts=known, jump=self.jump)

    def adopted(self) -> set[str]:
        return set(self.records())

    def ssh_endpoints(self) -> dict[str, SSHEndpoint]:
        """root@ADDRESS with the lab's key, for every host adopted (its port as recorded at adoption)."""
        found, jump = self.records(), self.jump
        return {node.name: SSHEndpoint(node=node.name, host=found[node.name]["address"],
                                       port=int(found[node.name].get("port", 22)), user="root",
                                       identity_file=self.context.ssh_key, known_hosts=self.context.known_hosts,
                                       jump=jump)
                for node in self.context.nodes if node.name in found}

    # -- lifecycle

    def preflight(self) -> None:
        """Every host not adopted yet answers its login, runs systemd, has (or can install) what lab needs,
        and is not another lab's: checked on all of them before any is changed."""
        pending = [n.name for n in self.context.nodes if n.name not in self.adopted()]
        if pending and self.jump is not None:
            from lab.host.ssh import jump_connection

            jump_connection(self.jump)  # a jump host that does not answer: said once, not once per host
        problems = [p for p in parallel_map(self._probe, pending) if p]
        if problems:
            raise PrerequisiteError("these hosts cannot become nodes:\n  " + "\n  ".join(problems),
                                    hint="fix them or change providers.hosts.inventory in lab.yaml; nothing was "
                                         "changed on any host")

    def _probe(self, node: str) -> str | None:
        entry = self.entry(node)
        where = f"{node} ({entry.user}@{entry.address}:{entry.port})"
        try:
            endpoint = self.first_contact(node)
            result = ssh_run(endpoint, as_root(entry.user, PROBE_SCRIPT), timeout=PROBE_TIMEOUT)
        except ProviderError as exc:
            return f"{where}: {exc.message}"
        if not result.ok:
            output = (result.stdout + result.stderr).strip()
            if "password" in output or "sudo" in output:
                return f"{where}: {entry.user} has no password-less sudo ({output.splitlines()[-1]})"
            return f"{where}: the probe failed (exit {result.exit_status}): {output[-300:]}"
        found = host_problems(facts_of(result.stdout), self.owner())
        return f"{where}: " + "; ".join(found) if found else None

    def up(self, progress: Progress = no_progress) -> None:
        """Adopt the hosts not adopted yet; start lab's services on those a halt or a kill stopped."""
        adopted = self.adopted()
        new = [n.name for n in self.context.nodes
               if n.name not in adopted or self._condition(n.name) == "adopting"]  # not done: again
        if jumphost.pin(self.context.jump, self.context.known_hosts) or (new and self.context.jump is not None):
            progress(jumphost.describe(self.context.jump, self.context.known_hosts))
        if new:
            if self.owner() is None:
                self.context.state.set("hosts", {"owner": secrets.token_hex(16)})
            # Recorded before anything changes on them: destroy cleans a host adopted halfway too.
            for node in new:
                if node not in adopted:
                    self._record(node, address=self.context.addresses[node], port=self.entry(node).port,
                                 installed=[], condition="adopting")
            progress(f"adopting {len(new)} host(s): {', '.join(f'{n} ({self.context.addresses[n]})' for n in new)}")
            parallel_map(lambda node: self._adopt(node, progress), new)
        stopped = [n.name for n in self.context.nodes
                   if n.name not in new and self._condition(n.name) in ("stopped", "paused")]
        parallel_map(lambda node: self.start(node, progress), stopped)
        endpoints = self.ssh_endpoints()
        deadline = time.monotonic() + SSH_AFTER_ADOPTION_TIMEOUT
        hint = ("the host answered lab moments ago: look at its sshd (`journalctl -u ssh -u sshd` on it) and its load"
                + (", and whether the jump host still reaches it" if self.jump is not None else "")
                + "; then `lab up` again")
        parallel_map(lambda node: wait_for_ssh(endpoints[node], deadline, hint=hint), list(endpoints))

    def _adopt(self, node: str, progress: Progress) -> None:
        endpoint = self.first_contact(node)
        result = ssh_run(endpoint, as_root(endpoint.user, adoption_script(self.public_key(), self.owner())),
                         timeout=ADOPT_TIMEOUT)
        # Read before judging: what a failed adoption did (packages it began to install) is undone by destroy.
        lines = result.stdout.splitlines()
        if "lab-first-adoption" in lines:  # what was there before lab; a second run finds lab's own
            self._record(node, preexisting=printed_words(result.stdout, "lab-preexisting"),
                         etcd_was_enabled="lab-etcd-was-enabled" in lines)
        installing = printed_words(result.stdout, "lab-installing")
        if installing:
            self._record(node, installed=installing)
        if not result.ok:
            reasons = printed_reasons(result.stderr)
            raise ProviderError(f"{node}: adopting {endpoint.user}@{endpoint.host} failed "
                                f"(exit {result.exit_status}): "
                                f"{reasons or (result.stdout + result.stderr).strip()[-600:]}",
                                hint="fix the host or change providers.hosts.inventory; `lab destroy` undoes what "
                                     "was done")
        installed = printed_words(result.stdout, "lab-installed")
        if installed:
            progress(f"{node}: installed {', '.join(installed)} from its own apt sources")
        host_key = printed_host_key(result.stdout, node)
        address, port = self.context.addresses[node], endpoint.port
        # Pinned as ssh names the host (HostKeyAlias NODE) and as paramiko does ([ADDRESS]:PORT off port 22).
        record_host_key(self.context.known_hosts, node, known_hosts_name(address, port), host_key)
        self._record(node, condition="running")

    def _condition(self, node: str) -> str | None:
        return self.records().get(node, {}).get("condition")

    def _set_condition(self, node: str, condition: str) -> None:
        self._record(node, condition=condition)

    def status(self) -> list[NodeStatus]:
        adopted = self.adopted()
        endpoints = self.ssh_endpoints()

        def one(node: str) -> NodeStatus:
            address = self.context.addresses.get(node)
            if node not in adopted:
                return NodeStatus(node, NodeState.NOT_CREATED, ip=address)
            condition = self._condition(node)
            if condition == "adopting":
                return NodeStatus(node, NodeState.NOT_CREATED, ip=address, detail="adoption not finished: `lab up`")
            if condition == "stopped":
                return NodeStatus(node, NodeState.STOPPED, ip=address, detail="lab's services stopped")
            if condition == "paused":
                return NodeStatus(node, NodeState.PAUSED, ip=address, detail="lab's services frozen")
            try:
                result = ssh_run(endpoints[node], f"cat {BOOT_ID_PATH}", timeout=5)
            except ProviderError as exc:
                return NodeStatus(node, NodeState.UNKNOWN, ip=address, detail=exc.message)
            return NodeStatus(node, NodeState.RUNNING, ip=address, boot_id=result.stdout.strip() or None)

        return parallel_map(one, [n.name for n in self.context.nodes])

    def halt(self, progress: Progress = no_progress) -> None:
        """Stop lab's services on every host (the machines keep running: they are not lab's)."""
        endpoints = self.ssh_endpoints()
        # The partition's table goes too: the machines keep running and talking; `start` puts it back.
        failures = self._run_on_guests({node: f"managed=$({MANAGED_UNITS})\nsystemctl stop {LAB_SERVICES} $managed\n"
                                              f"nft delete table inet {PARTITION_TABLE} 2>/dev/null; true"
                                        for node in endpoints})
        for node in endpoints:
            if not any(f.startswith(f"{node}:") for f in failures):
                self._set_condition(node, "stopped")
        if failures:
            raise ProviderError("could not stop lab's services on " + "; ".join(failures),
                                hint="check the hosts answer SSH, then `lab halt` again")
        progress(f"stopped lab's services on {', '.join(endpoints)}")

    def destroy(self, progress: Progress = no_progress) -> None:
        failures = [f for f in parallel_map(lambda node: self._clean(node, progress), sorted(self.adopted())) if f]
        if failures:
            raise ProviderError("could not clean " + "; ".join(failures),
                                hint="the lab keeps their records: bring them back and run `lab destroy` again "
                                     "(a host gone for good: `lab destroy --forget-unreachable`)")

    def remove_node(self, node: str, progress: Progress = no_progress) -> None:
        failure = self._clean(node, progress)
        if failure:
            raise ProviderError(f"could not clean {failure}", hint="bring it back and retry")

    def _clean(self, node: str, progress: Progress) -> str | None:
        """Remove what lab put on one host; forget it once done. Returns 'node: why' if it could not."""
        record = self.records().get(node, {})
        installed = list(record.get("installed", []))
        # Not known (adopted halfway): every directory counts as the host's, so only lab's files go.
        preexisting = list(record.get("preexisting", layout.LAB_DIRS))
        if not self.context.ssh_key.is_file():
            return f"{node}: the lab's key {self.context.ssh_key} is missing"
        script = cleanup_script(self.public_key(), installed, preexisting, bool(record.get("etcd_was_enabled")))
        address = record.get("address", node)
        try:
            endpoint = self.ssh_endpoints().get(node)
            if endpoint is None:
                raise ProviderError(f"{node} is not one of the lab's nodes any more")
            result = ssh_run(endpoint, script, timeout=ADOPT_TIMEOUT)
        except ProviderError as first_failure:
            # Adopted halfway (the lab's key never authorized), or the key lost: the inventory's login.
            try:
                first = self.first_contact(node)
                result = ssh_run(first, as_root(first.user, script), timeout=ADOPT_TIMEOUT)
            except (ProviderError, UsageError, PrerequisiteError) as exc:
                # Neither the lab's login nor the inventory's (or none left to try) reached the host.
                unreachable = isinstance(first_failure, NodeUnreachable) and isinstance(
                    exc, (NodeUnreachable, UsageError, PrerequisiteError))
                if unreachable and self.forget_unreachable:
                    with self._recording:
                        self.context.state.forget(RESOURCE, node)
                    progress(f"{node}: forgot {address}, which does not answer: what lab put there stays "
                             f"(its services, {layout.CONFIG_DIR}, {layout.NODE_DIR}, etcd's data, the packages "
                             "in " + str(INSTALLED_FILE) + ")")
                    return None
                return f"{node}: {exc.message}"
        if not result.ok or "lab-cleaned" not in result.stdout:
            return f"{node}: exit {result.exit_status}: {(result.stdout + result.stderr).strip()[-300:]}"
        with self._recording:
            self.context.state.forget(RESOURCE, node)
        kept = [line.split(":", 1)[1].strip() for line in result.stdout.splitlines() if line.startswith("lab-kept:")]
        purged = printed_words(result.stdout, "lab-purged")
        progress(f"{node}: removed what lab put on {address}"
                 + (f" (and {len(purged)} packages it installed)" if purged else "")
                 + (f"; kept the packages lab installed: {kept[0]}" if kept else ""))
        return None

    def stage_update(self, node: str, rootfs: Path, progress: Progress = no_progress,
                     cancel: threading.Event | None = None) -> str:
        raise UsageError("existing hosts run their own OS: lab cannot stage its A/B OS updates there",
                         hint="rolling OS updates are for labs lab boots (nspawn)")

    # -- faults: lab's services only, never the machine's other work

    def _one(self, node: str, command: str, what: str, timeout: float = 30) -> None:
        self.context.node(node)
        endpoint = self.ssh_endpoints().get(node)
        if endpoint is None:
            raise ProviderError(f"cannot {what} {node}: it is not adopted yet", hint="run `lab up` first")
        result = ssh_run(endpoint, command, timeout=timeout)
        if not result.ok:
            raise ProviderError(f"{node}: {what} failed (exit {result.exit_status}): "
                                f"{(result.stdout + result.stderr).strip()[-300:]}",
                                hint="check the host with `lab ssh " + node + "`")

    def kill(self, node: str) -> None:
        if self.context.spec.providers.hosts.power_cut:
            # Disabled (and synced) first: the services stay down after the reboot, as a killed node does.
            # In the foreground: the services disabled and that synced; then, detached from the SSH
            # channel (which the reboot cuts), the cut itself.
            command = (f"set -e; systemctl disable --quiet {LAB_SERVICES}; sync; echo 1 > /proc/sys/kernel/sysrq; "
                       "nohup sh -c 'sleep 0.2; echo b > /proc/sysrq-trigger' </dev/null >/dev/null 2>&1 &")
            self._set_condition(node, "stopped")
            self._one(node, command, "power-cut")
        else:
            self._set_condition(node, "stopped")  # first: a kill that fails halfway is undone by `start`
            self._one(node, signal_script("SIGKILL", f"systemctl stop {LAB_SERVICES} $managed"), "kill")

    def start(self, node: str, progress: Progress = no_progress) -> None:
        endpoint = self.ssh_endpoints().get(node)
        if endpoint is None:
            raise ProviderError(f"cannot start {node}: it is not adopted yet", hint="run `lab up` first")
        wait_for_ssh(endpoint, time.monotonic() + REBOOT_TIMEOUT, poll=0.5,  # back from a power cut
                     hint="look at the machine's console")
        # --no-block: etcd reports ready only once it has a quorum, which a lab whose members all
        # stopped (`lab halt`) gets only when the others start too.
        self._one(node, f"systemctl kill --signal=SIGCONT {LAB_SERVICES} >/dev/null 2>&1; "
                        f"systemctl enable --quiet {LAB_SERVICES} && systemctl start --no-block {LAB_SERVICES}",
                  "start")
        self._set_condition(node, "running")
        self._reapply_partition(node)
        progress(f"{node}: lab's services started")

    def pause(self, node: str) -> None:
        self._set_condition(node, "paused")  # first: a pause that fails halfway is undone by `resume`
        self._one(node, signal_script("SIGSTOP"), "pause")

    def resume(self, node: str) -> None:
        self._one(node, signal_script("SIGCONT"), "resume")
        self._set_condition(node, "running")
        self._reapply_partition(node)

    def reboot(self, node: str, progress: Progress = no_progress) -> None:
        """A real reboot of the host; returns once it answers SSH with a new boot id."""
        self.context.node(node)
        reboot_over_ssh(self.ssh_endpoints()[node], REBOOT_TIMEOUT, hint="look at the machine's console")
        self._set_condition(node, "running")
        self._reapply_partition(node)
        progress(f"{node} rebooted")
