"""BatchReader reads a whole map in chunks of at most its chunk size, through the kernel's cursor, and returns
every entry once, in order, whatever the map's maximum size. No BPF: a stand-in for bpf_lookup_batch with
the kernel's semantics (entries up to *count, *count set to how many, ENOENT with the last ones)."""

from __future__ import annotations

import ctypes
import errno
import struct
from typing import Any

import pytest

from memtop.probes.mapread import BatchDeleter, BatchReader

KEY = struct.Struct("=II")
VALUE = struct.Struct("=QQQ")


class Key(ctypes.Structure):
    _fields_ = [("tgid", ctypes.c_uint32), ("gen", ctypes.c_uint32)]


class Leaf(ctypes.Structure):
    _fields_ = [("a", ctypes.c_uint64), ("b", ctypes.c_uint64), ("c", ctypes.c_uint64)]


class Table:
    Key = Key
    Leaf = Leaf

    def __init__(self, entries: int, max_entries: int) -> None:
        self.map_fd = 99
        self.max_entries = max_entries
        self.entries = [(KEY.pack(i, i % 3), VALUE.pack(i, 2 * i, 3 * i)) for i in range(entries)]
        self.calls: list[int] = []  # the count asked for, per call

    def lookup_batch(self, fd: int, in_batch: Any, out_batch: Any, keys: Any, values: Any, count: Any) -> int:
        assert fd == self.map_fd
        start = in_batch.contents.value if in_batch is not None else 0
        asked = count.contents.value
        self.calls.append(asked)
        chunk = self.entries[start : start + asked]
        for i, (key, value) in enumerate(chunk):
            ctypes.memmove(ctypes.addressof(keys) + i * KEY.size, key, KEY.size)
            ctypes.memmove(ctypes.addressof(values) + i * VALUE.size, value, VALUE.size)
        count.contents.value = len(chunk)
        out_batch.contents.value = start + len(chunk)
        if start + len(chunk) >= len(self.entries):
            ctypes.set_errno(errno.ENOENT)
            return -1
        ctypes.set_errno(0)
        return 0


@pytest.mark.parametrize(
    ("entries", "max_entries", "chunk_entries"),
    [(0, 100, 10), (7, 100, 10), (10, 100, 10), (25, 100, 10), (100, 100, 10), (5, 5, 1000)],
)
def test_reads_every_entry_once_in_chunks(entries: int, max_entries: int, chunk_entries: int) -> None:
    table = Table(entries, max_entries)
    chunk_bytes = chunk_entries * (KEY.size + VALUE.size)
    reader = BatchReader(table, lookup=table.lookup_batch, chunk_bytes=chunk_bytes)
    count, keys, values = reader.read()
    assert count == entries
    assert keys == b"".join(k for k, _ in table.entries)
    assert values == b"".join(v for _, v in table.entries)
    assert max(table.calls) <= min(chunk_entries, max_entries)  # never more than the chunk buffer holds
    count_again, keys_again, _ = reader.read()  # the reader starts over from the map's first entry
    assert (count_again, keys_again) == (count, keys)


def test_the_chunk_buffer_does_not_grow_with_the_map_size() -> None:
    table = Table(3, 1 << 22)
    reader = BatchReader(table, lookup=table.lookup_batch, chunk_bytes=1 << 16)
    assert reader.chunk == (1 << 16) // (KEY.size + VALUE.size)
    assert reader.read()[0] == 3


def test_a_refused_batch_command_raises_oserror() -> None:
    def refuse(*_args: Any) -> int:
        ctypes.set_errno(errno.EINVAL)
        return -1

    reader = BatchReader(Table(3, 10), lookup=refuse)
    with pytest.raises(OSError, match="BPF_MAP_LOOKUP_BATCH"):
        reader.read()


# -- BatchDeleter: a stand-in for the kernel's generic_map_delete_batch (deletes keys in order, stops at the
# first one not there with ENOENT and *count = how many it deleted; a map type without the command refuses
# it with ENOTSUPP and leaves *count alone) and for BPF_MAP_DELETE_ELEM.

ENOTSUPP = 524


class DeleteMap:
    def __init__(self, present: set[int], batch: bool = True) -> None:
        self.map_fd = 7
        self.Key = Key
        self.present = {KEY.pack(i, 0) for i in present}
        self.batch = batch
        self.batch_calls = 0
        self.single_calls = 0

    def delete_batch(self, fd: int, keys: Any, count: Any) -> int:
        assert fd == self.map_fd
        self.batch_calls += 1
        if not self.batch:
            return -ENOTSUPP
        raw = ctypes.string_at(keys, count.contents.value * KEY.size)
        for done in range(count.contents.value):
            key = raw[done * KEY.size : (done + 1) * KEY.size]
            if key not in self.present:
                count.contents.value = done
                return -errno.ENOENT
            self.present.discard(key)
        return 0

    def delete_one(self, fd: int, key: Any) -> int:
        self.single_calls += 1
        raw = ctypes.string_at(key, KEY.size)
        if raw not in self.present:
            return -errno.ENOENT
        self.present.discard(raw)
        return 0


def _deleter(table: DeleteMap) -> BatchDeleter:
    return BatchDeleter(table, delete_batch=table.delete_batch, delete_one=table.delete_one)


@pytest.mark.parametrize(
    ("asked", "absent"),
    [
        ([], []),
        ([1, 2, 3], []),
        ([1, 50, 2], [50]),
        ([50, 1], [50]),
        ([1, 2, 50], [50]),
        ([50, 51, 3], [50, 51]),
    ],
)
def test_deletes_in_one_call_and_skips_keys_not_there(asked: list[int], absent: list[int]) -> None:
    table = DeleteMap(set(range(10)))
    deleter = _deleter(table)
    missing = deleter.delete([KEY.pack(i, 0) for i in asked])
    assert missing == [KEY.pack(i, 0) for i in absent]
    assert table.present == {KEY.pack(i, 0) for i in range(10) if i not in asked}
    # One call, and one more after each key that was not there unless it was the last.
    stops = sum(1 for i in absent if asked.index(i) != len(asked) - 1)
    assert table.batch_calls == (1 + stops if asked else 0)
    assert table.single_calls == 0


def test_a_map_without_batch_delete_is_deleted_key_by_key_from_then_on() -> None:
    table = DeleteMap(set(range(10)), batch=False)
    deleter = _deleter(table)
    assert deleter.delete([KEY.pack(i, 0) for i in (1, 50, 2)]) == [KEY.pack(50, 0)]
    assert table.present == {KEY.pack(i, 0) for i in range(10) if i not in (1, 2)}
    assert (table.batch_calls, table.single_calls, deleter.batched) == (1, 3, False)
    deleter.delete([KEY.pack(3, 0)])
    assert (table.batch_calls, table.single_calls) == (1, 4)  # not asked again


def test_keys_of_the_wrong_size_are_refused() -> None:
    deleter = _deleter(DeleteMap(set()))
    with pytest.raises(ValueError, match="8 bytes"):
        deleter.delete([b"\0" * 4])


def test_other_errors_of_a_single_delete_are_raised() -> None:
    table = DeleteMap(set(), batch=False)
    deleter = BatchDeleter(table, delete_batch=table.delete_batch, delete_one=lambda fd, key: -errno.EACCES)
    with pytest.raises(OSError, match="BPF_MAP_DELETE_ELEM"):
        deleter.delete([KEY.pack(1, 0)])


def test_a_key_the_batch_could_not_delete_is_retried_alone_and_the_others_stay_deleted() -> None:
    """EBUSY (a bucket lock held) at one key: the keys before it are gone (the kernel wrote the count), the
    rest go one by one, and none of them is reported missing; the next call batches again."""

    class Busy(DeleteMap):
        def delete_batch(self, fd: int, keys: Any, count: Any) -> int:
            self.batch_calls += 1
            raw = ctypes.string_at(keys, count.contents.value * KEY.size)
            for done in range(count.contents.value):
                key = raw[done * KEY.size : (done + 1) * KEY.size]
                if key == KEY.pack(2, 0):
                    count.contents.value = done
                    return -errno.EBUSY
                self.present.discard(key)
            return 0

    table = Busy(set(range(10)))
    deleter = _deleter(table)
    assert deleter.delete([KEY.pack(i, 0) for i in (1, 2, 3)]) == []
    assert table.present == {KEY.pack(i, 0) for i in range(10) if i not in (1, 2, 3)}
    assert (table.batch_calls, table.single_calls, deleter.batched) == (1, 2, True)


def test_without_the_batch_function_it_deletes_key_by_key() -> None:
    table = DeleteMap({1, 2})
    deleter = BatchDeleter(table, delete_batch=None, delete_one=table.delete_one)
    assert deleter.delete([KEY.pack(1, 0), KEY.pack(3, 0)]) == [KEY.pack(3, 0)]
    assert table.present == {KEY.pack(2, 0)} and table.single_calls == 2


def test_a_probe_keeps_one_reader_per_table_and_remembers_a_refusal(monkeypatch: pytest.MonkeyPatch) -> None:
    """The reader (and its chunk buffer) is made once per table object: again for another object (a restarted
    or adopted probe), and a map whose batch lookup was refused is not asked again."""
    import memtop.probes.base as base

    made: list[Any] = []

    class FakeReader:
        def __init__(self, table: Any) -> None:
            made.append(table)
            self.table = table

        def read(self) -> tuple[int, bytes, bytes]:
            if self.table.refuse:
                raise OSError(errno.EINVAL, "BPF_MAP_LOOKUP_BATCH: Invalid argument")
            return 1, KEY.pack(1, 0), VALUE.pack(1, 2, 3)

    class T(Table):
        refuse = False

    monkeypatch.setattr(base, "BatchReader", FakeReader)
    probe = base.Probe()
    first, second = T(1, 10), T(1, 10)
    probe.bpf = {b"m": first}
    assert probe._entries(b"m") == (KEY.pack(1, 0), VALUE.pack(1, 2, 3), 1)
    probe._entries(b"m")
    assert made == [first]
    probe.bpf = {b"m": second}
    second.refuse = True
    with pytest.raises(OSError):
        probe._entries(b"m")
    second.refuse = False  # not asked again: it raises without a read
    with pytest.raises(OSError, match="no batch lookup"):
        probe._entries(b"m")
    assert made == [first, second]
