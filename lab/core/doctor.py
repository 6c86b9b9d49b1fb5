"""`lab doctor`: which providers this host can run, why not, how to fix each gap, and whether
memory and disk suffice for `lab up --nodes N`.

Two halves, so the judgement is testable without the hosts it is about:

* `probe_host()` looks at the host once and returns a `HostProbe`, plain data:
  the OS (os-release, WSL), root, the programs on PATH and their versions,
  Vagrant's plugins (`vagrant plugin list`), the kernel features the nspawn
  provider's preflight checks (overlayfs, cgroup controllers as
  `lab.providers.nspawn.cgroups` finds them, user namespaces), libvirtd on the
  spec's URI, /dev/kvm and the KVM boot probe's cached answer, Hyper-V's
  service on Windows, free memory and disk. It never boots anything.
* Everything else is pure functions of a HostProbe: `check_*` give one
  provider's `Verdict` (each `Check` with the exact command that fixes it on
  this OS: apt names as tools/install.sh installs them, Homebrew on macOS,
  winget on Windows), `recommend` picks a provider, `resource_needs` sets what
  `lab up --nodes N` needs against what the host has. Unit tests feed recorded
  probes (Debian without Vagrant, macOS with VirtualBox, Windows with Hyper-V,
  WSL2) and read the verdicts.

The checks mirror each provider's own `availability()`/`preflight()`;
tests/real/nodes/test_doctor_host.py holds them to agree on this host.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Mapping

from lab.core.state import LABS_DIR
from lab.errors import LabError, PrerequisiteError
from lab.host.paths import cache_dir
from lab.model.catalog import AUTO_ORDER, PROVIDERS, SYSTEM_NAMES
from lab.model.spec import LabSpec, Override, load_spec

SCHEMA_VERSION = 1

# Memory an nspawn node uses (it has no reservation: `nodes.memory` is only its
# cgroup's limit). Measured by bench/docker.py as the node's memory cgroup's
# rss + page cache: 53 MiB idle with Docker socket-activated, 92 MiB once
# dockerd and containerd run (README, bench table); 100 MiB covers the second.
NSPAWN_NODE_MEMORY_MIB = 100
# Disk a node's own layer takes: a fresh node writes ~8 MiB (23 MiB for a fresh
# 3-node lab, the README's snapshot figure); the rest is room for etcd's data,
# the journal and container images pulled into the node's /var/lib/docker.
NSPAWN_NODE_DISK_MIB = 256
# The Lab OS image in the cache: ~510 MiB once built (du of labos-1 images
# here), rounded up for what the debootstrap build holds while it runs.
NSPAWN_IMAGE_MIB = 768
# Building a Lab OS box: the VM flavor of the image (~950 MiB) and the .box
# (~970 MiB for libvirt, ~330 MiB for VirtualBox), measured in ~/.cache/lab here.
VM_BOX_BUILD_MIB = 2048
# A VM's disk is a copy-on-write clone of the box: it grows with what the node
# writes. An allowance per VM, plus the hypervisor's own copy of the box
# (974 MiB in libvirt's default pool here), made once.
VM_DISK_MIB = 1024
VM_BOX_COPY_MIB = 1024

PLUGINS = {"libvirt": "vagrant-libvirt", "vmware_desktop": "vagrant-vmware-desktop",
           "parallels": "vagrant-parallels"}
# The programs the checks look for on PATH.
TOOLS = ("systemd-nspawn", "ip", "nft", "mount", "debootstrap", "vagrant", "VBoxManage", "virsh", "libvirtd",
         "vmrun", "prlctl")
LIBVIRT_SYSTEM_URI = "qemu:///system"
LIBVIRT_POOL = "/var/lib/libvirt/images"  # vagrant-libvirt's `default` pool on qemu:///system
VM_DISK_PLACES = {"libvirt": "libvirt pool", "virtualbox": "VirtualBox VMs", "parallels": "Parallels VMs"}

# ---------------------------------------------------------------- what the probe sees


@dataclass(frozen=True)
class KernelFeatures:
    """What the nspawn provider needs of a Linux kernel, as its preflight checks it."""

    overlayfs: bool
    metacopy: bool  # overlayfs copies up metadata alone: nodes get a user namespace
    user_namespaces: bool
    cgroup_layout: str  # "v1", "hybrid", "v2" or "none"
    missing_controllers: tuple[str, ...]  # of lab.providers.nspawn.cgroups.REQUIRED_CONTROLLERS


@dataclass(frozen=True)
class DiskSpace:
    what: str  # "lab directory", "cache", "VM disks"
    path: str  # as asked; `measured_at` is its nearest existing ancestor
    measured_at: str
    free_mib: int | None
    device: int | None  # paths on one filesystem share it: their needs add up


@dataclass(frozen=True)
class HostProbe:
    """Everything `lab doctor` judges, as found on one host (see probe_host)."""

    system: str  # platform.system(): Linux, Darwin, Windows
    machine: str = "x86_64"
    os_release: Mapping[str, str] = field(default_factory=dict)  # /etc/os-release on Linux
    os_version: str = ""  # macOS or Windows version
    wsl: str | None = None  # "WSL2", "WSL1" or None
    root: bool = False  # root on Linux and macOS, an elevated (Administrator) shell on Windows
    systemd_running: bool = False  # systemd is PID 1 (start daemons with systemctl)
    tools: Mapping[str, str] = field(default_factory=dict)  # program -> path, for those found
    versions: Mapping[str, str] = field(default_factory=dict)  # program -> its version
    vagrant_plugins: frozenset[str] | None = None  # None: vagrant could not list them
    kernel: KernelFeatures | None = None  # Linux only
    libvirt_uri: str = LIBVIRT_SYSTEM_URI
    libvirt_problem: str | None = "not checked"  # None: libvirtd answers on libvirt_uri
    kvm_device: bool = False  # /dev/kvm exists
    kvm_usable: bool | None = None  # the KVM boot probe's cached answer; None: not probed
    kvm_detail: str = "not probed"
    hyperv_service: str | None = None  # Windows: state of vmms ("Running", "Stopped"), "" if absent
    memory_total_mib: int | None = None
    memory_available_mib: int | None = None
    disks: tuple[DiskSpace, ...] = ()
    image_built: bool | None = None  # the spec's Lab OS image is in the cache (nspawn)
    boxes_added: Mapping[str, bool] = field(default_factory=dict)  # provider -> the spec's box is added


# ---------------------------------------------------------------- verdicts


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str  # what was found, or what is wrong
    fix: str | None = None  # the command (or step) that makes it ok on this OS
    required: bool = True  # False: a note that does not decide whether the provider is usable


@dataclass(frozen=True)
class Verdict:
    provider: str
    checks: tuple[Check, ...]
    next_step: str | None = None  # what `lab up` still needs that lab makes itself (an image, a box)

    @property
    def usable(self) -> bool:
        return all(c.ok for c in self.checks if c.required)

    @property
    def reason(self) -> str:
        """Why not (the failing checks), or what was found and what to know."""
        failing = [c.detail for c in self.checks if c.required and not c.ok]
        if failing:
            return "; ".join(failing)
        return "; ".join(c.detail for c in self.checks)

    @property
    def fixes(self) -> list[str]:
        """Fixes of the failing checks, required ones first, each once."""
        ordered = [c for c in self.checks if c.required and not c.ok] + \
                  [c for c in self.checks if not c.required and not c.ok]
        return list(dict.fromkeys(c.fix for c in ordered if c.fix))

    def to_json(self) -> dict:
        return {"provider": self.provider, "usable": self.usable, "reason": self.reason, "fixes": self.fixes,
                "next_step": self.next_step, "checks": [asdict(c) for c in self.checks]}


# ---------------------------------------------------------------- install commands per OS


def package_manager(probe: HostProbe) -> str | None:
    """apt (Debian, Ubuntu and their derivatives), brew (macOS), winget (Windows), else None."""
    if probe.system == "Darwin":
        return "brew"
    if probe.system == "Windows":
        return "winget"
    if {"debian", "ubuntu"} & os_family(probe):
        return "apt"
    return None


def os_family(probe: HostProbe) -> set[str]:
    return {probe.os_release.get("ID", ""), *probe.os_release.get("ID_LIKE", "").split()} - {""}


def apt(probe: HostProbe, *packages: str) -> str:
    return ("" if probe.root else "sudo ") + "apt-get install " + " ".join(packages)


def install(probe: HostProbe, what: str, *, apt_packages: tuple[str, ...] = (), brew: str | None = None,
            winget: str | None = None, otherwise: str | None = None) -> str:
    """The command installing `what` with this OS's package manager, or where to get it."""
    manager = package_manager(probe)
    if manager == "apt" and apt_packages:
        return apt(probe, *apt_packages)
    if manager == "brew" and brew:
        return brew
    if manager == "winget" and winget:
        return winget
    if otherwise:
        return otherwise
    if apt_packages:
        return f"install {what} with your system's package manager (Debian and Ubuntu: apt-get install " \
               f"{' '.join(apt_packages)})"
    return f"install {what}"


def vagrant_fix(probe: HostProbe) -> str:
    return install(probe, "Vagrant", apt_packages=("vagrant",),
                   brew="brew tap hashicorp/tap && brew install hashicorp/tap/hashicorp-vagrant",
                   winget="winget install --id Hashicorp.Vagrant -e",
                   otherwise=None if package_manager(probe) else
                   "install Vagrant from HashiCorp's downloads page (developer.hashicorp.com/vagrant/install)")


def virtualbox_fix(probe: HostProbe) -> str:
    if package_manager(probe) == "apt" and "ubuntu" in os_family(probe):
        return apt(probe, "virtualbox")  # Ubuntu's multiverse has it; Debian's archive does not
    return install(probe, "VirtualBox", brew="brew install --cask virtualbox",
                   winget="winget install --id Oracle.VirtualBox -e",
                   otherwise="install VirtualBox from virtualbox.org (Oracle's packages: it is not in Debian)")


def qemu_package(probe: HostProbe) -> str:
    return "qemu-system-arm" if probe.machine in ("aarch64", "arm64") else "qemu-system-x86"


# ---------------------------------------------------------------- the checks, one function per provider


def vagrant_check(probe: HostProbe) -> Check:
    if "vagrant" not in probe.tools:
        return Check("vagrant", False, "vagrant not found", vagrant_fix(probe))
    return Check("vagrant", True, f"vagrant {probe.versions.get('vagrant', '(version unknown)')}")


def tool_check(probe: HostProbe, name: str, tool: str, product: str, fix: str) -> Check:
    """`name`'s command-line tool on PATH, or how to install `product`, which brings it."""
    if tool in probe.tools:
        return Check(name, True, f"{tool} found")
    return Check(name, False, f"{tool} not found ({product})", fix)


def plugin_check(probe: HostProbe, plugin: str, fix: str) -> Check:
    if probe.vagrant_plugins is not None and plugin in probe.vagrant_plugins:
        return Check(f"{plugin} plugin", True, f"{plugin} plugin installed")
    return Check(f"{plugin} plugin", False, f"the {plugin} Vagrant plugin is not installed", fix)


def elsewhere(probe: HostProbe, provider: str) -> Verdict | None:
    """A provider the catalog says does not run on this host's system, with what to use instead."""
    systems = PROVIDERS[provider].systems
    if not systems or probe.system in systems:
        return None
    only = " and ".join(SYSTEM_NAMES.get(system, system) for system in systems)
    detail = f"not on this OS: {provider} runs on {only} only"
    if probe.wsl and "Windows" in systems:
        detail += f" (from {probe.wsl}, run lab on the Windows side)"
    here = [name for name, entry in PROVIDERS.items()
            if entry.local and (not entry.systems or probe.system in entry.systems)]
    advice = f"use {', '.join(here)} on this OS"
    if provider == "nspawn" and probe.system == "Windows":
        advice = ("run lab inside WSL2 (`wsl --install -d Debian`, then systemd=true under [boot] in "
                  f"/etc/wsl.conf; untested here), or {advice}")
    return Verdict(provider, (Check("operating system", False, detail, advice),))


def check_nspawn(probe: HostProbe, privileged: bool = False) -> Verdict:
    checks = []
    if "systemd-nspawn" in probe.tools:
        checks.append(Check("systemd-nspawn", True, f"systemd-nspawn {probe.versions.get('systemd-nspawn', '')}".strip()))
    else:
        checks.append(Check("systemd-nspawn", False, "systemd-nspawn not found",
                            install(probe, "systemd-nspawn", apt_packages=("systemd-container",))))
    checks.append(Check("root", True, "running as root") if probe.root else
                  Check("root", False, "needs root", "run lab as root (sudo lab ...)"))
    for tool, package in (("ip", "iproute2"), ("nft", "nftables"), ("mount", "mount")):
        if tool not in probe.tools:
            checks.append(Check(tool, False, f"`{tool}` not found", install(probe, tool, apt_packages=(package,))))
    kernel = probe.kernel or KernelFeatures(False, False, False, "none", ("freezer", "memory", "cpu"))
    checks.append(Check("overlayfs", True, "overlayfs") if kernel.overlayfs else
                  Check("overlayfs", False, "the kernel has no overlayfs", "modprobe overlay"))
    if kernel.missing_controllers:
        only_v2 = kernel.cgroup_layout == "v2"
        checks.append(Check(
            "cgroups", False,
            f"cgroup v1 controller{'s' if len(kernel.missing_controllers) > 1 else ''} "
            f"{', '.join(kernel.missing_controllers)} not mounted"
            + (" (this host mounts cgroup v2 only)" if only_v2 else ""),
            "boot with systemd.unified_cgroup_hierarchy=0 on the kernel command line (GRUB_CMDLINE_LINUX in "
            "/etc/default/grub, then update-grub and reboot): the nspawn provider needs the v1 freezer, "
            "memory and cpu controllers" if only_v2 else
            f"mount the {', '.join(kernel.missing_controllers)} cgroup v1 controller(s) under /sys/fs/cgroup"))
    else:
        checks.append(Check("cgroups", True, f"cgroups {kernel.cgroup_layout} (freezer, memory, cpu)"))
    # Nodes get a user namespace when overlayfs has metacopy (see the provider's _prepare_node).
    if privileged:
        checks.append(Check("user namespaces", True, "privileged nodes (providers.nspawn.privileged)",
                            required=False))
    elif not kernel.metacopy:
        checks.append(Check("user namespaces", False, "no overlayfs metacopy: nodes run privileged "
                            "(root in a node is root on the host)", "a kernel with overlayfs metacopy (4.19+)",
                            required=False))
    elif not kernel.user_namespaces:
        checks.append(Check("user namespaces", False, "user namespaces are disabled",
                            "sysctl -w user.max_user_namespaces=15000, or --set providers.nspawn.privileged=true"))
    else:
        checks.append(Check("user namespaces", True, "nodes in user namespaces"))
    if probe.wsl == "WSL1":
        checks.append(Check("WSL", False, "WSL1 has no Linux kernel of its own: nspawn needs WSL2",
                            "wsl --set-version DISTRO 2  (in PowerShell; `wsl -l -v` names the distro)"))
    elif probe.wsl:
        checks.append(Check("WSL", True, f"{probe.wsl}: nspawn inside WSL2 is untested here", required=False))
    next_step = None
    if probe.image_built is False:
        next_step = "lab box build (the node OS image: a few minutes, once)"
        if "debootstrap" not in probe.tools:
            next_step = f"{install(probe, 'debootstrap', apt_packages=('debootstrap', 'debian-archive-keyring'))}" \
                        f", then {next_step}"
    return Verdict("nspawn", tuple(checks), next_step)


def box_next_step(probe: HostProbe, provider: str) -> str | None:
    if probe.boxes_added.get(provider, True):
        return None
    if provider in ("libvirt", "virtualbox"):
        where = "" if probe.system == "Linux" else " on a Linux machine, then `vagrant box add` the .box file here"
        return f"lab box add --format {provider} (builds the Lab OS box{where})"
    return f"add a {provider} box to Vagrant and name it in box.vagrant (lab builds libvirt and virtualbox boxes)"


def check_virtualbox(probe: HostProbe) -> Verdict:
    checks = []
    if "VBoxManage" in probe.tools:
        checks.append(Check("VirtualBox", True, f"VirtualBox {probe.versions.get('VBoxManage', '(version unknown)')}"))
    else:
        checks.append(Check("VirtualBox", False, "VBoxManage not found", virtualbox_fix(probe)))
    checks.append(vagrant_check(probe))
    if probe.system == "Darwin" and probe.machine == "arm64":
        checks.append(Check("CPU", False, "Apple Silicon: VirtualBox runs arm64 guests only, the Lab OS box is "
                            "amd64 (see the arm64 issue)", "use box.vagrant with an arm64 box, or parallels",
                            required=False))
    if probe.wsl:
        checks.append(Check("WSL", False, f"inside {probe.wsl}: VirtualBox runs on the Windows side",
                            "run lab from Windows (PowerShell) for VirtualBox", required=False))
    return Verdict("virtualbox", tuple(checks), box_next_step(probe, "virtualbox"))


def check_libvirt(probe: HostProbe, driver: str = "kvm") -> Verdict:
    checks = [vagrant_check(probe)]
    plugin_fix = (apt(probe, "vagrant-libvirt") if package_manager(probe) == "apt"
                  else "vagrant plugin install vagrant-libvirt")
    checks.append(plugin_check(probe, "vagrant-libvirt", plugin_fix))
    if probe.libvirt_problem is None:
        checks.append(Check("libvirtd", True, f"libvirtd answers on {probe.libvirt_uri}"))
    elif "libvirtd" not in probe.tools and probe.libvirt_uri == LIBVIRT_SYSTEM_URI:
        checks.append(Check("libvirtd", False, "libvirtd not installed",
                            install(probe, "libvirt and QEMU",
                                    apt_packages=("libvirt-daemon-system", qemu_package(probe)))))
    else:
        start = ("systemctl start libvirtd" if probe.systemd_running
                 else "virtlogd -d && libvirtd -d  (no systemd here)")
        checks.append(Check("libvirtd", False, probe.libvirt_problem, ("" if probe.root else "sudo ") + start
                            if probe.libvirt_uri == LIBVIRT_SYSTEM_URI else None))
    if "virsh" not in probe.tools:
        checks.append(Check("virsh", False, "virsh not found (lab's faults use it)",
                            install(probe, "virsh", apt_packages=("libvirt-clients",))))
    checks.append(kvm_check(probe, driver))
    return Verdict("libvirt", tuple(checks), box_next_step(probe, "libvirt"))


def kvm_check(probe: HostProbe, driver: str) -> Check:
    """KVM decides speed, not whether libvirt works: QEMU emulates without it (driver qemu). Only a spec
    that forces driver kvm cannot run without it: `lab up` would wait for Vagrant's boot timeout."""
    qemu = "--set providers.libvirt.driver=qemu (software emulation, slow)"
    forced = driver == "kvm"
    emulation = {"auto": "; driver auto runs them under software emulation (qemu, slow)",
                 "qemu": "; driver qemu: software emulation"}.get(driver, "")
    if not probe.kvm_device:
        return Check("KVM", False, "no /dev/kvm" + (emulation or ": VMs only under software emulation"),
                     qemu if forced else None, required=forced)
    if probe.kvm_usable is True:
        return Check("KVM", True, f"KVM boots guests ({probe.kvm_detail})", required=False)
    if probe.kvm_usable is False:
        return Check("KVM", False, f"/dev/kvm present but KVM guests do not boot ({probe.kvm_detail})"
                     + emulation, qemu if forced else None, required=forced)
    probes = "; driver auto probes it once at `lab up`" if driver == "auto" else ""
    return Check("KVM", True, f"/dev/kvm present, KVM {probe.kvm_detail}{probes}", required=False)


def check_hyperv(probe: HostProbe) -> Verdict:
    # Checked on Windows through its management service (vmms), which exists once the
    # Hyper-V role is enabled: `Get-Service vmms`.
    checks = []
    if not probe.hyperv_service:
        checks.append(Check("Hyper-V", False, "Hyper-V is not enabled (no vmms service)",
                            "Enable-WindowsOptionalFeature -Online -FeatureName Microsoft-Hyper-V -All  (an "
                            "Administrator PowerShell on Windows Pro, Enterprise or Education; then reboot)"))
    elif probe.hyperv_service != "Running":
        checks.append(Check("Hyper-V", False, f"the Hyper-V service (vmms) is {probe.hyperv_service.lower()}",
                            "Start-Service vmms  (an Administrator PowerShell)"))
    else:
        checks.append(Check("Hyper-V", True, "Hyper-V running (vmms)"))
    checks.append(Check("Administrator", True, "an Administrator shell") if probe.root else
                  Check("Administrator", False, "Vagrant's Hyper-V provider needs an Administrator shell",
                        "run lab from an Administrator PowerShell (or join the Hyper-V Administrators group)"))
    checks.append(vagrant_check(probe))
    return Verdict("hyperv", tuple(checks), box_next_step(probe, "hyperv"))


def check_vmware_desktop(probe: HostProbe) -> Verdict:
    checks = [tool_check(probe, "VMware", "vmrun", "VMware Workstation or Fusion",
                         install(probe, "VMware", brew="brew install --cask vmware-fusion",
                                 winget="winget install --id VMware.WorkstationPro -e",
                                 otherwise="install VMware Workstation Pro from VMware's site and put vmrun on PATH")),
              vagrant_check(probe)]
    utility = ("brew install --cask vagrant-vmware-utility" if probe.system == "Darwin"
               else "the Vagrant VMware Utility from HashiCorp's downloads page")
    checks.append(plugin_check(probe, "vagrant-vmware-desktop",
                               f"vagrant plugin install vagrant-vmware-desktop, and {utility}"))
    return Verdict("vmware_desktop", tuple(checks), box_next_step(probe, "vmware_desktop"))


def check_parallels(probe: HostProbe) -> Verdict:
    checks = [tool_check(probe, "Parallels", "prlctl", "Parallels Desktop Pro or Business",
                         "brew install --cask parallels"),
              vagrant_check(probe),
              plugin_check(probe, "vagrant-parallels", "vagrant plugin install vagrant-parallels")]
    return Verdict("parallels", tuple(checks), box_next_step(probe, "parallels"))


def check_hosts(spec: LabSpec | None) -> Verdict:
    # Nothing to find on this machine: the hosts are reached over SSH (paramiko, within lab), and
    # `lab up` probes each of them before changing any.
    inventory = spec.providers.hosts.inventory if spec else []
    if inventory:
        listed = ", ".join(str(entry.address) for entry in inventory[:5]) + (" ..." if len(inventory) > 5 else "")
        check = Check("inventory", True, f"{len(inventory)} host(s) in providers.hosts.inventory ({listed}); "
                                         "`lab up` probes each over SSH before changing any")
    else:
        check = Check("inventory", False, "no machines listed in providers.hosts.inventory (lab.yaml)",
                      "list your Debian/Ubuntu hosts: providers: {hosts: {inventory: [{address: 192.168.1.21, "
                      "user: admin, key: ~/.ssh/id_ed25519}]}}")
    return Verdict("hosts", (check,))


def verdicts(probe: HostProbe, spec: LabSpec | None = None) -> list[Verdict]:
    """One verdict per provider, in the catalog's order; the catalog says which systems each runs on."""
    privileged = spec.providers.nspawn.privileged if spec else False
    driver = spec.providers.libvirt.driver if spec else "kvm"
    checks = {"nspawn": lambda: check_nspawn(probe, privileged), "virtualbox": lambda: check_virtualbox(probe),
              "libvirt": lambda: check_libvirt(probe, driver), "hyperv": lambda: check_hyperv(probe),
              "vmware_desktop": lambda: check_vmware_desktop(probe), "parallels": lambda: check_parallels(probe),
              "hosts": lambda: check_hosts(spec)}
    return [elsewhere(probe, name) or checks[name]() for name in PROVIDERS]


# ---------------------------------------------------------------- which provider


@dataclass(frozen=True)
class Recommendation:
    provider: str | None
    why: str
    auto: str | None  # what `provider: auto` picks on this host


def recommend(found: list[Verdict], probe: HostProbe) -> Recommendation:
    """A hypervisor a laptop has first (VirtualBox, then the OS's own), libvirt where KVM is known to work,
    nspawn on Linux as root, libvirt under emulation last; and what auto-selection would pick."""
    usable = {v.provider for v in found if v.usable}
    # lab.providers.select tries AUTO_ORDER; libvirt only once a Lab OS box was added, and not where
    # its VMs would run under emulation (no /dev/kvm, or the KVM probe saw no guest boot).
    auto = next((name for name in AUTO_ORDER if name in usable
                 and (name != "libvirt" or (probe.boxes_added.get("libvirt", False) and probe.kvm_device
                                            and probe.kvm_usable is not False))), None)
    reasons = {
        "virtualbox": "VirtualBox is here: lab's laptop provider",
        "hyperv": "Hyper-V is Windows' own hypervisor",
        "parallels": "Parallels Desktop runs the VMs",
        "vmware_desktop": "VMware runs the VMs",
        "libvirt": "libvirt with working KVM",
        "nspawn": "Linux as root: nodes are containers that boot in seconds, no hypervisor needed",
    }
    order = ["virtualbox", "hyperv", "parallels", "vmware_desktop"]
    if probe.kvm_usable:
        order.append("libvirt")
    order.append("nspawn")
    for name in order:
        if name in usable:
            return Recommendation(name, reasons[name], auto)
    if "libvirt" in usable:
        why = ("libvirt: /dev/kvm is there, whether KVM guests boot is not probed yet"
               if probe.kvm_device and probe.kvm_usable is None
               else "libvirt under software emulation (slow: a VM takes a minute to boot)")
        return Recommendation("libvirt", why, auto)
    return Recommendation(None, "no provider can run here yet: apply a fix from the table", auto)


# ---------------------------------------------------------------- resources


@dataclass(frozen=True)
class Need:
    what: str  # "memory" or a DiskSpace's `what`
    needed_mib: int
    available_mib: int | None
    ok: bool | None  # None: unknown (could not be measured)
    basis: str  # where the figure comes from
    path: str | None = None


def resource_needs(probe: HostProbe, provider: str, node_memory_mib: list[int]) -> list[Need]:
    """What `lab up` with these nodes on `provider` needs, against what the host has free.

    Disk needs on one filesystem add up: the lab directory and the cache often share one."""
    count = len(node_memory_mib)
    needs: list[Need] = []
    if provider == "hosts":
        return needs  # the nodes are other machines: nothing of theirs runs here
    if provider == "nspawn":
        memory = count * NSPAWN_NODE_MEMORY_MIB
        basis = f"{count} x {NSPAWN_NODE_MEMORY_MIB} MiB: an nspawn node uses ~92 MiB with Docker running; " \
                f"nodes.memory is only its limit"
    else:
        memory = sum(node_memory_mib)
        basis = f"nodes.memory of {count} VM{'s' if count != 1 else ''}"
    needs.append(Need("memory", memory, probe.memory_available_mib,
                      None if probe.memory_available_mib is None else probe.memory_available_mib >= memory, basis))
    wanted: dict[str, tuple[str, int, str]] = {}  # place (a DiskSpace's `what`) -> (shown as, MiB, basis)
    if provider == "nspawn":
        wanted["lab directory"] = ("lab directory", count * NSPAWN_NODE_DISK_MIB,
                                   f"{count} x {NSPAWN_NODE_DISK_MIB} MiB of node layers and /var/lib/docker")
        if probe.image_built is False:
            wanted["cache"] = ("cache", NSPAWN_IMAGE_MIB, "the Lab OS image, built once")
    else:
        if probe.boxes_added.get(provider) is False and provider in ("libvirt", "virtualbox"):
            wanted["cache"] = ("cache", VM_BOX_BUILD_MIB, "building the Lab OS box: its VM image and the .box")
        # Where the VMs' disks go: libvirt's pool, VirtualBox's machine folder; Hyper-V and VMware
        # keep Vagrant's clones in the lab's .vagrant directory.
        place = VM_DISK_PLACES.get(provider, "lab directory")
        wanted[place] = ("VM disks", count * VM_DISK_MIB + VM_BOX_COPY_MIB,
                         f"{count} x {VM_DISK_MIB} MiB of VM disk growth + the hypervisor's copy of the box")
    by_device: dict[object, int] = {}
    for disk in probe.disks:
        if disk.what in wanted:
            key = disk.device if disk.device is not None else disk.measured_at
            by_device[key] = by_device.get(key, 0) + wanted[disk.what][1]
    for disk in probe.disks:
        if disk.what not in wanted:
            continue
        shown, needed, basis = wanted[disk.what]
        key = disk.device if disk.device is not None else disk.measured_at
        together = by_device[key]
        if together != needed:
            basis += f"; {together} MiB with the rest on this filesystem"
        ok = None if disk.free_mib is None else disk.free_mib >= together
        needs.append(Need(shown, needed, disk.free_mib, ok, basis, disk.path))
    return needs


def capacity_problem(spec: LabSpec, lab_dir: Path, provider: str) -> PrerequisiteError | None:
    """Why a new lab of `spec` on `provider` cannot fit in this host's free memory or disk (an error to
    raise before anything is created), or None when it fits or the host cannot be measured."""
    nodes = spec.node_specs()
    _, available = memory_mib()
    probe = HostProbe(system=platform.system(), memory_available_mib=available, disks=disk_spaces(spec, lab_dir))
    short = [need for need in resource_needs(probe, provider, [n.memory for n in nodes]) if need.ok is False]
    if not short:
        return None
    # Every need grows with the node count (the image's share, if any, does not: this errs low).
    fits = min(int(need.available_mib // (need.needed_mib / len(nodes))) for need in short)
    shown = "; ".join(f"{need.what}{f' ({need.path})' if need.path else ''} needs {need.needed_mib} MiB "
                      f"({need.basis}), {need.available_mib} MiB {'available' if need.what == 'memory' else 'free'}"
                      for need in short)
    fewer = f"--nodes {fits} fits" if fits >= 1 else "not even one node fits"
    return PrerequisiteError(f"a {len(nodes)}-node {provider} lab does not fit on this host: {shown}",
                             hint=f"use fewer nodes ({fewer}) or free some first; `lab doctor --nodes "
                                  f"{len(nodes)} --provider {provider}` shows every figure")


# ---------------------------------------------------------------- the report


@dataclass(frozen=True)
class DoctorReport:
    probe: HostProbe
    verdicts: list[Verdict]
    recommendation: Recommendation
    asked: str | None  # --provider, if given: the exit code follows it alone
    resources_provider: str | None
    nodes: int
    needs: list[Need]

    @property
    def exit_code(self) -> int:
        usable = {v.provider for v in self.verdicts if v.usable}
        if self.asked:
            return 0 if self.asked in usable else 1
        return 0 if usable else 1

    def host_line(self) -> str:
        return describe_host(self.probe)

    def to_json(self) -> dict:
        probe = self.probe
        return {
            "schema": SCHEMA_VERSION,
            "host": {"description": describe_host(probe), "system": probe.system, "machine": probe.machine,
                     "os_id": probe.os_release.get("ID"), "os_version": probe.os_release.get("VERSION_ID")
                     or probe.os_version or None, "wsl": probe.wsl, "root": probe.root,
                     "package_manager": package_manager(probe), "tools": dict(probe.tools),
                     "versions": dict(probe.versions),
                     "vagrant_plugins": sorted(probe.vagrant_plugins) if probe.vagrant_plugins is not None else None,
                     "kvm": {"device": probe.kvm_device, "usable": probe.kvm_usable, "detail": probe.kvm_detail}},
            "providers": [v.to_json() for v in self.verdicts],
            "usable": [v.provider for v in self.verdicts if v.usable],
            "recommended": self.recommendation.provider,
            "recommended_because": self.recommendation.why,
            "auto_selects": self.recommendation.auto,
            "asked": self.asked,
            "resources": {"provider": self.resources_provider, "nodes": self.nodes,
                          "memory_total_mib": probe.memory_total_mib,
                          "needs": [asdict(n) for n in self.needs]},
            "exit_code": self.exit_code,
        }


def describe_host(probe: HostProbe) -> str:
    if probe.system == "Linux":
        name = probe.os_release.get("PRETTY_NAME") or probe.os_release.get("NAME") or "Linux"
    elif probe.system == "Darwin":
        name = f"macOS {probe.os_version}".strip()
    else:
        name = f"{probe.system} {probe.os_version}".strip()
    parts = [name, probe.machine]
    if probe.wsl:
        parts.append(probe.wsl)
    parts.append(("root" if probe.system != "Windows" else "Administrator") if probe.root
                 else "not root" if probe.system != "Windows" else "not elevated")
    return ", ".join(parts)


def diagnose(probe: HostProbe, spec: LabSpec, asked: str | None = None) -> DoctorReport:
    """The whole judgement (pure): verdicts, a recommendation, the resources for the spec's nodes."""
    found = verdicts(probe, spec)
    recommendation = recommend(found, probe)
    chosen = asked or (spec.provider if spec.provider != "auto" else None) or recommendation.provider
    nodes = spec.node_specs()
    needs = resource_needs(probe, chosen, [n.memory for n in nodes]) if chosen else []
    return DoctorReport(probe, found, recommendation, asked, chosen, len(nodes), needs)


# ---------------------------------------------------------------- looking at this host


def run_doctor(spec_path: Path, overrides: list[Override], asked: str | None) -> DoctorReport:
    """Load the spec (for its nodes, box and libvirt URI), probe this host, judge."""
    loaded = load_spec(spec_path, overrides)
    lab_dir = (loaded.project_dir / LABS_DIR / loaded.spec.name).absolute()
    return diagnose(probe_host(loaded.spec, lab_dir), loaded.spec, asked)


def probe_host(spec: LabSpec, lab_dir: Path) -> HostProbe:
    system = platform.system()
    tools = {name: path for name in TOOLS if (path := find_tool(name))}
    # The commands (Vagrant's take seconds each: Ruby starts) run side by side.
    with ThreadPoolExecutor(max_workers=3) as pool:
        plugins = pool.submit(vagrant_plugins, tools.get("vagrant"))
        versions = pool.submit(tool_versions, tools)
        kvm = pool.submit(kvm_answer, spec)
    uri = spec.providers.libvirt.uri
    kvm_usable, kvm_detail = kvm.result()
    total, available = memory_mib()
    return HostProbe(
        system=system, machine=platform.machine(), os_release=read_os_release() if system == "Linux" else {},
        os_version=os_version(system),
        wsl=wsl_kind(read_text("/proc/version") or "", os.environ) if system == "Linux" else None,
        root=is_root(system), systemd_running=Path("/run/systemd/system").is_dir(), tools=tools,
        versions=versions.result(), vagrant_plugins=plugins.result(),
        kernel=kernel_features() if system == "Linux" else None,
        libvirt_uri=uri, libvirt_problem=libvirt_problem(uri) if system == "Linux" else "not on this OS",
        kvm_device=Path("/dev/kvm").exists(), kvm_usable=kvm_usable, kvm_detail=kvm_detail,
        hyperv_service=hyperv_service() if system == "Windows" else None,
        memory_total_mib=total, memory_available_mib=available,
        disks=disk_spaces(spec, lab_dir), image_built=image_built(spec), boxes_added=boxes_added(spec))


def find_tool(name: str) -> str | None:
    found = shutil.which(name) or (shutil.which(f"{name}.exe") if os.name == "nt" else None)
    if found is None and name == "VBoxManage":
        # VirtualBox on Windows does not put itself on PATH; Vagrant looks here too.
        for variable in ("VBOX_MSI_INSTALL_PATH", "VBOX_INSTALL_PATH"):
            for directory in filter(None, os.environ.get(variable, "").split(";")):
                if (Path(directory) / "VBoxManage.exe").is_file():
                    return str(Path(directory) / "VBoxManage.exe")
    if found is None and name in ("libvirtd", "virsh") and os.name != "nt":
        found = next((str(p) for p in (Path("/usr/sbin") / name, Path("/sbin") / name) if p.is_file()), None)
    return found


def read_text(path: str) -> str | None:
    try:
        return Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None


def read_os_release() -> dict[str, str]:
    try:
        return dict(platform.freedesktop_os_release())
    except OSError:
        return {}


def os_version(system: str) -> str:
    if system == "Darwin":
        return platform.mac_ver()[0]
    if system == "Windows":
        return f"{platform.release()} ({platform.version()})"
    return ""


def wsl_kind(proc_version: str, environ: Mapping[str, str]) -> str | None:
    """WSL2, WSL1 or None, from /proc/version (Microsoft's kernels name themselves) and WSL's variables."""
    text = proc_version.lower()
    if "microsoft" not in text and "WSL_DISTRO_NAME" not in environ:
        return None
    # WSL2 runs a real kernel ("...-microsoft-standard-WSL2"); WSL1's says "Microsoft" and has no
    # WSL_INTEROP socket.
    if "wsl2" in text or "microsoft-standard" in text or "WSL_INTEROP" in environ:
        return "WSL2"
    return "WSL1"


def is_root(system: str) -> bool:
    if system == "Windows":
        try:
            import ctypes

            return bool(ctypes.windll.shell32.IsUserAnAdmin())  # type: ignore[attr-defined]
        except (AttributeError, OSError):
            return False
    return hasattr(os, "geteuid") and os.geteuid() == 0


def command_output(argv: list[str], timeout: float = 20) -> str | None:
    """A command's stdout when it exits 0 in time, else None (doctor reports, it never fails on a tool)."""
    from lab.host.run import run

    try:
        result = run(argv, check=False, timeout=timeout, shown_as=Path(argv[0]).name)
    except LabError:
        return None
    return result.stdout if result.ok else None


def first_line(text: str | None) -> str | None:
    return text.strip().splitlines()[0].strip() if text and text.strip() else None


def tool_versions(tools: Mapping[str, str]) -> dict[str, str]:
    versions = {}
    if "vagrant" in tools:
        line = first_line(command_output([tools["vagrant"], "--version"]))  # "Vagrant 2.3.4"
        if line:
            versions["vagrant"] = line.split()[-1]
    if "VBoxManage" in tools:
        line = first_line(command_output([tools["VBoxManage"], "--version"]))  # "7.0.14r161095"
        if line:
            versions["VBoxManage"] = line
    if "systemd-nspawn" in tools:
        line = first_line(command_output([tools["systemd-nspawn"], "--version"]))  # "systemd 252 (252.39-1~deb12u2)"
        if line and len(line.split()) > 1:
            versions["systemd-nspawn"] = line.split()[1]
    return versions


def parse_plugin_list(text: str) -> frozenset[str]:
    """`vagrant plugin list`: "vagrant-libvirt (0.11.2, system)" per plugin, or "No plugins installed." (pure)."""
    return frozenset(m.group(1) for line in text.splitlines()
                     if (m := re.match(r"^([A-Za-z0-9_.-]+) \(", line.strip())))


def vagrant_plugins(vagrant: str | None) -> frozenset[str] | None:
    """What `vagrant plugin list` names; if it fails, the plugins lab's preflight finds in Vagrant's files."""
    if vagrant is None:
        return None
    listed = command_output([vagrant, "plugin", "list"], timeout=60)
    if listed is not None:
        return parse_plugin_list(listed)
    from lab.host.vagrant import plugin_installed

    return frozenset(plugin for plugin in PLUGINS.values() if plugin_installed(plugin))


def kernel_features() -> KernelFeatures:
    from lab.host.mounts import mounted
    from lab.providers.nspawn import cgroups, overlay

    try:
        mounts = mounted()
        missing = tuple(c for c in cgroups.REQUIRED_CONTROLLERS if cgroups.hierarchy(c) is None)
    except OSError:
        mounts, missing = [], tuple(cgroups.REQUIRED_CONTROLLERS)
    return KernelFeatures(overlayfs="overlay" in (read_text("/proc/filesystems") or ""),
                          metacopy=overlay.metacopy_available(),
                          user_namespaces=user_namespaces_enabled(read_text("/proc/sys/user/max_user_namespaces"),
                                                                  Path("/proc/self/ns/user").exists()),
                          cgroup_layout=cgroup_layout([m.fs_type for m in mounts
                                                       if str(m.mount_point).startswith("/sys/fs/cgroup")]),
                          missing_controllers=missing)


def user_namespaces_enabled(max_user_namespaces: str | None, has_user_ns: bool) -> bool:
    try:
        return has_user_ns and int((max_user_namespaces or "1").strip()) > 0
    except ValueError:
        return has_user_ns


def cgroup_layout(fs_types: list[str]) -> str:
    """v1, hybrid (v1 controllers and a controller-less cgroup2, as here), v2, or none (pure)."""
    v1, v2 = "cgroup" in fs_types, "cgroup2" in fs_types
    return "hybrid" if v1 and v2 else "v1" if v1 else "v2" if v2 else "none"


def libvirt_problem(uri: str) -> str | None:
    if uri == LIBVIRT_SYSTEM_URI:
        from lab.providers.vagrant.libvirt import libvirt_socket_problem

        return libvirt_socket_problem()
    if uri == "qemu:///session":
        return None  # libvirt starts the session daemon on the first connection
    # A remote daemon (qemu+ssh://): asked as `lab up` asks it, with the user's ssh.
    from lab.providers.vagrant.libvirt import remote_libvirtd_problem

    try:
        return remote_libvirtd_problem(uri, timeout=20)
    except LabError as exc:  # virsh missing: its own check says so
        return exc.message


def kvm_answer(spec: LabSpec) -> tuple[bool | None, str]:
    """The KVM boot probe's cached answer for this host and the spec's libvirt box, if it ran
    (lab.providers.vagrant.kvmprobe); doctor itself never boots a VM."""
    if platform.system() != "Linux" or not Path("/dev/kvm").exists():
        return None, "not probed"
    from lab.providers.vagrant.kvmprobe import cached_kvm_verdict
    from lab.providers.vagrant.render import vagrant_box_name

    try:
        verdict = cached_kvm_verdict(vagrant_box_name(spec))
    except (LabError, OSError):
        verdict = None
    if verdict is None:
        return None, "not probed yet"
    return verdict.boots, f"{verdict.reason}; probed {verdict.probed_at}"


def hyperv_service() -> str | None:
    """The state of Hyper-V's management service (vmms): "Running", "Stopped", or "" when it is absent."""
    output = command_output(["powershell", "-NoProfile", "-NonInteractive", "-Command",
                             "(Get-Service vmms -ErrorAction SilentlyContinue).Status"], timeout=30)
    return (output or "").strip()


def memory_mib() -> tuple[int | None, int | None]:
    try:
        import psutil

        memory = psutil.virtual_memory()
    except (ImportError, OSError):
        return None, None
    return memory.total >> 20, memory.available >> 20


def disk_spaces(spec: LabSpec, lab_dir: Path) -> tuple[DiskSpace, ...]:
    """Free space where a lab writes: its directory, the cache, and each hypervisor's default VM folder."""
    places = [("lab directory", lab_dir), ("cache", cache_dir()), ("VirtualBox VMs", Path.home() / "VirtualBox VMs")]
    if platform.system() == "Linux":
        places.append(("libvirt pool", Path(LIBVIRT_POOL) if spec.providers.libvirt.uri == LIBVIRT_SYSTEM_URI
                       else Path.home() / ".local/share/libvirt/images"))
    if platform.system() == "Darwin":
        places.append(("Parallels VMs", Path.home() / "Parallels"))
    return tuple(disk_space(what, path) for what, path in places)


def disk_space(what: str, path: Path) -> DiskSpace:
    existing = path
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    try:
        free = shutil.disk_usage(existing).free >> 20
        device = existing.stat().st_dev
    except OSError:
        free, device = None, None
    return DiskSpace(what, str(path), str(existing), free, device)


def image_built(spec: LabSpec) -> bool | None:
    from lab.images.cache import find_image

    try:
        return find_image(spec.box.name, spec.box.version) is not None
    except (LabError, OSError):
        return None


def boxes_added(spec: LabSpec) -> dict[str, bool]:
    from lab.host.vagrant import added_box_dirs
    from lab.providers import provider_class
    from lab.providers.vagrant.render import vagrant_box_name

    box = vagrant_box_name(spec)
    found = {}
    for name, entry in PROVIDERS.items():
        if entry.vagrant and (not entry.systems or platform.system() in entry.systems):
            formats = getattr(provider_class(name), "box_formats", ()) or (name,)
            found[name] = any(added_box_dirs(box, fmt) for fmt in formats)
    return found
