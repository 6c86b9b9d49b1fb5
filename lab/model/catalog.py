"""The one list of provider names, with where each lives and whether Vagrant drives it.

It sits in the model layer, not in lab/providers, because the spec (below the
providers) validates `provider:` against it; the registry in
`lab.providers` imports each class from here lazily, the Vagrantfile renderer
and the CLI derive their lists from it. Adding a provider is one row here.
"""

from __future__ import annotations

from typing import NamedTuple


class ProviderEntry(NamedTuple):
    target: str  # "module:Class", imported only when the provider is used
    vagrant: bool  # driven through a rendered Vagrantfile
    # The host systems (platform.system()) it runs on; empty: wherever Vagrant runs.
    systems: tuple[str, ...] = ()
    # Its nodes run on this machine (False: machines elsewhere, which no advice about this host suggests).
    local: bool = True


PROVIDERS: dict[str, ProviderEntry] = {
    "nspawn": ProviderEntry("lab.providers.nspawn.provider:NspawnProvider", vagrant=False, systems=("Linux",)),
    "virtualbox": ProviderEntry("lab.providers.vagrant.virtualbox:VirtualboxProvider", vagrant=True),
    # vagrant-libvirt installs on Linux only in practice (its native gems need libvirt's headers; on
    # macOS it has no local hypervisor to drive, and HashiCorp's Windows build cannot build it).
    "libvirt": ProviderEntry("lab.providers.vagrant.libvirt:LibvirtProvider", vagrant=True, systems=("Linux",)),
    "hyperv": ProviderEntry("lab.providers.vagrant.others:HypervProvider", vagrant=True, systems=("Windows",)),
    "vmware_desktop": ProviderEntry("lab.providers.vagrant.others:VmwareDesktopProvider", vagrant=True),
    "parallels": ProviderEntry("lab.providers.vagrant.others:ParallelsProvider", vagrant=True, systems=("Darwin",)),
    # Machines that exist already (cloud, Terraform, bare metal), reached over SSH: never picked by `auto`.
    "hosts": ProviderEntry("lab.providers.hosts:HostsProvider", vagrant=False, local=False),
}
# What to use instead on a system a provider does not run on.
PROVIDER_FOR_SYSTEM = {"Windows": "virtualbox", "Darwin": "virtualbox", "Linux": "libvirt"}
SYSTEM_NAMES = {"Windows": "Windows", "Darwin": "macOS", "Linux": "Linux"}
# The order auto-selection tries, as minikube does: a real hypervisor first.
AUTO_ORDER = ("virtualbox", "libvirt", "nspawn")
VAGRANT_PROVIDERS = tuple(name for name, entry in PROVIDERS.items() if entry.vagrant)
# What `provider:` in lab.yaml accepts.
PROVIDER_CHOICES = ("auto", *PROVIDERS)
