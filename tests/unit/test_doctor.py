"""`lab doctor` judged on recorded hosts (lab.core.doctor's pure half): Debian without Vagrant,
Ubuntu as a user, macOS with VirtualBox, Windows with Hyper-V, WSL2; the install commands each OS
gets, the recommendation, the resources for `--nodes N`, the exit code, the JSON document, and
`lab up`'s pointer to `lab doctor` when preflight fails. This host, for real:
tests/real/nodes/test_doctor_host.py."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from lab.core import doctor
from lab.core.doctor import DiskSpace, HostProbe, KernelFeatures
from lab.model.spec import LabSpec

DEBIAN = {"ID": "debian", "VERSION_ID": "12", "PRETTY_NAME": "Debian GNU/Linux 12 (bookworm)"}
UBUNTU = {"ID": "ubuntu", "ID_LIKE": "debian", "VERSION_ID": "24.04", "PRETTY_NAME": "Ubuntu 24.04 LTS"}
HYBRID = KernelFeatures(overlayfs=True, metacopy=True, user_namespaces=True, cgroup_layout="hybrid",
                        missing_controllers=())
V2_ONLY = KernelFeatures(overlayfs=True, metacopy=True, user_namespaces=True, cgroup_layout="v2",
                         missing_controllers=("freezer", "memory", "cpu"))
LINUX_TOOLS = {"systemd-nspawn": "/usr/bin/systemd-nspawn", "ip": "/usr/sbin/ip", "nft": "/usr/sbin/nft",
               "mount": "/usr/bin/mount", "debootstrap": "/usr/sbin/debootstrap"}
DISKS = (DiskSpace("lab directory", "/home/me/project/.lab/lab", "/home/me/project", 10_000, 1),
         DiskSpace("cache", "/root/.cache/lab", "/root/.cache/lab", 10_000, 1),
         DiskSpace("libvirt pool", "/var/lib/libvirt/images", "/var/lib/libvirt/images", 50_000, 2))

DEBIAN_WITHOUT_VAGRANT = HostProbe(
    system="Linux", os_release=DEBIAN, root=True, systemd_running=True, tools=LINUX_TOOLS,
    versions={"systemd-nspawn": "252"}, kernel=HYBRID,
    libvirt_problem="libvirtd is not answering: /var/run/libvirt/libvirt-sock does not exist",
    kvm_device=True, memory_total_mib=16_000, memory_available_mib=12_000, disks=DISKS, image_built=True,
    boxes_added={"virtualbox": False, "libvirt": False, "hyperv": False, "vmware_desktop": False,
                 "parallels": False})
MACOS_WITH_VIRTUALBOX = HostProbe(
    system="Darwin", machine="x86_64", os_version="14.5", root=False,
    tools={"VBoxManage": "/usr/local/bin/VBoxManage", "vagrant": "/usr/local/bin/vagrant"},
    versions={"VBoxManage": "7.0.14r161095", "vagrant": "2.4.1"}, vagrant_plugins=frozenset(),
    libvirt_problem="not on this OS", memory_total_mib=16_384, memory_available_mib=9_000,
    disks=(DiskSpace("lab directory", "/Users/me/p/.lab/lab", "/Users/me/p", 100_000, 7),
           DiskSpace("cache", "/Users/me/Library/Caches/lab", "/Users/me/Library/Caches", 100_000, 7),
           DiskSpace("VirtualBox VMs", "/Users/me/VirtualBox VMs", "/Users/me", 100_000, 7)),
    boxes_added={"virtualbox": True, "libvirt": False})
WINDOWS_WITH_HYPERV = HostProbe(
    system="Windows", machine="AMD64", os_version="10 (10.0.22631)", root=True,
    tools={"vagrant": r"C:\HashiCorp\Vagrant\bin\vagrant.exe"}, versions={"vagrant": "2.4.1"},
    vagrant_plugins=frozenset(), libvirt_problem="not on this OS", hyperv_service="Running",
    memory_total_mib=32_000, memory_available_mib=20_000, boxes_added={"hyperv": True})
WSL2_UBUNTU = HostProbe(
    system="Linux", os_release=UBUNTU, wsl="WSL2", root=True, tools=LINUX_TOOLS, kernel=V2_ONLY,
    libvirt_problem="libvirtd is not answering", kvm_device=False, image_built=False)


def verdict_of(probe: HostProbe, provider: str, spec: LabSpec | None = None) -> doctor.Verdict:
    return next(v for v in doctor.verdicts(probe, spec) if v.provider == provider)


def report(probe: HostProbe, asked: str | None = None, **spec) -> doctor.DoctorReport:
    return doctor.diagnose(probe, LabSpec(**spec), asked)


# ---------------------------------------------------------------- Debian and Ubuntu


def test_debian_without_vagrant_runs_nspawn_and_says_how_to_get_the_vm_providers():
    found = report(DEBIAN_WITHOUT_VAGRANT)
    assert [v.provider for v in found.verdicts if v.usable] == ["nspawn"]
    assert found.recommendation.provider == "nspawn" and found.recommendation.auto == "nspawn"
    assert found.exit_code == 0
    libvirt = verdict_of(DEBIAN_WITHOUT_VAGRANT, "libvirt")
    # As root: the commands tools/install.sh runs, without sudo.
    assert libvirt.fixes == ["apt-get install vagrant", "apt-get install vagrant-libvirt",
                             "apt-get install libvirt-daemon-system qemu-system-x86",
                             "apt-get install libvirt-clients"]
    assert "libvirtd not installed" in libvirt.reason
    virtualbox = verdict_of(DEBIAN_WITHOUT_VAGRANT, "virtualbox")
    assert virtualbox.fixes[0].startswith("install VirtualBox from virtualbox.org") and "not in Debian" in \
        virtualbox.fixes[0]
    assert virtualbox.fixes[1] == "apt-get install vagrant"
    assert verdict_of(DEBIAN_WITHOUT_VAGRANT, "hyperv").reason == "not on this OS: hyperv runs on Windows only"
    assert verdict_of(DEBIAN_WITHOUT_VAGRANT, "parallels").reason.startswith("not on this OS")


def test_a_stopped_libvirtd_is_started_the_way_this_host_starts_daemons():
    installed = replace(DEBIAN_WITHOUT_VAGRANT, tools={**LINUX_TOOLS, "vagrant": "/usr/bin/vagrant",
                                                       "libvirtd": "/usr/sbin/libvirtd", "virsh": "/usr/bin/virsh"},
                        vagrant_plugins=frozenset({"vagrant-libvirt"}))
    assert verdict_of(installed, "libvirt").fixes == ["systemctl start libvirtd"]
    no_systemd = replace(installed, systemd_running=False, root=False)
    assert verdict_of(no_systemd, "libvirt").fixes == ["sudo virtlogd -d && libvirtd -d  (no systemd here)"]
    answering = replace(installed, libvirt_problem=None)
    assert verdict_of(answering, "libvirt").usable


def test_ubuntu_as_a_user_gets_sudo_and_ubuntus_virtualbox_package():
    user = replace(DEBIAN_WITHOUT_VAGRANT, os_release=UBUNTU, root=False)
    nspawn = verdict_of(user, "nspawn")
    assert not nspawn.usable and nspawn.reason == "needs root"
    assert nspawn.fixes == ["run lab as root (sudo lab ...)"]
    assert verdict_of(user, "virtualbox").fixes == ["sudo apt-get install virtualbox", "sudo apt-get install vagrant"]
    found = report(user)
    assert found.recommendation.provider is None and found.exit_code == 1


def test_a_linux_without_apt_is_told_the_debian_package_names():
    fedora = replace(DEBIAN_WITHOUT_VAGRANT, os_release={"ID": "fedora", "PRETTY_NAME": "Fedora Linux 40"},
                     tools={k: v for k, v in LINUX_TOOLS.items() if k != "systemd-nspawn"})
    fix = verdict_of(fedora, "nspawn").fixes[0]
    assert fix.startswith("install systemd-nspawn with your system's package manager") and \
        "apt-get install systemd-container" in fix
    assert "developer.hashicorp.com/vagrant/install" in verdict_of(fedora, "virtualbox").fixes[1]


def test_nspawn_needs_what_its_preflight_checks():
    broken = replace(DEBIAN_WITHOUT_VAGRANT, tools={"systemd-nspawn": "/usr/bin/systemd-nspawn"},
                     kernel=replace(HYBRID, overlayfs=False, missing_controllers=("freezer",)))
    nspawn = verdict_of(broken, "nspawn")
    assert not nspawn.usable
    assert nspawn.fixes == ["apt-get install iproute2", "apt-get install nftables", "apt-get install mount",
                            "modprobe overlay", "mount the freezer cgroup v1 controller(s) under /sys/fs/cgroup"]


def test_user_namespaces_off_blocks_unprivileged_nodes_only():
    no_userns = replace(DEBIAN_WITHOUT_VAGRANT, kernel=replace(HYBRID, user_namespaces=False))
    assert not verdict_of(no_userns, "nspawn").usable
    assert "privileged=true" in verdict_of(no_userns, "nspawn").fixes[0]
    privileged = LabSpec(providers={"nspawn": {"privileged": True}})
    assert verdict_of(no_userns, "nspawn", privileged).usable
    # Without metacopy lab boots privileged nodes by itself: a note, not a blocker.
    no_metacopy = replace(DEBIAN_WITHOUT_VAGRANT, kernel=replace(HYBRID, metacopy=False))
    nspawn = verdict_of(no_metacopy, "nspawn")
    assert nspawn.usable and "nodes run privileged" in nspawn.reason


def test_the_image_to_build_is_the_next_step_not_a_blocker():
    unbuilt = replace(DEBIAN_WITHOUT_VAGRANT, image_built=False)
    nspawn = verdict_of(unbuilt, "nspawn")
    assert nspawn.usable and nspawn.next_step.startswith("lab box build")
    bare = replace(unbuilt, tools={k: v for k, v in LINUX_TOOLS.items() if k != "debootstrap"})
    assert verdict_of(bare, "nspawn").next_step.startswith("apt-get install debootstrap debian-archive-keyring, then")


# ---------------------------------------------------------------- KVM


def test_kvm_decides_speed_and_only_blocks_a_spec_that_forces_it():
    libvirt_host = replace(DEBIAN_WITHOUT_VAGRANT, tools={**LINUX_TOOLS, "vagrant": "v", "libvirtd": "l", "virsh": "v"},
                           vagrant_plugins=frozenset({"vagrant-libvirt"}), libvirt_problem=None)
    assert verdict_of(libvirt_host, "libvirt").usable
    assert "KVM not probed yet" in verdict_of(replace(libvirt_host, kvm_detail="not probed yet"), "libvirt").reason
    hangs = replace(libvirt_host, kvm_usable=False, kvm_detail="a KVM guest did not reach userspace within 15 s")
    forced = verdict_of(hangs, "libvirt", LabSpec(providers={"libvirt": {"driver": "kvm"}}))
    assert not forced.usable and forced.fixes == ["--set providers.libvirt.driver=qemu (software emulation, slow)"]
    assert verdict_of(hangs, "libvirt", LabSpec(providers={"libvirt": {"driver": "qemu"}})).usable
    automatic = verdict_of(hangs, "libvirt", LabSpec(providers={"libvirt": {"driver": "auto"}}))
    assert automatic.usable and "driver auto runs them under software emulation" in automatic.reason
    no_device = replace(libvirt_host, kvm_device=False)
    assert not verdict_of(no_device, "libvirt", LabSpec(providers={"libvirt": {"driver": "kvm"}})).usable
    # nspawn is recommended over libvirt unless KVM is known to boot guests.
    assert report(libvirt_host).recommendation.provider == "nspawn"
    boots = replace(libvirt_host, kvm_usable=True, kvm_detail="a KVM guest reached userspace in 0.9 s")
    assert report(boots).recommendation.provider == "libvirt"


def test_the_kvm_answer_is_the_probes_cached_verdict(monkeypatch):
    from lab.providers.vagrant import kvmprobe

    monkeypatch.setattr(doctor.platform, "system", lambda: "Linux")
    monkeypatch.setattr(doctor.Path, "exists", lambda self: True)
    host = kvmprobe.HostFacts(kernel="6.1", qemu="QEMU 7.2", kvm="usable")
    verdict = kvmprobe.KvmVerdict(boots=False, reason="QEMU with KVM exited (status 1)", seconds=0.4,
                                  probed_at="2026-12-01T10:00:00+00:00", host=host, box="lab-labos-1",
                                  box_identity="x")
    asked = []
    monkeypatch.setattr(kvmprobe, "cached_kvm_verdict", lambda box, **_: asked.append(box) or verdict)
    assert doctor.kvm_answer(LabSpec()) == (False, "QEMU with KVM exited (status 1); probed 2026-12-01T10:00:00+00:00")
    assert asked == ["lab-labos-1"]
    monkeypatch.setattr(kvmprobe, "cached_kvm_verdict", lambda box, **_: None)
    assert doctor.kvm_answer(LabSpec()) == (None, "not probed yet")


# ---------------------------------------------------------------- macOS, Windows, WSL2


def test_macos_with_virtualbox_recommends_it_and_brews_the_rest():
    found = report(MACOS_WITH_VIRTUALBOX)
    assert [v.provider for v in found.verdicts if v.usable] == ["virtualbox"]
    assert found.recommendation.provider == "virtualbox" and found.recommendation.auto == "virtualbox"
    assert "VirtualBox 7.0.14r161095" in verdict_of(MACOS_WITH_VIRTUALBOX, "virtualbox").reason
    assert verdict_of(MACOS_WITH_VIRTUALBOX, "nspawn").reason == "not on this OS: nspawn runs on Linux only"
    assert verdict_of(MACOS_WITH_VIRTUALBOX, "nspawn").fixes == [
        "use virtualbox, vmware_desktop, parallels on this OS"]
    assert verdict_of(MACOS_WITH_VIRTUALBOX, "libvirt").reason.startswith("not on this OS")
    assert verdict_of(MACOS_WITH_VIRTUALBOX, "parallels").fixes == ["brew install --cask parallels",
                                                                   "vagrant plugin install vagrant-parallels"]
    assert verdict_of(MACOS_WITH_VIRTUALBOX, "vmware_desktop").fixes == [
        "brew install --cask vmware-fusion",
        "vagrant plugin install vagrant-vmware-desktop, and brew install --cask vagrant-vmware-utility"]
    without_vagrant = replace(MACOS_WITH_VIRTUALBOX, tools={"VBoxManage": "/usr/local/bin/VBoxManage"})
    assert verdict_of(without_vagrant, "virtualbox").fixes == [
        "brew tap hashicorp/tap && brew install hashicorp/tap/hashicorp-vagrant"]
    no_box = replace(MACOS_WITH_VIRTUALBOX, boxes_added={"virtualbox": False})
    assert "on a Linux machine" in verdict_of(no_box, "virtualbox").next_step
    assert found.host_line() == "macOS 14.5, x86_64, not root"


def test_apple_silicon_is_told_the_box_is_amd64():
    virtualbox = verdict_of(replace(MACOS_WITH_VIRTUALBOX, machine="arm64"), "virtualbox")
    assert virtualbox.usable and "arm64 guests only" in virtualbox.reason


def test_windows_with_hyperv_recommends_it_and_wingets_the_rest():
    found = report(WINDOWS_WITH_HYPERV)
    assert [v.provider for v in found.verdicts if v.usable] == ["hyperv"]
    assert found.recommendation.provider == "hyperv"
    assert found.recommendation.auto is None  # auto-selection tries virtualbox, libvirt, nspawn only
    assert verdict_of(WINDOWS_WITH_HYPERV, "virtualbox").fixes == ["winget install --id Oracle.VirtualBox -e"]
    assert verdict_of(WINDOWS_WITH_HYPERV, "vmware_desktop").fixes[0] == "winget install --id VMware.WorkstationPro -e"
    assert "WSL2" in verdict_of(WINDOWS_WITH_HYPERV, "nspawn").fixes[0]
    assert found.host_line() == "Windows 10 (10.0.22631), AMD64, Administrator"
    without_vagrant = replace(WINDOWS_WITH_HYPERV, tools={})
    assert verdict_of(without_vagrant, "hyperv").fixes == ["winget install --id Hashicorp.Vagrant -e"]


@pytest.mark.parametrize("service, root, fix", [
    ("", True, "Enable-WindowsOptionalFeature -Online -FeatureName Microsoft-Hyper-V -All"),
    ("Stopped", True, "Start-Service vmms"),
    ("Running", False, "run lab from an Administrator PowerShell"),
])
def test_hyperv_says_what_is_missing(service, root, fix):
    hyperv = verdict_of(replace(WINDOWS_WITH_HYPERV, hyperv_service=service, root=root), "hyperv")
    assert not hyperv.usable and hyperv.fixes[0].startswith(fix)


def test_wsl2_is_detected_and_nspawn_there_needs_cgroup_v1():
    assert doctor.wsl_kind("Linux version 5.15.153.1-microsoft-standard-WSL2 (root@1c602f52c2e4) (gcc) #1 SMP", {}) \
        == "WSL2"
    assert doctor.wsl_kind("Linux version 4.4.0-19041-Microsoft (Microsoft@Microsoft.com) (gcc version 5.4.0)", {}) \
        == "WSL1"
    assert doctor.wsl_kind("Linux version 6.1.0-18-amd64", {"WSL_DISTRO_NAME": "Ubuntu", "WSL_INTEROP": "/run/x"}) \
        == "WSL2"
    assert doctor.wsl_kind("Linux version 6.1.0-18-amd64 (debian-kernel@lists.debian.org)", {}) is None
    found = report(WSL2_UBUNTU)
    nspawn = verdict_of(WSL2_UBUNTU, "nspawn")
    assert not nspawn.usable and "this host mounts cgroup v2 only" in nspawn.reason
    assert "systemd.unified_cgroup_hierarchy=0" in nspawn.fixes[0]
    assert "untested" in " ".join(c.detail for c in nspawn.checks)
    assert "from WSL2, run lab on the Windows side" in verdict_of(WSL2_UBUNTU, "hyperv").reason
    assert found.host_line() == "Ubuntu 24.04 LTS, x86_64, WSL2, root"
    assert found.to_json()["host"]["wsl"] == "WSL2"
    wsl1 = verdict_of(replace(WSL2_UBUNTU, wsl="WSL1", kernel=HYBRID), "nspawn")
    assert not wsl1.usable and wsl1.fixes == ["wsl --set-version DISTRO 2  (in PowerShell; `wsl -l -v` names the distro)"]


# ---------------------------------------------------------------- resources, exit code, JSON


def test_resources_for_nspawn_are_measured_per_node_and_add_up_per_filesystem():
    found = report(replace(DEBIAN_WITHOUT_VAGRANT, image_built=False), nodes={"count": 5})
    needs = {n.what: n for n in found.needs}
    assert found.resources_provider == "nspawn" and found.nodes == 5
    assert needs["memory"].needed_mib == 5 * doctor.NSPAWN_NODE_MEMORY_MIB and needs["memory"].ok
    assert needs["lab directory"].needed_mib == 5 * doctor.NSPAWN_NODE_DISK_MIB
    assert needs["cache"].needed_mib == doctor.NSPAWN_IMAGE_MIB
    # The lab directory and the cache share one filesystem: both needs must fit together.
    assert "with the rest on this filesystem" in needs["cache"].basis
    assert "VM disks" not in needs


def test_resources_for_vms_follow_the_spec_and_say_when_they_fall_short():
    small = replace(MACOS_WITH_VIRTUALBOX, memory_available_mib=2_000)
    found = report(small, nodes={"count": 3, "memory": 2048})
    needs = {n.what: n for n in found.needs}
    assert needs["memory"].needed_mib == 3 * 2048 and needs["memory"].ok is False
    assert needs["VM disks"].needed_mib == 3 * doctor.VM_DISK_MIB + doctor.VM_BOX_COPY_MIB
    assert needs["VM disks"].path == "/Users/me/VirtualBox VMs"
    libvirt = {n.what: n for n in report(DEBIAN_WITHOUT_VAGRANT, asked="libvirt").needs}
    assert libvirt["VM disks"].path == "/var/lib/libvirt/images" and libvirt["cache"].needed_mib == \
        doctor.VM_BOX_BUILD_MIB
    assert found.exit_code == 0  # resources inform; the exit code is about providers
    unknown = report(replace(small, memory_available_mib=None))
    assert next(n for n in unknown.needs if n.what == "memory").ok is None


def test_the_exit_code_follows_provider_when_asked():
    assert report(DEBIAN_WITHOUT_VAGRANT, asked="libvirt").exit_code == 1
    assert report(DEBIAN_WITHOUT_VAGRANT, asked="nspawn").exit_code == 0
    assert report(DEBIAN_WITHOUT_VAGRANT, asked="libvirt").resources_provider == "libvirt"


def test_the_json_document_is_stable():
    document = report(DEBIAN_WITHOUT_VAGRANT).to_json()
    json.dumps(document)
    assert list(document) == ["schema", "host", "providers", "usable", "recommended", "recommended_because",
                              "auto_selects", "asked", "resources", "exit_code"]
    assert document["schema"] == doctor.SCHEMA_VERSION
    assert [p["provider"] for p in document["providers"]] == ["nspawn", "virtualbox", "libvirt", "hyperv",
                                                              "vmware_desktop", "parallels", "hosts"]
    assert set(document["providers"][0]) == {"provider", "usable", "reason", "fixes", "next_step", "checks"}
    assert set(document["providers"][0]["checks"][0]) == {"name", "ok", "detail", "fix", "required"}
    assert set(document["resources"]) == {"provider", "nodes", "memory_total_mib", "needs"}
    assert set(document["resources"]["needs"][0]) == {"what", "needed_mib", "available_mib", "ok", "basis", "path"}
    assert document["host"]["package_manager"] == "apt" and document["usable"] == ["nspawn"]


def test_parsers_of_what_the_probe_reads():
    listing = "vagrant-libvirt (0.11.2, system)\nvagrant-vmware-desktop (3.0.3, global)\n  - Version Constraint: > 0\n"
    assert doctor.parse_plugin_list(listing) == {"vagrant-libvirt", "vagrant-vmware-desktop"}
    assert doctor.parse_plugin_list("No plugins installed.\n") == frozenset()
    assert doctor.cgroup_layout(["cgroup", "cgroup", "cgroup2"]) == "hybrid"
    assert doctor.cgroup_layout(["cgroup2"]) == "v2"
    assert doctor.cgroup_layout([]) == "none"
    assert doctor.user_namespaces_enabled("0\n", True) is False
    assert doctor.user_namespaces_enabled("15000\n", True) is True
    assert doctor.user_namespaces_enabled(None, False) is False


# ---------------------------------------------------------------- the verb, and `lab up`'s pointer


def test_lab_doctor_prints_the_table_or_the_document(run_lab, project, monkeypatch):
    monkeypatch.setattr(doctor, "probe_host", lambda spec, lab_dir: DEBIAN_WITHOUT_VAGRANT)
    shown = run_lab("doctor", "--nodes", "2")
    assert shown.exit_code == 0, shown.output
    assert "recommended: nspawn" in shown.stdout and "vagrant-libvirt" in shown.stdout
    assert "for `lab up --nodes 2` on nspawn" in shown.stdout
    document = run_lab("doctor", "--json", "--provider", "libvirt")
    assert document.exit_code == 1
    data = json.loads(document.stdout)
    assert data["asked"] == "libvirt" and data["exit_code"] == 1 and data["resources"]["provider"] == "libvirt"
    bad = run_lab("doctor", "--provider", "qemu")
    assert bad.exit_code == 2 and "Traceback" not in bad.output


def test_a_failed_preflight_points_to_lab_doctor(tmp_path, monkeypatch, no_lab_env):
    from lab.core import up as up_module
    from lab.core.lab import Lab
    from lab.errors import PrerequisiteError
    from lab.model.spec import Override
    from lab.testing.fake import fake_provider

    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.chdir(tmp_path)
    with fake_provider("nspawn") as fake:
        fake.failures["preflight"] = PrerequisiteError("systemd-nspawn not found",
                                                       hint="apt-get install systemd-container")
        lab = Lab.open(tmp_path / "lab.yaml", [Override(("provider",), "nspawn", "--provider")])
        with pytest.raises(PrerequisiteError) as caught:
            lab.up(bootstrap=False)
    assert caught.value.hint == "apt-get install systemd-container; run `lab doctor` for what this host can run"
    with pytest.raises(PrerequisiteError) as bare:
        with up_module.pointing_to_doctor(), up_module.pointing_to_doctor():
            raise PrerequisiteError("no provider can run on this host")
    assert bare.value.hint == up_module.DOCTOR_POINTER
