"""What lab does inside nodes it reaches only over SSH (VMs, existing hosts): partitions, reboots, packages.

Partitions: nftables rules in each node's own kernel, for nodes whose network
lab does not own on the host (the hypervisor's network, the hosts' own).
nspawn nodes are cut off on the host's bridge instead. The rules live in the
node: a reboot or a power cut drops them while the lab's state still says
partitioned, so a node back from one gets them again (`_reapply_partition`).
"""

from __future__ import annotations

import contextlib
import time
from concurrent.futures import ThreadPoolExecutor

from lab.errors import ProviderError
from lab.host.ssh import SSHEndpoint, wait_for_ssh
from lab.host.ssh import run as ssh_run

BOOT_ID_PATH = "/proc/sys/kernel/random/boot_id"


def install_missing(commands: dict[str, str], then: str = "", record_to: str | None = None) -> str:
    """Shell that installs, from the machine's own apt sources, the package of each command it lacks;
    prints `lab-installed PKG...` when it installed any. Debian's etcd-server starts a default
    single-member etcd: it is stopped and disabled (lab configures its own). `then`: more shell run
    after an install, with $missing set. `record_to`: a file on the machine that gets, before anything
    is installed, every package the install brings (dependencies too), also printed as
    `lab-installing PKG...`: what to remove again, even after an install that failed halfway."""
    record = "" if record_to is None else (
        f"  apt-get -s install --no-install-recommends $missing | awk '/^Inst /{{print $2}}' >> {record_to}\n"
        f"  echo \"lab-installing $(sort -u {record_to} | tr '\\n' ' ')\"\n")
    checks = "\n".join(f"command -v {cmd} >/dev/null 2>&1 || missing=\"$missing {pkg}\""
                       for cmd, pkg in commands.items())
    return f"""missing=""
{checks}
if [ -n "$missing" ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
{record}  apt-get install -y -qq --no-install-recommends $missing >/dev/null
  case "$missing" in *etcd-server*) systemctl disable --now etcd >/dev/null 2>&1 || true ;; esac
{then}  echo "lab-installed$missing"
fi
"""


def printed_host_key(stdout: str, node: str) -> str:
    """`TYPE DATA` of the host key an adoption script printed last (`lab-host-key TYPE DATA`)."""
    for line in reversed(stdout.splitlines()):
        words = line.split()
        if len(words) >= 3 and words[0] == "lab-host-key":
            return f"{words[1]} {words[2]}"
    raise ProviderError(f"{node}: adoption printed no host key", hint="is /etc/ssh/ssh_host_ed25519_key.pub there?")


def printed_words(stdout: str, marker: str) -> list[str]:
    """The words after `marker` on every line a script began with it (`lab-installed etcd-server python3`)."""
    return [word for line in stdout.splitlines() if line.startswith(f"{marker} ") for word in line.split()[1:]]


def printed_reasons(output: str) -> str:
    """What a script said went wrong, its `lab-error: ...` lines joined."""
    return " ".join(line.split(":", 1)[1].strip() for line in output.splitlines() if line.startswith("lab-error:"))


def reboot_over_ssh(endpoint: SSHEndpoint, timeout: float, hint: str) -> None:
    """A clean reboot from inside the node; returns once it answers SSH with a new boot id."""
    old_boot = ssh_run(endpoint, f"cat {BOOT_ID_PATH}", timeout=30, check=True).stdout.strip()
    # The connection may drop before systemctl answers: that is the reboot working.
    with contextlib.suppress(ProviderError):
        ssh_run(endpoint, "systemctl reboot", timeout=30)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        wait_for_ssh(endpoint, deadline, poll=0.5, hint=hint)
        with contextlib.suppress(ProviderError):
            new_boot = ssh_run(endpoint, f"cat {BOOT_ID_PATH}", timeout=10).stdout.strip()
            if new_boot and new_boot != old_boot:
                return
        time.sleep(0.5)
    raise ProviderError(f"{endpoint.node}: did not come back from a reboot within {timeout:.0f} s", hint=hint)

PARTITION_TABLE = "lab_partition"


def partition_scripts(groups: list[list[str]], addresses: dict[str, str]) -> dict[str, str]:
    """An `nft -f` script per node: drop IP to and from every node of the other groups.

    Every node gets one: a node in no group (or alone with nobody to cut off)
    has its table removed, so a new partition replaces the last one whole.
    Only the lab's node addresses are dropped: the host (and lab's SSH) still
    reach every node, as with a firewall between racks.
    """
    group_of = {node: index for index, group in enumerate(groups) for node in group}
    scripts = {}
    for node in addresses:
        reset = f"table inet {PARTITION_TABLE}\ndelete table inet {PARTITION_TABLE}\n"
        if node not in group_of:
            scripts[node] = reset
            continue
        others = sorted((addresses[other] for other, index in group_of.items() if index != group_of[node]),
                        key=lambda ip: tuple(int(part) for part in ip.split(".")))
        if not others:
            scripts[node] = reset
            continue
        peers = ", ".join(others)
        scripts[node] = (reset + f"table inet {PARTITION_TABLE} {{\n"
                         f"  chain input {{ type filter hook input priority 0; policy accept; "
                         f"ip saddr {{ {peers} }} drop; }}\n"
                         f"  chain output {{ type filter hook output priority 0; policy accept; "
                         f"ip daddr {{ {peers} }} drop; }}\n}}\n")
    return scripts


class GuestPartitions:
    """`partition` and `heal` for a Provider whose nodes run nftables and answer SSH as root."""

    def partition(self, groups: list[list[str]]) -> None:
        """nftables inside every node of a group: drop all IP traffic to and from the other groups."""
        self.check_partition_groups(groups)
        self.context.state.set("partition", groups)
        scripts = partition_scripts(groups, self.context.addresses)
        failures = self._run_on_guests({node: f"nft -f - <<'LAB_EOF'\n{script}LAB_EOF"
                                        for node, script in scripts.items()})
        if failures:
            raise ProviderError("partition not applied on " + "; ".join(failures),
                                hint="check the nodes are running (`lab status`), then `lab fault heal`")

    def heal(self) -> None:
        self.context.state.set("partition", None)
        # A node that is down or paused cannot be reached now: a down one
        # loses its rules with its next boot, a paused one is healed when it
        # is resumed (`_reapply_partition`).
        failures = self._run_on_guests({node.name: f"nft delete table inet {PARTITION_TABLE} 2>/dev/null; true"
                                        for node in self.context.nodes})
        self.context.state.set("partition_stale", sorted(f.split(":", 1)[0] for f in failures))

    def _reapply_partition(self, node: str) -> None:
        """A node back from a power cycle or a pause gets the lab's current partition again.

        The rules live in the guest's kernel: a reboot or a kill drops them,
        while the lab's state still says partitioned (nspawn's live on the
        host and need none of this); a node that was paused during `heal`
        still has the old ones.
        """
        state = self.context.state
        if state is None:
            return
        groups = state.get("partition") or []
        stale = list(state.get("partition_stale") or [])
        if not groups and node not in stale:
            return
        script = partition_scripts(groups, self.context.addresses)[node]
        failures = self._run_on_guests({node: f"nft -f - <<'LAB_EOF'\n{script}LAB_EOF"})
        if failures:
            raise ProviderError("partition not restored on " + "; ".join(failures),
                                hint="`lab fault heal` or `lab fault partition ...` once the node answers")
        if node in stale:
            state.set("partition_stale", [n for n in stale if n != node])

    def _run_on_guests(self, commands: dict[str, str]) -> list[str]:
        """Run one command per node as root, in parallel; returns 'node: why' for each failure."""
        endpoints = self.ssh_endpoints()

        def one(node: str) -> str | None:
            try:
                result = ssh_run(endpoints[node], commands[node], timeout=20)
            except ProviderError as exc:
                return f"{node}: {exc.message}"
            return None if result.ok else f"{node}: exit {result.exit_status}: {(result.stdout + result.stderr).strip()}"

        with ThreadPoolExecutor(max_workers=max(1, len(commands))) as pool:
            return [failure for failure in pool.map(one, list(commands)) if failure]
