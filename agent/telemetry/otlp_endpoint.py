"""The OTLP endpoint an operator names, read into what each exporter takes, and the error
for a misconfigured export: importable without OpenTelemetry's SDK and gRPC, which only an
agent that exports loads (agent/telemetry/otlp.py)."""

from __future__ import annotations

from urllib.parse import SplitResult, urlsplit, urlunsplit

HTTP_METRICS_PATH = "/v1/metrics"


class OtlpError(Exception):
    """The OTLP export is misconfigured (endpoint, protocol, interval) or used after shutdown."""


def http_metrics_url(endpoint: str) -> str:
    """The URL OTLP/HTTP metrics are POSTed to: `endpoint` itself when it has a path, else
    `endpoint` + /v1/metrics (the OTLP/HTTP convention for a base URL)."""
    parts = _split_url(endpoint)
    if parts is None or parts.scheme not in ("http", "https"):
        raise OtlpError(f"OTLP endpoint {endpoint!r} must be http://host:port or https://host:port")
    if parts.path in ("", "/"):
        parts = parts._replace(path=HTTP_METRICS_PATH)
    return urlunsplit(parts)


def grpc_target(endpoint: str) -> tuple[str, bool]:
    """(host:port, insecure) for the gRPC exporter. http:// means plaintext; https:// and a
    bare host:port mean TLS, as the OTLP exporter specification reads a scheme-less endpoint."""
    message = (
        f"OTLP endpoint {endpoint!r} must be host:port, http://host:port (plaintext)"
        " or https://host:port"
    )
    parts = _split_url(endpoint if "://" in endpoint else "//" + endpoint)
    if parts is None or parts.scheme not in ("", "http", "https") or parts.path not in ("", "/"):
        raise OtlpError(message)
    try:
        port = parts.port
    except ValueError as error:
        raise OtlpError(message) from error
    if port is None:
        raise OtlpError(message)
    return parts.netloc, parts.scheme == "http"


def _split_url(url: str) -> SplitResult | None:
    """The URL's parts when it names a host and nothing a metrics endpoint can't use."""
    parts = urlsplit(url.strip())
    try:
        parts.port  # noqa: B018 -- raises ValueError on a port that isn't one
    except ValueError:
        return None
    if not parts.hostname or parts.query or parts.fragment or parts.username is not None:
        return None
    return parts
