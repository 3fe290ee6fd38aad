"""Finding the files that carry OpenSSL: libraries and executables mapped by processes
whose dynamic symbol table defines ``SSL_write`` (``libssl.so.3``, and ``node``, which
has OpenSSL inside), and the dynamic loaders that define ``_dl_debug_state`` (the
rescan trigger: it runs after every change to a process's link map).

Files are known by (device, inode) as ``/proc/PID/maps`` shows them, so each file is
looked at and attached once however many processes map it, under whatever path; it is
opened through ``/proc/PID/root`` so paths inside containers resolve on the host.
"""

import fnmatch
import os
import stat
import struct

import attrs

SSL_SYMBOLS = ("SSL_read", "SSL_write", "SSL_read_ex", "SSL_write_ex", "SSL_set_fd",
               "SSL_set_bio", "SSL_free", "SSL_do_handshake")
# Defined from OpenSSL 3.0 on: the file's struct bio_st is the layout tls.bpf.c reads.
OPENSSL3_MARK = "SSL_CTX_new_ex"
LOADER_SYMBOL = "_dl_debug_state"
_WANTED = frozenset((*SSL_SYMBOLS, LOADER_SYMBOL, OPENSSL3_MARK))
_SHT_DYNSYM = 11
_STT_FUNC = 2
_SYM = struct.Struct("<IBBHQQ")
# Any process may map any file: a symbol table larger than this is not read (node's is
# ~2 MB), so a crafted file costs bounded memory and time.
MAX_TABLE = 64 << 20
SEEN_MAX = 200_000        # files remembered as looked at (then forgotten but targets)


@attrs.frozen
class Target:
    """A file to attach: the path it was opened by, the path its process maps it at
    (what include/exclude match), and the wanted functions it defines (name -> vaddr)."""

    key: tuple            # (device, inode) as /proc/PID/maps prints them
    open_path: str
    path: str
    symbols: dict

    @property
    def is_ssl(self) -> bool:
        return "SSL_write" in self.symbols and "SSL_read" in self.symbols

    @property
    def openssl3(self) -> bool:
        return OPENSSL3_MARK in self.symbols

    @property
    def is_loader(self) -> bool:
        return LOADER_SYMBOL in self.symbols


def defined_functions(path: str, wanted=_WANTED) -> dict:
    """{name: vaddr} of the `wanted` functions an ELF file's .dynsym defines (what
    another object could call: the exported ones). {} for a file that is not ELF64."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(64)
        if len(head) < 64 or head[:4] != b"\x7fELF" or head[4] != 2 or head[5] != 1:
            return {}
        shoff, = struct.unpack_from("<Q", head, 0x28)
        shentsize, shnum = struct.unpack_from("<HH", head, 0x3A)
        if not shoff or shentsize < 64 or shnum == 0 or shnum > 65535:
            return {}
        f.seek(shoff)
        table = f.read(shentsize * shnum)
        sections = [struct.unpack_from("<IIQQQQIIQQ", table, i * shentsize)
                    for i in range(len(table) // shentsize)]
        for sh in sections:
            if sh[1] != _SHT_DYNSYM or sh[6] >= len(sections):
                continue
            strtab = sections[sh[6]]
            if any(t[5] > MAX_TABLE or t[4] + t[5] > size for t in (sh, strtab)):
                return {}
            f.seek(strtab[4])
            names = f.read(strtab[5])
            # Most files define none of them: a byte search rejects them before the
            # symbol walk (an executable like node has ~80,000 dynamic symbols).
            if not any(n.encode() + b"\0" in names for n in wanted):
                return {}
            f.seek(sh[4])
            syms = f.read(sh[5])
            out = {}
            for st_name, info, _other, shndx, value, _size in _SYM.iter_unpack(
                    syms[: len(syms) // _SYM.size * _SYM.size]):
                if shndx == 0 or value == 0 or info & 0xF != _STT_FUNC:
                    continue  # undefined: an import, not ours to hook
                end = names.find(b"\0", st_name)
                name = names[st_name:end].decode("ascii", "replace")
                if name in wanted:
                    out[name] = value
            return out
    return {}


def mapped_files(pid: int):
    """(key, path) of every file mapped executable in process `pid`."""
    out = {}
    with open(f"/proc/{pid}/maps", "rb") as f:
        for line in f:
            parts = line.split(None, 5)
            if len(parts) < 6 or b"x" not in parts[1] or not parts[5].startswith(b"/"):
                continue
            inode = int(parts[4])
            if inode == 0:
                continue
            path = parts[5].rstrip(b"\n").decode("utf-8", "surrogateescape")
            if path.endswith(" (deleted)"):
                continue  # replaced on disk: what is mapped cannot be opened by path
            out[(parts[3].decode(), inode)] = path
    return out.items()


def wanted_path(path: str, include, exclude) -> bool:
    """include/exclude: glob patterns matched against the full path and its file name."""
    def match(patterns):
        name = os.path.basename(path)
        return any(fnmatch.fnmatchcase(path, p) or fnmatch.fnmatchcase(name, p)
                   for p in patterns)
    if include and not match(include):
        return False
    return not match(exclude)


class Scanner:
    """Which files of which processes to attach, each file once.

    A file is known by (device, inode), and an inode number is reused once its file is
    deleted: a key seen again under another path is checked against the identity (change
    time, size) recorded with it, and looked at anew if it is another file."""

    def __init__(self, include=(), exclude=(), self_pid=None, inspect=None):
        self.include, self.exclude = list(include), list(exclude)
        # (open path, mapped path) -> the symbols of a file to attach, or None; default:
        # OpenSSL's (the trace probe passes its asyncio one: plugins/trace/asyncio.py).
        self.inspect = inspect
        self.self_pid = os.getpid() if self_pid is None else self_pid
        # key -> (path, identity, Target or None: no wanted symbols, excluded)
        self.seen: dict = {}
        self.scans = 0
        self.errors = 0

    def all_pids(self):
        return [int(p) for p in os.listdir("/proc") if p.isdigit()]

    def scan(self, pids) -> list:
        """New Targets found in the given processes (those already seen are skipped)."""
        new = []
        for pid in pids:
            if pid == self.self_pid:
                continue
            try:
                files = mapped_files(pid)
            except OSError:
                continue  # gone, or a kernel thread
            self.scans += 1
            if len(self.seen) > SEEN_MAX:
                self.seen = {k: v for k, v in self.seen.items() if v[2] is not None}
            for key, path in files:
                known = self.seen.get(key)
                if known is not None and (known[0] == path or
                                          known[1] == _identity(pid, path)):
                    continue
                st, target = self._look(pid, key, path)
                self.seen[key] = (path, st, target)
                if target is not None:
                    new.append(target)
        return new

    def _look(self, pid, key, path):
        open_path = f"/proc/{pid}/root{path}"
        try:
            st = os.stat(open_path)
            if st.st_ino != key[1] or not stat.S_ISREG(st.st_mode):
                return None, None  # replaced since it was mapped, or not a plain file
            if self.inspect is not None:
                symbols = self.inspect(open_path, path)
                ident = (st.st_ctime_ns, st.st_size)
                if not symbols or not wanted_path(path, self.include, self.exclude):
                    return ident, None
                return ident, Target(key, open_path, path, symbols)
            symbols = defined_functions(open_path)
        except (OSError, ValueError, struct.error):
            self.errors += 1
            return None, None
        ident = (st.st_ctime_ns, st.st_size)
        target = Target(key, open_path, path, symbols)
        if target.is_loader:
            return ident, target
        if not target.is_ssl or not wanted_path(path, self.include, self.exclude):
            return ident, None
        return ident, target


def _identity(pid, path):
    try:
        st = os.stat(f"/proc/{pid}/root{path}")
    except OSError:
        return None
    return (st.st_ctime_ns, st.st_size)
