/* Never attached: run through BPF_PROG_RUN by the agent to ask authorize() about a live
 * connection after a policy change (--cut-denied-connections), so that even this re-check is
 * the kernel's decision. Not counted as a decision.
 *
 * In: a TCP/IPv4 packet of the connection, client to server, with the client's identity
 * number as the skb mark. Out (the return value): bit 0 allow, bits 1-7 enum policy_reason,
 * bits 8-31 the deciding policy's number. The agent decodes it with the shifts below
 * (agent/datapath/abi.py reads them from here). */

#include "lib/common.h"
#include "lib/authorize.h"

#define PROBE_REASON_SHIFT 1 /* below it: the allow bit */
#define PROBE_POLICY_SHIFT 8 /* between the two: enum policy_reason */

int policy_probe(struct __sk_buff *skb)
{
    struct tcp4_view v = {};
    /* Not a probe we understand: deny, fallback. */
    if (parse_ip4(skb, &v) != PARSE_TCP4)
        return POLICY_FALLBACK << PROBE_REASON_SHIFT;
    struct policy_decision d;
    authorize(v.saddr, v.daddr, bpf_ntohs(v.dport), skb->mark, &d, 0);
    return d.allow | (d.reason << PROBE_REASON_SHIFT) | (d.policy << PROBE_POLICY_SHIFT);
}
