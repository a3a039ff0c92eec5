"""SPIFFE IDs in Istio's shape, spiffe://<trust domain>/ns/<namespace>/sa/<service account>,
and reading them from X.509-SVIDs."""

from __future__ import annotations

import re
from dataclasses import dataclass

from cryptography import x509

DEFAULT_TRUST_DOMAIN = "cluster.local"

SCHEME = "spiffe://"

# Character sets from the SPIFFE ID spec (section 2.1 and 2.2). Upper case is not allowed in a
# trust domain, so two spellings of one domain can never be two identities.
_TRUST_DOMAIN_CHARS = re.compile(r"[a-z0-9._-]+")
_PATH_SEGMENT_CHARS = re.compile(r"[A-Za-z0-9._-]+")
_TRUST_DOMAIN_MAX_LEN = 255
# The spec caps the whole URI at 2048 bytes; peers such as Envoy reject longer ones.
_URI_MAX_LEN = 2048


def check_trust_domain(trust_domain: str) -> None:
    """Raise ValueError unless `trust_domain` is a valid SPIFFE trust domain name."""
    if not trust_domain:
        raise ValueError("trust domain is empty")
    if len(trust_domain) > _TRUST_DOMAIN_MAX_LEN:
        raise ValueError(f"trust domain is longer than {_TRUST_DOMAIN_MAX_LEN} characters")
    if not _TRUST_DOMAIN_CHARS.fullmatch(trust_domain):
        raise ValueError(
            f"trust domain {trust_domain!r} may hold only lower-case letters, digits, '.', '-'"
            " and '_'"
        )


def _check_path_segment(what: str, value: str) -> None:
    if not value:
        raise ValueError(f"{what} is empty")
    if value in (".", ".."):
        raise ValueError(f"{what} may not be {value!r}")
    if not _PATH_SEGMENT_CHARS.fullmatch(value):
        raise ValueError(f"{what} {value!r} may hold only letters, digits, '.', '-' and '_'")


@dataclass(frozen=True, slots=True)
class SpiffeId:
    trust_domain: str
    namespace: str
    service_account: str

    def __post_init__(self) -> None:
        check_trust_domain(self.trust_domain)
        _check_path_segment("namespace", self.namespace)
        _check_path_segment("service account", self.service_account)
        if len(self.uri) > _URI_MAX_LEN:
            raise ValueError(f"SPIFFE ID is longer than {_URI_MAX_LEN} characters")

    @property
    def uri(self) -> str:
        return f"{SCHEME}{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"

    @property
    def principal(self) -> str:
        """The form Istio authorization policies match: the URI without its scheme."""
        return self.uri.removeprefix(SCHEME)

    def __str__(self) -> str:
        return self.uri

    @classmethod
    def parse(cls, uri: str) -> SpiffeId:
        """Parse `spiffe://<td>/ns/<ns>/sa/<sa>`; anything else raises ValueError."""
        if not uri.startswith(SCHEME):
            raise ValueError(f"{uri!r} is not a SPIFFE ID: it must start with {SCHEME!r}")
        trust_domain, slash, path = uri.removeprefix(SCHEME).partition("/")
        if not trust_domain:
            raise ValueError(f"{uri!r} is not a SPIFFE ID: no trust domain")
        if not slash:
            raise ValueError(f"{uri!r} is not a workload SPIFFE ID: no path")
        segments = path.split("/")
        if len(segments) != 4 or segments[0] != "ns" or segments[2] != "sa":
            raise ValueError(
                f"{uri!r} is not a workload SPIFFE ID: the path must be /ns/<namespace>/sa/"
                "<service account>"
            )
        try:
            return cls(trust_domain, segments[1], segments[3])
        except ValueError as exc:
            raise ValueError(f"{uri!r} is not a valid SPIFFE ID: {exc}") from None


def spiffe_id_from_certificate(cert: x509.Certificate) -> SpiffeId:
    """The identity an X.509-SVID carries: its one URI SAN, which must be a workload SPIFFE ID.

    Raises ValueError naming what is wrong."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise ValueError("certificate has no subject alternative names") from None
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    if not uris:
        raise ValueError("certificate has no URI SAN")
    # The X.509-SVID spec allows exactly one: with several, which one is "the" identity would
    # depend on the reader.
    if len(uris) > 1:
        raise ValueError(f"certificate has {len(uris)} URI SANs ({', '.join(uris)}), not one")
    return SpiffeId.parse(uris[0])
