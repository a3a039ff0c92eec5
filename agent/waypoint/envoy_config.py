"""The waypoint's Envoy configuration, rendered from the mesh state (sans-IO).

The shape is istiod's for waypoints (../shared/brief/waypoint.md), in three listeners:

- `connect_terminate` (15008): HBONE in. TLS 1.3 with a client certificate required, ALPN
  h2; a CONNECT is routed to the internal listener `main_internal`, with `:authority` as the
  original destination (`envoy.filters.listener.original_dst.local_ip`), the downstream
  address and the client's verified principal (`io.istio.peer_principal`) in filter state
  shared with the upstream, so L7 policy can match the original client.
- `main_internal`: restores the authority as its local address (original_dst) and picks the
  chain of the Service VIP:port it names. Each chain carries the connection (TCP for now;
  HTTP routes and L7 policy come with the waypoint process, issue 13) to the service's
  cluster, whose endpoints are internal addresses carrying the picked pod's IP:targetPort.
  A pod bound to the waypoint itself gets a chain on its address that tunnels straight on
  to the address asked (HBONE to its 15008, `:authority` podIP:port).
- `connect_originate`: restores that pod address (original_dst, from the endpoint's
  metadata) and tunnels to it over HBONE: `podIP:15008` with `:authority` podIP:targetPort,
  mTLS with the waypoint's own certificate.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.state.service import Service
from agent.state.store import MeshState
from agent.state.waypoint import HBONE_PORT

JsonObject = dict[str, Any]

ORIGINAL_DST = "envoy.filters.listener.original_dst"
# Envoy's windows, as the brief found they must be (envoyproxy/envoy#28329).
STREAM_WINDOW = 4 << 20
CONNECTION_WINDOW = 16 << 20


@dataclass(frozen=True, slots=True)
class WaypointIdentity:
    """The waypoint's certificate files (PEM) and the trust domain it accepts clients from."""

    chain: Path
    key: Path
    roots: Path
    trust_domain: str


def _any(type_name: str, **fields: Any) -> JsonObject:
    return {"@type": f"type.googleapis.com/{type_name}", **fields}


def _tls_context(identity: WaypointIdentity) -> JsonObject:
    return {
        "tls_params": {
            "tls_minimum_protocol_version": "TLSv1_3",
            "tls_maximum_protocol_version": "TLSv1_3",
        },
        "alpn_protocols": ["h2"],
        "tls_certificates": [
            {
                "certificate_chain": {"filename": str(identity.chain)},
                "private_key": {"filename": str(identity.key)},
            }
        ],
        "validation_context": {
            "trusted_ca": {"filename": str(identity.roots)},
            "match_typed_subject_alt_names": [
                {"san_type": "URI", "matcher": {"prefix": f"spiffe://{identity.trust_domain}/"}}
            ],
        },
    }


def _http2_options() -> JsonObject:
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
        "typed_config": _any(
            "envoy.extensions.transport_sockets.internal_upstream.v3.InternalUpstreamTransport",
            passthrough_metadata=[{"kind": {"host": {}}, "name": ORIGINAL_DST}],
            transport_socket={
                "name": "envoy.transport_sockets.raw_buffer",
                "typed_config": _any("envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer"),
            },
        ),
    }


def _original_dst_filter() -> JsonObject:
    return {
        "name": ORIGINAL_DST,
        "typed_config": _any("envoy.extensions.filters.listener.original_dst.v3.OriginalDst"),
    }


def _tcp_proxy(stat_prefix: str, cluster: str, **extra: Any) -> JsonObject:
    return {
        "name": "envoy.filters.network.tcp_proxy",
        "typed_config": _any(
            "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
            stat_prefix=stat_prefix,
            cluster=cluster,
            **extra,
        ),
    }


def _access_log(path: Path) -> list[JsonObject]:
    """One JSON line per tunnel: what it asked for and who asked, as Envoy saw them."""
    fields = {
        "authority": "%REQ(:AUTHORITY)%",
        "peer": "%DOWNSTREAM_PEER_URI_SAN%",
        "downstream": "%DOWNSTREAM_REMOTE_ADDRESS%",
        "status": "%RESPONSE_CODE%",
        "flags": "%RESPONSE_FLAGS%",
        "start": "%START_TIME%",
    }
    return [
        {
            "name": "envoy.access_loggers.file",
            "typed_config": _any(
                "envoy.extensions.access_loggers.file.v3.FileAccessLog",
                path=str(path),
                log_format={"json_format": fields},
            ),
        }
    ]


def _connect_terminate(identity: WaypointIdentity, access_log: Path | None) -> JsonObject:
    hcm = _any(
        "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        stat_prefix="connect_terminate",
        codec_type="HTTP2",
        http2_protocol_options=_http2_options(),
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
                "typed_config": _any(
                    "envoy.extensions.filters.http.set_filter_state.v3.Config",
                    on_request_headers=[
                        _shared_state(f"{ORIGINAL_DST}.local_ip", "%REQ(:AUTHORITY)%"),
                        _shared_state(f"{ORIGINAL_DST}.remote_ip", "%DOWNSTREAM_REMOTE_ADDRESS%"),
                        _shared_state(
                            "io.istio.peer_principal", "%DOWNSTREAM_PEER_URI_SAN%", "envoy.string"
                        ),
                    ],
                ),
            },
            {
                "name": "envoy.filters.http.router",
                "typed_config": _any("envoy.extensions.filters.http.router.v3.Router"),
            },
        ],
        **({"access_log": _access_log(access_log)} if access_log is not None else {}),
    )
    downstream_tls = _any(
        "envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
        require_client_certificate=True,
        common_tls_context=_tls_context(identity),
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
    return f"inbound-vip|{port}|tcp|{service.hostname}"


def _main_internal(chains: list[JsonObject]) -> JsonObject:
    return {
        "name": "main_internal",
        "internal_listener": {},
        "listener_filters": [_original_dst_filter()],
        "use_original_dst": True,
        "filter_chains": chains,
    }


def _connect_originate() -> JsonObject:
    return {
        "name": "connect_originate",
        "internal_listener": {},
        "listener_filters": [_original_dst_filter()],
        "use_original_dst": True,
        "filter_chains": [
            {
                "filters": [
                    _tcp_proxy(
                        "connect_originate",
                        "connect_originate",
                        tunneling_config={"hostname": "%DOWNSTREAM_LOCAL_ADDRESS%"},
                    )
                ]
            }
        ],
    }


def _connect_originate_cluster(identity: WaypointIdentity) -> JsonObject:
    return {
        "name": "connect_originate",
        "type": "ORIGINAL_DST",
        "lb_policy": "CLUSTER_PROVIDED",
        "connect_timeout": "10s",
        "original_dst_lb_config": {"upstream_port_override": HBONE_PORT},
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": _any(
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                explicit_http_config={"http2_protocol_options": _http2_options()},
            )
        },
        "transport_socket": {
            "name": "envoy.transport_sockets.tls",
            "typed_config": _any(
                "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                common_tls_context=_tls_context(identity),
            ),
        },
    }


def _service_cluster(name: str, pods: Iterable[tuple[str, int]]) -> JsonObject:
    """Endpoints are internal addresses of connect_originate, each with the pod address the
    original_dst there restores."""
    endpoints = [
        {
            "endpoint": {"address": _internal_address("connect_originate")},
            "metadata": {
                "filter_metadata": {ORIGINAL_DST: {"local": f"{ip}:{port}"}},
            },
        }
        for ip, port in pods
    ]
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "10s",
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": endpoints}]},
        "transport_socket": _internal_upstream(),
    }


def render(
    state: MeshState,
    gateway: str,
    identity: WaypointIdentity,
    access_log: Path | None = None,
) -> JsonObject:
    """The bootstrap (static resources, no admin) for the waypoint `gateway` ("ns/name"):
    a chain and a cluster per port of every Service bound to it, and a chain per workload
    bound to it (pod-addressed traffic, tunnelled on to the address it asked for)."""
    chains: list[JsonObject] = []
    clusters: list[JsonObject] = [
        {
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
        _connect_originate_cluster(identity),
    ]
    for service in sorted(state.services, key=lambda s: s.key):
        if service.waypoint is None or service.waypoint.key != gateway:
            continue
        for port, _ in sorted(service.ports.items()):
            name = service_cluster_name(service, port)
            pods = [(e.ip, e.port) for e in state.ready_endpoints(service, port)]
            clusters.append(_service_cluster(name, pods))
            chains.append(
                {
                    "name": name,
                    "filter_chain_match": {
                        "destination_port": port,
                        "prefix_ranges": [
                            {"address_prefix": vip, "prefix_len": 128 if ":" in vip else 32}
                            for vip in service.vips
                        ],
                    },
                    "filters": [_tcp_proxy(name, name)],
                }
            )
    for workload in sorted(state.workloads, key=lambda w: w.uid):
        if workload.waypoint is None or workload.waypoint.key != gateway or not workload.ips:
            continue
        chains.append(
            {
                "name": f"direct-tcp|{workload.key}",
                "filter_chain_match": {
                    "prefix_ranges": [
                        {"address_prefix": ip, "prefix_len": 128 if ":" in ip else 32}
                        for ip in workload.ips
                    ]
                },
                # The local address main_internal restored is the pod's own ip:port: the
                # original_dst cluster dials its 15008 with that as the authority.
                "filters": [
                    _tcp_proxy(
                        "direct-tcp",
                        "connect_originate",
                        tunneling_config={"hostname": "%DOWNSTREAM_LOCAL_ADDRESS%"},
                    )
                ],
            }
        )
    return {
        "bootstrap_extensions": [
            {
                "name": "envoy.bootstrap.internal_listener",
                "typed_config": _any(
                    "envoy.extensions.bootstrap.internal_listener.v3.InternalListener"
                ),
            }
        ],
        "static_resources": {
            "listeners": [
                _connect_terminate(identity, access_log),
                _main_internal(chains),
                _connect_originate(),
            ],
            "clusters": clusters,
        },
        "layered_runtime": {
            "layers": [
                {
                    "name": "waypoint",
                    "static_layer": {
                        # A close on the internal side reaches the client as END_STREAM, not
                        # as a reset after the data (the brief's Envoy 1.40 findings).
                        "envoy.reloadable_features.enable_send_rst_on_user_space_socket": False
                    },
                }
            ]
        },
    }
