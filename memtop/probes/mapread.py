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


def _errno_of(res: int) -> int:
    """The error of a failed libbpf call: libbpf returns -errno (older ones -1 and errno); never 0."""
    return (ctypes.get_errno() if res == -1 else -res) or errno.EIO


class BatchDeleter:
    """Deletes many keys of one BPF map in one BPF_MAP_DELETE_BATCH call instead of a bpf() call each
    (pruning thousands of entries a read was most of a leak read's time and of memtop's own kmallocs:
    the kernel copies each call's key into a fresh allocation).

    `delete(keys)` takes raw key bytes and returns the keys that were not there (deleted meanwhile, by
    the kernel or another reader); every other key is gone after it. The kernel stops a batch at the
    first missing key and says how many it deleted before it: the call goes on after that key. Where the
    batch command is refused (a stack trace map has none; kernels before 5.6; a BCC without the
    function), it deletes key by key with BPF_MAP_DELETE_ELEM from then on. A key the kernel could not
    delete for another reason (EBUSY, say) raises OSError, after the keys before it were deleted.
    `delete_batch` / `delete_one` are libbcc's bpf_delete_batch and bpf_delete_elem (tests pass fakes).

    The kernel's count: generic_map_delete_batch writes how many keys it deleted whenever it ran (on
    any error, the key at that index is the one that failed); a refusal (ENOTSUPP, EINVAL) does not
    write it, and libbpf then hands back the count asked for: so a count short of the keys asked means
    the kernel ran, and one equal to them with an error means it refused."""

    def __init__(
        self,
        table: Any,
        delete_batch: Callable[..., int] | None | str = "libbcc",
        delete_one: Callable[..., int] | str = "libbcc",
    ) -> None:
        if delete_batch == "libbcc" or delete_one == "libbcc":
            from bcc.libbcc import lib  # the probe layer is the only one importing bcc

            if delete_batch == "libbcc":
                delete_batch = getattr(lib, "bpf_delete_batch", None)  # None: an older BCC
            if delete_one == "libbcc":
                delete_one = lib.bpf_delete_elem
        assert not isinstance(delete_batch, str) and not isinstance(delete_one, str)
        self._delete_batch = delete_batch
        self._delete_one = delete_one
        self.fd = table.map_fd
        self.key_size = ctypes.sizeof(table.Key)
        self.batched = delete_batch is not None  # False once the batch command was refused for this map
        self.calls = 0  # bpf() calls made, for tests and the benchmark

    def delete(self, keys: Iterable[bytes]) -> list[bytes]:
        wanted = list(keys)
        if any(len(key) != self.key_size for key in wanted):
            raise ValueError(f"every key must be {self.key_size} bytes")
        missing: list[bytes] = []
        start = 0
        while self.batched and start < len(wanted):
            left = len(wanted) - start
            blob = b"".join(wanted[start:])
            count = ctypes.c_uint32(left)
            assert self._delete_batch is not None
            res = self._delete_batch(
                self.fd, ctypes.create_string_buffer(blob, len(blob)), ctypes.pointer(count)
            )
            self.calls += 1
            if res == 0:
                return missing
            done = count.value
            if done >= left:  # refused, nothing deleted: key by key, from now on
                self.batched = False
                break
            start += done  # the kernel ran: those before the failing key are gone
            if _errno_of(res) != errno.ENOENT:
                break  # that key failed otherwise: key by key below, which says why
            missing.append(wanted[start])  # not there: go on after it
            start += 1
        for key in wanted[start:]:
            self.calls += 1
            res = self._delete_one(self.fd, ctypes.create_string_buffer(key, len(key)))
            if res == 0:
                continue
            err = _errno_of(res)
            if err != errno.ENOENT:
                raise OSError(err, f"BPF_MAP_DELETE_ELEM: {os.strerror(err)}")
            missing.append(key)
        return missing
