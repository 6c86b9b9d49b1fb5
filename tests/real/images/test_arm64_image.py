"""The arm64 Lab OS image, built on this amd64 machine through qemu-user-static (a foreign
debootstrap), and its programs run the same way: what an arm64 host (a Raspberry Pi, an ARM CI
runner) would boot with nspawn, tested as far as this machine can. Its VM box boots in
tests/real/vm/test_libvirt.py. The image is the VM flavor's (the box's): the nspawn flavor is the same
packages without the kernel and systemd-boot, built the same way (`lab box build --arch arm64`)."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from lab.errors import PrerequisiteError
from lab.images.build import build_image, check_foreign_arch

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("debootstrap") is None,
                                reason="building a node image needs root and debootstrap")


@pytest.fixture(scope="module")
def image():
    try:
        check_foreign_arch("arm64")
    except PrerequisiteError as exc:
        pytest.skip(exc.message)
    return build_image("labos", "1", flavor="vm", arch="arm64")


def in_image(image, *command: str) -> str:
    result = subprocess.run(["chroot", str(image.rootfs), *command], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout + result.stderr


def elf_machine(path) -> int:
    header = path.read_bytes()[:20]
    assert header[:4] == b"\x7fELF"
    return int.from_bytes(header[18:20], "little")


def test_the_image_is_arm64_and_says_so(image):
    assert image.arch == "arm64" and image.path.name.startswith("labos-1-vm-arm64-")
    for program in ("usr/bin/etcd", "usr/bin/python3.11", "usr/sbin/dockerd", "usr/lib/systemd/systemd"):
        assert elf_machine(image.rootfs / program) == 0xB7, program  # EM_AARCH64
    assert (image.rootfs / "usr/lib/systemd/boot/efi/systemd-bootaa64.efi").is_file()
    assert list((image.rootfs / "boot").glob("vmlinuz-*-arm64"))


def test_its_programs_run_under_qemu_user_static(image):
    assert in_image(image, "/usr/bin/python3", "-c", "import platform; print(platform.machine())").strip() == "aarch64"
    assert "etcd Version: 3.4" in in_image(image, "/usr/bin/etcd", "--version")
    assert "Docker version 20.10" in in_image(image, "/usr/sbin/dockerd", "--version")
    assert "systemd 252" in in_image(image, "/usr/lib/systemd/systemd", "--version")
    # (nft is not among them: it opens a netlink socket even for --version, which qemu-user lacks)


def test_etcd_serves_on_arm64(image):
    """Debian's etcd 3.4 on arm64 warns ("unsupported platform without ETCD_UNSUPPORTED_ARCH") where
    upstream's exits, and serves: here under emulation, answering /health."""
    import time
    import urllib.request

    data = image.rootfs / "tmp" / f"etcd-test-{os.getpid()}"
    argv = ["chroot", str(image.rootfs), "/usr/bin/etcd", "--data-dir", f"/tmp/{data.name}",
            "--listen-client-urls", "http://127.0.0.1:23791", "--advertise-client-urls", "http://127.0.0.1:23791",
            "--listen-peer-urls", "http://127.0.0.1:23792"]
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen("http://127.0.0.1:23791/health", timeout=2) as answer:
                    assert b'"health":"true"' in answer.read()
                    break
            except OSError:
                assert process.poll() is None, process.stdout.read()
                time.sleep(1)
        else:
            raise AssertionError("etcd on arm64 did not answer /health in 120 s")
    finally:
        process.terminate()
        process.wait(timeout=30)
        shutil.rmtree(data, ignore_errors=True)
