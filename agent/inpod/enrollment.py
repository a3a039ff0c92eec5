"""Enroll and unenroll pods: listeners, routing, tc programs and the pods map entry.

Enrolling is idempotent and ordered so capture starts last (the tc programs), once the
listeners that capture hands connections to and the pod's map entry exist. Unenrolling runs
the other way round: the map entry goes first, so capture stops at once. A record of what
was changed is written before the changes, so a restarted agent can undo the work of one
that crashed, or adopt the pod as it is.

Adopting (enrolling a pod an earlier agent left enrolled) changes nothing in the kernel that
the pod's traffic depends on: the tc filters are replaced in one netlink call (by the same
programs, or by new ones whose maps already hold the pod), so capture never stops; while no
agent listens, the programs drop the pod's new connections (DROP_NO_LISTENER). A workload
change that keeps the pod's netns, interface and addresses is applied in place.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import os
import socket
import typing
from collections.abc import Coroutine
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import structlog

from agent.datapath import abi, tc
from agent.datapath.loader import LoadedDatapath
from agent.drain import Drain, Undo, run_step
from agent.inpod import routing, sockets
from agent.netns import NetnsWorker
from agent.state.workload import Protocol, Workload

log = structlog.get_logger("agent.enrollment")

UNENROLL_GRACE = 1.0

# (port, IP_TRANSPARENT): the capture listeners take connections for foreign addresses.
LISTENERS: tuple[tuple[int, bool], ...] = (
    (abi.PORT_OUTBOUND, True),
    (abi.PORT_INBOUND, True),
    (abi.PORT_HBONE, False),
)


class EnrollmentError(Exception):
    pass


class Listening(typing.Protocol):
    """A server on one of the pod's listeners (asyncio's, or agent/hbone/tls_transport.py's)."""

    def close(self) -> None: ...


class PodTraffic(typing.Protocol):
    """What serves an enrolled pod's captured connections: the in-pod proxy
    (agent/proxy/inpod_proxy.py), which app.py hands in."""

    async def serve(
        self, pod: EnrolledPod, listeners: dict[int, socket.socket]
    ) -> list[Listening]: ...
    async def change_identity(self, pod: EnrolledPod) -> None: ...
    def release(self, pod: EnrolledPod) -> None: ...


@dataclass
class EnrollmentRecord:
    uid: str
    netns: str
    interface: str
    ips: list[str]
    created_clsact: bool = False
    sysctls: dict[str, str] = field(default_factory=dict)


@dataclass
class EnrolledPod:
    workload: Workload
    worker: NetnsWorker
    record: EnrollmentRecord
    servers: list[Listening] = field(default_factory=list)
    listen_sockets: list[socket.socket] = field(default_factory=list)
    # pod_lookup's link on the pod's netns (it hands the listeners SYNs that reopen a 4-tuple)
    lookup_link: int | None = None
    connections: Drain = field(default_factory=Drain)

    def spawn(self, coro: Coroutine[Any, Any, None]) -> object:
        return self.connections.spawn(coro)

    @property
    def name(self) -> str:
        return self.workload.name

    @property
    def namespace(self) -> str:
        return self.workload.namespace


def _close_listeners(pod: EnrolledPod) -> None:
    if pod.lookup_link is not None:
        os.close(pod.lookup_link)
        pod.lookup_link = None
    for server in pod.servers:
        server.close()
    for sock in pod.listen_sockets:
        sock.close()  # those no server took over yet (closing takes it out of pod_listeners)


def pod_key_addr(ip: str) -> int:
    """struct pod_key.addr holds the address in network order; ctypes writes host order."""
    return int.from_bytes(socket.inet_aton(ip), "little")


class PodEnroller:
    def __init__(
        self, datapath: LoadedDatapath, state_dir: Path, proxy: PodTraffic, dns_capture: bool = True
    ) -> None:
        """dns_capture: steer the pods' UDP DNS queries to the proxy's 15053 as well."""
        self._datapath = datapath
        self._proxy = proxy
        self._capture_flags = abi.POD_CAPTURE | (abi.POD_CAPTURE_DNS if dns_capture else 0)
        self._records_dir = state_dir / "pods"
        self._records_dir.mkdir(parents=True, exist_ok=True)
        self.pods: dict[str, EnrolledPod] = {}

    def _record_path(self, uid: str) -> Path:
        return self._records_dir / (uid.replace("/", "_") + ".json")

    @staticmethod
    def _load_record(path: Path) -> EnrollmentRecord | None:
        try:
            return EnrollmentRecord(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            return None

    def _save_record(self, record: EnrollmentRecord) -> None:
        path = self._record_path(record.uid)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(record)))
        tmp.replace(path)

    def _ipv4s(self, workload: Workload) -> list[str]:
        ips = [ip for ip in workload.ips if ipaddress.ip_address(ip).version == 4]
        if not ips:
            raise EnrollmentError(f"{workload.key}: no IPv4 address (the datapath is IPv4 only)")
        return ips

    async def enroll(self, workload: Workload) -> None:
        if workload.uid in self.pods:
            return
        if workload.netns is None:
            raise EnrollmentError(f"{workload.key}: no network namespace known for the pod")
        ips = self._ipv4s(workload)
        if (holder := self._holder_of(workload.netns)) is not None:
            # Enrolling would take the holder's ports and share its routing, which undoing a
            # failure would remove: refused before any step.
            raise EnrollmentError(
                f"{workload.key}: network namespace {workload.netns} belongs to the enrolled "
                f"pod {holder.workload.key}"
            )
        try:
            worker = NetnsWorker(workload.netns)
        except OSError as exc:
            raise EnrollmentError(f"{workload.key}: {exc}") from exc
        earlier = self._load_record(self._record_path(workload.uid))
        record = EnrollmentRecord(
            uid=workload.uid,
            netns=workload.netns,
            interface=workload.interface,
            ips=ips,
            created_clsact=earlier.created_clsact if earlier else False,
            sysctls=earlier.sysctls if earlier else {},
        )
        pod = EnrolledPod(workload, worker, record)
        try:
            await self._setup(pod, earlier)
        except BaseException as exc:
            # Each failed step is logged; this one counts. A pod an earlier agent enrolled
            # stays captured: without listeners its connections fail, never go out plain.
            with contextlib.suppress(Exception):
                await (self._release(pod) if earlier else self._teardown(pod))
            if isinstance(exc, (OSError, ValueError)):
                raise EnrollmentError(f"{workload.key}: enrolling failed: {exc}") from exc
            raise
        self.pods[workload.uid] = pod
        log.info("pod enrolled", pod=workload.key, ips=ips, netns=workload.netns)

    def _holder_of(self, netns: str) -> EnrolledPod | None:
        """The enrolled pod in that netns (the same namespace under any path), if any."""
        try:
            wanted = os.stat(netns)
        except OSError:
            return None  # no such netns: enrolling fails on its own, touching nothing
        for pod in self.pods.values():
            with contextlib.suppress(OSError):
                held = os.stat(pod.record.netns)
                if (held.st_dev, held.st_ino) == (wanted.st_dev, wanted.st_ino):
                    return pod
        return None

    async def _setup(self, pod: EnrolledPod, earlier: EnrollmentRecord | None) -> None:
        record = pod.record
        self._save_record(record)  # before any change: a crash from here on is recoverable
        by_port = {}
        for port, transparent in LISTENERS:
            try:
                sock = await pod.worker.run(sockets.listener, port, transparent)
            except OSError as exc:
                raise OSError(exc.errno, f"cannot listen on {port} in the pod: {exc}") from exc
            pod.listen_sockets.append(sock)
            by_port[port] = sock
        self._register_listeners(record.ips, by_port)
        pod.lookup_link = self._datapath.attach_netns(record.netns)
        pod.servers = await self._proxy.serve(pod, by_port)
        record.sysctls = await asyncio.to_thread(
            routing.apply, pod.worker, record.interface, earlier.sysctls if earlier else None
        )
        self._save_record(record)
        pods = self._datapath.table("pods")
        for ip in record.ips:
            key = pods.Key(addr=pod_key_addr(ip))
            value = pods.get(key) or pods.Leaf()
            # Set, not added to: an adopted pod gets this agent's DNS setting.
            value.flags = self._capture_flags
            pods[key] = value
        created = await asyncio.to_thread(
            tc.attach,
            pod.worker,
            record.interface,
            self._datapath.program_fds["pod_ingress"],
            self._datapath.program_fds["pod_egress"],
        )
        record.created_clsact = record.created_clsact or created
        self._save_record(record)

    def _register_listeners(self, ips: list[str], by_port: dict[int, socket.socket]) -> None:
        """The capture listeners in pod_listeners, for pod_lookup."""
        listeners = self._datapath.table("pod_listeners")
        for ip in ips:
            for port in (abi.PORT_OUTBOUND, abi.PORT_INBOUND):
                key = listeners.Key(addr=pod_key_addr(ip), port=port)
                listeners[key] = listeners.Leaf(by_port[port].fileno())

    async def update(self, workload: Workload) -> bool:
        """Apply a changed workload to its enrolled pod in place, when the change leaves the
        pod's netns, interface and addresses as they are (labels, names, services, waypoint,
        identity): live connections and capture go on; a new identity is presented to new
        HBONE handshakes. False when it cannot be done so (the pod moved)."""
        pod = self.pods.get(workload.uid)
        if pod is None:
            return False
        old = pod.workload
        if (old.netns, old.interface, old.ips) != (workload.netns, workload.interface,
                                                   workload.ips):  # fmt: skip
            return False
        pod.workload = workload
        identity = (workload.trust_domain, workload.namespace, workload.service_account)
        if identity != (old.trust_domain, old.namespace, old.service_account):
            try:
                await self._proxy.change_identity(pod)
            except Exception:
                pod.workload = old  # enrolled afresh instead, by the caller
                raise
            log.info("pod identity changed in place", pod=workload.key,
                     service_account=workload.service_account)  # fmt: skip
        return True

    async def unenroll(self, uid: str) -> None:
        pod = self.pods.pop(uid, None)
        if pod is None:
            return
        await self._teardown(pod)
        log.info("pod unenrolled", pod=pod.workload.key)

    async def _teardown(self, pod: EnrolledPod) -> None:
        """Undo whatever part of enrollment happened; each step tolerates absence, and each
        runs even when an earlier one failed (the first failure is raised at the end)."""
        record = pod.record
        failures: list[Exception] = []

        async def step(name: str, undo: Undo) -> None:
            if (failure := await run_step(name, undo, pod=pod.workload.key)) is not None:
                failures.append(failure)

        await step("pods map entry", lambda: self._forget_addresses(record.ips))
        await step("tc programs", lambda: asyncio.to_thread(
            tc.detach, pod.worker, record.interface, record.created_clsact))  # fmt: skip
        if record.sysctls:
            sysctls = record.sysctls
            await step("routing", lambda: asyncio.to_thread(routing.remove, pod.worker, sysctls))
        try:
            await self._release(pod)
        except Exception as exc:
            failures.append(exc)
        await step("record", lambda: self._record_path(record.uid).unlink(missing_ok=True))
        if failures:
            raise failures[0]

    async def _release(self, pod: EnrolledPod) -> None:
        """Let go of what this process holds for the pod (listeners, proxy, connections,
        netns thread) and nothing in the kernel: capture, policy and the record stay."""
        failures: list[Exception] = []
        for name, undo in (
            ("listeners", lambda: _close_listeners(pod)),
            ("proxy", lambda: self._proxy.release(pod)),
            ("connections", lambda: pod.connections.close(UNENROLL_GRACE)),
            ("netns worker", pod.worker.close),
        ):
            if (failure := await run_step(name, undo, pod=pod.workload.key)) is not None:
                failures.append(failure)
        if failures:
            raise failures[0]

    async def release_all(self) -> None:
        """At an exit that hands the node to the next agent: every pod stays enrolled in the
        kernel (its new connections are dropped until the next agent listens)."""
        failures: list[Exception] = []
        for uid in list(self.pods):
            try:
                await self._release(self.pods.pop(uid))
            except Exception as exc:
                failures.append(exc)
        if failures:
            raise failures[0]

    def _forget_addresses(self, ips: list[str]) -> None:
        pods = self._datapath.table("pods")
        for ip in ips:
            with contextlib.suppress(KeyError):
                del pods[pods.Key(addr=pod_key_addr(ip))]

    async def drain_connections(self, grace: float) -> None:
        """At shutdown: stop accepting on every pod's listeners, then let their connections
        finish, up to `grace`."""
        for pod in self.pods.values():
            for server in pod.servers:
                server.close()
        for pod in self.pods.values():
            cancelled = await pod.connections.close(grace)
            if cancelled:
                log.warning("connections cut at shutdown", pod=pod.workload.key,
                            count=cancelled)  # fmt: skip

    async def unenroll_all(self) -> None:
        """Every pod, even when one of them fails (the first failure is raised at the end)."""
        failures: list[Exception] = []
        for uid in list(self.pods):
            try:
                await self.unenroll(uid)
            except Exception as exc:
                failures.append(exc)
        if failures:
            raise failures[0]

    async def recover(self, keep: set[str]) -> None:
        """Undo enrollments a previous agent left behind for pods no longer wanted; the
        wanted ones stay as they are, to be adopted. Pod map entries no record accounts for
        go too."""
        kept_ips: set[str] = set()
        for path in self._records_dir.glob("*.json"):
            record = self._load_record(path)
            if record is not None and record.uid in keep:
                kept_ips.update(record.ips)
        pods = self._datapath.table("pods")
        for key in list(pods):
            if socket.inet_ntoa(int(key.addr).to_bytes(4, "little")) not in kept_ips:
                with contextlib.suppress(KeyError):
                    del pods[key]
        for path in self._records_dir.glob("*.json"):
            record = self._load_record(path)
            if record is None:
                path.unlink()  # unreadable: written halfway when an agent died
                continue
            if record.uid in keep:
                continue
            log.info("removing enrollment left by an earlier run", uid=record.uid)
            try:
                worker = NetnsWorker(record.netns)
            except OSError:
                path.unlink()  # the pod's netns is gone, and with it all we changed there
                continue
            orphan = Workload(
                uid=record.uid, name=record.uid, namespace="", service_account="",
                ips=tuple(record.ips), protocol=Protocol.HBONE, node="", netns=record.netns,
                interface=record.interface,
            )  # fmt: skip
            await self._teardown(EnrolledPod(orphan, worker, record))
