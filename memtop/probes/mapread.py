"""Reading a whole BPF hash map each tick, at a cost that stays small with thousands of entries.

BCC's `items_lookup_batch()` allocates arrays for the map's maximum size on every call and builds a
ctypes object per entry; with one entry per process on a busy host that was most of a tick's read.
`BatchReader` reads with BPF_MAP_LOOKUP_BATCH into one chunk buffer allocated once (at most CHUNK_BYTES,
whatever the map's maximum size: a per-CPU map on a many-CPU host, or an address map of millions of
entries, would otherwise take megabytes for every read) and hands back the raw keys and values, which
callers unpack in bulk (`struct.iter_unpack`, `array`).
"""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Callable, Iterable
from typing import Any

CHUNK_BYTES = 1 << 20  # keys and values one BPF_MAP_LOOKUP_BATCH call may return at most


class BatchReader:
    """All (key, value) bytes of one BPF hash map (per-CPU ones too: a value is then every possible
    CPU's copy, each padded to 8 bytes, as BCC lays out its Leaf), read with BPF_MAP_LOOKUP_BATCH in
    chunks of up to `chunk_bytes`.

    `read()` returns (count, keys, values): count * key_size and count * value_size bytes. Raises OSError
    when the kernel refuses the batch command. `lookup` is libbcc's bpf_lookup_batch (tests pass a fake)."""

    def __init__(
        self, table: Any, lookup: Callable[..., int] | None = None, chunk_bytes: int = CHUNK_BYTES
    ) -> None:
        if lookup is None:
            from bcc.libbcc import lib  # the probe layer is the only one importing bcc

            lookup = lib.bpf_lookup_batch
        self._lookup_batch = lookup
        self.fd = table.map_fd
        self.key_size = ctypes.sizeof(table.Key)
        self.value_size = ctypes.sizeof(table.Leaf)
        self.capacity = int(table.max_entries)
        self.chunk = max(1, min(self.capacity, chunk_bytes // (self.key_size + self.value_size)))
        self._keys = ctypes.create_string_buffer(self.key_size * self.chunk)
        self._values = ctypes.create_string_buffer(self.value_size * self.chunk)
        self._in_batch = ctypes.c_uint32(0)  # the kernel's cursor: where the next chunk starts
        self._out_batch = ctypes.c_uint32(0)
        self._count = ctypes.c_uint32(0)

    def read(self) -> tuple[int, bytes, bytes]:
        keys: list[bytes] = []
        values: list[bytes] = []
        total = 0
        while total < self.capacity:
            self._count.value = min(self.chunk, self.capacity - total)
            res = self._lookup_batch(
                self.fd,
                ctypes.pointer(self._in_batch) if total else None,
                ctypes.pointer(self._out_batch),
                self._keys,
                self._values,
                ctypes.pointer(self._count),
            )
            err = ctypes.get_errno()
            got = self._count.value
            if got:
                keys.append(ctypes.string_at(self._keys, got * self.key_size))
                values.append(ctypes.string_at(self._values, got * self.value_size))
                total += got
            if res != 0:
                if err not in (errno.ENOENT, 0) and abs(res) != errno.ENOENT:
                    raise OSError(err or -res, f"BPF_MAP_LOOKUP_BATCH: {os.strerror(err or -res)}")
                break  # ENOENT: the whole map was read
            if got == 0:  # no progress (a bucket grew under us): what was read is kept
                break
            self._in_batch.value = self._out_batch.value
        return total, b"".join(keys), b"".join(values)


ENOTSUPP = 524  # the kernel's own "not supported" (a map type without the batch command)


def _errno_of(res: int) -> int:
    """The error of a failed libbpf call: libbpf returns -errno (older ones -1 and errno)."""
    return -res if res < -1 else ctypes.get_errno()


class BatchDeleter:
    """Deletes many keys of one BPF map in one BPF_MAP_DELETE_BATCH call instead of a bpf() call each
    (pruning thousands of entries a read was most of a leak read's time and of memtop's own kmallocs:
    the kernel copies each call's key into a fresh allocation).

    `delete(keys)` takes raw key bytes and returns the keys that were not there (deleted meanwhile, by
    the kernel or another reader); every other key is gone after it. The kernel stops a batch at the
    first missing key and says how many it deleted before it: the call goes on after that key. Where the
    batch command is refused (a stack trace map has none; kernels before 5.6), it deletes key by key
    with BPF_MAP_DELETE_ELEM from then on. `delete_batch` / `delete_one` are libbcc's bpf_delete_batch
    and bpf_delete_elem (tests pass fakes)."""

    def __init__(
        self,
        table: Any,
        delete_batch: Callable[..., int] | None = None,
        delete_one: Callable[..., int] | None = None,
    ) -> None:
        if delete_batch is None or delete_one is None:
            from bcc.libbcc import lib  # the probe layer is the only one importing bcc

            delete_batch = delete_batch or lib.bpf_delete_batch
            delete_one = delete_one or lib.bpf_delete_elem
        self._delete_batch = delete_batch
        self._delete_one = delete_one
        self.fd = table.map_fd
        self.key_size = ctypes.sizeof(table.Key)
        self.batched = True  # False once the kernel refused the batch command for this map
        self.calls = 0  # bpf() calls made, for tests and the benchmark

    def delete(self, keys: Iterable[bytes]) -> list[bytes]:
        wanted = list(keys)
        if any(len(key) != self.key_size for key in wanted):
            raise ValueError(f"every key must be {self.key_size} bytes")
        missing: list[bytes] = []
        start = 0
        while self.batched and start < len(wanted):
            blob = b"".join(wanted[start:])
            count = ctypes.c_uint32(len(wanted) - start)
            res = self._delete_batch(
                self.fd, ctypes.create_string_buffer(blob, len(blob)), ctypes.pointer(count)
            )
            self.calls += 1
            if res == 0:
                return missing
            err = _errno_of(res)
            done = min(count.value, len(wanted) - start)  # trusted on ENOENT only (refusals leave it)
            if err == errno.ENOENT and done < len(wanted) - start:
                missing.append(wanted[start + done])  # the key it stopped at: go on after it
                start += done + 1
                continue
            self.batched = False  # refused: the rest (all of it) one by one, from now on
        for key in wanted[start:]:
            self.calls += 1
            res = self._delete_one(self.fd, ctypes.create_string_buffer(key, len(key)))
            if res == 0:
                continue
            err = _errno_of(res)
            if err not in (errno.ENOENT, 0):
                raise OSError(err, f"BPF_MAP_DELETE_ELEM: {os.strerror(err)}")
            missing.append(key)
        return missing
