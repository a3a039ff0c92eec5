/* The in-kernel L4 authorization decision (maps and layout: policy.h). Every decision is
 * counted in policy_stats by (policy, reason). */
#pragma once

#include "maps.h"

static __always_inline __u32 lowest_bit(__u64 x)
{
    __u32 n = 0;
    if (!(x & 0xffffffffULL)) { n += 32; x >>= 32; }
    if (!(x & 0xffffULL)) { n += 16; x >>= 16; }
    if (!(x & 0xffULL)) { n += 8; x >>= 8; }
    if (!(x & 0xfULL)) { n += 4; x >>= 4; }
    if (!(x & 0x3ULL)) { n += 2; x >>= 2; }
    if (!(x & 0x1ULL)) { n += 1; }
    return n;
}

/* Index of the first term set in (a & b); -1 when none. Terms are ordered by policy
 * (namespace/name), so the first is the deciding policy, as in the reference semantics. */
static __always_inline int first_term(const struct policy_mask *a, const struct policy_mask *b)
{
#pragma unroll
    for (int i = 0; i < POLICY_MASK_WORDS; i++) {
        __u64 both = a->w[i] & b->w[i];
        if (both)
            return i * 64 + lowest_bit(both);
    }
    return -1;
}

static __always_inline __u32 term_policy(__u32 gen, __u32 wid, int term)
{
    struct pol_term_key key = {.gen = gen, .wid = wid, .term = (__u32)term};
    __u32 *policy = pol_terms.lookup(&key);
    return policy ? *policy : 0;
}

static __always_inline void count_policy(__u32 policy, __u32 reason)
{
    struct policy_stat_key key = {.policy = policy, .reason = reason};
    __u64 zero = 0;
    __u64 *count = policy_stats.lookup_or_try_init(&key, &zero);
    if (count)
        *count += 1; /* per-CPU slot */
}

/* The source identity of a plaintext connection: a known workload's, else unauthenticated. */
static __always_inline __u32 plaintext_identity(__u32 saddr)
{
    __u32 zero = 0;
    struct pol_config *cfg = pol_config.lookup(&zero);
    if (!cfg)
        return 0;
    struct workload_identity_key key = {.gen = cfg->gen, .addr = saddr};
    __u32 *identity = workload_identities.lookup(&key);
    return identity ? *identity : 0;
}

/* Addresses in network order, port in host order. `count`: a decision (1), or a probe that
 * re-asks about a live connection (0, see policy_probe.c). */
static __always_inline void authorize(__u32 saddr, __u32 daddr, __u16 dport, __u32 identity,
                                      struct policy_decision *d, int count)
{
    d->allow = 1;
    d->reason = POLICY_NO_POLICY;
    d->policy = 0;
    d->dry_policy = 0;
    d->dry_would_deny = 0;

    __u32 zero = 0;
    struct pol_config *cfg = pol_config.lookup(&zero);
    if (!cfg)
        goto fallback;
    __u32 gen = cfg->gen;
    struct pol_workload_key wkey = {.gen = gen, .addr = daddr};
    struct pol_workload *w = pol_workloads.lookup(&wkey);
    if (!w)
        goto counted; /* no policy applies to this destination */
    if (w->flags & POL_FALLBACK)
        goto fallback;
    __u32 wid = w->wid;

    struct pol_identity_key ikey = {.gen = gen, .wid = wid, .identity = identity};
    struct policy_mask *by_identity = pol_identities.lookup(&ikey);
    if (!by_identity)
        by_identity = &w->identity_default; /* most identities: see compiler.py */
    struct pol_lpm_key src_key = {.prefixlen = 96, .gen = gen, .wid = wid, .addr = saddr};
    struct policy_mask *by_src = pol_src_ips.lookup(&src_key);
    struct pol_lpm_key dst_key = {.prefixlen = 96, .gen = gen, .wid = wid, .addr = daddr};
    struct policy_mask *by_dst = pol_dst_ips.lookup(&dst_key);
    struct pol_port_key pkey = {.gen = gen, .wid = wid, .port = dport};
    struct policy_mask *by_port = pol_ports.lookup(&pkey);
    if (!by_port) {
        pkey.port = 0;
        by_port = pol_ports.lookup(&pkey);
    }
    if (!by_src || !by_dst || !by_port)
        goto fallback; /* the compiler writes every class: a miss means a broken set */

    struct policy_mask m;
#pragma unroll
    for (int i = 0; i < POLICY_MASK_WORDS; i++)
        m.w[i] = by_identity->w[i] & by_src->w[i] & by_dst->w[i] & by_port->w[i];

    int term = first_term(&m, &w->deny);
    if (term >= 0) {
        d->allow = 0;
        d->reason = POLICY_DENIED;
        d->policy = term_policy(gen, wid, term);
        goto counted;
    }
    if (w->flags & POL_HAS_ALLOW) {
        term = first_term(&m, &w->allow);
        if (term >= 0) {
            d->reason = POLICY_ALLOWED;
            d->policy = term_policy(gen, wid, term);
        } else {
            d->allow = 0;
            d->reason = POLICY_DEFAULT_DENY;
        }
    }
    if (d->allow) {
        /* Would dry-run policies, enforced, deny? Enforced DENY terms did not match, so a
         * match in dry_deny is a dry-run one. */
        term = first_term(&m, &w->dry_deny);
        if (term >= 0) {
            d->dry_would_deny = 1;
            d->dry_policy = term_policy(gen, wid, term);
        } else if (w->flags & (POL_HAS_ALLOW | POL_DRY_HAS_ALLOW)) {
            struct policy_mask any_allow;
#pragma unroll
            for (int i = 0; i < POLICY_MASK_WORDS; i++)
                any_allow.w[i] = w->allow.w[i] | w->dry_allow.w[i];
            if (first_term(&m, &any_allow) < 0)
                d->dry_would_deny = 1; /* default deny, dry_policy 0 */
        }
    }
counted:
    if (count) {
        count_policy(d->policy, d->reason);
        if (d->dry_would_deny)
            count_policy(d->dry_policy, POLICY_DRY_RUN_WOULD_DENY);
    }
    return;
fallback:
    d->allow = 0;
    d->reason = POLICY_FALLBACK;
    d->policy = 0;
    if (count)
        count_policy(0, POLICY_FALLBACK);
}
