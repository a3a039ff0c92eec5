/* Every map the datapath uses, declared once with explicit key/value structs so that
 * `bpftool map dump pinned /sys/fs/bpf/ambient/<node>/maps/<name>` prints them by field. */
#pragma once

#include "reasons.h"
#include "policy.h"

#define POD_CAPTURE 0x1     /* steer this pod's TCP through the agent */
#define POD_CAPTURE_DNS 0x2 /* and its UDP DNS queries (port 53) to the agent's 15053 */

struct pod_key {
    __u32 addr; /* pod IPv4 address, network order */
};

struct pod_info {
    __u32 flags;              /* POD_* bits */
    __u32 reserved;
    __u64 outbound_captured;  /* connections (SYNs) steered to the outbound listener */
    __u64 inbound_captured;   /* connections (SYNs) steered to the inbound listener */
};

struct port_key {
    __u16 port; /* host order */
    __u16 reserved;
};

struct port_rule {
    __u32 flags; /* reserved for direction bits; presence alone excludes the port */
};

/* Enrolled pods of this node, keyed by address: the tc programs are shared by all pods. */
BPF_TABLE("hash", struct pod_key, struct pod_info, pods, 4096);

/* The agent's capture listeners in each pod, for pod_lookup (bpf/pod_lookup.c). */
struct listener_key {
    __u32 addr; /* the pod's IPv4 address, network order */
    __u32 port; /* PORT_OUTBOUND or PORT_INBOUND, host order */
};
BPF_TABLE("sockhash", struct listener_key, int, pod_listeners, 8192);

/* SYNs the tc programs gave to an agent socket in TIME_WAIT, by their addresses, each with
 * the listener pod_lookup is to choose when that socket gives the SYN up. */
struct reopen_key {
    __u32 saddr; /* network order */
    __u32 daddr;
    __u16 sport; /* network order */
    __u16 dport;
};
BPF_TABLE("lru_hash", struct reopen_key, struct listener_key, syn_reopens, 4096);

/* Destination ports that pod egress never steers (for example a node-local service). */
BPF_TABLE("hash", struct port_key, struct port_rule, capture_exclude_ports, 256);

/* Packets per verdict reason, indexed by enum verdict_reason (array maps take a plain u32
 * key, so bpftool prints the number; `ambientctl verdicts` prints the name). */
BPF_TABLE("percpu_array", __u32, __u64, verdicts, VERDICT_REASON_MAX);

/* ---- L4 authorization (see policy.h) ---- */
BPF_ARRAY(pol_config, struct pol_config, 1);
BPF_TABLE("hash", struct pol_workload_key, struct pol_workload, pol_workloads, 2048);
/* Pages after a workload's first (a workload with more than 256 terms). */
BPF_F_TABLE("hash", struct pol_page_key, struct pol_workload, pol_pages, 4096,
            BPF_F_NO_PREALLOC);
/* The two large ones are allocated on use (NO_PREALLOC): an idle agent pays nothing. */
BPF_F_TABLE("hash", struct pol_identity_key, struct policy_mask, pol_identities, 262144,
            BPF_F_NO_PREALLOC);
BPF_LPM_TRIE(pol_src_ips, struct pol_lpm_key, struct policy_mask, 65536);
BPF_LPM_TRIE(pol_dst_ips, struct pol_lpm_key, struct policy_mask, 16384);
BPF_TABLE("hash", struct pol_port_key, struct policy_mask, pol_ports, 65536);
BPF_F_TABLE("hash", struct pol_term_key, __u32, pol_terms, 262144, BPF_F_NO_PREALLOC);
/* Decisions per (policy, reason), and the policies' names, so bpftool and ambientctl can
 * say which policy decided without asking the agent. */
BPF_TABLE("percpu_hash", struct policy_stat_key, __u64, policy_stats, 16384);
#define POLICY_NAME_SIZE 128 /* bytes, the terminating NUL included */
struct policy_name {
    char name[POLICY_NAME_SIZE]; /* "namespace/name" */
};
BPF_TABLE("hash", __u32, struct policy_name, policy_names, 16384);

/* HBONE upstream sockets: the peer the agent verified, read by agent_connect4. Mirrored by
 * agent/policy/kernel_maps.py with ctypes (checked at import). */
struct upstream_peer {
    __u32 identity; /* the verified peer's identity number */
    __u32 src_addr; /* the client's IPv4, network order */
    __u32 policy;   /* written back by agent_connect4: the deciding policy (0: none) */
    __u32 reason;   /* written back: enum policy_reason */
};
BPF_SK_STORAGE(upstream_peers, struct upstream_peer);
