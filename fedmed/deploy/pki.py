"""The federation's certificates and keys, made with `cryptography`.

- A CA (EC P-384) that signs the server's TLS certificate; sites trust only this CA.
- The server certificate carries a SAN for every address sites use to reach it.
- Site node-authentication keys are EC P-384 in OpenSSH format, as Flower's SuperNode and
  `flwr supernode register` expect; the private key is written with 0600 permissions and, when a
  site generates its own, never leaves the site.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedmed.core.errors import FedmedError

CURVE = ec.SECP384R1()
CA_DAYS = 3650
SERVER_DAYS = 825


class CertificateError(FedmedError):
    """A certificate or key is missing, unreadable, expired or does not match."""


def write_private_key(path: Path, key: ec.EllipticCurvePrivateKey, *, openssh: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    encoding = serialization.PrivateFormat.OpenSSH if openssh else serialization.PrivateFormat.PKCS8
    data = key.private_bytes(serialization.Encoding.PEM, encoding, serialization.NoEncryption())
    # Create with 0600 from the start: a private key must never exist world-readable, even briefly.
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(data)


def write_certificate(path: Path, certificate: x509.Certificate) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))


def create_ca(*, common_name: str, days: int = CA_DAYS) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(CURVE)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
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
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    return key, certificate


def create_server_certificate(
    *,
    ca_key: ec.EllipticCurvePrivateKey,
    ca_certificate: x509.Certificate,
    addresses: list[str],
    days: int = SERVER_DAYS,
    valid_from: datetime.datetime | None = None,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A TLS server certificate whose SANs are `addresses` (IP addresses or DNS names)."""
    if not addresses:
        raise CertificateError("the server certificate needs at least one address; pass --address HOST")
    key = ec.generate_private_key(CURVE)
    start = valid_from or datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=5)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, addresses[0])]))
        .issuer_name(ca_certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([_general_name(a) for a in addresses]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_certificate.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    return key, certificate


def _general_name(address: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(address))
    except ValueError:
        return x509.DNSName(address)


def create_node_key_pair(private_path: Path, public_path: Path) -> str:
    """Write a site's node-authentication key pair; returns the public key line."""
    key = ec.generate_private_key(CURVE)
    write_private_key(private_path, key, openssh=True)
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    public_path.parent.mkdir(parents=True, exist_ok=True)
    public_path.write_bytes(public + b"\n")
    return public.decode()


def load_certificate(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(Path(path).read_bytes())
    except FileNotFoundError:
        raise CertificateError(f"{path}: certificate file not found; check the path in the config") from None
    except ValueError as error:
        raise CertificateError(f"{path}: not a PEM certificate ({error}); copy the file again from the kit") from None


def check_certificate_validity(path: Path, *, now: datetime.datetime | None = None) -> x509.Certificate:
    """Load a certificate and refuse it if it is not valid now."""
    certificate = load_certificate(path)
    moment = now or datetime.datetime.now(datetime.UTC)
    if moment < certificate.not_valid_before_utc:
        raise CertificateError(
            f"{path}: certificate is not valid before {certificate.not_valid_before_utc:%Y-%m-%d %H:%M} UTC; "
            f"check this machine's clock"
        )
    if moment > certificate.not_valid_after_utc:
        raise CertificateError(
            f"{path}: certificate expired on {certificate.not_valid_after_utc:%Y-%m-%d}; the coordinator must "
            f"issue a new one with 'fedmed provision --renew-server-certificate'"
        )
    return certificate


def check_node_private_key(path: Path) -> str:
    """The OpenSSH public key line of a site's private key; refuses unreadable or wrong-type keys."""
    try:
        key = serialization.load_ssh_private_key(Path(path).read_bytes(), password=None)
    except FileNotFoundError:
        raise CertificateError(
            f"{path}: site private key not found; run 'fedmed site keygen' or check the path"
        ) from None
    except (ValueError, TypeError) as error:
        raise CertificateError(f"{path}: not an unencrypted OpenSSH private key ({error})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertificateError(f"{path}: node keys must be EC (P-384); generate one with 'fedmed site keygen'")
    mode = Path(path).stat().st_mode & 0o077
    if mode:
        raise CertificateError(f"{path}: private key is readable by other users; run 'chmod 600 {path}'")
    return key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()


def load_public_key_line(path: Path) -> str:
    """A site's OpenSSH public key, validated as EC P-384 / NIST."""
    try:
        text = Path(path).read_text(encoding="utf-8").strip()
        key = serialization.load_ssh_public_key(text.encode())
    except FileNotFoundError:
        raise CertificateError(f"{path}: public key file not found") from None
    except (ValueError, UnicodeDecodeError) as error:
        raise CertificateError(
            f"{path}: not an OpenSSH public key ({error}); send the .pub file from the site"
        ) from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise CertificateError(f"{path}: node keys must be EC (P-384); the site should run 'fedmed site keygen'")
    return text
