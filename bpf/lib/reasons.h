/* The reasons behind every decision the tc programs take. The Python side reads this enum
 * from this file (agent/datapath/abi.py), so names and numbers have one source. */
#pragma once

enum verdict_reason {
    PASS_NOT_TCP4 = 0,                 /* not TCP over IPv4: outside capture */
    PASS_AGENT_MARK = 1,               /* the agent's own socket (mark 0x539) */
    PASS_EXCLUDED_PORT = 2,            /* destination port excluded from capture */
    PASS_NOT_ENROLLED = 3,             /* address not (or no longer) in the pods map */
    REDIRECT_OUTBOUND = 4,             /* pod egress looped back to ingress for the agent */
    DELIVER_OUTBOUND_LISTENER = 5,     /* new outbound connection given to 15001 */
    DELIVER_OUTBOUND_ESTABLISHED = 6,  /* outbound packet given to its agent socket */
    DELIVER_INBOUND_LISTENER = 7,      /* new inbound connection given to 15006 */
    PASS_INBOUND_ESTABLISHED = 8,      /* inbound packet of a known connection */
    PASS_HBONE = 9,                    /* inbound to 15008, the HBONE listener */
    PASS_INBOUND_OTHER = 10,           /* non-SYN with no socket: the stack answers it */
    DROP_MALFORMED = 11,               /* truncated IPv4/TCP header */
    DROP_NO_LISTENER = 12,             /* agent listener absent: fail closed */
    DROP_AGENT_PORT = 13,              /* inbound straight to 15001/15006 */
    DROP_ASSIGN_FAILED = 14,           /* bpf_sk_assign refused the socket */
    DROP_POLICY_DENIED = 15,           /* plaintext inbound denied by L4 policy */
    REDIRECT_DNS = 16,                 /* pod's UDP DNS query looped back for the agent */
    DELIVER_DNS = 17,                  /* UDP DNS query given to the agent's 15053 socket */
    DROP_NO_DNS_LISTENER = 18,         /* DNS capture on, the agent's socket absent */
    DELIVER_OUTBOUND_REOPEN = 19,      /* new outbound SYN given to an agent TIME_WAIT socket */
    DELIVER_INBOUND_REOPEN = 20,       /* new inbound SYN given to an agent TIME_WAIT socket */
    REOPEN_LISTENER = 21,              /* pod_lookup chose the agent listener for such a SYN */
    DROP_REOPEN_NO_LISTENER = 22,      /* ... and found none: fail closed */
    VERDICT_REASON_MAX = 23,
};
