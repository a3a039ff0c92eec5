/* Packet parsing shared by the programs. Marks and ports are injected by the loader with -D
 * (agent/datapath/abi.py is their single source), so C and Python cannot drift apart. */
#pragma once

#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/if_packet.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/pkt_cls.h>
#include <uapi/linux/tcp.h>
#include <uapi/linux/udp.h>

#ifndef AGENT_MARK
#error "AGENT_MARK must be defined by the loader"
#endif

/* Agent sockets carry AGENT_MARK in the low 12 bits, as in Istio (0x539 = 1337). abi.py reads
 * MARK_MASK from here. */
#define MARK_MASK 0xfff

/* A TCP segment's or (PARSE_UDP4) a UDP datagram's addresses; syn and ack are TCP's. */
struct tcp4_view {
    __u32 saddr; /* network order */
    __u32 daddr;
    __u16 sport; /* network order */
    __u16 dport;
    __u8 syn;
    __u8 ack;
};

enum parse_result { PARSE_TCP4 = 0, PARSE_OTHER = 1, PARSE_MALFORMED = 2, PARSE_UDP4 = 3 };

#define DNS_PORT 53

/* bpf_skb_load_bytes rather than direct access: it copes with headers that sit in a
 * non-linear part of the skb, which direct packet access would have to pull first. */
static __always_inline enum parse_result parse_ip4(struct __sk_buff *skb, struct tcp4_view *v)
{
    if (skb->protocol != bpf_htons(ETH_P_IP))
        return PARSE_OTHER;
    struct iphdr ip;
    if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip, sizeof(ip)) < 0)
        return PARSE_MALFORMED;
    if (ip.protocol != IPPROTO_TCP && ip.protocol != IPPROTO_UDP)
        return PARSE_OTHER;
    if (ip.ihl < 5)
        return PARSE_MALFORMED;
    /* Later fragments carry no L4 header; the stack reassembles them. */
    if (ip.frag_off & bpf_htons(0x1fff))
        return PARSE_OTHER;
    if (ip.protocol == IPPROTO_UDP) {
        struct udphdr udp;
        if (bpf_skb_load_bytes(skb, ETH_HLEN + ip.ihl * 4, &udp, sizeof(udp)) < 0)
            return PARSE_MALFORMED;
        v->saddr = ip.saddr;
        v->daddr = ip.daddr;
        v->sport = udp.source;
        v->dport = udp.dest;
        return PARSE_UDP4;
    }
    struct tcphdr tcp;
    if (bpf_skb_load_bytes(skb, ETH_HLEN + ip.ihl * 4, &tcp, sizeof(tcp)) < 0)
        return PARSE_MALFORMED;
    v->saddr = ip.saddr;
    v->daddr = ip.daddr;
    v->sport = tcp.source;
    v->dport = tcp.dest;
    v->syn = tcp.syn;
    v->ack = tcp.ack;
    return PARSE_TCP4;
}
