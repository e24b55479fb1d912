// memtop kernel leak tracking: outstanding slab (and optionally page) allocations by kernel stack.
//
// Included by kmalloc.c (WITH_LEAKS: its kmem:kmalloc program calls leak_kmalloc, so both panels share
// one program per tracepoint) or by leaks_kernel.c (on its own, with its own kmalloc program). This file
// holds the programs on kmem:kfree, kmem:kmem_cache_alloc, kmem:kmem_cache_free and, with PAGE_LEVEL,
// kmem:mm_page_alloc, kmem:mm_page_free, kmem:mm_page_free_batched. They read only tracepoint arguments
// and BPF helpers, never kernel struct fields. kfree and kmem_cache_free are raw tracepoints where the
// running kernel's prototype is (call_site, ptr[, cache]) (RAW_KFREE, RAW_CACHE_FREE): a raw tracepoint
// has its own per-program recursion guard (a classic one is skipped whenever any classic tracing program
// runs on the CPU) and no record to fill. kmem_cache_alloc is raw too where its prototype is (call_site,
// ptr, cache, gfp_flags, node) (RAW_CACHE_ALLOC): its object size and cache name are struct fields behind
// the cache pointer, so they are learned per cache pointer from the classic record (see cache_info below).
//
// Sampling: stack capture is the expensive part, so only 1 in N allocations is tracked, at random gaps
// (sample_weight in leaks_common.h). N lives in `config` and user space may change it while running (adaptive
// sampling); each tracked allocation remembers the N it was tracked with (its weight), and the
// aggregates hold weighted bytes and counts, so changing N never corrupts the totals.
//
// Every allocation costs a per-CPU countdown and one lookup of its address in `allocs`: an address that
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
#ifndef RAW_KMALLOC
#define RAW_KMALLOC 1
#endif
#ifndef HAVE_CACHE_NAME
#define HAVE_CACHE_NAME 1  // kmem:kmem_cache_alloc carries the cache's name (6.x)
#endif
#ifndef RAW_KFREE
#define RAW_KFREE 1
#endif
#ifndef RAW_CACHE_FREE
#define RAW_CACHE_FREE 1
#endif
#ifndef RAW_CACHE_ALLOC
#define RAW_CACHE_ALLOC 0
#endif
#ifndef MAX_CACHES
#define MAX_CACHES 4096  // slab caches whose size and name are learned (a 6.x host has a few hundred)
#endif
// kmem:kmem_cache_alloc's record, from tracefs: where the learner reads ptr, bytes_alloc and call_site.
#ifndef PTR_OFFSET
#define PTR_OFFSET 16
#endif
#ifndef BYTES_ALLOC_OFFSET
#define BYTES_ALLOC_OFFSET 40
#endif
#ifndef CALL_SITE_OFFSET
#define CALL_SITE_OFFSET 8
#endif

#define SOURCE_SLAB 0
#define SOURCE_PAGE 1
// A slab allocation's source also names its cache, in bits 8-31, so that user space can hold each
// cache's outstanding total to what the kernel says is live there (frees without a tracepoint:
// kmem_cache_free_bulk, the NAPI skb cache, kfree_rcu batches): kmem_cache_alloc's cache name hashed
// (cache_id), or for a kmalloc KMALLOC_CLASS | its bytes_alloc (the size class of the kmalloc-* caches).
#define CACHE_SHIFT 8
#define KMALLOC_CLASS (1U << 23)
#define SOURCE_NAMED_CACHE 0xFEU  // a placeholder kind: resolve() replaces it by SOURCE_SLAB and the cache id
#define SOURCE_CACHE_POINTER 0xFDU  // likewise, from cache_info (the raw kmem_cache_alloc program)
#ifndef NAME_LOC_OFFSET
#define NAME_LOC_OFFSET 24  // kmem:kmem_cache_alloc's `name` field (its __data_loc word) in the record
#endif
#define KMALLOC_MAX_CACHE_BYTES (2ULL << PAGE_SHIFT_BITS)  // SLUB's KMALLOC_MAX_CACHE_SIZE: two pages
// Page keys are pfn + this: an address no kernel or user pointer can have (non-canonical on x86-64,
// 4- and 5-level paging), so pages and slab objects share one map without colliding.
#define PAGE_KEY_BASE (1ULL << 56)
// kmalloc(0) returns ZERO_SIZE_PTR (16) to every caller: not an address worth tracking.
#define MIN_TRACKED_ADDRESS 4096
#define N_COUNTERS 11
#define CTR_CACHE_UNLEARNED 10  // chosen by the sampling, not tracked: its cache's size was not learned yet
#define LEAK_STACK_FLAGS 0

// A counting filter over tracked addresses: `allocs` holds an address only if its slot here is non-zero,
// so most frees (and the missed-free check of most allocations) cost an array lookup, not a hash lookup.
// Slots are raised after an entry is added and lowered after it is deleted by these programs; user space
// deleting entries (pruning, reconcile) leaves them high, which only costs a lookup.
#ifndef FILTER_SLOTS
#define FILTER_SLOTS 262144  // a power of two
#endif
BPF_ARRAY(tracked_filter, u32, FILTER_SLOTS);

static __always_inline u32 *filter_slot(u64 key) {
    u32 slot = (u32)((key * 0x9E3779B97F4A7C15ULL) >> 40) & (FILTER_SLOTS - 1);
    return tracked_filter.lookup(&slot);
}

static __always_inline int may_be_tracked(u64 key) {
    u32 *n = filter_slot(key);
    return !n || *n;
}

static __always_inline void filter_add(u64 key, s32 delta) {
    u32 *n = filter_slot(key);
    if (n)
        __sync_fetch_and_add(n, delta);
}

static __always_inline int resolve(void *ctx, u64 key, u64 *size, u32 *source);
#define LEAK_MAY_BE_TRACKED(key) may_be_tracked(key)
#define LEAK_TRACKED(key) filter_add(key, 1)
#define LEAK_UNTRACKED(key) filter_add(key, -1)
#define LEAK_RESOLVE(ctx, key, size, source) resolve(ctx, key, size, source)

#define COUNT_FREE_EVENTS 0
#include "leaks_common.h"

// Off (sample_every 0) until user space configures the probe: an embedded leak part costs one array
// lookup per kmalloc while the Leaks panel is off. The 1-in-N in force (0: off), looked up once per event.
static __always_inline u32 leak_every(void) {
    int zero = 0;
    struct leak_config *cfg = config.lookup(&zero);
    return cfg ? cfg->sample_every : 0;
}

static __always_inline int leaks_on(void) { return leak_every() != 0; }

#if PAGE_LEVEL
// The last page allocation of each CPU, by thread: a kmalloc larger than the biggest kmalloc cache is
// served by the page allocator (kmem:mm_page_alloc first, then kmem:kmalloc on the same thread), so its
// pages are the kmalloc's and must not be counted a second time as a page row.
struct last_page_t {
    u64 pfn;
    u32 tid;
    u32 order;
};
BPF_PERCPU_ARRAY(last_page, struct last_page_t, 1);

static __always_inline void forget_backing_pages(u64 bytes_alloc) {
    if (bytes_alloc <= KMALLOC_MAX_CACHE_BYTES)
        return;
    int zero = 0;
    struct last_page_t *last = last_page.lookup(&zero);
    if (!last || last->tid != (u32)bpf_get_current_pid_tgid() ||
        ((u64)1 << (PAGE_SHIFT_BITS + last->order)) != bytes_alloc)
        return;
    forget(PAGE_KEY_BASE + last->pfn);  // tracked or not: its free must find nothing either
    last->tid = 0;
}
#endif

static __always_inline void leak_kmalloc(void *ctx, u64 ptr, u64 bytes_alloc) {
    if (ptr < MIN_TRACKED_ADDRESS)
        return;  // failed, or ZERO_SIZE_PTR
    u32 every = leak_every();
    if (!every)
        return;
#if PAGE_LEVEL
    forget_backing_pages(bytes_alloc);
#endif
    u32 source = SOURCE_SLAB;
    if (bytes_alloc <= KMALLOC_MAX_CACHE_BYTES)
        source |= (KMALLOC_CLASS | (u32)bytes_alloc) << CACHE_SHIFT;
    on_alloc_every(ctx, ptr, bytes_alloc, source, every);
}

// 23 bits of a hash of a cache name's first 15 bytes (zero-padded to 16), as memtop/probes/leaks.py's
// cache_id computes it.
static __always_inline u32 cache_id(u64 lo, u64 hi) {
    u64 h = (lo ^ (hi * 0x9E3779B97F4A7C15ULL)) * 0xFF51AFD7ED558CCDULL;
    return (u32)(h >> 41) & (KMALLOC_CLASS - 1);
}

// The cache field of a source, from a slab cache's name: the name is read from kmem:kmem_cache_alloc's
// record (its `name`, a __data_loc string at NAME_LOC_OFFSET, from tracefs).
static __always_inline u32 named_cache_source(void *record) {
    u64 name[2] = {};
    u32 loc = *(u32 *)((char *)record + NAME_LOC_OFFSET);
    bpf_probe_read_kernel_str(name, sizeof(name), (char *)record + (loc & 0xFFFF));
    return SOURCE_SLAB | (cache_id(name[0], name[1]) << CACHE_SHIFT);
}

#if RAW_CACHE_ALLOC
// What the raw kmem_cache_alloc program cannot read itself: each cache's object size and name, which sit
// behind its kmem_cache pointer. They are learned per pointer, by joining one allocation seen both by the
// raw program (object address -> cache pointer) and by kmem_cache_alloc_learner, a classic program on the
// same tracepoint whose record has them (object address -> bytes_alloc, name). User space attaches the
// learner only for short learning windows (at start, then when a sampled allocation's cache is unknown:
// CTR_CACHE_UNLEARNED grows) and sets config.learning to the window's number meanwhile (0: none). The
// two programs run back to back on the same CPU for the same allocation, in an order that depends on
// which was attached first, so the first leaves its half in a per-CPU slot and the second completes the
// join. A half matches only one of the same window, object address and call site: a half left over (the
// other program was skipped, or an interrupt's allocation came between) cannot pair with a later
// allocation that reuses the address. User space also checks every learned size against /proc/slabinfo.
struct cache_info_t {
    u64 bytes_alloc;  // the object size the cache's allocations occupy
    u32 source;       // SOURCE_SLAB | cache_id(name) << CACHE_SHIFT
    u32 pad;
};
BPF_HASH(cache_info, u64, struct cache_info_t, MAX_CACHES);  // cache pointer -> what it allocates
struct cache_half_t {
    u64 object;     // the allocation's address (0: empty)
    u64 call_site;
    u64 cache;      // the raw program's half: the cache pointer
    struct cache_info_t info;  // the learner's half
    u32 window;     // config.learning when it was left
    u32 pad;
};
BPF_PERCPU_ARRAY(raw_half, struct cache_half_t, 1);      // the raw program's last unknown cache, this CPU
BPF_PERCPU_ARRAY(learned_half, struct cache_half_t, 1);  // the learner's last record, this CPU

static __always_inline int same_allocation(struct cache_half_t *h, u64 object, u64 call_site, u32 window) {
    return h->object == object && h->call_site == call_site && h->window == window;
}

// Leave this program's half of an allocation for the other program (the caller adds its part).
static __always_inline void leave_half(struct cache_half_t *h, u64 object, u64 call_site, u32 window) {
    h->object = object;
    h->call_site = call_site;
    h->window = window;
}

// The raw program, in learning window `window`, for an allocation from a cache with no cache_info: complete
// the join if the learner has already run for this allocation, else leave this half for it. Returns the
// entry, if learned now.
static __always_inline struct cache_info_t *learn(u64 object, u64 call_site, u64 cache, u32 window) {
    int zero = 0;
    struct cache_half_t *l = learned_half.lookup(&zero);
    if (l && same_allocation(l, object, call_site, window)) {
        l->object = 0;
        cache_info.update(&cache, &l->info);
        return cache_info.lookup(&cache);
    }
    struct cache_half_t *r = raw_half.lookup(&zero);
    if (r) {
        leave_half(r, object, call_site, window);
        r->cache = cache;
    }
    return 0;
}

// kmem:kmem_cache_alloc's record. Not attached at load: user space attaches it for a learning window.
int kmem_cache_alloc_learner(void *record) {
    int zero = 0;
    struct leak_config *cfg = config.lookup(&zero);
    u64 object = *(u64 *)((char *)record + PTR_OFFSET);
    if (!cfg || !cfg->learning || object < MIN_TRACKED_ADDRESS)
        return 0;
    u32 window = cfg->learning;
    u64 call_site = *(u64 *)((char *)record + CALL_SITE_OFFSET);
    struct cache_half_t *r = raw_half.lookup(&zero);
    struct cache_info_t info = {};
    info.bytes_alloc = *(u64 *)((char *)record + BYTES_ALLOC_OFFSET);
    info.source = named_cache_source(record);
    if (r && same_allocation(r, object, call_site, window)) {
        r->object = 0;
        cache_info.update(&r->cache, &info);
        return 0;
    }
    struct cache_half_t *l = learned_half.lookup(&zero);
    if (l) {
        leave_half(l, object, call_site, window);
        l->info = info;
    }
    return 0;
}
#endif

// A sampled allocation's size and source. kmalloc passes them; a classic kmem_cache_alloc passes
// SOURCE_NAMED_CACHE (its name is read from the record only now, for the few allocations tracked); a raw
// one passes SOURCE_CACHE_POINTER and takes both from cache_info, or stays untracked (counted) while its
// cache is not learned yet.
static __always_inline int resolve(void *ctx, u64 key, u64 *size, u32 *source) {
    if (*source == SOURCE_NAMED_CACHE) {
        *source = named_cache_source(ctx);
        return 1;
    }
#if RAW_CACHE_ALLOC
    if (*source == SOURCE_CACHE_POINTER) {
        struct bpf_raw_tracepoint_args *raw = ctx;
        u64 cache = raw->args[2];
        struct cache_info_t *ci = cache_info.lookup(&cache);
        if (!ci) {
            int zero = 0;
            struct leak_config *cfg = config.lookup(&zero);
            if (cfg && cfg->learning)
                ci = learn(key, raw->args[0], cache, cfg->learning);
        }
        if (!ci) {
            count(CTR_CACHE_UNLEARNED);
            return 0;
        }
        *size = ci->bytes_alloc;
        *source = ci->source;
    }
#endif
    return 1;
}

static __always_inline void leak_free(u64 ptr) {
    if (ptr < MIN_TRACKED_ADDRESS)
        return;
    on_free(ptr);
}

#if RAW_CACHE_ALLOC
RAW_TRACEPOINT_PROBE(kmem_cache_alloc) {  // (call_site, ptr, cache, gfp_flags, node)
    u64 key = ctx->args[1];
    if (key < MIN_TRACKED_ADDRESS)
        return 0;
    int zero = 0;
    struct leak_config *cfg = config.lookup(&zero);
    if (!cfg || !cfg->sample_every)
        return 0;
    // While learning, every allocation from a cache not learned yet offers its half of the join, not
    // only the sampled ones: a learning window then learns every cache that allocates during it.
    if (cfg->learning) {
        u64 cache = ctx->args[2];
        if (!cache_info.lookup(&cache))
            learn(key, ctx->args[0], cache, cfg->learning);
    }
    on_alloc_every(ctx, key, 0, SOURCE_CACHE_POINTER, cfg->sample_every);
    return 0;
}
#else
TRACEPOINT_PROBE(kmem, kmem_cache_alloc) {
    u64 key = (u64)args->ptr;
    if (key < MIN_TRACKED_ADDRESS)
        return 0;
    u32 every = leak_every();
    if (!every)
        return 0;
    on_alloc_every(args, key, args->bytes_alloc, HAVE_CACHE_NAME ? SOURCE_NAMED_CACHE : SOURCE_SLAB, every);
    return 0;
}
#endif

#if RAW_KFREE
RAW_TRACEPOINT_PROBE(kfree) {  // (call_site, ptr)
    leak_free((u64)ctx->args[1]);
    return 0;
}
#else
TRACEPOINT_PROBE(kmem, kfree) {
    leak_free((u64)args->ptr);
    return 0;
}
#endif

#if RAW_CACHE_FREE
RAW_TRACEPOINT_PROBE(kmem_cache_free) {  // (call_site, ptr, cache)
    leak_free((u64)ctx->args[1]);
    return 0;
}
#else
TRACEPOINT_PROBE(kmem, kmem_cache_free) {
    leak_free((u64)args->ptr);
    return 0;
}
#endif

#if PAGE_LEVEL
TRACEPOINT_PROBE(kmem, mm_page_alloc) {
    u64 pfn = args->pfn;
    if (pfn == (u64)-1 || !leaks_on())
        return 0;  // the allocation failed
    int zero = 0;
    struct last_page_t *last = last_page.lookup(&zero);
    if (last) {
        last->pfn = pfn;
        last->order = args->order;
        last->tid = (u32)bpf_get_current_pid_tgid();
    }
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
