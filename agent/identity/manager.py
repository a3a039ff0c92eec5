"""Workload certificates per identity: issued on first use, shared by concurrent callers, and
rotated in the background at half their lifetime."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol, TypeVar

import structlog
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from agent.identity.ca import CertificateAuthority
from agent.identity.spiffe import SpiffeId, spiffe_id_from_certificate

log = structlog.get_logger("agent.identity")

RotateCallback = Callable[["WorkloadCertificate"], None]
T = TypeVar("T")


def utcnow() -> datetime:
    return datetime.now(UTC)


class IdentityError(Exception):
    """A certificate could not be obtained, or the CA returned one that cannot be used."""


@dataclass(frozen=True, eq=False)
class WorkloadCertificate:
    """A private key and its certificate chain, leaf first."""

    identity: SpiffeId
    private_key: ec.EllipticCurvePrivateKey
    chain: list[x509.Certificate]

    def __post_init__(self) -> None:
        if not self.chain:
            raise ValueError("a workload certificate needs at least its leaf")

    @property
    def leaf(self) -> x509.Certificate:
        return self.chain[0]

    @property
    def not_before(self) -> datetime:
        return self.leaf.not_valid_before_utc

    @property
    def not_after(self) -> datetime:
        return self.leaf.not_valid_after_utc

    @property
    def refresh_at(self) -> datetime:
        return self.not_before + (self.not_after - self.not_before) / 2

    def expired(self, now: datetime) -> bool:
        return now >= self.not_after

    def cert_pem(self) -> bytes:
        return self.leaf.public_bytes(serialization.Encoding.PEM)

    def key_pem(self) -> bytes:
        return self.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def chain_pem(self) -> bytes:
        return b"".join(cert.public_bytes(serialization.Encoding.PEM) for cert in self.chain)


class CaClient(Protocol):
    async def sign(self, csr_pem: bytes, identity: SpiffeId) -> list[x509.Certificate]:
        """Leaf first, then the chain up to (and possibly including) a root."""
        ...


class LocalCaClient:
    """The built-in CA behind the CaClient interface, for standalone nodes."""

    def __init__(
        self,
        ca: CertificateAuthority,
        ttl: timedelta,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self._ca = ca
        self._ttl = ttl
        self._clock = clock

    async def sign(self, csr_pem: bytes, identity: SpiffeId) -> list[x509.Certificate]:
        return self._ca.sign_csr(csr_pem, identity, self._ttl, self._clock())


def _signing_request(identity: SpiffeId, key: ec.EllipticCurvePrivateKey) -> bytes:
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity.uri)]),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM)


def _issued_by(child: x509.Certificate, parent: x509.Certificate) -> bool:
    try:
        child.verify_directly_issued_by(parent)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


@dataclass(eq=False)
class _Slot:
    """What the manager holds for one identity."""

    cert: WorkloadCertificate | None = None
    issuing: asyncio.Task[WorkloadCertificate] | None = None
    rotation: asyncio.Task[None] | None = None


class IdentityManager:
    def __init__(
        self,
        ca_client: CaClient,
        roots_pem: bytes,
        clock: Callable[[], datetime] = utcnow,
        *,
        recheck_interval: float = 30.0,
        retry_initial: float = 1.0,
        retry_max: float = 60.0,
    ) -> None:
        """`recheck_interval` bounds how long rotation sleeps before reading the clock again;
        `retry_initial`/`retry_max` bound the doubling wait between failed rotations."""
        try:
            self._roots = x509.load_pem_x509_certificates(roots_pem)
        except ValueError as exc:
            raise IdentityError(f"trust roots are not PEM certificates: {exc}") from None
        self._roots_pem = roots_pem
        self._ca_client = ca_client
        self._clock = clock
        self._recheck_interval = recheck_interval
        self._retry_initial = retry_initial
        self._retry_max = retry_max
        self._slots: dict[SpiffeId, _Slot] = {}
        self._subscribers: list[RotateCallback] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False

    @property
    def roots_pem(self) -> bytes:
        return self._roots_pem

    async def get(self, identity: SpiffeId) -> WorkloadCertificate:
        """A valid certificate for `identity`, issued on first use and then kept fresh."""
        slot = self._slot(identity)
        if slot.cert is not None and not slot.cert.expired(self._clock()):
            return slot.cert
        return await self._issue(identity, slot)

    async def rotate_now(self, identity: SpiffeId) -> WorkloadCertificate:
        """Replace the certificate of `identity` at once (issuing it if there was none)."""
        return await self._issue(identity, self._slot(identity))

    def certificates(self) -> list[WorkloadCertificate]:
        """The certificates currently held (for the config dump and expiry metrics)."""
        return [slot.cert for slot in self._slots.values() if slot.cert is not None]

    def forget(self, identity: SpiffeId) -> None:
        """Drop the certificate of `identity` and stop rotating it. Callers already waiting for
        an issuance still get their certificate."""
        slot = self._slots.pop(identity, None)
        if slot is not None and slot.rotation is not None:
            slot.rotation.cancel()

    def on_rotate(self, callback: RotateCallback) -> Callable[[], None]:
        """Call `callback` with each certificate that replaces an earlier one. Returns a
        function that unsubscribes it."""
        self._subscribers.append(callback)

        def unsubscribe() -> None:
            if callback in self._subscribers:
                self._subscribers.remove(callback)

        return unsubscribe

    async def close(self) -> None:
        """Stop every rotation. Issuances still in flight are cancelled with it."""
        self._closed = True
        self._slots.clear()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _slot(self, identity: SpiffeId) -> _Slot:
        if self._closed:
            raise IdentityError("identity manager is closed")
        return self._slots.setdefault(identity, _Slot())

    def _spawn(self, coro: Coroutine[Any, Any, T], name: str) -> asyncio.Task[T]:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _issue(self, identity: SpiffeId, slot: _Slot) -> WorkloadCertificate:
        if slot.issuing is None:
            slot.issuing = self._spawn(self._issue_once(identity, slot), f"issue {identity}")
        # Shielded: one caller giving up must not cancel the issuance the others wait for.
        return await asyncio.shield(slot.issuing)

    async def _issue_once(self, identity: SpiffeId, slot: _Slot) -> WorkloadCertificate:
        try:
            # P-256 key generation takes well under a millisecond: no need for a thread.
            key = ec.generate_private_key(ec.SECP256R1())
            try:
                chain = await self._ca_client.sign(_signing_request(identity, key), identity)
            except Exception as exc:
                raise IdentityError(f"CA did not sign for {identity}: {exc}") from exc
            if not chain:
                raise IdentityError(f"CA returned no certificate for {identity}")
            cert = WorkloadCertificate(identity, key, list(chain))
            self._check_issued(cert)
        finally:
            slot.issuing = None
        if self._closed or self._slots.get(identity) is not slot:
            # Forgotten meanwhile: the callers that asked still get it, nothing keeps it.
            return cert
        previous, slot.cert = slot.cert, cert
        log.info(
            "workload certificate issued",
            identity=identity.uri,
            serial=f"{cert.leaf.serial_number:x}",
            not_after=cert.not_after.isoformat(),
            refresh_at=cert.refresh_at.isoformat(),
        )
        if slot.rotation is None:
            slot.rotation = self._spawn(self._rotate(identity, slot), f"rotate {identity}")
        if previous is not None:
            self._notify(cert)
        return cert

    def _check_issued(self, cert: WorkloadCertificate) -> None:
        """Refuse what the CA returned unless it is usable as-is: a bad chain found here is a
        clear error, found in a handshake it is a peer's opaque alert."""
        leaf = cert.leaf
        if leaf.public_key() != cert.private_key.public_key():
            raise IdentityError(f"CA returned a certificate for another key ({cert.identity})")
        try:
            carried = spiffe_id_from_certificate(leaf)
        except ValueError as exc:
            raise IdentityError(
                f"CA returned a certificate without a usable SPIFFE ID: {exc}"
            ) from None
        if carried != cert.identity:
            raise IdentityError(f"CA returned a certificate for {carried}, not {cert.identity}")
        for child, parent in itertools.pairwise(cert.chain):
            if not _issued_by(child, parent):
                raise IdentityError(
                    f"CA returned a broken chain for {cert.identity}: a certificate issued by "
                    f"{child.issuer.rfc4514_string()!r} is followed by one it does not verify "
                    f"against, {parent.subject.rfc4514_string()!r}"
                )
        top = cert.chain[-1]
        if top not in self._roots and not any(_issued_by(top, root) for root in self._roots):
            raise IdentityError(
                f"CA returned a certificate for {cert.identity} that does not chain to the "
                "trusted roots"
            )
        if cert.expired(self._clock()):
            raise IdentityError(f"CA returned an expired certificate for {cert.identity}")

    def _notify(self, cert: WorkloadCertificate) -> None:
        for callback in list(self._subscribers):
            try:
                callback(cert)
            except Exception as exc:
                # One broken subscriber must not keep the others on the old certificate.
                log.error("rotation subscriber failed", identity=cert.identity.uri, error=repr(exc))

    async def _rotate(self, identity: SpiffeId, slot: _Slot) -> None:
        backoff = self._retry_initial
        while True:
            cert = slot.cert
            assert cert is not None, "rotation starts only after the first issuance"
            wait = (cert.refresh_at - self._clock()).total_seconds()
            if wait > 0:
                # Naps rather than one long sleep: asyncio sleeps on the monotonic clock, which
                # does not see wall-clock steps (suspend, NTP) that bring refresh_at closer.
                await asyncio.sleep(min(wait, self._recheck_interval))
                continue
            try:
                fresh = await self._issue(identity, slot)
            except Exception as exc:
                # Anything at all: giving up would leave the identity to expire silently.
                expired = cert.expired(self._clock())
                (log.error if expired else log.warning)(
                    "certificate rotation failed",
                    identity=identity.uri,
                    error=str(exc),
                    current_not_after=cert.not_after.isoformat(),
                    current_expired=expired,
                    retry_in=backoff,
                )
            else:
                if fresh.refresh_at > self._clock():
                    backoff = self._retry_initial
                    continue
                # Would otherwise re-issue in a tight loop.
                log.warning(
                    "CA issued a certificate already due for refresh",
                    identity=identity.uri,
                    not_after=fresh.not_after.isoformat(),
                    retry_in=backoff,
                )
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self._retry_max)
