"""Reading a whole BPF hash map each tick, at a cost that stays small with thousands of entries.

BCC's `items_lookup_batch()` allocates arrays for the map's maximum size on every call and builds a
ctypes object per entry; with one entry per process on a busy host that was most of a tick's read.
`BatchReader` allocates its buffers once and hands back the raw keys and values, which callers unpack
in bulk (`struct.iter_unpack`, `array`).
"""

from __future__ import annotations

import ctypes
import errno
import os
from typing import Any


class BatchReader:
    """All (key, value) bytes of one BPF hash map (per-CPU ones too: a value is then every possible
    CPU's copy, each padded to 8 bytes, as BCC lays out its Leaf), read with BPF_MAP_LOOKUP_BATCH.

    `read()` returns (count, keys, values): memoryviews of count * key_size and count * value_size
    bytes, valid until the next read. Raises OSError when the kernel refuses the batch command."""

    def __init__(self, table: Any) -> None:
        from bcc.libbcc import lib  # the probe layer is the only one importing bcc

        self._lookup_batch = lib.bpf_lookup_batch
        self.fd = table.map_fd
        self.key_size = ctypes.sizeof(table.Key)
        self.value_size = ctypes.sizeof(table.Leaf)
        self.capacity = int(table.max_entries)
        self._keys = ctypes.create_string_buffer(self.key_size * self.capacity)
        self._values = ctypes.create_string_buffer(self.value_size * self.capacity)

    def read(self) -> tuple[int, memoryview, memoryview]:
        out_batch = ctypes.c_uint32(0)
        count = ctypes.c_uint32(0)
        total = 0
        while total < self.capacity:
            count.value = self.capacity - total
            res = self._lookup_batch(
                self.fd,
                ctypes.byref(out_batch) if total else None,
                ctypes.byref(out_batch),
                ctypes.byref(self._keys, self.key_size * total),
                ctypes.byref(self._values, self.value_size * total),
                ctypes.byref(count),
            )
            err = ctypes.get_errno()
            total += count.value
            if res != 0:
                if err not in (errno.ENOENT, 0) and abs(res) != errno.ENOENT:
                    raise OSError(err or -res, f"BPF_MAP_LOOKUP_BATCH: {os.strerror(err or -res)}")
                break  # ENOENT: the whole map was read
            if count.value == 0:  # no progress (a bucket grew under us): what was read is kept
                break
        keys = memoryview(self._keys).cast("B")[: total * self.key_size]
        values = memoryview(self._values).cast("B")[: total * self.value_size]
        return total, keys, values
