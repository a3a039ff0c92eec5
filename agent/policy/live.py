"""Live inbound connections, as a policy re-check sees them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from agent.identity.spiffe import SpiffeId


@dataclass(frozen=True, eq=False)
class LiveConnection:
    """An inbound connection being relayed to a pod's app."""

    pod: str
    src_ip: str
    dst_ip: str
    dst_port: int
    peer: SpiffeId | None  # the identity verified in TLS; None for plaintext
    cut: Callable[[], None]  # reset both sides
