/* sk_lookup on each enrolled pod's network namespace: the listener for a SYN that reopens
 * the 4-tuple of an agent socket in TIME_WAIT.
 *
 * The tc programs give such a SYN to the TIME_WAIT socket (pod_tc.c, assign_new) and note
 * in syn_reopens which of the agent's listeners is to take it. The TIME_WAIT socket retires
 * on a valid new SYN and the kernel looks for a listener on the SYN's destination, running
 * this program first: it answers with the noted listener. Any other lookup is none of ours
 * and goes on as the stack would do it. */

#include "lib/common.h"
#include "lib/verdict.h"

#define FAMILY_INET 2 /* AF_INET */

int pod_lookup(struct bpf_sk_lookup *ctx)
{
    if (ctx->family != FAMILY_INET || ctx->protocol != IPPROTO_TCP)
        return SK_PASS;
    struct reopen_key key = {
        .saddr = ctx->remote_ip4,
        .daddr = ctx->local_ip4,
        .sport = ctx->remote_port,
        .dport = bpf_htons(ctx->local_port),
    };
    struct listener_key *noted = syn_reopens.lookup(&key);
    if (!noted)
        return SK_PASS;
    struct listener_key chosen = *noted;
    syn_reopens.delete(&key);
    /* Without the agent's listener, never the stack's own lookup: it could find one of the
     * app's listeners on that port and connect the pod to itself. */
    struct bpf_sock *sk = (struct bpf_sock *)pod_listeners.lookup(&chosen);
    if (!sk)
        return verdict(DROP_REOPEN_NO_LISTENER, SK_DROP);
    long err = bpf_sk_assign(ctx, sk, 0);
    bpf_sk_release(sk);
    if (err)
        return verdict(DROP_ASSIGN_FAILED, SK_DROP);
    return verdict(REOPEN_LISTENER, SK_PASS);
}
