// memtop kmalloc probe: per-process kmalloc counters, aggregated in the kernel.
//
// Reads only tracepoint arguments (args->...) and BPF helpers, never kernel struct fields:
// BCC has no CO-RE and the host's headers may not match the running kernel.
//
// Interrupt context: BPF tracepoint programs cannot read the record's common_flags (the kernel stores
// the pt_regs pointer over the first 8 bytes for BPF), so a per-CPU nesting depth is kept from the
// irq:softirq_* and irq:irq_handler_* tracepoints; a kmalloc seen while it is non-zero is charged to
// the [irq] row, not to whatever task happened to be interrupted.
//
// Raw tracepoints where the kernel's prototype carries what is read as plain values (kmalloc with
// RAW_KMALLOC; the irq entry/exit programs read nothing): a raw tracepoint program has its own recursion
// guard, so it is not skipped because another tracing program runs on the CPU (classic tracepoint
// programs share one guard: an interrupt's event during any of them is lost), and it fills no record.
//
// CPU_SLOT: a process's run of kmallocs on a CPU is counted in a per-CPU array slot (km_slot) and added to
// its per-process per-CPU hash entry only when another process kmallocs on that CPU, or when user space
// runs km_flush there before each read: a kmalloc adds to a per-CPU array instead of updating the hash.
//
// WITH_LEAKS: the kernel leak tracking of leaks_kernel.h is compiled in, and the kmalloc program feeds it
// too (one program per tracepoint for both panels); its maps keep their own names.
//
// Tunables are set only through validated -D cflags.

#ifndef MAX_PIDS
#define MAX_PIDS 16384
#endif
#ifndef SAMPLE_EVERY
#define SAMPLE_EVERY 1
#endif
#ifndef MAX_CALL_SITES
#define MAX_CALL_SITES 4096
#endif
#ifndef TAIL_RINGBUF_PAGES
#define TAIL_RINGBUF_PAGES 64
#endif
#ifndef TAIL_MAX_PER_SEC
#define TAIL_MAX_PER_SEC 200  // per CPU: a tail is read by a human; the rest is counted, not sent
#endif
#ifndef HAVE_EXEC_TP
#define HAVE_EXEC_TP 1
#endif
#ifndef TRACK_V1_MEMCG
#define TRACK_V1_MEMCG 0  // 1: follow each task's cgroup v1 memory cgroup (see memcg_of)
#endif
#ifndef V1_MEMCG_HIERARCHY
#define V1_MEMCG_HIERARCHY 0  // the memory controller's hierarchy id (/proc/cgroups)
#endif
#ifndef MAX_TASKS
#define MAX_TASKS 65536
#endif
#ifndef HAVE_NEWTASK_TP
#define HAVE_NEWTASK_TP 1
#endif
#ifndef HAVE_EXIT_TP
#define HAVE_EXIT_TP 1
#endif
#ifndef MAX_EXITS
#define MAX_EXITS 8192
#endif
#ifndef RAW_KMALLOC
#define RAW_KMALLOC 1
#endif
#ifndef WITH_LEAKS
#define WITH_LEAKS 0
#endif
#ifndef CPU_SLOT
#define CPU_SLOT 1  // count a CPU's run of kmallocs by one process in km_slot (needs km_flush: BPF_PROG_TEST_RUN)
#endif
#ifndef SLOT_TAKE_AFTER
#define SLOT_TAKE_AFTER 16  // a slot changes hands after this many kmallocs there by others, none by its own
#endif

#if WITH_LEAKS && CPU_SLOT
// The leak sampling's per-CPU countdown lives in this CPU's km_slot_t (below), beside the interrupt depth
// and the slot that every kmalloc touches anyway: one per-CPU value's cache lines instead of three maps'.
struct sample_gap_t;
static __always_inline struct sample_gap_t *km_sample_gap(void);
#define LEAK_SAMPLE_GAP() km_sample_gap()
#endif
#if WITH_LEAKS
#include "leaks_kernel.h"
#endif

// The key under which interrupt-context allocations are counted (no real tgid is this large).
#define IRQ_TGID 0xffffffffU
#define SIZE_BUCKETS 64
#ifndef COMM_LEN
#define COMM_LEN 16
#endif

// Indexes into `km_counters`.
#define KM_PID_MAP_FULL 0
#define KM_SITE_MAP_FULL 1
#define KM_TAIL_LOST 2
#define KM_SAMPLED_EVENTS 3
#define KM_TAIL_RATE_LIMITED 4
#define KM_MEMCG_MAP_FULL 5
#define KM_PIDS_REUSED 6
#define KM_NAMES_WRITTEN 7  // proc_comms entries made or changed (exec): user space re-reads them only then
#define KM_SLOT_ORPHANED 8  // kmallocs a slot held for an entry user space had deleted (the process exited)
#define KM_N_COUNTERS 9

#define CLONE_THREAD_FLAG 0x00010000ULL  // CLONE_THREAD, from the uapi (stable ABI)

struct pid_stats {
    u64 calls;
    u64 bytes_alloc;
    u64 bytes_req;
};

// Process names and cgroups, set when a process's first kmalloc is counted and refreshed on exec: they
// name and attribute processes that exit before the next tick (a fork's first kmalloc still carries the
// parent's name; exec runs after a container runtime has moved the process into its cgroup).
// cgroup_id is the cgroup2 id (the directory's inode number), resolved to a path in user space;
// memcg_id the same for the cgroup v1 memory hierarchy (0 when not followed or not known).
struct proc_comm {
    char comm[COMM_LEN];
    u64 cgroup_id;
    u64 memcg_id;
    u64 execs;  // execs since the entry was made: user space re-reads the name and command line
    u64 first_ns;  // bpf_ktime_get_ns() of the entry's first counted kmalloc
};

struct site_stats {
    u64 calls;
    u64 bytes_alloc;
    u64 bytes_req;
};

// The drilled-in process (slot 0): its call sites and sizes are collected, and while tail_min_bytes is
// non-zero its individual kmallocs of at least that size are sent to user space.
struct focus_cfg {
    u32 tgid;       // 0 = no focus
    u32 tail_on;    // 1 = send tail events
    u64 tail_min_bytes;
};

struct tail_event {
    u64 ts_ns;
    u64 call_site;
    u64 ptr;
    u64 bytes_req;
    u64 bytes_alloc;
    u64 gfp_flags;
    s32 node;
    u32 tid;
};

// A process is (tgid, generation): when a new process gets the pid of one that has an entry here (it
// died, and its counts are not read yet), the pid's generation is raised (task:task_newtask), so the
// newcomer's kmallocs go to an entry of its own and the old one stays, retired, until user space reads
// it. `gens` holds only pids that were reused: the kmalloc path pays one lookup that mostly misses.
struct pid_key {
    u32 tgid;
    u32 gen;
};
BPF_PERCPU_HASH(pid_stats, struct pid_key, struct pid_stats, MAX_PIDS);
BPF_HASH(proc_comms, struct pid_key, struct proc_comm, MAX_PIDS);
BPF_HASH(gens, u32, u32, MAX_PIDS);
// Non-zero where some pid with these low bits was ever reused: the kmalloc path looks `gens` up only
// then (an array lookup instead of a hash lookup that misses).
#define REUSED_SLOTS 32768
BPF_ARRAY(reused_slots, u32, REUSED_SLOTS);

static __always_inline struct pid_key key_of(u32 tgid) {
    struct pid_key key = {.tgid = tgid, .gen = 0};
    u32 slot = tgid & (REUSED_SLOTS - 1);
    u32 *reused = reused_slots.lookup(&slot);
    if (reused && !*reused)
        return key;
    u32 *gen = gens.lookup(&tgid);
    if (gen)
        key.gen = *gen;
    return key;
}
BPF_PERCPU_ARRAY(km_counters, u64, KM_N_COUNTERS);
BPF_ARRAY(focus, struct focus_cfg, 1);
BPF_PERCPU_HASH(focus_sites, u64, struct site_stats, MAX_CALL_SITES);
BPF_PERCPU_ARRAY(focus_sizes, u64, SIZE_BUCKETS);
BPF_RINGBUF_OUTPUT(tail_events, TAIL_RINGBUF_PAGES);

struct tail_window {
    u64 start_ns;
    u64 sent;
};
BPF_PERCPU_ARRAY(tail_budget, struct tail_window, 1);

// At most TAIL_MAX_PER_SEC tail events per CPU per second.
static __always_inline int tail_allowed(u64 now) {
    int zero = 0;
    struct tail_window *w = tail_budget.lookup(&zero);
    if (!w)
        return 0;
    if (now - w->start_ns >= 1000000000ULL) {
        w->start_ns = now;
        w->sent = 0;
    }
    if (w->sent >= TAIL_MAX_PER_SEC)
        return 0;
    w->sent++;
    return 1;
}

static __always_inline void km_count(int idx) {
    u64 *c = km_counters.lookup(&idx);
    if (c)
        (*c)++;
}

static __always_inline void km_add(int idx, u64 n) {
    u64 *c = km_counters.lookup(&idx);
    if (c)
        *c += n;
}

#if CPU_SLOT
// Each CPU's run of kmallocs by one process: counted here, in a per-CPU array (as a minimal counter counts),
// and added to the process's pid_stats entry when another process kmallocs on that CPU, or when user
// space runs km_flush on the CPU before it reads pid_stats (each tick, BPF_PROG_TEST_RUN on each CPU):
// every count is in exactly one of the two places, and a read after the flush sees them all.
// `busy` is set while a program changes the slot; the one program that can run in the middle of
// another's change on the same CPU (km_flush from an IPI, or a kmalloc in an interrupt during
// km_flush) leaves the slot alone then. A kmalloc program cannot interrupt a kmalloc program (the
// kernel's per-program recursion guard).
// The same per-CPU value holds what else every kmalloc reads or writes on its CPU: the interrupt depth
// (irq_depth) and, with the leak tracking, its sampling countdown (gap). Each program writes only its own
// fields, never the whole value, and user space only reads it.
struct km_slot_t {
    u32 busy;
    u32 misses;  // kmallocs by other processes since the slot's process last kmalloc'd on this CPU
    struct pid_key key;
    u64 calls;  // 0: empty
    u64 bytes_alloc;
    u64 bytes_req;
    u32 irq_depth;  // see irq_enter
    u32 pad;
#if WITH_LEAKS
    struct sample_gap_t gap;
#endif
};
BPF_PERCPU_ARRAY(km_slot, struct km_slot_t, 1);

#if WITH_LEAKS
static __always_inline struct sample_gap_t *km_sample_gap(void) {
    int zero = 0;
    struct km_slot_t *slot = km_slot.lookup(&zero);
    return slot ? &slot->gap : 0;
}
#endif

static __always_inline u32 *irq_depth_here(void) {
    int zero = 0;
    struct km_slot_t *slot = km_slot.lookup(&zero);
    return slot ? &slot->irq_depth : 0;
}
#else
BPF_PERCPU_ARRAY(irq_depth, u32, 1);

static __always_inline u32 *irq_depth_here(void) {
    int zero = 0;
    return irq_depth.lookup(&zero);
}
#endif

// The interrupt depth: irq:softirq_entry / irq:irq_handler_entry raise it, the exits lower it. User space
// attaches these programs, every exit before any entry: an exit whose entry came before the attach
// saturates at 0, and every entry seen has its exit seen, so no depth is left raised by the attach.
static __always_inline void irq_enter(void) {
    u32 *depth = irq_depth_here();
    if (depth)
        (*depth)++;
}

static __always_inline void irq_leave(void) {
    u32 *depth = irq_depth_here();
    if (depth && *depth)  // saturate: we may have attached between an entry and its exit
        (*depth)--;
}

// Raw tracepoints (nothing of the record is read); attached by user space (irq_enter's order). Four
// programs, not one per direction: the kernel skips a program that interrupts a running copy of itself
// (its per-program recursion guard), and a hardirq can come while a softirq's exit or entry program runs:
// with one shared program, the hardirq's exit (or entry) would be skipped and the depth left off by one.
int km_softirq_enter(struct bpf_raw_tracepoint_args *ctx) {
    irq_enter();
    return 0;
}

int km_softirq_exit(struct bpf_raw_tracepoint_args *ctx) {
    irq_leave();
    return 0;
}

int km_hardirq_enter(struct bpf_raw_tracepoint_args *ctx) {
    irq_enter();
    return 0;
}

int km_hardirq_exit(struct bpf_raw_tracepoint_args *ctx) {
    irq_leave();
    return 0;
}

#if TRACK_V1_MEMCG
// cgroup v1 has no helper that tells the current task's memory cgroup (bpf_get_current_cgroup_id() is
// cgroup2's), so it is followed from tracepoint arguments: a task moved into a cgroup of the memory
// hierarchy (cgroup_attach_task names the hierarchy, the cgroup's id and the pid: the leader's for a
// cgroup.procs write, one thread's for a v1 `tasks` write), a new process inherits its parent's at
// fork (task_newtask, threads skipped: they share their process's entry), and an exiting task's entry
// is dropped (sched_process_exit, per thread). User space seeds the processes that were running before
// the attach from /proc. The key is a pid: a process's tgid, or a thread moved on its own.
BPF_HASH(memcg_of, u32, u64, MAX_TASKS);

static __always_inline void set_memcg(u32 pid, u64 id) {
    if (memcg_of.update(&pid, &id) != 0)
        km_count(KM_MEMCG_MAP_FULL);
}

TRACEPOINT_PROBE(cgroup, cgroup_attach_task) {
    if (args->dst_root == V1_MEMCG_HIERARCHY)
        set_memcg(args->pid, args->dst_id);
    return 0;
}

static __always_inline void inherit_memcg(u32 pid) {
    u32 parent = bpf_get_current_pid_tgid() >> 32;
    u64 *id = memcg_of.lookup(&parent);
    if (id)
        set_memcg(pid, *id);
}

TRACEPOINT_PROBE(sched, sched_process_exit) {
    u32 pid = args->pid;
    memcg_of.delete(&pid);
    return 0;
}

static __always_inline u64 current_memcg(u32 tgid) {
    u64 *id = memcg_of.lookup(&tgid);
    return id ? *id : 0;
}
#else
static __always_inline u64 current_memcg(u32 tgid) { return 0; }
#endif

#if HAVE_NEWTASK_TP || TRACK_V1_MEMCG
TRACEPOINT_PROBE(task, task_newtask) {
    if (args->clone_flags & CLONE_THREAD_FLAG)
        return 0;  // a thread: counted with its process
    u32 pid = args->pid;
#if TRACK_V1_MEMCG
    inherit_memcg(pid);
#endif
    // A new process with the pid of one whose counts are still here: retire those (a new generation).
    struct pid_key key = key_of(pid);
    if (proc_comms.lookup(&key)) {
        u32 next = key.gen + 1;
        u32 slot = pid & (REUSED_SLOTS - 1);
        u32 *reused = reused_slots.lookup(&slot);
        if (reused)
            __sync_fetch_and_add(reused, 1);  // before the new generation shows: never a stale key
        gens.update(&pid, &next);
        km_count(KM_PIDS_REUSED);
    }
    return 0;
}
#endif

#if HAVE_EXIT_TP
// Processes whose main thread exited since user space last looked (sched:sched_process_exit runs in the
// exiting task): user space reads their /proc entry at once rather than when a quiet process's turn comes,
// so a zombie (listed in /proc until its parent reaps it) is not shown live. Full: such an exit is seen a
// few ticks later, as before. A raw tracepoint: nothing of the record is read.
BPF_HASH(exits, u32, u8, MAX_EXITS);

RAW_TRACEPOINT_PROBE(sched_process_exit) {
    u64 id = bpf_get_current_pid_tgid();
    u32 tgid = id >> 32;
    if ((u32)id == tgid) {
        u8 one = 1;
        exits.update(&tgid, &one);
    }
    return 0;
}
#endif

#if HAVE_EXEC_TP
TRACEPOINT_PROBE(sched, sched_process_exec) {
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    struct pid_key key = key_of(tgid);
    struct proc_comm *c = proc_comms.lookup(&key);
    if (c) {
        bpf_get_current_comm(&c->comm, sizeof(c->comm));
        c->cgroup_id = bpf_get_current_cgroup_id();
        c->memcg_id = current_memcg(tgid);
        c->execs++;
        km_count(KM_NAMES_WRITTEN);
    }
    return 0;
}
#endif

#if CPU_SLOT
#define km_barrier() asm volatile("" ::: "memory")

// Move the slot's counts to its process's entry (this CPU's share of it). `atomic` in km_flush: a kmalloc in
// an interrupt may count straight into the same entry meanwhile (it finds the slot busy); the kmalloc
// program itself cannot be interrupted by another that writes there. An entry that is gone was deleted by
// user space after the process exited (or its generation was retired): it is not made again (a PID's
// next owner must not inherit it, and nothing would name it); its counts are counted as orphaned.
static __always_inline void slot_flush(struct km_slot_t *slot, int atomic) {
    if (!slot->calls)
        return;
    struct pid_stats *st = pid_stats.lookup(&slot->key);
    if (!st) {
        km_add(KM_SLOT_ORPHANED, slot->calls);
    } else if (atomic) {
        __sync_fetch_and_add(&st->calls, slot->calls);
        __sync_fetch_and_add(&st->bytes_alloc, slot->bytes_alloc);
        __sync_fetch_and_add(&st->bytes_req, slot->bytes_req);
    } else {
        st->calls += slot->calls;
        st->bytes_alloc += slot->bytes_alloc;
        st->bytes_req += slot->bytes_req;
    }
    slot->calls = 0;
    slot->bytes_alloc = 0;
    slot->bytes_req = 0;
}

// Run by user space on each CPU (BPF_PROG_TEST_RUN with BPF_F_TEST_RUN_ON_CPU) before it reads pid_stats.
// Returns 1 when the slot was busy (this ran in the middle of a kmalloc program's change: run it again).
int km_flush(struct bpf_raw_tracepoint_args *ctx) {
    int zero = 0;
    struct km_slot_t *slot = km_slot.lookup(&zero);
    if (!slot)
        return 0;
    if (slot->busy)
        return 1;
    slot->busy = 1;
    km_barrier();
    slot_flush(slot, 1);
    km_barrier();
    slot->busy = 0;
    return 0;
}
#endif

static __always_inline u32 log2_bucket(u64 v) {
    u32 b = bpf_log2l(v);
    return b < SIZE_BUCKETS ? b : SIZE_BUCKETS - 1;
}

// One kmalloc: the per-process counters, the drilled-in process's detail, and (WITH_LEAKS) leak tracking.
static __always_inline void on_kmalloc(void *ctx, u64 call_site, u64 ptr, u64 bytes_req, u64 bytes_alloc,
                                       u64 gfp_flags, s32 node) {
    int zero = 0;
#if CPU_SLOT
    struct km_slot_t *slot = km_slot.lookup(&zero);
    u32 *depth = slot ? &slot->irq_depth : 0;
#else
    u32 *depth = irq_depth.lookup(&zero);
#endif
    u32 tgid;
    if (depth && *depth) {
        tgid = IRQ_TGID;
    } else {
        tgid = bpf_get_current_pid_tgid() >> 32;
    }

    // The drilled-in process: every allocation (not sampled), only while a focus is set.
    struct focus_cfg *f = focus.lookup(&zero);
    if (f && f->tgid != 0 && f->tgid == tgid) {
        u64 site = call_site;
        struct site_stats *s = focus_sites.lookup(&site);
        if (!s) {
            struct site_stats init = {};
            focus_sites.update(&site, &init);
            s = focus_sites.lookup(&site);
        }
        if (s) {
            s->calls++;
            s->bytes_alloc += bytes_alloc;
            s->bytes_req += bytes_req;
        } else {
            km_count(KM_SITE_MAP_FULL);
        }
        int bucket = log2_bucket(bytes_alloc);
        u64 *h = focus_sizes.lookup(&bucket);
        if (h)
            (*h)++;
        if (f->tail_on && bytes_alloc >= f->tail_min_bytes) {
            u64 now = bpf_ktime_get_ns();
            if (!tail_allowed(now)) {
                km_count(KM_TAIL_RATE_LIMITED);
                goto counters;
            }
            struct tail_event ev = {};
            ev.ts_ns = now;
            ev.call_site = site;
            ev.ptr = ptr;
            ev.bytes_req = bytes_req;
            ev.bytes_alloc = bytes_alloc;
            ev.gfp_flags = gfp_flags;
            ev.node = node;
            ev.tid = (u32)bpf_get_current_pid_tgid();
            if (tail_events.ringbuf_output(&ev, sizeof(ev), 0) != 0)
                km_count(KM_TAIL_LOST);
        }
    }

counters:;
#if WITH_LEAKS
    leak_kmalloc(ctx, ptr, bytes_alloc);
#endif
#if SAMPLE_EVERY > 1
    if (bpf_get_prandom_u32() % SAMPLE_EVERY != 0)
        return;
    km_count(KM_SAMPLED_EVENTS);
#endif

    struct pid_key key = {.tgid = tgid, .gen = 0};
#if CPU_SLOT
    int take = 0;
    if (tgid != IRQ_TGID) {
        key = key_of(tgid);
        // The fast path: this CPU's last kmalloc was this process's too (a task makes its kmallocs in
        // runs: a syscall, a time slice), so the counts go to a per-CPU array, not the per-CPU hash.
        // busy around every change, this one too: the adds are loads and stores, and km_flush from an IPI
        // between a load and its store would see the old value and count it once more.
        if (slot && !slot->busy) {
            slot->busy = 1;
            km_barrier();
            if (slot->calls && slot->key.tgid == key.tgid && slot->key.gen == key.gen) {
                slot->calls++;
                slot->bytes_alloc += bytes_alloc;
                slot->bytes_req += bytes_req;
                slot->misses = 0;
                km_barrier();
                slot->busy = 0;
                return;
            }
            // Another process's kmalloc. It takes the slot only when the slot is empty or its process has
            // made none of the last SLOT_TAKE_AFTER kmallocs on this CPU: two processes that take turns
            // kmallocing on a CPU (a request and its reply over loopback) would otherwise move the slot at
            // every kmalloc, two hash lookups each, where now one keeps the slot and the other counts
            // straight into its entry, one lookup.
            take = !slot->calls || slot->misses >= SLOT_TAKE_AFTER;
            if (!take)
                slot->misses++;
            km_barrier();
            slot->busy = 0;
        }
    }
#else
    if (tgid != IRQ_TGID)
        key = key_of(tgid);
#endif
    struct pid_stats *st = pid_stats.lookup(&key);
    if (!st) {
        struct pid_stats init = {};
        if (tgid != IRQ_TGID) {
            struct proc_comm c = {};
            bpf_get_current_comm(&c.comm, sizeof(c.comm));
            c.cgroup_id = bpf_get_current_cgroup_id();
            c.memcg_id = current_memcg(tgid);
            c.first_ns = bpf_ktime_get_ns();
            if (proc_comms.update(&key, &c) == 0)
                km_count(KM_NAMES_WRITTEN);  // before pid_stats has the key: a reader seeing it re-reads names
        }
        // BPF_NOEXIST: another CPU may have created it meanwhile; then the lookup below finds it.
        pid_stats.insert(&key, &init);
        st = pid_stats.lookup(&key);
        if (!st) {
            km_count(KM_PID_MAP_FULL);
            return;
        }
    }
#if CPU_SLOT
    // Another process's run takes this CPU's slot: the last one's counts go to its entry, this one's run
    // starts in the slot. (busy: this program interrupted km_flush on this CPU; count straight in st.)
    if (slot && take && !slot->busy) {
        slot->busy = 1;
        km_barrier();
        slot_flush(slot, 0);
        slot->misses = 0;
        slot->key = key;
        slot->calls = 1;
        slot->bytes_alloc = bytes_alloc;
        slot->bytes_req = bytes_req;
        km_barrier();
        slot->busy = 0;
        return;
    }
#endif
    st->calls++;
    st->bytes_alloc += bytes_alloc;
    st->bytes_req += bytes_req;
}

#if RAW_KMALLOC
// trace_kmalloc(call_site, ptr, bytes_req, bytes_alloc, gfp_flags, node)
RAW_TRACEPOINT_PROBE(kmalloc) {
    on_kmalloc(ctx, ctx->args[0], ctx->args[1], ctx->args[2], ctx->args[3], ctx->args[4], (s32)ctx->args[5]);
    return 0;
}
#else
TRACEPOINT_PROBE(kmem, kmalloc) {
    on_kmalloc(args, args->call_site, (u64)args->ptr, args->bytes_req, args->bytes_alloc, args->gfp_flags,
               args->node);
    return 0;
}
#endif
