"""The waypoint's Envoy configuration, rendered from the mesh state (sans-IO).

The shape is istiod's for waypoints (../shared/brief/waypoint.md), in three listeners:

- `connect_terminate` (15008): HBONE in. TLS 1.3 with a client certificate required, ALPN
  h2; a CONNECT is routed to the internal listener `main_internal`, with `:authority` as the
  original destination (`envoy.filters.listener.original_dst.local_ip`), the downstream
  address and the client's verified principal (`io.istio.peer_principal`) in filter state
  shared with the upstream, so L7 policy can match the original client.
- `main_internal`: restores the authority as its local address (original_dst) and picks the
  chain of the Service VIP:port it names. An HTTP port's chain parses requests: L7
  authorization (agent/waypoint/rbac.py), the HTTPRoutes of the Service in Gateway API's
  precedence, one JSON access log line per request; a TCP port's chain passes the bytes on,
  with the L4 part of the policies. Service clusters have internal endpoints carrying the
  picked pod's IP:targetPort. A pod bound to the waypoint itself gets a chain on its
  address that tunnels straight on to the address asked (HBONE to its 15008).
- `connect_originate|<identity>`, one per identity of the pods the waypoint sends to:
  restores that pod address (original_dst, from the endpoint's metadata) and tunnels to it
  over HBONE: `podIP:15008` with `:authority` podIP:targetPort, mTLS with the waypoint's own
  certificate, and the pod's own SPIFFE identity required of the peer (istiod's check: a
  pod whose address was taken over by another workload is refused, not trusted).

The listeners and clusters are xDS resources (`render`), served from files
(agent/waypoint/xds_files.py); the certificates come by SDS from files too, so a rotation is
a file swap, not a listener change. `static_bootstrap` puts the same resources in one static
file, for `envoy --mode validate`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.identity.spiffe import SpiffeId
from agent.state.route import (
    BackendRef,
    HeaderMatch,
    HttpRoute,
    PathMatchKind,
    RankedRule,
    RouteRule,
    backend_error,
    ranked_rules,
)
from agent.state.service import Service
from agent.state.store import MeshState
from agent.state.waypoint import HBONE_PORT
from agent.state.waypoint_policy import WaypointAction, WaypointPolicy
from agent.state.workload import Workload
from agent.waypoint import rbac

JsonObject = dict[str, Any]

ORIGINAL_DST = "envoy.filters.listener.original_dst"
PEER_PRINCIPAL = rbac.PEER_PRINCIPAL
# Envoy's windows, as the brief found they must be (envoyproxy/envoy#28329).
STREAM_WINDOW = 4 << 20
CONNECTION_WINDOW = 16 << 20
# SDS secret names (Istio's): the waypoint's certificate and the mesh roots.
CERTIFICATE_SECRET = "default"
ROOTS_SECRET = "ROOTCA"
# Where Envoy writes access log lines: its stdout, which the waypoint process reads.
STDOUT = Path("/dev/stdout")


@dataclass(frozen=True, slots=True)
class Secrets:
    """Where Envoy reads the waypoint's certificate and the roots (SDS files, agent/waypoint/
    xds_files.py writes them), and the trust domain whose clients it accepts."""

    directory: Path
    trust_domain: str

    def path(self, name: str) -> Path:
        return self.directory / f"{name}.json"


@dataclass(frozen=True, slots=True)
class Resources:
    listeners: list[JsonObject]
    clusters: list[JsonObject]
    # Per HTTP chain, the ALLOW policies that apply: a request none of them allows is denied
    # with no policy to name, and the log says which ones it missed.
    allow_policies: dict[str, tuple[str, ...]] = field(default_factory=dict)


def any_message(type_name: str, **fields: Any) -> JsonObject:
    """A google.protobuf.Any in JSON: `type_name` (without the type URL prefix) and its
    fields."""
    return {"@type": f"type.googleapis.com/{type_name}", **fields}


def hbone_tls() -> JsonObject:
    """What HBONE's TLS is on either side, whoever's certificates: TLS 1.3 only, ALPN h2."""
    return {
        "tls_params": {
            "tls_minimum_protocol_version": "TLSv1_3",
            "tls_maximum_protocol_version": "TLSv1_3",
        },
        "alpn_protocols": ["h2"],
    }


def _sds(secrets: Secrets, name: str) -> JsonObject:
    return {
        "name": name,
        "sds_config": {
            "path_config_source": {
                "path": str(secrets.path(name)),
                "watched_directory": {"path": str(secrets.directory)},
            },
            "resource_api_version": "V3",
        },
    }


def _tls_context(secrets: Secrets, peer: str | None = None) -> JsonObject:
    """TLS 1.3, h2, the waypoint's certificate; the peer must be `peer` (a SPIFFE URI), or
    any identity of the trust domain when None (clients, on connect_terminate)."""
    matcher = {"exact": peer} if peer else {"prefix": f"spiffe://{secrets.trust_domain}/"}
    return {
        **hbone_tls(),
        "tls_certificate_sds_secret_configs": [_sds(secrets, CERTIFICATE_SECRET)],
        "combined_validation_context": {
            "default_validation_context": {
                "match_typed_subject_alt_names": [{"san_type": "URI", "matcher": matcher}]
            },
            "validation_context_sds_secret_config": _sds(secrets, ROOTS_SECRET),
        },
    }


def http2_options() -> JsonObject:
    """HTTP/2 windows as the agents' own (agent/hbone/protocol.py)."""
    return {
        "initial_stream_window_size": STREAM_WINDOW,
        "initial_connection_window_size": CONNECTION_WINDOW,
    }


def _shared_state(key: str, value: str, factory: str | None = None) -> JsonObject:
    entry: JsonObject = {
        "object_key": key,
        "format_string": {"text_format_source": {"inline_string": value}},
        "shared_with_upstream": "ONCE",
    }
    if factory is not None:
        entry["factory_key"] = factory  # Envoy 1.40 knows no istio.* factories
    return entry


def _internal_address(listener: str) -> JsonObject:
    return {"envoy_internal_address": {"server_listener_name": listener}}


def _internal_upstream() -> JsonObject:
    """The transport to an internal listener, passing the endpoint's original_dst metadata."""
    return {
        "name": "envoy.transport_sockets.internal_upstream",
        "typed_config": any_message(
            "envoy.extensions.transport_sockets.internal_upstream.v3.InternalUpstreamTransport",
            passthrough_metadata=[{"kind": {"host": {}}, "name": ORIGINAL_DST}],
            transport_socket={
                "name": "envoy.transport_sockets.raw_buffer",
                "typed_config": any_message(
                    "envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer"
                ),
            },
        ),
    }


def _original_dst_filter() -> JsonObject:
    return {
        "name": ORIGINAL_DST,
        "typed_config": any_message(
            "envoy.extensions.filters.listener.original_dst.v3.OriginalDst"
        ),
    }


def _tcp_proxy(stat_prefix: str, cluster: str, **extra: Any) -> JsonObject:
    return {
        "name": "envoy.filters.network.tcp_proxy",
        "typed_config": any_message(
            "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
            stat_prefix=stat_prefix,
            cluster=cluster,
            **extra,
        ),
    }


# What each access log line holds, by kind. The waypoint process reads these lines (Envoy's
# stdout) for request telemetry and relays them as its own access log.
_COMMON_FIELDS = {
    "start": "%START_TIME%",
    "client": "%DOWNSTREAM_REMOTE_ADDRESS%",  # the original client, restored
    "destination": "%DOWNSTREAM_LOCAL_ADDRESS%",  # the VIP:port or pod ip:port asked for
    "peer": f"%FILTER_STATE({PEER_PRINCIPAL}:PLAIN)%",  # the client's verified identity
    "chain": "%FILTER_CHAIN_NAME%",
    "upstream_cluster": "%UPSTREAM_CLUSTER%",
    "upstream_pod": f"%UPSTREAM_METADATA({ORIGINAL_DST}:local)%",
    "bytes_received": "%BYTES_RECEIVED%",
    "bytes_sent": "%BYTES_SENT%",
    "duration_ms": "%DURATION%",
    "flags": "%RESPONSE_FLAGS%",
}
_HTTP_FIELDS = {
    "kind": "http",
    "method": "%REQ(:METHOD)%",
    "path": "%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%",
    "authority": "%REQ(:AUTHORITY)%",
    "protocol": "%PROTOCOL%",
    "status": "%RESPONSE_CODE%",
    "details": "%RESPONSE_CODE_DETAILS%",
    "route": "%ROUTE_NAME%",
    "attempts": "%UPSTREAM_REQUEST_ATTEMPT_COUNT%",
    "audit": "%DYNAMIC_METADATA(envoy.common:access_log_hint)%",
    "request_id": "%REQ(X-REQUEST-ID)%",
    "dry_run": f"%DYNAMIC_METADATA(envoy.filters.http.rbac:{rbac.DRY_RUN_PREFIX}"
    "shadow_effective_policy_id)%",
    "dry_run_result": f"%DYNAMIC_METADATA(envoy.filters.http.rbac:{rbac.DRY_RUN_PREFIX}"
    "shadow_engine_result)%",
    **_COMMON_FIELDS,
}
_TCP_FIELDS = {"kind": "tcp", "details": "%CONNECTION_TERMINATION_DETAILS%", **_COMMON_FIELDS}
_TUNNEL_FIELDS = {
    "kind": "tunnel",
    "authority": "%REQ(:AUTHORITY)%",
    "peer": "%DOWNSTREAM_PEER_URI_SAN%",
    "client": "%DOWNSTREAM_REMOTE_ADDRESS%",
    "status": "%RESPONSE_CODE%",
    "flags": "%RESPONSE_FLAGS%",
    "start": "%START_TIME%",
}


def file_access_log(fields: dict[str, str], path: str | Path) -> list[JsonObject]:
    """One JSON line per connection (tcp_proxy) or request (HTTP connection manager) in
    `path` (a relative one is in Envoy's working directory)."""
    return [
        {
            "name": "envoy.access_loggers.file",
            "typed_config": any_message(
                "envoy.extensions.access_loggers.file.v3.FileAccessLog",
                path=str(path),
                log_format={"json_format": fields},
            ),
        }
    ]


def router() -> JsonObject:
    return {
        "name": "envoy.filters.http.router",
        "typed_config": any_message("envoy.extensions.filters.http.router.v3.Router"),
    }


def _connect_terminate(secrets: Secrets, access_log: Path) -> JsonObject:
    hcm = any_message(
        "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        stat_prefix="connect_terminate",
        codec_type="HTTP2",
        http2_protocol_options=http2_options(),
        route_config={
            "name": "connect_terminate",
            "virtual_hosts": [
                {
                    "name": "connect",
                    "domains": ["*"],
                    "routes": [
                        {
                            "match": {"connect_matcher": {}},
                            "route": {
                                "cluster": "main_internal",
                                "upgrade_configs": [
                                    {"upgrade_type": "CONNECT", "connect_config": {}}
                                ],
                            },
                        }
                    ],
                }
            ],
        },
        http_filters=[
            {
                "name": "envoy.filters.http.set_filter_state",
                "typed_config": any_message(
                    "envoy.extensions.filters.http.set_filter_state.v3.Config",
                    on_request_headers=[
                        _shared_state(f"{ORIGINAL_DST}.local_ip", "%REQ(:AUTHORITY)%"),
                        _shared_state(f"{ORIGINAL_DST}.remote_ip", "%DOWNSTREAM_REMOTE_ADDRESS%"),
                        _shared_state(PEER_PRINCIPAL, "%DOWNSTREAM_PEER_URI_SAN%", "envoy.string"),
                    ],
                ),
            },
            router(),
        ],
        access_log=file_access_log(_TUNNEL_FIELDS, access_log),
    )
    downstream_tls = any_message(
        "envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
        require_client_certificate=True,
        common_tls_context=_tls_context(secrets),
    )
    return {
        "name": "connect_terminate",
        "address": {"socket_address": {"address": "0.0.0.0", "port_value": HBONE_PORT}},
        "filter_chains": [
            {
                "transport_socket": {
                    "name": "envoy.transport_sockets.tls",
                    "typed_config": downstream_tls,
                },
                "filters": [
                    {"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}
                ],
            }
        ],
    }


def service_cluster_name(service: Service, port: int) -> str:
    return f"outbound|{port}||{service.hostname}"


# Where main_internal sends what no chain serves: a cluster without endpoints, so the
# connection is closed (flag UH) and logged, never passed anywhere.
NO_CHAIN = "no-chain"


def _main_internal(chains: list[JsonObject], access_log: Path) -> JsonObject:
    return {
        "name": "main_internal",
        "internal_listener": {},
        "listener_filters": [_original_dst_filter()],
        "use_original_dst": True,
        "filter_chains": chains,
        # Envoy refuses a listener without chains: a waypoint nothing is bound to yet has one.
        "default_filter_chain": {
            "name": NO_CHAIN,
            "filters": [
                _tcp_proxy(NO_CHAIN, NO_CHAIN, access_log=file_access_log(_TCP_FIELDS, access_log))
            ],
        },
    }


def originate_name(workload: Workload) -> str:
    """The connect_originate listener and cluster that tunnel to `workload`'s pods."""
    return f"connect_originate|{_identity(workload)}"


def _identity(workload: Workload) -> str:
    return SpiffeId(workload.trust_domain, workload.namespace, workload.service_account).uri


def _connect_originate(name: str) -> JsonObject:
    return {
        "name": name,
        "internal_listener": {},
        "listener_filters": [_original_dst_filter()],
        "use_original_dst": True,
        "filter_chains": [
            {
                "filters": [
                    _tcp_proxy(
                        "connect_originate",
                        name,
                        tunneling_config={"hostname": "%DOWNSTREAM_LOCAL_ADDRESS%"},
                    )
                ]
            }
        ],
    }


def _connect_originate_cluster(secrets: Secrets, name: str, peer: str) -> JsonObject:
    return {
        "name": name,
        "type": "ORIGINAL_DST",
        "lb_policy": "CLUSTER_PROVIDED",
        "connect_timeout": "10s",
        "original_dst_lb_config": {"upstream_port_override": HBONE_PORT},
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": any_message(
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                explicit_http_config={"http2_protocol_options": http2_options()},
            )
        },
        "transport_socket": {
            "name": "envoy.transport_sockets.tls",
            "typed_config": any_message(
                "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                common_tls_context=_tls_context(secrets, peer),
            ),
        },
    }


# Endpoint metadata that picks the transport of a service cluster's endpoint.
TRANSPORT_MATCH = "envoy.transport_socket_match"


def _service_cluster(state: MeshState, service: Service, port: int) -> JsonObject:
    """Ready pods only, each on its own target port. A mesh pod's endpoint is an internal
    address of its connect_originate, with the pod address the original_dst there restores
    (HBONE on); a pod outside the mesh is dialled as it is, plain TCP, as ztunnel does."""
    name = service_cluster_name(service, port)
    endpoints = []
    for e in state.ready_endpoints(service, port):
        pod = f"{e.ip}:{e.port}"
        if e.workload.captured:
            address = _internal_address(originate_name(e.workload))
            tunnel = "hbone"
        else:
            address = {"socket_address": {"address": e.ip, "port_value": e.port}}
            tunnel = "none"
        endpoints.append(
            {
                "endpoint": {"address": address},
                "metadata": {
                    "filter_metadata": {
                        ORIGINAL_DST: {"local": pod},
                        TRANSPORT_MATCH: {"tunnel": tunnel},
                    }
                },
            }
        )
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "10s",
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": endpoints}]},
        "transport_socket_matches": [
            {
                "name": "hbone",
                "match": {"tunnel": "hbone"},
                "transport_socket": _internal_upstream(),
            }
        ],
        "transport_socket": {
            "name": "envoy.transport_sockets.raw_buffer",
            "typed_config": any_message(
                "envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer"
            ),
        },
    }


class _Clusters:
    """The clusters being rendered, by name, and the identities their endpoints have: one
    connect_originate each is rendered at the end."""

    def __init__(self, state: MeshState) -> None:
        self.state = state
        self.by_name: dict[str, JsonObject] = {}
        self.peers: dict[str, str] = {}  # connect_originate name -> the identity required

    def service(self, service: Service, port: int) -> str:
        name = service_cluster_name(service, port)
        if name not in self.by_name:
            self.by_name[name] = _service_cluster(self.state, service, port)
            for endpoint in self.state.ready_endpoints(service, port):
                if endpoint.workload.captured:
                    self.tunnel_to(endpoint.workload)
        return name

    def tunnel_to(self, workload: Workload) -> str:
        name = originate_name(workload)
        self.peers[name] = _identity(workload)
        return name


def _prefix_ranges(addresses: tuple[str, ...]) -> list[JsonObject]:
    return [{"address_prefix": ip, "prefix_len": 128 if ":" in ip else 32} for ip in addresses]


# --- HTTP chains --------------------------------------------------------------------------


def _header_matcher(match: HeaderMatch) -> JsonObject:
    string_match = {"safe_regex": {"regex": match.value}} if match.regex else {"exact": match.value}
    return {"name": match.name, "string_match": string_match}


def _route_match(ranked: RankedRule) -> JsonObject:
    match = ranked.match
    out: JsonObject = {}
    path = match.path
    if path is None:
        out["prefix"] = "/"
    elif path.kind is PathMatchKind.EXACT:
        out["path"] = path.value
    elif path.kind is PathMatchKind.PREFIX:
        # Gateway API's prefix matches whole segments: "/v2" is "/v2" and "/v2/...", not
        # "/v2x" (Envoy's path_separated_prefix; it wants no trailing slash).
        trimmed = path.value.rstrip("/")
        out.update({"path_separated_prefix": trimmed} if trimmed else {"prefix": "/"})
    else:
        out["safe_regex"] = {"regex": path.value}
    headers = [_header_matcher(h) for h in match.headers]
    if match.method is not None:
        headers.append({"name": ":method", "string_match": {"exact": match.method}})
    if headers:
        out["headers"] = headers
    if match.query_params:
        out["query_parameters"] = [
            {
                "name": q.name,
                "string_match": {"safe_regex": {"regex": q.value}}
                if q.regex
                else {"exact": q.value},
            }
            for q in match.query_params
        ]
    return out


def _seconds(value: float) -> str:
    return f"{value:.3f}s"


def _backend_cluster(backend: BackendRef, port: int, clusters: _Clusters) -> str:
    service = clusters.state.service_by_name(f"{backend.namespace}/{backend.name}")
    assert service is not None  # checked by backend_error
    return clusters.service(service, backend.port or port)


def _route_action(
    state: MeshState,
    service: Service,
    port: int,
    rule: RouteRule,
    clusters: _Clusters,
) -> JsonObject:
    """The route of one rule: where to (one cluster or weighted ones), header changes,
    timeouts and retries; a rule whose backends do not resolve answers 500 (Gateway API)."""
    find = state.service_by_name
    if any(backend_error(b, find) is not None for b in rule.backends):
        return {"direct_response": {"status": 500}}
    backends = [b for b in rule.backends if b.weight > 0]
    if rule.backends and not backends:
        return {"direct_response": {"status": 500}}  # every weight 0: nothing to send to
    action: JsonObject = {"timeout": _seconds(rule.timeout_seconds or 0)}
    if not backends:  # GAMMA: a rule without backendRefs sends to the parent Service
        action["cluster"] = _backend_cluster(
            BackendRef(service.name, service.namespace, port), port, clusters
        )
    elif len(backends) == 1:
        action["cluster"] = _backend_cluster(backends[0], port, clusters)
    else:
        action["weighted_clusters"] = {
            "clusters": [
                {"name": _backend_cluster(b, port, clusters), "weight": b.weight} for b in backends
            ]
        }
    retry = rule.retry
    if retry is not None or rule.backend_timeout_seconds:
        policy: JsonObject = {"num_retries": retry.attempts if retry else 0}
        if retry is not None and retry.codes:
            policy["retry_on"] = "retriable-status-codes,connect-failure,refused-stream"
            policy["retriable_status_codes"] = list(retry.codes)
        else:
            policy["retry_on"] = "5xx,connect-failure,refused-stream"
        if retry is not None and retry.backoff_seconds:
            policy["retry_back_off"] = {"base_interval": _seconds(retry.backoff_seconds)}
        if rule.backend_timeout_seconds:
            policy["per_try_timeout"] = _seconds(rule.backend_timeout_seconds)
        action["retry_policy"] = policy
    return {"route": action}


def _header_changes(rule: RouteRule) -> JsonObject:
    modifier = rule.request_headers
    if modifier is None:
        return {}
    add = [
        {"header": {"key": k, "value": v}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}
        for k, v in modifier.set
    ] + [
        {"header": {"key": k, "value": v}, "append_action": "APPEND_IF_EXISTS_OR_ADD"}
        for k, v in modifier.add
    ]
    out: JsonObject = {}
    if add:
        out["request_headers_to_add"] = add
    if modifier.remove:
        out["request_headers_to_remove"] = list(modifier.remove)
    return out


def routes_for(state: MeshState, service: Service, port: int) -> list[HttpRoute]:
    """The HTTPRoutes attached to this Service port."""
    return [
        route
        for route in state.routes
        if any(
            p.kind == "Service"
            and p.group == ""
            and p.namespace == service.namespace
            and p.name == service.name
            and p.port in (None, port)
            for p in route.parents
        )
    ]


def _http_routes(
    state: MeshState, service: Service, port: int, clusters: _Clusters
) -> list[JsonObject]:
    routes = []
    for ranked in ranked_rules(routes_for(state, service, port)):
        rule = ranked.route.rules[ranked.rule_index]
        routes.append(
            {
                "name": f"{ranked.route.key}#{ranked.rule_index}",
                "match": _route_match(ranked),
                **_route_action(state, service, port, rule, clusters),
                **_header_changes(rule),
            }
        )
    if not any(r["match"] == {"prefix": "/"} for r in routes):
        # Whatever no route matched goes to the Service itself, as without routes.
        default = RouteRule()
        routes.append(
            {
                "name": "default",
                "match": {"prefix": "/"},
                **_route_action(state, service, port, default, clusters),
            }
        )
    return routes


def _http_filters(name: str, policies: list[WaypointPolicy]) -> list[JsonObject]:
    filters = []
    for action in (WaypointAction.DENY, WaypointAction.ALLOW, WaypointAction.AUDIT):
        config = rbac.http_filter(name, action, [p for p in policies if p.action is action])
        if config is not None:
            filters.append(config)
    return [*filters, router()]


def _http_chain(
    name: str,
    routes: list[JsonObject],
    policies: list[WaypointPolicy],
    access_log: Path,
) -> list[JsonObject]:
    hcm = any_message(
        "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        stat_prefix=name,
        codec_type="AUTO",
        http2_protocol_options=http2_options(),
        # The client (restored by original_dst) is the peer; never trust its XFF for that.
        use_remote_address=True,
        route_config={
            "name": name,
            "virtual_hosts": [{"name": name, "domains": ["*"], "routes": routes}],
            "validate_clusters": False,
        },
        http_filters=_http_filters(name, policies),
        access_log=file_access_log(_HTTP_FIELDS, access_log),
    )
    return [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]


def _tcp_chain(
    name: str, cluster: str, policies: list[WaypointPolicy], access_log: Path
) -> list[JsonObject]:
    filters = []
    for action in (WaypointAction.DENY, WaypointAction.ALLOW, WaypointAction.AUDIT):
        config = rbac.network_filter(name, action, [p for p in policies if p.action is action])
        if config is not None:
            filters.append(config)
    proxy = _tcp_proxy(name, cluster)
    proxy["typed_config"]["access_log"] = file_access_log(_TCP_FIELDS, access_log)
    return [*filters, proxy]


def policies_for(state: MeshState, gateway: str, service: Service) -> list[WaypointPolicy]:
    """The L7 policies the waypoint applies to traffic for `service`: those targeting the
    Service, and those targeting the waypoint Gateway itself."""
    return [
        p
        for p in state.waypoint_policies
        if p.targets_service(service.namespace, service.name) or p.targets_gateway(gateway)
    ]


def speaks_http(state: MeshState, service: Service, port: int) -> bool:
    """A port is parsed as HTTP when it says so (appProtocol, port name), or when an
    HTTPRoute attaches to it; anything else passes through as TCP."""
    return service.declares_http(port) or bool(routes_for(state, service, port))


def render(
    state: MeshState, gateway: str, secrets: Secrets, access_log: Path = STDOUT
) -> Resources:
    """The listeners and clusters of the waypoint `gateway` ("ns/name"): a chain per port
    of every Service bound to it, and a chain per workload bound to it (pod-addressed
    traffic, tunnelled on to the address it asked for)."""
    chains: list[JsonObject] = []
    clusters = _Clusters(state)
    clusters.by_name |= {
        "main_internal": {
            "name": "main_internal",
            "type": "STATIC",
            "connect_timeout": "10s",
            "load_assignment": {
                "cluster_name": "main_internal",
                "endpoints": [
                    {
                        "lb_endpoints": [
                            {"endpoint": {"address": _internal_address("main_internal")}}
                        ]
                    }
                ],
            },
            "transport_socket": _internal_upstream(),
        },
        NO_CHAIN: {"name": NO_CHAIN, "type": "STATIC", "connect_timeout": "1s"},
    }
    allow_policies: dict[str, tuple[str, ...]] = {}
    for service in sorted(state.services, key=lambda s: s.key):
        if service.waypoint is None or service.waypoint.key != gateway:
            continue
        policies = policies_for(state, gateway, service)
        for port, _ in sorted(service.ports.items()):
            http = speaks_http(state, service, port)
            name = f"inbound-vip|{port}|{'http' if http else 'tcp'}|{service.hostname}"
            cluster = clusters.service(service, port)
            if http:
                routes = _http_routes(state, service, port, clusters)
                filters = _http_chain(name, routes, policies, access_log)
                allow_policies[name] = tuple(
                    p.key for p in policies if p.action is WaypointAction.ALLOW and not p.dry_run
                )
            else:
                filters = _tcp_chain(name, cluster, policies, access_log)
            chains.append(
                {
                    "name": name,
                    "filter_chain_match": {
                        "destination_port": port,
                        "prefix_ranges": _prefix_ranges(service.vips),
                    },
                    "filters": filters,
                }
            )
    for workload in sorted(state.workloads, key=lambda w: w.uid):
        if workload.waypoint is None or workload.waypoint.key != gateway or not workload.ips:
            continue
        chains.append(
            {
                "name": f"direct-tcp|{workload.key}",
                "filter_chain_match": {"prefix_ranges": _prefix_ranges(workload.ips)},
                # The local address main_internal restored is the pod's own ip:port: the
                # original_dst cluster dials its 15008 with that as the authority.
                "filters": [
                    _tcp_proxy(
                        "direct-tcp",
                        clusters.tunnel_to(workload),
                        tunneling_config={"hostname": "%DOWNSTREAM_LOCAL_ADDRESS%"},
                        access_log=file_access_log(_TCP_FIELDS, access_log),
                    )
                ],
            }
        )
    # One connect_originate per identity the waypoint tunnels to.
    listeners = [_connect_terminate(secrets, access_log), _main_internal(chains, access_log)]
    for name, peer in sorted(clusters.peers.items()):
        listeners.append(_connect_originate(name))
        clusters.by_name[name] = _connect_originate_cluster(secrets, name, peer)
    return Resources(listeners, list(clusters.by_name.values()), allow_policies)


# Runtime every waypoint Envoy runs with.
RUNTIME = {
    # A close on the internal side reaches the client as END_STREAM, not as a reset after
    # the data (the brief's Envoy 1.40 findings).
    "envoy.reloadable_features.enable_send_rst_on_user_space_socket": False
}


# Downstream connections Envoy holds at most (its overload manager refuses more): a client
# opening connections without end must not take the waypoint's memory.
MAX_DOWNSTREAM_CONNECTIONS = 50_000


def _common_bootstrap(node: str) -> JsonObject:
    return {
        "node": {"id": node, "cluster": node.partition("~")[0]},
        "overload_manager": {
            "resource_monitors": [
                {
                    "name": "envoy.resource_monitors.global_downstream_max_connections",
                    "typed_config": any_message(
                        "envoy.extensions.resource_monitors.downstream_connections.v3."
                        "DownstreamConnectionsConfig",
                        max_active_downstream_connections=MAX_DOWNSTREAM_CONNECTIONS,
                    ),
                }
            ]
        },
        "bootstrap_extensions": [
            {
                "name": "envoy.bootstrap.internal_listener",
                "typed_config": any_message(
                    "envoy.extensions.bootstrap.internal_listener.v3.InternalListener"
                ),
            }
        ],
        "layered_runtime": {"layers": [{"name": "waypoint", "static_layer": RUNTIME}]},
    }


def dynamic_bootstrap(node: str, listeners: Path, clusters: Path, admin: Path) -> JsonObject:
    """Envoy's bootstrap for the waypoint process: listeners and clusters from the xDS files
    (reloaded when a file is moved into their directory), admin on a unix socket only the
    process reaches."""

    def source(path: Path) -> JsonObject:
        return {
            "path_config_source": {
                "path": str(path),
                "watched_directory": {"path": str(path.parent)},
            },
            "resource_api_version": "V3",
        }

    return {
        **_common_bootstrap(node),
        "admin": {"address": {"pipe": {"path": str(admin), "mode": 0o600}}},
        "dynamic_resources": {"lds_config": source(listeners), "cds_config": source(clusters)},
    }


def static_bootstrap(node: str, resources: Resources) -> JsonObject:
    """The same resources in one static file: what `envoy --mode validate` checks."""
    return {
        **_common_bootstrap(node),
        "static_resources": {"listeners": resources.listeners, "clusters": resources.clusters},
    }
