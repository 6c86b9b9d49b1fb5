"""A per-lab certificate authority for etcd TLS, made with `cryptography`.

One CA per lab; per node a certificate used both as etcd server and peer
(SANs: node name, node IP, localhost); one client certificate for lab's own
tools. Everything lives in `<lab_dir>/pki/`, private keys 0600, and is made
once: a second `lab up` reuses it. No private key is ever printed or logged.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from lab.host.files import write_atomic

VALIDITY = datetime.timedelta(days=3650)


@dataclass(frozen=True)
class CertPair:
    cert: Path
    key: Path


@dataclass(frozen=True)
class LabPki:
    directory: Path

    @property
    def ca(self) -> Path:
        return self.directory / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.directory / "ca.key"

    def node(self, name: str) -> CertPair:
        return CertPair(self.directory / f"{name}.crt", self.directory / f"{name}.key")

    @property
    def client(self) -> CertPair:
        return CertPair(self.directory / "client.crt", self.directory / "client.key")

    def ensure(self, lab_name: str, nodes: dict[str, str]) -> None:
        """Create the CA, the client certificate and any missing node certificate."""
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization

        if not self.ca.exists():
            key = _new_key()
            cert = _build(subject=f"lab {lab_name} CA", issuer=None, issuer_key=key, public_key=key.public_key(),
                          is_ca=True)
            _write(self.ca_key, key, self.ca, cert)
        ca_cert = x509.load_pem_x509_certificate(self.ca.read_bytes())
        ca_key = serialization.load_pem_private_key(self.ca_key.read_bytes(), password=None)
        if not self.client.cert.exists():
            key = _new_key()
            cert = _build(subject="lab-client", issuer=ca_cert, issuer_key=ca_key, public_key=key.public_key(),
                          client=True)
            _write(self.client.key, key, self.client.cert, cert)
        for name, ip in nodes.items():
            pair = self.node(name)
            if self._has_ip(pair, ip):
                continue
            key = _new_key()
            cert = _build(subject=name, issuer=ca_cert, issuer_key=ca_key, public_key=key.public_key(),
                          server=True, client=True, dns=[name, "localhost"],
                          ips=[ipaddress.ip_address(ip), ipaddress.ip_address("127.0.0.1")])
            _write(pair.key, key, pair.cert, cert)

    @staticmethod
    def _has_ip(pair: CertPair, ip: str) -> bool:
        from cryptography import x509

        if not pair.cert.exists():
            return False
        cert = x509.load_pem_x509_certificate(pair.cert.read_bytes())
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        return ipaddress.ip_address(ip) in names.get_values_for_type(x509.IPAddress)


def _new_key():
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def _build(subject: str, issuer, issuer_key, public_key, *, is_ca: bool = False, server: bool = False,
           client: bool = False, dns: list[str] | None = None, ips: list | None = None):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder()
               .subject_name(name)
               .issuer_name(issuer.subject if issuer is not None else name)
               .public_key(public_key)
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + VALIDITY)
               .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True))
    if is_ca:
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
            key_encipherment=False, data_encipherment=False, key_agreement=False, encipher_only=False,
            decipher_only=False), critical=True)
    else:
        usages = ([ExtendedKeyUsageOID.SERVER_AUTH] if server else []) + \
                 ([ExtendedKeyUsageOID.CLIENT_AUTH] if client else [])
        builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=True, key_encipherment=True, key_cert_sign=False, crl_sign=False,
            content_commitment=False, data_encipherment=False, key_agreement=True, encipher_only=False,
            decipher_only=False), critical=True)
    sans = [x509.DNSName(d) for d in dns or []] + [x509.IPAddress(i) for i in ips or []]
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write(key_path: Path, key, cert_path: Path, cert) -> None:
    from cryptography.hazmat.primitives import serialization

    key_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode()
    write_atomic(key_path, key_pem, mode=0o600)
    write_atomic(cert_path, cert.public_bytes(serialization.Encoding.PEM).decode(), mode=0o644)
