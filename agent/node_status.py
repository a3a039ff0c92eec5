"""What the admin endpoints show of a node agent: readiness, the config dump and the figures
the metrics collector reads (agent/admin/metrics.py's AgentMetricsSource).

The agent's parts come up one by one; app.py sets each here as it exists, and until then
readiness names what is missing and the figures read as none.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path
from typing import Any, Protocol

from agent.datapath import abi
from agent.datapath.loader import LoadedDatapath
from agent.hbone.connection import Refusals
from agent.hbone.data_path import DataPath
from agent.identity.manager import IdentityManager, WorkloadCertificate
from agent.inpod.enrollment import PodEnroller
from agent.policy.engine import PolicyEngine
from agent.reconcile import Reconciler
from agent.sources.authorization_policy import to_local_document
from agent.state.service import Service
from agent.state.store import StateStore
from agent.state.workload import Workload
from agent.telemetry.connections import ConnectionTelemetry, TcpSeries, TunnelCounts


class StateSource(Protocol):
    """The local config or Kubernetes source (agent/sources/)."""

    @property
    def rejected(self) -> str | None: ...


class NodeStatus:
    def __init__(
        self, node: str, pin_dir: Path, stopping: asyncio.Event, telemetry: ConnectionTelemetry
    ) -> None:
        self.node = node
        self.pin_dir = pin_dir
        self.stopping = stopping
        self.telemetry = telemetry
        self.store: StateStore | None = None
        self.identities: IdentityManager | None = None
        self.datapath: LoadedDatapath | None = None
        self.enroller: PodEnroller | None = None
        self.policy: PolicyEngine | None = None
        self.reconciler: Reconciler | None = None
        self.source: StateSource | None = None
        self.refusals: Refusals | None = None
        self.vip_refusals: Counter[str] | None = None
        self.dns_counts: Counter[str] | None = None
        self.waypoint_skips: Counter[str] | None = None
        self.bypasses: Counter[tuple[str, str]] | None = None
        self.local_delivery_counts: Counter[str] | None = None
        self.socket_relay_counts: Counter[str] | None = None
        self.hbone_data_path: DataPath | None = None

    def not_ready(self) -> list[str]:
        """Empty when ready: config loaded, programs loaded, every wanted pod enrolled (its
        certificate issued with it)."""
        if self.stopping.is_set():
            return ["shutting down"]
        missing = []
        if self.store is None:
            missing.append("config not loaded")
        if self.source is not None and self.source.rejected is not None:
            missing.append(self.source.rejected)
        if self.datapath is None:
            missing.append("eBPF programs not loaded")
        if self.reconciler is None or not self.reconciler.reconciled:
            missing.append("pods not enrolled yet")
        if self.reconciler is not None:
            if self.reconciler.error is not None:
                missing.append(f"state not in force (reconcile failed: {self.reconciler.error})")
            errors = self.reconciler.enroll_errors.values()
            missing += [f"pod not enrolled: {error}" for error in errors]
        return missing

    def config_dump(self) -> dict[str, Any]:
        state = self.store.current if self.store else None
        policies = self.policy.policies_in_force() if self.policy else ()
        return {
            "node": self.node,
            "ready": not self.not_ready(),
            "not_ready": self.not_ready(),
            "workloads": [_workload_dump(w) for w in state.workloads] if state else [],
            "services": [_service_dump(s) for s in state.services] if state else [],
            "policies": [to_local_document(p) for p in policies],
            "enrolled": sorted(p.workload.key for p in self.enroller.pods.values())
            if self.enroller else [],
            "certificates": [
                {"identity": c.identity.uri, "serial": f"{c.leaf.serial_number:x}",
                 "not_before": c.not_before.isoformat(), "not_after": c.not_after.isoformat(),
                 "refresh_at": c.refresh_at.isoformat()}
                for c in self.certificates()
            ],
            "data_path": self.data_path(),
            "datapath": {"pin_dir": str(self.pin_dir),
                         "programs": sorted(self.datapath.program_fds) if self.datapath else []},
        }  # fmt: skip

    # -- AgentMetricsSource -----------------------------------------------------------------

    def kernel_verdicts(self) -> dict[str, int]:
        if self.datapath is None:
            return {}
        return {
            abi.VerdictReason(int(k.value)).name: sum(v)
            for k, v in self.datapath.table("verdicts").items()
        }

    def policy_decisions(self) -> list[tuple[str, str, int]]:
        return self.policy.decisions() if self.policy else []

    def enrolled_pods(self) -> int:
        return len(self.enroller.pods) if self.enroller else 0

    def programs_loaded(self) -> int:
        return len(self.datapath.program_fds) if self.datapath else 0

    def certificates(self) -> list[WorkloadCertificate]:
        return self.identities.certificates() if self.identities else []

    def tcp_series(self) -> list[tuple[tuple[str, ...], TcpSeries]]:
        return self.telemetry.series()

    def tunnels(self) -> dict[str, TunnelCounts]:
        return self.telemetry.tunnels()

    def open_connections(self) -> int:
        return self.telemetry.open_connections

    def reconcile_failures(self) -> int:
        return self.reconciler.errors if self.reconciler else 0

    def hbone_refusals(self) -> dict[str, int]:
        return dict(self.refusals.counts) if self.refusals else {}

    def outbound_refusals(self) -> dict[str, int]:
        return dict(self.vip_refusals) if self.vip_refusals is not None else {}

    def waypoint_skipped(self) -> dict[str, int]:
        return dict(self.waypoint_skips) if self.waypoint_skips is not None else {}

    def waypoint_bypasses(self) -> dict[tuple[str, str], int]:
        return dict(self.bypasses) if self.bypasses is not None else {}

    def data_path(self) -> dict[str, str]:
        return self.hbone_data_path.labels() if self.hbone_data_path else {}

    def local_deliveries(self) -> dict[str, int]:
        counts = self.local_delivery_counts
        return dict(counts) if counts is not None else {}

    def socket_relays(self) -> dict[str, int]:
        counts = self.socket_relay_counts
        return dict(counts) if counts is not None else {}

    def dns_requests(self) -> dict[str, int]:
        return dict(self.dns_counts) if self.dns_counts is not None else {}

    def telemetry_counts(self) -> dict[str, int]:
        """The kernel's telemetry_stats by name, and the connections that closed without a
        kernel record (counted on the relay's figures instead)."""
        counts = {"kernel_records_missing": self.telemetry.kernel_records_missing}
        if self.datapath is not None:
            for key, per_cpu in self.datapath.table("telemetry_stats").items():
                counts[abi.TelemetryStat(int(key.value)).name.lower()] = sum(per_cpu)
        return counts

    def map_fill(self) -> list[tuple[str, int, int]]:
        """(map, entries, capacity) for the maps that fill with pods and connections."""
        if self.datapath is None:
            return []
        tables = ((name, self.datapath.table(name)) for name in abi.FILL_MAPS)
        return [(name, len(table), int(table.max_entries)) for name, table in tables]


def _service_dump(service: Service) -> dict[str, Any]:
    # Not dataclasses.asdict: it deep-copies, and a read-only ports mapping cannot be copied.
    return {
        "name": service.name, "namespace": service.namespace, "hostname": service.hostname,
        "vips": list(service.vips), "ports": {str(k): v for k, v in service.ports.items()},
    }  # fmt: skip


def _workload_dump(workload: Workload) -> dict[str, Any]:
    return {
        "uid": workload.uid, "name": workload.name, "namespace": workload.namespace,
        "serviceAccount": workload.service_account, "workloadIps": list(workload.ips),
        "protocol": workload.protocol.value, "node": workload.node,
        "labels": dict(workload.labels),
    }  # fmt: skip
