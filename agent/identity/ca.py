"""A built-in certificate authority for standalone use: one self-signed root per trust domain,
kept on disk so a restarted agent keeps trust, issuing short-lived SPIFFE workload certificates
shaped like Istio's."""

from __future__ import annotations

import os
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent.identity.spiffe import SCHEME, SpiffeId, check_trust_domain

CA_KEY_FILE = "ca-key.pem"
CA_CERT_FILE = "ca-cert.pem"
ROOT_VALIDITY = timedelta(days=3650)
ROOT_ORGANIZATION = "ambient-agent"
# Peers' clocks drift; a certificate that starts "now" is refused by one running a bit behind.
CLOCK_SKEW = timedelta(minutes=1)


class CaError(Exception):
    """The CA cannot be loaded, or refuses a request."""


def _private_key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _is_p256(key: object) -> bool:
    return isinstance(key, ec.EllipticCurvePublicKey | ec.EllipticCurvePrivateKey) and isinstance(
        key.curve, ec.SECP256R1
    )


def _uri_sans(cert: x509.Certificate | x509.CertificateSigningRequest) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return san.get_values_for_type(x509.UniformResourceIdentifier)


def _write_private(path: Path, data: bytes, mode: int) -> None:
    """Write through a temporary name and rename, so a crash never leaves a torn file, and
    create with the final mode so the key is never readable by others, not even briefly."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())
    tmp.replace(path)


class CertificateAuthority:
    def __init__(
        self, trust_domain: str, key: ec.EllipticCurvePrivateKey, root: x509.Certificate
    ) -> None:
        self.trust_domain = trust_domain
        self._key = key
        self.root = root
        self._root_ski = root.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value

    @property
    def root_pem(self) -> bytes:
        return self.root.public_bytes(serialization.Encoding.PEM)

    @classmethod
    def create(cls, trust_domain: str, now: datetime | None = None) -> CertificateAuthority:
        """A new CA held only in memory."""
        try:
            check_trust_domain(trust_domain)
        except ValueError as exc:
            raise CaError(str(exc)) from None
        now = now or datetime.now(UTC)
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, ROOT_ORGANIZATION),
                x509.NameAttribute(NameOID.COMMON_NAME, f"ambient-agent root CA {trust_domain}"),
            ]
        )
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        root = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(now + ROOT_VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(ski, critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski),
                critical=False,
            )
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.UniformResourceIdentifier(f"{SCHEME}{trust_domain}")]
                ),
                critical=False,
            )
            .sign(key, hashes.SHA256())
        )
        return cls(trust_domain, key, root)

    @classmethod
    def load_or_create(cls, directory: Path, trust_domain: str) -> CertificateAuthority:
        """Load the CA kept in `directory`, or create one there if the directory holds none."""
        key_path, cert_path = directory / CA_KEY_FILE, directory / CA_CERT_FILE
        key_exists, cert_exists = key_path.exists(), cert_path.exists()
        if key_exists and cert_exists:
            return cls._load(key_path, cert_path, trust_domain)
        if key_exists or cert_exists:
            # Overwriting half a CA could throw away the key every workload trusts.
            present, missing = (key_path, cert_path) if key_exists else (cert_path, key_path)
            raise CaError(
                f"{directory} holds {present.name} but not {missing.name}; restore the missing "
                "file, or remove both to create a new CA"
            )
        ca = cls.create(trust_domain)
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        _write_private(key_path, _private_key_pem(ca._key), 0o600)
        _write_private(cert_path, ca.root_pem, 0o644)
        return ca

    @classmethod
    def _load(cls, key_path: Path, cert_path: Path, trust_domain: str) -> CertificateAuthority:
        mode = stat.S_IMODE(key_path.stat().st_mode)
        if mode & 0o077:
            raise CaError(f"{key_path} is readable by others (mode {mode:04o}); it must be 0600")
        try:
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        except (ValueError, TypeError) as exc:
            raise CaError(f"{key_path} is not an unencrypted PEM private key: {exc}") from None
        try:
            root = x509.load_pem_x509_certificate(cert_path.read_bytes())
        except ValueError as exc:
            raise CaError(f"{cert_path} is not a PEM certificate: {exc}") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey) or not _is_p256(key):
            raise CaError(f"{key_path} is not an ECDSA P-256 key")
        if root.public_key() != key.public_key():
            raise CaError(f"{cert_path} does not belong to the key in {key_path}")
        try:
            is_ca = root.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
            root.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
        except x509.ExtensionNotFound as exc:
            raise CaError(f"{cert_path} is not a CA certificate of ours: {exc}") from None
        if not is_ca:
            raise CaError(f"{cert_path} is not a CA certificate (CA:FALSE)")
        try:
            root.verify_directly_issued_by(root)
        except (ValueError, TypeError, InvalidSignature):
            raise CaError(f"{cert_path} is not a self-signed root") from None
        sans = _uri_sans(root)
        if sans != [f"{SCHEME}{trust_domain}"]:
            raise CaError(
                f"the CA in {cert_path.parent} is for {', '.join(sans) or 'no trust domain'}, "
                f"not for trust domain {trust_domain!r}"
            )
        if root.not_valid_after_utc <= datetime.now(UTC):
            # Certificates it issued would not verify anywhere: better a clear refusal here.
            raise CaError(f"the CA in {cert_path} expired on {root.not_valid_after_utc}")
        return cls(trust_domain, key, root)

    def issue(
        self,
        spiffe_id: SpiffeId,
        public_key: ec.EllipticCurvePublicKey,
        ttl: timedelta,
        now: datetime | None = None,
    ) -> x509.Certificate:
        """A workload certificate for `spiffe_id`, shaped as istiod issues them."""
        if spiffe_id.trust_domain != self.trust_domain:
            raise CaError(
                f"{spiffe_id.uri} is outside trust domain {self.trust_domain!r} of this CA"
            )
        if not _is_p256(public_key):
            raise CaError("workload keys must be ECDSA P-256")
        if ttl <= timedelta(0):
            raise CaError(f"certificate lifetime must be positive, not {ttl}")
        now = now or datetime.now(UTC)
        # A leaf outliving its root would fail verification in its last stretch anyway.
        not_after = min(now + ttl, self.root.not_valid_after_utc)
        return (
            x509.CertificateBuilder()
            # Empty subject, as Istio does; RFC 5280 then requires the SAN to be critical.
            .subject_name(x509.Name([]))
            .issuer_name(self.root.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(not_after)
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id.uri)]),
                critical=True,
            )
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=True,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(self._root_ski),
                critical=False,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .sign(self._key, hashes.SHA256())
        )

    def sign_csr(
        self,
        csr_pem: bytes,
        expected: SpiffeId,
        ttl: timedelta,
        now: datetime | None = None,
    ) -> list[x509.Certificate]:
        """Leaf then root, for a CSR that proves its key and asks for exactly `expected`."""
        try:
            csr = x509.load_pem_x509_csr(csr_pem)
        except ValueError as exc:
            raise CaError(f"not a PEM certificate signing request: {exc}") from None
        if not csr.is_signature_valid:
            raise CaError("the CSR's signature does not verify")
        requested = _uri_sans(csr)
        if requested != [expected.uri]:
            raise CaError(
                f"the CSR asks for {', '.join(requested) or 'no URI SAN'}, "
                f"not exactly {expected.uri}"
            )
        public_key = csr.public_key()
        if not isinstance(public_key, ec.EllipticCurvePublicKey):
            raise CaError("workload keys must be ECDSA P-256")
        return [self.issue(expected, public_key, ttl, now), self.root]
