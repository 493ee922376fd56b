"""Sites' TLS client certificates: what the coordinator's proxy checks on every connection.

A site proves it belongs to the federation twice: its TLS client certificate (signed by the federation
CA, and enrolled, i.e. listed by fingerprint in the proxy's allow-list) gets it through the public port,
and its node key (Flower's node authentication) identifies its SuperNode to the SuperLink behind it.

The certificate is issued either at provisioning (key made into the kit) or from a certificate signing
request the site makes itself (`fedmed site keygen`), so that its private key never leaves the site.
"""

from __future__ import annotations

import datetime
import hashlib
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from . import pki

CLIENT_DAYS = 825


def client_key_path(key_dir: Path, site: str) -> Path:
    return Path(key_dir) / f"{site}-tls.key"


def client_certificate_path(key_dir: Path, site: str) -> Path:
    return Path(key_dir) / f"{site}.crt"


def csr_path(key_dir: Path, site: str) -> Path:
    return Path(key_dir) / f"{site}.csr"


def create_client_certificate(
    *,
    ca_key: ec.EllipticCurvePrivateKey,
    ca_certificate: x509.Certificate,
    site: str,
    public_key: ec.EllipticCurvePublicKey,
    days: int = CLIENT_DAYS,
) -> x509.Certificate:
    """A TLS client certificate (EKU clientAuth) whose common name is the site's name."""
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, site)]))
        .issuer_name(ca_certificate.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_certificate.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )


def issue_client_certificate(*, ca_key_path: Path, ca_certificate_path: Path, key_dir: Path, site: str) -> Path:
    """Make a site's TLS key (0600) and certificate into its kit; returns the certificate's path."""
    key = ec.generate_private_key(pki.CURVE)
    pki.write_private_key(client_key_path(key_dir, site), key)
    certificate = create_client_certificate(
        ca_key=load_ca_key(ca_key_path),
        ca_certificate=pki.load_certificate(ca_certificate_path),
        site=site,
        public_key=key.public_key(),
    )
    path = client_certificate_path(key_dir, site)
    pki.write_certificate(path, certificate)
    return path


def create_request(key_dir: Path, site: str) -> Path:
    """At the site: a TLS key (0600, stays here) and a certificate signing request to send; returns the request."""
    key = ec.generate_private_key(pki.CURVE)
    pki.write_private_key(client_key_path(key_dir, site), key)
    request = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, site)]))
        .sign(key, hashes.SHA384())
    )
    path = csr_path(key_dir, site)
    path.write_bytes(request.public_bytes(serialization.Encoding.PEM))
    return path


def sign_request(*, request_path: Path, site: str, ca_key_path: Path, ca_certificate_path: Path) -> x509.Certificate:
    """At the coordinator: check a site's request (well formed, self-consistent, names that site) and sign it."""
    try:
        request = x509.load_pem_x509_csr(Path(request_path).read_bytes())
    except FileNotFoundError:
        raise pki.CertificateError(f"{request_path}: certificate request not found; check the path") from None
    except ValueError as error:
        raise pki.CertificateError(
            f"{request_path}: not a PEM certificate request ({error}); send the .csr file 'fedmed site keygen' wrote"
        ) from None
    if not request.is_signature_valid:
        raise pki.CertificateError(f"{request_path}: the request's signature is invalid; ask the site for a new one")
    names = [attribute.value for attribute in request.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    if names != [site]:
        raise pki.CertificateError(
            f"{request_path}: the request is for {names or 'no name'}, not site '{site}'; check you have the right file"
        )
    public_key = request.public_key()
    if not isinstance(public_key, ec.EllipticCurvePublicKey):
        raise pki.CertificateError(f"{request_path}: the key must be EC; the site should run 'fedmed site keygen'")
    return create_client_certificate(
        ca_key=load_ca_key(ca_key_path),
        ca_certificate=pki.load_certificate(ca_certificate_path),
        site=site,
        public_key=public_key,
    )


def load_ca_key(path: Path) -> ec.EllipticCurvePrivateKey:
    key = _load_private_key(
        path,
        missing="the federation CA key is not here; signing a site's certificate needs it. Bring it from where it "
        "is kept offline, or set 'ca_key' in server.toml to its path",
    )
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise pki.CertificateError(f"{path}: not an EC key; use the ca.key 'fedmed provision' made")
    return key


def _load_private_key(path: Path, *, missing: str) -> PrivateKeyTypes:
    try:
        return serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except FileNotFoundError:
        raise pki.CertificateError(f"{path}: {missing}") from None
    except (ValueError, TypeError) as error:  # TypeError: an encrypted key
        raise pki.CertificateError(f"{path}: not an unencrypted PEM private key ({error})") from None


def fingerprint(certificate: x509.Certificate) -> str:
    """SHA-1 of the DER certificate in lowercase hex: the form of nginx's $ssl_client_fingerprint."""
    return hashlib.sha1(certificate.public_bytes(serialization.Encoding.DER), usedforsecurity=False).hexdigest()


def check_client_certificate(*, certificate_path: Path, key_path: Path, ca_certificate_path: Path) -> x509.Certificate:
    """A site's client certificate is usable: signed by the kit's CA, valid now, for TLS clients, with its key."""
    certificate = pki.check_certificate_validity(certificate_path)
    check_issued_by(certificate, certificate_path=certificate_path, ca_certificate_path=ca_certificate_path)
    key = _load_private_key(
        key_path,
        missing="the client certificate's private key is not here; it was made next to the certificate request "
        "by 'fedmed site keygen' (or is in the kit); set 'client_key' in site.toml to it",
    )
    if key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) != certificate.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ):
        raise pki.CertificateError(
            f"{key_path} does not belong to {certificate_path}; use the certificate the coordinator signed for "
            f"this key's request"
        )
    if Path(key_path).stat().st_mode & 0o077:
        raise pki.CertificateError(f"{key_path}: private key is readable by other users; run 'chmod 600 {key_path}'")
    return certificate


def check_issued_by(certificate: x509.Certificate, *, certificate_path: Path, ca_certificate_path: Path) -> None:
    ca = pki.load_certificate(ca_certificate_path)
    try:
        certificate.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise pki.CertificateError(
            f"{certificate_path}: not signed by this federation's CA ({ca_certificate_path}); ask the coordinator "
            f"for the certificate issued to this site"
        ) from None
    try:
        usages = list(certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    except x509.ExtensionNotFound:
        usages = []
    if ExtendedKeyUsageOID.CLIENT_AUTH not in usages:
        raise pki.CertificateError(f"{certificate_path}: not a TLS client certificate; ask the coordinator for one")
