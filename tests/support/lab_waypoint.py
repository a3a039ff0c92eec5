"""Waypoints in tests: certificate files for a bare Envoy, and the lab's waypoint processes
(`ambient-agent waypoint`, started by `lab up` for each waypoint the topology declares)
seen from outside: their access log, readiness and metrics."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
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
from lab import probes
from lab.network import LabState


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
    """A lab waypoint process, read through its log (one JSON object per line) from the
    point this object was made, and its config dump."""

    def __init__(self, lab: LabState, gateway: str) -> None:
        self.lab = lab
        self.gateway = gateway
        self.log = Path(lab.waypoints[gateway]["log"])
        self.since = self.mark()

    def events(self, since: int | None = None, **fields: Any) -> list[dict[str, Any]]:
        if not self.log.exists():
            return []
        found = []
        start = self.since if since is None else since
        for line in self.log.read_text(errors="replace").splitlines()[start:]:
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

    def tunnels(self) -> list[Tunnel]:
        return [Tunnel(e["authority"], e["peer"]) for e in self.events(event="tunnel")]

    def requests(self, **fields: Any) -> list[dict[str, Any]]:
        return self.events(event="request", **fields)

    def dump(self) -> dict[str, Any]:
        """The waypoint's config dump (its admin port, on loopback in its pod)."""
        pod = probes.pod(self.lab, self.lab.waypoints[self.gateway]["pod"].partition("/")[2])
        url = "http://127.0.0.1:15000/config_dump"
        status, body = probes.http_request(pod.netns_path, url)
        assert status == 200, f"{url} of {self.gateway}: {status} {body[:200]}"
        result: dict[str, Any] = json.loads(body)
        return result

    def wait_in_force(self, check: Callable[[dict[str, Any]], bool], timeout: float = 15) -> None:
        """Until the dump passes `check` and Envoy has taken the latest config written."""

        def settled() -> bool:
            dump = self.dump()
            envoy = dump["envoy"]
            taken = envoy["in_force"]["listeners"] == envoy["latest_version"]
            return taken and not envoy["warming"] and check(dump)

        deadline = time.monotonic() + timeout
        while not settled():
            if time.monotonic() > deadline:
                raise AssertionError(f"waypoint {self.gateway}: no config in force passes")
            time.sleep(0.1)
