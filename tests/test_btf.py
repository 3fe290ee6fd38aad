"""deeptrace_core.btf: raw BTF parsing, member lookup, offset cache.

Synthetic-blob tests run anywhere (no root, no kernel BTF). Kernel tests compare against
pahole, an independent BTF reader; they skip without /sys/kernel/btf/vmlinux or pahole,
except in CI (CI=true), where a skip would hide a broken machine and fails instead.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import struct
import subprocess
import time

import pytest

from deeptrace_core import btf
from deeptrace_core.btf import BTF, Member, kernel_offsets, offset_cflags
from deeptrace_plugins.trace.fields import KERNEL_FIELDS as TRACE_FIELDS


def _all_probe_fields():
    """Every kernel field any registered probe reads: all are checked against pahole."""
    from deeptrace_core.plugins import PluginHost
    fields = set(TRACE_FIELDS)
    for entry in PluginHost().load_entry_points().registry().probes.values():
        fields.update(getattr(entry.cls, "kernel_fields", ()))
    return tuple(sorted(fields))


KERNEL_FIELDS = _all_probe_fields()

VMLINUX = "/sys/kernel/btf/vmlinux"


# --- synthetic BTF ------------------------------------------------------------------

class Blob:
    """Builds a raw BTF blob type by type; add() returns the new type id."""

    def __init__(self):
        self.strings = b"\0"
        self.types: list[tuple] = []

    def s(self, name: str) -> int:
        if not name:
            return 0
        off = len(self.strings)
        self.strings += name.encode() + b"\0"
        return off

    def add(self, kind, name="", size_or_type=0, vlen=0, kind_flag=0, extra=()):
        """extra: list of (struct format, values...) appended after the common record."""
        self.types.append((kind, name, size_or_type, vlen, kind_flag, list(extra)))
        return len(self.types)

    def build(self, e="<") -> bytes:
        body = b""
        for kind, name, size_or_type, vlen, kind_flag, extra in self.types:
            info = kind_flag << 31 | kind << 24 | vlen
            body += struct.pack(e + "3I", self.s(name), info, size_or_type)
            for fmt, *vals in extra:
                vals = [self.s(v) if isinstance(v, str) else v for v in vals]
                body += struct.pack(e + fmt, *vals)
        hdr = struct.pack(e + "HBBI4I", 0xEB9F, 1, 0, 24, 0, len(body), len(body), len(self.strings))
        return hdr + body + self.strings


def member(name, tid, bit_off, bits=0):
    return ("3I", name, tid, bits << 24 | bit_off)


def synthetic() -> Blob:
    """Types of every kind, so a wrong skip length for any kind breaks later ids."""
    b = Blob()
    i32 = b.add(btf.INT, "int", 4, extra=[("I", 1 << 24 | 32)])
    u8 = b.add(btf.INT, "unsigned char", 1, extra=[("I", 8)])
    u8t = b.add(btf.TYPEDEF, "u8", u8)
    b.add(btf.ENUM, "e", 4, vlen=2, extra=[("Ii", "A", 0), ("Ii", "B", -1)])
    proto = b.add(btf.FUNC_PROTO, "", i32, vlen=1, extra=[("II", "x", i32)])
    b.add(btf.FUNC, "f", proto)
    b.add(btf.STRUCT, "pair", 0)  # zero-size namesake: must not be picked
    b.add(btf.FWD, "pair", 0)
    pair = b.add(btf.STRUCT, "pair", 8, vlen=2,
                 extra=[("3I", "a", i32, 0), ("3I", "b", i32, 32)])
    flags = b.add(btf.STRUCT, "flags", 8, vlen=3, kind_flag=1,
                  extra=[member("x", u8t, 0, 4), member("y", u8t, 4, 3), member("w", i32, 32)])
    b.add(btf.VAR, "v", i32, extra=[("I", 1)])
    b.add(btf.DATASEC, ".data", 4, vlen=1, extra=[("3I", 11, 0, 4)])
    b.add(btf.DECL_TAG, "tag", pair, extra=[("i", -1)])
    b.add(btf.ENUM64, "e64", 8, vlen=1, extra=[("3I", "BIG", 1, 2)])
    b.add(btf.FLOAT, "double", 8)
    tagged = b.add(btf.TYPE_TAG, "user", pair)
    ptr = b.add(btf.PTR, "", tagged)
    arr = b.add(btf.ARRAY, "", 0, extra=[("3I", i32, i32, 3)])
    anon = b.add(btf.UNION, "", 8, vlen=2, extra=[("3I", "p", pair, 0), ("3I", "q", ptr, 0)])
    cflags = b.add(btf.CONST, "", flags)
    vflags = b.add(btf.VOLATILE, "", cflags)
    b.add(btf.STRUCT, "outer", 40, vlen=4, extra=[
        ("3I", "hdr", i32, 0), ("3I", "", anon, 64), ("3I", "arr", arr, 128), ("3I", "fl", vflags, 256)])
    # Old encoding (no kind_flag): the bitfield width lives in the INT's encoding.
    u3 = b.add(btf.INT, "unsigned char", 1, extra=[("I", 3)])
    b.add(btf.STRUCT, "old", 4, vlen=2, extra=[("3I", "lo", u8, 0), ("3I", "bits", u3, 10)])
    return b


@pytest.fixture(params=["<", ">"], ids=["little", "big"])
def syn(request) -> BTF:
    return BTF(synthetic().build(request.param))


def test_plain_members(syn):
    assert syn.member("pair", "a") == Member(0, 4, 0, 0)
    assert syn.member("pair", "b") == Member(4, 4, 32, 0)
    assert syn.sizeof("pair") == 8  # the zero-size struct and the FWD are skipped


def test_kind_flag_bitfields(syn):
    assert syn.member("flags", "x") == Member(0, 1, 0, 4)
    assert syn.member("flags", "y") == Member(0, 1, 4, 3)
    assert syn.member("flags", "w") == Member(4, 4, 32, 0)


def test_old_style_int_bitfield(syn):
    assert syn.member("old", "bits") == Member(1, 1, 10, 3)


def test_anonymous_union_dotted_path_and_qualifiers(syn):
    assert syn.member("outer", "p") == Member(8, 8, 64, 0)  # inside the anonymous union
    assert syn.member("outer", "p.b") == Member(12, 4, 96, 0)
    assert syn.member("outer", "q") == Member(8, 8, 64, 0)  # pointer
    assert syn.member("outer", "arr") == Member(16, 12, 128, 0)  # int[3]
    assert syn.member("outer", "fl.y") == Member(32, 1, 260, 3)  # through volatile const
    assert syn.sizeof("outer") == 40


def test_lookup_errors_name_struct_and_path(syn):
    with pytest.raises(KeyError, match=r"outer.*p\.nope"):
        syn.member("outer", "p.nope")
    with pytest.raises(KeyError, match="not a struct"):
        syn.member("outer", "hdr.x")
    with pytest.raises(KeyError, match="missing"):
        syn.sizeof("missing")
    with pytest.raises(KeyError, match="named 'e'"):
        syn.member("e", "A")  # enums are not structs


def test_unknown_kind_and_bad_header_are_clear_errors():
    b = synthetic()
    b.add(20, "future", 0)
    with pytest.raises(ValueError, match="unknown BTF kind 20"):
        BTF(b.build())
    with pytest.raises(ValueError, match="magic"):
        BTF(b"\0" * 64)
    with pytest.raises(ValueError, match="past the end"):
        BTF(synthetic().build()[:-4])


# --- cache (synthetic BTF file: no root needed) ---------------------------------------

SYN_FIELDS = ["pair.b", "outer.p.b", "flags.y"]


@pytest.fixture
def btf_file(tmp_path):
    path = tmp_path / "vmlinux.btf"
    path.write_bytes(synthetic().build())
    return str(path)


@pytest.fixture
def loads(monkeypatch):
    """Count BTF parses."""
    calls = []
    real = BTF.load.__func__

    def counting(cls, path=btf.VMLINUX):
        calls.append(path)
        return real(cls, path)

    monkeypatch.setattr(BTF, "load", classmethod(counting))
    return calls


def forbid_parse(monkeypatch):
    def boom(cls, path=btf.VMLINUX):
        raise AssertionError("BTF parsed despite a warm cache")
    monkeypatch.setattr(BTF, "load", classmethod(boom))


def test_cache_written_then_hit_without_parsing(btf_file, tmp_path, monkeypatch, loads):
    cache = tmp_path / "cache"
    first = kernel_offsets(SYN_FIELDS, btf_path=btf_file, cache_dir=str(cache))
    assert first == {"pair.b": Member(4, 4, 32, 0), "outer.p.b": Member(12, 4, 96, 0),
                     "flags.y": Member(0, 1, 4, 3)}
    assert len(loads) == 1
    (cache_file,) = cache.iterdir()
    assert set(json.loads(cache_file.read_text())["fields"]) == set(SYN_FIELDS)
    forbid_parse(monkeypatch)
    assert kernel_offsets(SYN_FIELDS, btf_path=btf_file, cache_dir=str(cache)) == first
    assert kernel_offsets(["pair.b"], btf_path=btf_file, cache_dir=str(cache)) == {"pair.b": first["pair.b"]}


def test_cache_miss_merges_new_fields(btf_file, tmp_path, loads):
    cache = str(tmp_path)
    kernel_offsets(["pair.b"], btf_path=btf_file, cache_dir=cache)
    kernel_offsets(["pair.a", "pair.b"], btf_path=btf_file, cache_dir=cache)
    assert len(loads) == 2
    (cache_file,) = tmp_path.glob("btf-offsets-*.json")
    assert set(json.loads(cache_file.read_text())["fields"]) == {"pair.a", "pair.b"}


@pytest.mark.parametrize("garbage", ["{not json", "[]", '{"fields": {"pair.b": {"offset": "x"}}}', ""])
def test_corrupt_cache_is_ignored_and_repaired(btf_file, tmp_path, loads, garbage):
    cache = str(tmp_path / "c")
    good = kernel_offsets(SYN_FIELDS, btf_path=btf_file, cache_dir=cache)
    (cache_file,) = (tmp_path / "c").iterdir()
    cache_file.write_text(garbage)
    assert kernel_offsets(SYN_FIELDS, btf_path=btf_file, cache_dir=cache) == good
    assert len(loads) == 2
    assert set(json.loads(cache_file.read_text())["fields"]) == set(SYN_FIELDS)


def test_other_kernel_key_misses(btf_file, tmp_path, monkeypatch, loads):
    cache = str(tmp_path)
    kernel_offsets(SYN_FIELDS, btf_path=btf_file, cache_dir=cache)
    monkeypatch.setattr(btf, "cache_key", lambda path=btf.VMLINUX: "another-kernel")
    kernel_offsets(SYN_FIELDS, btf_path=btf_file, cache_dir=cache)
    assert len(loads) == 2
    assert len(list(tmp_path.glob("btf-offsets-*.json"))) == 2


def test_cache_key_changes_with_btf_content(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(synthetic().build())
    b.write_bytes(synthetic().build(">"))
    assert btf.cache_key(str(a)) == btf.cache_key(str(a)) != btf.cache_key(str(b))


def test_unwritable_cache_still_works(btf_file, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")  # a regular file as parent dir: unwritable even for root
    result = kernel_offsets(SYN_FIELDS, btf_path=btf_file, cache_dir=str(blocker / "sub"))
    assert result["pair.b"] == Member(4, 4, 32, 0)


def test_default_cache_dir_from_env(btf_file, tmp_path, monkeypatch):
    monkeypatch.setenv("DEEPTRACE_CACHE_DIR", str(tmp_path / "env"))
    kernel_offsets(["pair.b"], btf_path=btf_file)
    assert len(list((tmp_path / "env").glob("btf-offsets-*.json"))) == 1


def test_offset_cflags(btf_file, tmp_path):
    flags = offset_cflags(["pair.b", "outer.p.b"], btf_path=btf_file, cache_dir=str(tmp_path))
    assert flags == ["-DOFF_pair__b=4", "-DSIZE_pair__b=4", "-DOFF_outer__p__b=12", "-DSIZE_outer__p__b=4"]


def test_bad_field_syntax(btf_file, tmp_path):
    with pytest.raises(ValueError, match="struct.member"):
        kernel_offsets(["pair"], btf_path=btf_file, cache_dir=str(tmp_path))


# --- the running kernel, checked against pahole ----------------------------------------

def require(ok: bool, reason: str):
    if not ok:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason} (CI=true: a skip here would hide a broken machine)")
        pytest.skip(reason)


@pytest.fixture(scope="module")
def kernel():
    require(os.access(VMLINUX, os.R_OK), f"{VMLINUX} not readable")
    require(shutil.which("pahole") is not None, "pahole (Debian dwarves) not installed")
    return BTF.load(VMLINUX)


_MEMBER = re.compile(r"^\s*(?P<decl>.*?);\s*/\*\s*(?P<off>\d+)(?::\s*(?P<bit>\d+))?\s+(?P<size>\d+)\s*\*/\s*$")


def _name(decl: str) -> tuple[str, int]:
    """-> (member name, bitfield width or 0) from a pahole declaration."""
    decl = re.sub(r"\s*__attribute__\(\(.*\)\)$", "", decl)
    fnptr = re.search(r"\(\s*\*\s*(\w+)\s*\)\s*\(", decl)
    if fnptr:
        return fnptr.group(1), 0
    width = re.search(r":\s*(\d+)$", decl)
    decl = re.sub(r"(\[\d*\])+$", "", decl[: width.start()] if width else decl)
    return re.findall(r"\w+", decl)[-1], int(width.group(1)) if width else 0


@functools.lru_cache(maxsize=None)
def pahole(struct_name: str) -> tuple[dict[str, tuple[int, int, int | None, int]], int]:
    """-> ({member: (offset, size, bit or None, width)}, sizeof) as pahole prints them.

    Members of anonymous unions/structs belong to the enclosing struct (pahole prints
    their offsets relative to it); members of named inline structs are not ours.
    """
    out = subprocess.run(["pahole", "-C", struct_name, VMLINUX], capture_output=True,
                         text=True, check=True).stdout  # stderr: "Unknown kind" noise
    require(out.strip() != "", f"pahole printed nothing for {struct_name}")
    frames: list[dict] = []
    size = None
    for line in out.splitlines():
        if line.rstrip().endswith("{"):
            frames.append({})
            continue
        m = _MEMBER.match(line)
        if m and m.group("decl").lstrip().startswith("}"):
            inner = frames.pop()
            name = m.group("decl").strip()[1:].strip()
            entry = {name: (int(m["off"]), int(m["size"]), None, 0)} if name else inner
            for k, v in entry.items():
                frames[-1].setdefault(k, v)
        elif m:
            name, width = _name(m["decl"])
            bit = int(m["bit"]) if m["bit"] is not None else None
            frames[-1].setdefault(name, (int(m["off"]), int(m["size"]), bit, width))
        elif (s := re.search(r"/\* size: (\d+),", line)) and len(frames) == 1:
            size = int(s.group(1))
    assert len(frames) == 1 and size is not None, f"cannot parse pahole output:\n{out}"
    return frames[0], size


def check(kernel: BTF, struct_name: str, name: str, expected) -> None:
    off, size, bit, width = expected
    got = kernel.member(struct_name, name)
    assert (got.offset, got.size) == (off, size), f"{struct_name}.{name}: {got} vs pahole {expected}"
    if bit is not None:  # pahole: bit within the storage unit at `off`
        assert got.bit_offset - 8 * got.offset == bit and got.bitfield_size == width, (
            f"{struct_name}.{name}: {got} vs pahole {expected}")
    else:
        assert got.bitfield_size == 0 and got.bit_offset == 8 * got.offset


@pytest.mark.parametrize("field", KERNEL_FIELDS)
def test_kernel_fields_match_pahole(kernel, field):
    struct_name, _, name = field.partition(".")
    members, _ = pahole(struct_name)
    assert name in members, f"pahole shows no {field}"
    check(kernel, struct_name, name, members[name])


@pytest.mark.parametrize("struct_name", sorted({f.partition(".")[0] for f in KERNEL_FIELDS} | {"sk_buff"}))
def test_every_member_and_sizeof_match_pahole(kernel, struct_name):
    members, size = pahole(struct_name)
    assert kernel.sizeof(struct_name) == size
    for name, expected in members.items():
        check(kernel, struct_name, name, expected)


def test_kernel_bitfield(kernel):
    members, _ = pahole("sock_common")
    off, size, bit, width = members["skc_reuse"]
    assert bit is not None and width > 0, "skc_reuse should be a bitfield"
    assert kernel.member("sock_common", "skc_reuse") == Member(off, size, 8 * off + bit, width)


def test_kernel_dotted_path(kernel):
    outer = kernel.member("sock", "__sk_common")
    inner = kernel.member("sock_common", "skc_dport")
    assert kernel.member("sock", "__sk_common.skc_dport") == Member(
        outer.offset + inner.offset, inner.size, outer.bit_offset + inner.bit_offset, 0)
    assert outer.size == kernel.sizeof("sock_common") == pahole("sock_common")[1]


def test_kernel_missing_member_message(kernel):
    with pytest.raises(KeyError, match=r"task_struct.*no_such_member"):
        kernel.member("task_struct", "no_such_member")


def test_kernel_parse_time_and_cache(kernel, tmp_path, monkeypatch):
    t0 = time.perf_counter()
    fresh = BTF.load(VMLINUX)
    parse_s = time.perf_counter() - t0
    assert parse_s < 2.0, f"parsing vmlinux BTF took {parse_s:.2f} s"
    first = kernel_offsets(KERNEL_FIELDS, cache_dir=str(tmp_path))
    assert first == {f: fresh.member(*f.split(".", 1)) for f in KERNEL_FIELDS}
    forbid_parse(monkeypatch)
    t0 = time.perf_counter()
    assert kernel_offsets(KERNEL_FIELDS, cache_dir=str(tmp_path)) == first
    cached_s = time.perf_counter() - t0
    print(f"\nvmlinux BTF parse {parse_s * 1e3:.0f} ms, cached lookup {cached_s * 1e3:.1f} ms")
