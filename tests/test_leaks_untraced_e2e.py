"""End-to-end: frees that fire no tracepoint (kmem_cache_free_bulk, the NAPI skb cache, kfree_rcu batches)
must not make phantom leaks. A loopback UDP flood allocates socket buffers from skbuff_head_cache and the
kernel frees many of them in bulk, untraced; once the flood stops, what memtop holds outstanding in that
cache is at most what the kernel says is live there."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest

from memtop.probes.leaks import read_slabinfo, slab_active_objects

from .test_leaks_e2e import STACKS

pytestmark = pytest.mark.bpf

CACHE = "skbuff_head_cache"
FLOOD_S = 8.0


def udp_flood(seconds: float) -> int:
    """Datagrams sent to a loopback receiver of the test's own, which reads them all; returns the count."""
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.bind(("127.0.0.1", 0))
    receiver.settimeout(0.2)
    stop = threading.Event()

    def drain() -> None:
        while not stop.is_set():
            try:
                receiver.recv(2048)
            except TimeoutError:
                continue

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    address = receiver.getsockname()
    payload = b"x" * 64
    sent = 0
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            for _ in range(256):
                try:
                    sender.sendto(payload, address)
                    sent += 1
                except OSError:  # the receive buffer is full: the next ones go through
                    pass
    finally:
        stop.set()
        reader.join(timeout=5)
        sender.close()
        receiver.close()
    return sent


# A cap on what the test lets reconcile() believe the cache holds. Whether the flood's untraced frees ever
# push the tracked count over the real live count depends on the machine (the addresses the NAPI cache hands
# out again are released as missed frees first: seen here at 280-350 tracked against 430-510 live). Under
# this cap they always do, so the retiring itself is exercised on every run; the real count is checked too.
CAPPED_LIVE = 64
SLACK = 32  # allocations the host makes between the last read and the check


def test_a_udp_flood_leaves_no_more_outstanding_skbs_than_the_cache_holds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from memtop.probes import leaks
    from memtop.probes.leaks import KernelLeakProbe

    if CACHE not in slab_active_objects():
        pytest.fail(f"/proc/slabinfo has no {CACHE}")

    def capped(path: Path = leaks.SLABINFO) -> dict[str, tuple[int, int]]:
        slabinfo = read_slabinfo(path)
        active, size = slabinfo[CACHE]
        slabinfo[CACHE] = (min(active, CAPPED_LIVE), size)
        return slabinfo

    probe = KernelLeakProbe(sample_every=1, max_stacks=STACKS, max_allocs=1 << 20)
    probe.start()
    try:
        probe.read()
        flood = threading.Thread(target=udp_flood, args=(FLOOD_S,))
        flood.start()
        while flood.is_alive():
            time.sleep(1.0)
            probe.read()
        flood.join()
        time.sleep(0.5)
        probe.read()
        outstanding = probe.outstanding_by_cache()
        live = slab_active_objects()[CACHE]
        with monkeypatch.context() as patched:
            patched.setattr(leaks, "read_slabinfo", capped)
            probe.read()
            probe.read()
            capped_reading = probe.read()
            capped_outstanding = probe.outstanding_by_cache()
    finally:
        probe.close()
    assert 0 <= outstanding.get(CACHE, 0) <= live, (outstanding.get(CACHE), live)  # the right value
    untraced = capped_reading.drops.get(f"freed_untraced:{CACHE}", 0)
    assert untraced > 0, capped_reading.drops
    assert capped_reading.drops["freed_untraced"] >= untraced
    assert 0 <= capped_outstanding.get(CACHE, 0) <= CAPPED_LIVE + SLACK, capped_outstanding
