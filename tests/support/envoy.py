"""The Envoy harness for interop tests: bench/envoy_hbone.py's `Envoy` (shared with the
data-path bench) plus what only tests need.

Each instance gets its own work directory (config, log, admin address file), no hot restart
(`--disable-hot-restart`: several Envoys never share its shared memory or domain sockets), an
admin listener on 127.0.0.1 with a kernel-chosen port, and listeners
that may bind port 0: the ports they got are read back from the admin API once Envoy is
ready. `stop()` terminates, then kills; `Envoy` is a context manager so a test cannot leave
one running.
"""

from __future__ import annotations

import socket
import time

from bench import envoy_hbone
from bench.envoy_hbone import JsonObject

__all__ = ["Envoy", "JsonObject", "free_port"]


def free_port() -> int:
    """A port that was free a moment ago (for our own servers prefer binding port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Envoy(envoy_hbone.Envoy):
    def wait_for_file_line(self, name: str, needle: str, timeout: float = 5.0) -> str:
        """The first line of workdir/name containing needle, waiting for Envoy to flush it."""
        deadline = time.monotonic() + timeout
        while True:
            for line in self.read_file(name).splitlines():
                if needle in line:
                    return line
            if time.monotonic() >= deadline:
                raise AssertionError(
                    f"no line with {needle!r} in {self.workdir / name} after {timeout} s:\n"
                    f"{self.read_file(name)}\n{self.log_tail()}"
                )
            time.sleep(0.05)
