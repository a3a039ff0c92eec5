"""The one place that wires the agent together and runs its single shutdown path."""

from __future__ import annotations

import asyncio
import signal

import structlog

from agent.config import AgentConfig
from agent.datapath import loader
from agent.inpod.enrollment import EnrollmentError, PodEnroller
from agent.state.local_config import load_local_config

log = structlog.get_logger("agent")


class NodeAgent:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.stopping = asyncio.Event()

    def stop(self, sig: signal.Signals) -> None:
        log.info("signal received", signal=sig.name)
        self.stopping.set()

    async def run(self) -> int:
        cfg = self.config
        loader.preflight()
        state = load_local_config(cfg.config_file)
        datapath = await asyncio.to_thread(loader.LoadedDatapath, cfg.pin_dir)
        log.info("datapath loaded", pin_dir=str(cfg.pin_dir), programs=list(datapath.program_fds))
        enroller = PodEnroller(datapath, cfg.state_dir / cfg.node)
        failures = 0
        try:
            local = [w for w in state.workloads if w.node == cfg.node and w.captured]
            await enroller.recover(keep={w.uid for w in local})
            for workload in local:
                try:
                    await enroller.enroll(workload)
                except EnrollmentError as exc:
                    failures += 1
                    log.error("pod not enrolled", error=str(exc))
            if cfg.ready_file is not None:
                cfg.ready_file.write_text(f"{len(enroller.pods)}\n")
            log.info("agent ready", node=cfg.node, enrolled=len(enroller.pods), failed=failures)
            await self.stopping.wait()
            log.info("agent stopping", node=cfg.node)
        finally:
            for pod in enroller.pods.values():
                for server in pod.servers:
                    server.close()
            for pod in enroller.pods.values():
                cancelled = await pod.connections.close(cfg.drain_grace)
                if cancelled:
                    log.warning(
                        "connections cut at shutdown", pod=pod.workload.key, count=cancelled
                    )
            await enroller.unenroll_all()
            datapath.close(unpin=not cfg.keep_pins)
            if cfg.ready_file is not None:
                cfg.ready_file.unlink(missing_ok=True)
            log.info("agent stopped", node=cfg.node)
        return 1 if failures else 0


def run_agent(config: AgentConfig) -> int:
    async def main() -> int:
        agent = NodeAgent(config)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, agent.stop, sig)
        return await agent.run()

    return asyncio.run(main())
