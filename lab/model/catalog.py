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


PROVIDERS: dict[str, ProviderEntry] = {
    "nspawn": ProviderEntry("lab.providers.nspawn.provider:NspawnProvider", vagrant=False),
    "virtualbox": ProviderEntry("lab.providers.vagrant.virtualbox:VirtualboxProvider", vagrant=True),
    "libvirt": ProviderEntry("lab.providers.vagrant.libvirt:LibvirtProvider", vagrant=True),
    "hyperv": ProviderEntry("lab.providers.vagrant.others:HypervProvider", vagrant=True),
    "vmware_desktop": ProviderEntry("lab.providers.vagrant.others:VmwareDesktopProvider", vagrant=True),
    "parallels": ProviderEntry("lab.providers.vagrant.others:ParallelsProvider", vagrant=True),
}
# The order auto-selection tries, as minikube does: a real hypervisor first.
AUTO_ORDER = ("virtualbox", "libvirt", "nspawn")
VAGRANT_PROVIDERS = tuple(name for name, entry in PROVIDERS.items() if entry.vagrant)
# What `provider:` in lab.yaml accepts.
PROVIDER_CHOICES = ("auto", *PROVIDERS)
