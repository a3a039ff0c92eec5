"""`ambientctl`: read what the kernel decided, from the pinned maps, through bpftool; and make,
apply and inspect waypoints.

Going through bpftool (not the agent) means the figures are the kernel's own, and work while
the agent is down or stuck. `ambientctl waypoint generate|apply` writes or applies the objects
of agent/waypoint/manifests.py (like `istioctl waypoint generate|apply`); `ambientctl waypoint
status` reads a running waypoint's config dump (its admin port 15000).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.datapath import abi
from agent.datapath.abi import PolicyReason, VerdictReason
from agent.state.waypoint import WaypointFor
from agent.waypoint.manifests import (
    DEFAULT_IMAGE,
    DEFAULT_NAME,
    Manifest,
    to_yaml,
    waypoint_objects,
)

EPILOG = """examples:
  ambientctl pins                          every agent's pinned programs and maps
  ambientctl pods                          enrolled pods and their capture counters
  ambientctl verdicts --pin-dir /sys/fs/bpf/ambient/lab/node-1
  ambientctl verdicts --json
  ambientctl policies                      L4 authorization decisions per policy, from the kernel
  ambientctl connections                   the agent's open TCP connections as sockops sees them,
                                           and the telemetry ring's sent/dropped counters
  ambientctl ebpf                          the C source the agent hands to BCC
  ambientctl waypoint generate -n default  a waypoint's objects as YAML (kubectl apply -f -)
  ambientctl waypoint apply -n default --for all
                                           the same, applied (server-side) to the cluster
  ambientctl waypoint status               a waypoint's config dump (127.0.0.1:15000), e.g.
                                           after kubectl port-forward deploy/waypoint 15000

the maps also print field by field with bpftool itself:
  bpftool map dump pinned /sys/fs/bpf/ambient/<node>/maps/pods
"""


class CtlError(Exception):
    """What ambientctl could not do; `exit_code` is what it exits with."""

    exit_code = 1


class UnreachableError(CtlError):
    """No cluster (or waypoint) to talk to: not configured, or not answering."""

    exit_code = 2


class UsageError(CtlError):
    """Arguments that make no waypoint (exit 2, as argparse's own errors)."""

    exit_code = 2


KERNEL_COMMANDS = {
    "pins": "every agent's pinned programs and maps",
    "pods": "enrolled pods and their capture counters",
    "verdicts": "the datapath's verdict counters",
    "policies": "L4 authorization decisions per policy, from the kernel",
    "connections": "the agent's open TCP connections and the telemetry ring's counters",
    "ebpf": "the C source the agent hands to BCC",
    "data-path": "what carries HBONE bytes on this node: userspace TLS, cipher, kTLS",
}
DEFAULT_ADMIN = "127.0.0.1:15000"
FIELD_MANAGER = "ambientctl"
APPLY_PATCH = "application/apply-patch+yaml"
GATEWAY_API_INSTALL = "https://gateway-api.sigs.k8s.io/guides/#installing-gateway-api"


def pin_dirs(root: Path = abi.DEFAULT_PIN_DIR) -> list[Path]:
    """Every agent instance under root: a directory with maps/ and progs/."""
    if not root.exists():
        return []
    return sorted(p.parent for p in root.rglob("maps") if (p.parent / "progs").is_dir())


def bpftool_dump(map_pin: Path) -> list[dict[str, Any]]:
    if shutil.which("bpftool") is None:
        raise CtlError("bpftool not found: apt-get install bpftool")
    done = subprocess.run(
        ["bpftool", "-j", "map", "dump", "pinned", str(map_pin)], capture_output=True, text=True
    )
    if done.returncode != 0:
        raise CtlError(f"bpftool map dump pinned {map_pin}: {done.stderr.strip()}")
    entries: list[dict[str, Any]] = json.loads(done.stdout or "[]")
    return entries


def read_pods(pin_dir: Path) -> list[dict[str, Any]]:
    pods = []
    for entry in bpftool_dump(pin_dir / "maps" / "pods"):
        key, value = entry["formatted"]["key"], entry["formatted"]["value"]
        pods.append(
            {
                "ip": _ip(key["addr"]),
                "capture": bool(value["flags"] & abi.POD_CAPTURE),
                "dns_capture": bool(value["flags"] & abi.POD_CAPTURE_DNS),
                "outbound_captured": value["outbound_captured"],
                "inbound_captured": value["inbound_captured"],
            }
        )
    return sorted(pods, key=lambda p: socket.inet_aton(p["ip"]))


def read_verdicts(pin_dir: Path) -> dict[str, int]:
    counts = {}
    for entry in bpftool_dump(pin_dir / "maps" / "verdicts"):
        formatted = entry["formatted"]
        total = sum(int(cpu["value"]) for cpu in formatted["values"])
        counts[VerdictReason(int(formatted["key"])).name] = total
    return counts


def read_policy_decisions(pin_dir: Path) -> list[dict[str, Any]]:
    """Decisions the kernel counted, per policy and reason, with the policies' names."""
    names = {
        int(entry["formatted"]["key"]): _c_string(entry["formatted"]["value"]["name"])
        for entry in bpftool_dump(pin_dir / "maps" / "policy_names")
    }
    rows = []
    for entry in bpftool_dump(pin_dir / "maps" / "policy_stats"):
        key = entry["formatted"]["key"]
        count = sum(int(cpu["value"]) for cpu in entry["formatted"]["values"])
        policy = int(key["policy"])
        rows.append({
            "policy": names.get(policy, "-") if policy else "-",
            "reason": PolicyReason.label_of(int(key["reason"])),
            "count": count,
        })  # fmt: skip
    return sorted(rows, key=lambda r: (r["policy"], r["reason"]))


def read_connections(pin_dir: Path) -> dict[str, Any]:
    """Open connections of the agent's sockets (sock_conns) and the telemetry counters."""
    now_ns = time.clock_gettime_ns(time.CLOCK_MONOTONIC)  # bpf_ktime_get_ns's clock
    open_connections = []
    for entry in bpftool_dump(pin_dir / "maps" / "sock_conns"):
        value = entry["formatted"]["value"]
        open_connections.append({
            "cookie": int(entry["formatted"]["key"]),
            "local": f"{_ip(value['local_addr'])}:{value['local_port']}",
            "remote": f"{_ip(value['remote_addr'])}:{value['remote_port']}",
            "accepted": bool(value["passive"]),
            "age_s": round((now_ns - int(value["opened_ns"])) / 1e9, 3),
        })  # fmt: skip
    stats = {
        abi.TelemetryStat(int(entry["formatted"]["key"])).name.lower(): sum(
            int(cpu["value"]) for cpu in entry["formatted"]["values"]
        )
        for entry in bpftool_dump(pin_dir / "maps" / "telemetry_stats")
    }
    return {"open": sorted(open_connections, key=lambda c: c["age_s"]), "telemetry": stats}


def _ip(network_order: Any) -> str:
    return socket.inet_ntoa(int(network_order).to_bytes(4, "little"))


def _c_string(value: Any) -> str:
    """bpftool prints a char array as a string or as a list of numbers, by version."""
    if isinstance(value, str):
        return value
    return bytes(int(c) for c in value).split(b"\0", 1)[0].decode(errors="replace")


def _targets(args: argparse.Namespace) -> list[Path]:
    if args.pin_dir is not None:
        if not (args.pin_dir / "maps").is_dir():
            raise CtlError(f"{args.pin_dir}: no pinned maps there (is the agent running?)")
        return [args.pin_dir]
    found = pin_dirs()
    if not found:
        raise CtlError(f"no agent pins under {abi.DEFAULT_PIN_DIR} (is an agent running?)")
    return found


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ambientctl",
        description="Inspect the ambient agent's kernel state; make and inspect waypoints.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[_common_options(None, False)],
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, text in KERNEL_COMMANDS.items():
        # Before or after the command (`ambientctl --json pods` as before): the command's
        # copies leave the value alone unless given.
        common = _common_options(argparse.SUPPRESS, argparse.SUPPRESS)
        sub.add_parser(name, help=text, description=text, parents=[common])

    waypoint = sub.add_parser("waypoint", help="generate, apply or inspect a waypoint")
    actions = waypoint.add_subparsers(dest="waypoint_command", required=True, metavar="ACTION")
    objects = argparse.ArgumentParser(add_help=False)
    objects.add_argument("-n", "--namespace", required=True, help="the waypoint's namespace")
    objects.add_argument(
        "--name",
        default=DEFAULT_NAME,
        help="the Gateway's name, also its ServiceAccount's, Deployment's and "
        "Service's (default %(default)s)",
    )
    objects.add_argument(
        "--for",
        dest="waypoint_for",
        default=WaypointFor.SERVICE.value,
        choices=[w.value for w in WaypointFor],
        help="the traffic it takes: istio.io/waypoint-for (default %(default)s)",
    )
    objects.add_argument(
        "--allow-only-waypoint",
        action="store_true",
        help="deny, in the kernel, traffic that goes around the waypoint "
        "(the ambient.istio.io/allow-only-waypoint annotation)",
    )
    objects.add_argument(
        "--image",
        default=DEFAULT_IMAGE,
        help="the agent's image, with Envoy in it (default %(default)s)",
    )
    actions.add_parser(
        "generate",
        parents=[objects],
        help="print the waypoint's objects as YAML",
        description="Print a waypoint's ServiceAccount, ClusterRole and binding, Deployment, "
        "Service and Gateway as one YAML stream, for kubectl apply -f -.",
    )
    apply = actions.add_parser(
        "apply",
        parents=[objects],
        help="apply the waypoint's objects to the cluster",
        description="Apply a waypoint's objects with server-side apply (field manager "
        f"{FIELD_MANAGER}, conflicts forced). Exits 2 when no cluster can be reached, 1 when "
        "the API server refuses an object.",
    )
    apply.add_argument(
        "--kubeconfig", type=Path, help="default: $KUBECONFIG, ~/.kube/config, else in-cluster"
    )
    status = actions.add_parser(
        "status",
        help="what a running waypoint has in force, from its config dump",
        description="Read a waypoint's config dump (GET http://HOST:PORT/config_dump) and show "
        "its Gateway, identity, Envoy's config versions, bound services and routes.",
    )
    status.add_argument(
        "--admin",
        default=DEFAULT_ADMIN,
        metavar="HOST:PORT",
        help="the waypoint's admin address (default %(default)s; in a cluster: "
        "kubectl -n NS port-forward deploy/NAME 15000)",
    )
    status.add_argument(
        "--json",
        action="store_true",
        default=argparse.SUPPRESS,
        help="print the config dump as it is",
    )
    return parser


def _common_options(pin_dir: Any, json_default: Any) -> argparse.ArgumentParser:
    """--pin-dir and --json, each time anew: parents share their actions, defaults included."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--pin-dir", type=Path, default=pin_dir, help="one agent's pin directory")
    common.add_argument("--json", action="store_true", default=json_default)
    return common


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "waypoint":
        try:
            return _waypoint(args)
        except CtlError as exc:
            print(f"ambientctl: {exc}", file=sys.stderr)
            return exc.exit_code
    if args.command == "data-path":
        from agent.hbone.data_path import probe

        labels = probe().labels()
        if args.json:
            print(json.dumps(labels, indent=2))
        else:
            for key, value in labels.items():
                print(f"{key:<14}{value}")
        return 0
    if args.command == "ebpf":
        from agent.datapath.loader import render_source

        print(f"/* compiled by the agent with: {' '.join(abi.cflags())} */")
        print(render_source())
        return 0
    try:
        report: dict[str, Any] = {}
        for pin_dir in _targets(args):
            if args.command == "pins":
                report[str(pin_dir)] = sorted(
                    str(p.relative_to(pin_dir)) for p in pin_dir.rglob("*") if not p.is_dir()
                )
            elif args.command == "pods":
                report[str(pin_dir)] = read_pods(pin_dir)
            elif args.command == "policies":
                report[str(pin_dir)] = read_policy_decisions(pin_dir)
            elif args.command == "connections":
                report[str(pin_dir)] = read_connections(pin_dir)
            else:
                report[str(pin_dir)] = read_verdicts(pin_dir)
    except CtlError as exc:
        print(f"ambientctl: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    for pin_dir_name, body in report.items():
        print(pin_dir_name)
        if args.command == "pins":
            for name in body:
                print(f"  {name}")
        elif args.command == "pods":
            print(f"  {'ip':<16}{'capture':<9}{'dns':<5}{'outbound':>10}{'inbound':>10}")
            for pod in body:
                print(
                    f"  {pod['ip']:<16}{'yes' if pod['capture'] else 'no':<9}"
                    f"{'yes' if pod['dns_capture'] else 'no':<5}"
                    f"{pod['outbound_captured']:>10}{pod['inbound_captured']:>10}"
                )
        elif args.command == "policies":
            print(f"  {'policy':<40}{'decision':<22}{'connections':>12}")
            for row in body:
                print(f"  {row['policy']:<40}{row['reason']:<22}{row['count']:>12}")
        elif args.command == "connections":
            print("  telemetry: " + ", ".join(f"{k} {v}" for k, v in body["telemetry"].items()))
            print(f"  {'local':<23}{'remote':<23}{'side':<10}{'age (s)':>10}")
            for conn in body["open"]:
                side = "accepted" if conn["accepted"] else "connected"
                print(f"  {conn['local']:<23}{conn['remote']:<23}{side:<10}{conn['age_s']:>10}")
        else:
            for reason, count in body.items():
                if count:
                    print(f"  {reason:<30}{count:>12}")
    return 0


# --- waypoint ----------------------------------------------------------------------------------


def _waypoint(args: argparse.Namespace) -> int:
    if args.waypoint_command == "status":
        dump = read_config_dump(args.admin)
        if args.json:
            print(json.dumps(dump, indent=2))
        else:
            print(format_status(dump), end="")
        return 0
    try:
        objects = waypoint_objects(
            args.namespace, args.name, args.waypoint_for, args.image, args.allow_only_waypoint
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if args.waypoint_command == "generate":
        print(to_yaml(objects), end="")
        return 0
    apply_objects(kube_api_client(args.kubeconfig), objects, print)
    print(f"waypoint {args.namespace}/{args.name} applied")
    return 0


def kube_api_client(kubeconfig: Path | None) -> Any:
    """A client for `kubeconfig`'s current context; without one, as kubectl: $KUBECONFIG or
    ~/.kube/config, else the pod's service account."""
    import kubernetes.client
    import kubernetes.config

    configuration = kubernetes.client.Configuration()
    # The loaders have no type hints (the generated client has): hence the ignores.
    try:
        kubernetes.config.load_kube_config(  # type: ignore[no-untyped-call]
            config_file=str(kubeconfig) if kubeconfig is not None else _default_kubeconfig(),
            client_configuration=configuration,
        )
    except (kubernetes.config.ConfigException, OSError) as exc:
        if kubeconfig is not None:
            raise UnreachableError(f"cannot use kubeconfig {kubeconfig}: {exc}") from None
        try:
            kubernetes.config.load_incluster_config(  # type: ignore[no-untyped-call]
                client_configuration=configuration
            )
        except kubernetes.config.ConfigException as in_cluster:
            raise UnreachableError(
                f"no cluster configured: no usable kubeconfig ({exc}) and not in a pod "
                f"({in_cluster}); pass --kubeconfig"
            ) from None
    configuration.retries = 1  # an unreachable server is reported at once, not in a minute
    return kubernetes.client.ApiClient(configuration)


def _default_kubeconfig() -> str:
    return os.environ.get("KUBECONFIG") or str(Path.home() / ".kube" / "config")


def apply_objects(api: Any, objects: list[Manifest], report: Callable[[str], None]) -> None:
    """Server-side apply each object, in order; `report` is told of each one applied. Raises
    UnreachableError when the API server does not answer, CtlError when it refuses one."""
    import urllib3
    from kubernetes.client.exceptions import ApiException

    for obj in objects:
        kind, name = obj["kind"], obj["metadata"]["name"]
        try:
            _apply_call(api, obj)(
                field_manager=FIELD_MANAGER,
                force=True,
                field_validation="Strict",
                _content_type=APPLY_PATCH,
                _request_timeout=(5, 30),
            )
        except ApiException as exc:
            raise CtlError(_refused(obj, exc)) from None
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            host = api.configuration.host
            raise UnreachableError(
                f"cannot reach the Kubernetes API at {host}: {type(exc).__name__}: {exc}"
            ) from None
        report(f"{kind.lower()}/{name} applied")


def _apply_call(api: Any, obj: Manifest) -> Callable[..., Any]:
    """The client's patch call for `obj` (its kind), with everything but the options bound."""
    import kubernetes.client

    kind, name = obj["kind"], obj["metadata"]["name"]
    namespace = obj["metadata"].get("namespace", "")
    group, _, version = obj["apiVersion"].rpartition("/")
    core = kubernetes.client.CoreV1Api(api)
    rbac = kubernetes.client.RbacAuthorizationV1Api(api)
    apps = kubernetes.client.AppsV1Api(api)
    custom = kubernetes.client.CustomObjectsApi(api)
    calls: dict[str, Callable[..., Any]] = {
        "ServiceAccount": lambda **kw: core.patch_namespaced_service_account(
            name, namespace, obj, **kw
        ),
        "ClusterRole": lambda **kw: rbac.patch_cluster_role(name, obj, **kw),
        "ClusterRoleBinding": lambda **kw: rbac.patch_cluster_role_binding(name, obj, **kw),
        "Deployment": lambda **kw: apps.patch_namespaced_deployment(name, namespace, obj, **kw),
        "Service": lambda **kw: core.patch_namespaced_service(name, namespace, obj, **kw),
        "Gateway": lambda **kw: custom.patch_namespaced_custom_object(
            group, version, namespace, "gateways", name, obj, **kw
        ),
    }
    if kind not in calls:
        raise CtlError(f"cannot apply a {kind}")
    return calls[kind]


def _refused(obj: Manifest, exc: Any) -> str:
    """Why the API server refused `obj`, in a line, with the way out where it is known."""
    kind, name = obj["kind"], obj["metadata"]["name"]
    namespace = obj["metadata"].get("namespace")
    where = f"{kind.lower()}/{name}" + (f" in {namespace}" if namespace else "")
    try:
        status = json.loads(exc.body or "")
    except (TypeError, ValueError):
        status = None
    if not isinstance(status, dict) or status.get("kind") != "Status":
        status = {}
    message = str(status.get("message") or exc.reason or "").strip()
    if exc.status == 404 and (status.get("details") or {}).get("kind") == "namespaces":
        return f"{where}: namespace {namespace} does not exist (kubectl create namespace)"
    if exc.status == 404 and kind == "Gateway":
        # No Status object: the API server has no such resource at all.
        return (
            f"{where}: the cluster has no Gateway API (gateways.gateway.networking.k8s.io); "
            f"install its CRDs first: {GATEWAY_API_INSTALL}"
        )
    if exc.status == 403:
        return f"{where}: forbidden: {message}"
    return f"{where}: HTTP {exc.status}: {message}"


def read_config_dump(admin: str, timeout: float = 5.0) -> dict[str, Any]:
    """GET http://ADMIN/config_dump of a waypoint (or node agent)."""
    host, colon, port = admin.rpartition(":")
    if not colon or not host or not port.isdigit():
        raise UsageError(f"--admin {admin!r} must be HOST:PORT")
    url = f"http://{admin}/config_dump"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            body = response.read()
    except urllib.error.HTTPError as exc:
        raise CtlError(f"{url}: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise UnreachableError(
            f"cannot reach the admin port at {admin}: {reason} (is the waypoint running? in "
            "a cluster: kubectl -n NS port-forward deploy/NAME 15000)"
        ) from None
    try:
        dump = json.loads(body)
    except ValueError as exc:
        raise CtlError(f"{url}: not JSON: {exc}") from None
    if not isinstance(dump, dict):
        raise CtlError(f"{url}: not a config dump (a JSON object)")
    return dump


def format_status(dump: dict[str, Any]) -> str:
    """A waypoint's config dump (agent/waypoint_app.py, config_dump()) for people."""
    lines: list[str] = []
    add = lines.append
    if "gateway" not in dump:
        raise CtlError("not a waypoint's config dump (no gateway): a node agent's admin port?")
    envoy = dump.get("envoy") or {}
    in_force = envoy.get("in_force") or {}
    latest = envoy.get("latest_version") or ""
    rejections = envoy.get("rejections") or []
    add(f"gateway      {dump['gateway']}")
    add(f"identity     {dump.get('identity', '-')}")
    add(f"certificate  expires {dump.get('certificate_expires') or '- (none yet)'}")
    pid = envoy.get("pid")
    warming = envoy.get("warming") or 0
    add(
        f"envoy        {'pid ' + str(pid) if pid else 'not running'}, "
        f"{'live' if envoy.get('live') else 'not live'}, {envoy.get('restarts', 0)} restarts"
        + (f", {warming} listener(s) warming" if warming else "")
    )
    listeners, clusters = in_force.get("listeners") or "-", in_force.get("clusters") or "-"
    if latest and listeners == clusters == latest:
        verdict = "up to date"
    elif rejections and rejections[-1].get("version") == latest:
        verdict = "latest rejected: the last good one stays in force"
    else:
        verdict = "latest not taken yet"
    add(
        f"config       latest {latest or '-'}; in force: listeners {listeners}, "
        f"clusters {clusters} ({verdict})"
    )
    if rejections:
        add(f"rejections   {len(rejections)} (last ones)")
        for rejection in rejections:
            add(f"  {rejection.get('version', '-')}: {rejection.get('reason', '')}")
    else:
        add("rejections   none")

    services = dump.get("services") or []
    add(f"services     {len(services)} bound")
    for service in services:
        add(f"  {service['service']}  VIPs {', '.join(service.get('vips') or []) or '-'}")
        for port, protocol in (service.get("ports") or {}).items():
            add(f"    port {port:<6} {protocol}")
        add(f"    routes     {', '.join(service.get('routes') or []) or '-'}")
        add(f"    policies   {', '.join(service.get('policies') or []) or '-'}")
    workloads = dump.get("workloads") or []
    add(f"workloads    {len(workloads)} bound{': ' if workloads else ''}{', '.join(workloads)}")

    routes = dump.get("routes") or []
    add(f"routes       {len(routes)}")
    for route in routes:
        add(f"  {route['route']}")
        for parent in route.get("parents") or []:
            add(f"    parent {parent.get('parentRef', '-')}")
            for condition in parent.get("conditions") or []:
                explained = condition.get("reason", "")
                if condition.get("message"):
                    explained += f": {condition['message']}"
                add(
                    f"      {condition.get('type', '-'):<13} {condition.get('status', '-'):<6} "
                    f"{explained}"
                )
    policies = dump.get("policies") or []
    names = [
        f"{(p.get('metadata') or {}).get('namespace', '-')}/{(p.get('metadata') or {}).get('name')}"
        for p in policies
    ]
    add(f"policies     {len(policies)}{': ' if names else ''}{', '.join(names)}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
