"""`ambient-agent bench` on the real kernel, in quick mode: every figure for both modes, and
nothing left behind, whether it finishes or is interrupted."""

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
    assert marked_processes(name) == []


def test_quick_bench_measures_both_modes_and_cleans_up(
    lab_name: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(MARKER, lab_name)
    code = bench.run_bench(lab_name, json_output=True, quick=True)
    out = capsys.readouterr()
    assert code == 0, out.err
    report = json.loads(out.out)  # progress goes to stderr: stdout is the JSON alone
    assert report["ok"] is True and report["quick"] is True
    assert set(report["metrics"]) == {metric.key for metric in bench.METRICS}
    for key, row in report["metrics"].items():
        for mode in ("baseline", "mesh"):
            assert isinstance(row[mode], float) and row[mode] > 0, (key, mode, row)
        assert row["mesh_over_baseline"] > 0, (key, row)
    # The mesh figures are mesh figures: each destination's agent delivered them over HBONE.
    mesh = report["details"]["mesh"]
    assert all(count > 0 for count in mesh["tunnelled"].values()), mesh["tunnelled"]
    assert report["details"]["baseline"]["tunnelled"] == {}
    assert mesh["agent_cpu_per_connection_us"] > 0
    assert report["details"]["baseline"]["agent_cpu_per_connection_us"] is None
    for mode in ("baseline", "mesh"):
        assert report["details"][mode]["rr_samples"] >= 10
        assert report["details"][mode]["connections"] > 0
    assert_nothing_left(lab_name)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupted_bench_tears_everything_down(lab_name: str, signum: int) -> None:
    code = (
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
        # Interrupt mid-measurement: the mesh lab is up, agents and servers are running.
        progress = wait_for_line(proc, b"mesh: client-a -> server-b", timeout=120)
        assert marked_processes(lab_name), "no agents or servers running when interrupted"
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
