"""`ambientctl`: read what the kernel decided, from the pinned maps, through bpftool.

Going through bpftool (not the agent) means the figures are the kernel's own, and work while
the agent is down or stuck.
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from agent.datapath import abi
from agent.datapath.abi import PolicyReason, VerdictReason

EPILOG = """examples:
  ambientctl pins                          every agent's pinned programs and maps
  ambientctl pods                          enrolled pods and their capture counters
  ambientctl verdicts --pin-dir /sys/fs/bpf/ambient/lab/node-1
  ambientctl verdicts --json
  ambientctl policies                      L4 authorization decisions per policy, from the kernel
  ambientctl connections                   the agent's open TCP connections as sockops sees them,
                                           and the telemetry ring's sent/dropped counters
  ambientctl ebpf                          the C source the agent hands to BCC

the maps also print field by field with bpftool itself:
  bpftool map dump pinned /sys/fs/bpf/ambient/<node>/maps/pods
"""


class CtlError(Exception):
    pass


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="ambientctl",
        description="Inspect the ambient agent's kernel state.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "command", choices=("pins", "pods", "verdicts", "policies", "connections", "ebpf")
    )
    parser.add_argument("--pin-dir", type=Path, help="one agent's pin directory")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
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


if __name__ == "__main__":
    raise SystemExit(main())
