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
from collections.abc import Callable
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
