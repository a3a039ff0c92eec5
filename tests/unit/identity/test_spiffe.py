from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from agent.identity.spiffe import DEFAULT_TRUST_DOMAIN, SpiffeId, spiffe_id_from_certificate


def test_uri_and_principal() -> None:
    identity = SpiffeId(DEFAULT_TRUST_DOMAIN, "default", "sleep")
    assert identity.uri == "spiffe://cluster.local/ns/default/sa/sleep"
    assert identity.principal == "cluster.local/ns/default/sa/sleep"
    assert str(identity) == identity.uri


def test_parse_round_trips() -> None:
    identity = SpiffeId.parse("spiffe://example.org/ns/shop-prod/sa/cart_v2.svc")
    assert identity == SpiffeId("example.org", "shop-prod", "cart_v2.svc")
    assert SpiffeId.parse(identity.uri) == identity


def test_ids_are_values() -> None:
    assert {SpiffeId("td", "a", "b"), SpiffeId("td", "a", "b")} == {SpiffeId("td", "a", "b")}


@pytest.mark.parametrize(
    ("uri", "complaint"),
    [
        ("https://cluster.local/ns/a/sa/b", "must start with 'spiffe://'"),
        ("SPIFFE://cluster.local/ns/a/sa/b", "must start with 'spiffe://'"),
        ("spiffe:///ns/a/sa/b", "no trust domain"),
        ("spiffe://cluster.local", "no path"),
        ("spiffe://cluster.local/", "path must be"),
        ("spiffe://cluster.local/ns/a", "path must be"),
        ("spiffe://cluster.local/ns/a/sa/b/extra", "path must be"),
        ("spiffe://cluster.local/sa/b/ns/a", "path must be"),
        ("spiffe://cluster.local/ns//sa/b", "namespace is empty"),
        ("spiffe://cluster.local/ns/a/sa/", "service account is empty"),
        ("spiffe://cluster.local/ns/../sa/b", "may not be '..'"),
        ("spiffe://cluster.local/ns/a/sa/b?x=1", "may hold only"),
        ("spiffe://cluster.local/ns/a/sa/b#frag", "may hold only"),
        ("spiffe://Cluster.Local/ns/a/sa/b", "lower-case"),
        ("spiffe://cluster.local:443/ns/a/sa/b", "lower-case"),
        ("spiffe://user@cluster.local/ns/a/sa/b", "lower-case"),
        ("spiffe://cluster local/ns/a/sa/b", "lower-case"),
        ("", "must start with"),
    ],
)
def test_parse_refuses(uri: str, complaint: str) -> None:
    with pytest.raises(ValueError, match="SPIFFE ID") as caught:
        SpiffeId.parse(uri)
    assert complaint in str(caught.value)


def test_constructor_validates() -> None:
    with pytest.raises(ValueError, match="namespace"):
        SpiffeId("cluster.local", "a/b", "c")
    with pytest.raises(ValueError, match="trust domain"):
        SpiffeId("", "a", "b")
    with pytest.raises(ValueError, match="longer than"):
        SpiffeId("cluster.local", "a", "b" * 2100)


def _cert_with_sans(names: list[x509.GeneralName]) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(x509.Name([]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + timedelta(hours=1))
    )
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=True)
    return builder.sign(key, hashes.SHA256())


def test_identity_from_certificate() -> None:
    uri = "spiffe://cluster.local/ns/a/sa/b"
    cert = _cert_with_sans([x509.DNSName("b.a.svc"), x509.UniformResourceIdentifier(uri)])
    assert spiffe_id_from_certificate(cert) == SpiffeId.parse(uri)


@pytest.mark.parametrize(
    ("names", "complaint"),
    [
        ([], "no subject alternative names"),
        ([x509.DNSName("b.a.svc")], "no URI SAN"),
        ([x509.UniformResourceIdentifier("https://example.org/x")], "must start with"),
        (
            [
                x509.UniformResourceIdentifier("spiffe://cluster.local/ns/a/sa/b"),
                x509.UniformResourceIdentifier("spiffe://cluster.local/ns/a/sa/c"),
            ],
            "2 URI SANs",
        ),
    ],
)
def test_identity_from_certificate_refuses(names: list[x509.GeneralName], complaint: str) -> None:
    with pytest.raises(ValueError, match=complaint):
        spiffe_id_from_certificate(_cert_with_sans(names))
