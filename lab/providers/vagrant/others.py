"""Hyper-V, VMware and Parallels through Vagrant: the shared VagrantProvider as it is.

Only how to tell, cheaply, whether the hypervisor is there differs; faults go
through Vagrant (lab knows no faster way into these hypervisors yet).
"""

from __future__ import annotations

import platform

from lab.providers.vagrant.provider import VagrantProvider


class HypervProvider(VagrantProvider):
    name = "hyperv"
    vagrant_provider = "hyperv"
    label = "Hyper-V"
    box_formats = ("hyperv",)

    @classmethod
    def hypervisor_problem(cls) -> tuple[str, str] | None:
        if platform.system() != "Windows":
            return "Hyper-V only runs on Windows", "choose another provider on this host"
        return None


class VmwareDesktopProvider(VagrantProvider):
    name = "vmware_desktop"
    vagrant_provider = "vmware_desktop"
    label = "VMware"
    plugin = "vagrant-vmware-desktop"
    plugin_hint = ("`vagrant plugin install vagrant-vmware-desktop` "
                   "and install the Vagrant VMware Utility")
    box_formats = ("vmware_desktop", "vmware_workstation", "vmware_fusion")
    hypervisor_tool = ("vmrun", "install VMware Workstation or Fusion and put vmrun on PATH")


class ParallelsProvider(VagrantProvider):
    name = "parallels"
    vagrant_provider = "parallels"
    label = "Parallels Desktop"
    plugin = "vagrant-parallels"
    plugin_hint = "`vagrant plugin install vagrant-parallels`"
    box_formats = ("parallels",)
    hypervisor_tool = ("prlctl", "install Parallels Desktop (Pro or Business edition)")
