"""`ambient-agent bench --policy` (bench/policy.py) on the real kernel, in quick mode:
every section measured, and nothing left behind. Benchmarks are not judged on speed."""

from __future__ import annotations

import json
import subprocess
from typing import Any

import pytest

from agent.datapath import abi
from agent.sources.authorization_policy import parse_policies
from bench import policy as bench


def _netns() -> set[str]:
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in listed.splitlines() if line.startswith("polbench-")}


def _pins() -> set[str]:
    root = abi.DEFAULT_PIN_DIR
    return {path.name for path in root.glob("bench-*")} if root.exists() else set()


def _positive(value: Any, where: str) -> None:
    assert isinstance(value, int | float) and value > 0, (where, value)


def test_synthetic_mesh_is_deterministic_and_parses() -> None:
    first, second = bench.generate_mesh(bench.QUICK), bench.generate_mesh(bench.QUICK)
    assert first == second
    assert len(first.workloads) == bench.QUICK.workloads
    assert len(first.documents) == bench.QUICK.policies
    policies = parse_policies(first.documents)
    assert {p.scope.value for p in policies} == {"Global", "Namespace", "WorkloadSelector"}
    assert any("apiVersion" in d for d in first.documents)
    assert any("apiVersion" not in d for d in first.documents)
    assert any(p.dry_run for p in policies) and any(p.action.value == "DENY" for p in policies)


@pytest.mark.kernel
def test_quick_policy_bench_measures_every_section_and_cleans_up(
    capsys: pytest.CaptureFixture[str],
) -> None:
    netns_before, pins_before = _netns(), _pins()
    code = bench.run_policy_bench(json_output=True, quick=True)
    out = capsys.readouterr()
    assert code == 0, out.err
    report = json.loads(out.out)  # progress goes to stderr: stdout is the JSON alone
    assert report["ok"] is True and report["quick"] is True

    compiled = report["compile"]
    _positive(compiled["parse_seconds"], "parse_seconds")
    assert compiled["mesh"]["policies"] == bench.QUICK.policies
    assert compiled["mesh"]["workloads"] == bench.QUICK.workloads
    for case in ("typical_node", "all_workloads"):
        result = compiled[case]
        for key in ("destinations", "seconds", "ms_per_destination", "identities"):
            _positive(result[key], f"{case}.{key}")
        for key, value in result["terms_per_workload"].items():
            _positive(value, f"{case}.terms_per_workload.{key}")
        assert result["fallback_workloads"] >= 0
        for key, value in result["entries"].items():
            if key != "pol_pages":  # the quick mesh's sets fit one page of terms
                _positive(value, f"{case}.entries.{key}")
    assert compiled["all_workloads"]["destinations"] == bench.QUICK.workloads

    write = report["write"]
    for key in ("entries", "first_write_seconds", "write_seconds", "us_per_entry",
                "clear_retired_seconds", "clear_retired_entries", "flip_us"):  # fmt: skip
        _positive(write[key], f"write.{key}")
    assert write["entries"] == compiled["typical_node"]["entries"]["total"]
    assert write["clear_retired_entries"] == write["entries"]
    assert set(write["capacity"]) == set(bench.ENTRY_MAPS)

    decision = report["decision"]
    _positive(decision["not_enrolled"]["allowed"]["ns"], "not_enrolled")
    _positive(decision["no_policy"]["allowed"]["ns"], "no_policy")
    assert decision["no_policy"]["terms"] == 0
    rows = decision["rows"]
    assert [row["deny_policies"] for row in rows] == list(bench.DENY_COUNTS)
    for row in rows:
        assert row["terms"] == row["deny_policies"] + 1
        probes = ["allowed", "default_deny"] + (["denied"] if row["deny_policies"] else [])
        assert [key for key in ("allowed", "default_deny", "denied") if key in row] == probes
        for probe in probes:
            result = row[probe]
            for key in ("ns", "min_ns", "over_no_policy", "over_not_enrolled"):
                _positive(result[key], f"{row['name']}.{probe}.{key}")
            assert len(result["samples"]) == bench.QUICK.rounds

    table = bench.format_report(report)
    assert "pod_ingress, ns/packet" in table and "250 DENY + 1 ALLOW" in table

    assert _netns() - netns_before == set()
    assert _pins() - pins_before == set()


@pytest.mark.kernel
def test_policy_bench_cleans_up_when_a_measurement_fails(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def broken(*args: object) -> dict[str, Any]:
        raise bench.BenchError("broken on purpose")

    monkeypatch.setattr(bench, "_measure_decisions", broken)
    netns_before, pins_before = _netns(), _pins()
    code = bench.run_policy_bench(json_output=True, quick=True)
    out = capsys.readouterr()
    assert code == 1
    assert json.loads(out.out) == {"ok": False, "error": "broken on purpose"}
    assert "broken on purpose" in out.err
    assert _netns() - netns_before == set()
    assert _pins() - pins_before == set()
