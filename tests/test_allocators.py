"""Unit tests of memtop.probes.elf and memtop.probes.allocators: which object provides each allocator entry
point, in the dynamic linker's lookup order, by the symbols it defines (never by its file name)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from memtop.probes import allocators
from memtop.probes.allocators import LinkMap, MappedObject, map_file, not_followed_reason, resolve
from memtop.probes.elf import ElfError, ElfInfo, Symbol, read_elf


def info(exports: tuple[str, ...] = (), needed: tuple[str, ...] = (), soname: str = "") -> ElfInfo:
    return ElfInfo(
        is_exec=False,
        is_static=False,
        needed=needed,
        soname=soname,
        exports={name: Symbol(name, 0x1000 + 16 * i, 16) for i, name in enumerate(exports)},
        loads=((0, 0, 1 << 20),),
    )


def obj(path: str) -> MappedObject:
    return MappedObject(path, f"/proc/1/map_files/{path.strip('/').replace('/', '_')}")


def fake_link_map(
    monkeypatch: pytest.MonkeyPatch, objects: dict[str, ElfInfo], exe: str, preload: list[str] | None = None
) -> None:
    mapped = [obj(path) for path in objects]

    def init(self: LinkMap, pid: int) -> None:
        self.pid = pid
        self.objects = mapped
        self._elf = {}
        self.exe = exe

    monkeypatch.setattr(LinkMap, "__init__", init)
    monkeypatch.setattr(LinkMap, "elf", lambda self, o: objects[o.path])
    monkeypatch.setattr(allocators, "_preloads", lambda pid: preload or [])


LIBC = info(("malloc", "free", "calloc", "realloc", "mmap", "munmap", "mremap"), soname="libc.so.6")
STDCXX = info(("_Znwm", "_ZdlPv", "_Znam", "_ZdaPv"), needed=("libc.so.6",), soname="libstdc++.so.6")
# A malloc replacement with a misleading file name: the symbols decide, not the name.
ALLOCATOR = info(
    ("malloc", "free", "calloc", "realloc", "_Znwm", "_ZdlPv"), needed=("libc.so.6",), soname="libx.so"
)


def test_lookup_order_is_executable_preload_then_needed_breadth_first(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    objects = {
        "/usr/lib/libc.so.6": LIBC,  # mapped first (lowest address), found last by needed
        "/app/bin/app": info(needed=("libstdc++.so.6", "libx.so")),
        "/usr/lib/libstdc++.so.6.0.30": STDCXX,
        "/opt/lib/libx.so.1.2": ALLOCATOR,
        "/opt/lib/libpre.so": info(("free",)),
        "/opt/lib/plugin.so": info(("malloc",)),  # dlopen'ed: after the global scope
    }
    fake_link_map(monkeypatch, objects, "/app/bin/app", preload=["/opt/lib/libpre.so"])
    order = [o.path for o in LinkMap(1).order()]
    assert order == [
        "/app/bin/app",
        "/opt/lib/libpre.so",
        "/usr/lib/libstdc++.so.6.0.30",
        "/opt/lib/libx.so.1.2",
        "/usr/lib/libc.so.6",
        "/opt/lib/plugin.so",
    ]
    resolution = resolve(1)
    providers = {name: found[0].path for name, found in resolution.providers.items()}
    assert providers["free"] == "/opt/lib/libpre.so"  # LD_PRELOAD wins
    assert providers["malloc"] == "/opt/lib/libx.so.1.2"  # before libc in the needed order
    assert providers["mmap"] == "/usr/lib/libc.so.6"
    # libstdc++ comes first for operator new but exports no malloc: its new calls malloc, hooked already.
    assert providers["_Znwm"] == "/usr/lib/libstdc++.so.6.0.30"
    assert "_Znwm" not in {h.symbol for h in resolution.hooks} and "_Znwm" in resolution.skipped
    assert not_followed_reason(1, resolution) is None


def test_an_allocators_own_operator_new_is_hooked(monkeypatch: pytest.MonkeyPatch) -> None:
    objects = {
        "/app/bin/app": info(needed=("libx.so", "libstdc++.so.6")),
        "/opt/lib/libx.so.1.2": ALLOCATOR,
        "/usr/lib/libstdc++.so.6.0.30": STDCXX,
        "/usr/lib/libc.so.6": LIBC,
    }
    fake_link_map(monkeypatch, objects, "/app/bin/app")
    hooks = {h.symbol: h.obj.path for h in resolve(1).hooks}
    assert hooks["_Znwm"] == hooks["malloc"] == "/opt/lib/libx.so.1.2"
    assert "_Znam" not in hooks  # libstdc++'s new[] calls new (the allocator's), which is hooked


def test_aliases_are_hooked_once(monkeypatch: pytest.MonkeyPatch) -> None:
    libc = info(("malloc", "free", "memalign"))
    libc.exports["aligned_alloc"] = Symbol("aligned_alloc", libc.exports["memalign"].value, 16)
    fake_link_map(monkeypatch, {"/app": info(needed=("libc.so.6",)), "/libc.so.6": libc}, "/app")
    symbols = [h.symbol for h in resolve(1).hooks]
    assert "aligned_alloc" in symbols and "memalign" not in symbols


def test_no_malloc_anywhere_is_said_not_followed(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_link_map(monkeypatch, {"/app/bin/gosvc": info()}, "/app/bin/gosvc")
    reason = not_followed_reason(7, resolve(7))
    assert reason is not None and "not followed" in reason and "malloc" in reason and "\n" not in reason


def test_map_file_names_have_no_padding() -> None:
    assert map_file(5, "00400000-00452000") == "/proc/5/map_files/400000-452000"


# -- the ELF reader on real files ------------------------------------------------------------------------


def test_read_elf_exports_only_defined_functions(tmp_path: Path) -> None:
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc not installed")
    source = tmp_path / "lib.c"
    source.write_text(
        "#include <stdlib.h>\n"
        "void *my_alloc(size_t n) { return malloc(n); }\n"  # malloc: referenced, not defined
        "static int hidden(int x) { return x + 1; }\n"
        "int use_hidden(int x) { return hidden(x); }\n"
    )
    lib = tmp_path / "libt.so"
    subprocess.run(
        [gcc, "-shared", "-fPIC", "-Wl,-soname,libt.so.1", "-o", str(lib), str(source)], check=True
    )
    elf = read_elf(str(lib), symbols=True)
    assert "my_alloc" in elf.exports and "use_hidden" in elf.exports
    assert "malloc" not in elf.exports  # undefined (st_shndx 0) in this object
    assert "hidden" not in elf.exports  # local
    assert elf.soname == "libt.so.1" and "libc.so.6" in elf.needed
    assert not elf.is_static
    my_alloc = elf.exports["my_alloc"]
    assert my_alloc.size > 0
    assert elf.vaddr(my_alloc.value) is not None


def test_read_elf_refuses_what_is_not_elf(tmp_path: Path) -> None:
    bogus = tmp_path / "x"
    bogus.write_bytes(b"#!/bin/sh\necho hi\n" * 10)
    with pytest.raises(ElfError):
        read_elf(str(bogus))
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    with pytest.raises(ElfError):
        read_elf(str(empty))
