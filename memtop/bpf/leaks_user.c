// memtop user leak probe: outstanding heap (and anonymous mmap) allocations of one process, by user stack.
//
// Uprobes on the process's own allocator (malloc, calloc, realloc, reallocarray, posix_memalign,
// aligned_alloc, memalign, valloc, pvalloc and mmap on entry and return; free and munmap on entry), attached
// by user space with pid=PID, so they fire for that process only. The programs read only their arguments
// and return values, and BPF helpers.
//
// The stack is taken at the allocator's return: the instruction pointer is then inside the caller, which a
// frame-pointer walk from the allocator's entry would skip. An mmap made inside an allocator call (glibc's
// large blocks and arenas) is not counted again: the allocator call already is.
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

#define SOURCE_HEAP 0
#define SOURCE_MMAP 1
#define ANONYMOUS_MAPPING 0x20  // MAP_ANONYMOUS
#define MAX_PIDS 64  // one process (and whatever it forks while probed)
#define CTR_PENDING_MAP_FULL 10
#define N_COUNTERS 11
#define LEAK_STACK_FLAGS BPF_F_USER_STACK

#include "leaks_common.h"

// An allocator call in progress on one thread, from its entry to its return.
struct pending_call {
    u64 size;
    u64 memptr;  // posix_memalign: where the result is written
};
BPF_HASH(pending, u32, struct pending_call, MAX_THREADS);
BPF_HASH(pending_mmap, u32, u64, MAX_THREADS);

// -- allocator entries: remember the size until the call returns ------------------------------------

static __always_inline int enter(u64 size, u64 memptr) {
    u32 tid = bpf_get_current_pid_tgid();
    struct pending_call call = {};
    call.size = size;
    call.memptr = memptr;
    if (pending.update(&tid, &call) != 0)
        count(CTR_PENDING_MAP_FULL);
    return 0;
}

int malloc_enter(struct pt_regs *ctx) {
    return enter(PT_REGS_PARM1(ctx), 0);
}

int calloc_enter(struct pt_regs *ctx) {
    return enter((u64)PT_REGS_PARM1(ctx) * (u64)PT_REGS_PARM2(ctx), 0);
}

// realloc frees the old block (when it returns a new one, or when asked for 0 bytes) and allocates anew.
// The old block is released at entry, before another thread can be handed its address.
int realloc_enter(struct pt_regs *ctx) {
    on_free(PT_REGS_PARM1(ctx));
    return enter(PT_REGS_PARM2(ctx), 0);
}

int reallocarray_enter(struct pt_regs *ctx) {
    on_free(PT_REGS_PARM1(ctx));
    return enter((u64)PT_REGS_PARM2(ctx) * (u64)PT_REGS_PARM3(ctx), 0);
}

// aligned_alloc and memalign take (alignment, size).
int aligned_alloc_enter(struct pt_regs *ctx) {
    return enter(PT_REGS_PARM2(ctx), 0);
}

int valloc_enter(struct pt_regs *ctx) {
    return enter(PT_REGS_PARM1(ctx), 0);
}

int posix_memalign_enter(struct pt_regs *ctx) {
    return enter(PT_REGS_PARM3(ctx), PT_REGS_PARM1(ctx));
}

// -- allocator returns: track the block under the caller's stack -----------------------------------

int alloc_return(struct pt_regs *ctx) {
    u32 tid = bpf_get_current_pid_tgid();
    struct pending_call *found = pending.lookup(&tid);
    if (!found)
        return 0;  // entered before we attached
    struct pending_call call = *found;
    pending.delete(&tid);
    u64 address = PT_REGS_RC(ctx);
    if (address)
        on_alloc(ctx, address, call.size, SOURCE_HEAP);
    return 0;
}

int posix_memalign_return(struct pt_regs *ctx) {
    u32 tid = bpf_get_current_pid_tgid();
    struct pending_call *found = pending.lookup(&tid);
    if (!found)
        return 0;
    struct pending_call call = *found;
    pending.delete(&tid);
    if (PT_REGS_RC(ctx) != 0)
        return 0;  // failed: nothing was written
    u64 address = 0;
    if (bpf_probe_read_user(&address, sizeof(address), (void *)call.memptr) != 0)
        return 0;
    if (address)
        on_alloc(ctx, address, call.size, SOURCE_HEAP);
    return 0;
}

int free_enter(struct pt_regs *ctx) {
    on_free(PT_REGS_PARM1(ctx));
    return 0;
}

// -- anonymous mappings --------------------------------------------------------------------------
// Uprobes on the mapped mmap/munmap (not the syscall tracepoints): at mmap's return the stack starts in its
// caller, whereas from the syscall only the caller's caller can be found (libc's mmap keeps no frame).

int mmap_enter(struct pt_regs *ctx) {
    if (!(PT_REGS_PARM4(ctx) & ANONYMOUS_MAPPING))
        return 0;  // a file mapping, not an allocation
    u32 tid = bpf_get_current_pid_tgid();
    if (pending.lookup(&tid))
        return 0;  // inside malloc & co: that call is tracked already
    u64 len = PT_REGS_PARM2(ctx);
    if (pending_mmap.update(&tid, &len) != 0)
        count(CTR_PENDING_MAP_FULL);
    return 0;
}

int mmap_return(struct pt_regs *ctx) {
    u32 tid = bpf_get_current_pid_tgid();
    u64 *len = pending_mmap.lookup(&tid);
    if (!len)
        return 0;
    u64 size = *len;
    pending_mmap.delete(&tid);
    u64 address = PT_REGS_RC(ctx);
    if (address == (u64)-1)
        return 0;  // MAP_FAILED
    on_alloc(ctx, address, size, SOURCE_MMAP);
    return 0;
}

int munmap_enter(struct pt_regs *ctx) {
    on_free(PT_REGS_PARM1(ctx));
    return 0;
}
