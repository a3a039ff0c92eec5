"""A fake Kubernetes API server for tests: recorded list answers and watch streams on the
REST paths the real client calls (see tests/unit/sources/test_kube_source.py for what it is and why:
no API server can run on these machines)."""

from __future__ import annotations

import json
import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from agent.sources.kube_source import Timings

RECORDED = Path(__file__).parent / "kube_recorded"
NODE = "node-1"

PODS = "/api/v1/pods"
NAMESPACES = "/api/v1/namespaces"
SERVICES = "/api/v1/services"
ENDPOINT_SLICES = "/apis/discovery.k8s.io/v1/endpointslices"
AUTHORIZATION_POLICIES = "/apis/security.istio.io/v1/authorizationpolicies"
GATEWAYS = "/apis/gateway.networking.k8s.io/v1/gateways"
HTTP_ROUTES = "/apis/gateway.networking.k8s.io/v1/httproutes"

# Short everything, so that each test runs in well under a second or two.
FAST = Timings(
    debounce=0.02,
    watch_timeout=30,
    missing_retry_interval=0.1,
    backoff_initial=0.05,
    backoff_max=0.4,
    connect_timeout=2.0,
    list_read_timeout=5.0,
    initial_timeout=5.0,
    stop_grace=2.0,
)


def recorded_list(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((RECORDED / "lists" / name).read_text())
    return loaded


def recorded_events(name: str) -> list[dict[str, Any]]:
    text = (RECORDED / "watch" / name).read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


# --- the fake API server ----------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    path: str
    query: dict[str, str]
    at: float  # time.monotonic()

    @property
    def watch(self) -> bool:
        return self.query.get("watch") == "true"


_END = object()  # queued on a path: end the watch open there (or the next one)


def status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


@dataclass
class FakeApiServer:
    """Answers GETs on the collection paths: lists (paged with limit/continue), watches
    (chunked JSON lines), 404 for what is not installed, and any status when told to fail."""

    lists: dict[str, dict[str, Any]] = field(default_factory=dict)
    failing: int | None = None  # every request answered with this status
    host: str = "127.0.0.1"  # where start() listens
    requests: list[Request] = field(default_factory=list)
    _events: dict[str, queue.Queue[object]] = field(default_factory=dict)
    _open_watches: dict[str, int] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _stopping: threading.Event = field(default_factory=threading.Event)
    _server: ThreadingHTTPServer | None = None

    @classmethod
    def recorded(cls) -> FakeApiServer:
        """The recorded cluster: Istio's CRDs are installed, the Gateway API's are not."""
        return cls(
            lists={
                NAMESPACES: recorded_list("namespaces.json"),
                PODS: recorded_list("pods.json"),
                SERVICES: recorded_list("services.json"),
                ENDPOINT_SLICES: recorded_list("endpointslices.json"),
                AUTHORIZATION_POLICIES: recorded_list("authorizationpolicies.json"),
            }
        )

    @property
    def url(self) -> str:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> None:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                fake._answer(self)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer((self.host, 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True).start()

    def stop(self) -> None:
        self._stopping.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    # What the tests do ----------------------------------------------------------------------

    def send(self, path: str, events: Sequence[dict[str, Any]]) -> None:
        for event in events:
            self._queue(path).put(event)

    def end_watches(self, *paths: str) -> None:
        for path in paths:
            self._queue(path).put(_END)

    def requests_to(self, path: str, *, watch: bool | None = None) -> list[Request]:
        with self._lock:
            return [
                r for r in self.requests if r.path == path and (watch is None or r.watch == watch)
            ]

    def watching(self, path: str) -> bool:
        with self._lock:
            return self._open_watches.get(path, 0) > 0

    # Serving --------------------------------------------------------------------------------

    def _queue(self, path: str) -> queue.Queue[object]:
        with self._lock:
            return self._events.setdefault(path, queue.Queue())

    def _answer(self, handler: BaseHTTPRequestHandler) -> None:
        url = urlsplit(handler.path)
        query = {key: values[-1] for key, values in parse_qs(url.query).items()}
        request = Request(url.path, query, time.monotonic())
        with self._lock:
            self.requests.append(request)
        if self.failing is not None:
            self._send_json(handler, self.failing, status(self.failing, "InternalError", "boom"))
        elif url.path not in self.lists:
            # What the API server says for a group or resource it does not serve.
            message = "the server could not find the requested resource"
            self._send_json(handler, 404, status(404, "NotFound", message))
        elif request.watch:
            self._stream(handler, request)
        else:
            self._send_json(handler, 200, self._page(url.path, query))

    def _page(self, path: str, query: dict[str, str]) -> dict[str, Any]:
        listed = self.lists[path]
        items = listed["items"]
        start = int(query.get("continue", "0"))
        limit = int(query.get("limit", "0")) or len(items)
        page = {
            **listed,
            "items": items[start : start + limit],
            "metadata": dict(listed["metadata"]),
        }
        if start + limit < len(items):
            page["metadata"]["continue"] = str(start + limit)
            page["metadata"]["remainingItemCount"] = len(items) - start - limit
        return page

    def _stream(self, handler: BaseHTTPRequestHandler, request: Request) -> None:
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Transfer-Encoding", "chunked")
        handler.end_headers()
        deadline = time.monotonic() + int(request.query.get("timeoutSeconds", "60"))
        events = self._queue(request.path)
        with self._lock:
            self._open_watches[request.path] = self._open_watches.get(request.path, 0) + 1
        try:
            while not self._stopping.is_set() and time.monotonic() < deadline:
                try:
                    event = events.get(timeout=0.02)
                except queue.Empty:
                    continue
                if event is _END:
                    break
                assert isinstance(event, dict)
                line = json.dumps(event).encode() + b"\n"
                handler.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
                handler.wfile.flush()
                if event["type"] == "ERROR":
                    break  # the API server ends a watch after its ERROR event
            handler.wfile.write(b"0\r\n\r\n")
            handler.wfile.flush()
        except OSError:
            pass  # the client went away (the source stopped)
        finally:
            with self._lock:
                self._open_watches[request.path] -= 1

    @staticmethod
    def _send_json(handler: BaseHTTPRequestHandler, code: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        handler.send_response(code)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)
