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

/* The terms of one page of W that a connection satisfies (the AND of its four masks); 0 when
 * a class is missing, which the compiler never leaves: a broken set. */
static __always_inline int page_terms(__u32 gen, __u32 wid, const struct pol_workload *page,
                                      __u32 saddr, __u32 daddr, __u16 dport, __u32 identity,
                                      struct policy_mask *m)
{
    struct pol_identity_key ikey = {.gen = gen, .wid = wid, .identity = identity};
    struct policy_mask *by_identity = pol_identities.lookup(&ikey);
    if (!by_identity)
        by_identity = (struct policy_mask *)&page->identity_default; /* see compiler.py */
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
        return 0;
#pragma unroll
    for (int i = 0; i < POLICY_MASK_WORDS; i++)
        m->w[i] = by_identity->w[i] & by_src->w[i] & by_dst->w[i] & by_port->w[i];
    return 1;
}

static __always_inline int any_term(const struct policy_mask *a, const struct policy_mask *b)
{
    __u64 both = 0;
#pragma unroll
    for (int i = 0; i < POLICY_MASK_WORDS; i++)
        both |= a->w[i] & b->w[i];
    return both != 0;
}

enum page_mask { PAGE_DENY, PAGE_ALLOW, PAGE_DRY_DENY, PAGE_ANY_ALLOW };

static __always_inline const struct pol_workload *
page_of(__u32 gen, const struct pol_workload *w, __u32 wid)
{
    if (wid == w->wid)
        return w;
    struct pol_page_key key = {.gen = gen, .wid = wid};
    return pol_pages.lookup(&key);
}

static __always_inline int page_matches(const struct policy_mask *m,
                                        const struct pol_workload *page, enum page_mask which)
{
    switch (which) {
    case PAGE_DENY:
        return any_term(m, &page->deny);
    case PAGE_ALLOW:
        return any_term(m, &page->allow);
    case PAGE_DRY_DENY:
        return any_term(m, &page->dry_deny);
    default:
        return any_term(m, &page->allow) || any_term(m, &page->dry_allow);
    }
}

/* The first page of W (its wid) with a term of `which` that the connection satisfies: -1
 * when none, -2 for a broken set (a page or class the compiler always writes is missing).
 * One small loop per question keeps each loop's states few for the verifier. */
static __always_inline long first_page(__u32 gen, const struct pol_workload *w, __u32 saddr,
                                       __u32 daddr, __u16 dport, __u32 identity,
                                       enum page_mask which)
{
    __u32 pages = w->pages;
    struct policy_mask m;
    for (__u32 p = 0; p < POL_MAX_PAGES; p++) {
        if (p >= pages)
            break;
        __u32 wid = w->wid + p;
        const struct pol_workload *page = page_of(gen, w, wid);
        if (!page || !page_terms(gen, wid, page, saddr, daddr, dport, identity, &m))
            return -2;
        if (page_matches(&m, page, which))
            return wid;
    }
    return -1;
}

/* The deciding policy: the first term of `which` the connection satisfies on page wid. */
static __always_inline __u32 deciding_policy(__u32 gen, const struct pol_workload *w, __u32 wid,
                                             __u32 saddr, __u32 daddr, __u16 dport,
                                             __u32 identity, enum page_mask which)
{
    const struct pol_workload *page = page_of(gen, w, wid);
    struct policy_mask m;
    if (!page || !page_terms(gen, wid, page, saddr, daddr, dport, identity, &m))
        return 0;
    const struct policy_mask *mask = which == PAGE_DENY    ? &page->deny
                                     : which == PAGE_ALLOW ? &page->allow
                                                           : &page->dry_deny;
    int term = first_term(&m, mask);
    return term >= 0 ? term_policy(gen, wid, term) : 0;
}

/* Istio's answer from the one page of W: any DENY match denies; with an ALLOW policy, only an
 * ALLOW match allows; the dry-run verdict beside it. The same rules as the page walk below. */
static __always_inline void decide_on_one_page(__u32 gen, const struct pol_workload *w,
                                               const struct policy_mask *m,
                                               struct policy_decision *d)
{
    int term = first_term(m, &w->deny);
    if (term >= 0) {
        d->allow = 0;
        d->reason = POLICY_DENIED;
        d->policy = term_policy(gen, w->wid, term);
        return;
    }
    if (w->flags & POL_HAS_ALLOW) {
        term = first_term(m, &w->allow);
        if (term >= 0) {
            d->reason = POLICY_ALLOWED;
            d->policy = term_policy(gen, w->wid, term);
        } else {
            d->allow = 0;
            d->reason = POLICY_DEFAULT_DENY;
        }
    }
    if (d->allow && (w->flags & POL_HAS_DRY_RUN)) {
        term = first_term(m, &w->dry_deny);
        if (term >= 0) {
            d->dry_would_deny = 1;
            d->dry_policy = term_policy(gen, w->wid, term);
        } else if ((w->flags & (POL_HAS_ALLOW | POL_DRY_HAS_ALLOW)) &&
                   !page_matches(m, w, PAGE_ANY_ALLOW)) {
            d->dry_would_deny = 1; /* default deny, dry_policy 0 */
        }
    }
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
    if (w->pages <= 1) {
        /* One page, as most workloads have: its mask is worked out once and answers every
         * question, so a decision costs what it did before pages (the walk below would work
         * it out again per question). */
        struct policy_mask m;
        if (!page_terms(gen, w->wid, w, saddr, daddr, dport, identity, &m))
            goto fallback;
        decide_on_one_page(gen, w, &m, d);
        goto counted;
    }

    /* Terms are ordered by policy and pages by term: the first page with a match holds the
     * deciding policy. Any DENY match denies. */
    long page = first_page(gen, w, saddr, daddr, dport, identity, PAGE_DENY);
    if (page == -2)
        goto fallback;
    if (page >= 0) {
        d->allow = 0;
        d->reason = POLICY_DENIED;
        d->policy = deciding_policy(gen, w, page, saddr, daddr, dport, identity, PAGE_DENY);
        goto counted;
    }
    if (w->flags & POL_HAS_ALLOW) {
        page = first_page(gen, w, saddr, daddr, dport, identity, PAGE_ALLOW);
        if (page == -2)
            goto fallback;
        if (page >= 0) {
            d->reason = POLICY_ALLOWED;
            d->policy = deciding_policy(gen, w, page, saddr, daddr, dport, identity,
                                        PAGE_ALLOW);
        } else {
            d->allow = 0;
            d->reason = POLICY_DEFAULT_DENY;
        }
    }
    if (d->allow && (w->flags & POL_HAS_DRY_RUN)) {
        /* Would dry-run policies, enforced, deny? Enforced DENY terms did not match, so a
         * match in dry_deny is a dry-run one. */
        page = first_page(gen, w, saddr, daddr, dport, identity, PAGE_DRY_DENY);
        if (page >= 0) {
            d->dry_would_deny = 1;
            d->dry_policy = deciding_policy(gen, w, page, saddr, daddr, dport, identity,
                                            PAGE_DRY_DENY);
        } else if ((w->flags & (POL_HAS_ALLOW | POL_DRY_HAS_ALLOW)) &&
                   first_page(gen, w, saddr, daddr, dport, identity, PAGE_ANY_ALLOW) == -1) {
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
