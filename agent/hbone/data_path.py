"""Which data path carries HBONE bytes on this node, found out at start and reported (/metrics
`ambient_hbone_data_path_info`, /config_dump `data_path`, `ambientctl status`).

Cross-node bytes are encrypted in userspace (OpenSSL through `ssl.SSLSocket`, TLS 1.3 with
AES-128-GCM first). Kernel TLS would let the kernel encrypt and `splice` move payload without
copies, but Python's `ssl` cannot hand a session to it (OpenSSL 3.0 offloads TLS 1.3 transmit
only, and only for sockets it owns): the agent probes for it and says whether the kernel has it,
so an operator knows what a future path could use. Same-node connections are relayed without
TLS (agent/proxy/outbound.py).
"""

from __future__ import annotations

import contextlib
import errno
import socket
import ssl
from dataclasses import dataclass

from agent.identity.openssl_tuning import FIRST, prefer_aes_128

TCP_ULP = 31  # linux/tcp.h


@dataclass(frozen=True, slots=True)
class DataPath:
    tls: str  # who encrypts: "userspace"
    library: str  # e.g. "OpenSSL 3.0.15 19 Sep 2023"
    first_cipher: str  # what the agent's contexts offer first
    ktls: str  # "available", "unavailable" (the kernel has no TLS ULP) or "unknown"

    def labels(self) -> dict[str, str]:
        return {
            "tls": self.tls,
            "library": self.library,
            "first_cipher": self.first_cipher,
            "ktls": self.ktls,
        }


def probe() -> DataPath:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    first = FIRST if prefer_aes_128(context) else context.get_ciphers()[0]["name"]
    return DataPath("userspace", ssl.OPENSSL_VERSION, first, _ktls())


def _ktls() -> str:
    """Whether the kernel takes the "tls" upper-layer protocol on a TCP socket (it loads the
    module on demand); needs a connected socket, so one is made over loopback."""
    try:
        with contextlib.ExitStack() as stack:
            listener = stack.enter_context(socket.socket())
            listener.bind(("127.0.0.1", 0))
            listener.listen(1)
            client = stack.enter_context(socket.create_connection(listener.getsockname(), 1))
            accepted, _ = listener.accept()
            stack.enter_context(accepted)
            client.setsockopt(socket.IPPROTO_TCP, TCP_ULP, b"tls")
    except OSError as exc:
        return "unavailable" if exc.errno in (errno.ENOENT, errno.EOPNOTSUPP) else "unknown"
    return "available"
