"""OTLP export (gRPC or HTTP/protobuf) of the same Prometheus collector that the stats port
serves: one set of figures, read from the kernel at each export, whichever way it leaves."""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import structlog
from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import (
    OTLPMetricExporter as GrpcMetricExporter,
)
from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
    OTLPMetricExporter as HttpMetricExporter,
)
from opentelemetry.metrics import CallbackOptions, Meter, Observation
from opentelemetry.sdk.metrics import MeterProvider, ObservableCounter, ObservableGauge
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    MetricExporter,
    MetricExportResult,
    MetricsData,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.resources import Resource
from prometheus_client.core import Metric
from prometheus_client.registry import Collector

from agent.telemetry.otlp_endpoint import OtlpError, grpc_target, http_metrics_url

log = structlog.get_logger("agent.telemetry")

PROTOCOLS = ("grpc", "http/protobuf")
SERVICE_NAME = "ambient-agent"
# The exporters retry with backoff until this deadline; an export that outlived the interval
# would only delay the next one, which carries the same cumulative values anyway.
MAX_EXPORT_TIMEOUT = 10.0
# The SDK folds series past 2000 per instrument into one `otel.metric.overflow` series, and
# never forgets a series an observable instrument has seen: per-workload istio_tcp_* families
# on a node with pod churn pass 2000 over the agent's life. Prometheus has no such limit.
SERIES_LIMIT_PER_METRIC = 100_000

# Prometheus families the OTLP side can carry: untyped ("unknown") ones are gauges, as the
# OpenTelemetry Collector's Prometheus receiver maps them.
_COUNTER_TYPES = frozenset({"counter"})
_GAUGE_TYPES = frozenset({"gauge", "unknown"})

ObservationCallback = Callable[[CallbackOptions], Iterable[Observation]]


class _ResultRecordingExporter(MetricExporter):
    """Hands each export to the OTLP exporter and keeps its result: the SDK's reader drops it,
    and flush() reports whether the export reached the receiver."""

    def __init__(self, exporter: MetricExporter) -> None:
        # The reader reads the exporter's preferences from these attributes, as it does on
        # the SDK's own exporters.
        super().__init__(
            preferred_temporality=exporter._preferred_temporality,
            preferred_aggregation=exporter._preferred_aggregation,
        )
        self._exporter = exporter
        self.last_result: MetricExportResult | None = None

    def export(
        self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any
    ) -> MetricExportResult:
        result = MetricExportResult.FAILURE
        try:
            result = self._exporter.export(metrics_data, timeout_millis=timeout_millis, **kwargs)
        finally:
            self.last_result = result
        return result

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return self._exporter.force_flush(timeout_millis=timeout_millis)

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        self._exporter.shutdown(timeout_millis=timeout_millis, **kwargs)


class _CollectionPerCycle:
    """Reads the collector once per export cycle and gives each instrument its family's
    observations from that one reading.

    The SDK calls every observable instrument's callback once per collection, one after the
    other under its consumer lock. So a callback asking for a family already handed out
    from the current reading means a new cycle has begun: read again. This needs neither the
    SDK's callback order (which the first-registered instrument happens to lead) nor a clock
    (a time window would split a slow collection or merge two flushes close together), and
    a cycle cut short by a timeout only makes the next cycle start its reading earlier.
    """

    def __init__(self, collector: Collector) -> None:
        self._collector = collector
        self._lock = threading.Lock()
        self._observations: dict[str, list[Observation]] | None = None
        self._handed_out: set[str] = set()

    def callback_for(self, family: str) -> ObservationCallback:
        def observe(options: CallbackOptions) -> Iterable[Observation]:
            return self.observe(family)

        return observe

    def observe(self, family: str) -> list[Observation]:
        with self._lock:
            if self._observations is None or family in self._handed_out:
                self._observations = self._read()
                self._handed_out.clear()
            self._handed_out.add(family)
            return self._observations.get(family, [])

    def _read(self) -> dict[str, list[Observation]]:
        try:
            families = list(self._collector.collect())
        except Exception:
            # This cycle exports nothing; the next one reads again.
            log.exception("otlp_collect_failed")
            return {}
        observations: dict[str, list[Observation]] = {}
        for family in families:
            names = _sample_names(family)
            if names is None:
                continue
            # NaN is Prometheus's "no value now" (and the SDK would warn about it each
            # cycle): such a sample is simply not observed.
            observations.setdefault(family.name, []).extend(
                Observation(sample.value, attributes=dict(sample.labels))
                for sample in family.samples
                if sample.name in names and math.isfinite(sample.value)
            )
        return observations


def _sample_names(family: Metric) -> frozenset[str] | None:
    """The sample names that carry the family's value (a counter's _created is its start
    time, not a value), or None for a family type OTLP gets no instrument for."""
    if family.type in _COUNTER_TYPES:
        return frozenset({family.name + "_total", family.name})
    if family.type in _GAUGE_TYPES:
        return frozenset({family.name})
    return None


class OtlpExport:
    """Pushes the collector's families to an OTLP receiver every `interval` seconds, from the
    SDK's own thread. Counters become cumulative monotonic sums, gauges gauges; each family
    keeps its Prometheus name (a counter's without _total) and labels become attributes.

    flush() and shutdown() each block for up to one export, min(interval, 10 s) with the
    SDK's retries included (their `timeout` bounds the collection, not the network: the
    exporters keep their own deadline), so call them off the event loop
    (asyncio.to_thread). Export failures are logged by the SDK and never raised.
    """

    def __init__(
        self,
        collector: Collector,
        endpoint: str,
        protocol: str = "grpc",
        interval: float = 10.0,
        resource: Mapping[str, str] | None = None,
    ) -> None:
        if protocol not in PROTOCOLS:
            raise OtlpError(
                f"unknown OTLP protocol {protocol!r}: use one of {', '.join(PROTOCOLS)}"
            )
        if not (interval > 0 and math.isfinite(interval)):
            raise OtlpError(
                f"OTLP export interval must be a positive number of seconds, not {interval}"
            )
        self.protocol = protocol
        self.interval = interval
        self._insecure = False
        if protocol == "grpc":
            self.endpoint, self._insecure = grpc_target(endpoint)
        else:
            self.endpoint = http_metrics_url(endpoint)
        self._collector = collector
        self._resource = Resource.create({"service.name": SERVICE_NAME, **(resource or {})})
        self._lock = threading.Lock()
        self._provider: MeterProvider | None = None
        self._exporter: _ResultRecordingExporter | None = None
        self._shut_down = False

    def start(self) -> None:
        """Create one instrument per family the collector yields now, then start exporting.
        A family that appears only later is not exported. Starting twice is a no-op."""
        with self._lock:
            if self._shut_down:
                raise OtlpError("OTLP export was shut down: make a new OtlpExport")
            if self._provider is not None:
                return
            # Read before anything starts a thread: a collector that fails fails start().
            families = list(self._collector.collect())
            self._exporter = _ResultRecordingExporter(self._otlp_exporter())
            reader = PeriodicExportingMetricReader(
                self._exporter,
                export_interval_millis=self.interval * 1000,
                cardinality_limits={
                    ObservableCounter: SERIES_LIMIT_PER_METRIC,
                    ObservableGauge: SERIES_LIMIT_PER_METRIC,
                },
            )
            # The agent shuts the export down on its own way out; an atexit export to a
            # receiver that is gone could hold the process up to the export timeout.
            self._provider = MeterProvider(
                metric_readers=[reader], resource=self._resource, shutdown_on_exit=False
            )
            self._create_instruments(self._provider.get_meter(SERVICE_NAME), families)
        log.info(
            "otlp_export_started",
            endpoint=self.endpoint,
            protocol=self.protocol,
            interval=self.interval,
        )

    def flush(self, timeout: float = 10.0) -> bool:
        """Export now. True when that export reached the receiver (or, if the periodic
        export ran at the same moment, when the later of the two did)."""
        with self._lock:
            provider, exporter = self._provider, self._exporter
            if provider is None or exporter is None or self._shut_down:
                return False
        try:
            provider.force_flush(timeout_millis=timeout * 1000)
        except Exception as error:
            log.warning("otlp_flush_failed", endpoint=self.endpoint, error=str(error))
            return False
        return exporter.last_result is MetricExportResult.SUCCESS

    def shutdown(self, timeout: float = 10.0) -> None:
        """One last export, then stop the thread and close the connection. Idempotent."""
        with self._lock:
            if self._shut_down:
                return
            self._shut_down = True
            provider = self._provider
        if provider is None:
            return
        try:
            provider.shutdown(timeout_millis=timeout * 1000)
        except Exception as error:
            log.warning("otlp_shutdown_failed", endpoint=self.endpoint, error=str(error))

    def _otlp_exporter(self) -> MetricExporter:
        # Prometheus counters are totals since start: cumulative, whatever
        # OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE says.
        temporality: dict[type, AggregationTemporality] = {
            ObservableCounter: AggregationTemporality.CUMULATIVE,
            ObservableGauge: AggregationTemporality.CUMULATIVE,
        }
        timeout = min(self.interval, MAX_EXPORT_TIMEOUT)
        if self.protocol == "grpc":
            return GrpcMetricExporter(
                endpoint=self.endpoint,
                insecure=self._insecure,
                timeout=timeout,
                preferred_temporality=temporality,
            )
        return HttpMetricExporter(
            endpoint=self.endpoint, timeout=timeout, preferred_temporality=temporality
        )

    def _create_instruments(self, meter: Meter, families: list[Metric]) -> None:
        collection = _CollectionPerCycle(self._collector)
        created: set[str] = set()
        for family in families:
            if family.name in created:
                continue
            callbacks = [collection.callback_for(family.name)]
            try:
                if family.type in _COUNTER_TYPES:
                    meter.create_observable_counter(
                        family.name, callbacks, unit=family.unit, description=family.documentation
                    )
                elif family.type in _GAUGE_TYPES:
                    meter.create_observable_gauge(
                        family.name, callbacks, unit=family.unit, description=family.documentation
                    )
                else:
                    log.warning("otlp_family_skipped", family=family.name, type=family.type)
                    continue
            except Exception as error:
                # The SDK refuses names outside [a-zA-Z][-_./a-zA-Z0-9]* (a Prometheus name
                # may hold ':'): one family lost is better than no export at all.
                log.warning("otlp_family_skipped", family=family.name, error=str(error))
                continue
            created.add(family.name)
