"""Go crypto/tls for the tls probe: which running executables are Go, where their
``crypto/tls.(*Conn).Write``/``Read`` (and ``Close``) start and return, and the struct
offsets gotls.bpf.c needs to find the socket under a ``*tls.Conn``.

- A Go executable carries a ``.go.buildinfo`` section (kept by ``-ldflags=-s -w``), which
  also holds the Go version.
- Function addresses and sizes come from the ELF symbol table. A stripped binary has none
  (nor DWARF): it is reported once as stripped, never guessed at.
- Return probes go on each ``ret`` instruction of the function, found by disassembling it
  with Capstone (a maintained decoder: x86 instruction lengths are not something to
  re-implement), because a uretprobe rewrites the return address on a goroutine stack that
  Go may move, which crashes the program.
- Offsets of ``tls.Conn.conn``/``rawInput``, ``bytes.Buffer``, ``net.TCPConn``,
  ``net.netFD`` and ``poll.FD.Sysfd`` come from the binary's DWARF (pyelftools): they are
  the binary's own, whatever its Go version. Without DWARF (``-w``) a call is mapped by
  the read/write syscall nested in it instead (gotls.bpf.c), and that is logged.
- Go >= 1.17 only (register ABI: receiver in RAX, goroutine in R14).

Executables are known by (device, inode, mtime), so a deleted file's inode reused by a
new one is looked at again; each is looked at once, opened through
``/proc/PID/exe`` (which resolves inside containers and for deleted files).
"""

import logging
import os
import re
import struct

import attrs

from .discovery import wanted_path

log = logging.getLogger("deeptrace.tls")

WRITE = "crypto/tls.(*Conn).Write"
READ = "crypto/tls.(*Conn).Read"
CLOSE = "crypto/tls.(*Conn).Close"
HANDSHAKE = "crypto/tls.(*Conn).handshakeContext"   # Go >= 1.17; nested mode only
# function -> (entry program, program at each ret or None)
PROGRAMS = {WRITE: ("go_write_enter", "go_write_return"),
            READ: ("go_read_enter", "go_read_return"),
            CLOSE: ("go_close_enter", None),
            HANDSHAKE: ("go_handshake_enter", "go_handshake_return")}
# The itab of *net.TCPConn as a net.Conn: go:itab... since Go 1.20, go.itab... before.
ITABS = ("go:itab.*net.TCPConn,net.Conn", "go.itab.*net.TCPConn,net.Conn")
STRUCTS = {"crypto/tls.Conn": ("conn", "rawInput"), "bytes.Buffer": ("buf", "off"),
           "net.TCPConn": ("conn",), "net.conn": ("fd",), "net.netFD": ("pfd",),
           "internal/poll.FD": ("Sysfd",)}
# gotls.bpf.c's go_stats slots, in enum order.
GO_STAT_NAMES = ("go_calls", "go_unconfigured", "go_not_tcpconn", "go_not_tcp",
                 "go_read_failed", "go_calls_full", "go_no_entry", "go_no_bytes",
                 "go_mapped_nested", "go_mapped_conn_map", "go_unmapped",
                 "go_write_flushed_early")
GO_CFG_NESTED = 1
# Nested mode's syscall exit programs (attached only once a binary needs them).
NESTED_TRACEPOINTS = (("sys_exit_read", "go_sys_exit_read"),
                      ("sys_exit_write", "go_sys_exit_write"))
MIN_VERSION = (1, 17)
_BUILDINFO_MAGIC = b"\xff Go buildinf:"
_ET_DYN = 3


@attrs.frozen
class GoTarget:
    """A Go executable. ``problem`` says why it cannot be traced (stripped, no DWARF, too
    old); otherwise functions/returns/offsets/itab are what attach() needs."""

    key: tuple                 # (st_dev, st_ino, st_mtime_ns)
    open_path: str
    path: str
    version: str
    pie: bool = False
    base_vaddr: int = 0        # vaddr of file offset 0 (a PIE's load bias is added to it)
    functions: dict = attrs.field(factory=dict)   # name -> vaddr
    returns: dict = attrs.field(factory=dict)     # name -> [vaddr of each ret]
    offsets: dict = attrs.field(factory=dict)     # go_cfg_t fields; {}: nested mode
    itab: int = 0
    problem: str | None = None

    @property
    def nested(self) -> bool:
        return not self.offsets


# -- the ELF file ----------------------------------------------------------------------------

def _varint(data: bytes, pos: int):
    value = shift = 0
    while True:
        b = data[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, pos
        shift += 7


def buildinfo_version(elf) -> str | None:
    """The Go version from ``.go.buildinfo`` ("go1.19.8"), "" when it cannot be read (the
    pre-1.18 layout points into data), None for a file that is not Go."""
    sec = elf.get_section_by_name(".go.buildinfo")
    if sec is None:
        return None
    data = sec.data()
    if not data.startswith(_BUILDINFO_MAGIC) or len(data) < 33:
        return ""
    if data[15] & 2:  # Go >= 1.18: the version string is inline, varint-length-prefixed
        n, pos = _varint(data, 32)
        return data[pos:pos + n].decode("utf-8", "replace")
    ptr_size = data[14]
    ptr = int.from_bytes(data[16:16 + ptr_size], "little")
    head = _read_vaddr(elf, ptr, 2 * ptr_size)  # a Go string header: data, len
    if head is None:
        return ""
    sptr = int.from_bytes(head[:ptr_size], "little")
    slen = int.from_bytes(head[ptr_size:], "little")
    text = _read_vaddr(elf, sptr, min(slen, 64))
    return text.decode("utf-8", "replace") if text else ""


def version_tuple(version: str):
    m = re.match(r"go(\d+)\.(\d+)", version or "")
    return (int(m.group(1)), int(m.group(2))) if m else None


def _read_vaddr(elf, vaddr: int, size: int) -> bytes | None:
    for seg in elf.iter_segments():
        start = seg["p_vaddr"]
        if seg["p_type"] == "PT_LOAD" and start <= vaddr < start + seg["p_filesz"]:
            elf.stream.seek(seg["p_offset"] + vaddr - seg["p_vaddr"])
            return elf.stream.read(size)
    return None


def ret_offsets(code: bytes, vaddr: int) -> list:
    """Addresses of the ``ret`` instructions in a function's machine code."""
    import capstone
    md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    return [insn.address for insn in md.disasm(code, vaddr)
            if insn.id == capstone.x86.X86_INS_RET]


def struct_offsets(elf, structs=STRUCTS) -> dict | None:
    """{struct: {member: offset}} for `structs` (STRUCTS) from DWARF; None without DWARF or
    when one is missing. Go's linker puts the type entries in the runtime unit: it is read
    first."""
    if not elf.has_dwarf_info():
        return None
    dwarf = elf.get_dwarf_info()
    units = list(dwarf.iter_CUs())

    def name(die):
        attr = die.attributes.get("DW_AT_name")
        return attr.value.decode("utf-8", "replace") if attr else ""

    units.sort(key=lambda cu: name(cu.get_top_DIE()) != "runtime")
    found: dict = {}
    for cu in units:
        for die in cu.get_top_DIE().iter_children():
            if die.tag != "DW_TAG_structure_type":
                continue
            n = name(die)
            if n in structs and n not in found:
                found[n] = {name(m): m.attributes["DW_AT_data_member_location"].value
                            for m in die.iter_children() if m.tag == "DW_TAG_member"
                            and "DW_AT_data_member_location" in m.attributes}
                if len(found) == len(structs):
                    break   # parsing the rest of the unit's entries costs seconds
        if len(found) == len(structs):
            break
    if any(m not in found.get(s, {}) for s, members in structs.items() for m in members):
        return None
    return found


def cfg_offsets(s: dict) -> dict:
    """The go_cfg_t fields from struct offsets (bytes.Buffer.buf is a slice: ptr, len)."""
    conn = s["crypto/tls.Conn"]
    buf = s["bytes.Buffer"]
    return {"conn": conn["conn"],
            "netfd": s["net.TCPConn"]["conn"] + s["net.conn"]["fd"],
            "sysfd": s["net.netFD"]["pfd"] + s["internal/poll.FD"]["Sysfd"],
            "raw_len": conn["rawInput"] + buf["buf"] + 8,
            "raw_off": conn["rawInput"] + buf["off"]}


def proc_exe(pid):
    """(/proc/PID/exe, the path it names, the file's (dev, inode, mtime) key), or None
    when the process is gone or is a kernel thread."""
    exe = f"/proc/{pid}/exe"
    try:
        st = os.stat(exe)
        path = os.readlink(exe)
    except OSError:
        return None
    return exe, path, (st.st_dev, st.st_ino, st.st_mtime_ns)


def proc_exes(pids, self_pid):
    """(pid, /proc/PID/exe, path, key) of each of `pids` but `self_pid` that is still
    there and not a kernel thread (see proc_exe)."""
    for pid in pids:
        if pid != self_pid:
            found = proc_exe(pid)
            if found is not None:
                yield (pid, *found)


def read_go_elf(open_path: str, path: str, build):
    """build(elf, Go version) for an x86-64 Go executable; None for any other file or one
    that cannot be read (shared by the TLS and the goroutine discovery)."""
    from elftools.common.exceptions import ELFError
    from elftools.elf.elffile import ELFFile
    try:
        with open(open_path, "rb") as f:
            if f.read(4) != b"\x7fELF":
                return None
            f.seek(0)
            elf = ELFFile(f)
            if elf.get_machine_arch() != "x64":
                return None
            version = buildinfo_version(elf)
            if version is None:
                return None
            return build(elf, version)
    except (ELFError, OSError, ValueError, struct.error, IndexError, KeyError) as exc:
        log.debug("cannot read %s: %s", path, exc)
        return None


def inspect(open_path: str, path: str, key: tuple) -> GoTarget | None:
    """A GoTarget for a Go executable that uses crypto/tls (or may: a stripped one whose
    function table names it), else None."""
    return read_go_elf(open_path, path,
                       lambda elf, version: _inspect_go(elf, open_path, path, key, version))


def _inspect_go(elf, open_path, path, key, version) -> GoTarget | None:
    loads = [seg for seg in elf.iter_segments() if seg["p_type"] == "PT_LOAD"]
    first = min(loads, key=lambda seg: seg["p_offset"]) if loads else None
    base = dict(key=key, open_path=open_path, path=path, version=version,
                pie=elf["e_type"] == "ET_DYN",
                base_vaddr=(first["p_vaddr"] - first["p_offset"]) if first else 0)
    symtab = elf.get_section_by_name(".symtab")
    if symtab is None:
        # Go's own function table (.gopclntab) survives stripping: it tells whether the
        # program has crypto/tls at all, so only those are reported.
        pcln = elf.get_section_by_name(".gopclntab")
        if pcln is not None and WRITE.encode() + b"\0" not in pcln.data():
            return None
        return GoTarget(**base, problem="stripped (no symbol table)")
    wanted = set(PROGRAMS) | set(ITABS)
    syms = {s.name: s for s in symtab.iter_symbols() if s.name in wanted}
    if WRITE not in syms or READ not in syms:
        return None  # a Go program without crypto/tls
    v = version_tuple(version)
    if v is not None and v < MIN_VERSION:
        return GoTarget(**base, problem=f"{version}: before Go 1.17's register ABI")
    functions, returns = {}, {}
    offsets = struct_offsets(elf)
    for fname in PROGRAMS:
        s = syms.get(fname)
        if s is None or (fname == HANDSHAKE and offsets is not None):
            continue
        addr, size = s["st_value"], s["st_size"]
        code = _read_vaddr(elf, addr, size)
        functions[fname] = addr
        if PROGRAMS[fname][1]:
            rets = ret_offsets(code or b"", addr)
            if not rets:
                return GoTarget(**base, problem=f"no ret instruction found in {fname}")
            returns[fname] = rets
    if offsets is None:  # no DWARF (-w): the nested syscall maps the calls
        return GoTarget(**base, functions=functions, returns=returns)
    itab = next((syms[n]["st_value"] for n in ITABS if n in syms), 0)
    return GoTarget(**base, functions=functions, returns=returns,
                    offsets=cfg_offsets(offsets), itab=itab)


def load_bias(pid: int, target: GoTarget) -> int | None:
    """What `pid` adds to a PIE executable's vaddrs: where its file offset 0 is mapped,
    less that offset's vaddr (Go's internal linker starts PIEs at 0x400000 too)."""
    inode = target.key[1]
    try:
        with open(f"/proc/{pid}/maps") as f:
            for line in f:
                parts = line.split(None, 5)
                if len(parts) >= 5 and int(parts[4]) == inode and int(parts[2], 16) == 0:
                    return int(parts[0].split("-")[0], 16) - target.base_vaddr
    except OSError:
        return None
    return None


# -- the probe's side --------------------------------------------------------------------

class GoTracer:
    """Finds Go executables among processes and attaches gotls.bpf.c's programs to them.

    The probe calls ``rescan(bpf, pids)`` whenever it rescans processes (start-up, an
    EV_LOADED event: an exec or a PIE process the BPF side has no offsets for, and its
    periodic full rescan), ``stats(bpf)`` and ``gc(bpf)``."""

    def __init__(self, include=(), exclude=(), self_pid=None):
        self.include, self.exclude = list(include), list(exclude)
        self.self_pid = os.getpid() if self_pid is None else self_pid
        self.seen: dict = {}        # key -> GoTarget, or None: not a Go TLS program
        self.attached: dict = {}    # key -> GoTarget
        self.problems: dict = {}    # path -> why it is not traced (each reported once)
        self.pie_pids: dict = {}    # pid -> key registered in go_cfgs
        self.attach_failed = 0
        self.tracepoint_fds: list = []   # nested mode's, closed by detach()

    def rescan(self, bpf, pids) -> list:
        """Look at the executables of `pids`; attach new Go ones. Returns the new
        GoTargets (traced or not)."""
        new = []
        for pid, exe, path, key in proc_exes(pids, self.self_pid):
            if key not in self.seen:
                target = None
                if wanted_path(path, self.include, self.exclude):
                    target = inspect(exe, path, key)
                self.seen[key] = target
                if target is not None:
                    new.append(target)
                    self._attach(bpf, target)
            target = self.attached.get(key)
            if target is not None and target.pie and self.pie_pids.get(pid) != key:
                self._register(bpf, target, pid)
        return new

    def _attach(self, bpf, target: GoTarget):
        if target.problem:
            self.problems[target.path] = target.problem
            log.warning("Go binary %s (%s) is not traced: %s", target.path,
                        target.version or "unknown Go version", target.problem)
            return
        name = target.open_path.encode()
        try:
            if target.nested and not self.tracepoint_fds:
                self._attach_nested(bpf)
            for fname, addr in sorted(target.functions.items()):
                enter, at_ret = PROGRAMS[fname]
                bpf.attach_uprobe(name=name, addr=addr, fn_name=enter.encode())
                for ret in target.returns.get(fname, ()):
                    bpf.attach_uprobe(name=name, addr=ret, fn_name=at_ret.encode())
        except Exception as exc:  # a file we cannot hook must not stop the agent
            self.attach_failed += 1
            log.warning("cannot attach to Go binary %s: %s", target.path, exc)
            return
        self.attached[target.key] = target
        if not target.pie:
            self._put_cfg(bpf, target, 0, 0)
        log.info("attached to Go binary %s (%s): crypto/tls (*Conn).Write/Read, %d return "
                 "points%s", target.path, target.version,
                 sum(len(r) for r in target.returns.values()),
                 "; no DWARF: connections from the nested read/write syscall"
                 if target.nested else "")

    def _attach_nested(self, bpf):
        from bcc import BPF, lib
        for event, fn_name in NESTED_TRACEPOINTS:
            fn = bpf.load_func(fn_name.encode(), BPF.TRACEPOINT)
            fd = lib.bpf_attach_tracepoint(fn.fd, b"syscalls", event.encode())
            if fd < 0:
                raise RuntimeError(f"cannot attach {fn_name} to syscalls:{event}")
            self.tracepoint_fds.append(fd)

    def detach(self):
        """Close nested mode's tracepoint attachments (the probe's bpf.cleanup() does not
        know them); the uprobes go with the probe's module."""
        from bcc import lib
        for fd in self.tracepoint_fds:
            lib.bpf_close_perf_event_fd(fd)
        self.tracepoint_fds.clear()

    def _register(self, bpf, target, pid):
        bias = load_bias(pid, target)
        if bias is not None:
            self._put_cfg(bpf, target, pid, bias)
            self.pie_pids[pid] = target.key

    def _put_cfg(self, bpf, target, tgid, bias):
        table = bpf[b"go_cfgs"]
        if target.nested:
            val = table.Leaf(flags=GO_CFG_NESTED)
        else:
            val = table.Leaf(itab=target.itab + bias if target.itab else 0, **target.offsets)
        for fname in (WRITE, READ, HANDSHAKE):
            if fname not in target.functions:
                continue
            key = table.Key(tgid=tgid, ip=target.functions[fname] + bias)
            table[key] = val

    def attached_paths(self) -> list:
        return sorted(t.path for t in self.attached.values())

    def stats(self, bpf) -> dict:
        from deeptrace_core import bpf as core
        out = core.counters(bpf, GO_STAT_NAMES, b"go_stats")
        out["go_binaries_attached"] = len(self.attached)
        out["go_binaries_not_traced"] = len(self.problems)
        out["go_attach_failed"] = self.attach_failed
        return out

    def gc(self, bpf):
        """Forget the calls and PIE offsets of processes that are gone."""
        for name in (b"go_calls", b"go_cfgs", b"go_writing"):
            table = bpf[name]
            gone = [k for k in table.keys()
                    if k.tgid and not os.path.exists(f"/proc/{k.tgid}")]
            for key in gone:
                try:
                    del table[key]
                except KeyError:
                    pass
        for pid in [p for p in self.pie_pids if not os.path.exists(f"/proc/{p}")]:
            del self.pie_pids[pid]
