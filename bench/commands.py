"""`ambient-agent bench`: registered as a tool command (pyproject's entry points)."""

from __future__ import annotations

import argparse
from typing import Any


def register(sub: Any) -> None:
    bench = sub.add_parser(
        "bench", help="measure the mesh against no mesh and against Envoy on the lab"
    )
    bench.set_defaults(handler=_bench)
    bench.add_argument("--json", action="store_true", help="machine-readable result")
    bench.add_argument("--quick", action="store_true", help="short runs (for tests)")
    bench.add_argument("--policy", action="store_true",
                       help="L4 authorization: compile cost and kernel decision cost")  # fmt: skip
    bench.add_argument("--restart", action="store_true",
                       help="restart a node agent under a connection stream: restart-to-ready "
                       "and what got past the mesh meanwhile")  # fmt: skip
    bench.add_argument("--hbone-abuse", action="store_true",
                       help="what a mesh peer can make an agent hold through its HBONE port: "
                       "RSS before and after each abuse case")  # fmt: skip
    bench.add_argument("--soak", action="store_true",
                       help="hold many tunnelled connections: errors, RSS, fds")  # fmt: skip
    bench.add_argument("--connections", type=int, default=10_000,
                       help="with --soak: connections held (default 10000)")  # fmt: skip
    bench.add_argument("--minutes", type=float, default=10.0,
                       help="with --soak: how long they are held (default 10)")  # fmt: skip
    bench.add_argument("--rounds", type=int, default=5,
                       help="with --restart: rounds (default 5)")  # fmt: skip
    bench.add_argument("--name", default="bench", help="lab name (default: bench)")


def _bench(args: argparse.Namespace) -> int:
    if args.soak:
        from bench.soak import run_soak

        connections, minutes = (200, 0.1) if args.quick else (args.connections, args.minutes)
        return run_soak(args.name, connections, minutes, json_output=args.json)
    if args.hbone_abuse:
        from bench.hbone_abuse import run_abuse_bench

        return run_abuse_bench(args.name, json_output=args.json)
    if args.restart:
        from bench.restart import run_restart_bench

        return run_restart_bench(args.name, rounds=1 if args.quick else args.rounds,
                                 json_output=args.json)  # fmt: skip
    if args.policy:
        from bench.policy import run_policy_bench

        return run_policy_bench(json_output=args.json, quick=args.quick)
    from bench.datapath import run_bench

    return run_bench(args.name, json_output=args.json, quick=args.quick)
