/* L4 authorization decided in the kernel, with a constant number of map lookups.
 *
 * The compiler (agent/policy/compiler.py) expands the policies that apply to a destination
 * workload W into conjunctive terms, in pages of 256 (numbered 0..255 within a page). For each dimension of a
 * connection it stores, per value class, the bitmask of W's terms that the value satisfies:
 *   source identity (exact id), source IP (LPM), destination IP (LPM), destination port.
 * The terms a connection satisfies are the AND of the four masks. W's masks of DENY and ALLOW
 * terms (and of dry-run ones) then give Istio's answer: any DENY match denies; with no ALLOW
 * policy, allow; else allow only when an ALLOW term matches.
 *
 * Every key carries a generation. The agent writes a whole new policy set under the idle
 * generation and then flips pol_config.gen: a decision reads gen once, so it sees either
 * the old set or the new one, never half of each. */
#pragma once

/* The identity number of a source with no verified identity: plaintext, always. */
#define UNAUTHENTICATED_IDENTITY 0
#define POLICY_MASK_WORDS 4 /* 256 terms per page */
/* A workload's terms fill up to this many pages of 256 (16384 terms: ztunnel's test of
 * 10000 DENY policies fits); page p of W is numbered wid + p. */
#define POL_MAX_PAGES 64

#define POL_HAS_ALLOW 0x1     /* an enforced ALLOW policy applies to W */
#define POL_DRY_HAS_ALLOW 0x2 /* an ALLOW policy applies when dry-run ones count too */
#define POL_FALLBACK 0x4      /* W's policies do not fit the maps: deny, counted */
#define POL_HAS_DRY_RUN 0x8   /* a dry-run policy applies to W: its verdict is worked out */

enum policy_reason {
    POLICY_NO_POLICY = 0,          /* no ALLOW policy applies: allowed */
    POLICY_ALLOWED = 1,            /* an ALLOW policy matched */
    POLICY_DENIED = 2,             /* a DENY policy matched */
    POLICY_DEFAULT_DENY = 3,       /* ALLOW policies apply, none matched */
    POLICY_DRY_RUN_WOULD_DENY = 4, /* allowed, but dry-run policies would deny */
    POLICY_FALLBACK = 5,           /* not expressible in the maps: denied */
    POLICY_REASON_MAX = 6,
};

struct policy_mask {
    __u64 w[POLICY_MASK_WORDS];
};

struct pol_config {
    __u32 gen;
};

struct pol_workload_key {
    __u32 gen;
    __u32 addr; /* destination workload IPv4, network order */
};

struct pol_workload {
    __u32 wid; /* W's number within this generation: its first page's */
    __u32 flags;
    __u32 pages; /* 1..POL_MAX_PAGES; pages after the first are in pol_pages */
    __u32 reserved;
    struct policy_mask deny;
    struct policy_mask allow;
    struct policy_mask dry_deny;
    struct policy_mask dry_allow;
    struct policy_mask identity_default; /* for identities without a pol_identities entry */
};

struct pol_page_key {
    __u32 gen;
    __u32 wid; /* the page's number: W's wid + page */
};

struct pol_identity_key {
    __u32 gen;
    __u32 wid;
    __u32 identity; /* 0: unauthenticated */
};

struct pol_lpm_key {
    __u32 prefixlen; /* 64 (gen, wid) + the address prefix */
    __u32 gen;
    __u32 wid;
    __u32 addr; /* network order */
};

struct pol_port_key {
    __u32 gen;
    __u32 wid;
    __u32 port; /* host order; 0 stands for every port no term names */
};

struct pol_term_key {
    __u32 gen;
    __u32 wid;
    __u32 term;
};


struct policy_stat_key {
    __u32 policy; /* the agent's policy number; 0: none decided */
    __u32 reason; /* enum policy_reason */
};

struct policy_decision {
    __u32 allow;
    __u32 reason;
    __u32 policy;
    __u32 dry_policy; /* set with dry_would_deny; 0 for "default deny" */
    __u32 dry_would_deny;
};
