"""Workloads, in the shape of ztunnel's local config."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Protocol(StrEnum):
    HBONE = "HBONE"  # in the mesh: traffic is captured and tunnelled
    TCP = "TCP"  # out of the mesh: plain TCP, never captured


@dataclass(frozen=True, slots=True)
class Workload:
    uid: str
    name: str
    namespace: str
    service_account: str
    ips: tuple[str, ...]
    protocol: Protocol
    node: str
    # Where this node's agent finds the pod: the netns path and interface. In a cluster the
    # CNI plugin reports them; in a local config they are written down.
    netns: str | None = None
    interface: str = "eth0"

    @property
    def captured(self) -> bool:
        return self.protocol is Protocol.HBONE

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"
