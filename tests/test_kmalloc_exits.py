"""The kmalloc probe's `exits` map (main threads that exited, from sched:sched_process_exit) is taken out on
every read: the entries read, and only those, are deleted (an exit recorded in between stays for the next
read); without the batch lookup it is read entry by entry; a failure reads as no exits rather than failing
the probe's read. No BPF: a stand-in table, reader and deleter."""

from __future__ import annotations

import ctypes
import struct
import weakref

import pytest

from memtop.probes.kmalloc import KmallocProbe


class Table:
    """Like a BCC hash table of u32 keys and u8 values."""

    Key = ctypes.c_uint32
    Leaf = ctypes.c_uint8
    map_fd = 42

    def __init__(self, tgids: list[int]) -> None:
        self.data = dict.fromkeys(tgids, 1)

    def items_lookup_batch(self) -> list[tuple[ctypes.c_uint32, ctypes.c_uint8]]:
        raise Exception("BPF_MAP_LOOKUP_BATCH: Invalid argument")  # as BCC raises it on an old kernel

    def items(self) -> list[tuple[ctypes.c_uint32, ctypes.c_uint8]]:
        return [(ctypes.c_uint32(k), ctypes.c_uint8(v)) for k, v in self.data.items()]


class Reader:
    fd = Table.map_fd

    def __init__(self, table: Table, batch: bool = True) -> None:
        self.table, self.batch = table, batch

    def read(self) -> tuple[int, bytes, bytes]:
        if not self.batch:
            raise OSError(22, "BPF_MAP_LOOKUP_BATCH: Invalid argument")
        keys = b"".join(struct.pack("=I", k) for k in self.table.data)
        return len(self.table.data), keys, bytes(self.table.data.values())


class Deleter:
    fd = Table.map_fd

    def __init__(self, table: Table, later: int | None = None) -> None:
        self.table, self.later = table, later

    def delete(self, keys: list[bytes]) -> list[bytes]:
        if self.later is not None:  # an exit recorded between the read and the delete
            self.table.data[self.later] = 1
        for key in keys:
            del self.table.data[struct.unpack("=I", key)[0]]
        return []


def probe_with(table: Table, batch: bool = True, later: int | None = None) -> KmallocProbe:
    probe = KmallocProbe()
    probe.bpf = {b"exits": table}
    probe._exit_tp = True
    probe._readers[b"exits"] = (weakref.ref(table), Reader(table, batch))  # type: ignore[assignment]
    probe._deleters[b"exits"] = (weakref.ref(table), Deleter(table, later))  # type: ignore[assignment]
    return probe


def test_exits_read_are_taken_out_and_a_later_one_stays() -> None:
    table = Table([5, 7])
    assert probe_with(table, later=9)._read_exits() == frozenset({5, 7})
    assert table.data == {9: 1}


def test_exits_are_read_entry_by_entry_without_the_batch_command() -> None:
    table = Table([5, 7])
    assert probe_with(table, batch=False)._read_exits() == frozenset({5, 7})
    assert table.data == {}


def test_a_failing_exits_map_reads_as_no_exits() -> None:
    class Broken(Table):
        def items(self) -> list[tuple[ctypes.c_uint32, ctypes.c_uint8]]:
            raise OSError("gone")

    assert probe_with(Broken([5]), batch=False)._read_exits() == frozenset()


@pytest.mark.parametrize("cpus", [1, 2, 3, 4])
def test_pid_stats_sum_every_cpus_copy(monkeypatch, cpus: int) -> None:  # type: ignore[no-untyped-def]
    """pid_stats is per-CPU: an entry's (calls, bytes_alloc, bytes_req) is the sum of every CPU's copy, for
    any number of CPUs (two take a path of their own, summed column by column)."""
    entries = {(100 + i, i % 2): [(i + c, 64 * (i + c), 60 * (i + c)) for c in range(cpus)] for i in range(5)}
    keys = b"".join(struct.pack("=II", *key) for key in entries)
    values = b"".join(struct.pack("=3Q", *copy) for per_cpu in entries.values() for copy in per_cpu)

    class Leaf(ctypes.Structure):
        _fields_ = [("v", ctypes.c_uint64 * (3 * cpus))]

    class PidStats:
        pass

    PidStats.Leaf = Leaf  # type: ignore[attr-defined]
    probe = KmallocProbe()
    probe.bpf = {b"pid_stats": PidStats}
    monkeypatch.setattr(probe, "_entries", lambda name: (keys, values, len(entries)))
    expected = [
        (key, tuple(sum(copy[f] for copy in per_cpu) for f in range(3))) for key, per_cpu in entries.items()
    ]
    assert probe._read_pid_stats() == expected
    monkeypatch.setattr(probe, "_entries", lambda name: (keys, values[:-8], len(entries)))
    with pytest.raises((ValueError, TypeError, struct.error)):
        probe._read_pid_stats()  # a short buffer is an error, not silently fewer entries
