"""`ambient-agent`: run the node agent, drive the local lab, show the demo."""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import timedelta
from pathlib import Path

from agent.config import DEFAULT_CA_DIR, DEFAULT_CNI_SOCKET, DEFAULT_STATE_ROOT
from agent.identity.spiffe import DEFAULT_TRUST_DOMAIN

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
    run.add_argument("--keep-pins", action="store_true", help="leave pins on exit")
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

    lab = sub.add_parser("lab", help="a local cluster of netns nodes and pods")
    lab_sub = lab.add_subparsers(dest="lab_command", required=True)
    up = lab_sub.add_parser("up", help="build the lab and start a node agent per node")
    up.add_argument("--topology", type=Path, help="topology YAML (docs/lab.md)")
    up.add_argument("--no-agents", action="store_true", help="build the network only")
    up.add_argument("--agent-arg", action="append", default=[], metavar="ARG",
                    help="an extra `run` argument for every agent, e.g. "
                    "--agent-arg=--otlp-endpoint=http://127.0.0.1:4317 (repeatable)")  # fmt: skip
    status = lab_sub.add_parser("status", help="show nodes, pods and agents")
    status.add_argument("--json", action="store_true")
    exe = lab_sub.add_parser("exec", help="run a command in a pod's or node's netns")
    exe.add_argument("target", help="pod or node name")
    exe.add_argument("argv", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...]")
    lab_sub.add_parser("down", help="stop agents, remove every netns and pin of the lab")
    for p in (up, status, exe, lab_sub.choices["down"]):
        p.add_argument("--name", default="lab", help="lab name (default: lab)")

    bench = sub.add_parser("bench", help="measure the mesh against no mesh on the lab")
    bench.add_argument("--json", action="store_true", help="machine-readable result")
    bench.add_argument("--quick", action="store_true", help="short runs (for tests)")
    bench.add_argument("--policy", action="store_true",
                       help="L4 authorization: compile cost and kernel decision cost")  # fmt: skip
    bench.add_argument("--name", default="bench", help="lab name (default: bench)")

    demo = sub.add_parser("demo", help="bring the lab up, show the mesh's paths, tear down")
    demo.add_argument("--json", action="store_true", help="machine-readable result")
    demo.add_argument("--name", default="demo", help="lab name (default: demo)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "run":
        return _run(args)
    if args.command == "lab":
        return _lab(args)
    if args.command == "bench":
        if args.policy:
            from agent.policy.bench import run_policy_bench

            return run_policy_bench(json_output=args.json, quick=args.quick)
        from agent.bench import run_bench

        return run_bench(args.name, json_output=args.json, quick=args.quick)
    from agent.demo import run_demo

    return run_demo(args.name, json_output=args.json)


def _run(args: argparse.Namespace) -> int:
    from agent import logs
    from agent.app import run_agent
    from agent.config import AgentConfig
    from agent.datapath import abi
    from agent.datapath.loader import DatapathError
    from agent.identity.ca import CaError
    from agent.state.kube_source import KubeSourceError
    from agent.state.local_config import ConfigError
    from agent.telemetry.otlp import OtlpError

    if args.kubeconfig and not args.kubernetes:
        print("ambient-agent: --kubeconfig needs --kubernetes", file=sys.stderr)
        return 2
    logs.configure(json_lines=args.log_format == "json")
    config = AgentConfig(
        node=args.node,
        config_file=args.config,
        kubernetes=args.kubernetes,
        kubeconfig=args.kubeconfig,
        pin_dir=args.pin_dir or abi.DEFAULT_PIN_DIR / args.node,
        state_dir=args.state_dir,
        ready_file=args.ready_file,
        keep_pins=args.keep_pins,
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


def _lab(args: argparse.Namespace) -> int:
    from agent.lab import control
    from agent.lab.network import LabError
    from agent.lab.topology import TopologyError

    try:
        if args.lab_command == "up":
            state = control.up(args.name, args.topology, agents_too=not args.no_agents,
                               agent_args=tuple(args.agent_arg))  # fmt: skip
            print(control.describe(control.status(state.name)))
        elif args.lab_command == "status":
            report = control.status(args.name)
            print(json.dumps(report, indent=2) if args.json else control.describe(report))
        elif args.lab_command == "exec":
            command = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
            if not command:
                raise LabError("lab exec needs a command: lab exec POD -- COMMAND [ARGS...]")
            argv = control.exec_argv(args.name, args.target, command)
            os.execvp(argv[0], argv)
        elif args.lab_command == "down":
            control.down(args.name)
            print(f"lab {args.name}: down")
    except (LabError, TopologyError) as exc:
        print(f"ambient-agent lab: {exc}", file=sys.stderr)
        return 1
    return 0
