"""The TLS contexts of the identities whose pods are enrolled here: one server and one
client context per identity, replaced or reloaded when the certificate rotates."""

from __future__ import annotations

import ssl

import structlog

from agent.identity import tls
from agent.identity.manager import IdentityManager, WorkloadCertificate
from agent.identity.spiffe import SpiffeId

log = structlog.get_logger("agent.proxy")


class TlsContexts:
    def __init__(self, identities: IdentityManager) -> None:
        self._identities = identities
        self._server: dict[SpiffeId, ssl.SSLContext] = {}
        self._client: dict[SpiffeId, ssl.SSLContext] = {}
        identities.on_rotate(self._rotated)

    def ensure(self, cert: WorkloadCertificate) -> None:
        roots = self._identities.roots_pem
        if cert.identity not in self._server:
            self._server[cert.identity] = tls.server_context(cert, roots)
        if cert.identity not in self._client:
            self._client[cert.identity] = tls.client_context(cert, roots)

    def server(self, identity: SpiffeId) -> ssl.SSLContext:
        return self._server[identity]

    def client(self, identity: SpiffeId) -> ssl.SSLContext:
        return self._client[identity]

    def forget(self, identity: SpiffeId) -> None:
        """No pod of this identity is enrolled any more: its certificate and contexts go."""
        self._identities.forget(identity)
        self._server.pop(identity, None)
        self._client.pop(identity, None)

    def trust_domains(self) -> set[str]:
        return {identity.trust_domain for identity in self._server}

    def _rotated(self, cert: WorkloadCertificate) -> None:
        """New handshakes use the new certificate; established connections keep theirs."""
        server = self._server.get(cert.identity)
        if server is not None:
            tls.load_certificate(server, cert)  # the listener holds this very context
        if cert.identity in self._client:
            self._client[cert.identity] = tls.client_context(cert, self._identities.roots_pem)
        log.info("certificate rotated", identity=cert.identity.uri,
                 not_after=cert.not_after.isoformat())  # fmt: skip
