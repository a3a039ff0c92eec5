"""The one place that wires the agent together and runs its single shutdown path."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import signal
from collections.abc import Callable
from typing import Any

import structlog

from agent.admin.metrics import AgentCollector
from agent.admin.server import AdminAddresses, AdminServer
from agent.config import AgentConfig
from agent.datapath import abi, loader
from agent.datapath.cgroup import AgentCgroup
from agent.identity.ca import CertificateAuthority
from agent.identity.manager import IdentityManager, LocalCaClient, WorkloadCertificate
from agent.inpod.enrollment import EnrollmentError, PodEnroller
from agent.policy.engine import PolicyEngine
from agent.policy.kernel_maps import PolicyMaps
from agent.proxy.inpod_proxy import InPodProxy
from agent.sources.authorization_policy import to_local_document
from agent.sources.cni_pods import CniPod, CniPods, with_cni_pods
from agent.sources.cni_server import CniServer
from agent.sources.kube_source import KubeSource, api_client_from
from agent.sources.local_source import LocalConfigSource
from agent.state.store import MeshState, StateStore
from agent.state.workload import Workload
from agent.telemetry.connections import ConnectionTelemetry, TcpSeries, TunnelCounts
from agent.telemetry.otlp import OtlpExport
from agent.telemetry.ring import RingReader
from cni.protocol import Answer, Request

log = structlog.get_logger("agent")


class NodeAgent:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.stopping = asyncio.Event()
        self._state_changed = asyncio.Event()
        self.failures = 0
        # Set as start-up gets there; the admin endpoints report what is missing meanwhile.
        self.store: StateStore | None = None
        self.identities: IdentityManager | None = None
        self.datapath: loader.LoadedDatapath | None = None
        self.enroller: PodEnroller | None = None
        self.policy: PolicyEngine | None = None
        self._reconciled = False
        self._enroll_errors: dict[str, str] = {}
        self._reconcile_lock = asyncio.Lock()
        self.cni_pods: CniPods | None = None
        self._publish: Callable[[], None] = lambda: None
        self.telemetry = ConnectionTelemetry(kernel_records=True)

    def stop(self, sig: signal.Signals) -> None:
        log.info("signal received", signal=sig.name)
        self.stopping.set()

    async def run(self) -> int:
        cfg = self.config
        loader.preflight()
        admin = AdminServer(self, self.not_ready, self.config_dump,
                            AdminAddresses(admin=cfg.admin_address))  # fmt: skip
        otlp = None
        if cfg.otlp_endpoint:
            # The very figures /metrics shows, pushed (agent/telemetry/otlp.py).
            otlp = OtlpExport(AgentCollector(self), cfg.otlp_endpoint, cfg.otlp_protocol,
                              cfg.otlp_interval, {"k8s.node.name": cfg.node})  # fmt: skip
        try:
            await admin.start()
        except OSError as exc:
            raise loader.DatapathError(f"cannot open the admin ports: {exc}") from exc
        try:
            if otlp is not None:
                otlp.start()
            return await self._run(cfg)
        finally:
            if otlp is not None:
                await asyncio.to_thread(otlp.shutdown)  # one last export with the final counts
            await admin.close()

    async def _run(self, cfg: AgentConfig) -> int:
        # The config source's state, and the state everyone reads: the config's plus the
        # pods ambient-cni announced (agent/sources/cni_pods.py).
        config_store = StateStore()
        source: LocalConfigSource | KubeSource
        if cfg.kubernetes:
            source = KubeSource(config_store, cfg.node, api_client_from(cfg.kubeconfig),
                                trust_domain=cfg.trust_domain)  # fmt: skip
            await asyncio.to_thread(source.load_initial)  # a full first list, or no start
        else:
            assert cfg.config_file is not None
            source = LocalConfigSource(cfg.config_file, config_store)
            source.load_initial()  # a broken config at start is fatal; later ones are rejected
        cni_pods = self.cni_pods = CniPods(cfg.state_dir / cfg.node / "cni-pods.json")
        for gone in cni_pods.forget_vanished():
            log.info("CNI pod gone while the agent was away", container=gone)
        store = self.store = StateStore(
            with_cni_pods(config_store.current, cni_pods.all(), cfg.node)
        )

        def publish() -> None:
            store.replace(with_cni_pods(config_store.current, cni_pods.all(), cfg.node))

        self._publish = publish
        config_store.subscribe(lambda old, new: publish())
        ca = CertificateAuthority.load_or_create(cfg.ca_dir, cfg.trust_domain)
        identities = self.identities = IdentityManager(
            LocalCaClient(ca, cfg.certificate_ttl), ca.root_pem
        )
        datapath = await asyncio.to_thread(loader.LoadedDatapath, cfg.pin_dir)
        self.datapath = datapath
        log.info("datapath loaded", pin_dir=str(cfg.pin_dir), programs=list(datapath.program_fds))
        cgroup = AgentCgroup(_instance(cfg))
        telemetry = self.telemetry
        ring = RingReader(datapath, telemetry.kernel_closed, asyncio.get_running_loop())
        try:
            cgroup.enter()
            datapath.attach_cgroup(cgroup.fd)
            ring.start()
        except BaseException:
            datapath.detach_cgroup(cgroup.fd)
            cgroup.leave()
            datapath.close(unpin=not cfg.keep_pins)
            raise
        policy = self.policy = PolicyEngine(PolicyMaps(datapath))
        proxy = self.proxy = InPodProxy(store, identities, policy, telemetry)
        enroller = self.enroller = PodEnroller(datapath, cfg.state_dir / cfg.node, proxy)
        tasks: list[asyncio.Task[None]] = []
        cni_server = CniServer(cfg.cni_socket, self.cni_request) if cfg.cni_socket else None
        try:
            await enroller.recover(keep={w.uid for w in self._wanted(store.current)})
            await self._reconcile(enroller, store.current)
            store.subscribe(lambda old, new: self._state_changed.set())
            if cni_server is not None:
                await cni_server.start()
            tasks.append(asyncio.create_task(source.run(self.stopping)))
            tasks.append(asyncio.create_task(self._follow_state(enroller, store)))
            tasks.append(asyncio.create_task(self._expire_telemetry()))
            if cfg.ready_file is not None:
                cfg.ready_file.write_text(f"{len(enroller.pods)}\n")
            log.info("agent ready", node=cfg.node, enrolled=len(enroller.pods),
                     failed=self.failures)  # fmt: skip
            await self.stopping.wait()
            log.info("agent stopping", node=cfg.node)
        finally:
            if cni_server is not None:
                await cni_server.close()  # new pods wait (the plugin retries) for the next agent
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            for pod in enroller.pods.values():
                for server in pod.servers:
                    server.close()
            for pod in enroller.pods.values():
                cancelled = await pod.connections.close(cfg.drain_grace)
                if cancelled:
                    log.warning("connections cut at shutdown", pod=pod.workload.key,
                                count=cancelled)  # fmt: skip
            await enroller.unenroll_all()
            await proxy.close()
            await identities.close()
            datapath.detach_cgroup(cgroup.fd)
            ring.stop()
            telemetry.expire(everything=True)
            cgroup.leave()
            datapath.close(unpin=not cfg.keep_pins)
            if cfg.ready_file is not None:
                cfg.ready_file.unlink(missing_ok=True)
            log.info("agent stopped", node=cfg.node)
        return 1 if self.failures else 0

    def _wanted(self, state: MeshState) -> list[Workload]:
        return [w for w in state.workloads_on(self.config.node) if w.captured]

    async def _follow_state(self, enroller: PodEnroller, store: StateStore) -> None:
        while True:
            await self._state_changed.wait()
            self._state_changed.clear()
            await self._reconcile(enroller, store.current)

    async def _expire_telemetry(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            self.telemetry.expire()

    async def _reconcile(self, enroller: PodEnroller, state: MeshState) -> None:
        """Enroll what the state wants on this node, unenroll the rest; a pod whose
        workload changed is enrolled afresh. One at a time: the state's follower and CNI
        requests both come here."""
        async with self._reconcile_lock:
            await self._reconcile_locked(enroller, state)

    async def _reconcile_locked(self, enroller: PodEnroller, state: MeshState) -> None:
        wanted = {w.uid: w for w in self._wanted(state)}
        # Policies first: a pod is never captured without its policies in the kernel.
        assert self.policy is not None
        await self.policy.apply(state, wanted.values())
        if self.config.cut_denied_connections:
            self.policy.cut_denied(self.proxy.live_connections())
        for uid, pod in list(enroller.pods.items()):
            if wanted.get(uid) != pod.workload:
                await enroller.unenroll(uid)
        self._enroll_errors = {k: v for k, v in self._enroll_errors.items() if k in wanted}
        for workload in wanted.values():
            if workload.uid in enroller.pods:
                continue
            try:
                await enroller.enroll(workload)
                self._enroll_errors.pop(workload.uid, None)
            except EnrollmentError as exc:
                self.failures += 1
                self._enroll_errors[workload.uid] = str(exc)
                log.error("pod not enrolled", error=str(exc))
        gone = self.telemetry.forget_workloads({w.uid for w in state.workloads})
        if gone:
            log.info("metric series of removed workloads dropped", series=gone)
        self._reconciled = True

    # ---- ambient-cni requests ---------------------------------------------------------------

    async def cni_request(self, request: Request) -> Answer:
        """What the CNI plugin asks (cni/protocol.py). add answers once the pod is enrolled
        (or known to stay out of the mesh), so its app never starts uncaptured."""
        assert self.cni_pods is not None and self.enroller is not None and self.store
        if request.op == "status":
            missing = self.not_ready()
            return Answer(ok=not missing, error="; ".join(missing))
        if request.op == "add":
            if not request.ips:
                return Answer(ok=False, error="no pod addresses in the primary plugin's result")
            self.cni_pods.add(CniPod(
                request.container_id, request.netns, request.ifname, request.pod.namespace,
                request.pod.name, request.pod.uid, request.ips,
            ))  # fmt: skip
        elif request.op == "del":
            self.cni_pods.remove(request.container_id)
        elif request.op == "gc":
            released = self.cni_pods.keep_only(request.valid)
            self._publish()
            await self._reconcile(self.enroller, self.store.current)
            return Answer(ok=True, released=tuple(released))
        self._publish()
        await self._reconcile(self.enroller, self.store.current)
        pod = self.cni_pods.get(request.container_id)
        if pod is None and request.op == "del":
            return Answer(ok=True)
        if pod is None:
            return Answer(ok=False, error=f"container {request.container_id} is not known")
        uid = pod.workload_uid
        workload = next((w for w in self.store.current.workloads if w.uid == uid), None)
        wanted = workload is not None and workload.captured
        enrolled = uid in self.enroller.pods
        if wanted and not enrolled:
            return Answer(ok=False, error=self._enroll_errors.get(uid, "pod not enrolled"))
        return Answer(ok=True, enrolled=enrolled)

    # ---- what the admin endpoints show ---------------------------------------------------

    def not_ready(self) -> list[str]:
        """Empty when ready: config loaded, programs loaded, every wanted pod enrolled (its
        certificate issued with it)."""
        if self.stopping.is_set():
            return ["shutting down"]
        missing = []
        if self.store is None:
            missing.append("config not loaded")
        if self.datapath is None:
            missing.append("eBPF programs not loaded")
        if not self._reconciled:
            missing.append("pods not enrolled yet")
        missing += [f"pod not enrolled: {error}" for error in self._enroll_errors.values()]
        return missing

    def config_dump(self) -> dict[str, Any]:
        state = self.store.current if self.store else None
        return {
            "node": self.config.node,
            "ready": not self.not_ready(),
            "not_ready": self.not_ready(),
            "workloads": [_workload_dump(w) for w in state.workloads] if state else [],
            "services": [dataclasses.asdict(s) for s in state.services] if state else [],
            "policies": [to_local_document(p) for p in self.policy.policies_in_force()]
            if self.policy else [],
            "enrolled": sorted(p.workload.key for p in self.enroller.pods.values())
            if self.enroller else [],
            "certificates": [
                {"identity": c.identity.uri, "serial": f"{c.leaf.serial_number:x}",
                 "not_before": c.not_before.isoformat(), "not_after": c.not_after.isoformat(),
                 "refresh_at": c.refresh_at.isoformat()}
                for c in self.certificates()
            ],
            "datapath": {"pin_dir": str(self.config.pin_dir),
                         "programs": sorted(self.datapath.program_fds) if self.datapath else []},
        }  # fmt: skip

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


def _workload_dump(workload: Workload) -> dict[str, Any]:
    return {
        "uid": workload.uid, "name": workload.name, "namespace": workload.namespace,
        "serviceAccount": workload.service_account, "workloadIps": list(workload.ips),
        "protocol": workload.protocol.value, "node": workload.node,
        "labels": dict(workload.labels),
    }  # fmt: skip


def _instance(cfg: AgentConfig) -> str:
    """The agent's cgroup name: its pin directory below /sys/fs/bpf/ambient (lab/node-1)."""
    if cfg.pin_dir.is_relative_to(abi.DEFAULT_PIN_DIR) and cfg.pin_dir != abi.DEFAULT_PIN_DIR:
        return str(cfg.pin_dir.relative_to(abi.DEFAULT_PIN_DIR))
    return cfg.node


def run_agent(config: AgentConfig) -> int:
    async def main() -> int:
        agent = NodeAgent(config)
        loop = asyncio.get_running_loop()
        log.info("event loop", implementation=type(loop).__module__.split(".")[0])
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, agent.stop, sig)
        return await agent.run()

    try:
        import uvloop  # optional extra; measured no faster here (docs/performance.md)
    except ImportError:
        return asyncio.run(main())
    result: int = uvloop.run(main())
    return result
