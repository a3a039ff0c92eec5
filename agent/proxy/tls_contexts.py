"""The TLS contexts of the identities whose pods are enrolled here: a client context per
identity and a server context per pod, replaced or reloaded when the certificate rotates."""

from __future__ import annotations

import ssl

import structlog

from agent.identity import tls
from agent.identity.manager import IdentityManager, WorkloadCertificate
from agent.identity.spiffe import SpiffeId

log = structlog.get_logger("agent.proxy")


class TlsContexts:
    """Client contexts per identity (shared by every pod of it); a server context per pod,
    since a pod's listener holds its context for good: a pod whose identity changes gets the
    new certificate loaded into its own context, and new handshakes present it."""

    def __init__(self, identities: IdentityManager) -> None:
        self._identities = identities
        self._server: dict[str, tuple[SpiffeId, ssl.SSLContext]] = {}  # by pod uid
        self._client: dict[SpiffeId, ssl.SSLContext] = {}
        identities.on_rotate(self._rotated)

    def ensure(self, cert: WorkloadCertificate) -> None:
        if cert.identity not in self._client:
            self._client[cert.identity] = tls.client_context(cert, self._identities.roots_pem)

    def server(self, pod_uid: str, cert: WorkloadCertificate) -> ssl.SSLContext:
        """The pod's listener context, presenting `cert` (loaded anew if it already exists:
        the pod's identity changed)."""
        held = self._server.get(pod_uid)
        if held is None:
            context = tls.server_context(cert, self._identities.roots_pem)
        else:
            context = held[1]
            tls.load_certificate(context, cert)
        self._server[pod_uid] = (cert.identity, context)
        if held is not None and held[0] != cert.identity:
            self._forget_unserved(held[0])
        return context

    def client(self, identity: SpiffeId) -> ssl.SSLContext:
        return self._client[identity]

    def release(self, pod_uid: str) -> None:
        """The pod is gone: its server context goes, and its identity's certificate and client
        context too when no other pod holds that identity."""
        held = self._server.pop(pod_uid, None)
        if held is not None:
            self._forget_unserved(held[0])

    def _forget_unserved(self, identity: SpiffeId) -> None:
        if identity not in self.identities_served():
            self._identities.forget(identity)
            self._client.pop(identity, None)

    def identities_served(self) -> set[SpiffeId]:
        return {identity for identity, _ in self._server.values()}

    def trust_domains(self) -> set[str]:
        return {identity.trust_domain for identity in self.identities_served()}

    def _rotated(self, cert: WorkloadCertificate) -> None:
        """New handshakes use the new certificate; established connections keep theirs."""
        for identity, server in self._server.values():
            if identity == cert.identity:
                tls.load_certificate(server, cert)  # the listener holds this very context
        if cert.identity in self._client:
            self._client[cert.identity] = tls.client_context(cert, self._identities.roots_pem)
        log.info("certificate rotated", identity=cert.identity.uri,
                 not_after=cert.not_after.isoformat())  # fmt: skip
