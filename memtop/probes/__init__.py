"""The probe layer: the only part of memtop that imports bcc.

Each Probe compiles one BPF program from memtop/bpf/, attaches it, reads its maps on the refresh tick
and hands plain Python records upward. Nothing above this layer sees a bcc object.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TracepointUse:
    category: str
    event: str
    required: bool  # False: the feature degrades (a panel or a detail) when it is missing
    why: str


# Every tracepoint memtop attaches to. `memtop doctor` checks each one; a required one that is missing
# stops live mode with a one-line error.
TRACEPOINTS: tuple[TracepointUse, ...] = (
    TracepointUse("kmem", "kmalloc", True, "kmalloc rates per process"),
    TracepointUse(
        "sched",
        "sched_process_exec",
        False,
        "naming and placing short-lived processes after exec (kmalloc, OOM)",
    ),
    TracepointUse(
        "cgroup",
        "cgroup_attach_task",
        False,
        "cgroup v1: placing short-lived processes moved into a container",
    ),
    TracepointUse(
        "task",
        "task_newtask",
        False,
        "a reused PID gets counters of its own; cgroup v1: a new process inherits its parent's memory cgroup",
    ),
    TracepointUse("irq", "softirq_entry", False, "separating softirq allocations into [irq]"),
    TracepointUse("irq", "softirq_exit", False, "separating softirq allocations into [irq]"),
    TracepointUse("irq", "irq_handler_entry", False, "separating hardirq allocations into [irq]"),
    TracepointUse("irq", "irq_handler_exit", False, "separating hardirq allocations into [irq]"),
    TracepointUse("kmem", "kfree", False, "kernel leaks: kmalloc'd objects freed (else no Leaks panel)"),
    TracepointUse("kmem", "kmem_cache_alloc", False, "kernel leaks: slab cache allocations"),
    TracepointUse("kmem", "kmem_cache_free", False, "kernel leaks: slab cache frees"),
    TracepointUse("kmem", "mm_page_alloc", False, "page-level leaks (--leak-pages, off by default)"),
    TracepointUse("kmem", "mm_page_free", False, "page-level leaks: page frees"),
    TracepointUse("kmem", "mm_page_free_batched", False, "page-level leaks: batched page frees"),
    TracepointUse("oom", "mark_victim", False, "the OOM-kill log (without it the OOM panel is off)"),
    TracepointUse("oom", "finish_task_reaping", False, "when the OOM reaper freed a victim's memory"),
    TracepointUse("sched", "sched_process_fork", False, "an OOM victim's cgroup, remembered from its fork"),
    TracepointUse(
        "sched",
        "sched_process_exit",
        False,
        "forgetting exited tasks (keeps the OOM and v1 memory cgroup task maps small)",
    ),
    TracepointUse("cgroup", "cgroup_mkdir", False, "naming an OOM victim's cgroup after it is removed"),
    TracepointUse(
        "sock", "inet_sock_set_state", False, "TCP connect latency (without it the TCP panel is off)"
    ),
    TracepointUse("tcp", "tcp_destroy_sock", False, "forgetting connects whose socket was destroyed"),
    TracepointUse("tcp", "tcp_receive_reset", False, "telling a refused connect from a closed one"),
    TracepointUse("tcp", "tcp_retransmit_skb", False, "counting SYN retransmits of slow connects"),
    TracepointUse(
        "sock", "inet_sk_error_report", False, "why a connect failed (refused, timeout, unreachable)"
    ),
)
