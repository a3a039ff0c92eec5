"""A lab with the agent running in-process, for tests that need to reach into it (enroll and
unenroll at will, swap mesh state, rotate certificates, read the access log).

Wired as agent/app.py wires it: a state store fed from the lab's local config, a CA (held in
memory here), the identity manager, the datapath, the in-pod proxy and the enroller, all on
an event loop in a background thread. tests/e2e/test_lab.py runs real agent processes.
"""

from __future__ import annotations

import asyncio
import subprocess
import threading
import time
import uuid
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import structlog
import yaml
from structlog.testing import LogCapture

from agent.ctl import read_pods, read_verdicts
from agent.datapath.loader import LoadedDatapath
from agent.identity.ca import CertificateAuthority
from agent.identity.manager import IdentityManager, LocalCaClient
from agent.inpod.enrollment import PodEnroller
from agent.policy.engine import PolicyEngine
from agent.policy.kernel_maps import PolicyMaps
from agent.proxy.inpod_proxy import InPodProxy
from agent.sources.authorization_policy import parse_policies
from agent.sources.local_config import parse_local_config
from agent.sources.local_source import mesh_state_of
from agent.state.store import MeshState, StateStore
from agent.state.workload import Workload
from agent.telemetry.connections import ConnectionTelemetry
from lab import agents, probes
from lab.network import LabNetwork, LabState, PodState
from lab.topology import default_topology

T = TypeVar("T")
APP = 8080


class LoopThread:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=timeout)

    def call(self, fn: Any, *args: Any) -> Any:
        async def inside() -> Any:
            return fn(*args)

        return self.run(inside())

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()


@dataclass
class Mesh:
    state: LabState
    store: StateStore
    ca: CertificateAuthority
    identities: IdentityManager
    datapath: LoadedDatapath
    proxy: InPodProxy
    enroller: PodEnroller
    loop: LoopThread
    workloads: dict[str, Workload]
    logs: LogCapture
    policy: PolicyEngine

    def set_policies(self, documents: list[dict[str, Any]]) -> None:
        """Put policies in the state and into the kernel, as the agent's reconcile does."""
        current = self.store.current
        state = MeshState(current.workloads, current.services, parse_policies(documents))
        self.loop.call(self.store.replace, state)
        destinations = [pod.workload for pod in self.enroller.pods.values()]
        self.loop.run(self.policy.apply(state, destinations))

    def enroll(self, pod: str) -> None:
        self.loop.run(self.enroller.enroll(self.workloads[pod]))

    def unenroll(self, pod: str) -> None:
        self.loop.run(self.enroller.unenroll(self.workloads[pod].uid))

    def pod(self, name: str) -> PodState:
        return probes.pod(self.state, name)

    def verdicts(self) -> dict[str, int]:
        return read_verdicts(self.datapath.pin_dir)

    def pod_counters(self, name: str) -> dict[str, Any]:
        ip = self.pod(name).ip
        return next(p for p in read_pods(self.datapath.pin_dir) if p["ip"] == ip)

    def events(self, event: str, **fields: Any) -> list[dict[str, Any]]:
        wanted = {k.replace("__", "."): v for k, v in fields.items()}
        return [
            dict(e)
            for e in list(self.logs.entries)
            if e.get("event") == event and all(e.get(k) == v for k, v in wanted.items())
        ]

    def wait_events(self, event: str, timeout: float = 5.0, **fields: Any) -> list[dict[str, Any]]:
        """events(), waiting up to `timeout` for at least one: access lines are written when
        the agent's side of a connection finishes, a moment after the client's."""
        deadline = time.monotonic() + timeout
        while not (found := self.events(event, **fields)) and time.monotonic() < deadline:
            time.sleep(0.02)
        return found


def mesh_fixture(prefix: str) -> Iterator[Mesh]:
    name = prefix + uuid.uuid4().hex[:6]
    network = LabNetwork(name)
    logs = LogCapture()
    structlog.configure(processors=[logs])
    loop = LoopThread()
    datapath = None
    enroller = proxy = identities = None
    try:
        state = network.up(default_topology())
        datapath = LoadedDatapath(agents.lab_pin_root(name) / "test")
        config = parse_local_config(yaml.safe_dump(agents.mesh_config(state)), "lab")
        store = StateStore(mesh_state_of(config))
        ca = CertificateAuthority.create("cluster.local")
        identities = IdentityManager(LocalCaClient(ca, timedelta(hours=1)), ca.root_pem)

        # As agent/app.py wires it, less the agent cgroup: agent_connect4 is not attached
        # in-process, so HBONE connects are not authorized here (the lab tests cover that).
        policy = PolicyEngine(PolicyMaps(datapath))

        async def build() -> tuple[InPodProxy, PodEnroller]:
            assert datapath is not None and identities is not None
            # One agent here serves the pods of both lab nodes, and these tests are about HBONE
            # between them: no same-node delivery (tests/e2e/test_local_delivery.py has it).
            telemetry = ConnectionTelemetry(kernel_records=False)
            made = InPodProxy(store, identities, policy, telemetry, local_delivery=False)
            return made, PodEnroller(datapath, Path(f"/run/ambient-lab/{name}/state"), made)

        proxy, enroller = loop.run(build())
        workloads = {w.name: w for w in config.workloads}
        mesh = Mesh(state, store, ca, identities, datapath, proxy, enroller, loop, workloads,
                    logs, policy)  # fmt: skip
        for pod in ("client-a", "server-a", "server-b", "client-b"):
            mesh.enroll(pod)
        yield mesh
    finally:
        if enroller is not None:
            loop.run(enroller.unenroll_all())
        if proxy is not None:
            loop.run(proxy.close())
        if identities is not None:
            loop.run(identities.close())
        if datapath is not None:
            datapath.close(unpin=True)
        loop.close()
        structlog.reset_defaults()
        network.down()
        subprocess.run(["rm", "-rf", f"/run/ambient-lab/{name}"], check=False)


def whoami_everywhere(mesh: Mesh) -> Iterator[None]:
    """whoami on APP in the out-of-mesh pod and in both server pods."""
    with (
        probes.whoami_server(mesh.pod("outsider"), APP),
        probes.whoami_server(mesh.pod("server-b"), APP),
        probes.whoami_server(mesh.pod("server-a"), APP),
    ):
        yield
