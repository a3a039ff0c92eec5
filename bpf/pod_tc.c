/* tc programs on an enrolled pod's interface, inside the pod's network namespace.
 *
 * pod_egress (clsact egress): a TCP packet the pod sends, not from an agent socket and not
 *   to an excluded port, is marked DELIVER_MARK and sent back in on the same interface; so
 *   is a UDP datagram to port 53 when the pod's DNS is captured (POD_CAPTURE_DNS).
 * pod_ingress (clsact ingress):
 *   - a packet carrying DELIVER_MARK came from that loop (a veth crossing from another netns
 *     clears marks, so nothing genuine carries it): hand it to the socket of its connection,
 *     or for a new connection to the agent's outbound listener (15001). The listener then
 *     sees the original destination as its local address. A looped DNS datagram goes to the
 *     agent's UDP socket on 15053, which reads its original destination with
 *     IP_RECVORIGDSTADDR.
 *   - anything else is genuinely inbound: packets of known connections and those to 15008
 *     pass; a new connection to any other port is authorized by L4 policy (lib/authorize.h)
 *     and, if allowed, goes to the inbound listener (15006), else is dropped.
 *   A new connection's SYN that finds an agent socket of its 4-tuple in TIME_WAIT goes to
 *   that socket instead, for pod_lookup to hand on to the listener (assign_new).
 * The pod netns routes DELIVER_MARK packets to `lo` (ip rule + local table), so the stack
 * accepts the looped packets, whose destination is remote, as local. */

#include "lib/common.h"
#include "lib/verdict.h"
#include "lib/authorize.h"

/* Lookups run in the netns of the interface the program is attached to: the pod's. */
static __always_inline struct bpf_sock *lookup_tcp(struct __sk_buff *skb,
                                                   const struct tcp4_view *v, __u16 dport)
{
    struct bpf_sock_tuple tuple = {};
    tuple.ipv4.saddr = v->saddr;
    tuple.ipv4.daddr = v->daddr;
    tuple.ipv4.sport = v->sport;
    tuple.ipv4.dport = dport;
    return bpf_skc_lookup_tcp(skb, &tuple, sizeof(tuple.ipv4), BPF_F_CURRENT_NETNS, 0);
}

/* A socket of this exact connection: established, or a request socket mid-handshake.
 * Listeners match by port only, and a TIME_WAIT socket yields to a new SYN: *reopens says
 * the SYN found one (see assign_new). */
static __always_inline struct bpf_sock *lookup_connection(struct __sk_buff *skb,
                                                          const struct tcp4_view *v,
                                                          __u8 *reopens)
{
    struct bpf_sock *sk = lookup_tcp(skb, v, v->dport);
    if (!sk)
        return 0;
    if (sk->state == BPF_TCP_LISTEN || sk->state == BPF_TCP_TIME_WAIT) {
        *reopens = sk->state == BPF_TCP_TIME_WAIT && v->syn && !v->ack;
        bpf_sk_release(sk);
        return 0;
    }
    return sk;
}

static __always_inline struct bpf_sock *lookup_listener(struct __sk_buff *skb,
                                                        const struct tcp4_view *v, __u16 port)
{
    struct bpf_sock *sk = lookup_tcp(skb, v, bpf_htons(port));
    if (!sk)
        return 0;
    if (sk->state != BPF_TCP_LISTEN) {
        bpf_sk_release(sk);
        return 0;
    }
    return sk;
}

/* Consumes the socket reference. */
static __always_inline int assign(struct __sk_buff *skb, struct bpf_sock *sk,
                                  enum verdict_reason reason)
{
    long err = bpf_sk_assign(skb, sk, 0);
    bpf_sk_release(sk);
    if (err)
        return drop(DROP_ASSIGN_FAILED);
    /* Looped packets carry the next hop's MAC; make the stack treat them as ours. */
    bpf_skb_change_type(skb, PACKET_HOST);
    skb->mark = DELIVER_MARK;
    return verdict(reason, TC_ACT_OK);
}

/* A new connection's SYN, to `port`'s listener of the pod at pod_addr. When the SYN reopens
 * the 4-tuple of an agent socket in TIME_WAIT (the agent closed first and the client picked
 * the same port again), the listener cannot take it: the request socket would duplicate a
 * 4-tuple in the kernel's table, and the kernel (6.18 here) drops such a SYN without a word,
 * and every retransmission of it for the rest of TIME_WAIT's 60 s. So the SYN goes to the
 * TIME_WAIT socket, which retires on a valid new SYN and asks for a listener for the
 * address; pod_lookup (bpf/pod_lookup.c) answers with this one, through syn_reopens. */
static __always_inline int assign_new(struct __sk_buff *skb, const struct tcp4_view *v,
                                      __u8 reopens, __u32 pod_addr, __u16 port,
                                      enum verdict_reason to_listener,
                                      enum verdict_reason to_time_wait)
{
    struct bpf_sock *listener = lookup_listener(skb, v, port);
    if (!listener)
        return drop(DROP_NO_LISTENER);
    if (reopens) {
        struct bpf_sock *time_wait = lookup_tcp(skb, v, v->dport);
        if (time_wait && time_wait->state == BPF_TCP_TIME_WAIT) {
            bpf_sk_release(listener);
            struct reopen_key key = {
                .saddr = v->saddr, .daddr = v->daddr, .sport = v->sport, .dport = v->dport,
            };
            struct listener_key chosen = {.addr = pod_addr, .port = port};
            syn_reopens.update(&key, &chosen);
            return assign(skb, time_wait, to_time_wait);
        }
        if (time_wait)
            bpf_sk_release(time_wait); /* it went meanwhile: the listener takes the SYN */
    }
    return assign(skb, listener, to_listener);
}

static __always_inline struct pod_info *enrolled(__u32 addr)
{
    struct pod_key key = {.addr = addr};
    struct pod_info *pod = pods.lookup(&key);
    if (pod && (pod->flags & POD_CAPTURE))
        return pod;
    return 0;
}

/* A DNS query of a pod whose DNS the agent answers: looped back like TCP. */
static __always_inline int egress_udp(struct __sk_buff *skb, const struct tcp4_view *v)
{
    if (v->dport != bpf_htons(DNS_PORT))
        return verdict(PASS_NOT_TCP4, TC_ACT_OK);
    if ((skb->mark & MARK_MASK) == AGENT_MARK)
        return verdict(PASS_AGENT_MARK, TC_ACT_OK); /* the agent's own forward upstream */
    struct pod_info *pod = enrolled(v->saddr);
    if (!pod || !(pod->flags & POD_CAPTURE_DNS))
        return verdict(PASS_NOT_TCP4, TC_ACT_OK);
    skb->mark = DELIVER_MARK;
    return verdict(REDIRECT_DNS, bpf_redirect(skb->ifindex, BPF_F_INGRESS));
}

static __always_inline int deliver_dns(struct __sk_buff *skb, const struct tcp4_view *v)
{
    struct bpf_sock_tuple tuple = {};
    tuple.ipv4.saddr = v->saddr;
    tuple.ipv4.daddr = v->daddr;
    tuple.ipv4.sport = v->sport;
    tuple.ipv4.dport = bpf_htons(PORT_DNS);
    struct bpf_sock *sk =
        bpf_sk_lookup_udp(skb, &tuple, sizeof(tuple.ipv4), BPF_F_CURRENT_NETNS, 0);
    if (!sk)
        return drop(DROP_NO_DNS_LISTENER);
    return assign(skb, sk, DELIVER_DNS);
}

int pod_egress(struct __sk_buff *skb)
{
    struct tcp4_view v = {};
    enum parse_result parsed = parse_ip4(skb, &v);
    if (parsed == PARSE_OTHER)
        return verdict(PASS_NOT_TCP4, TC_ACT_OK);
    if (parsed == PARSE_MALFORMED)
        return drop(DROP_MALFORMED);
    if (parsed == PARSE_UDP4)
        return egress_udp(skb, &v);
    if ((skb->mark & MARK_MASK) == AGENT_MARK)
        return verdict(PASS_AGENT_MARK, TC_ACT_OK);
    struct pod_info *pod = enrolled(v.saddr);
    if (!pod)
        return verdict(PASS_NOT_ENROLLED, TC_ACT_OK);
    struct port_key port = {.port = bpf_ntohs(v.dport)};
    if (capture_exclude_ports.lookup(&port))
        return verdict(PASS_EXCLUDED_PORT, TC_ACT_OK);
    if (v.syn && !v.ack)
        __sync_fetch_and_add(&pod->outbound_captured, 1);
    skb->mark = DELIVER_MARK;
    return verdict(REDIRECT_OUTBOUND, bpf_redirect(skb->ifindex, BPF_F_INGRESS));
}

static __always_inline int deliver_outbound(struct __sk_buff *skb, const struct tcp4_view *v)
{
    __u8 reopens = 0;
    struct bpf_sock *sk = lookup_connection(skb, v, &reopens);
    if (sk)
        return assign(skb, sk, DELIVER_OUTBOUND_ESTABLISHED);
    return assign_new(skb, v, reopens, v->saddr, PORT_OUTBOUND, DELIVER_OUTBOUND_LISTENER,
                      DELIVER_OUTBOUND_REOPEN);
}

static __always_inline int deliver_inbound(struct __sk_buff *skb, const struct tcp4_view *v)
{
    __u8 reopens = 0;
    struct bpf_sock *sk = lookup_connection(skb, v, &reopens);
    if (sk) {
        bpf_sk_release(sk);
        return verdict(PASS_INBOUND_ESTABLISHED, TC_ACT_OK);
    }
    __u16 dport = bpf_ntohs(v->dport);
    if (dport == PORT_HBONE)
        return verdict(PASS_HBONE, TC_ACT_OK);
    if (dport == PORT_OUTBOUND || dport == PORT_INBOUND)
        return drop(DROP_AGENT_PORT);
    if (!v->syn || v->ack)
        return verdict(PASS_INBOUND_OTHER, TC_ACT_OK);
    struct pod_info *pod = enrolled(v->daddr);
    if (!pod)
        return verdict(PASS_NOT_ENROLLED, TC_ACT_OK);
    /* Plaintext is unauthenticated, whatever its source address: an address is not an
     * identity (a stale or spoofed one would carry another workload's). A denied connection
     * ends here, without waking userspace. */
    struct policy_decision decision;
    authorize(v->saddr, v->daddr, bpf_ntohs(v->dport), UNAUTHENTICATED_IDENTITY, &decision, 1);
    if (!decision.allow)
        return drop(DROP_POLICY_DENIED);
    int action = assign_new(skb, v, reopens, v->daddr, PORT_INBOUND, DELIVER_INBOUND_LISTENER,
                            DELIVER_INBOUND_REOPEN);
    if (action == TC_ACT_OK)
        __sync_fetch_and_add(&pod->inbound_captured, 1);
    return action;
}

int pod_ingress(struct __sk_buff *skb)
{
    struct tcp4_view v = {};
    enum parse_result parsed = parse_ip4(skb, &v);
    if (parsed == PARSE_OTHER)
        return verdict(PASS_NOT_TCP4, TC_ACT_OK);
    if (parsed == PARSE_MALFORMED)
        return drop(DROP_MALFORMED);
    if (parsed == PARSE_UDP4) {
        if (skb->mark == DELIVER_MARK && v.dport == bpf_htons(DNS_PORT))
            return deliver_dns(skb, &v);
        return verdict(PASS_NOT_TCP4, TC_ACT_OK);
    }
    if (skb->mark == DELIVER_MARK)
        return deliver_outbound(skb, &v);
    return deliver_inbound(skb, &v);
}
