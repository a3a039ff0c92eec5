/* cgroup/connect4 on the agent's own cgroup: the kernel's L4 authorization for HBONE.
 *
 * Before connecting to the app for an HBONE tunnel, the agent stores on the upstream socket
 * (socket-local storage, upstream_peers) the peer identity it verified in the TLS handshake
 * and the client's address. This program reads it and decides with the same authorize() as
 * pod_ingress: a denied connect() fails with EPERM and never leaves the agent, which answers
 * the CONNECT with 401, naming the policy this program writes back into the storage. Sockets
 * without that storage (every other connect) pass untouched. */

#include "lib/common.h"
#include "lib/authorize.h"

int agent_connect4(struct bpf_sock_addr *ctx)
{
    struct bpf_sock *sk = ctx->sk;
    if (!sk)
        return 1;
    struct upstream_peer *peer = upstream_peers.sk_storage_get(sk, 0, 0);
    if (!peer)
        return 1;
    struct policy_decision decision;
    authorize(peer->src_addr, ctx->user_ip4, bpf_ntohs((__u16)ctx->user_port), peer->identity,
              &decision, 1);
    /* So the agent can name the policy in its 401 and access log. */
    peer->policy = decision.policy;
    peer->reason = decision.reason;
    return decision.allow ? 1 : 0;
}
