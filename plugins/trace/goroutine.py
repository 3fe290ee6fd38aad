"""Go programs for the trace probe: which processes run Go, where their goroutine ids are,
and the uprobes that follow a call across goroutines (trace.bpf.c, GO_ENABLED).

- A process is Go when its executable has a ``.go.buildinfo`` section (the tls probe's
  Go discovery, plugins/tls/golang.py, reused: same version reader, same ``ret`` finder),
  looked at when it is exec'd (trace.bpf.c's sched_process_exec sends its tgid on
  ``go_events``), at start-up and at each full rescan; each executable once, by
  (device, inode, mtime).
- ``runtime.g.goid``'s offset comes from the binary's DWARF. Without DWARF (``-w``), or
  before Go 1.17 (no register ABI: g is not in R14), the binary is reported once (log and
  ``go_binaries_untraced``) and its records keep goid 0: they are linked by thread.
- Uprobes, from the ELF symbol table (Go 1.19 has all four): ``net/http.(*persistConn)``
  ``.roundTrip`` (entry and each ``ret``), ``.writeLoop`` and ``.readLoop`` (entry), and
  ``runtime.newproc1`` (entry and each ``ret``). Never uretprobes: they rewrite a return
  address on a goroutine stack that Go moves.
- Spawn edges (child -> parent goid) arrive on ``go_events``; :class:`GoTracker` keeps
  them per process (bounded) and gives each Go record its ancestors (``go_parents``),
  which the ``goroutine`` linker rule follows to the goroutine serving a request.
"""

import logging
import os
import struct
from collections import OrderedDict

import attrs

from deeptrace_plugins.tls.discovery import wanted_path
from deeptrace_plugins.tls.golang import (MIN_VERSION, _read_vaddr,
                                          proc_exes, read_go_elf, ret_offsets, struct_offsets,
                                          version_tuple)

log = logging.getLogger("deeptrace.trace")

ROUNDTRIP = "net/http.(*persistConn).roundTrip"
WRITE_LOOP = "net/http.(*persistConn).writeLoop"
READ_LOOP = "net/http.(*persistConn).readLoop"
NEWPROC1 = "runtime.newproc1"
# function -> (entry program, program at each ret or None)
PROGRAMS = {ROUNDTRIP: ("go_roundtrip_enter", "go_roundtrip_return"),
            WRITE_LOOP: ("go_loop_enter", None),
            READ_LOOP: ("go_loop_enter", None),
            NEWPROC1: ("go_newproc1_enter", "go_newproc1_return")}
G_STRUCT = {"runtime.g": ("goid",)}
# trace.bpf.c's go_stats slots, in enum order.
GO_STAT_NAMES = ("go_goid_read_failed", "go_handoffs", "go_loop_idle",
                 "go_spawns", "go_events_full", "go_roundtrips")
GO_EV_EXEC, GO_EV_SPAWN = 1, 2
GO_EVENT = struct.Struct("<IIQQQ")
MAX_DEPTH = 8              # ancestors given to a record
MAX_EDGES = 262144         # spawn edges kept over all processes (LRU)


def _unpack_event(data, off, length):
    if length < GO_EVENT.size:
        raise ValueError(f"go event of {length} bytes")
    return GO_EVENT.unpack_from(data, off)


@attrs.frozen
class GoBinary:
    """A Go executable: the goid offset and the functions to probe, or why not (problem)."""

    key: tuple
    path: str
    version: str
    goid_off: int | None = None
    functions: dict = attrs.field(factory=dict)   # name -> vaddr
    returns: dict = attrs.field(factory=dict)     # name -> [vaddr of each ret]
    problem: str | None = None


def inspect(open_path: str, path: str, key: tuple) -> GoBinary | None:
    """A GoBinary for a Go executable, None for any other file."""
    return read_go_elf(open_path, path,
                       lambda elf, version: _inspect_go(elf, path, key, version))


def _inspect_go(elf, path, key, version) -> GoBinary:
    base = dict(key=key, path=path, version=version)
    v = version_tuple(version)
    if v is not None and v < MIN_VERSION:
        return GoBinary(**base, problem=f"{version}: before Go 1.17, g is not in R14")
    offsets = struct_offsets(elf, G_STRUCT)
    if offsets is None:
        return GoBinary(**base, problem="no DWARF (runtime.g.goid's offset is unknown)")
    functions, returns = {}, {}
    symtab = elf.get_section_by_name(".symtab")
    if symtab is not None:
        for s in symtab.iter_symbols():
            if s.name in PROGRAMS and s["st_value"]:
                functions[s.name] = s["st_value"]
                if PROGRAMS[s.name][1]:
                    code = _read_vaddr(elf, s["st_value"], s["st_size"]) or b""
                    returns[s.name] = ret_offsets(code, s["st_value"])
        for name in list(returns):
            if not returns[name]:   # no ret found: the entry alone would leave stale state
                del functions[name], returns[name]
    return GoBinary(**base, goid_off=offsets["runtime.g"]["goid"], functions=functions,
                    returns=returns)


class GoTracker:
    """Go processes for the trace probe: ``go_procs`` entries, uprobes, spawn edges."""

    def __init__(self, include=(), exclude=(), self_pid=None):
        self.include, self.exclude = list(include), list(exclude)
        self.self_pid = os.getpid() if self_pid is None else self_pid
        self.seen: dict = {}        # key -> GoBinary or None (not Go)
        self.attached: set = set()  # keys of binaries whose uprobes are attached
        self.procs: dict = {}       # tgid -> key registered in go_procs
        self.problems: dict = {}    # path -> why its goroutines are not read (once each)
        self.edges: OrderedDict = OrderedDict()   # (pid, child goid) -> parent goid
        self.counts = {"go_attach_failed": 0, "go_edges_evicted": 0, "go_events": 0}
        self.ring = None

    # -- processes ------------------------------------------------------------------------
    def rescan(self, bpf, pids) -> int:
        """Register the Go processes among `pids`; how many are new (the probe then has
        its threads look at go_procs again: they cache what they found)."""
        added = 0
        for pid, exe, path, key in proc_exes(pids, self.self_pid):
            if key not in self.seen:
                self.seen[key] = inspect(exe, path, key) \
                    if wanted_path(path, self.include, self.exclude) else None
                self._attach(bpf, self.seen[key], exe)
            binary = self.seen[key]
            if binary is None or binary.goid_off is None or self.procs.get(pid) == key:
                continue
            table = bpf[b"go_procs"]
            # Threads may cache goroutine ids only where newproc1's entry tells them
            # when a g gets a new one.
            table[table.Key(pid)] = table.Leaf(
                goid_off=binary.goid_off,
                cache=int(key in self.attached and NEWPROC1 in binary.functions))
            self.procs[pid] = key
            added += 1
        return added

    def _attach(self, bpf, binary, open_path):
        if binary is None:
            return
        if binary.problem:
            self.problems[binary.path] = binary.problem
            log.warning("Go binary %s (%s): goroutines not read, its calls are linked by "
                        "thread: %s", binary.path, binary.version or "unknown version",
                        binary.problem)
            return
        missing = sorted(set(PROGRAMS) - set(binary.functions))
        try:
            for fname, addr in sorted(binary.functions.items()):
                enter, at_ret = PROGRAMS[fname]
                bpf.attach_uprobe(name=open_path.encode(), addr=addr, fn_name=enter.encode())
                for ret in binary.returns.get(fname, ()):
                    bpf.attach_uprobe(name=open_path.encode(), addr=ret,
                                      fn_name=at_ret.encode())
        except Exception as exc:  # a file we cannot hook must not stop the agent
            self.counts["go_attach_failed"] += 1
            log.warning("cannot attach to Go binary %s: %s", binary.path, exc)
            return
        self.attached.add(binary.key)
        log.info("Go binary %s (%s): goroutines read (goid at %d)%s", binary.path,
                 binary.version, binary.goid_off,
                 f"; not in its symbol table: {', '.join(missing)}" if missing else "")

    def exec_pids(self) -> list:
        """Processes that exec'd since the last call (and spawn edges, kept), from
        go_events."""
        if self.ring is None:
            return []
        events: list = []
        self.ring.consume(_unpack_event, events)
        execs = []
        for kind, tgid, goid, parent, _ts in events:
            self.counts["go_events"] += 1
            if kind == GO_EV_EXEC:
                execs.append(tgid)
                self.procs.pop(tgid, None)  # the kernel dropped its go_procs entry
            elif kind == GO_EV_SPAWN:
                self.edges[(tgid, goid)] = parent
                if len(self.edges) > MAX_EDGES:
                    self.edges.popitem(last=False)
                    self.counts["go_edges_evicted"] += 1
        return execs

    def annotate(self, records):
        """Each Go record's ancestors by spawn, nearest first (at most MAX_DEPTH)."""
        edges = self.edges
        if not edges:
            return
        for rec in records:
            goid = getattr(rec, "goid", 0)
            if not goid:
                continue
            pid, chain = rec.pid, []
            parent = edges.get((pid, goid))
            while parent and len(chain) < MAX_DEPTH:
                chain.append(parent)
                parent = edges.get((pid, parent))
            if chain:
                rec.go_parents = tuple(chain)

    def stats(self, bpf) -> dict:
        from deeptrace_core import bpf as core
        out = core.counters(bpf, GO_STAT_NAMES, b"go_stats")
        out.update(self.counts)
        out["go_processes"] = len(self.procs)
        out["go_binaries_traced"] = len(self.attached)
        out["go_binaries_untraced"] = len(self.problems)
        out["go_spawn_edges"] = len(self.edges)
        out["go_events_bad"] = self.ring.decode_errors if self.ring else 0
        return out

    def gc(self, bpf):
        """Forget processes that are gone (their go_procs entries and spawn edges)."""
        gone = [p for p in self.procs if not os.path.exists(f"/proc/{p}")]
        table = bpf[b"go_procs"]
        for pid in gone:
            del self.procs[pid]
            try:
                del table[table.Key(pid)]
            except KeyError:
                pass
        if gone:
            dead = set(gone)
            for key in [k for k in self.edges if k[0] in dead]:
                del self.edges[key]
