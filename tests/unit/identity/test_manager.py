from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from agent.identity.ca import CertificateAuthority
from agent.identity.manager import (
    IdentityError,
    IdentityManager,
    LocalCaClient,
    WorkloadCertificate,
)
from agent.identity.spiffe import SpiffeId

TD = "cluster.local"
SLEEP = SpiffeId(TD, "default", "sleep")
HTTPBIN = SpiffeId(TD, "default", "httpbin")
TTL = timedelta(hours=1)
START = datetime(2030, 1, 1, tzinfo=UTC)


class FakeClock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


class RecordingCaClient:
    """The built-in CA, slowed down so callers overlap, and failing on demand."""

    def __init__(self, ca: CertificateAuthority, clock: FakeClock, delay: float = 0.0) -> None:
        self._inner = LocalCaClient(ca, TTL, clock)
        self._delay = delay
        self.calls = 0
        self.failures_left = 0

    async def sign(self, csr_pem: bytes, identity: SpiffeId) -> list[x509.Certificate]:
        self.calls += 1
        await asyncio.sleep(self._delay)
        if self.failures_left:
            self.failures_left -= 1
            raise RuntimeError("CA unavailable")
        return await self._inner.sign(csr_pem, identity)


def _setup(
    delay: float = 0.0,
) -> tuple[CertificateAuthority, FakeClock, RecordingCaClient, IdentityManager]:
    ca = CertificateAuthority.create(TD, now=START)
    clock = FakeClock(START)
    client = RecordingCaClient(ca, clock, delay)
    manager = IdentityManager(
        client, ca.root_pem, clock, recheck_interval=0.01, retry_initial=0.01, retry_max=0.04
    )
    return ca, clock, client, manager


async def _next_rotation(manager: IdentityManager) -> WorkloadCertificate:
    rotated: asyncio.Future[WorkloadCertificate] = asyncio.get_running_loop().create_future()
    unsubscribe = manager.on_rotate(
        lambda cert: None if rotated.done() else rotated.set_result(cert)
    )
    try:
        return await asyncio.wait_for(rotated, timeout=2)
    finally:
        unsubscribe()


def test_workload_certificate_views() -> None:
    async def scenario() -> None:
        ca, _, _, manager = _setup()
        cert = await manager.get(SLEEP)
        assert cert.identity == SLEEP
        assert cert.not_before == START - timedelta(minutes=1)
        assert cert.not_after == START + TTL
        assert cert.refresh_at == cert.not_before + (cert.not_after - cert.not_before) / 2
        assert not cert.expired(START + TTL - timedelta(seconds=1))
        assert cert.expired(START + TTL)
        assert x509.load_pem_x509_certificate(cert.cert_pem()) == cert.leaf
        assert x509.load_pem_x509_certificates(cert.chain_pem()) == [cert.leaf, ca.root]
        key = serialization.load_pem_private_key(cert.key_pem(), password=None)
        assert key.public_key() == cert.leaf.public_key()
        await manager.close()

    asyncio.run(scenario())


def test_concurrent_gets_share_one_issuance() -> None:
    async def scenario() -> None:
        _, _, client, manager = _setup(delay=0.05)
        certs = await asyncio.gather(*(manager.get(SLEEP) for _ in range(10)))
        assert client.calls == 1
        assert all(cert is certs[0] for cert in certs)
        assert await manager.get(SLEEP) is certs[0]
        assert client.calls == 1
        other = await manager.get(HTTPBIN)
        assert other.identity == HTTPBIN
        assert client.calls == 2
        await manager.close()

    asyncio.run(scenario())


def test_cancelled_caller_does_not_cancel_issuance() -> None:
    async def scenario() -> None:
        _, _, client, manager = _setup(delay=0.05)
        impatient = asyncio.create_task(manager.get(SLEEP))
        patient = asyncio.create_task(manager.get(SLEEP))
        await asyncio.sleep(0.01)
        impatient.cancel()
        cert = await patient
        assert cert.identity == SLEEP
        assert client.calls == 1
        await manager.close()

    asyncio.run(scenario())


def test_rotation_at_half_life_notifies_subscribers() -> None:
    async def scenario() -> None:
        _, clock, client, manager = _setup()
        first = await manager.get(SLEEP)
        seen: list[WorkloadCertificate] = []
        manager.on_rotate(seen.append)

        clock.now = first.refresh_at - timedelta(seconds=1)
        await asyncio.sleep(0.1)
        assert client.calls == 1, "rotated before half life"

        clock.now = first.refresh_at
        second = await _next_rotation(manager)
        assert second is not first
        assert second.identity == SLEEP
        assert second.not_before == first.refresh_at - timedelta(minutes=1)
        assert second.leaf.public_key() != first.leaf.public_key(), "a fresh key per certificate"
        assert seen == [second]
        assert await manager.get(SLEEP) is second
        assert client.calls == 2
        await manager.close()

    asyncio.run(scenario())


def test_rotation_retries_with_backoff_while_still_valid() -> None:
    async def scenario() -> None:
        _, clock, client, manager = _setup()
        first = await manager.get(SLEEP)
        client.failures_left = 3
        clock.now = first.refresh_at
        second = await _next_rotation(manager)
        assert client.calls == 1 + 3 + 1
        assert second is not first
        await manager.close()

    asyncio.run(scenario())


def test_old_certificate_served_while_rotation_fails_but_never_expired() -> None:
    async def scenario() -> None:
        _, clock, client, manager = _setup()
        first = await manager.get(SLEEP)
        client.failures_left = 1_000_000
        clock.now = first.refresh_at + timedelta(minutes=1)
        await asyncio.sleep(0.05)
        assert await manager.get(SLEEP) is first
        clock.now = first.not_after
        with pytest.raises(IdentityError, match=r"CA did not sign for .*CA unavailable"):
            await manager.get(SLEEP)
        await manager.close()

    asyncio.run(scenario())


def test_forget_stops_rotation() -> None:
    async def scenario() -> None:
        _, clock, client, manager = _setup()
        first = await manager.get(SLEEP)
        manager.forget(SLEEP)
        await asyncio.sleep(0)
        assert asyncio.all_tasks() == {asyncio.current_task()}
        clock.now = first.refresh_at + timedelta(minutes=1)
        await asyncio.sleep(0.1)
        assert client.calls == 1
        again = await manager.get(SLEEP)
        assert again is not first
        assert client.calls == 2
        await manager.close()

    asyncio.run(scenario())


def test_rotate_now_and_unsubscribe() -> None:
    async def scenario() -> None:
        _, _, client, manager = _setup()
        first = await manager.rotate_now(SLEEP)
        seen: list[WorkloadCertificate] = []
        unsubscribe = manager.on_rotate(seen.append)
        second = await manager.rotate_now(SLEEP)
        assert second is not first
        assert seen == [second]
        unsubscribe()
        await manager.rotate_now(SLEEP)
        assert seen == [second]
        assert client.calls == 3
        await manager.close()

    asyncio.run(scenario())


def test_failing_subscriber_does_not_stop_others() -> None:
    async def scenario() -> None:
        _, _, _, manager = _setup()
        await manager.get(SLEEP)

        def broken(cert: WorkloadCertificate) -> None:
            raise RuntimeError("subscriber bug")

        seen: list[WorkloadCertificate] = []
        manager.on_rotate(broken)
        manager.on_rotate(seen.append)
        fresh = await manager.rotate_now(SLEEP)
        assert seen == [fresh]
        await manager.close()

    asyncio.run(scenario())


def test_close_stops_everything() -> None:
    async def scenario() -> None:
        _, _, _, manager = _setup()
        await manager.get(SLEEP)
        await manager.get(HTTPBIN)
        await manager.close()
        assert asyncio.all_tasks() == {asyncio.current_task()}
        with pytest.raises(IdentityError, match="closed"):
            await manager.get(SLEEP)

    asyncio.run(scenario())


def test_chain_outside_trusted_roots_refused() -> None:
    async def scenario() -> None:
        trusted = CertificateAuthority.create(TD)
        rogue = CertificateAuthority.create(TD)
        manager = IdentityManager(LocalCaClient(rogue, TTL), trusted.root_pem)
        with pytest.raises(IdentityError, match="does not chain to the trusted roots"):
            await manager.get(SLEEP)
        await manager.close()

    asyncio.run(scenario())


def test_certificate_for_another_identity_refused() -> None:
    class MisissuingCaClient:
        def __init__(self, ca: CertificateAuthority) -> None:
            self._ca = ca

        async def sign(self, csr_pem: bytes, identity: SpiffeId) -> list[x509.Certificate]:
            public_key = x509.load_pem_x509_csr(csr_pem).public_key()
            assert isinstance(public_key, ec.EllipticCurvePublicKey)
            return [self._ca.issue(HTTPBIN, public_key, TTL), self._ca.root]

    async def scenario() -> None:
        ca = CertificateAuthority.create(TD)
        manager = IdentityManager(MisissuingCaClient(ca), ca.root_pem)
        with pytest.raises(IdentityError, match=r"certificate for .*httpbin, not .*sleep"):
            await manager.get(SLEEP)
        await manager.close()

    asyncio.run(scenario())


def test_roots_must_be_pem() -> None:
    ca = CertificateAuthority.create(TD)
    with pytest.raises(IdentityError, match="trust roots"):
        IdentityManager(LocalCaClient(ca, TTL), b"nothing here")
