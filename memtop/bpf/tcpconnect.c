// memtop TCP connect probe: connect latency per (process, destination), aggregated in the kernel.
//
// Reads only tracepoint arguments (args->...) and BPF helpers, never kernel struct fields: BCC has no
// CO-RE and the host's headers may not match the running kernel.
//
// sock:inet_sock_set_state CLOSE -> SYN_SENT is the start of an active connect, and the one moment the
// connecting thread is current: its tgid, tid, comm and cgroup2 id are kept in `pending`, keyed by the
// socket's address. SYN_SENT -> ESTABLISHED is a success (latency into the key's log2 histogram), and
// SYN_SENT -> CLOSE a failure. Only slow (>= the slow threshold) and failed connects are sent to user
// space, through a ring buffer capped per CPU; everything else is counted in the maps.
//
// Optional tracepoints refine this: tcp:tcp_destroy_sock removes pending entries of sockets destroyed
// before finishing, tcp:tcp_receive_reset marks a connect refused, tcp:tcp_retransmit_skb counts SYN
// retransmits, and sock:inet_sk_error_report (which follows the failure at once, on the same CPU, but
// names no socket) tells why a connect failed: it is matched against the CPU's last failure by addresses
// and ports and sent as a small "error" record that user space joins to the failure by sequence number.
//
// Ports in these tracepoints are in host byte order (the kernel stores ntohs() of them).
//
// Outcomes lost: a classic tracepoint program is skipped (a recursion miss) when its event fires while
// another classic tracing program runs on the CPU, so a connect's SYN_SENT -> ESTABLISHED/CLOSE may never
// be seen. Its pending entry is then closed out, never left in flight: tcp_destroy_sock finds it (the
// socket is gone and its outcome was not seen: counted as CTR_OUTCOME_LOST), and user space expires
// entries older than the longest SYN retry time. tcp_destroy_sock and tcp_receive_reset are raw
// tracepoints (their only argument, the socket, is used as an opaque key: never dereferenced), with a
// per-program recursion guard of their own.
//
// Tunables are set only through validated -D cflags; the slow threshold and the PID filter live in maps
// so that they can change while the probe runs.

#ifndef MAX_PENDING
#define MAX_PENDING 65536
#endif
#ifndef MAX_KEYS
#define MAX_KEYS 16384
#endif
#ifndef MAX_FILTER_PIDS
#define MAX_FILTER_PIDS 4096
#endif
#ifndef SLOW_US_DEFAULT
#define SLOW_US_DEFAULT 200000  // until user space writes `config`
#endif
#ifndef EVENTS_RINGBUF_PAGES
#define EVENTS_RINGBUF_PAGES 64
#endif
#ifndef EVENTS_MAX_PER_SEC
#define EVENTS_MAX_PER_SEC 200  // per CPU: slow/failed connects are read by a human; the rest is counted
#endif
#ifndef HAVE_DESTROY_TP
#define HAVE_DESTROY_TP 1
#endif
#ifndef HAVE_RESET_TP
#define HAVE_RESET_TP 1
#endif
#ifndef HAVE_RETRANSMIT_TP
#define HAVE_RETRANSMIT_TP 1
#endif
#ifndef HAVE_ERROR_TP
#define HAVE_ERROR_TP 1
#endif

#define LATENCY_BUCKETS 32
#define COMM_LEN 16
#define MEMTOP_AF_INET 2
#define MEMTOP_AF_INET6 10
#define MEMTOP_IPPROTO_TCP 6
#define MEMTOP_TCP_ESTABLISHED 1
#define MEMTOP_TCP_SYN_SENT 2
#define MEMTOP_TCP_SYN_RECV 3
#define MEMTOP_TCP_CLOSE 7
#define ERROR_MATCH_NS 1000000ULL  // an error report this soon after a failure on the same CPU is its own

// Indexes into `counters`.
#define CTR_PENDING_MAP_FULL 0
#define CTR_KEY_MAP_FULL 1
#define CTR_EVENTS_LOST 2
#define CTR_EVENTS_RATE_LIMITED 3
#define CTR_OUTCOME_LOST 4  // pending connects whose socket was destroyed before their outcome was seen
#define N_COUNTERS 5

// Record kinds in `events`.
#define EV_CONNECT 1  // a slow or failed connect
#define EV_ERROR 2    // the error reported for the failed connect with the same seq

struct tcp_key {
    u32 tgid;
    u16 family;  // AF_INET or AF_INET6
    u16 dport;
    u8 daddr[16];  // IPv4: the first 4 bytes, the rest zero
};

struct tcp_stats {
    u64 connects;  // finished attempts: established + failed
    u64 failed;
    u64 syn_retransmits;
    u64 max_us;  // slowest success; updated without a lock, so a race can keep the lower of two
    u64 cgroup_id;
    char comm[COMM_LEN];
    u64 latency_log2[LATENCY_BUCKETS];  // successes; 0: < 1 us, b >= 1: [2^(b-1), 2^b) us
};

struct pending_t {
    u64 start_ns;
    u64 cgroup_id;
    u32 tgid;
    u32 tid;
    u16 family;
    u16 dport;
    u16 syn_retransmits;
    u8 rst;
    u8 unused;
    u8 daddr[16];
    char comm[COMM_LEN];
};

struct tcp_event {
    u64 ts_ns;
    u64 latency_ns;
    u64 cgroup_id;
    u64 seq;
    u32 tgid;
    u32 tid;
    s32 error;
    u16 kind;
    u16 family;
    u16 sport;
    u16 dport;
    u16 syn_retransmits;
    u8 failed;
    u8 rst;
    u8 saddr[16];
    u8 daddr[16];
    char comm[COMM_LEN];
};

struct config_t {
    u64 slow_ns;
    u32 set;        // 0 until user space writes it: SLOW_US_DEFAULT applies meanwhile
    u32 filter_on;  // 1: only tgids in pid_filter
};

// The CPU's last failed connect that was sent, for joining the error report that follows it.
struct last_failure_t {
    u64 ts_ns;
    u64 seq;
    u16 family;
    u16 sport;
    u16 dport;
    u16 unused;
    u8 daddr[16];
};

struct events_window {
    u64 start_ns;
    u64 sent;
};

BPF_F_TABLE("hash", u64, struct pending_t, pending, MAX_PENDING, BPF_F_NO_PREALLOC);
BPF_F_TABLE("hash", struct tcp_key, struct tcp_stats, tcp_stats, MAX_KEYS, BPF_F_NO_PREALLOC);
BPF_PERCPU_ARRAY(stats_init, struct tcp_stats, 1);  // zeroed scratch: too big for the BPF stack
BPF_HASH(pid_filter, u32, u8, MAX_FILTER_PIDS);
BPF_ARRAY(config, struct config_t, 1);
BPF_PERCPU_ARRAY(counters, u64, N_COUNTERS);
BPF_PERCPU_ARRAY(events_budget, struct events_window, 1);
BPF_PERCPU_ARRAY(event_seq, u64, 1);
BPF_PERCPU_ARRAY(last_failure, struct last_failure_t, 1);
BPF_RINGBUF_OUTPUT(events, EVENTS_RINGBUF_PAGES);

static __always_inline void count(int idx) {
    u64 *c = counters.lookup(&idx);
    if (c)
        (*c)++;
}

// At most EVENTS_MAX_PER_SEC slow/failed connects per CPU per second.
static __always_inline int event_allowed(u64 now) {
    int zero = 0;
    struct events_window *w = events_budget.lookup(&zero);
    if (!w)
        return 0;
    if (now - w->start_ns >= 1000000000ULL) {
        w->start_ns = now;
        w->sent = 0;
    }
    if (w->sent >= EVENTS_MAX_PER_SEC)
        return 0;
    w->sent++;
    return 1;
}

static __always_inline u32 latency_bucket(u64 us) {
    if (us == 0)
        return 0;
    u32 b = bpf_log2l(us);  // floor(log2(us)) + 1 for us >= 1
    return b < LATENCY_BUCKETS ? b : LATENCY_BUCKETS - 1;
}

// A tracepoint's address array as 16 bytes (IPv4 in the first 4; `dst` must be zeroed). It is copied with
// bpf_probe_read_kernel because the verifier refuses loads through a pointer into the record (ctx) that
// is not the record's start; the bytes read are still the tracepoint's own arguments.
static __always_inline void copy_addr(u8 *dst, u16 family, const u8 *v4, const u8 *v6) {
    if (family == MEMTOP_AF_INET) {
        bpf_probe_read_kernel(dst, 4, v4);
    } else {
        bpf_probe_read_kernel(dst, 16, v6);
    }
}

static __always_inline int same_addr(const u8 *a, const u8 *b) {
    u64 x[2], y[2];
    __builtin_memcpy(x, a, 16);
    __builtin_memcpy(y, b, 16);
    return x[0] == y[0] && x[1] == y[1];
}

static __always_inline void connect_start(u64 sk, u16 family, u16 dport, const u8 *daddr4,
                                          const u8 *daddr6) {
    u64 pid_tgid = bpf_get_current_pid_tgid();
    u32 tgid = pid_tgid >> 32;
    int zero = 0;
    struct config_t *cfg = config.lookup(&zero);
    if (cfg && cfg->filter_on && !pid_filter.lookup(&tgid))
        return;
    struct pending_t p = {};
    p.start_ns = bpf_ktime_get_ns();
    p.cgroup_id = bpf_get_current_cgroup_id();
    p.tgid = tgid;
    p.tid = (u32)pid_tgid;
    p.family = family;
    p.dport = dport;
    copy_addr(p.daddr, family, daddr4, daddr6);
    bpf_get_current_comm(&p.comm, sizeof(p.comm));
    if (pending.update(&sk, &p) != 0)
        count(CTR_PENDING_MAP_FULL);
}

static __always_inline void add_to_stats(struct pending_t *p, int failed, u64 latency_us) {
    struct tcp_key key = {};
    key.tgid = p->tgid;
    key.family = p->family;
    key.dport = p->dport;
    __builtin_memcpy(key.daddr, p->daddr, 16);
    struct tcp_stats *st = tcp_stats.lookup(&key);
    if (!st) {
        int zero = 0;
        struct tcp_stats *init = stats_init.lookup(&zero);
        if (!init)
            return;
        // BPF_NOEXIST: another CPU may have created it meanwhile; then the lookup below finds it.
        tcp_stats.insert(&key, init);
        st = tcp_stats.lookup(&key);
        if (!st) {
            count(CTR_KEY_MAP_FULL);
            return;
        }
    }
    __builtin_memcpy(st->comm, p->comm, COMM_LEN);
    st->cgroup_id = p->cgroup_id;
    __sync_fetch_and_add(&st->connects, 1);
    if (p->syn_retransmits)
        __sync_fetch_and_add(&st->syn_retransmits, p->syn_retransmits);
    if (failed) {
        __sync_fetch_and_add(&st->failed, 1);
        return;
    }
    u32 b = latency_bucket(latency_us);
    if (b < LATENCY_BUCKETS)
        __sync_fetch_and_add(&st->latency_log2[b], 1);
    if (latency_us > st->max_us)
        st->max_us = latency_us;
}

static __always_inline void send_event(struct pending_t *p, int failed, u64 now, u64 latency_ns, u16 sport,
                                       const u8 *saddr4, const u8 *saddr6) {
    if (!event_allowed(now)) {
        count(CTR_EVENTS_RATE_LIMITED);
        return;
    }
    int zero = 0;
    u64 seq = 0;
    u64 *next = event_seq.lookup(&zero);
    if (next) {
        *next += 1;
        seq = ((u64)bpf_get_smp_processor_id() << 48) | (*next & 0xffffffffffffULL);
    }
    struct tcp_event *ev = events.ringbuf_reserve(sizeof(struct tcp_event));
    if (!ev) {
        count(CTR_EVENTS_LOST);
        return;
    }
    ev->ts_ns = now;
    ev->latency_ns = latency_ns;
    ev->cgroup_id = p->cgroup_id;
    ev->seq = seq;
    ev->tgid = p->tgid;
    ev->tid = p->tid;
    ev->error = 0;
    ev->kind = EV_CONNECT;
    ev->family = p->family;
    ev->sport = sport;
    ev->dport = p->dport;
    ev->syn_retransmits = p->syn_retransmits;
    ev->failed = failed;
    ev->rst = p->rst;
    __builtin_memset(ev->saddr, 0, 16);
    copy_addr(ev->saddr, p->family, saddr4, saddr6);
    __builtin_memcpy(ev->daddr, p->daddr, 16);
    __builtin_memcpy(ev->comm, p->comm, COMM_LEN);
    events.ringbuf_submit(ev, 0);

    if (failed) {
        struct last_failure_t *lf = last_failure.lookup(&zero);
        if (lf) {
            lf->ts_ns = now;
            lf->seq = seq;
            lf->family = p->family;
            lf->sport = sport;
            lf->dport = p->dport;
            __builtin_memcpy(lf->daddr, p->daddr, 16);
        }
    }
}

TRACEPOINT_PROBE(sock, inet_sock_set_state) {
    if (args->protocol != MEMTOP_IPPROTO_TCP)
        return 0;
    int newstate = args->newstate;
    int oldstate = args->oldstate;
    if (newstate == MEMTOP_TCP_SYN_SENT) {
        if (oldstate == MEMTOP_TCP_CLOSE)
            connect_start((u64)args->skaddr, args->family, args->dport, args->daddr, args->daddr_v6);
        return 0;
    }
    if (newstate != MEMTOP_TCP_ESTABLISHED && newstate != MEMTOP_TCP_CLOSE)
        return 0;
    // SYN_RECV: a simultaneous open; for a listener's children the lookup below finds nothing.
    if (oldstate != MEMTOP_TCP_SYN_SENT && oldstate != MEMTOP_TCP_SYN_RECV)
        return 0;
    u64 sk = (u64)args->skaddr;
    struct pending_t *p = pending.lookup(&sk);
    if (!p)
        return 0;
    u64 now = bpf_ktime_get_ns();
    u64 latency_ns = now - p->start_ns;
    int failed = newstate == MEMTOP_TCP_CLOSE;
    add_to_stats(p, failed, latency_ns / 1000);

    int zero = 0;
    struct config_t *cfg = config.lookup(&zero);
    u64 slow_ns = cfg && cfg->set ? cfg->slow_ns : SLOW_US_DEFAULT * 1000ULL;
    if (failed || latency_ns >= slow_ns)
        send_event(p, failed, now, latency_ns, args->sport, args->saddr, args->saddr_v6);
    pending.delete(&sk);
    return 0;
}

#if HAVE_DESTROY_TP
RAW_TRACEPOINT_PROBE(tcp_destroy_sock) {  // (sk)
    u64 sk = (u64)ctx->args[0];
    if (pending.delete(&sk) == 0)
        count(CTR_OUTCOME_LOST);
    return 0;
}
#endif

#if HAVE_RESET_TP
RAW_TRACEPOINT_PROBE(tcp_receive_reset) {  // (sk)
    u64 sk = (u64)ctx->args[0];
    struct pending_t *p = pending.lookup(&sk);
    if (p)
        p->rst = 1;
    return 0;
}
#endif

#if HAVE_RETRANSMIT_TP
TRACEPOINT_PROBE(tcp, tcp_retransmit_skb) {
    if (args->state != MEMTOP_TCP_SYN_SENT)
        return 0;
    u64 sk = (u64)args->skaddr;
    struct pending_t *p = pending.lookup(&sk);
    if (p)
        p->syn_retransmits++;
    return 0;
}
#endif

#if HAVE_ERROR_TP
TRACEPOINT_PROBE(sock, inet_sk_error_report) {
    if (args->protocol != MEMTOP_IPPROTO_TCP || args->error == 0)
        return 0;
    int zero = 0;
    struct last_failure_t *lf = last_failure.lookup(&zero);
    if (!lf || !lf->seq)
        return 0;
    u64 now = bpf_ktime_get_ns();
    if (now - lf->ts_ns > ERROR_MATCH_NS) {
        lf->seq = 0;
        return 0;
    }
    if (args->family != lf->family || args->sport != lf->sport || args->dport != lf->dport)
        return 0;
    u8 daddr[16] = {};
    copy_addr(daddr, args->family, args->daddr, args->daddr_v6);
    if (!same_addr(daddr, lf->daddr))
        return 0;
    struct tcp_event *ev = events.ringbuf_reserve(sizeof(struct tcp_event));
    if (!ev) {
        count(CTR_EVENTS_LOST);
        return 0;
    }
    __builtin_memset(ev, 0, sizeof(struct tcp_event));
    ev->ts_ns = now;
    ev->seq = lf->seq;
    ev->error = args->error;
    ev->kind = EV_ERROR;
    events.ringbuf_submit(ev, 0);
    lf->seq = 0;
    return 0;
}
#endif
