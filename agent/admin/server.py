"""aiohttp servers for the admin ports (Istio's numbers), of the node agent and the waypoint."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.registry import Collector

ADMIN_PORT = 15000
STATS_PORT = 15020
READINESS_PORT = 15021


@dataclass(frozen=True)
class AdminAddresses:
    # Config dump shows the mesh's workloads and policies: loopback unless asked otherwise.
    admin: str = "127.0.0.1"
    # Scraped by Prometheus and probed by the kubelet from outside the node's loopback.
    stats: str = "0.0.0.0"
    readiness: str = "0.0.0.0"


class AdminServer:
    def __init__(
        self,
        collector: Collector,
        not_ready: Callable[[], list[str]],
        config_dump: Callable[[], dict[str, Any]],
        addresses: AdminAddresses = AdminAddresses(),
        ports: tuple[int, int, int] = (ADMIN_PORT, STATS_PORT, READINESS_PORT),
    ) -> None:
        self._registry = CollectorRegistry(auto_describe=False)
        self._registry.register(collector)
        self._not_ready = not_ready
        self._config_dump = config_dump
        self._addresses = addresses
        self._ports = ports
        self._runners: list[web.AppRunner] = []

    async def start(self) -> None:
        admin, stats, readiness = web.Application(), web.Application(), web.Application()
        admin.router.add_get("/config_dump", self._dump)
        admin.router.add_get("/healthz/ready", self._ready)
        stats.router.add_get("/metrics", self._metrics)
        stats.router.add_get("/stats/prometheus", self._metrics)
        readiness.router.add_get("/healthz/ready", self._ready)
        for app, host, port in (
            (admin, self._addresses.admin, self._ports[0]),
            (stats, self._addresses.stats, self._ports[1]),
            (readiness, self._addresses.readiness, self._ports[2]),
        ):
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            await web.TCPSite(runner, host, port, reuse_address=True).start()
            self._runners.append(runner)

    async def close(self) -> None:
        for runner in self._runners:
            await runner.cleanup()
        self._runners.clear()

    async def _ready(self, request: web.Request) -> web.Response:
        missing = self._not_ready()
        if missing:
            return web.Response(status=503, text="not ready: " + "; ".join(missing) + "\n")
        return web.Response(text="ready\n")

    async def _metrics(self, request: web.Request) -> web.Response:
        body = generate_latest(self._registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _dump(self, request: web.Request) -> web.Response:
        return web.Response(text=json.dumps(self._config_dump(), indent=2, default=str) + "\n",
                            content_type="application/json")  # fmt: skip
