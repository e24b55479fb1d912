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
    TracepointUse("sched", "sched_process_exec", False, "naming short-lived processes after exec"),
    TracepointUse("irq", "softirq_entry", False, "separating softirq allocations into [irq]"),
    TracepointUse("irq", "softirq_exit", False, "separating softirq allocations into [irq]"),
    TracepointUse("irq", "irq_handler_entry", False, "separating hardirq allocations into [irq]"),
    TracepointUse("irq", "irq_handler_exit", False, "separating hardirq allocations into [irq]"),
)
