"""`ambient-agent bench --hbone-abuse`: what a holder of a mesh certificate can make a node
agent hold or do through its HBONE port, measured on the lab.

From the out-of-mesh pod `outsider` (node-2), with a certificate the lab's CA issued for
spiffe://cluster.local/ns/default/sa/attacker, at server-b's HBONE port (10.240.2.2:15008,
served by node-2's agent):

- continuation_flood: 12 connections, each a HEADERS frame followed by CONTINUATION frames
  without end (up to 64 MiB each);
- rapid_reset: one connection opening a CONNECT to server-b:8080 and resetting it, 10,000
  times; an app there counts the connections the agent opened to it;
- ping_flood: 10,000 PINGs on one connection;
- no_alpn: a TLS client that offers no ALPN;
- own_port: CONNECT to the agent's own port 15008 in the pod.

For each: the agent's RSS before and after, what the attacker got (bytes taken before the
agent closed, the answer), and the refusals /metrics counted. Asserts nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from typing import Any

import hyperframe.frame as frames

from agent.datapath import abi
from agent.hbone import protocol as hbone
from agent.identity import tls
from agent.identity.ca import CertificateAuthority
from agent.identity.manager import IdentityManager, LocalCaClient, WorkloadCertificate
from agent.identity.spiffe import DEFAULT_TRUST_DOMAIN, SpiffeId
from agent.netns import NetnsWorker
from bench.restart import pod_process
from lab import agents, control, probes
from lab.network import LabState

NODE = "node-2"
TARGET = "server-b"
ATTACKER = "outsider"
APP_PORT = 8080
CASES = ("continuation_flood", "rapid_reset", "ping_flood", "no_alpn", "own_port")
FLOOD_CONNECTIONS = 12
FLOOD_BYTES = 64 * 1024 * 1024
RESETS = 10_000
PINGS = 10_000
IO_TIMEOUT = 10.0
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


@dataclass
class CaseResult:
    rss_before_mib: float
    rss_after_mib: float
    outcome: dict[str, Any] = field(default_factory=dict)
    refusals: dict[str, int] = field(default_factory=dict)

    @property
    def rss_growth_mib(self) -> float:
        return round(self.rss_after_mib - self.rss_before_mib, 1)


def run_abuse_bench(name: str, json_output: bool) -> int:
    control.down(name)
    state = control.up(name, None)
    try:
        results = measure(state)
    finally:
        control.down(name)
    if json_output:
        print(json.dumps({case: asdict(r) | {"rss_growth_mib": r.rss_growth_mib}
                          for case, r in results.items()}))  # fmt: skip
    else:
        print(format_results(results))
    return 0


def measure(state: LabState, cases: tuple[str, ...] = CASES) -> dict[str, CaseResult]:
    target = probes.pod(state, TARGET)
    worker = NetnsWorker(str(probes.pod(state, ATTACKER).netns_path))
    creds = asyncio.run(_credentials(state))
    results: dict[str, CaseResult] = {}
    try:
        with pod_process(target, "serve", str(APP_PORT)) as served:
            for case in cases:
                before_refusals = _refusals(state)
                before = _rss_mib(state)
                outcome = ATTACKS[case](worker, target.ip, creds)
                time.sleep(1.0)  # let the agent finish with what it was sent
                after = _rss_mib(state)
                counted = _refusals(state)
                results[case] = CaseResult(before, after, outcome, {
                    k: int(v - before_refusals.get(k, 0)) for k, v in counted.items()
                    if v != before_refusals.get(k, 0)
                })  # fmt: skip
        accepted = served().get("accepted_by_source", {})
        if "rapid_reset" in results:
            attacker_ip = probes.pod(state, ATTACKER).ip
            results["rapid_reset"].outcome["app_connections"] = int(accepted.get(attacker_ip, 0))
    finally:
        worker.close()
    return results


@dataclass(frozen=True)
class Credentials:
    cert: WorkloadCertificate
    roots_pem: bytes


async def _credentials(state: LabState) -> Credentials:
    """A workload certificate from the lab's CA: what any pod of the mesh holds."""
    ca = CertificateAuthority.load_or_create(agents.lab_dir(state.name) / "ca",
                                             DEFAULT_TRUST_DOMAIN)  # fmt: skip
    identities = IdentityManager(LocalCaClient(ca, timedelta(hours=1)), ca.root_pem)
    try:
        cert = await identities.get(SpiffeId(DEFAULT_TRUST_DOMAIN, "default", "attacker"))
        return Credentials(cert, ca.root_pem)
    finally:
        await identities.close()


def _context(creds: Credentials, alpn: bool) -> ssl.SSLContext:
    if alpn:
        return tls.client_context(creds.cert, creds.roots_pem)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.load_verify_locations(cadata=creds.roots_pem.decode())
    tls.load_certificate(context, creds.cert)
    return context


def _connect(worker: NetnsWorker, host: str, creds: Credentials,
             alpn: bool = True) -> ssl.SSLSocket:  # fmt: skip
    raw = worker.call(lambda: socket.create_connection((host, abi.PORT_HBONE), timeout=IO_TIMEOUT))
    return _context(creds, alpn).wrap_socket(raw, server_hostname=None)


def _send_until_closed(sock: ssl.SSLSocket, chunks: Callable[[], bytes], limit: int) -> int:
    """Send chunks until `limit` bytes or the agent closes; returns the bytes it took."""
    sent = 0
    with contextlib.suppress(OSError):
        while sent < limit:
            chunk = chunks()
            sock.sendall(chunk)
            sent += len(chunk)
    return sent


def continuation_flood(worker: NetnsWorker, host: str, creds: Credentials) -> dict[str, Any]:
    continuation = frames.ContinuationFrame(1, data=b"\0" * 16384).serialize()
    start = PREFACE + frames.SettingsFrame(0).serialize()
    start += frames.HeadersFrame(1, data=b"\0" * 1024).serialize()  # no END_HEADERS
    socks = [_connect(worker, host, creds) for _ in range(FLOOD_CONNECTIONS)]
    taken = []
    for sock in socks:
        sock.sendall(start)
    for sock in socks:
        taken.append(_send_until_closed(sock, lambda: continuation * 64, FLOOD_BYTES))
        sock.close()
    return {"connections": len(socks), "max_bytes_sent_mib": round(max(taken) / 2**20, 2)}


def rapid_reset(worker: NetnsWorker, host: str, creds: Credentials) -> dict[str, Any]:
    client = hbone.HboneClient()
    sock = _connect(worker, host, creds)
    resets = 0
    with contextlib.suppress(OSError):
        sock.sendall(client.data_to_send())
        while resets < RESETS:
            for _ in range(50):
                stream = client.open_tunnel(f"{host}:{APP_PORT}")
                client.reset_stream(stream)
                resets += 1
            sock.sendall(client.data_to_send())
    sock.close()
    return {"resets_sent": resets}


def ping_flood(worker: NetnsWorker, host: str, creds: Credentials) -> dict[str, Any]:
    sock = _connect(worker, host, creds)
    sock.sendall(PREFACE + frames.SettingsFrame(0).serialize())
    ping = frames.PingFrame(0, opaque_data=b"abcdefgh").serialize()
    sent = _send_until_closed(sock, lambda: ping * 100, PINGS * len(ping))
    sock.close()
    return {"pings_sent": sent // len(ping)}


def no_alpn(worker: NetnsWorker, host: str, creds: Credentials) -> dict[str, Any]:
    try:
        sock = _connect(worker, host, creds, alpn=False)
    except (OSError, ssl.SSLError) as exc:
        return {"handshake": f"failed: {exc}"}
    with sock:
        try:
            sock.sendall(PREFACE + frames.SettingsFrame(0).serialize())
            answer = sock.recv(1024)
        except OSError as exc:
            return {"answer": f"closed: {type(exc).__name__}"}
    return {"answer": "closed" if not answer else f"{len(answer)} bytes of HTTP/2"}


def own_port(worker: NetnsWorker, host: str, creds: Credentials) -> dict[str, Any]:
    client = hbone.HboneClient()
    sock = _connect(worker, host, creds)
    started = time.monotonic()
    client.open_tunnel(f"{host}:{abi.PORT_HBONE}")
    sock.sendall(client.data_to_send())
    status = None
    with contextlib.suppress(OSError):
        while status is None:
            data = sock.recv(65536)
            if not data:
                break
            for event in client.receive_data(data):
                if isinstance(event, hbone.TunnelRejected | hbone.TunnelEstablished):
                    status = getattr(event, "status", 200)
            sock.sendall(client.data_to_send())
    sock.close()
    return {"status": status, "answered_in_s": round(time.monotonic() - started, 3)}


ATTACKS: dict[str, Callable[[NetnsWorker, str, Credentials], dict[str, Any]]] = {
    "continuation_flood": continuation_flood,
    "rapid_reset": rapid_reset,
    "ping_flood": ping_flood,
    "no_alpn": no_alpn,
    "own_port": own_port,
}


def _rss_mib(state: LabState) -> float:
    return probes.agent_memory(state, NODE)[0]


def _refusals(state: LabState) -> dict[str, float]:
    return {
        s.labels["reason"]: s.value
        for s in probes.scrape(state, NODE)
        if s.name == "ambient_hbone_refusals_total"
    }


def format_results(results: dict[str, CaseResult]) -> str:
    lines = [f"HBONE abuse against {TARGET}:15008 ({NODE}'s agent), from {ATTACKER} with a "
             "mesh certificate", ""]  # fmt: skip
    for case, result in results.items():
        lines.append(f"  {case:<19} RSS {result.rss_before_mib} -> {result.rss_after_mib} MiB "
                     f"({result.rss_growth_mib:+} MiB)  {result.outcome}  refused: "
                     f"{result.refusals}")  # fmt: skip
    return "\n".join(lines)
