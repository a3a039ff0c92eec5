"""`ambient-agent lab` and `ambient-agent demo`: registered as tool commands (pyproject's
entry points), so the agent's CLI offers them without importing the lab."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

SubParsers = Any  # argparse._SubParsersAction, not exported


def register_lab(sub: SubParsers) -> None:
    lab = sub.add_parser("lab", help="a local cluster of netns nodes and pods")
    lab.set_defaults(handler=_lab)
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


def register_demo(sub: SubParsers) -> None:
    demo = sub.add_parser("demo", help="bring the lab up, show the mesh's paths, tear down")
    demo.set_defaults(handler=_demo)
    demo.add_argument("--json", action="store_true", help="machine-readable result")
    demo.add_argument("--name", default="demo", help="lab name (default: demo)")


def _demo(args: argparse.Namespace) -> int:
    from lab.demo import run_demo

    return run_demo(args.name, json_output=args.json)


def _lab(args: argparse.Namespace) -> int:
    from lab import control
    from lab.network import LabError
    from lab.topology import TopologyError

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
