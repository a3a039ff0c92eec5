"""`ambient-agent bench` on the real kernel, in quick mode: every figure for all three modes
(baseline, envoy, mesh), and nothing left behind (namespaces, pins, agents, Envoys, servers),
whether it finishes or is interrupted."""

from __future__ import annotations

import json
import os
import secrets
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench import datapath as bench
from lab import agents, control

pytestmark = pytest.mark.kernel

REPO = Path(__file__).resolve().parents[2]
# Children inherit the environment: this marker finds every process a bench run started,
# even one that outlived it (reparented, its netns already gone), without mistaking another
# session's iperf3 for ours.
MARKER = "AMBIENT_BENCH_TEST"


@pytest.fixture
def lab_name() -> Iterator[str]:
    name = "tb" + secrets.token_hex(3)
    yield name
    control.down(name)  # only does something if the test failed before the bench cleaned up


def marked_processes(value: str) -> list[str]:
    wanted = f"{MARKER}={value}".encode()
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue  # exited meanwhile
        if wanted in environ and cmdline:  # zombies have an empty cmdline
            found.append(f"{proc.name}: {cmdline}")
    return found


def assert_nothing_left(name: str) -> None:
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert f"{name}-" not in netns
    assert agents.lab_agent_pids(name) == []
    assert not agents.lab_pin_root(name).exists()
    assert not agents.lab_dir(name).exists()
    assert bench.envoy_pids(name) == []
    assert marked_processes(name) == []


def test_quick_bench_measures_all_modes_and_cleans_up(
    lab_name: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(MARKER, lab_name)
    code = bench.run_bench(lab_name, json_output=True, quick=True)
    out = capsys.readouterr()
    assert code == 0, out.err
    report = json.loads(out.out)  # progress goes to stderr: stdout is the JSON alone
    assert report["ok"] is True and report["quick"] is True
    assert report["order"] == ["baseline 1", "envoy 1", "mesh 1"]
    assert set(report["metrics"]) == {metric.key for metric in bench.METRICS}
    for key, row in report["metrics"].items():
        for mode in bench.MODES:
            assert isinstance(row[mode], float) and row[mode] > 0, (key, mode, row)
        assert row["mesh_over_baseline"] == pytest.approx(row["mesh"] / row["baseline"])
        assert row["mesh_over_envoy"] == pytest.approx(row["mesh"] / row["envoy"])
    details = report["details"]
    # The envoy and mesh figures went through their proxies: each destination's server Envoy
    # answered CONNECTs for it, each destination node's agent delivered it.
    for mode in ("envoy", "mesh"):
        tunnelled = details[mode]["tunnelled"]
        assert set(tunnelled) == {"cross_node_throughput", "same_node_throughput", "echo"}
        # Every connection the clients made went through the proxies: iperf3's control and
        # data connections per run, the RR connection and each new one.
        assert tunnelled["cross_node_throughput"] >= 2 and tunnelled["same_node_throughput"] >= 2
        assert tunnelled["echo"] >= 1 + details[mode]["connections"], (mode, tunnelled)
    assert details["baseline"]["tunnelled"] == {}
    for mode in bench.MODES:
        # Each run started without the earlier runs' TIME_WAIT sockets.
        assert details[mode]["time_wait_left"] == 0
        assert details[mode]["rr_samples"] >= 10
        assert details[mode]["connections"] > 0
        for runs in details[mode]["throughput_runs"].values():
            assert [run["round"] for run in runs] == [1]
            assert runs[0]["bytes_received"] > 0
    # CPU per GB and per 1,000 connections: all CPUs in every mode, the proxies' own where
    # there are proxies; peak RSS of each agent and each Envoy.
    resources = report["resources"]
    for mode in bench.MODES:
        costs = [
            *resources[mode]["cpu_seconds_per_gb"].values(),
            resources[mode]["cpu_seconds_per_1000_connections"],
        ]
        for cost in costs:
            assert cost["system"] > 0, (mode, cost)
            if mode == "baseline":
                assert cost["proxies"] is None, cost
            else:
                assert cost["proxies"] > 0, (mode, cost)
    assert resources["baseline"]["peak_rss_mib"] == {}
    assert set(resources["envoy"]["peak_rss_mib"]) == {
        "envoy client-a",
        "envoy server-a",
        "envoy server-b",
    }
    assert set(resources["mesh"]["peak_rss_mib"]) == {"agent node-1", "agent node-2"}
    for mode in ("envoy", "mesh"):
        assert all(rss > 1 for rss in resources[mode]["peak_rss_mib"].values()), resources[mode]
    table = bench.format_table(report)
    # The table shows the report's own figures: the mesh's connections/s and its ratio.
    connections = report["metrics"]["connections_per_second"]
    row = next(line for line in table.splitlines() if line.startswith("new connections/s"))
    assert row.split()[2:] == [
        f"{connections['baseline']:.0f}", f"{connections['envoy']:.0f}",
        f"{connections['mesh']:.0f}", f"{connections['mesh_over_baseline']:.3f}",
        f"{connections['mesh_over_envoy']:.3f}",
    ], row  # fmt: skip
    assert_nothing_left(lab_name)


@pytest.mark.parametrize(
    ("signum", "mode"),
    [(signal.SIGINT, "envoy"), (signal.SIGTERM, "mesh")],
    ids=["SIGINT-during-envoy", "SIGTERM-during-mesh"],
)
def test_interrupted_bench_tears_everything_down(lab_name: str, signum: int, mode: str) -> None:
    # A parent that ignores SIGINT (a shell's background job) passes that on, and Python then
    # installs no KeyboardInterrupt handler: restore it, as a terminal's Ctrl-C would find it.
    code = (
        "import signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
        "from bench.datapath import run_bench; "
        f"raise SystemExit(run_bench({lab_name!r}, True, True))"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=REPO,
        env={**os.environ, MARKER: lab_name},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        # Interrupt mid-measurement: the lab is up, the mode's proxies and the servers run.
        progress = wait_for_line(proc, f"{mode}: client-a -> server-b".encode(), timeout=120)
        assert marked_processes(lab_name), "no proxies or servers running when interrupted"
        if mode == "envoy":
            assert len(bench.envoy_pids(lab_name)) == 3, progress
        else:
            assert len(agents.lab_agent_pids(lab_name)) == 2, progress
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, progress + err.decode(errors="replace")
    assert_nothing_left(lab_name)


def wait_for_line(proc: subprocess.Popen[bytes], wanted: bytes, timeout: float) -> str:
    """What the process wrote on stderr until a line containing `wanted`."""
    assert proc.stderr is not None
    seen = b""
    deadline = time.monotonic() + timeout
    while wanted not in seen:
        left = deadline - time.monotonic()
        if left <= 0 or proc.poll() is not None:
            raise AssertionError(f"no {wanted!r} from the bench; it wrote:\n{seen.decode()}")
        readable, _, _ = select.select([proc.stderr], [], [], left)
        if readable:
            seen += os.read(proc.stderr.fileno(), 4096)
    return seen.decode(errors="replace")
