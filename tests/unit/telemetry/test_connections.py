"""ConnectionTelemetry: the proxy's report joined with the kernel's close record by socket
cookie, in whichever order they come, counted into Istio's TCP series and written as one
access log line per connection. A fake clock drives every timeout; no kernel, no I/O."""

from __future__ import annotations

from typing import Any

import pytest

from agent.state.workload import Protocol, Workload
from agent.telemetry.connections import (
    KERNEL_RECORD_WAIT,
    UNCLAIMED_MAX,
    UNCLAIMED_TTL,
    ConnectionReport,
    ConnectionTelemetry,
    PolicyVerdict,
    Relayed,
    TcpSeries,
)
from agent.telemetry.events import SocketClosed
from agent.telemetry.istio_labels import (
    ConnectionLabels,
    Reporter,
    SecurityPolicy,
    connection_labels,
)

CART_ID = "spiffe://cluster.local/ns/shop/sa/cart"
PAYMENTS_ID = "spiffe://cluster.local/ns/shop/sa/payments"
ALLOW = PolicyVerdict("allow", "shop/allow-cart", "rule 0 matched")
RELAYED = Relayed(client_to_server=111, server_to_client=2222)
START = 1000.0


class FakeClock:
    def __init__(self, now: float = START) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def workload(name: str, uid: str | None = None, *, workload_name: str = "") -> Workload:
    return Workload(
        uid=uid or f"uid-{name}", name=name, namespace="shop", service_account=name,
        ips=("10.0.0.2",), protocol=Protocol.HBONE, node="node-1",
        workload_name=workload_name,
    )  # fmt: skip


CART = workload("cart")
PAYMENTS = workload("payments")
ORDERS = workload("orders")


def labels(
    source: Workload | None = CART, destination: Workload | None = PAYMENTS
) -> ConnectionLabels:
    return connection_labels(
        Reporter.SOURCE, source, CART_ID, destination, PAYMENTS_ID, None,
        SecurityPolicy.MUTUAL_TLS,
    )  # fmt: skip


FIELDS: dict[str, Any] = {
    "src.addr": "10.0.0.2:40000", "src.workload": "cart", "src.namespace": "shop",
    "src.identity": CART_ID, "dst.addr": "10.0.1.3:8080", "dst.workload": "payments",
    "dst.namespace": "shop", "dst.identity": PAYMENTS_ID, "dst.service": None,
    "dst.hbone_addr": "10.0.1.3:15008", "route": "hbone",
}  # fmt: skip


def report(
    connection: ConnectionLabels | None = None,
    *,
    peer_is_client: bool = True,
    direction: str = "outbound",
) -> ConnectionReport:
    return ConnectionReport(connection or labels(), direction, peer_is_client, dict(FIELDS))


def record(
    cookie: int,
    *,
    received: int = 1000,
    sent: int = 20000,
    opened_ns: int = 5_000_000_000,
    closed_ns: int = 5_250_500_000,
) -> SocketClosed:
    return SocketClosed(
        cookie, opened_ns, closed_ns, received, sent, ("10.0.0.2", 15001),
        ("10.0.0.2", 40000), srtt_us=417, retransmits=2, passive=True,
    )  # fmt: skip


class Recorder:
    """ConnectionTelemetry with a fake clock and the access log collected in a list."""

    def __init__(self, kernel_records: bool = True) -> None:
        self.clock = FakeClock()
        self.logs: list[dict[str, Any]] = []
        self.telemetry = ConnectionTelemetry(kernel_records, self.clock, self.logs.append)

    def series(self, connection: ConnectionLabels | None = None) -> TcpSeries | None:
        wanted = (connection or labels()).values
        return next((s for values, s in self.telemetry.series() if values == wanted), None)

    def counts(self, connection: ConnectionLabels | None = None) -> tuple[int, int, int, int]:
        """(opened, closed, received bytes, sent bytes) of one series."""
        s = self.series(connection)
        assert s is not None
        return (s.opened, s.closed, s.received_bytes, s.sent_bytes)


@pytest.fixture
def rec() -> Recorder:
    return Recorder()


# -- the join, in every order ----------------------------------------------------------------


def test_open_counts_the_connection_opened_before_anything_completes(rec: Recorder) -> None:
    rec.telemetry.open(1, report())
    assert rec.counts() == (1, 0, 0, 0)
    assert rec.telemetry.open_connections == 1
    assert rec.logs == []


def test_kernel_record_after_done_completes_the_connection(rec: Recorder) -> None:
    conn = rec.telemetry.open(1, report())
    rec.telemetry.done(conn, ALLOW, RELAYED)
    assert rec.logs == []  # waiting for the kernel's figures
    assert rec.counts() == (1, 0, 0, 0)
    rec.telemetry.kernel_closed([record(1, received=1000, sent=20000)])
    assert rec.counts() == (1, 1, 1000, 20000)
    assert len(rec.logs) == 1 and rec.logs[0]["bytes_source"] == "kernel"
    assert rec.telemetry.open_connections == 0


def test_kernel_record_before_open_waits_unclaimed_then_open_claims_it(rec: Recorder) -> None:
    rec.telemetry.kernel_closed([record(7, received=300, sent=400)])
    assert rec.logs == [] and rec.telemetry.series() == []
    conn = rec.telemetry.open(7, report())
    assert conn.kernel == record(7, received=300, sent=400)
    rec.telemetry.done(conn, ALLOW, RELAYED)
    assert rec.counts() == (1, 1, 300, 400)
    assert rec.logs[0]["bytes_source"] == "kernel"


def test_claimed_record_is_claimed_only_once(rec: Recorder) -> None:
    rec.telemetry.kernel_closed([record(7)])
    rec.telemetry.open(7, report())
    assert rec.telemetry.open(7, report()).kernel is None


def test_kernel_record_between_open_and_done_completes_at_done(rec: Recorder) -> None:
    conn = rec.telemetry.open(3, report())
    rec.telemetry.kernel_closed([record(3, received=10, sent=20)])
    assert rec.logs == []  # the proxy has not finished with it yet
    assert rec.counts() == (1, 0, 0, 0)
    rec.telemetry.done(conn, ALLOW, RELAYED)
    assert rec.counts() == (1, 1, 10, 20)
    assert rec.logs[0]["bytes_source"] == "kernel"


def test_records_of_several_connections_in_one_batch_go_to_their_own_connections(
    rec: Recorder,
) -> None:
    a = rec.telemetry.open(1, report())
    b = rec.telemetry.open(2, report())
    rec.telemetry.done(a, ALLOW)
    rec.telemetry.done(b, ALLOW)
    rec.telemetry.kernel_closed([record(2, received=5, sent=6), record(1, received=7, sent=8)])
    assert sorted((log["bytes_sent"], log["bytes_recv"]) for log in rec.logs) == [(5, 6), (7, 8)]
    assert rec.counts() == (2, 2, 12, 14)


@pytest.mark.parametrize(
    ("peer_is_client", "request_bytes", "response_bytes"),
    [(True, 1000, 20000), (False, 20000, 1000)],
    ids=["accepted-socket", "connected-socket"],
)
def test_peer_is_client_decides_which_kernel_counter_is_the_request(
    rec: Recorder, peer_is_client: bool, request_bytes: int, response_bytes: int
) -> None:
    """The socket received 1000 and sent 20000 bytes: if its peer is the client those 1000
    were the request; if its peer is the server (the agent dialled the app) they were the
    response."""
    conn = rec.telemetry.open(1, report(peer_is_client=peer_is_client))
    rec.telemetry.done(conn, ALLOW, RELAYED)
    rec.telemetry.kernel_closed([record(1, received=1000, sent=20000)])
    series = rec.series()
    assert series is not None
    assert series.received_bytes == request_bytes  # Istio: received = client to server
    assert series.sent_bytes == response_bytes
    assert rec.logs[0]["bytes_sent"] == request_bytes
    assert rec.logs[0]["bytes_recv"] == response_bytes


# -- the access log --------------------------------------------------------------------------


def test_access_log_line_has_the_reports_fields_and_the_kernels_figures(rec: Recorder) -> None:
    conn = rec.telemetry.open(1, report(direction="outbound"))
    rec.clock.advance(3.0)  # the proxy's own timing is not used when the kernel's is there
    rec.telemetry.done(conn, ALLOW, RELAYED, error=None)
    rec.telemetry.kernel_closed([
        record(1, received=1000, sent=20000, opened_ns=5_000_000_000, closed_ns=5_250_500_000)
    ])  # fmt: skip
    assert rec.logs == [{
        "direction": "outbound",
        "reporter": "source",
        **FIELDS,
        "bytes_sent": 1000,
        "bytes_recv": 20000,
        "duration_ms": 250.5,
        "rtt_us": 417,
        "retransmits": 2,
        "bytes_source": "kernel",
        "connection_security_policy": "mutual_tls",
        "dataplane_mode": "ambient-l4",
        "policy.verdict": "allow",
        "policy.name": "shop/allow-cart",
        "policy.reason": "rule 0 matched",
        "error": None,
    }]  # fmt: skip
    for key in ("src.addr", "src.workload", "src.namespace", "src.identity", "dst.addr",
                "dst.hbone_addr", "dst.service", "direction", "bytes_sent", "bytes_recv",
                "duration_ms"):  # fmt: skip
        assert key in rec.logs[0]


def test_access_log_duration_is_the_kernels_rounded_to_microseconds(rec: Recorder) -> None:
    conn = rec.telemetry.open(1, report())
    rec.telemetry.done(conn, ALLOW)
    rec.telemetry.kernel_closed([record(1, opened_ns=0, closed_ns=1_234_567)])
    assert rec.logs[0]["duration_ms"] == 1.235


def test_access_log_carries_the_error_and_a_verdict_without_policy(rec: Recorder) -> None:
    conn = rec.telemetry.open(1, report(direction="inbound", peer_is_client=False))
    rec.telemetry.done(conn, PolicyVerdict("none"), None, error="connection refused")
    rec.telemetry.kernel_closed([record(1)])
    log = rec.logs[0]
    assert log["direction"] == "inbound"
    assert log["error"] == "connection refused"
    assert (log["policy.verdict"], log["policy.name"], log["policy.reason"]) == (
        "none", None, None,
    )  # fmt: skip


# -- the kernel's record never comes ---------------------------------------------------------


def test_missing_kernel_record_completes_with_relay_counts_after_the_wait(
    rec: Recorder,
) -> None:
    conn = rec.telemetry.open(1, report())
    rec.clock.advance(2.5)
    rec.telemetry.done(conn, ALLOW, RELAYED)
    rec.clock.advance(KERNEL_RECORD_WAIT)
    rec.telemetry.expire()
    assert rec.logs == [] and rec.telemetry.kernel_records_missing == 0  # not overdue yet
    rec.clock.advance(0.001)
    rec.telemetry.expire()
    assert rec.telemetry.kernel_records_missing == 1
    assert rec.counts() == (1, 1, 111, 2222)
    [log] = rec.logs
    assert log["bytes_source"] == "proxy"
    assert (log["bytes_sent"], log["bytes_recv"]) == (111, 2222)
    assert log["duration_ms"] == 2500.0  # open to done, by the proxy's clock
    assert "rtt_us" not in log and "retransmits" not in log


def test_late_kernel_record_after_the_relay_counts_is_not_counted_again(
    rec: Recorder,
) -> None:
    conn = rec.telemetry.open(1, report())
    rec.telemetry.done(conn, ALLOW, RELAYED)
    rec.clock.advance(KERNEL_RECORD_WAIT + 1)
    rec.telemetry.expire()
    rec.telemetry.kernel_closed([record(1, received=5000, sent=6000)])
    rec.telemetry.expire(everything=True)
    assert rec.counts() == (1, 1, 111, 2222)
    assert len(rec.logs) == 1
    assert rec.telemetry.kernel_records_missing == 1


def test_missing_kernel_record_without_relay_counts_counts_zero_bytes(rec: Recorder) -> None:
    conn = rec.telemetry.open(1, report())
    rec.telemetry.done(conn, ALLOW)
    rec.telemetry.expire(everything=True)
    assert rec.counts() == (1, 1, 0, 0)
    assert (rec.logs[0]["bytes_sent"], rec.logs[0]["bytes_recv"]) == (0, 0)


def test_without_kernel_records_done_completes_at_once_with_relay_counts() -> None:
    rec = Recorder(kernel_records=False)
    conn = rec.telemetry.open(1, report())
    assert conn.cookie is None
    rec.clock.advance(0.75)
    rec.telemetry.done(conn, ALLOW, RELAYED)
    assert rec.counts() == (1, 1, 111, 2222)
    [log] = rec.logs
    assert log["bytes_source"] == "proxy"
    assert log["duration_ms"] == 750.0
    # Expected, not missing: the agent was told there would be no kernel records.
    assert rec.telemetry.kernel_records_missing == 0
    rec.telemetry.kernel_closed([record(1)])
    rec.telemetry.expire(everything=True)
    assert rec.counts() == (1, 1, 111, 2222) and len(rec.logs) == 1


def test_done_twice_counts_the_connection_once(rec: Recorder) -> None:
    conn = rec.telemetry.open(1, report())
    rec.telemetry.done(conn, ALLOW, RELAYED)
    rec.telemetry.done(conn, PolicyVerdict("deny"), Relayed(9, 9), error="again")
    rec.telemetry.kernel_closed([record(1, received=10, sent=20)])
    rec.telemetry.done(conn, PolicyVerdict("deny"), Relayed(9, 9), error="and again")
    rec.telemetry.expire(everything=True)
    assert rec.counts() == (1, 1, 10, 20)
    assert len(rec.logs) == 1
    assert rec.logs[0]["policy.verdict"] == "allow" and rec.logs[0]["error"] is None
    assert rec.telemetry.open_connections == 0


def test_done_twice_without_kernel_records_counts_once() -> None:
    rec = Recorder(kernel_records=False)
    conn = rec.telemetry.open(None, report())
    rec.telemetry.done(conn, ALLOW, RELAYED)
    rec.telemetry.done(conn, ALLOW, RELAYED)
    assert rec.counts() == (1, 1, 111, 2222) and len(rec.logs) == 1


def test_expire_everything_completes_every_waiting_connection_now(rec: Recorder) -> None:
    conns = [rec.telemetry.open(cookie, report()) for cookie in (1, 2, 3)]
    for conn in conns:
        rec.telemetry.done(conn, ALLOW, RELAYED)
    rec.telemetry.expire()
    assert rec.logs == []
    rec.telemetry.expire(everything=True)
    assert len(rec.logs) == 3
    assert {log["bytes_source"] for log in rec.logs} == {"proxy"}
    assert rec.telemetry.kernel_records_missing == 3
    assert rec.counts() == (3, 3, 333, 6666)


def test_expire_everything_leaves_connections_the_proxy_still_holds(rec: Recorder) -> None:
    rec.telemetry.open(1, report())
    rec.telemetry.expire(everything=True)
    assert rec.logs == [] and rec.telemetry.open_connections == 1


# -- unclaimed kernel records ----------------------------------------------------------------


def test_unclaimed_record_is_dropped_after_its_ttl(rec: Recorder) -> None:
    rec.telemetry.kernel_closed([record(7), record(8)])
    rec.clock.advance(UNCLAIMED_TTL)
    rec.telemetry.expire()
    assert rec.telemetry.open(7, report()).kernel == record(7)  # not older than the TTL yet
    rec.clock.advance(0.001)
    rec.telemetry.expire()
    late = rec.telemetry.open(8, report())
    assert late.kernel is None
    rec.telemetry.done(late, ALLOW, RELAYED)
    assert len(rec.logs) == 0  # waits for a record of its own; the dropped one is gone


def test_unclaimed_ttl_counts_from_each_records_arrival(rec: Recorder) -> None:
    rec.telemetry.kernel_closed([record(1)])
    rec.clock.advance(UNCLAIMED_TTL / 2)
    rec.telemetry.kernel_closed([record(2)])
    rec.clock.advance(UNCLAIMED_TTL / 2 + 0.001)
    rec.telemetry.expire()
    assert rec.telemetry.open(1, report()).kernel is None
    assert rec.telemetry.open(2, report()).kernel == record(2)


def test_unclaimed_records_are_bounded_dropping_the_oldest(rec: Recorder) -> None:
    rec.telemetry.kernel_closed(record(cookie) for cookie in range(1, UNCLAIMED_MAX + 3))
    # UNCLAIMED_MAX + 2 arrived: the two oldest went, the newest are kept.
    assert rec.telemetry.open(1, report()).kernel is None
    assert rec.telemetry.open(2, report()).kernel is None
    assert rec.telemetry.open(3, report()).kernel == record(3)
    assert rec.telemetry.open(UNCLAIMED_MAX + 2, report()).kernel == record(UNCLAIMED_MAX + 2)


# -- series ----------------------------------------------------------------------------------


def test_series_sum_over_connections_of_one_label_set(rec: Recorder) -> None:
    for cookie, (received, sent) in enumerate([(1, 10), (2, 20), (3, 30)], start=1):
        conn = rec.telemetry.open(cookie, report())
        rec.telemetry.done(conn, ALLOW)
        rec.telemetry.kernel_closed([record(cookie, received=received, sent=sent)])
    rec.telemetry.open(4, report())  # still open: opened, not closed
    assert rec.counts() == (4, 3, 6, 60)
    assert len(rec.telemetry.series()) == 1


def test_series_of_different_label_sets_stay_separate(rec: Recorder) -> None:
    to_payments, to_orders = labels(CART, PAYMENTS), labels(CART, ORDERS)
    a = rec.telemetry.open(1, report(to_payments))
    b = rec.telemetry.open(2, report(to_orders))
    c = rec.telemetry.open(3, report(to_orders))
    rec.telemetry.kernel_closed([record(1, received=1, sent=2), record(2, received=3, sent=4),
                                 record(3, received=5, sent=6)])  # fmt: skip
    for conn in (a, b, c):
        rec.telemetry.done(conn, ALLOW)
    assert rec.counts(to_payments) == (1, 1, 1, 2)
    assert rec.counts(to_orders) == (2, 2, 8, 10)
    assert len(rec.telemetry.series()) == 2


def test_series_returns_copies(rec: Recorder) -> None:
    conn = rec.telemetry.open(1, report())
    rec.telemetry.done(conn, ALLOW)
    rec.telemetry.kernel_closed([record(1, received=10, sent=20)])
    [(values, copy)] = rec.telemetry.series()
    copy.opened, copy.closed, copy.received_bytes, copy.sent_bytes, copy.live = 99, 99, 99, 99, 9
    assert values == labels().values
    assert rec.counts() == (1, 1, 10, 20)
    assert rec.telemetry.open_connections == 0


def test_open_connections_counts_connections_not_yet_completed(rec: Recorder) -> None:
    a = rec.telemetry.open(1, report(labels(CART, PAYMENTS)))
    b = rec.telemetry.open(2, report(labels(CART, ORDERS)))
    rec.telemetry.open(3, report(labels(CART, ORDERS)))
    assert rec.telemetry.open_connections == 3
    rec.telemetry.done(a, ALLOW)
    assert rec.telemetry.open_connections == 3  # done, but its kernel record is not in yet
    rec.telemetry.kernel_closed([record(1)])
    assert rec.telemetry.open_connections == 2
    rec.telemetry.done(b, ALLOW)
    rec.telemetry.expire(everything=True)
    assert rec.telemetry.open_connections == 1


# -- forgetting workloads --------------------------------------------------------------------


def complete(rec: Recorder, cookie: int, connection: ConnectionLabels) -> None:
    conn = rec.telemetry.open(cookie, report(connection))
    rec.telemetry.done(conn, ALLOW)
    rec.telemetry.kernel_closed([record(cookie)])


def test_forget_workloads_removes_the_series_of_gone_workloads(rec: Recorder) -> None:
    to_payments, to_orders = labels(CART, PAYMENTS), labels(CART, ORDERS)
    complete(rec, 1, to_payments)
    complete(rec, 2, to_orders)
    assert rec.telemetry.forget_workloads({CART.uid, PAYMENTS.uid, ORDERS.uid}) == 0
    assert rec.telemetry.forget_workloads({CART.uid, PAYMENTS.uid}) == 1
    assert rec.series(to_orders) is None
    assert rec.series(to_payments) is not None
    assert rec.telemetry.forget_workloads(set()) == 1
    assert rec.telemetry.series() == []


def test_forget_workloads_keeps_series_of_unknown_peers_while_known_ends_remain(
    rec: Recorder,
) -> None:
    from_outside = labels(None, PAYMENTS)
    between_unknowns = labels(None, None)
    complete(rec, 1, from_outside)
    complete(rec, 2, between_unknowns)
    assert rec.telemetry.forget_workloads({PAYMENTS.uid}) == 0
    assert rec.telemetry.forget_workloads(set()) == 1
    assert rec.series(from_outside) is None
    assert rec.series(between_unknowns) is not None  # names no workload that could go


def test_forget_workloads_keeps_a_series_with_a_live_connection_until_it_closes(
    rec: Recorder,
) -> None:
    to_orders = labels(CART, ORDERS)
    complete(rec, 1, to_orders)
    live = rec.telemetry.open(2, report(to_orders))
    assert rec.telemetry.forget_workloads({CART.uid}) == 0
    assert rec.counts(to_orders) == (2, 1, 1000, 20000)
    rec.telemetry.done(live, ALLOW)
    rec.telemetry.kernel_closed([record(2)])
    assert rec.counts(to_orders) == (2, 2, 2000, 40000)  # its first counts were kept
    assert rec.telemetry.forget_workloads({CART.uid}) == 1
    assert rec.series(to_orders) is None


def test_forget_workloads_keeps_a_series_waiting_for_its_kernel_record(rec: Recorder) -> None:
    to_orders = labels(CART, ORDERS)
    conn = rec.telemetry.open(1, report(to_orders))
    rec.telemetry.done(conn, ALLOW)
    assert rec.telemetry.forget_workloads({CART.uid}) == 0
    rec.telemetry.kernel_closed([record(1, received=4, sent=5)])
    assert rec.counts(to_orders) == (1, 1, 4, 5)


def test_forget_workloads_keeps_a_series_shared_by_a_replacement_pod(rec: Recorder) -> None:
    old_pod = workload("cart-7d9f-aaaaa", "uid-old", workload_name="cart")
    new_pod = workload("cart-7d9f-bbbbb", "uid-new", workload_name="cart")
    from_old, from_new = labels(old_pod, PAYMENTS), labels(new_pod, PAYMENTS)
    assert from_old.values == from_new.values  # one series: the same Istio labels
    complete(rec, 1, from_old)
    complete(rec, 2, from_new)
    # The old pod was replaced: the new one, with the very same labels, is still there.
    assert rec.telemetry.forget_workloads({new_pod.uid, PAYMENTS.uid}) == 0
    assert rec.counts(from_new) == (2, 2, 2000, 40000)


# -- HBONE tunnel sockets --------------------------------------------------------------------


def test_tunnel_records_are_counted_per_direction_and_never_logged(rec: Recorder) -> None:
    rec.telemetry.track_tunnel(7, "outbound")
    rec.telemetry.track_tunnel(8, "inbound")
    rec.telemetry.kernel_closed([record(7, received=10, sent=20), record(8, received=3, sent=4)])
    rec.telemetry.kernel_closed([record(7, received=99, sent=99)])  # not tracked any more
    tunnels = rec.telemetry.tunnels()
    assert (
        tunnels["outbound"].closed,
        tunnels["outbound"].sent_bytes,
        tunnels["outbound"].received_bytes,
        tunnels["outbound"].retransmits,
    ) == (1, 20, 10, 2)
    assert (tunnels["inbound"].sent_bytes, tunnels["inbound"].received_bytes) == (4, 3)
    assert rec.logs == [] and rec.telemetry.series() == []  # fmt: skip


def test_a_tunnel_record_that_came_first_is_claimed_by_track_tunnel(rec: Recorder) -> None:
    rec.telemetry.kernel_closed([record(9, received=5, sent=6)])
    rec.telemetry.track_tunnel(9, "inbound")
    assert rec.telemetry.tunnels()["inbound"].closed == 1


def test_tunnels_are_not_tracked_without_kernel_records() -> None:
    recorder = Recorder(kernel_records=False)
    recorder.telemetry.track_tunnel(7, "outbound")
    recorder.telemetry.kernel_closed([record(7)])
    assert recorder.telemetry.tunnels() == {}
