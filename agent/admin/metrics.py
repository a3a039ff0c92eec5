"""Prometheus metrics read, at each scrape, from the kernel's own counters and the agent's
state: nothing is counted twice, and the figures are the kernel's."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from agent.identity.manager import WorkloadCertificate


class AgentMetricsSource(Protocol):
    """What the collector reads; the agent provides it."""

    def kernel_verdicts(self) -> dict[str, int]: ...
    def policy_decisions(self) -> list[tuple[str, str, int]]: ...  # (policy, reason, count)
    def enrolled_pods(self) -> int: ...
    def programs_loaded(self) -> int: ...
    def certificates(self) -> list[WorkloadCertificate]: ...


class AgentCollector(Collector):
    def __init__(self, source: AgentMetricsSource) -> None:
        self._source = source

    def collect(self) -> Iterator[Metric]:
        verdicts = CounterMetricFamily(
            "ambient_datapath_verdicts",
            "Packets the tc programs passed, steered or dropped, by reason.",
            labels=["reason"],
        )
        for reason, count in sorted(self._source.kernel_verdicts().items()):
            verdicts.add_metric([reason], count)
        yield verdicts
        decisions = CounterMetricFamily(
            "ambient_policy_decisions",
            "L4 authorization decisions taken in the kernel, by deciding policy and reason.",
            labels=["policy", "reason"],
        )
        for policy, reason, count in self._source.policy_decisions():
            decisions.add_metric([policy, reason], count)
        yield decisions
        yield GaugeMetricFamily(
            "ambient_enrolled_pods", "Pods captured on this node.",
            value=self._source.enrolled_pods(),
        )  # fmt: skip
        yield GaugeMetricFamily(
            "ambient_programs_loaded", "eBPF programs loaded and pinned by the agent.",
            value=self._source.programs_loaded(),
        )  # fmt: skip
        expiry = GaugeMetricFamily(
            "ambient_workload_certificate_expiry_timestamp_seconds",
            "When each workload certificate the agent holds expires (Unix time).",
            labels=["identity"],
        )
        for cert in self._source.certificates():
            expiry.add_metric([cert.identity.uri], cert.not_after.timestamp())
        yield expiry
