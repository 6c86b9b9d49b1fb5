#!/usr/bin/env bash
# Install everything lab needs on a Debian or Ubuntu machine, as root:
# the host tools (apt), lab itself in a virtualenv at .venv (pip), and a
# `lab` command in /usr/local/bin. Safe to run again.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
if [ "$(id -u)" != 0 ]; then
  echo "install.sh: run as root (sudo $0): nodes need root for nspawn, mounts and bridges" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# systemd-container: systemd-nspawn (the embedded provider); debootstrap builds
# the node OS image; iproute2/nftables: bridges and partitions; openssh-client:
# `lab ssh` and testinfra; vagrant: the VM providers and `lab validate`;
# etcd-client: etcdctl on the host. The libvirt provider: vagrant-libvirt,
# libvirtd, QEMU, dnsmasq and iptables for its networks. VM boxes
# (`lab box build --format libvirt|virtualbox`): qemu-utils, and what writes
# a bootable disk from plain files: e2fsprogs, dosfstools, mtools, syslinux, fdisk.
# The lab registry: docker-registry (Docker Distribution), skopeo (with libgpgme11) to copy
# images into it, busybox-static for the seeded busybox image. openssh-server: the sshd the
# remote-libvirt test starts on loopback (qemu+ssh://root@127.0.0.1); a host that had no sshd
# before gets none running from this script (below). arm64 boxes (`lab box build --arch arm64`):
# qemu-user-static runs the arm64 image's programs during its build, qemu-system-arm
# (qemu-system-aarch64) and qemu-efi-aarch64 (edk2) boot it.
had_sshd=$(dpkg-query -W -f='${Status}' openssh-server 2>/dev/null | grep -c "ok installed" || true)
apt-get install -y -qq --no-install-recommends \
  systemd-container debootstrap debian-archive-keyring iproute2 nftables iputils-ping openssh-client ca-certificates \
  python3 python3-venv python3-pip vagrant etcd-client \
  vagrant-libvirt libvirt-daemon-system libvirt-clients qemu-system-x86 qemu-utils dnsmasq-base iptables \
  e2fsprogs dosfstools mtools syslinux syslinux-common fdisk \
  docker-registry skopeo libgpgme11 busybox-static openssh-server \
  qemu-user-static qemu-system-arm qemu-efi-aarch64 >/dev/null
# The package starts its own registry on every address's port 5000: lab runs one per lab, bound
# to that lab's host address only, and needs the port free.
if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
  systemctl disable --now docker-registry.service >/dev/null 2>&1 || true
  if [ "$had_sshd" = 0 ]; then
    systemctl disable --now ssh.service ssh.socket >/dev/null 2>&1 || true
  fi
fi
# A foreign (arm64) image build runs its programs through binfmt_misc and qemu-user-static, registered
# with flag F (the interpreter opened once, so it works inside the image's chroot). systemd-binfmt does
# this at boot on a systemd host; without systemd as PID 1 (containers, CI), here, once. lab itself
# never registers interpreters: that changes the kernel for every program on the machine.
binfmt=/proc/sys/fs/binfmt_misc
if [ -r /usr/lib/binfmt.d/qemu-aarch64.conf ] && [ "$(uname -m)" != aarch64 ]; then
  mountpoint -q "$binfmt" || mount -t binfmt_misc binfmt_misc "$binfmt" 2>/dev/null || true
  if [ -w "$binfmt/register" ] && [ ! -e "$binfmt/qemu-aarch64" ]; then
    grep -v '^#' /usr/lib/binfmt.d/qemu-aarch64.conf > "$binfmt/register" || true
  fi
fi
python3 -m venv "$root/.venv"
"$root/.venv/bin/python" -m pip install -q --upgrade pip >/dev/null
"$root/.venv/bin/python" -m pip install -q -e "$root[test]"
ln -sf "$root/.venv/bin/lab" /usr/local/bin/lab
echo "lab installed: $(command -v lab) ($("$root/.venv/bin/lab" --version 2>/dev/null || echo ok))"
