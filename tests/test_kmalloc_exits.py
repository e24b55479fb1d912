"""The kmalloc probe's `exits` map (main threads that exited, from sched:sched_process_exit) is taken out on
every read; the one-by-one fallback for kernels without batch map commands keeps BCC's key objects, and a
failure there reads as no exits rather than failing the probe's read. No BPF: a stand-in table."""

from __future__ import annotations

import ctypes

from memtop.probes.kmalloc import KmallocProbe


class OneByOneTable:
    """Like a BCC hash table of u32 keys on a kernel without BPF_MAP_LOOKUP_AND_DELETE_BATCH."""

    def __init__(self, tgids: list[int]) -> None:
        self.data = dict.fromkeys(tgids, 1)

    def items_lookup_and_delete_batch(self) -> list[tuple[ctypes.c_uint32, int]]:
        raise Exception("BPF_MAP_LOOKUP_AND_DELETE_BATCH: Invalid argument")  # as BCC raises it

    def keys(self) -> list[ctypes.c_uint32]:
        return [ctypes.c_uint32(k) for k in self.data]

    def __delitem__(self, key: ctypes.c_uint32) -> None:
        ctypes.byref(key)  # BCC's __delitem__ takes a ctypes key (an int raised TypeError)
        del self.data[key.value]


class BrokenTable(OneByOneTable):
    def keys(self) -> list[ctypes.c_uint32]:
        raise OSError("gone")


def probe_with(table: OneByOneTable) -> KmallocProbe:
    probe = KmallocProbe()
    probe.bpf = {b"exits": table}  # type: ignore[assignment]
    probe._exit_tp = True
    return probe


def test_exits_are_taken_out_one_by_one_without_the_batch_command() -> None:
    table = OneByOneTable([5, 7])
    assert probe_with(table)._read_exits() == frozenset({5, 7})
    assert table.data == {}


def test_a_failing_exits_map_reads_as_no_exits() -> None:
    assert probe_with(BrokenTable([5]))._read_exits() == frozenset()
