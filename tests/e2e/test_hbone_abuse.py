"""The HBONE port against a peer holding a mesh certificate, on agent processes in the lab:
each abuse case is refused with its reason counted in /metrics, and the agent's memory stays
bounded (RSS measured before and after, as `ambient-agent bench --hbone-abuse` prints it)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from bench import hbone_abuse
from tests.support.labs import running_lab

pytestmark = pytest.mark.kernel

# What one case may add to the agent's RSS: the flood cases sent 12 x 64 MiB and 10,000
# frames; unbounded, the agent grew by hundreds of MiB.
RSS_BOUND_MIB = 32


@pytest.fixture(scope="module")
def results() -> Iterator[dict[str, hbone_abuse.CaseResult]]:
    with running_lab("ha") as lab:
        measured = hbone_abuse.measure(lab)
        print(hbone_abuse.format_results(measured))
        yield measured


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("continuation_flood", "header_block_too_large"),
        ("rapid_reset", "reset_flood"),
        ("ping_flood", "control_frame_flood"),
        ("no_alpn", "no_alpn_h2"),
        ("own_port", "bad_request"),
    ],
)
def test_each_abuse_is_refused_counted_and_bounded(
    results: dict[str, hbone_abuse.CaseResult], case: str, reason: str
) -> None:
    result = results[case]
    assert result.refusals.get(reason, 0) >= 1, result.refusals
    assert result.rss_growth_mib < RSS_BOUND_MIB, result


def test_the_floods_end_early_and_a_reset_stream_gets_no_app_connection(
    results: dict[str, hbone_abuse.CaseResult],
) -> None:
    assert results["continuation_flood"].refusals["header_block_too_large"] == 12
    assert results["continuation_flood"].outcome["max_bytes_sent_mib"] < 8
    assert results["rapid_reset"].outcome["resets_sent"] < hbone_abuse.RESETS
    assert results["rapid_reset"].outcome["app_connections"] == 0
    assert results["own_port"].outcome["status"] == 400
