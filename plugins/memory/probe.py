"""The memory probe: page faults, resident memory and OOM kills per process, from kernel
tracepoints aggregated in the kernel (and perf software events for major/minor faults).

Metrics (read from the kernel maps once per ``interval``), per process
(``process.pid``, ``process.executable.name``; the ``top_n`` processes by RSS and by
faults in the interval, the rest folded into ``process.pid="other"``):

- ``process.paging.faults`` (sum) with ``process.paging.fault_type`` major/minor (perf
  software events page-faults-maj/-min; ``fault_types: false`` turns them off).
- ``deeptrace.memory.page_faults`` (sum) with ``deeptrace.page_fault.mode`` user/kernel:
  page fault exceptions taken in user mode or in kernel mode (exceptions:page_fault_*).
- ``process.memory.usage`` (gauge, By): resident memory, file + anon + shmem, as the kernel
  last reported it (kmem:rss_stat); ``deeptrace.memory.rss`` (gauge, By) by
  ``deeptrace.memory.rss_type`` file/anon/shmem and ``deeptrace.memory.swap`` (gauge, By).
  A process appears once one of its counters changes after the probe attached.
- ``deeptrace.memory.page_alloc`` (sum, By): pages allocated while the process ran
  (kmem:mm_page_alloc; off unless ``page_alloc: true``).
- ``deeptrace.memory.oom_kills`` (sum) per victim ``process.executable.name``.

Every OOM kill is also returned at once (not only at the interval) as an
:class:`~deeptrace_plugins.memory.decoder.OomEvent` record (kind ``"oom"``).
"""

from __future__ import annotations

import ctypes
import logging
import os
import time
from collections import defaultdict

import attrs
from attrs import validators as v

from deeptrace_core import bpf
from deeptrace_core.metrics import GAUGE, SUM, MetricPoint
from deeptrace_plugins.cpu.probe import tracepoint_has_field
from deeptrace_plugins.cpu.topn import OTHER, Folder, select

from .decoder import STAT_NAMES, decode_oom

log = logging.getLogger("deeptrace.memory")

GRACE_NS = 500_000_000   # an exited process is forgotten once its exit is this old
# Per-process cumulative vector.
V_USER, V_KERNEL, V_MINOR, V_MAJOR, V_ALLOC = range(5)
RSS_TYPES = ("file", "anon", "swap", "shmem")   # kernel MM_* counter order
FILE, ANON, SWAP, SHMEM = range(4)


def _power_of_two(inst, attribute, value):
    if value <= 0 or value & (value - 1):
        raise ValueError(f"{attribute.name} must be a power of two, got {value}")


@attrs.define
class MemoryConfig:
    """``probes.memory`` in the YAML config."""

    interval: float = attrs.field(default=10.0, validator=v.gt(0), metadata={"unit": "seconds"})
    top_n: int = attrs.field(default=20, validator=v.ge(1))
    max_processes: int = attrs.field(default=16384, validator=v.ge(64))
    fault_types: bool = True      # major/minor faults via perf software events
    page_alloc: bool = False      # kmem:mm_page_alloc per process (every page allocation)
    ringbuf_pages: int = attrs.field(default=16, validator=_power_of_two)   # OOM events


class MemoryProbe:
    name = "memory"
    config_class = MemoryConfig
    kernel_fields = ("task_struct.group_leader", "task_struct.comm")
    source = ("deeptrace_plugins.memory", "memory.bpf.c")

    def __init__(self, config: MemoryConfig, context=None):
        self.config = config
        self.context = context
        self.bpf = None
        self.start_ns = 0
        self._next_due = 0.0
        self._folder = Folder(V_ALLOC + 1)
        self._events: list = []
        self.oom_kills: dict = defaultdict(int)   # victim comm -> kills since attach
        self.decode_errors = 0

    # -- build --------------------------------------------------------------------------
    def defines(self) -> dict:
        c = self.config
        return {
            "MAX_PROCS": c.max_processes,
            "MAX_MMS": c.max_processes * 2,
            "RINGBUF_PAGES": c.ringbuf_pages,
            "PAGE_ALLOC": int(c.page_alloc),
            "FAULT_TYPES": int(c.fault_types),
            "PAGE_SIZE_BYTES": os.sysconf("SC_PAGE_SIZE"),
            "HAVE_GROUP_DEAD": int(tracepoint_has_field("sched", "sched_process_exit",
                                                        "group_dead")),
        }

    def render(self, defines: dict) -> str:
        return bpf.render(bpf.read_source(*self.source), {**defines, **self.defines()})

    # -- run ----------------------------------------------------------------------------
    def attach(self, defines: dict):
        self.bpf = bpf.load(self.render(defines))
        try:
            if self.config.fault_types:
                from bcc import PerfSWConfig, PerfType
                for fn, ev in ((b"on_fault_minor", PerfSWConfig.PAGE_FAULTS_MIN),
                               (b"on_fault_major", PerfSWConfig.PAGE_FAULTS_MAJ)):
                    self.bpf.attach_perf_event(ev_type=PerfType.SOFTWARE, ev_config=ev,
                                               fn_name=fn, sample_period=1)
            self.bpf[b"oom_events"].open_ring_buffer(self._on_oom)
        except Exception:
            self.bpf.cleanup()
            self.bpf = None
            raise
        self.start_ns = time.time_ns()
        self._next_due = time.monotonic() + self.config.interval

    def _on_oom(self, ctx, data, size):
        try:
            ev = decode_oom(ctypes.string_at(data, size))
        except Exception:  # a malformed record is counted, never fatal
            self.decode_errors += 1
            return
        self.oom_kills[ev.victim_comm] += 1
        self._events.append(ev)

    def poll(self, timeout_ms: int | None = None) -> list:
        """Never blocks: OOM events at once; metric points once the interval has elapsed.
        ``poll(0)`` (the agent's final drain) collects at once."""
        if self.bpf is None:
            return []
        self.bpf.ring_buffer_consume()
        out, self._events = self._events, []
        now = time.monotonic()
        if timeout_ms == 0 or now >= self._next_due:
            self._next_due = now + self.config.interval
            out += self.collect()
        return out

    # -- metrics ------------------------------------------------------------------------
    def collect(self) -> list:
        """Read the kernel maps and return this interval's metric points."""
        b = self.bpf
        now_mono = time.monotonic_ns()
        vecs, rss, comms, mm_ids = {}, {}, {}, {}
        for k, val in b[b"procs"].items():
            t = k.value
            vecs[t] = [val.faults_user, val.faults_kernel, val.faults_minor, val.faults_major,
                       val.alloc_bytes]
            rss[t] = [max(0, int(x)) for x in val.rss]
            comms[t] = bytes(val.comm).split(b"\0", 1)[0].decode("utf-8", "replace")
            mm_ids[t] = val.mm_id
        exited = {k.value: val.value for k, val in b[b"exited"].items()}
        gone = {t for t, ts in exited.items() if now_mono - ts > GRACE_NS}
        live = {t for t in vecs if t not in exited}

        def resident(t):
            r = rss[t]
            return r[FILE] + r[ANON] + r[SHMEM]

        by_rss = sorted(live, key=lambda t: (-resident(t), t))
        faults = {t: sum(self._folder.delta(t, vec)[V_USER:V_KERNEL + 1])
                  for t, vec in vecs.items()}
        by_faults = sorted(vecs, key=lambda t: (-faults[t], t))
        selected = select(self.config.top_n, by_rss, by_faults)
        unselected = set(vecs) - selected
        other = self._folder.fold(vecs, selected, gone)
        other_rss = [sum(rss[t][i] for t in unselected if t in live) for i in range(4)]

        now_ns = time.time_ns()
        points = []
        for t in sorted(selected):
            attributes = {"process.pid": t, "process.executable.name": comms[t]}
            points += self._sums(vecs[t], attributes, now_ns)
            if t in live and mm_ids[t]:
                points += self._gauges(rss[t], attributes, now_ns)
        if unselected or any(other):
            attributes = {"process.pid": OTHER, "process.executable.name": OTHER}
            points += self._sums(other, attributes, now_ns)
            points += self._gauges(other_rss, attributes, now_ns)
        for comm, n in sorted(self.oom_kills.items()):
            points.append(MetricPoint("deeptrace.memory.oom_kills", SUM, "{kill}", n,
                                      {"process.executable.name": comm},
                                      "Processes killed by the OOM killer, by victim name",
                                      start_ns=self.start_ns, time_ns=now_ns))
        self._forget(gone, mm_ids)
        return points

    def _sums(self, vec, attributes, now_ns) -> list:
        common = dict(start_ns=self.start_ns, time_ns=now_ns)
        out = []
        if self.config.fault_types:
            for kind, idx in (("major", V_MAJOR), ("minor", V_MINOR)):
                out.append(MetricPoint("process.paging.faults", SUM, "{fault}", vec[idx],
                                       {**attributes, "process.paging.fault_type": kind},
                                       "Page faults of the process", **common))
        for mode, idx in (("user", V_USER), ("kernel", V_KERNEL)):
            out.append(MetricPoint("deeptrace.memory.page_faults", SUM, "{fault}", vec[idx],
                                   {**attributes, "deeptrace.page_fault.mode": mode},
                                   "Page fault exceptions of the process, by CPU mode",
                                   **common))
        if self.config.page_alloc:
            out.append(MetricPoint("deeptrace.memory.page_alloc", SUM, "By", vec[V_ALLOC],
                                   dict(attributes), "Pages allocated while the process ran",
                                   **common))
        return out

    def _gauges(self, r, attributes, now_ns) -> list:
        common = dict(start_ns=self.start_ns, time_ns=now_ns)
        out = [MetricPoint("process.memory.usage", GAUGE, "By", r[FILE] + r[ANON] + r[SHMEM],
                           dict(attributes), "Resident memory of the process", **common)]
        for kind in ("file", "anon", "shmem"):
            out.append(MetricPoint("deeptrace.memory.rss", GAUGE, "By", r[RSS_TYPES.index(kind)],
                                   {**attributes, "deeptrace.memory.rss_type": kind},
                                   "Resident memory of the process by kind", **common))
        out.append(MetricPoint("deeptrace.memory.swap", GAUGE, "By", r[SWAP], dict(attributes),
                               "Swapped-out memory of the process", **common))
        return out

    def _forget(self, gone, mm_ids):
        b = self.bpf
        owners = b[b"mm_owner"]
        for t in gone:
            key = ctypes.c_uint32(t)
            for table in (b[b"procs"], b[b"exited"]):
                try:
                    del table[key]
                except KeyError:
                    pass
            mm = ctypes.c_uint32(mm_ids.get(t, 0))
            try:
                if mm.value and owners[mm].value == t:   # not if a new mm reuses the id
                    del owners[mm]
            except KeyError:
                pass

    # -- counters / teardown ------------------------------------------------------------
    def stats(self) -> dict:
        if self.bpf is None:
            return {}
        out = bpf.counters(self.bpf, STAT_NAMES)
        out["decode_failed"] = self.decode_errors
        out["procs_entries"] = len(self.bpf[b"procs"])
        return out

    def detach(self):
        if self.bpf is not None:
            try:
                self.bpf.ring_buffer_consume()
            finally:
                self.bpf.cleanup()
                self.bpf = None
