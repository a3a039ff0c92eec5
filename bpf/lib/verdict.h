/* Every pass, steer and drop goes through verdict() (drops through drop()), which counts
 * the reason, so `ambientctl verdicts` can say why any packet went where it went. */
#pragma once

#include "maps.h"

static __always_inline int verdict(enum verdict_reason reason, int action)
{
    __u32 key = reason;
    __u64 *count = verdicts.lookup(&key);
    if (count)
        *count += 1; /* per-CPU slot: no atomic needed */
    return action;
}

static __always_inline int drop(enum verdict_reason reason)
{
    return verdict(reason, TC_ACT_SHOT);
}
