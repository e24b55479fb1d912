// memtop kernel leak probe: outstanding slab (and optionally page) allocations by kernel stack.
//
// Tracepoints only (kmem:kmalloc, kmem:kfree, kmem:kmem_cache_alloc, kmem:kmem_cache_free, and with
// PAGE_LEVEL kmem:mm_page_alloc, kmem:mm_page_free, kmem:mm_page_free_batched); the programs read only
// tracepoint arguments (args->...) and BPF helpers, never kernel struct fields.
//
// Sampling: stack capture is the expensive part, so only 1 in N allocations is tracked, chosen with
// bpf_get_prandom_u32(). N lives in `config` and user space may change it while running (adaptive
// sampling); each tracked allocation remembers the N it was tracked with (its weight), and the
// aggregates hold weighted bytes and counts, so changing N never corrupts the totals.
//
// Every allocation costs a random number and one lookup of its address in `allocs`: an address that
// is still there was freed without our seeing it (BPF's recursion guard skips a free that interrupts a
// running program), so it is released first and counted as a missed free. Every free costs one lookup.
//
// Outstanding totals are aggregated here, per (stack id, tgid, source), in a per-CPU hash updated on
// alloc and on free: a free on another CPU makes that CPU's slot negative, the sum is right.
// Tunables are set only through validated -D cflags.

#ifndef MAX_ALLOCS
#define MAX_ALLOCS 131072
#endif
#ifndef MAX_STACKS
#define MAX_STACKS 16384
#endif
#ifndef STACK_DEPTH
#define STACK_DEPTH 32  // frames kept per stack (innermost first); the kernel's default 127 costs 4x the memory
#endif
#ifndef MAX_AGGREGATES
#define MAX_AGGREGATES 32768
#endif
#ifndef MAX_PIDS
#define MAX_PIDS 16384
#endif
#ifndef PAGE_LEVEL
#define PAGE_LEVEL 0
#endif
#ifndef PAGE_SHIFT_BITS
#define PAGE_SHIFT_BITS 12
#endif

#define COMM_LEN 16
#define STACK_EXISTS 17  // EEXIST: get_stackid found another stack in this stack's bucket
#define SOURCE_SLAB 0
#define SOURCE_PAGE 1
// Page keys are pfn + this: an address no kernel or user pointer can have (non-canonical on x86-64,
// 4- and 5-level paging), so pages and slab objects share one map without colliding.
#define PAGE_KEY_BASE (1ULL << 56)
// kmalloc(0) returns ZERO_SIZE_PTR (16) to every caller: not an address worth tracking.
#define MIN_TRACKED_ADDRESS 4096

// Indexes into `counters` (the same in leaks_user.c).
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
#define N_COUNTERS 10

struct alloc_info {
    u64 size;       // bytes_alloc (what the allocation really occupies)
    u64 ts_ns;      // bpf_ktime_get_ns() when allocated (CLOCK_MONOTONIC)
    u32 tgid;
    s32 stack_id;   // negative: the stack could not be stored (counted)
    u32 weight;     // the sample rate N when tracked: this allocation stands for N
    u32 source;     // SOURCE_SLAB or SOURCE_PAGE
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
    u32 pad;
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
    struct alloc_info *found = allocs.lookup(&key);
    if (!found)
        return 0;
    struct alloc_info info = *found;
    if (allocs.delete(&key) != 0)
        return 0;  // another CPU removed it first and released it
    release(&info);
    return 1;
}

static __always_inline void on_alloc(void *ctx, u64 key, u64 size, u32 source) {
    count(CTR_ALLOC_EVENTS);
    // Still tracked: its free was never seen. Treat it as freed before this allocation.
    if (forget(key))
        count(CTR_MISSED_FREES);

    int zero = 0;
    struct leak_config *cfg = config.lookup(&zero);
    u32 every = cfg ? cfg->sample_every : 1;
    if (every > 1 && bpf_get_prandom_u32() % every != 0)
        return;
    count(CTR_TRACKED);

    struct alloc_info info = {};
    info.size = size;
    info.ts_ns = bpf_ktime_get_ns();
    info.tgid = bpf_get_current_pid_tgid() >> 32;
    info.weight = every > 1 ? every : 1;
    info.source = source;
    info.stack_id = stacks.get_stackid(ctx, 0);
    if (info.stack_id < 0)
        count(info.stack_id == -STACK_EXISTS ? CTR_STACK_COLLISIONS : CTR_STACK_LOST);

    if (allocs.insert(&key, &info) != 0) {
        count(CTR_ALLOC_MAP_FULL);
        return;
    }
    struct agg_key k = {};
    k.stack_id = info.stack_id;
    k.tgid = info.tgid;
    k.source = source;
    struct agg_value *v = outstanding.lookup(&k);
    if (!v) {
        struct agg_value init = {};
        outstanding.insert(&k, &init);  // BPF_NOEXIST: another CPU may have created it meanwhile
        v = outstanding.lookup(&k);
        if (!v) {
            count(CTR_AGGREGATE_MAP_FULL);
            allocs.delete(&key);  // untracked after all: its free must not find it
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

static __always_inline void on_free(u64 key) {
    count(CTR_FREE_EVENTS);
    if (forget(key))
        count(CTR_FREES_MATCHED);
}

TRACEPOINT_PROBE(kmem, kmalloc) {
    u64 key = (u64)args->ptr;
    if (key < MIN_TRACKED_ADDRESS)
        return 0;  // failed, or ZERO_SIZE_PTR
    on_alloc(args, key, args->bytes_alloc, SOURCE_SLAB);
    return 0;
}

TRACEPOINT_PROBE(kmem, kmem_cache_alloc) {
    u64 key = (u64)args->ptr;
    if (key < MIN_TRACKED_ADDRESS)
        return 0;
    on_alloc(args, key, args->bytes_alloc, SOURCE_SLAB);
    return 0;
}

TRACEPOINT_PROBE(kmem, kfree) {
    u64 key = (u64)args->ptr;
    if (key < MIN_TRACKED_ADDRESS)
        return 0;
    on_free(key);
    return 0;
}

TRACEPOINT_PROBE(kmem, kmem_cache_free) {
    u64 key = (u64)args->ptr;
    if (key < MIN_TRACKED_ADDRESS)
        return 0;
    on_free(key);
    return 0;
}

#if PAGE_LEVEL
TRACEPOINT_PROBE(kmem, mm_page_alloc) {
    u64 pfn = args->pfn;
    if (pfn == (u64)-1)
        return 0;  // the allocation failed
    on_alloc(args, PAGE_KEY_BASE + pfn, (u64)1 << (PAGE_SHIFT_BITS + args->order), SOURCE_PAGE);
    return 0;
}

TRACEPOINT_PROBE(kmem, mm_page_free) {
    on_free(PAGE_KEY_BASE + args->pfn);
    return 0;
}

TRACEPOINT_PROBE(kmem, mm_page_free_batched) {
    on_free(PAGE_KEY_BASE + args->pfn);
    return 0;
}
#endif
