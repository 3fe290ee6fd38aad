"""Kernel struct layouts read from BTF (/sys/kernel/btf/vmlinux).

BCC compiles our BPF C against headers of another kernel, so header offsets are wrong
on the running kernel. Every kernel struct field the BPF code reads is instead located
here, from the running kernel's own BTF, and handed to the C as -D macros.

Only the stdlib is used. The raw format is documented in the kernel tree,
Documentation/bpf/btf.rst.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from typing import Iterable

import attrs

VMLINUX = "/sys/kernel/btf/vmlinux"
BTF_MAGIC = 0xEB9F
PTR_SIZE = 8  # BTF PTR records carry no size; the agent runs on 64-bit kernels only

# Kinds (uapi/linux/btf.h).
INT, PTR, ARRAY, STRUCT, UNION, ENUM, FWD, TYPEDEF, VOLATILE, CONST, RESTRICT = range(1, 12)
FUNC, FUNC_PROTO, VAR, DATASEC, FLOAT, DECL_TAG, TYPE_TAG, ENUM64 = range(12, 20)

# Bytes that follow the 12-byte common record, per kind: (fixed, per vlen item).
# Every kind must be listed, or one unknown record would shift every later type id.
_EXTRA = {
    INT: (4, 0), PTR: (0, 0), ARRAY: (12, 0), STRUCT: (0, 12), UNION: (0, 12),
    ENUM: (0, 8), FWD: (0, 0), TYPEDEF: (0, 0), VOLATILE: (0, 0), CONST: (0, 0),
    RESTRICT: (0, 0), FUNC: (0, 0), FUNC_PROTO: (0, 8), VAR: (4, 0),
    DATASEC: (0, 12), FLOAT: (0, 0), DECL_TAG: (4, 0), TYPE_TAG: (0, 0),
    ENUM64: (0, 12),
}
# Kinds that only qualify or rename another type: follow them to the real type.
_ALIASES = (TYPEDEF, VOLATILE, CONST, RESTRICT, TYPE_TAG)
_SIZED = (INT, STRUCT, UNION, ENUM, ENUM64, FLOAT, DATASEC)


@attrs.frozen
class Member:
    """Where a struct member lives, measured from the start of the outer struct.

    For a bitfield, `offset`/`size` name the naturally aligned storage unit of the
    underlying type that holds it (what pahole prints and what BPF code should read);
    its bits start at `bit_offset - 8 * offset` within that unit.
    """

    offset: int
    size: int
    bit_offset: int
    bitfield_size: int = 0


class BTF:
    """Index of a raw BTF blob; types are decoded lazily on lookup."""

    def __init__(self, data: bytes):
        self._data = data
        if len(data) < 24:
            raise ValueError("BTF blob too short for a header")
        # The magic tells the byte order of the whole blob.
        self._e = "<" if struct.unpack_from("<H", data)[0] == BTF_MAGIC else ">"
        magic, version, _flags, hdr_len = struct.unpack_from(self._e + "HBBI", data)
        if magic != BTF_MAGIC:
            raise ValueError(f"not a BTF blob (magic {magic:#x})")
        if version != 1:
            raise ValueError(f"unsupported BTF version {version}")
        type_off, type_len, str_off, str_len = struct.unpack_from(self._e + "4I", data, 8)
        self._types_start = hdr_len + type_off
        self._str_start = hdr_len + str_off
        self._str_end = self._str_start + str_len
        if self._types_start + type_len > len(data) or self._str_end > len(data):
            raise ValueError("BTF header points past the end of the blob")
        self._index(self._types_start, self._types_start + type_len)

    @classmethod
    def load(cls, path: str = VMLINUX) -> "BTF":
        with open(path, "rb") as f:
            return cls(f.read())

    def _index(self, pos: int, end: int) -> None:
        """One pass: record each type's position, and names of structs/unions only."""
        data, extra = self._data, _EXTRA
        unpack = struct.Struct(self._e + "II").unpack_from
        offsets = [0]  # type id 0 is void
        composites: dict[str, list[int]] = {}
        while pos < end:
            name_off, info = unpack(data, pos)
            kind, vlen = (info >> 24) & 0x1F, info & 0xFFFF
            try:
                fixed, per = extra[kind]
            except KeyError:
                raise ValueError(f"unknown BTF kind {kind} at type id {len(offsets)}") from None
            if kind in (STRUCT, UNION) and name_off:
                composites.setdefault(self._str(name_off), []).append(len(offsets))
            offsets.append(pos)
            pos += 12 + fixed + per * vlen
        if pos != end:
            raise ValueError("BTF type section ends inside a type record")
        self._offsets, self._composites = offsets, composites

    def _str(self, off: int) -> str:
        start = self._str_start + off
        return self._data[start:self._data.index(b"\0", start, self._str_end)].decode()

    def _type(self, tid: int) -> tuple[int, int, int, int, int, int]:
        """-> (name_off, kind, vlen, kind_flag, size_or_type, position of extra data)."""
        if not 0 < tid < len(self._offsets):
            raise ValueError(f"BTF type id {tid} out of range")
        pos = self._offsets[tid]
        name_off, info, size_or_type = struct.unpack_from(self._e + "3I", self._data, pos)
        return name_off, (info >> 24) & 0x1F, info & 0xFFFF, info >> 31, size_or_type, pos + 12

    def _resolve(self, tid: int) -> int:
        """Follow typedef/const/volatile/restrict/type_tag to the underlying type."""
        while tid and self._type(tid)[1] in _ALIASES:
            tid = self._type(tid)[4]
        return tid

    def _size(self, tid: int) -> int:
        tid = self._resolve(tid)
        if tid == 0:
            raise ValueError("void has no size")
        _, kind, _, _, size, extra = self._type(tid)
        if kind in _SIZED:
            return size
        if kind == PTR:
            return PTR_SIZE
        if kind == ARRAY:
            elem, _index_type, nelems = struct.unpack_from(self._e + "3I", self._data, extra)
            return nelems * self._size(elem)
        raise ValueError(f"BTF type id {tid} (kind {kind}) has no size")

    def _struct_id(self, name: str) -> int:
        # Several types may share a name (a FWD, an empty declaration): want the real one.
        for tid in self._composites.get(name, ()):
            if self._type(tid)[4] > 0:
                return tid
        raise KeyError(f"no struct or union named {name!r} with a size in BTF")

    def _members(self, tid: int):
        """Yield (name, type id, bit offset, bitfield size) of a struct/union."""
        _, _, vlen, kind_flag, _, pos = self._type(tid)
        for name_off, mtype, off in struct.iter_unpack(self._e + "3I", self._data[pos:pos + 12 * vlen]):
            bits = 0
            if kind_flag:
                bits, off = off >> 24, off & 0xFFFFFF
            else:
                # Old encoding: a bitfield is an INT whose width is narrower than its size.
                _, kind, _, _, size, extra = self._type(mtype) if mtype else (0, 0, 0, 0, 0, 0)
                if kind == INT:
                    enc = struct.unpack_from(self._e + "I", self._data, extra)[0]
                    nr_bits, int_off = enc & 0xFF, (enc >> 16) & 0xFF
                    if nr_bits != size * 8 or int_off:
                        bits, off = nr_bits, off + int_off
            yield (self._str(name_off) if name_off else ""), mtype, off, bits

    def _find(self, tid: int, name: str):
        """Find `name` in struct/union `tid`, looking inside anonymous members too."""
        for mname, mtype, off, bits in self._members(tid):
            if mname == name:
                return mtype, off, bits
            if not mname and mtype and self._type(self._resolve(mtype))[1] in (STRUCT, UNION):
                found = self._find(self._resolve(mtype), name)
                if found:
                    return found[0], off + found[1], found[2]
        return None

    def member(self, struct_name: str, path: str) -> Member:
        """Locate `path` (may be dotted: "__sk_common.skc_daddr") in `struct_name`."""
        tid, bit_base = self._struct_id(struct_name), 0
        parts = path.split(".")
        for i, part in enumerate(parts):
            found = self._find(tid, part)
            if found is None:
                where = ".".join(parts[:i]) or struct_name
                raise KeyError(f"struct {struct_name!r} has no member {path!r} ({part!r} not in {where})")
            mtype, off, bits = found
            bit_base += off
            if i == len(parts) - 1:
                return _layout(bit_base, self._size(mtype), bits)
            tid = self._resolve(mtype)
            if bits or self._type(tid)[1] not in (STRUCT, UNION):
                raise KeyError(f"{struct_name}.{'.'.join(parts[:i + 1])} is not a struct/union; "
                               f"cannot resolve {path!r}")
        raise KeyError(f"empty member path for struct {struct_name!r}")

    def func_id(self, name: str) -> int | None:
        """The type id of kernel function `name` (what an fentry program attaches to)."""
        for tid in range(1, len(self._offsets)):
            name_off, info = struct.unpack_from(self._e + "II", self._data, self._offsets[tid])
            if (info >> 24) & 0x1F == FUNC and self._str(name_off) == name:
                return tid
        return None

    def sizeof(self, struct_name: str) -> int:
        return self._type(self._struct_id(struct_name))[4]


def _layout(bit_offset: int, size: int, bitfield_size: int) -> Member:
    if not bitfield_size:
        return Member(bit_offset // 8, size, bit_offset, 0)
    # Report the aligned storage unit holding the bitfield, like pahole and the compiler;
    # a field straddling units (packed structs) falls back to its first byte.
    unit = size * 8
    if unit and bit_offset % unit + bitfield_size <= unit:
        return Member(bit_offset // unit * size, size, bit_offset, bitfield_size)
    return Member(bit_offset // 8, size, bit_offset, bitfield_size)


def _split(field: str) -> tuple[str, str]:
    struct_name, dot, path = field.partition(".")
    if not dot or not struct_name or not path:
        raise ValueError(f"kernel field must look like 'struct.member', got {field!r}")
    return struct_name, path


# --- cache: parsing vmlinux BTF takes a noticeable fraction of a second; do it once per kernel

def cache_key(btf_path: str = VMLINUX) -> str:
    """Identify the kernel build, so a cache written under another kernel never matches."""
    h = hashlib.sha256()
    uname = os.uname()
    h.update(f"{uname.release}\0{uname.version}\0".encode())
    with open(btf_path, "rb") as f:
        head = f.read(64 * 1024)
        size = f.seek(0, os.SEEK_END)
        f.seek(max(0, size - 64 * 1024))
        tail = f.read()
    h.update(f"{size}\0".encode() + head + tail)
    return h.hexdigest()[:32]


def _read_cache(path: str) -> dict[str, Member]:
    try:
        with open(path) as f:
            raw = json.load(f)["fields"]
        return {k: Member(**{a: int(v[a]) for a in ("offset", "size", "bit_offset", "bitfield_size")})
                for k, v in raw.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}  # missing or corrupt: parse BTF instead


def _write_cache(path: str, fields: dict[str, Member]) -> None:
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".btf-", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump({"version": 1, "fields": {k: attrs.asdict(m) for k, m in sorted(fields.items())}}, f)
            os.replace(tmp, path)  # atomic: readers see the old or the new file, never half
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError:
        pass  # an unwritable cache costs a re-parse next time, nothing more


def kernel_offsets(fields: Iterable[str], btf_path: str = VMLINUX,
                   cache_dir: str | None = None) -> dict[str, Member]:
    """Layout of each "struct.member[.member...]" field, cached per kernel build."""
    fields = list(dict.fromkeys(fields))
    for field in fields:
        _split(field)
    if cache_dir is None:
        cache_dir = os.environ.get("DEEPTRACE_CACHE_DIR") or "/var/cache/deeptrace"
    try:
        cache_path = os.path.join(cache_dir, f"btf-offsets-{cache_key(btf_path)}.json")
    except OSError:
        cache_path = None
    cached = _read_cache(cache_path) if cache_path else {}
    if all(f in cached for f in fields):
        return {f: cached[f] for f in fields}
    btf = BTF.load(btf_path)
    result = {f: btf.member(*_split(f)) for f in fields}
    if cache_path:
        _write_cache(cache_path, {**_read_cache(cache_path), **result})
    return result


def _macro(field: str) -> str:
    return field.replace(".", "__")


def offset_cflags(fields: Iterable[str], **kw) -> list[str]:
    """-D flags for the BPF C: OFF_<struct>__<member>=<offset>, SIZE_...=<size>."""
    flags = []
    for field, m in kernel_offsets(fields, **kw).items():
        flags += [f"-DOFF_{_macro(field)}={m.offset}", f"-DSIZE_{_macro(field)}={m.size}"]
    return flags
