"""memtop: a top-like view of kernel memory allocations, fed by eBPF tracepoints."""

__version__ = "0.1.0"
