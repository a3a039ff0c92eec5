"""`ambient-agent`: run the node agent, drive the local lab, show the demo."""

from __future__ import annotations

import argparse
import resource
import sys
from datetime import timedelta
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path

from agent.config import DEFAULT_CA_DIR, DEFAULT_CNI_SOCKET, DEFAULT_STATE_ROOT, ON_EXIT
from agent.identity.spiffe import DEFAULT_TRUST_DOMAIN

# Entry points of this group add a subcommand: a callable taking the subparsers.
TOOL_COMMANDS = "ambient_agent.commands"

EPILOG = """examples:
  ambient-agent run --config mesh.yaml --node node-1     run a node agent
  ambient-agent lab up                                   2 nodes, 4 enrolled pods, 1 outsider
  ambient-agent lab status --json                        nodes and pods with netns and IP
  ambient-agent lab exec client-a -- ip addr             a command inside a pod (or node)
  ambient-agent lab down                                 remove everything the lab made
  ambient-agent demo                                     lab up, show the mesh's paths, down
  ambient-agent bench                                    mesh vs no mesh: throughput, latency
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ambient-agent",
        description="Node agent of an Istio-ambient-style mesh with an eBPF datapath.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the node agent")
    source = run.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", type=Path, help="local config file (YAML)")
    source.add_argument("--kubernetes", action="store_true",
                        help="follow the Kubernetes API (in-cluster, or --kubeconfig)")  # fmt: skip
    run.add_argument("--kubeconfig", type=Path, help="with --kubernetes: a kubeconfig file")
    run.add_argument("--node", required=True, help="this node's name, as in the config")
    run.add_argument("--pin-dir", type=Path, help="bpffs directory for pins "
                     "(default /sys/fs/bpf/ambient/<node>)")  # fmt: skip
    run.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_ROOT)
    run.add_argument("--ready-file", type=Path, help="written once pods are enrolled")
    run.add_argument("--on-exit", choices=ON_EXIT, default="keep",
                     help="keep: pods stay captured, programs and maps pinned, for the next "
                     "agent (default); unenroll: undo everything")  # fmt: skip
    run.add_argument("--dns-capture", type=_boolean, default=True, metavar="true|false",
                     help="answer the pods' DNS for mesh Service names (default true)")  # fmt: skip
    run.add_argument("--ca-dir", type=Path, default=DEFAULT_CA_DIR,
                     help="built-in CA state; agents sharing it trust each other")  # fmt: skip
    run.add_argument("--trust-domain", default=DEFAULT_TRUST_DOMAIN)
    run.add_argument("--admin-address", default="127.0.0.1",
                     help="address of the config dump port 15000 (default loopback)")  # fmt: skip
    run.add_argument("--cut-denied-connections", action="store_true",
                     help="on a policy change, also reset live connections it denies")  # fmt: skip
    run.add_argument("--cert-ttl", type=float, default=24 * 3600,
                     help="workload certificate lifetime in seconds (rotated at half)")  # fmt: skip
    run.add_argument("--log-format", choices=("json", "console"), default="json")
    run.add_argument("--otlp-endpoint", help="export metrics over OTLP to this endpoint "
                     "(http://host:port); default: no export")  # fmt: skip
    run.add_argument("--otlp-protocol", choices=("grpc", "http/protobuf"), default="grpc")
    run.add_argument("--cni-socket", default=str(DEFAULT_CNI_SOCKET),
                     help="ambient-cni's socket (default %(default)s; '' for none)")  # fmt: skip
    run.add_argument("--otlp-interval", type=float, default=10.0,
                     help="seconds between OTLP exports (default 10)")  # fmt: skip

    waypoint = sub.add_parser("waypoint", help="run a waypoint: Envoy for one Gateway's L7")
    waypoint.add_argument(
        "--gateway",
        required=True,
        metavar="NAMESPACE/NAME",
        help="the waypoint Gateway (gatewayClassName istio-waypoint)",
    )
    wp_source = waypoint.add_mutually_exclusive_group(required=True)
    wp_source.add_argument("--config", type=Path, help="local config file (YAML)")
    wp_source.add_argument(
        "--kubernetes",
        action="store_true",
        help="follow the Kubernetes API (in-cluster, or --kubeconfig)",
    )
    waypoint.add_argument("--kubeconfig", type=Path, help="with --kubernetes: a kubeconfig file")
    waypoint.add_argument(
        "--run-dir",
        type=Path,
        help="Envoy's config, secrets and admin "
        "socket (default /run/ambient-waypoint/<namespace>-<name>)",
    )
    waypoint.add_argument(
        "--service-account",
        default="",
        help="the waypoint's identity (default: the Gateway's name)",
    )
    waypoint.add_argument("--ca-dir", type=Path, default=DEFAULT_CA_DIR)
    waypoint.add_argument("--trust-domain", default=DEFAULT_TRUST_DOMAIN)
    waypoint.add_argument(
        "--cert-ttl",
        type=float,
        default=24 * 3600,
        help="certificate lifetime in seconds (rotated at half)",
    )
    waypoint.add_argument("--concurrency", type=int, default=2, help="Envoy worker threads")
    waypoint.add_argument(
        "--admin-address",
        default="127.0.0.1",
        help="address of the config dump port 15000 (default loopback)",
    )
    waypoint.add_argument("--log-format", choices=("json", "console"), default="json")

    for command in _tool_commands():
        command.load()(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "run":
        return _run(args)
    if args.command == "waypoint":
        return _waypoint(args)
    # A tool command (lab, demo, bench) registered itself with its handler.
    result: int = args.handler(args)
    return result


def _tool_commands() -> list[EntryPoint]:
    """The commands of the tooling beside the runtime (lab/, bench/): they import the agent,
    never the other way round, so the agent finds them as installed entry points."""
    return sorted(entry_points(group=TOOL_COMMANDS), key=lambda e: e.name)


def _run(args: argparse.Namespace) -> int:
    from agent import logs
    from agent.app import run_agent
    from agent.config import AgentConfig
    from agent.datapath import abi
    from agent.datapath.loader import DatapathError
    from agent.identity.ca import CaError
    from agent.sources.kube_errors import KubeSourceError
    from agent.sources.local_config import ConfigError
    from agent.telemetry.otlp_endpoint import OtlpError

    if args.kubeconfig and not args.kubernetes:
        print("ambient-agent: --kubeconfig needs --kubernetes", file=sys.stderr)
        return 2
    logs.configure(json_lines=args.log_format == "json")
    # Every proxied connection holds two sockets: the soft fd limit (often 1024) is no limit
    # for the agent to stop at, the hard one is.
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    config = AgentConfig(
        node=args.node,
        config_file=args.config,
        kubernetes=args.kubernetes,
        kubeconfig=args.kubeconfig,
        pin_dir=args.pin_dir or abi.DEFAULT_PIN_DIR / args.node,
        state_dir=args.state_dir,
        ready_file=args.ready_file,
        on_exit=args.on_exit,
        dns_capture=args.dns_capture,
        ca_dir=args.ca_dir,
        trust_domain=args.trust_domain,
        certificate_ttl=timedelta(seconds=args.cert_ttl),
        cut_denied_connections=args.cut_denied_connections,
        admin_address=args.admin_address,
        otlp_endpoint=args.otlp_endpoint,
        otlp_protocol=args.otlp_protocol,
        otlp_interval=args.otlp_interval,
        cni_socket=Path(args.cni_socket) if args.cni_socket else None,
    )
    try:
        return run_agent(config)
    except (DatapathError, ConfigError, CaError, OtlpError, KubeSourceError) as exc:
        print(f"ambient-agent: {exc}", file=sys.stderr)
        return 2


def _waypoint(args: argparse.Namespace) -> int:
    from agent import logs
    from agent.identity.ca import CaError
    from agent.sources.kube_errors import KubeSourceError
    from agent.sources.local_config import ConfigError
    from agent.waypoint_app import WaypointConfig, WaypointError, parse_gateway, run_waypoint

    if args.kubeconfig and not args.kubernetes:
        print("ambient-agent: --kubeconfig needs --kubernetes", file=sys.stderr)
        return 2
    logs.configure(json_lines=args.log_format == "json")
    try:
        gateway = parse_gateway(args.gateway)
        namespace, _, name = gateway.partition("/")
        config = WaypointConfig(
            gateway=gateway,
            run_dir=args.run_dir or Path("/run/ambient-waypoint") / f"{namespace}-{name}",
            config_file=args.config,
            kubernetes=args.kubernetes,
            kubeconfig=args.kubeconfig,
            service_account=args.service_account,
            ca_dir=args.ca_dir,
            trust_domain=args.trust_domain,
            certificate_ttl=timedelta(seconds=args.cert_ttl),
            concurrency=args.concurrency,
            admin_address=args.admin_address,
        )
        return run_waypoint(config)
    except (WaypointError, ConfigError, CaError, KubeSourceError) as exc:
        print(f"ambient-agent: {exc}", file=sys.stderr)
        return 2


def _boolean(text: str) -> bool:
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not true or false")
