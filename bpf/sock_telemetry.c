/* sockops on the agent's own cgroup: connection telemetry counted by the kernel.
 *
 * Every TCP socket the agent holds lives in its cgroup: the pod-facing ends of captured
 * connections (accepted on 15001/15006, or connected to the app for an HBONE tunnel) and the
 * HBONE tunnel sockets themselves. When one is established it is entered in sock_conns (so
 * bpftool shows the live ones) and asked for state callbacks; when it reaches TCP_CLOSE its
 * final counters (payload bytes received, payload bytes the peer acknowledged, smoothed RTT,
 * retransmissions, lifetime) go to userspace as one ring-buffer event. Nothing happens per
 * packet: only the establish and state-change callbacks run. The agent joins each event to
 * the connection it registered under the same socket cookie.
 *
 * Payload, not sequence space: the kernel's bytes_received counts the peer's FIN and its
 * bytes_acked counts our SYN and FIN. The baselines taken at establishment remove the SYN; the
 * FINs are known from the state changes (a FIN in leads to CLOSE_WAIT or CLOSING, or, after
 * FIN_WAIT2, to TIME_WAIT, which the callback sees as FIN_WAIT2 -> CLOSE) and from snd_una
 * having reached snd_nxt once our FIN was sent. One case stays ambiguous: a reset received in
 * FIN_WAIT2 is taken for a FIN, so the received count is one too high (docs/telemetry.md). */

#include "lib/common.h"
#include <uapi/linux/tcp.h>

struct sock_conn {
    __u64 opened_ns;   /* bpf_ktime_get_ns() at establishment */
    __u32 local_addr;  /* network order */
    __u32 remote_addr; /* network order */
    __u16 local_port;  /* host order */
    __u16 remote_port; /* host order */
    __u8 passive;      /* 1: accepted, 0: connected by the agent */
    __u8 fin_in;       /* the peer's FIN arrived */
    __u8 fin_out;      /* our FIN was sent */
    __u8 reserved;
    __u64 bytes_received0; /* kernel counters at establishment: the baselines */
    __u64 bytes_acked0;
};

/* One closed connection. Mirrored by agent/telemetry/events.py (checked member by member). */
struct sock_closed_event {
    __u64 cookie;
    __u64 opened_ns;
    __u64 closed_ns;
    __u64 bytes_received; /* payload bytes the agent's socket received */
    __u64 bytes_sent;     /* payload bytes it sent that the peer acknowledged */
    __u32 local_addr;
    __u32 remote_addr;
    __u16 local_port;
    __u16 remote_port;
    __u32 srtt_us;        /* smoothed RTT, microseconds */
    __u32 total_retrans;  /* retransmitted segments */
    __u8 passive;
    __u8 reserved[3];
};

/* Indexes of telemetry_stats; mirrored by abi.TelemetryStat. */
enum telemetry_stat {
    TELEMETRY_EVENTS_SENT = 0,
    TELEMETRY_EVENTS_DROPPED = 1,  /* ring buffer full: the agent fell behind */
    TELEMETRY_TABLE_FULL = 2,      /* sock_conns full: connection not tracked */
    TELEMETRY_STAT_MAX = 3,
};

BPF_TABLE("hash", __u64, struct sock_conn, sock_conns, 65536);
BPF_RINGBUF_OUTPUT(telemetry_events, 256); /* pages: 1 MiB, about 14k events in flight */
BPF_TABLE("percpu_array", __u32, __u64, telemetry_stats, TELEMETRY_STAT_MAX);

static __always_inline void telemetry_count(__u32 stat)
{
    __u64 *count = telemetry_stats.lookup(&stat);
    if (count)
        *count += 1;
}

static __always_inline void connection_established(struct bpf_sock_ops *skops, __u8 passive)
{
    if (skops->family != 2 /* AF_INET */)
        return;
    __u64 cookie = bpf_get_socket_cookie(skops);
    struct sock_conn conn = {
        .opened_ns = bpf_ktime_get_ns(),
        .local_addr = skops->local_ip4,
        .remote_addr = skops->remote_ip4,
        .local_port = (__u16)skops->local_port,
        .remote_port = (__u16)bpf_ntohl(skops->remote_port),
        .passive = passive,
        .bytes_received0 = skops->bytes_received,
        .bytes_acked0 = skops->bytes_acked,
    };
    if (sock_conns.update(&cookie, &conn) != 0) {
        telemetry_count(TELEMETRY_TABLE_FULL);
        return;
    }
    bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags | BPF_SOCK_OPS_STATE_CB_FLAG);
}

static __always_inline void state_changed(struct bpf_sock_ops *skops, __u32 from, __u32 to)
{
    __u64 cookie = bpf_get_socket_cookie(skops);
    struct sock_conn *conn = sock_conns.lookup(&cookie);
    if (!conn)
        return;
    if (to == BPF_TCP_CLOSE_WAIT || to == BPF_TCP_CLOSING ||
        (to == BPF_TCP_CLOSE && from == BPF_TCP_FIN_WAIT2))
        conn->fin_in = 1;
    if (to == BPF_TCP_FIN_WAIT1 || to == BPF_TCP_LAST_ACK)
        conn->fin_out = 1;
    if (to != BPF_TCP_CLOSE)
        return;
    __u64 fin_acked = conn->fin_out && skops->snd_una == skops->snd_nxt;
    struct sock_closed_event event = {
        .cookie = cookie,
        .opened_ns = conn->opened_ns,
        .closed_ns = bpf_ktime_get_ns(),
        .bytes_received = skops->bytes_received - conn->bytes_received0 - conn->fin_in,
        .bytes_sent = skops->bytes_acked - conn->bytes_acked0 - fin_acked,
        .local_addr = conn->local_addr,
        .remote_addr = conn->remote_addr,
        .local_port = conn->local_port,
        .remote_port = conn->remote_port,
        .srtt_us = skops->srtt_us >> 3, /* the kernel keeps it scaled by 8 */
        .total_retrans = skops->total_retrans,
        .passive = conn->passive,
    };
    sock_conns.delete(&cookie);
    if (telemetry_events.ringbuf_output(&event, sizeof(event), 0) == 0)
        telemetry_count(TELEMETRY_EVENTS_SENT);
    else
        telemetry_count(TELEMETRY_EVENTS_DROPPED);
}

int sock_telemetry(struct bpf_sock_ops *skops)
{
    switch (skops->op) {
    case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB:
        connection_established(skops, 0);
        break;
    case BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB:
        connection_established(skops, 1);
        break;
    case BPF_SOCK_OPS_STATE_CB:
        state_changed(skops, skops->args[0], skops->args[1]);
        break;
    }
    return 1;
}
