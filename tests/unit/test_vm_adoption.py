"""What Vagrant leaves to lab's adoption, on fixed inputs: the private NIC's MAC in the Vagrantfile and
in the adoption script, the script itself (syntax, keys, network file) and the keys it removes.
The script run for real on a VM: tests/real/vm/test_libvirt.py.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from lab.providers.vagrant.adoption import (PRIVATE_NETWORK_FILE, PrivateAddress, adoption_failure, adoption_script,
                                            colon_mac, machine_key_path, network_file, private_addresses,
                                            public_key_data)
from lab.providers.vagrant.render import VAGRANT_PROVIDERS, private_mac, render_vagrantfile
from lab.testing import contexts

REPO = Path(__file__).resolve().parents[2]
SPEC = {"name": "adopt", "nodes": {"count": 3}, "providers": {"libvirt": {"driver": "qemu"}}}
PRIVATE = PrivateAddress(mac="0a:fb:02:88:00:01", address="10.77.9.11", prefixlen=24)
LAB_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAILabKeyData lab-adopt"


def make_context(tmp_path: Path, lab_id: str = "5eed01"):
    return contexts.make_context(tmp_path, SPEC, lab_id=lab_id, subnet="10.77.9.0/24")


def rendered_networks(text: str) -> dict[str, str]:
    """Node name -> its private_network line(s), joined."""
    found = {}
    for match in re.finditer(r'config\.vm\.define "([^"]+)" do \|node\|\n(.*?)^  end\n', text, re.M | re.S):
        found[match.group(1)] = " ".join(line.strip() for line in match.group(2).split("node.vm.network")[1]
                                         .splitlines())
    return found


# ---------------------------------------------------------------- the NIC Vagrant makes, the MAC lab finds

@pytest.mark.parametrize("provider", VAGRANT_PROVIDERS)
def test_every_private_network_has_lab_s_mac_and_no_guest_configuration(provider: str, tmp_path: Path) -> None:
    context = make_context(tmp_path)
    networks = rendered_networks(render_vagrantfile(context, provider))
    expected = private_addresses(context, provider)
    assert list(networks) == ["node-1", "node-2", "node-3"]
    for node, line in networks.items():
        assert line.startswith('"private_network"') and "auto_config: false" in line, line
        [mac] = re.findall(r'mac: "([0-9A-F]{12})"', line)
        # adoption looks for the very NIC the Vagrantfile makes
        assert colon_mac(mac) == expected[node].mac
        assert f'ip: "{expected[node].address}"' in line
    assert len({p.mac for p in expected.values()}) == 3


@pytest.mark.parametrize("provider", VAGRANT_PROVIDERS)
def test_private_macs_are_unicast_and_what_the_hypervisor_accepts(provider: str) -> None:
    macs = [bytes.fromhex(private_mac(provider, lab_id, index))
            for lab_id in ("5eed01", "c0ffee", "000000") for index in (1, 2, 64)]
    assert len(set(macs)) == len(macs)  # per node and per lab
    for mac in macs:
        assert len(mac) == 6 and not mac[0] & 0x01  # unicast
        if provider == "vmware_desktop":  # VMware's range for static addresses
            assert mac[:3] == b"\x00\x50\x56" and mac[3] <= 0x3F
        else:
            assert mac[0] & 0x02  # locally administered: no vendor's address
    assert private_mac(provider, "5eed01", 2) == private_mac(provider, "5eed01", 2)  # stable across renders


def test_colon_mac_is_the_kernel_s_form() -> None:
    assert colon_mac("0AFB02880001") == "0a:fb:02:88:00:01"
    assert colon_mac("0a:fb:02:88:00:01") == "0a:fb:02:88:00:01"


# ---------------------------------------------------------------- the adoption script

def test_network_file_matches_the_mac_and_sets_the_address() -> None:
    text = network_file(PRIVATE)
    assert "[Match]\nMACAddress=0a:fb:02:88:00:01\n" in text
    assert "[Network]\nAddress=10.77.9.11/24\n" in text
    assert "DHCP" not in text
    # sorts before the box's 90-lab-dhcp.network (every NIC by DHCP) and Vagrant's 50-vagrant-*
    assert Path(PRIVATE_NETWORK_FILE).name < "50-vagrant-eth1.network" < "90-lab-dhcp.network"


@pytest.mark.skipif(shutil.which("dash") is None, reason="dash not installed")
@pytest.mark.parametrize("docker", [True, False])
def test_adoption_script_is_valid_posix_shell(docker: bool) -> None:
    script = adoption_script(LAB_KEY, "node-1", docker=docker, private=PRIVATE, vagrant_user="vagrant",
                             replaced_keys=("AAAAB3NzaC1yc2EInsecure",))
    result = subprocess.run(["dash", "-n"], input=script, capture_output=True, text=True, timeout=10)
    assert result.returncode == 0, result.stderr


def test_adoption_script_swaps_vagrant_s_key_for_the_lab_s() -> None:
    script = adoption_script(LAB_KEY, "node-1", private=PRIVATE, vagrant_user="vagrant",
                             replaced_keys=("AAAAB3NzaC1yc2EInsecure", "AAAAC3NzaC1lZDI1NTE5Insecure"))
    # root: the lab's key added once
    assert "grep -qF AAAAC3NzaC1lZDI1NTE5AAAAILabKeyData /root/.ssh/authorized_keys ||" in script
    # Vagrant's user: the replaced keys (and an older copy of the lab's) dropped, the lab's key added,
    # the file swapped whole
    assert ("grep -vF -e AAAAB3NzaC1yc2EInsecure -e AAAAC3NzaC1lZDI1NTE5Insecure "
            "-e AAAAC3NzaC1lZDI1NTE5AAAAILabKeyData \"$keys\"") in script
    assert 'mv -f "$keys.lab-new" "$keys"' in script
    assert "getent passwd vagrant" in script


def test_adoption_script_quotes_what_it_is_given() -> None:
    script = adoption_script(LAB_KEY, "node-1", private=PRIVATE, vagrant_user="va grant;x")
    assert "getent passwd 'va grant;x'" in script


def test_adoption_script_configures_the_private_nic_by_mac() -> None:
    script = adoption_script(LAB_KEY, "node-1", private=PRIVATE)
    assert '= 0a:fb:02:88:00:01 ]; then iface=' in script
    assert f"cat > {PRIVATE_NETWORK_FILE}.lab-new <<'LAB_EOF'\n{network_file(PRIVATE)}LAB_EOF\n" in script
    assert 'networkctl reconfigure "$iface"' in script
    # only when the file changed or the address is missing: a re-adoption never blinks the network
    assert 'if [ "$changed" = 1 ] || ! has_address; then' in script
    assert script.rstrip().endswith('echo "lab-host-key $(cat /etc/ssh/ssh_host_ed25519_key.pub)"')


# ---------------------------------------------------------------- keys

def test_public_key_data_of_openssh_and_pem_keys(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

    def openssh_public(key) -> str:
        return key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                             serialization.PublicFormat.OpenSSH).decode().split()[1]

    ed = ed25519.Ed25519PrivateKey.generate()
    (tmp_path / "ed").write_bytes(ed.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                                   serialization.NoEncryption()))
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    (tmp_path / "rsa").write_bytes(rsa_key.private_bytes(serialization.Encoding.PEM,
                                                         serialization.PrivateFormat.TraditionalOpenSSL,
                                                         serialization.NoEncryption()))
    (tmp_path / "junk").write_text("not a key")
    assert public_key_data(tmp_path / "ed") == openssh_public(ed)
    assert public_key_data(tmp_path / "rsa") == openssh_public(rsa_key)
    assert public_key_data(tmp_path / "junk") is None
    assert public_key_data(tmp_path / "absent") is None


def test_vagrant_s_insecure_key_is_the_one_the_boxes_authorize() -> None:
    """Vagrant's own insecure private key (where Vagrant is installed) yields the key Lab OS boxes ship."""
    candidates = sorted(Path("/usr/share/rubygems-integration/all/gems").glob("vagrant-*/keys/vagrant")) + \
        sorted(Path("/opt/vagrant/embedded/gems").glob("gems/vagrant-*/keys/vagrant"))
    if not candidates:
        pytest.skip("Vagrant's insecure key is not installed here")
    shipped = (REPO / "boxes/labos/vm/rootfs/home/vagrant/.ssh/authorized_keys").read_text().split()[1]
    assert public_key_data(candidates[0]) == shipped


def test_machine_key_path_is_where_vagrant_looks(tmp_path: Path) -> None:
    assert machine_key_path(tmp_path, "node-2", "libvirt") == tmp_path / ".vagrant/machines/node-2/libvirt/private_key"


def test_a_failed_adoption_says_what_went_wrong_and_what_to_do() -> None:
    missing = "lab-error: no network interface has MAC 0a:fb:02:88:00:01 (the lab's private network)\n"
    error = adoption_failure("node-1", 3, missing, "virtualbox")
    assert error.where == "node-1" and error.exit_status == 3
    assert "no network interface has MAC" in error.message and "set -e" not in error.message  # not the whole script
    assert "lab render" in error.hint
    assert "Hyper-V provider makes no private network" in adoption_failure("node-1", 3, missing, "hyperv").hint
    assert "password-less sudo" in adoption_failure("node-1", 1, "sudo: a password is required\n", "libvirt").hint
    slow = adoption_failure("node-1", 4, "lab-error: eth1 did not get 10.77.9.11 from systemd-networkd in 20 s\n",
                            "libvirt")
    assert "systemd-networkd" in slow.hint
