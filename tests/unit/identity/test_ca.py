from __future__ import annotations

import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent.identity.ca import CA_CERT_FILE, CA_KEY_FILE, CaError, CertificateAuthority
from agent.identity.spiffe import SpiffeId

TD = "cluster.local"
SLEEP = SpiffeId(TD, "default", "sleep")


def _csr(key: ec.EllipticCurvePrivateKey, uris: list[str]) -> bytes:
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    if uris:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris]),
            critical=True,
        )
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def test_root_shape(tmp_path: Path) -> None:
    ca = CertificateAuthority.load_or_create(tmp_path / "ca", TD)
    root = ca.root
    assert root.subject == root.issuer
    assert root.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == (
        "ambient-agent"
    )
    assert TD in str(root.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)
    assert isinstance(root.public_key(), ec.EllipticCurvePublicKey)
    constraints = root.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca
    usage = root.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.key_cert_sign and usage.value.crl_sign
    assert not usage.value.digital_signature
    san = root.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [f"spiffe://{TD}"]
    lifetime = root.not_valid_after_utc - root.not_valid_before_utc
    assert timedelta(days=3649) < lifetime < timedelta(days=3651)
    root.verify_directly_issued_by(root)


def test_state_survives_restart(tmp_path: Path) -> None:
    directory = tmp_path / "ca"
    first = CertificateAuthority.load_or_create(directory, TD)
    assert stat.S_IMODE((directory / CA_KEY_FILE).stat().st_mode) == 0o600
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    second = CertificateAuthority.load_or_create(directory, TD)
    assert second.root_pem == first.root_pem
    assert (directory / CA_CERT_FILE).read_bytes() == first.root_pem
    key = ec.generate_private_key(ec.SECP256R1())
    # The restarted CA signs with the same key: its leaves verify under the first root.
    second.issue(SLEEP, key.public_key(), timedelta(hours=1)).verify_directly_issued_by(first.root)


def test_mismatched_pair_refused(tmp_path: Path) -> None:
    one, other = tmp_path / "one", tmp_path / "other"
    CertificateAuthority.load_or_create(one, TD)
    CertificateAuthority.load_or_create(other, TD)
    (one / CA_CERT_FILE).write_bytes((other / CA_CERT_FILE).read_bytes())
    with pytest.raises(CaError, match="does not belong to the key"):
        CertificateAuthority.load_or_create(one, TD)


def test_other_trust_domain_refused(tmp_path: Path) -> None:
    CertificateAuthority.load_or_create(tmp_path, "example.org")
    with pytest.raises(
        CaError, match=r"spiffe://example.org, not for trust domain 'cluster.local'"
    ):
        CertificateAuthority.load_or_create(tmp_path, TD)


def test_half_a_ca_refused(tmp_path: Path) -> None:
    CertificateAuthority.load_or_create(tmp_path, TD)
    (tmp_path / CA_CERT_FILE).unlink()
    with pytest.raises(CaError, match=r"holds ca-key\.pem but not ca-cert\.pem"):
        CertificateAuthority.load_or_create(tmp_path, TD)


def test_key_readable_by_others_refused(tmp_path: Path) -> None:
    CertificateAuthority.load_or_create(tmp_path, TD)
    (tmp_path / CA_KEY_FILE).chmod(0o644)
    with pytest.raises(CaError, match="readable by others"):
        CertificateAuthority.load_or_create(tmp_path, TD)


def test_garbage_refused(tmp_path: Path) -> None:
    CertificateAuthority.load_or_create(tmp_path, TD)
    (tmp_path / CA_CERT_FILE).write_bytes(b"not a certificate")
    with pytest.raises(CaError, match="not a PEM certificate"):
        CertificateAuthority.load_or_create(tmp_path, TD)


def test_issued_certificate_fields() -> None:
    ca = CertificateAuthority.create(TD)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
    leaf = ca.issue(SLEEP, key.public_key(), timedelta(hours=24), now=now)

    assert leaf.subject == x509.Name([])
    assert leaf.issuer == ca.root.subject
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical
    assert san.value.get_values_for_type(x509.UniformResourceIdentifier) == [SLEEP.uri]
    usage = leaf.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical
    assert usage.value.digital_signature and usage.value.key_encipherment
    assert not usage.value.key_cert_sign
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    constraints = leaf.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and not constraints.value.ca
    aki = leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    root_ski = ca.root.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == root_ski.digest
    ski = leaf.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert ski == x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    assert leaf.not_valid_before_utc == now - timedelta(minutes=1)
    assert leaf.not_valid_after_utc == now + timedelta(hours=24)
    assert leaf.public_key() == key.public_key()
    leaf.verify_directly_issued_by(ca.root)


def test_serials_are_random() -> None:
    ca = CertificateAuthority.create(TD)
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    serials = {ca.issue(SLEEP, key, timedelta(hours=1)).serial_number for _ in range(5)}
    assert len(serials) == 5


def test_leaf_does_not_outlive_root() -> None:
    ca = CertificateAuthority.create(TD)
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    leaf = ca.issue(SLEEP, key, timedelta(days=20000))
    assert leaf.not_valid_after_utc == ca.root.not_valid_after_utc


def test_issue_refuses_other_trust_domain_and_keys() -> None:
    ca = CertificateAuthority.create(TD)
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    with pytest.raises(CaError, match=r"outside trust domain 'cluster\.local'"):
        ca.issue(SpiffeId("example.org", "default", "sleep"), key, timedelta(hours=1))
    p384 = ec.generate_private_key(ec.SECP384R1()).public_key()
    with pytest.raises(CaError, match="P-256"):
        ca.issue(SLEEP, p384, timedelta(hours=1))
    with pytest.raises(CaError, match="positive"):
        ca.issue(SLEEP, key, timedelta(0))


def test_sign_csr_returns_leaf_and_root() -> None:
    ca = CertificateAuthority.create(TD)
    key = ec.generate_private_key(ec.SECP256R1())
    leaf, root = ca.sign_csr(_csr(key, [SLEEP.uri]), SLEEP, timedelta(hours=1))
    assert root == ca.root
    assert leaf.public_key() == key.public_key()
    leaf.verify_directly_issued_by(root)


@pytest.mark.parametrize(
    ("uris", "complaint"),
    [
        (["spiffe://cluster.local/ns/default/sa/admin"], "asks for spiffe://cluster.local/ns/def"),
        ([], "asks for no URI SAN"),
        ([SLEEP.uri, "spiffe://cluster.local/ns/default/sa/admin"], "not exactly"),
    ],
)
def test_sign_csr_refuses_other_identities(uris: list[str], complaint: str) -> None:
    ca = CertificateAuthority.create(TD)
    key = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(CaError, match=complaint):
        ca.sign_csr(_csr(key, uris), SLEEP, timedelta(hours=1))


def test_sign_csr_refuses_bad_signature() -> None:
    ca = CertificateAuthority.create(TD)
    der = bytearray(
        x509.load_pem_x509_csr(
            _csr(ec.generate_private_key(ec.SECP256R1()), [SLEEP.uri])
        ).public_bytes(serialization.Encoding.DER)
    )
    der[-5] ^= 0x01  # inside the signature
    tampered = x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM)
    with pytest.raises(CaError, match="signature does not verify"):
        ca.sign_csr(tampered, SLEEP, timedelta(hours=1))


def test_sign_csr_refuses_garbage() -> None:
    ca = CertificateAuthority.create(TD)
    with pytest.raises(CaError, match="not a PEM certificate signing request"):
        ca.sign_csr(b"hello", SLEEP, timedelta(hours=1))
