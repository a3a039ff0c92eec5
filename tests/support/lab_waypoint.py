"""Waypoints in tests: certificate files for a bare Envoy, and the lab's waypoint processes
(`ambient-agent waypoint`, started by `lab up` for each waypoint the topology declares)
seen from outside: their access log, readiness and metrics."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from agent.identity.ca import CertificateAuthority
from agent.identity.manager import WorkloadCertificate
from agent.identity.spiffe import SpiffeId
from agent.waypoint.envoy_config import Secrets
from agent.waypoint.xds_files import XdsFiles
from lab import agents


def write_secrets(
    directory: Path,
    namespace: str,
    service_account: str,
    ca: CertificateAuthority | None = None,
) -> Secrets:
    """SDS files with a certificate for the service account, from `ca` (a new one if none)."""
    ca = ca or CertificateAuthority.create("cluster.local")
    identity = SpiffeId(ca.trust_domain, namespace, service_account)
    key = ec.generate_private_key(ec.SECP256R1())
    chain = [ca.issue(identity, key.public_key(), timedelta(hours=1)), ca.root]
    certificate = WorkloadCertificate(identity, key, chain)
    files = XdsFiles(directory, ca.trust_domain)
    files.write_secrets(certificate.chain_pem(), certificate.key_pem(), ca.root_pem)
    return files.secrets


@dataclass(frozen=True)
class Tunnel:
    authority: str
    peer: str  # the client's URI SAN, as Envoy verified it


class LabWaypoint:
    """A lab waypoint process, read through its log (one JSON object per line)."""

    def __init__(self, lab_name: str, gateway: str) -> None:
        namespace, _, name = gateway.partition("/")
        self.gateway = gateway
        self.log = agents.lab_dir(lab_name) / f"waypoint-{namespace}-{name}.log"

    def events(self, since: int = 0, **fields: Any) -> list[dict[str, Any]]:
        if not self.log.exists():
            return []
        found = []
        for line in self.log.read_text(errors="replace").splitlines()[since:]:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if all(event.get(k) == v for k, v in fields.items()):
                found.append(event)
        return found

    def mark(self) -> int:
        """A position in the log: events(since=mark) are those written after it."""
        return len(self.log.read_text(errors="replace").splitlines()) if self.log.exists() else 0

    def tunnels(self, since: int = 0) -> list[Tunnel]:
        return [Tunnel(e["authority"], e["peer"]) for e in self.events(since, event="tunnel")]

    def requests(self, since: int = 0, **fields: Any) -> list[dict[str, Any]]:
        return self.events(since, event="request", **fields)
