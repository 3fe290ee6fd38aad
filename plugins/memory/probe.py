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

from deeptrace_core.metricprobe import BpfMetricProbe, ProcessConfig, power_of_two
from deeptrace_core.metrics import GAUGE, SUM, MetricPoint
from deeptrace_core.proccounters import (OTHER, PROCESS_FIELDS, Folder, delete, exits, forget,
                                         process_defines, select, task_name)

from .decoder import STAT_NAMES, decode_oom

log = logging.getLogger("deeptrace.memory")

# Per-process cumulative vector.
V_USER, V_KERNEL, V_MINOR, V_MAJOR, V_ALLOC = range(5)
RSS_TYPES = ("file", "anon", "swap", "shmem")   # kernel MM_* counter order
FILE, ANON, SWAP, SHMEM = range(4)


@attrs.define
class MemoryConfig(ProcessConfig):
    """``probes.memory`` in the YAML config."""

    fault_types: bool = True      # major/minor faults via perf software events
    page_alloc: bool = False      # kmem:mm_page_alloc per process (every page allocation)
    ringbuf_pages: int = attrs.field(default=16, validator=power_of_two)   # OOM events


class MemoryProbe(BpfMetricProbe):
    name = "memory"
    config_class = MemoryConfig
    kernel_fields = PROCESS_FIELDS
    source = ("deeptrace_plugins.memory", "memory.bpf.c")
    stat_names = STAT_NAMES

    def __init__(self, config: MemoryConfig, context=None):
        super().__init__(config, context)
        self._folder = Folder(V_ALLOC + 1)
        self.oom_kills: dict = defaultdict(int)   # victim comm -> kills since attach

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
            **process_defines(),
        }

    # -- run ----------------------------------------------------------------------------
    def attach(self, defines: dict):
        self.load(defines)
        try:
            if self.config.fault_types:
                from bcc import PerfSWConfig, PerfType
                for fn, ev in ((b"on_fault_minor", PerfSWConfig.PAGE_FAULTS_MIN),
                               (b"on_fault_major", PerfSWConfig.PAGE_FAULTS_MAJ)):
                    self.bpf.attach_perf_event(ev_type=PerfType.SOFTWARE, ev_config=ev,
                                               fn_name=fn, sample_period=1)
            self.open_ring(b"oom_events", self._decode_oom)
        except Exception:
            self.bpf.cleanup()
            self.bpf = None
            raise

    def _decode_oom(self, raw: bytes):
        ev = decode_oom(raw)
        self.oom_kills[ev.victim_comm] += 1
        return ev

    def poll(self, timeout_ms: int | None = None) -> list:
        """Never blocks: OOM events at once; the metric points when due
        (deeptrace_core.metricprobe)."""
        out = self.take_records()
        if self.due(timeout_ms):
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
            comms[t] = task_name(val.comm)
            mm_ids[t] = val.mm_id
        exited, gone = exits(b, now_mono)
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
        owners = self.bpf[b"mm_owner"]
        for t in gone:
            forget(self.bpf, t)
            mm = ctypes.c_uint32(mm_ids.get(t, 0))
            owner = owners.get(mm) if mm.value else None
            if owner is not None and owner.value == t:   # not if a new mm reuses the id
                delete(owners, mm)

    # -- counters / teardown ------------------------------------------------------------
    def stats(self) -> dict:
        if self.bpf is None:
            return {}
        out = self.counters()
        out["decode_failed"] = self.decode_errors
        out["procs_entries"] = len(self.bpf[b"procs"])
        return out
