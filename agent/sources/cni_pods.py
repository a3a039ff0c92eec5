"""Pods that `ambient-cni` announced on this node, and how they join the mesh state.

The CNI plugin knows what the runtime knows: the sandbox's netns and interface, the addresses
the primary plugin assigned, and the pod's namespace, name and uid (CNI_ARGS). The mesh state
knows the rest: whether the namespace is in ambient mode, and (when a source declared the
pod) its service account, labels and services. with_cni_pods() joins the two into workloads
the agent enrolls like any other. The registry is kept on disk, so an agent that restarts
keeps its pods and lets go of those whose sandbox is gone meanwhile.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import structlog

from agent.state.namespace import ambient_enrolled
from agent.state.store import MeshState
from agent.state.workload import DEFAULT_TRUST_DOMAIN, Protocol, Workload

log = structlog.get_logger("agent.cni")


@dataclass(frozen=True, slots=True)
class CniPod:
    container_id: str
    netns: str
    interface: str
    namespace: str
    name: str
    uid: str
    ips: tuple[str, ...]

    @property
    def workload_uid(self) -> str:
        return self.uid or f"cni//{self.container_id}"


class CniPods:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._pods: dict[str, CniPod] = {}
        if path.exists():
            try:
                self._pods = {pod.container_id: pod for pod in _read_records(path)}
            except (OSError, ValueError, TypeError, KeyError) as exc:
                # A damaged file must not stop the agent: it starts with none (all or
                # nothing), and the runtime's next GC or CHECK tells it again.
                log.error("CNI pod records unreadable; starting without them",
                          path=str(path), error=str(exc))  # fmt: skip

    def all(self) -> tuple[CniPod, ...]:
        return tuple(self._pods.values())

    def get(self, container_id: str) -> CniPod | None:
        return self._pods.get(container_id)

    def add(self, pod: CniPod) -> None:
        self._pods[pod.container_id] = pod
        self._save()

    def remove(self, container_id: str) -> CniPod | None:
        pod = self._pods.pop(container_id, None)
        if pod is not None:
            self._save()
        return pod

    def keep_only(self, valid: Iterable[str]) -> list[str]:
        """The runtime's garbage collection: forget every container not in valid."""
        keep = set(valid)
        gone = [cid for cid in self._pods if cid not in keep]
        for cid in gone:
            del self._pods[cid]
        if gone:
            self._save()
        return gone

    def forget_vanished(self) -> list[str]:
        """After a restart: pods whose netns no longer exists were deleted while we were
        away (their DEL found no agent)."""
        gone = [cid for cid, pod in self._pods.items() if not os.path.exists(pod.netns)]
        for cid in gone:
            del self._pods[cid]
        if gone:
            self._save()
        return gone

    def _save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_suffix(".partial")
        partial.write_text(json.dumps([asdict(p) for p in self._pods.values()], indent=1))
        partial.replace(self.path)


def _read_records(path: Path) -> list[CniPod]:
    records = json.loads(path.read_text())
    if not isinstance(records, list):
        raise ValueError("not a list of pods")
    pods = []
    for raw in records:
        ips = raw["ips"]
        if not isinstance(ips, list) or not all(isinstance(ip, str) for ip in ips):
            raise ValueError(f"ips of {raw.get('container_id')!r} is not a list of addresses")
        pod = CniPod(**{**raw, "ips": tuple(ips)})
        if not all(isinstance(getattr(pod, f), str) for f in _TEXT_FIELDS):
            raise ValueError(f"record of {pod.container_id!r} has a field that is not text")
        pods.append(pod)
    return pods


_TEXT_FIELDS = ("container_id", "netns", "interface", "namespace", "name", "uid")


def with_cni_pods(state: MeshState, pods: Iterable[CniPod], node: str) -> MeshState:
    """The state with the CNI-announced pods as workloads of `node`: captured (HBONE) when
    their namespace is in ambient mode and they did not opt out, or when a source declared
    them in the mesh; otherwise known as out-of-mesh workloads."""
    workloads = {w.uid: w for w in state.workloads}
    # The first workload of each namespace/name, as a source declared it.
    by_name: dict[tuple[str, str], Workload] = {}
    for workload in state.workloads:
        by_name.setdefault((workload.namespace, workload.name), workload)
    for pod in pods:
        namespace = pod.namespace or "default"  # a runtime that named none: Kubernetes' default
        declared = by_name.get((namespace, pod.name))
        labels = dict(declared.labels) if declared else {}
        in_mesh = ambient_enrolled(state.namespace(namespace), labels) or bool(
            declared and declared.captured
        )
        workload = Workload(
            uid=pod.workload_uid,
            name=pod.name or pod.container_id[:12],
            namespace=namespace,
            service_account=declared.service_account if declared else "default",
            ips=pod.ips,
            protocol=Protocol.HBONE if in_mesh else Protocol.TCP,
            node=node,
            netns=pod.netns,
            interface=pod.interface or "eth0",
            trust_domain=declared.trust_domain if declared else DEFAULT_TRUST_DOMAIN,
            services=declared.services if declared else {},
            labels=labels,
        )
        if declared is not None:
            workloads.pop(declared.uid, None)
        workloads[workload.uid] = workload
    return dataclasses.replace(state, workloads=tuple(workloads.values()))
