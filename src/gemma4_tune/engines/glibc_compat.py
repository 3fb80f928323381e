"""Let llama.cpp libraries built against glibc 2.38 load on an older glibc (Debian 12 has 2.36).

Why: the llama.cpp runtime we use (``llama-cpp-py-sync``, prebuilt ``libllama.so`` and
``libggml-*.so``) is compiled on a glibc >= 2.38 system. With C23 defaults, glibc 2.38 headers
redirect ``strtol``/``strtoul``/``strtoll``/``strtoull``/``sscanf`` (and friends) to new
``__isoc23_*`` entry points, versioned ``GLIBC_2.38``. Those are the *only* 2.38 symbols the
libraries import; on glibc 2.36 the loader refuses them (``version `GLIBC_2.38' not found``).
The ``__isoc23_`` variants differ from the classic functions only in accepting C23 syntax
(``0b`` binary prefixes, ``%b``) that llama.cpp never parses, so binding the classic ones is safe.

How (pure Python, no patchelf): in ``.dynsym`` each ``__isoc23_X`` import gets its name offset
moved 9 bytes forward, so it names the ``X`` already sitting in the same ``.dynstr`` string
(tail of ``"__isoc23_X\\0"``; nothing in ``.dynstr`` is rewritten, so shared suffixes stay
valid). The ``GLIBC_2.38`` entry of ``.gnu.version_r`` is then rewritten to name the oldest
glibc version the library already needs from ``libc.so.6`` (``GLIBC_2.2.5`` on x86-64, with its
``vna_hash`` and ``vna_name``), so the version index those symbols carry resolves to the classic
functions. The patch refuses (``ElfPatchError``) when a 2.38 import is not an ``__isoc23_*``
symbol. It is idempotent and applied only when the running glibc is older than 2.38
(``os.confstr('CS_GNU_LIBC_VERSION')``). :func:`glibc_versions_needed` tells whether a library
still needs a version; a test keeps asserting that the *unpatched* upstream library needs 2.38,
so the patch is dropped once upstream ships libraries built for an older glibc.
"""

from __future__ import annotations

import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

ISOC23_PREFIX = b"__isoc23_"
TARGET_VERSION = (2, 38)

_SHT_DYNSYM = 11
_SHT_GNU_VERNEED = 0x6FFFFFFE
_SHT_GNU_VERSYM = 0x6FFFFFFF


class ElfPatchError(RuntimeError):
    """The library is not one this patch understands; nothing was written."""


def libc_version() -> tuple[int, ...] | None:
    """The running glibc's version, e.g. ``(2, 36)``; None on another C library."""
    try:
        value = os.confstr("CS_GNU_LIBC_VERSION") or ""
    except (ValueError, OSError, AttributeError):
        return None
    m = re.match(r"glibc (\d+(?:\.\d+)*)", value)
    return tuple(int(p) for p in m.group(1).split(".")) if m else None


def libc_version_text() -> str | None:
    """The running glibc's version as text (``"2.36"``), None on another C library."""
    version = libc_version()
    return ".".join(map(str, version)) if version else None


def patch_needed() -> bool:
    """True when the running glibc is older than 2.38 (the patch is for those systems only)."""
    version = libc_version()
    return version is not None and version < TARGET_VERSION


def _parse_version(name: str) -> tuple[int, ...] | None:
    m = re.fullmatch(r"GLIBC_(\d+(?:\.\d+)*)", name)
    return tuple(int(p) for p in m.group(1).split(".")) if m else None


def _elf_hash(name: bytes) -> int:
    h = 0
    for c in name:
        h = ((h << 4) + c) & 0xFFFFFFFF
        g = h & 0xF0000000
        if g:
            h ^= g >> 24
        h &= ~g & 0xFFFFFFFF
    return h


@dataclass
class _Vernaux:
    offset: int  # file offset of this Elf64_Vernaux
    file: str  # the library it is needed from (vn_file)
    hash: int
    flags: int
    other: int  # the version index symbols use in .gnu.version
    name: str
    name_offset: int  # into .dynstr


@dataclass
class _Elf:
    data: bytearray
    dynsym: tuple[int, int, int]  # offset, size, entsize
    dynstr: tuple[int, int]  # offset, size
    versym: tuple[int, int] | None
    vernaux: list[_Vernaux]

    def string(self, offset: int) -> bytes:
        start = self.dynstr[0] + offset
        end = self.data.index(b"\0", start)
        return bytes(self.data[start:end])


def _read_elf(data: bytearray, path: Path) -> _Elf:
    if data[:4] != b"\x7fELF":
        raise ElfPatchError(f"{path} is not an ELF file")
    if data[4] != 2 or data[5] != 1:
        raise ElfPatchError(f"{path} is not a little-endian 64-bit ELF file")
    (e_shoff,) = struct.unpack_from("<Q", data, 0x28)
    e_shentsize, e_shnum = struct.unpack_from("<HH", data, 0x3A)
    sections = []
    for i in range(e_shnum):
        sh = struct.unpack_from("<IIQQQQIIQQ", data, e_shoff + i * e_shentsize)
        sections.append(sh)  # name, type, flags, addr, offset, size, link, info, addralign, entsize
    dynsym = next((s for s in sections if s[1] == _SHT_DYNSYM), None)
    if dynsym is None:
        raise ElfPatchError(f"{path} has no .dynsym section")
    strtab = sections[dynsym[6]]
    versym = next((s for s in sections if s[1] == _SHT_GNU_VERSYM), None)
    verneed = next((s for s in sections if s[1] == _SHT_GNU_VERNEED), None)
    elf = _Elf(data, (dynsym[4], dynsym[5], dynsym[9] or 24), (strtab[4], strtab[5]),
               (versym[4], versym[5]) if versym else None, [])
    if verneed is not None:
        off, count = verneed[4], verneed[7]
        for _ in range(count):
            _vn_version, vn_cnt, vn_file, vn_aux, vn_next = struct.unpack_from("<HHIII", data, off)
            file = elf.string(vn_file).decode()
            aux = off + vn_aux
            for _ in range(vn_cnt):
                vna_hash, vna_flags, vna_other, vna_name, vna_next = struct.unpack_from("<IHHII", data, aux)
                elf.vernaux.append(_Vernaux(aux, file, vna_hash, vna_flags, vna_other,
                                            elf.string(vna_name).decode(), vna_name))
                if not vna_next:
                    break
                aux += vna_next
            if not vn_next:
                break
            off += vn_next
    return elf


def glibc_versions_needed(path: str | Path) -> list[str]:
    """The ``GLIBC_*`` versions a shared library needs (its ``.gnu.version_r``), oldest first."""
    path = Path(path)
    elf = _read_elf(bytearray(path.read_bytes()), path)
    names = {v.name for v in elf.vernaux if _parse_version(v.name) is not None}
    return sorted(names, key=lambda n: _parse_version(n) or ())


def needs_glibc(path: str | Path, version: tuple[int, ...] = TARGET_VERSION) -> bool:
    """True if the library needs ``GLIBC_<version>`` or newer (2.38 by default)."""
    return any((_parse_version(n) or ()) >= version for n in glibc_versions_needed(path))


def _symbols(elf: _Elf) -> list[tuple[int, int, int]]:
    """(file offset of Elf64_Sym, st_name, version index) for every dynamic symbol."""
    off, size, ent = elf.dynsym
    out = []
    for i in range(size // ent):
        sym = off + i * ent
        (st_name,) = struct.unpack_from("<I", elf.data, sym)
        ver = 0
        if elf.versym is not None:
            (ver,) = struct.unpack_from("<H", elf.data, elf.versym[0] + 2 * i)
        out.append((sym, st_name, ver & 0x7FFF))
    return out


def patch_library(path: str | Path, version: tuple[int, ...] = TARGET_VERSION) -> bool:
    """Rebind a library's ``GLIBC_2.38`` (``version``) ``__isoc23_*`` imports to the classic functions.

    Returns True if the file was changed, False if it needed nothing (idempotent). Raises
    :class:`ElfPatchError`, writing nothing, when a too-new import is not an ``__isoc23_*`` symbol.
    """
    path = Path(path)
    data = bytearray(path.read_bytes())
    elf = _read_elf(data, path)
    new = [v for v in elf.vernaux if (_parse_version(v.name) or ()) >= version]
    if not new:
        return False
    libc = [v for v in elf.vernaux if v.file.startswith("libc.so") and _parse_version(v.name) is not None
            and (_parse_version(v.name) or ()) < version]
    if not libc:
        raise ElfPatchError(f"{path} needs {[v.name for v in new]} but no older glibc version to rebind to")
    base = min(libc, key=lambda v: _parse_version(v.name) or ())
    indexes = {v.other for v in new}
    edits: list[tuple[int, int]] = []
    for sym, st_name, ver in _symbols(elf):
        if ver not in indexes:
            continue
        name = elf.string(st_name)
        if not name.startswith(ISOC23_PREFIX):
            raise ElfPatchError(f"{path} imports {name.decode()} from "
                                f"{next(v.name for v in new if v.other == ver)}: not an __isoc23_ symbol")
        edits.append((sym, st_name + len(ISOC23_PREFIX)))
    for sym, st_name in edits:
        struct.pack_into("<I", data, sym, st_name)
    for v in new:
        if not v.file.startswith("libc.so"):
            raise ElfPatchError(f"{path} needs {v.name} from {v.file}, not from libc")
        struct.pack_into("<IHHI", data, v.offset, _elf_hash(base.name.encode()), v.flags, v.other,
                         base.name_offset)
    tmp = path.with_name(path.name + ".glibc-patch.tmp")
    tmp.write_bytes(bytes(data))
    os.chmod(tmp, path.stat().st_mode)
    os.replace(tmp, path)
    return True


def patch_directory(directory: str | Path, *, force: bool = False) -> list[str]:
    """Patch every ``*.so*`` under ``directory`` that needs glibc 2.38, when this glibc is older
    (or ``force``); returns the names of the files changed."""
    if not (force or patch_needed()):
        return []
    changed = []
    for lib in sorted(Path(directory).rglob("*.so*")):
        if lib.is_file() and not lib.is_symlink() and not lib.name.endswith(".tmp"):
            try:
                needs = needs_glibc(lib)
            except (ElfPatchError, struct.error, ValueError, IndexError):
                continue
            if needs and patch_library(lib):
                changed.append(str(lib.relative_to(directory)))
    return changed


__all__ = ["ElfPatchError", "glibc_versions_needed", "libc_version", "needs_glibc", "patch_directory",
           "patch_library", "patch_needed"]
