// memtop user leak probe: outstanding heap (and anonymous mmap) allocations of one process, by user stack.
//
// Uprobes on the allocator entry points the process really resolves (found in its link map by user space:
// malloc, calloc, realloc, reallocarray, posix_memalign, aligned_alloc, memalign, valloc, pvalloc, C++
// operator new/delete of an allocator that exports them, mmap, mremap, munmap; on entry and return, free
// and operator delete on entry only), attached with pid=PID, so they fire for that process only. The
// programs read only their arguments, return values and stack pointer, and BPF helpers.
//
// Only the outermost allocator call of a thread counts: a call made inside another (glibc's realloc(NULL, n)
// calling malloc, the mmap under a large malloc, libstdc++'s operator new calling malloc) runs deeper on the
// stack than the outer call's entry, and is ignored. The stack is taken at the outer call's return: the
// instruction pointer is then inside its caller, which a frame-pointer walk from the entry would skip.
//
// A failed call changes nothing: realloc/reallocarray/mremap/munmap take the old block out of `allocs` at
// entry (so another thread handed the same address cannot be confused with it) and put it back, with its
// stack, age and weight, when the call fails. munmap of the head of a tracked mapping keeps the rest.
//
// Aggregation, sampling weights and missed frees work as in leaks_kernel.c.
// Tunables are set only through validated -D cflags; the sample rate goes in `config`.

#include <uapi/linux/ptrace.h>

#ifndef MAX_ALLOCS
#define MAX_ALLOCS 262144
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
#ifndef MAX_THREADS
#define MAX_THREADS 16384
#endif
#ifndef USER_PAGE_SIZE
#define USER_PAGE_SIZE 4096
#endif
#ifndef MAX_NEW_SITES
#define MAX_NEW_SITES 4096
#endif

#define SOURCE_HEAP 0
#define SOURCE_MMAP 1
#define ANONYMOUS_MAPPING 0x20  // MAP_ANONYMOUS
#define MAP_FAILED_ADDRESS ((u64)-1)
#define MAX_PIDS 64  // one process (and whatever it forks while probed)
#define CTR_PENDING_MAP_FULL 10
#define N_COUNTERS 11
#define LEAK_STACK_FLAGS BPF_F_USER_STACK

#include "leaks_common.h"

#define OP_ALLOC 0     // returns the block, NULL on failure
#define OP_REALLOC 1   // returns the new block; NULL with size > 0: failed, the old block stays
#define OP_MEMALIGN 2  // posix_memalign: returns 0 and writes the block to *memptr
#define OP_MMAP 3      // returns the mapping, MAP_FAILED on failure
#define OP_MREMAP 4    // returns the new mapping, MAP_FAILED on failure (the old one stays)
#define OP_MUNMAP 5    // returns 0, -1 on failure (nothing unmapped)
#define OP_NEW 6       // a throwing operator new: its return is seen at the call site (cxx_new_site)
#define NEW_STALE_NS 10000000  // an OP_NEW call pending longer than 10 ms threw (its return never came)

// The outermost allocator call in progress on one thread, from its entry to its return.
struct pending_call {
    u64 sp;       // stack pointer at entry: a call made inside this one runs at or below it
    u64 size;     // bytes asked for
    u64 memptr;   // posix_memalign: where the result is written
    u64 old;      // realloc & co, mremap, munmap: the block resized or unmapped (0: none)
    u64 old_len;  // mremap: the old length; munmap: the length unmapped
    u32 op;       // OP_*
    u32 has_old;  // `old` was tracked: taken out of `allocs` at entry, its record is in old_info
    u64 ts_ns;    // entry time (OP_NEW: tells a call that threw from one still running)
    struct alloc_info old_info;
};
BPF_HASH(pending, u32, struct pending_call, MAX_THREADS);

// -- nesting ----------------------------------------------------------------------------------------------

// True when this thread is inside a tracked allocator call (an outer call at or above this stack pointer).
static __always_inline int nested(u32 tid, u64 sp) {
    struct pending_call *outer = pending.lookup(&tid);
    if (!outer)
        return 0;
    if (outer->op == OP_NEW)  // it may have thrown: only calls strictly below it and soon after are inside it
        return sp < outer->sp && bpf_ktime_get_ns() - outer->ts_ns < NEW_STALE_NS;
    return sp <= outer->sp;  // equal: a tail call from the outer function
}

// Start *call as this thread's outermost call; 0 when the call is nested. A pending call left above this
// stack pointer is stale (its return was never seen: longjmp, an exception) and gets replaced.
static __always_inline int begin(struct pt_regs *ctx, u32 op, struct pending_call *call) {
    u32 tid = bpf_get_current_pid_tgid();
    u64 sp = PT_REGS_SP(ctx);
    if (nested(tid, sp))
        return 0;
    __builtin_memset(call, 0, sizeof(*call));
    call->sp = sp;
    call->op = op;
    call->ts_ns = bpf_ktime_get_ns();
    return 1;
}

static __always_inline void commit(struct pending_call *call) {
    u32 tid = bpf_get_current_pid_tgid();
    if (pending.update(&tid, call) != 0)
        count(CTR_PENDING_MAP_FULL);
}

// The outermost call this return ends (copied into *out and forgotten), or 0 for a nested call's return.
static __always_inline int finish(struct pt_regs *ctx, struct pending_call *out) {
    u32 tid = bpf_get_current_pid_tgid();
    struct pending_call *call = pending.lookup(&tid);
    if (!call)
        return 0;  // entered before we attached
    if (PT_REGS_SP(ctx) <= call->sp)
        return 0;  // a nested call returning: the outer one is still running
    __builtin_memcpy(out, call, sizeof(*out));
    pending.delete(&tid);
    return 1;
}

// -- taking an old block out, and putting it back ----------------------------------------------------------

static __always_inline void take_old(struct pending_call *call, u64 key) {
    call->old = key;
    if (!key)
        return;
    struct alloc_info *found = allocs.lookup(&key);
    if (!found)
        return;
    __builtin_memcpy(&call->old_info, found, sizeof(call->old_info));
    if (allocs.delete(&key) != 0)
        return;  // another CPU took it first
    release(&call->old_info);
    call->has_old = 1;
}

// Track `info` (size `size`) at `key` again, on its own stack, age and weight.
static __always_inline void restore(u64 key, struct alloc_info *info, u64 size) {
    struct alloc_info again = *info;
    again.size = size;
    if (allocs.insert(&key, &again) != 0) {
        count(CTR_ALLOC_MAP_FULL);  // it leaves the map: counted like an allocation that found it full
        return;
    }
    struct agg_key k = {};
    k.stack_id = again.stack_id;
    k.tgid = again.tgid;
    k.source = again.source;
    struct agg_value *v = outstanding.lookup(&k);
    if (!v) {
        struct agg_value init = {};
        outstanding.insert(&k, &init);
        v = outstanding.lookup(&k);
        if (!v) {
            count(CTR_AGGREGATE_MAP_FULL);
            allocs.delete(&key);
            return;
        }
    }
    v->bytes += (s64)(size * again.weight);
    v->allocations += again.weight;
}

// The old block of a call that succeeded is gone.
static __always_inline void old_freed(struct pending_call *call) {
    count(CTR_FREE_EVENTS);
    if (call->has_old)
        count(CTR_FREES_MATCHED);
}

// -- allocator entries: remember the call until it returns -----------------------------------------------

static __always_inline int enter(struct pt_regs *ctx, u64 size) {
    struct pending_call c, *call = &c;
    if (!begin(ctx, OP_ALLOC, call))
        return 0;
    call->size = size;
    commit(call);
    return 0;
}

// malloc, valloc, pvalloc, operator new (every variant: the size comes first).
int malloc_enter(struct pt_regs *ctx) {
    return enter(ctx, PT_REGS_PARM1(ctx));
}

int calloc_enter(struct pt_regs *ctx) {
    return enter(ctx, (u64)PT_REGS_PARM1(ctx) * (u64)PT_REGS_PARM2(ctx));
}

// aligned_alloc and memalign take (alignment, size).
int aligned_alloc_enter(struct pt_regs *ctx) {
    return enter(ctx, PT_REGS_PARM2(ctx));
}

int posix_memalign_enter(struct pt_regs *ctx) {
    struct pending_call c, *call = &c;
    if (!begin(ctx, OP_MEMALIGN, call))
        return 0;
    call->size = PT_REGS_PARM3(ctx);
    call->memptr = PT_REGS_PARM1(ctx);
    commit(call);
    return 0;
}

static __always_inline int enter_realloc(struct pt_regs *ctx, u64 old, u64 size) {
    struct pending_call c, *call = &c;
    if (!begin(ctx, OP_REALLOC, call))
        return 0;
    call->size = size;
    take_old(call, old);
    commit(call);
    return 0;
}

int realloc_enter(struct pt_regs *ctx) {
    return enter_realloc(ctx, PT_REGS_PARM1(ctx), PT_REGS_PARM2(ctx));
}

// reallocarray(ptr, nmemb, size): an overflowing product fails (and leaves ptr alone) like any realloc.
int reallocarray_enter(struct pt_regs *ctx) {
    u64 nmemb = PT_REGS_PARM2(ctx), each = PT_REGS_PARM3(ctx);
    u64 size = nmemb * each;
    if (nmemb && each && !size)
        size = 1;  // wrapped to 0: it fails, and the old block stays like with any size > 0
    return enter_realloc(ctx, PT_REGS_PARM1(ctx), size);
}

int free_enter(struct pt_regs *ctx) {
    u32 tid = bpf_get_current_pid_tgid();
    if (nested(tid, PT_REGS_SP(ctx)))
        return 0;  // inside realloc & co: the outer call accounts for it
    on_free(PT_REGS_PARM1(ctx));
    return 0;
}

// -- returns: track the result under the caller's stack --------------------------------------------------

int alloc_return(struct pt_regs *ctx) {
    struct pending_call c, *call = &c;
    if (!finish(ctx, call))
        return 0;
    u64 address = PT_REGS_RC(ctx);
    switch (call->op) {
    case OP_ALLOC:
        if (address)
            on_alloc(ctx, address, call->size, SOURCE_HEAP);
        break;
    case OP_REALLOC:
        if (!address && call->size) {  // failed: the old block is still the caller's
            if (call->has_old)
                restore(call->old, &call->old_info, call->old_info.size);
            break;
        }
        if (call->old)
            old_freed(call);
        if (address)
            on_alloc(ctx, address, call->size, SOURCE_HEAP);
        break;
    case OP_MEMALIGN: {
        if (PT_REGS_RC(ctx) != 0)
            break;  // failed: nothing was written
        u64 block = 0;
        if (bpf_probe_read_user(&block, sizeof(block), (void *)call->memptr) != 0)
            break;
        if (block)
            on_alloc(ctx, block, call->size, SOURCE_HEAP);
        break;
    }
    }
    return 0;
}

// -- exec ---------------------------------------------------------------------------------------------------
// An exec discards the process's heap without a free: user space forgets what was tracked before it.
// (sched:sched_process_exec; reads no argument, only helpers.)

BPF_HASH(execs, u32, u64, MAX_PIDS);  // tgid -> bpf_ktime_get_ns() of its latest exec

TRACEPOINT_PROBE(sched, sched_process_exec) {
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    if (!comms.lookup(&tgid))
        return 0;  // nothing tracked for it
    u64 now = bpf_ktime_get_ns();
    execs.update(&tgid, &now);
    return 0;
}

// -- C++ operator new that throws ---------------------------------------------------------------------------
// A uretprobe replaces the return address with a trampoline the C++ unwinder cannot step through: an
// exception thrown by operator new (bad_alloc) would then terminate the program. So a throwing operator
// new gets no uretprobe: its entry records the call and the return address, and user space puts a uprobe
// (cxx_new_site) on each return address seen (new_sites -> hooked_sites). Calls from a site not hooked yet
// are not seen (the first ones at each call site, until the next read).

BPF_HASH(new_sites, u64, u8, MAX_NEW_SITES);     // return addresses of operator new calls, to be hooked
BPF_HASH(hooked_sites, u64, u8, MAX_NEW_SITES);  // return addresses with a cxx_new_site uprobe

int cxx_new_enter(struct pt_regs *ctx) {
    u64 sp = PT_REGS_SP(ctx);
    u64 site = 0;
    if (bpf_probe_read_user(&site, sizeof(site), (void *)sp) != 0)
        return 0;
    if (!hooked_sites.lookup(&site)) {
        u8 one = 1;
        new_sites.update(&site, &one);
        return 0;
    }
    struct pending_call c, *call = &c;
    if (!begin(ctx, OP_NEW, call))
        return 0;
    call->size = PT_REGS_PARM1(ctx);
    commit(call);
    return 0;
}

// A uprobe at a return address of operator new: the new that returns here is the thread's pending one
// when the stack pointer is just above its entry's. (A site is also reached by any jump to it: ignored.)
int cxx_new_site(struct pt_regs *ctx) {
    u32 tid = bpf_get_current_pid_tgid();
    struct pending_call *found = pending.lookup(&tid);
    if (!found || found->op != OP_NEW || PT_REGS_SP(ctx) != found->sp + 8)
        return 0;
    u64 size = found->size;
    pending.delete(&tid);
    u64 address = PT_REGS_RC(ctx);
    if (address)
        on_alloc(ctx, address, size, SOURCE_HEAP);
    return 0;
}

// -- anonymous mappings ---------------------------------------------------------------------------------
// Uprobes on the mapped mmap/mremap/munmap (not the syscall tracepoints): at mmap's return the stack starts
// in its caller, whereas from the syscall only the caller's caller can be found (libc's mmap keeps no frame).

int mmap_enter(struct pt_regs *ctx) {
    struct pending_call c, *call = &c;
    if (!begin(ctx, OP_MMAP, call))
        return 0;  // inside malloc & co: that call is tracked already
    // A file mapping is not an allocation: still pending, so that nothing inside it counts.
    call->size = (PT_REGS_PARM4(ctx) & ANONYMOUS_MAPPING) ? PT_REGS_PARM2(ctx) : 0;
    commit(call);
    return 0;
}

// mremap(old, old_len, new_len, flags, ...): the first old_len bytes of the mapping at `old` move to the
// returned address with new_len bytes; a tracked mapping longer than old_len keeps its tail where it was.
int mremap_enter(struct pt_regs *ctx) {
    struct pending_call c, *call = &c;
    if (!begin(ctx, OP_MREMAP, call))
        return 0;
    call->size = PT_REGS_PARM3(ctx);
    call->old_len = PT_REGS_PARM2(ctx);
    if (call->old_len)  // old_len 0 duplicates a shared mapping: the old one stays
        take_old(call, PT_REGS_PARM1(ctx));
    commit(call);
    return 0;
}

int munmap_enter(struct pt_regs *ctx) {
    struct pending_call c, *call = &c;
    if (!begin(ctx, OP_MUNMAP, call))
        return 0;
    call->old_len = PT_REGS_PARM2(ctx);
    take_old(call, PT_REGS_PARM1(ctx));
    commit(call);
    return 0;
}

static __always_inline u64 page_round(u64 len) {
    return (len + USER_PAGE_SIZE - 1) & ~((u64)USER_PAGE_SIZE - 1);
}

// What stays of a tracked mapping after its first `len` bytes went (unmapped or moved).
static __always_inline void keep_tail(struct pending_call *call, u64 len) {
    u64 gone = page_round(len);
    if (call->has_old && gone < call->old_info.size)
        restore(call->old + gone, &call->old_info, call->old_info.size - gone);
    else
        old_freed(call);
}

int mmap_return(struct pt_regs *ctx) {
    struct pending_call c, *call = &c;
    if (!finish(ctx, call))
        return 0;
    u64 address = PT_REGS_RC(ctx);
    switch (call->op) {
    case OP_MMAP:
        if (address != MAP_FAILED_ADDRESS && call->size)
            on_alloc(ctx, address, call->size, SOURCE_MMAP);
        break;
    case OP_MREMAP:
        if (address == MAP_FAILED_ADDRESS) {
            if (call->has_old)
                restore(call->old, &call->old_info, call->old_info.size);
            break;
        }
        if (!call->old_len || !call->has_old)
            break;  // a duplicate, or a mapping not tracked (sampled out, a file): nor is its new place
        if (page_round(call->old_len) < call->old_info.size)  // the tail stays where it was
            restore(call->old + page_round(call->old_len), &call->old_info,
                    call->old_info.size - page_round(call->old_len));
        // The moved part keeps its stack, age and weight (re-sampling only tracked mappings would bias).
        restore(address, &call->old_info, call->size);
        break;
    case OP_MUNMAP:
        if ((s64)address != 0) {  // failed: nothing was unmapped
            if (call->has_old)
                restore(call->old, &call->old_info, call->old_info.size);
            break;
        }
        keep_tail(call, call->old_len);
        break;
    }
    return 0;
}
