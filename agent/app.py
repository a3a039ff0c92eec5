"""The one place that wires the agent together.

Start-up builds the parts in order and registers the undo of each step as it is done;
shutdown (SIGTERM, SIGINT, or a failed start) runs those steps in reverse through one path
(agent/drain.py): stop accepting, let work finish until a grace deadline, then force. Each
undo step runs even when an earlier one failed.
"""

from __future__ import annotations

import asyncio
import signal
from typing import TYPE_CHECKING

import structlog

from agent.admin.metrics import AgentCollector
from agent.admin.server import AdminAddresses, AdminServer
from agent.config import AgentConfig
from agent.datapath import loader
from agent.datapath.cgroup import AgentCgroup
from agent.drain import Drain, ShutdownSteps
from agent.hbone import data_path
from agent.identity.ca import CertificateAuthority
from agent.identity.manager import IdentityManager, LocalCaClient
from agent.inpod.enrollment import PodEnroller
from agent.node_status import NodeStatus
from agent.policy.engine import PolicyEngine
from agent.policy.kernel_maps import PolicyMaps
from agent.proxy.inpod_proxy import InPodProxy
from agent.reconcile import CniAnswers, Reconciler
from agent.sources.cni_pods import CniPods, with_cni_pods
from agent.sources.cni_server import CniServer
from agent.sources.local_source import LocalConfigSource
from agent.state.store import StateStore
from agent.telemetry.connections import ConnectionTelemetry
from agent.telemetry.ring import RingReader

if TYPE_CHECKING:
    from agent.sources.kube_source import KubeSource

log = structlog.get_logger("agent")


class NodeAgent:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.stopping = asyncio.Event()
        self.telemetry = ConnectionTelemetry(kernel_records=True)
        self.status = NodeStatus(config.node, config.pin_dir, self.stopping, self.telemetry)
        self.shutdown = ShutdownSteps()

    def stop(self, sig: signal.Signals) -> None:
        log.info("signal received", signal=sig.name)
        self.stopping.set()

    async def run(self) -> int:
        loader.preflight()
        try:
            failures = await self._start_and_wait()
        finally:
            self.stopping.set()
            await self.shutdown.run()
            log.info("agent stopped", node=self.config.node,
                     failed_steps=self.shutdown.failed)  # fmt: skip
        return 1 if failures or self.shutdown.failed else 0

    async def _start_and_wait(self) -> int:
        """Start every part, registering its undo; then wait for the stop. Returns how many
        pods failed to enroll."""
        cfg, status, undo = self.config, self.status, self.shutdown.defer
        admin = AdminServer(AgentCollector(status), status.not_ready, status.config_dump,
                            AdminAddresses(admin=cfg.admin_address))  # fmt: skip
        try:
            await admin.start()
        except OSError as exc:
            raise loader.DatapathError(f"cannot open the admin ports: {exc}") from exc
        undo("admin ports", admin.close)
        if cfg.otlp_endpoint:
            # Imported only when used, as the Kubernetes source below: OpenTelemetry's SDK
            # and gRPC, and the Kubernetes client, are tens of MiB an agent without them
            # does not hold.
            from agent.telemetry.otlp import OtlpExport

            # The very figures /metrics shows, pushed (agent/telemetry/otlp.py).
            otlp = OtlpExport(AgentCollector(status), cfg.otlp_endpoint, cfg.otlp_protocol,
                              cfg.otlp_interval, {"k8s.node.name": cfg.node})  # fmt: skip
            otlp.start()
            # One last export with the final counts.
            undo("OTLP export", lambda: asyncio.to_thread(otlp.shutdown))

        # The config source's state, and the state everyone reads: the config's plus the
        # pods ambient-cni announced (agent/sources/cni_pods.py).
        config_store = StateStore()
        source: LocalConfigSource | KubeSource
        if cfg.kubernetes:
            from agent.sources.kube_source import KubeSource, api_client_from

            source = KubeSource(config_store, cfg.node, api_client_from(cfg.kubeconfig),
                                trust_domain=cfg.trust_domain)  # fmt: skip
            await asyncio.to_thread(source.load_initial)  # a full first list, or no start
        else:
            assert cfg.config_file is not None
            source = LocalConfigSource(cfg.config_file, config_store)
            source.load_initial()  # a broken config at start is fatal; later ones are rejected
        status.source = source
        cni_pods = CniPods(cfg.node_state_dir / "cni-pods.json")
        for gone in cni_pods.forget_vanished():
            log.info("CNI pod gone while the agent was away", container=gone)
        store = status.store = StateStore(
            with_cni_pods(config_store.current, cni_pods.all(), cfg.node)
        )

        def publish() -> None:
            store.replace(with_cni_pods(config_store.current, cni_pods.all(), cfg.node))

        config_store.subscribe(lambda old, new: publish())

        ca = CertificateAuthority.load_or_create(cfg.ca_dir, cfg.trust_domain)
        identities = status.identities = IdentityManager(
            LocalCaClient(ca, cfg.certificate_ttl), ca.root_pem
        )
        undo("certificates", identities.close)

        datapath = await asyncio.to_thread(
            loader.load, cfg.pin_dir, cfg.node_state_dir / "datapath.json"
        )
        handing_over = cfg.on_exit == "keep"
        undo("programs and pins", lambda: datapath.close(unpin=not handing_over))
        status.datapath = datapath
        log.info("datapath loaded", pin_dir=str(cfg.pin_dir), adopted=datapath.adopted,
                 carried_over=datapath.carried_over, refilled=datapath.refilled,
                 programs=list(datapath.program_fds))  # fmt: skip
        cgroup = AgentCgroup(cfg.cgroup_instance)
        cgroup.enter()
        undo("agent cgroup", cgroup.leave)
        undo("telemetry of open connections", lambda: self.telemetry.expire(everything=True))
        datapath.attach_cgroup(cgroup.fd)
        undo("cgroup programs", lambda: datapath.detach_cgroup(cgroup.fd))
        ring = RingReader(datapath, self.telemetry.kernel_closed, asyncio.get_running_loop())
        ring.start()
        undo("telemetry ring", ring.stop)

        policy = status.policy = PolicyEngine(PolicyMaps(datapath))
        undo("policy retirement timer", policy.close)
        proxy = InPodProxy(store, identities, policy, self.telemetry, cfg.dns_capture)
        status.refusals = proxy.hbone_refusals
        status.hbone_data_path = data_path.probe()
        log.info("hbone data path", **status.hbone_data_path.labels())
        status.vip_refusals = proxy.vip_refusals
        status.waypoint_skips = proxy.waypoint_skipped
        status.bypasses = proxy.waypoint_bypasses.counts
        status.local_delivery_counts = proxy.local_deliveries
        status.socket_relay_counts = proxy.socket_relays
        status.dns_counts = proxy.dns_counts
        undo("HBONE client pool", proxy.close)
        enroller = status.enroller = PodEnroller(
            datapath, cfg.node_state_dir, proxy, cfg.dns_capture
        )
        if handing_over:
            undo("pod listeners (pods stay enrolled for the next agent)", enroller.release_all)
        else:
            undo("pod enrollments", enroller.unenroll_all)
        undo("pod connections", lambda: enroller.drain_connections(cfg.drain_grace))
        reconciler = status.reconciler = Reconciler(
            cfg.node, store, enroller, policy, self.telemetry,
            proxy.live_connections if cfg.cut_denied_connections else None,
        )  # fmt: skip
        await enroller.recover(keep={w.uid for w in reconciler.wanted(store.current)})
        await reconciler.reconcile()

        if cfg.cni_socket is not None:
            answers = CniAnswers(reconciler, enroller, cni_pods, publish, status.not_ready)
            cni_server = CniServer(cfg.cni_socket, answers.answer)
            await cni_server.start()
            # New pods wait (the plugin retries) for the next agent.
            undo("CNI socket", cni_server.close)
        tasks = Drain("agent tasks")
        tasks.spawn(source.run(self.stopping), name="state source")
        tasks.spawn(reconciler.follow(self.stopping), name="reconcile")
        tasks.spawn(self.telemetry.expire_every(1.0, self.stopping), name="telemetry expiry")
        undo("state source, reconcile and telemetry tasks", lambda: tasks.close(cfg.drain_grace))
        if cfg.ready_file is not None:
            ready_file = cfg.ready_file
            ready_file.write_text(f"{len(enroller.pods)}\n")
            undo("ready file", lambda: ready_file.unlink(missing_ok=True))
        log.info("agent ready", node=cfg.node, enrolled=len(enroller.pods),
                 failed=reconciler.failures)  # fmt: skip
        await self.stopping.wait()
        log.info("agent stopping", node=cfg.node)
        return reconciler.failures


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
