"""A small reader of the ELF facts the user leak probe needs: which functions an object defines (its dynamic
symbol table, or the full one of a static executable), its DT_NEEDED and DT_SONAME, and the symbols with
their sizes for naming stack frames.

64-bit little-endian ELF only (x86-64, arm64): anything else raises ElfError. Files are read through
whatever path is given, typically /proc/PID/map_files/<range>, so a container's own copy is what is read.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass, field

ET_EXEC = 2
PT_LOAD, PT_DYNAMIC, PT_INTERP = 1, 2, 3
SHT_SYMTAB, SHT_DYNSYM, SHT_GNU_VERSYM = 2, 11, 0x6FFFFFFF
SHN_UNDEF = 0
STB_GLOBAL, STB_WEAK = 1, 2
STT_FUNC, STT_GNU_IFUNC = 2, 10
DT_NULL, DT_NEEDED, DT_STRTAB, DT_SONAME = 0, 1, 5, 14
VERSYM_HIDDEN = 0x8000

_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
_PHDR = struct.Struct("<IIQQQQQQ")
_SHDR = struct.Struct("<IIQQQQIIQQ")
_SYM = struct.Struct("<IBBHQQ")
_DYN = struct.Struct("<qQ")


class ElfError(Exception):
    """Not a file this reader understands (not ELF, not 64-bit little-endian, truncated)."""


@dataclass(frozen=True)
class Symbol:
    name: str
    value: int  # virtual address in the file's own address space
    size: int  # 0: unknown


@dataclass
class ElfInfo:
    """What was read of one ELF file."""

    is_exec: bool  # ET_EXEC: absolute addresses (a non-PIE executable)
    is_static: bool  # no PT_INTERP and no PT_DYNAMIC: nothing is resolved at load time
    needed: tuple[str, ...]  # DT_NEEDED, in order
    soname: str  # DT_SONAME ("" if none)
    exports: dict[str, Symbol]  # functions it defines for others: .dynsym, or .symtab when static
    loads: tuple[tuple[int, int, int], ...]  # PT_LOAD (file offset, virtual address, file size)
    symbols: list[Symbol] = field(default_factory=list)  # every function symbol, sorted by value

    def vaddr(self, file_offset: int) -> int | None:
        """The virtual address (in the file's own terms) of a byte at `file_offset`, None if not loaded."""
        for offset, vaddr, size in self.loads:
            if offset <= file_offset < offset + size:
                return vaddr + file_offset - offset
        return None


def _cstr(data: bytes | mmap.mmap, start: int) -> str:
    end = data.find(b"\0", start)
    return bytes(data[start : end if end >= 0 else len(data)]).decode("utf-8", "replace")


def read_elf(path: str, symbols: bool = False) -> ElfInfo:
    """Parse `path`; with `symbols`, also every function symbol with its size (for naming frames; a big
    .symtab takes a while). Raises ElfError (or OSError when it cannot be opened)."""
    with open(path, "rb") as f:
        try:
            data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError:  # empty file
            raise ElfError("empty file") from None
    try:
        return _parse(data, symbols)
    except (struct.error, IndexError) as exc:
        raise ElfError(f"truncated or malformed ELF: {exc}") from None
    finally:
        data.close()


def _parse(data: mmap.mmap, want_symbols: bool) -> ElfInfo:
    if len(data) < _EHDR.size or data[:4] != b"\x7fELF":
        raise ElfError("not an ELF file")
    if data[4] != 2 or data[5] != 1:
        raise ElfError("not a 64-bit little-endian ELF file")
    (_, e_type, _, _, _, e_phoff, e_shoff, _, _, e_phentsize, e_phnum, e_shentsize, e_shnum, _) = (
        _EHDR.unpack_from(data, 0)
    )
    loads = []
    has_interp = has_dynamic = False
    for i in range(e_phnum):
        p_type, _, p_offset, p_vaddr, _, p_filesz, _, _ = _PHDR.unpack_from(data, e_phoff + i * e_phentsize)
        if p_type == PT_LOAD:
            loads.append((p_offset, p_vaddr, p_filesz))
        elif p_type == PT_INTERP:
            has_interp = True
        elif p_type == PT_DYNAMIC:
            has_dynamic = True
    sections = [_SHDR.unpack_from(data, e_shoff + i * e_shentsize) for i in range(e_shnum)] if e_shoff else []

    def table(kind: int) -> tuple[int, list[Symbol], list[tuple[int, Symbol]]]:
        """(index of the section, function symbols, [(symbol index, defined global function)])."""
        for index, (_, sh_type, _, _, sh_offset, sh_size, sh_link, _, _, sh_entsize) in enumerate(sections):
            if sh_type != kind or not sh_entsize:
                continue
            strtab_offset = sections[sh_link][4]
            functions: list[Symbol] = []
            exported: list[tuple[int, Symbol]] = []
            for n in range(sh_size // sh_entsize):
                st_name, st_info, _, st_shndx, st_value, st_size = _SYM.unpack_from(
                    data, sh_offset + n * sh_entsize
                )
                if st_info & 0xF not in (STT_FUNC, STT_GNU_IFUNC) or st_shndx == SHN_UNDEF or not st_value:
                    continue
                symbol = Symbol(_cstr(data, strtab_offset + st_name), st_value, st_size)
                functions.append(symbol)
                if st_info >> 4 in (STB_GLOBAL, STB_WEAK) and st_info & 0xF == STT_FUNC:
                    exported.append((n, symbol))
            return index, functions, exported
        return -1, [], []

    is_static = not has_interp and not has_dynamic
    dyn_index, dyn_functions, dyn_exported = table(SHT_DYNSYM)
    all_functions: list[Symbol] = []
    static_exported: list[tuple[int, Symbol]] = []
    if want_symbols or is_static:
        _, all_functions, static_exported = table(SHT_SYMTAB)
    hidden: set[int] = set()
    for _, sh_type, _, _, sh_offset, sh_size, sh_link, _, _, _ in sections:
        if sh_type == SHT_GNU_VERSYM and sh_link == dyn_index:
            for n in range(sh_size // 2):
                if struct.unpack_from("<H", data, sh_offset + 2 * n)[0] & VERSYM_HIDDEN:
                    hidden.add(n)
    exports: dict[str, Symbol] = {}
    for n, symbol in static_exported if is_static else dyn_exported:
        if (is_static or n not in hidden) and symbol.name not in exports:
            exports[symbol.name] = symbol
    needed, soname = _dynamic(data, sections)
    symbols: list[Symbol] = []
    if want_symbols:
        unique = {(s.value, s.size, s.name): s for s in all_functions + dyn_functions}
        symbols = sorted(unique.values(), key=lambda s: (s.value, -s.size))
    return ElfInfo(
        is_exec=e_type == ET_EXEC,
        is_static=is_static,
        needed=needed,
        soname=soname,
        exports=exports,
        loads=tuple(loads),
        symbols=symbols,
    )


SHT_DYNAMIC = 6


def _dynamic(data: mmap.mmap, sections: list[tuple[int, ...]]) -> tuple[tuple[str, ...], str]:
    for _, sh_type, _, _, sh_offset, sh_size, sh_link, _, _, _ in sections:
        if sh_type != SHT_DYNAMIC:
            continue
        strtab_offset = sections[sh_link][4]
        needed: list[str] = []
        soname = ""
        for n in range(sh_size // _DYN.size):
            tag, value = _DYN.unpack_from(data, sh_offset + n * _DYN.size)
            if tag == DT_NULL:
                break
            if tag == DT_NEEDED:
                needed.append(_cstr(data, strtab_offset + value))
            elif tag == DT_SONAME:
                soname = _cstr(data, strtab_offset + value)
        return tuple(needed), soname
    return (), ""
