"""A throwaway certificate authority for loopback meshes.

Issues what Istio's CA (istiod) would in a cluster: workload certificates
whose only identity is a SPIFFE URI SAN (`spiffe://<trust domain>/ns/<ns>/sa/<sa>`),
plus ordinary DNS-named server certificates for the "external" hosts
(api.kadath.io, ...) that the local upstreams pretend to be. Keys are EC P-256:
generating them costs about a millisecond, so a test session can make all it
needs at start.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# Valid from a little in the past, so clock skew between processes never
# makes a fresh certificate "not yet valid".
_BACKDATE = datetime.timedelta(hours=1)
_LIFETIME = datetime.timedelta(days=2)


@dataclass(frozen=True)
class Credential:
    """A certificate and its key, as PEM files on disk (Envoy wants paths)."""

    name: str
    cert_path: Path
    key_path: Path
    uri: str | None = None  # the SPIFFE id of a workload certificate

    @property
    def cert_pem(self) -> bytes:
        return self.cert_path.read_bytes()


def spiffe_id(namespace: str, service_account: str, trust_domain: str = "cluster.local") -> str:
    return f"spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}"


class TestCA:
    """A root CA writing every credential it issues under `directory`."""

    __test__ = False  # not a pytest test class, despite the name

    def __init__(self, directory: Path, trust_domain: str = "cluster.local") -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.trust_domain = trust_domain
        self._key = ec.generate_private_key(ec.SECP256R1())
        self._name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "egress-authz test"),
                x509.NameAttribute(NameOID.COMMON_NAME, "egress-authz test root CA"),
            ]
        )
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(self._name)
            .issuer_name(self._name)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _BACKDATE)
            .not_valid_after(now + _LIFETIME)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    key_cert_sign=True,
                    crl_sign=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(self._key.public_key()), critical=False
            )
            .sign(self._key, hashes.SHA256())
        )
        self._cert = cert
        self.ca_path = self.directory / "ca.pem"
        self.ca_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))

    # ------------------------------------------------------------------ issue

    def workload(self, namespace: str, service_account: str) -> Credential:
        """A mesh identity, as istiod issues it: URI SAN only, client and server use."""
        uri = spiffe_id(namespace, service_account, self.trust_domain)
        return self._issue(
            f"{namespace}.{service_account}",
            [x509.UniformResourceIdentifier(uri)],
            uri=uri,
        )

    def server(self, *dns_names: str) -> Credential:
        """A public-looking server certificate for the names given (DNS or IP SANs)."""
        if not dns_names:
            raise ValueError("a server certificate needs at least one name")
        sans: list[x509.GeneralName] = []
        for name in dns_names:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(name)))
            except ValueError:
                sans.append(x509.DNSName(name))
        return self._issue(dns_names[0], sans, common_name=dns_names[0])

    def _issue(
        self,
        name: str,
        sans: list[x509.GeneralName],
        *,
        uri: str | None = None,
        common_name: str | None = None,
    ) -> Credential:
        key = ec.generate_private_key(ec.SECP256R1())
        # SPIFFE X.509-SVIDs carry an empty subject; a CN would only invite
        # code to match on it instead of on the URI SAN.
        subject = x509.Name(
            [x509.NameAttribute(NameOID.COMMON_NAME, common_name)] if common_name else []
        )
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self._name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _BACKDATE)
            .not_valid_after(now + _LIFETIME)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            # Subject empty => the SAN extension must be critical (RFC 5280 4.2.1.6).
            .add_extension(x509.SubjectAlternativeName(sans), critical=common_name is None)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                critical=False,
            )
            .sign(self._key, hashes.SHA256())
        )
        safe = name.replace("*", "_wildcard").replace("/", "_")
        cert_path = self.directory / f"{safe}.crt.pem"
        key_path = self.directory / f"{safe}.key.pem"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        key_path.chmod(0o600)
        return Credential(name=name, cert_path=cert_path, key_path=key_path, uri=uri)
