// What memtop's two leak programs share (leaks_kernel.c, leaks_user.c): the tracked-allocation map, the
// per-(stack, tgid, source) aggregates, the stack map, and the alloc/free bookkeeping with sampling
// weights and missed frees. memtop/probes/base.py inlines this file where a program says
// `#include "leaks_common.h"`, so --dump-bpf shows the exact text compiled.
//
// The including program defines first: MAX_ALLOCS, MAX_STACKS, STACK_DEPTH, MAX_AGGREGATES, MAX_PIDS
// (bound of `comms`), N_COUNTERS, and LEAK_STACK_FLAGS (0: kernel stacks; BPF_F_USER_STACK: user stacks).
// Optional hooks (leaks_kernel.h uses them; empty by default): LEAK_MAY_BE_TRACKED(key) (0: `key` is
// certainly not in `allocs`, skip the lookup), LEAK_TRACKED(key) / LEAK_UNTRACKED(key) after an entry is
// added / deleted, LEAK_RESOLVE(ctx, key, &size, &source) (run only for an allocation the sampling
// chose: may fill in its size and source; 0 leaves it untracked, and the hook counts why), and
// LEAK_SAMPLE_GAP() (this CPU's struct sample_gap_t; by default in its own per-CPU array, sample_gap).
#ifndef LEAK_MAY_BE_TRACKED
#define LEAK_MAY_BE_TRACKED(key) 1
#endif
#ifndef LEAK_TRACKED
#define LEAK_TRACKED(key)
#endif
#ifndef LEAK_UNTRACKED
#define LEAK_UNTRACKED(key)
#endif
#ifndef COUNT_FREE_EVENTS
#define COUNT_FREE_EVENTS 1  // the kernel programs leave it out: a per-CPU add on every kfree that nothing reads
#endif
#ifndef LEAK_RESOLVE
#define LEAK_RESOLVE(ctx, key, size, source) 1
#endif

#define COMM_LEN 16
#define STACK_EXISTS 17  // EEXIST: get_stackid found another stack in this stack's bucket
// Indexes into `counters` (user mode adds CTR_PENDING_MAP_FULL after these: N_COUNTERS is the caller's).
#define CTR_ALLOC_EVENTS 0
#define CTR_TRACKED 1
#define CTR_FREE_EVENTS 2
#define CTR_FREES_MATCHED 3
#define CTR_ALLOC_MAP_FULL 4
#define CTR_AGGREGATE_MAP_FULL 5
#define CTR_STACK_COLLISIONS 6
#define CTR_STACK_LOST 7
#define CTR_MISSED_FREES 8
#define CTR_AGGREGATE_MISSING 9

struct alloc_info {
    u64 size;       // kernel: bytes_alloc (what the object really occupies); user: bytes requested
    u64 ts_ns;      // bpf_ktime_get_ns() when allocated (CLOCK_MONOTONIC)
    u32 tgid;
    s32 stack_id;   // negative: the stack could not be stored (counted)
    u32 weight;     // the sample rate N when tracked: this allocation stands for N
    u32 source;     // SOURCE_* of the including program
};

struct agg_key {
    s32 stack_id;
    u32 tgid;
    u32 source;
    u32 pad;
};

struct agg_value {
    s64 bytes;        // weighted outstanding bytes on this CPU (may be negative: freed elsewhere)
    s64 allocations;  // weighted outstanding allocations on this CPU
};

struct comm_t {
    char comm[COMM_LEN];
};

struct leak_config {
    u32 sample_every;  // 1 = track every allocation
    u32 learning;      // kernel leaks: the learning window's number while the cache learner is on, else 0
};

BPF_HASH(allocs, u64, struct alloc_info, MAX_ALLOCS);
BPF_PERCPU_HASH(outstanding, struct agg_key, struct agg_value, MAX_AGGREGATES);
// A stack map with STACK_DEPTH frames per entry (BPF_STACK_TRACE would reserve 127): deeper stacks keep
// their innermost frames.
struct stack_frames {
    u64 ip[STACK_DEPTH];
};
BPF_TABLE("stacktrace", int, struct stack_frames, stacks, MAX_STACKS);
BPF_HASH(comms, u32, struct comm_t, MAX_PIDS);
BPF_PERCPU_ARRAY(counters, u64, N_COUNTERS);
BPF_ARRAY(config, struct leak_config, 1);

static __always_inline void count(int idx) {
    u64 *c = counters.lookup(&idx);
    if (c)
        (*c)++;
}

// 1 in `every` allocations on average, at random gaps: a per-CPU countdown, reset when it runs out to a
// gap drawn uniformly from [1, 2 * every - 1] (mean `every`). The random draw and its division run once per
// tracked allocation rather than on every one; the gaps stay random, so no periodic pattern of allocations
// is sampled in step with them. The allocation that ends a gap stands for the gap's mean: the N it was
// drawn with, so a change of N (adaptive sampling) biases nothing and takes effect from the next gap.
struct sample_gap_t {
    u32 left;   // allocations to go in this CPU's gap, this one included
    u32 every;  // the N the gap was drawn with (0: no gap yet)
    u64 allocations;  // allocations seen on this CPU: alloc_events is these plus counters[CTR_ALLOC_EVENTS]
                      // (at 1 in 1 the gap is not looked up); here, every allocation touches one per-CPU
                      // value, not two
};
#ifndef LEAK_SAMPLE_GAP
BPF_PERCPU_ARRAY(sample_gap, struct sample_gap_t, 1);

static __always_inline struct sample_gap_t *sample_gap_here(void) {
    int zero = 0;
    return sample_gap.lookup(&zero);
}
#define LEAK_SAMPLE_GAP() sample_gap_here()
#endif

static __always_inline u32 draw_gap(u32 every) {
    return 1 + (u32)(bpf_get_prandom_u32() % (2ULL * every - 1));
}

// The weight to track this allocation with (the allocations it stands for), or 0: not tracked.
// Counts the allocation (alloc_events).
static __always_inline u32 sample_weight(u32 every) {
    if (every <= 1) {
        count(CTR_ALLOC_EVENTS);
        return 1;
    }
    struct sample_gap_t *g = LEAK_SAMPLE_GAP();
    if (!g) {
        count(CTR_ALLOC_EVENTS);
        return bpf_get_prandom_u32() % every == 0 ? every : 0;
    }
    g->allocations++;
    if (!g->every) {  // this CPU's first allocation since tracking began: a gap starts here
        g->every = every;
        g->left = draw_gap(every);
    }
    if (g->left > 1) {  // (never decremented from 0: a program nested on this CPU cannot wrap it)
        g->left--;
        return 0;
    }
    u32 weight = g->every;
    g->every = every;
    g->left = draw_gap(every);
    return weight;
}

// Take an allocation's weighted size off its aggregate.
static __always_inline void release(struct alloc_info *info) {
    struct agg_key k = {};
    k.stack_id = info->stack_id;
    k.tgid = info->tgid;
    k.source = info->source;
    struct agg_value *v = outstanding.lookup(&k);
    if (!v) {
        count(CTR_AGGREGATE_MISSING);  // pruned by user space in a race: its totals are already gone
        return;
    }
    v->bytes -= (s64)(info->size * info->weight);
    v->allocations -= info->weight;
}

// Forget the allocation at `key` if it is tracked. Returns 1 if it was.
static __always_inline int forget(u64 key) {
    if (!LEAK_MAY_BE_TRACKED(key))
        return 0;
    struct alloc_info *found = allocs.lookup(&key);
    if (!found)
        return 0;
    struct alloc_info info = *found;
    if (allocs.delete(&key) != 0)
        return 0;  // another CPU removed it first and released it
    LEAK_UNTRACKED(key);
    release(&info);
    return 1;
}

// `every`: the configured 1-in-N (config's sample_every), looked up once by the caller.
static __always_inline void on_alloc_every(void *ctx, u64 key, u64 size, u32 source, u32 every) {
    // Still tracked: its free was never seen. Treat it as freed before this allocation.
    if (forget(key))
        count(CTR_MISSED_FREES);

    u32 weight = sample_weight(every);
    if (!weight)
        return;
    if (!LEAK_RESOLVE(ctx, key, &size, &source))
        return;
    count(CTR_TRACKED);

    struct alloc_info info = {};
    info.size = size;
    info.ts_ns = bpf_ktime_get_ns();
    info.tgid = bpf_get_current_pid_tgid() >> 32;
    info.weight = weight;
    info.source = source;
    info.stack_id = stacks.get_stackid(ctx, LEAK_STACK_FLAGS);
    if (info.stack_id < 0)
        count(info.stack_id == -STACK_EXISTS ? CTR_STACK_COLLISIONS : CTR_STACK_LOST);

    if (allocs.insert(&key, &info) != 0) {
        count(CTR_ALLOC_MAP_FULL);
        return;
    }
    LEAK_TRACKED(key);
    struct agg_key k = {};
    k.stack_id = info.stack_id;
    k.tgid = info.tgid;
    k.source = info.source;
    struct agg_value *v = outstanding.lookup(&k);
    if (!v) {
        struct agg_value init = {};
        outstanding.insert(&k, &init);  // BPF_NOEXIST: another CPU may have created it meanwhile
        v = outstanding.lookup(&k);
        if (!v) {
            count(CTR_AGGREGATE_MAP_FULL);
            if (allocs.delete(&key) == 0)  // untracked after all: its free must not find it
                LEAK_UNTRACKED(key);
            return;
        }
        if (!comms.lookup(&k.tgid)) {
            struct comm_t c = {};
            bpf_get_current_comm(&c.comm, sizeof(c.comm));
            comms.update(&k.tgid, &c);
        }
    }
    v->bytes += (s64)(size * info.weight);
    v->allocations += info.weight;
}

static __always_inline void on_alloc(void *ctx, u64 key, u64 size, u32 source) {
    int zero = 0;
    struct leak_config *cfg = config.lookup(&zero);
    on_alloc_every(ctx, key, size, source, cfg ? cfg->sample_every : 1);
}

static __always_inline void on_free(u64 key) {
#if COUNT_FREE_EVENTS
    count(CTR_FREE_EVENTS);
#endif
    if (key && forget(key))
        count(CTR_FREES_MATCHED);
}
