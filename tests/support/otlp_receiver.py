"""A real OTLP metrics receiver for tests: gRPC MetricsService/Export and HTTP POST
/v1/metrics, both decoding ExportMetricsServiceRequest with opentelemetry-proto, each data
point kept as a plain dict.

In-process: `OtlpReceiver().start()`, then `.points()`. Standalone (run inside a network
namespace by the lab tests):

    python -m tests.support.otlp_receiver --grpc-port N --http-port M --out FILE [--host H]

appends one JSON object per data point to FILE, prints "ready grpc=PORT http=PORT" once
both listen (port 0 picks a free one) and runs until SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import gzip
import json
import signal
import sys
import threading
import zlib
from collections.abc import Callable, Sequence
from concurrent import futures
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType
from typing import Any, TextIO

import grpc
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2_grpc
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.metrics.v1.metrics_pb2 import AggregationTemporality

DataPoint = dict[str, Any]
HTTP_METRICS_PATH = "/v1/metrics"
PROTOBUF_CONTENT_TYPE = "application/x-protobuf"

_TEMPORALITY_NAMES = {
    AggregationTemporality.AGGREGATION_TEMPORALITY_UNSPECIFIED: "unspecified",
    AggregationTemporality.AGGREGATION_TEMPORALITY_DELTA: "delta",
    AggregationTemporality.AGGREGATION_TEMPORALITY_CUMULATIVE: "cumulative",
}


def any_value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [any_value(item) for item in value.array_value.values]
    if kind == "kvlist_value":
        return key_values(value.kvlist_value.values)
    if kind == "bytes_value":
        return value.bytes_value.hex()
    return getattr(value, kind)


def key_values(pairs: Sequence[KeyValue]) -> dict[str, Any]:
    return {pair.key: any_value(pair.value) for pair in pairs}


def data_points(request: ExportMetricsServiceRequest, transport: str) -> list[DataPoint]:
    """Every number data point of the request, flattened with its metric and resource.
    Histograms and summaries are listed too (kind, attributes) without a single value."""
    points: list[DataPoint] = []
    for resource_metrics in request.resource_metrics:
        resource = key_values(resource_metrics.resource.attributes)
        for scope_metrics in resource_metrics.scope_metrics:
            for metric in scope_metrics.metrics:
                kind = metric.WhichOneof("data")
                common: dict[str, Any] = {
                    "name": metric.name,
                    "description": metric.description,
                    "unit": metric.unit,
                    "kind": kind,
                    "monotonic": None,
                    "temporality": None,
                    "resource": resource,
                    "scope": scope_metrics.scope.name,
                    "transport": transport,
                }
                if kind == "sum":
                    common["monotonic"] = metric.sum.is_monotonic
                    common["temporality"] = _TEMPORALITY_NAMES.get(
                        metric.sum.aggregation_temporality, "unspecified"
                    )
                    numbers = list(metric.sum.data_points)
                elif kind == "gauge":
                    numbers = list(metric.gauge.data_points)
                else:
                    numbers = []
                    if kind is not None:
                        for other in getattr(metric, kind).data_points:
                            points.append({**common, "attributes": key_values(other.attributes),
                                           "value": None})  # fmt: skip
                for number in numbers:
                    which = number.WhichOneof("value")
                    points.append({
                        **common,
                        "attributes": key_values(number.attributes),
                        "value": getattr(number, which) if which is not None else None,
                        "start_time_unix_nano": number.start_time_unix_nano,
                        "time_unix_nano": number.time_unix_nano,
                    })  # fmt: skip
    return points


class _MetricsService(metrics_service_pb2_grpc.MetricsServiceServicer):
    def __init__(self, receive: Callable[[ExportMetricsServiceRequest, str], None]) -> None:
        self._receive = receive

    def Export(
        self, request: ExportMetricsServiceRequest, context: grpc.ServicerContext
    ) -> ExportMetricsServiceResponse:
        self._receive(request, "grpc")
        return ExportMetricsServiceResponse()


class _HttpServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(
        self,
        address: tuple[str, int],
        receive: Callable[[ExportMetricsServiceRequest, str], None],
    ) -> None:
        self.receive = receive
        super().__init__(address, _HttpHandler)


class _HttpHandler(BaseHTTPRequestHandler):
    server: _HttpServer
    protocol_version = "HTTP/1.1"  # keep-alive, as the exporter's session expects

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        if self.path.split("?", 1)[0] != HTTP_METRICS_PATH:
            self._reply(HTTPStatus.NOT_FOUND, b"")
            return
        content_type = self.headers.get("Content-Type", "").split(";", 1)[0].strip()
        if content_type != PROTOBUF_CONTENT_TYPE:
            self._reply(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, b"")
            return
        encoding = self.headers.get("Content-Encoding", "").strip().lower()
        try:
            if encoding == "gzip":
                body = gzip.decompress(body)
            elif encoding == "deflate":
                body = zlib.decompress(body)
            request = ExportMetricsServiceRequest.FromString(body)
        except (OSError, zlib.error, DecodeError):
            self._reply(HTTPStatus.BAD_REQUEST, b"")
            return
        self.server.receive(request, "http")
        self._reply(HTTPStatus.OK, ExportMetricsServiceResponse().SerializeToString())

    def _reply(self, status: HTTPStatus, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", PROTOBUF_CONTENT_TYPE)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # one line per export would bury the test output


class OtlpReceiver:
    """Both OTLP transports on `host`; every data point is stored (thread-safe) and, when
    given, passed to `on_point` before the export is acknowledged, so an exporter's flush
    that returned has its points here."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        grpc_port: int = 0,
        http_port: int = 0,
        on_point: Callable[[DataPoint], None] | None = None,
    ) -> None:
        self.host = host
        self.grpc_port = grpc_port
        self.http_port = http_port
        self._on_point = on_point
        self._lock = threading.Lock()
        self._points: list[DataPoint] = []
        self._requests = {"grpc": 0, "http": 0}
        self._grpc_server: grpc.Server | None = None
        self._http_server: _HttpServer | None = None
        self._http_thread: threading.Thread | None = None

    def start(self) -> None:
        grpc_server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(  # type: ignore[no-untyped-call]
            _MetricsService(self._receive), grpc_server
        )
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.grpc_port = grpc_server.add_insecure_port(f"{host}:{self.grpc_port}")
        grpc_server.start()
        self._grpc_server = grpc_server
        self._http_server = _HttpServer((self.host, self.http_port), self._receive)
        self.http_port = self._http_server.server_address[1]
        self._http_thread = threading.Thread(
            # A short poll: stop() waits for the loop to notice, and tests stop often.
            target=self._http_server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="otlp-http",
            daemon=True,
        )
        self._http_thread.start()

    def stop(self) -> None:
        if self._grpc_server is not None:
            self._grpc_server.stop(grace=None).wait()
            self._grpc_server = None
        if self._http_server is not None:
            self._http_server.shutdown()
            self._http_server.server_close()
            self._http_server = None
        if self._http_thread is not None:
            self._http_thread.join()
            self._http_thread = None

    @property
    def grpc_endpoint(self) -> str:
        return f"http://{self.host}:{self.grpc_port}"

    @property
    def http_endpoint(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    def points(self) -> list[DataPoint]:
        with self._lock:
            return list(self._points)

    def requests(self, transport: str) -> int:
        """How many export requests came over `transport` ("grpc" or "http")."""
        with self._lock:
            return self._requests[transport]

    def clear(self) -> None:
        with self._lock:
            self._points.clear()
            self._requests = dict.fromkeys(self._requests, 0)

    def _receive(self, request: ExportMetricsServiceRequest, transport: str) -> None:
        points = data_points(request, transport)
        # Under the lock: points of two concurrent exports are stored, and written, whole.
        with self._lock:
            self._requests[transport] += 1
            self._points.extend(points)
            if self._on_point is not None:
                for point in points:
                    self._on_point(point)


def _json_lines_writer(out: TextIO) -> Callable[[DataPoint], None]:
    def write(point: DataPoint) -> None:
        out.write(json.dumps(point, sort_keys=True) + "\n")
        out.flush()

    return write


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.support.otlp_receiver", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--grpc-port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--http-port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--out", required=True, help="file to append JSON lines to")
    args = parser.parse_args(argv)

    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    with open(args.out, "a", encoding="utf-8") as out:
        receiver = OtlpReceiver(args.host, args.grpc_port, args.http_port, _json_lines_writer(out))
        receiver.start()
        try:
            print(f"ready grpc={receiver.grpc_port} http={receiver.http_port}", flush=True)
            stop.wait()  # a signal interrupts the wait and runs its handler (POSIX)
        finally:
            receiver.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
