"""The disk probe: block I/O latency, sizes, queue time, bytes and operations per device
and per process, aggregated in the kernel (disk.bpf.c) and read every ``interval``.

Metrics (cumulative since attach; see deeptrace_core.metrics):

=====================================  =========  ====  ===================================
name                                   type       unit  attributes
=====================================  =========  ====  ===================================
process.disk.io                        sum        By    process.pid, process.executable.name,
                                                        system.device, disk.io.direction
deeptrace.process.disk.operations      sum        {operation}  (same)
deeptrace.process.disk.io.latency      histogram  s     process.pid, process.executable.name,
                                                        disk.io.direction
deeptrace.disk.io.latency              histogram  s     system.device, disk.io.direction
deeptrace.disk.io.queue_time           histogram  s     system.device, disk.io.direction
deeptrace.disk.io.size                 histogram  By    system.device, disk.io.direction
=====================================  =========  ====  ===================================

Latency is device time, block_rq_issue -> block_rq_complete; queue time is
block_rq_insert -> block_rq_issue, for requests that went through an I/O scheduler (both
tracepoints fire). The size histogram's count and sum are each device's operations and
bytes. ``disk.io.direction`` is ``read``/``write`` (rwbs R/W), or ``discard``, ``flush``
(REQ_OP_FLUSH, or a preflush write carrying no data), ``other``. The process is the one
current when the request was inserted (or, without a scheduler, issued): for writeback
that is the flusher thread, not the process that dirtied the pages; direct and
synchronous I/O is attributed to its process.

Losses are counted in ``stats()``: map overflows; ``prog_recursion_misses`` (the kernel
skipped a program because another BPF program was running on that CPU);
``lost_completion`` (an issued request whose completion never reached us: the kernel also
drops tracepoint events silently when its perf recursion guard is taken, seen on this
platform for completions in softirq over some tasks); ``unmatched_complete`` (issued
before attach).
"""

import logging
import os
import time

import attrs
from attrs import validators as v

from deeptrace_core import bpf
from deeptrace_core.metricprobe import BpfMetricProbe, ProcessConfig
from deeptrace_core.metrics import HISTOGRAM, SUM, MetricPoint, log2_bounds
from deeptrace_core.proccounters import (ProcessCounters, accumulate, busiest, delete, labels,
                                         task_name)

log = logging.getLogger("deeptrace.disk")

NSLOTS = 27                     # log2 buckets: 1 us .. 2^26 us (67 s), 1 B .. 64 MiB, +Inf
DIRECTIONS = ("read", "write", "discard", "flush", "other")
H_LATENCY, H_QUEUE, H_SIZE = 0, 1, 2
STAT_NAMES = ("completed", "inflight_map_full", "proc_map_full", "hist_map_full",
              "unmatched_complete", "complete_without_issue", "lost_completion")
LAT_BOUNDS = log2_bounds(1e-6, NSLOTS)
SIZE_BOUNDS = log2_bounds(1, NSLOTS)


@attrs.define
class DiskConfig(ProcessConfig):
    """``probes.disk`` in the YAML config."""

    max_inflight: int = attrs.field(default=16384, validator=[v.ge(64), v.le(1 << 22)])
    stale_seconds: float = attrs.field(default=120.0, validator=v.gt(0),
                                       metadata={"unit": "seconds"})


def device_names() -> dict:
    """Kernel dev_t (major << 20 | minor, as block tracepoints carry it) -> name."""
    names = {}
    try:
        with open("/proc/partitions") as f:
            for line in f.read().splitlines()[2:]:
                parts = line.split()
                if len(parts) == 4:
                    names[int(parts[0]) << 20 | int(parts[1])] = parts[3]
    except OSError:
        pass
    return names


def partitions() -> dict:
    """Partition dev_t -> its whole disk's dev_t (kernel encoding), from /sys/class/block."""
    def devt(path):
        with open(os.path.join(path, "dev")) as f:
            major, minor = f.read().split(":")
        return int(major) << 20 | int(minor)

    out = {}
    base = "/sys/class/block"
    try:
        names = os.listdir(base)
    except OSError:
        return out
    for name in names:
        path = os.path.realpath(os.path.join(base, name))
        if os.path.exists(os.path.join(path, "partition")):
            try:
                out[devt(path)] = devt(os.path.dirname(path))
            except (OSError, ValueError):
                pass
    return out


class DiskProbe(BpfMetricProbe):
    name = "disk"
    config_class = DiskConfig
    kernel_fields = ()           # tracepoint fields only: no kernel struct is read
    source = ("deeptrace_plugins.disk", "disk.bpf.c")
    stat_names = STAT_NAMES

    def __init__(self, config: DiskConfig, context=None):
        super().__init__(config, context)
        self._devs = {}
        # Per-process maps; gc() folds exited processes out of them.
        self._io = ProcessCounters(b"proc_io", lambda k: (k.tgid, task_name(k.comm), k.dev, k.dir),
                                   lambda v: (v.bytes, v.ops), config.max_processes)
        self._hist = ProcessCounters(b"proc_hist",
                                     lambda k: (k.tgid, task_name(k.comm), k.dir, k.slot),
                                     lambda v: (v.count, v.sum), config.max_processes)
        self.stale_dropped = 0           # in-flight entries aged out by gc()
        self.stale_lost = 0              # ... of them issued: a completion we never saw

    # -- build --------------------------------------------------------------------------
    def defines(self) -> dict:
        c = self.config
        return {"INFLIGHT_MAX": c.max_inflight, "PROC_MAX": c.max_processes,
                "HIST_MAX": c.max_processes * 4, "NSLOTS": NSLOTS}

    # -- run ----------------------------------------------------------------------------
    def attach(self, defines: dict):
        self.load(defines)
        self._devs = device_names()
        self._load_partitions()

    def _load_partitions(self):
        table = self.bpf[b"part_to_disk"]
        for part, disk in partitions().items():
            table[table.Key(part)] = table.Leaf(disk)

    def poll(self, timeout_ms: int | None = None) -> list:
        """Never blocks: every point when due (deeptrace_core.metricprobe), else []."""
        return self.collect() if self.due(timeout_ms) else []

    def device(self, dev: int) -> str:
        name = self._devs.get(dev)
        if name is None:
            self._devs = device_names()
            name = self._devs.setdefault(dev, f"{dev >> 20}:{dev & 0xFFFFF}")
        return name

    # -- reading the maps ---------------------------------------------------------------
    def process_io(self) -> dict:
        """(pid, comm, dev, direction) -> [bytes, ops], exited processes included."""
        return self._io.read(self.bpf)

    def process_hist(self) -> dict:
        """(pid, comm, direction, slot) -> [count, sum_ns], exited processes included."""
        return self._hist.read(self.bpf)

    def device_hist(self) -> dict:
        """(dev, kind, direction, slot) -> [count, sum]."""
        return {(k.dev, k.kind, k.dir, k.slot): [val.count, val.sum]
                for k, val in self.bpf[b"dev_hist"].items()}

    def collect(self) -> list:
        now = time.time_ns()
        io, phist, dhist = self.process_io(), self.process_hist(), self.device_hist()
        # Busiest processes by bytes, then operations; the rest become pid "other".
        load: dict = {}
        for (pid, comm, _, _), vals in io.items():
            accumulate(load, (pid, comm), vals)
        for (pid, comm, _, _) in phist:
            load.setdefault((pid, comm), [0, 0])
        top = busiest(self.config.top_n, load)

        points = []
        sums: dict = {}
        for (pid, comm, dev, d), vals in io.items():
            accumulate(sums, (labels(pid, comm, top), self.device(dev), DIRECTIONS[d]), vals)
        for (proc, device, direction), (nbytes, ops) in sorted(sums.items(), key=str):
            attributes = {**dict(proc), "system.device": device, "disk.io.direction": direction}
            points.append(MetricPoint("process.disk.io", SUM, "By", nbytes, dict(attributes),
                                      "Bytes transferred by block requests of the process",
                                      start_ns=self.start_ns, time_ns=now))
            points.append(MetricPoint("deeptrace.process.disk.operations", SUM, "{operation}",
                                      ops, dict(attributes),
                                      "Block requests of the process",
                                      start_ns=self.start_ns, time_ns=now))

        hists: dict = {}
        for (pid, comm, d, slot), (count, total) in phist.items():
            key = (labels(pid, comm, top), DIRECTIONS[d])
            h = hists.setdefault(key, [[0] * (NSLOTS + 1), 0])
            h[0][min(slot, NSLOTS)] += count
            h[1] += total
        for (proc, direction), (counts, total) in sorted(hists.items(), key=str):
            points.append(_hist("deeptrace.process.disk.io.latency", "s", LAT_BOUNDS, counts,
                                total / 1e9, {**dict(proc), "disk.io.direction": direction},
                                "Block request latency (issue to complete) of the process",
                                self.start_ns, now))

        names = {H_LATENCY: ("deeptrace.disk.io.latency", "s", LAT_BOUNDS, 1e-9,
                             "Block request latency, issue to complete (device time)"),
                 H_QUEUE: ("deeptrace.disk.io.queue_time", "s", LAT_BOUNDS, 1e-9,
                           "Block request time in the I/O scheduler, insert to issue"),
                 H_SIZE: ("deeptrace.disk.io.size", "By", SIZE_BOUNDS, 1,
                          "Block request size; count and sum are operations and bytes")}
        dev_h: dict = {}
        for (dev, kind, d, slot), (count, total) in dhist.items():
            h = dev_h.setdefault((kind, self.device(dev), DIRECTIONS[d]),
                                 [[0] * (NSLOTS + 1), 0])
            h[0][min(slot, NSLOTS)] += count
            h[1] += total
        for (kind, device, direction), (counts, total) in sorted(dev_h.items()):
            name, unit, bounds, scale, desc = names[kind]
            points.append(_hist(name, unit, bounds, counts, total * scale,
                                {"system.device": device, "disk.io.direction": direction},
                                desc, self.start_ns, now))
        return points

    # -- housekeeping -------------------------------------------------------------------
    def gc(self):
        """Fold exited processes out of the kernel maps (their totals are kept here), and
        drop in-flight entries older than ``stale_seconds`` (completions never seen)."""
        if self.bpf is None:
            return
        self._io.gc(self.bpf)
        self._hist.gc(self.bpf)
        self._load_partitions()
        table = self.bpf[b"inflight"]
        limit = time.monotonic_ns() - int(self.config.stale_seconds * 1e9)
        for k, val in list(table.items()):
            if max(val.ts_insert, val.ts_issue) < limit:
                delete(table, k)
                self.stale_dropped += 1
                self.stale_lost += bool(val.ts_issue)

    def stats(self) -> dict:
        if self.bpf is None:
            return {}
        out = self.counters()
        out["lost_completion"] += self.stale_lost
        out["prog_recursion_misses"] = sum(bpf.recursion_misses(self.bpf).values())
        out["inflight_stale_dropped"] = self.stale_dropped
        out["inflight_entries"] = len(self.bpf[b"inflight"])
        return out


def _hist(name, unit, bounds, counts, total, attributes, desc, start_ns, now) -> MetricPoint:
    return MetricPoint(name, HISTOGRAM, unit, 0, attributes, desc, bounds=tuple(bounds),
                       counts=tuple(counts), count=sum(counts), sum=total,
                       start_ns=start_ns, time_ns=now)
