"""The cpu probe: on-CPU time, context switches and run-queue latency per process, from
scheduler tracepoints aggregated in the kernel; optionally a sampling CPU profiler that
writes folded stacks and a flame graph SVG.

Metrics (read from the kernel maps once per ``interval``):

- ``process.cpu.time`` (sum, s): on-CPU time, user and system together (sched_switch
  cannot tell them apart, so there is no ``cpu.mode`` attribute).
- ``process.context_switches`` (sum) with ``process.context_switch_type`` voluntary
  (blocked) or involuntary (preempted while runnable), as the kernel's nvcsw/nivcsw count.
- ``deeptrace.cpu.runqueue.latency`` (histogram, s): time from becoming runnable (wake-up,
  or preemption) to running again, log2 buckets.

Attributes: ``process.pid`` (tgid) and ``process.executable.name`` (the leader's comm).
The ``top_n`` busiest processes by CPU time in the interval get their own series; the rest
are folded into ``process.pid="other"``.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from collections import defaultdict

import attrs
from attrs import validators as v

from deeptrace_core.metricprobe import BpfMetricProbe, ProcessConfig
from deeptrace_core.metrics import HISTOGRAM, SUM, MetricPoint, log2_bounds
from deeptrace_core.proccounters import (OTHER, PROCESS_FIELDS, Folder, delete, exits, forget,
                                         pid_alive, process_defines, read_tgid, select,
                                         task_name)

from . import flamegraph

log = logging.getLogger("deeptrace.cpu")

# Counter slots of the per-CPU `stats` array, in C enum order.
STAT_NAMES = ("switches", "proc_map_full", "wake_map_full", "hist_map_full", "exit_map_full",
              "switch_unseen", "samples", "stack_lost", "stack_collision", "profile_map_full")

HIST_MIN_SLOT = 10    # first bucket: below 2^10 ns (~1 us)
HIST_MAX_SLOT = 36    # last finite bound 2^35 ns (~34 s); slot 36 is the +Inf bucket
HIST_BOUNDS = log2_bounds(2 ** HIST_MIN_SLOT * 1e-9, HIST_MAX_SLOT - HIST_MIN_SLOT)
NBUCKETS = HIST_MAX_SLOT - HIST_MIN_SLOT + 1
# Per-process vector: cpu_ns, voluntary, involuntary, rq_count, rq_sum_ns, buckets...
V_CPU, V_VOL, V_INVOL, V_RQN, V_RQSUM, V_HIST = range(6)


@attrs.define
class CpuConfig(ProcessConfig):
    """``probes.cpu`` in the YAML config."""

    max_threads: int = attrs.field(default=65536, validator=[v.ge(64), v.le(1 << 22)])
    profile: bool = False               # sampling profiler (folded stacks + flame graph)
    profile_hz: int = attrs.field(default=49, validator=[v.ge(1), v.le(10000)])
    profile_dir: str = "/var/lib/deeptrace/profiles"
    profile_keep: int = attrs.field(default=60, validator=[v.ge(1), v.le(100_000)])   # newest profiles kept
    profile_stack_entries: int = attrs.field(default=16384, validator=[v.ge(64), v.le(1 << 22)])
    profile_max_keys: int = attrs.field(default=16384, validator=[v.ge(64), v.le(1 << 22)])


class CpuProbe(BpfMetricProbe):
    name = "cpu"
    config_class = CpuConfig
    kernel_fields = PROCESS_FIELDS
    source = ("deeptrace_plugins.cpu", "cpu.bpf.c")
    stat_names = STAT_NAMES

    def __init__(self, config: CpuConfig, context=None):
        super().__init__(config, context)
        self.self_pid = os.getpid()
        self._folder = Folder(V_HIST + NBUCKETS)
        self._cpu_reported: dict = {}       # tgid -> highest cpu_ns reported (monotonic)
        self._tid_tgid: dict = {}           # tid -> tgid, for threads on a CPU at collection
        self._symcaches: dict = {}          # pid -> bcc.SymbolCache
        self._py_stats = defaultdict(int)
        self.profiles: list = []            # (folded path, svg path) written, oldest first

    # -- build --------------------------------------------------------------------------
    def defines(self) -> dict:
        c = self.config
        return {
            "MAX_PROCS": c.max_processes,
            "MAX_THREADS": c.max_threads,
            "HIST_MIN_SLOT": HIST_MIN_SLOT,
            "HIST_MAX_SLOT": HIST_MAX_SLOT,
            **process_defines(),
            "PROFILE": int(c.profile),
            "STACK_ENTRIES": c.profile_stack_entries,
            "PROFILE_KEYS": c.profile_max_keys,
            "SELF_TGID": self.self_pid,
        }

    # -- run ----------------------------------------------------------------------------
    def attach(self, defines: dict):
        self.load(defines)
        try:
            if self.config.profile:
                from bcc import PerfSWConfig, PerfType
                self.bpf.attach_perf_event(ev_type=PerfType.SOFTWARE,
                                           ev_config=PerfSWConfig.CPU_CLOCK,
                                           fn_name=b"on_cpu_sample",
                                           sample_freq=self.config.profile_hz)
        except Exception:
            self.bpf.cleanup()
            self.bpf = None
            raise

    def poll(self, timeout_ms: int | None = None) -> list:
        """Never blocks: the metric points when due (deeptrace_core.metricprobe), else []."""
        if not self.due(timeout_ms):
            return []
        points = self.collect()
        if self.config.profile:
            self.write_profile()
        return points

    # -- metrics ------------------------------------------------------------------------
    def _read(self):
        b = self.bpf
        procs = {k.value: (task_name(val.comm),
                           [val.cpu_ns, val.voluntary, val.involuntary, val.rq_count,
                            val.rq_sum_ns])
                 for k, val in b[b"procs"].items()}
        hist_keys = defaultdict(list)
        hist = {}
        for k, val in b[b"rq_hist"].items():
            slot = min(max(k.slot, HIST_MIN_SLOT), HIST_MAX_SLOT) - HIST_MIN_SLOT
            hist.setdefault(k.tgid, [0] * NBUCKETS)[slot] += val.value
            hist_keys[k.tgid].append(k)
        return procs, hist, hist_keys

    def _running_now(self, now_mono: int) -> dict:
        """On-CPU time not yet charged: threads running now, since their switch-in."""
        extra = defaultdict(int)
        tids = set()
        for st in self.bpf[b"cpu_state"][0]:
            if st.tid == 0 or st.ts == 0 or now_mono <= st.ts:
                continue
            tids.add(st.tid)
            tgid = self._tid_tgid.get(st.tid)
            if tgid is None:
                tgid = self._tid_tgid[st.tid] = read_tgid(st.tid)
            if tgid is not None:
                extra[tgid] += now_mono - st.ts
        for tid in set(self._tid_tgid) - tids:   # keep the cache to threads seen running
            del self._tid_tgid[tid]
        return extra

    def collect(self) -> list:
        """Read the kernel maps and return this interval's metric points."""
        now_mono = time.monotonic_ns()
        procs, hist, hist_keys = self._read()
        _, gone = exits(self.bpf, now_mono)
        extra = self._running_now(now_mono)
        vecs, comms = {}, {}
        for tgid, (comm, base) in procs.items():
            cpu = base[V_CPU] + extra.get(tgid, 0)
            cpu = max(cpu, self._cpu_reported.get(tgid, 0))
            self._cpu_reported[tgid] = cpu
            vecs[tgid] = [cpu, *base[1:], *hist.get(tgid, [0] * NBUCKETS)]
            comms[tgid] = comm
        deltas = {t: self._folder.delta(t, vec)[V_CPU] for t, vec in vecs.items()}
        order = sorted(vecs, key=lambda t: (-deltas[t], -vecs[t][V_CPU], t))
        selected = select(self.config.top_n, order)
        unselected = bool(set(vecs) - selected)
        other = self._folder.fold(vecs, selected, gone)
        now_ns = time.time_ns()
        points = []
        for tgid in sorted(selected):
            points += self._points(vecs[tgid], {"process.pid": tgid,
                                                "process.executable.name": comms[tgid]}, now_ns)
        if unselected or any(other):
            points += self._points(other, {"process.pid": OTHER,
                                           "process.executable.name": OTHER}, now_ns)
        self._forget(gone, hist_keys)
        return points

    def _points(self, vec, attributes, now_ns) -> list:
        common = dict(start_ns=self.start_ns, time_ns=now_ns)
        counts = tuple(int(c) for c in vec[V_HIST:])
        return [
            MetricPoint("process.cpu.time", SUM, "s", vec[V_CPU] / 1e9, dict(attributes),
                        "CPU time of the process (user and system together)", **common),
            MetricPoint("process.context_switches", SUM, "{context_switch}", vec[V_VOL],
                        {**attributes, "process.context_switch_type": "voluntary"},
                        "Context switches of the process", **common),
            MetricPoint("process.context_switches", SUM, "{context_switch}", vec[V_INVOL],
                        {**attributes, "process.context_switch_type": "involuntary"},
                        "Context switches of the process", **common),
            MetricPoint("deeptrace.cpu.runqueue.latency", HISTOGRAM, "s", 0, dict(attributes),
                        "Time from runnable (wake-up or preemption) to running",
                        bounds=HIST_BOUNDS, counts=counts, count=sum(counts),
                        sum=vec[V_RQSUM] / 1e9, **common),
        ]

    def _forget(self, gone, hist_keys):
        """Delete exited processes from the kernel maps once their final figures are out."""
        rq_hist = self.bpf[b"rq_hist"]
        for tgid in gone:
            forget(self.bpf, tgid)
            for key in hist_keys.get(tgid, ()):
                delete(rq_hist, key)
            self._cpu_reported.pop(tgid, None)

    # -- profiler -----------------------------------------------------------------------
    def _usym(self, pid: int, addr: int) -> str:
        cache = self._symcaches.get(pid)
        if cache is None:
            from bcc import SymbolCache
            cache = self._symcaches[pid] = SymbolCache(pid)
        name, _off, module = cache.resolve(addr, True)
        if name:
            return name.decode("utf-8", "replace")
        if module:
            return f"[{os.path.basename(module.decode('utf-8', 'replace'))}]"
        return "[unknown]"

    def _walk(self, stacks, stack_id) -> list | None:
        try:
            return list(stacks.walk(stack_id))
        except KeyError:
            self._py_stats["stack_missing"] += 1
            return None

    def collect_profile(self) -> dict:
        """Samples since the last call as {(comm, root frame, ..., leaf frame): count}."""
        from bcc import BPF
        b = self.bpf
        counts = b[b"profile_counts"]
        stacks = b[b"stack_traces"]
        items = [(k, val.value) for k, val in counts.items()]
        for k, _ in items:
            delete(counts, k)
        out: dict = defaultdict(int)
        used = set()
        for k, n in items:
            frames = [task_name(k.comm) or "?"]
            if k.user_stack >= 0:
                used.add(k.user_stack)
                addrs = self._walk(stacks, k.user_stack)
                frames += ["[lost-stack]"] if addrs is None else \
                    [self._usym(k.tgid, a) for a in reversed(addrs)]
            elif k.user_stack != -errno.EFAULT:
                frames.append("[lost-user-stack]")
            if k.kernel_stack >= 0:
                used.add(k.kernel_stack)
                addrs = self._walk(stacks, k.kernel_stack)
                frames += ["[lost-stack]_[k]"] if addrs is None else \
                    [BPF.ksym(a).decode("utf-8", "replace") + "_[k]" for a in reversed(addrs)]
            elif k.kernel_stack != -errno.EFAULT:
                frames.append("[lost-kernel-stack]_[k]")
            out[tuple(f.replace(";", ":").replace(" ", "_") for f in frames)] += n
        for sid in used:
            delete(stacks, stacks.Key(sid))
        self._drop_dead_symcaches()
        return dict(out)

    def _drop_dead_symcaches(self):
        from bcc.libbcc import lib
        for pid in [p for p in self._symcaches if not pid_alive(p)]:
            lib.bcc_free_symcache(self._symcaches.pop(pid).cache, pid)

    def write_profile(self) -> tuple | None:
        """Write the samples since the last write as folded stacks and a flame graph SVG;
        returns the two paths, or None when there was nothing to write."""
        stacks = self.collect_profile()
        if not stacks:
            return None
        d = self.config.profile_dir
        now = time.time()
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z"
        base = os.path.join(d, f"cpu-{stamp}")
        paths = (base + ".folded", base + ".svg")
        title = (f"CPU flame graph, {sum(stacks.values())} samples at "
                 f"{self.config.profile_hz} Hz, until {stamp}")
        try:
            os.makedirs(d, exist_ok=True)
            for path, text in zip(paths, (flamegraph.folded_text(stacks),
                                          flamegraph.svg(stacks, title))):
                tmp = path + ".tmp"
                with open(tmp, "w", encoding="utf-8") as f:
                    f.write(text)
                os.replace(tmp, path)
        except OSError as exc:
            self._py_stats["profile_write_failed"] += 1
            log.warning("cannot write CPU profile to %s: %s", d, exc)
            return None
        self._py_stats["profiles_written"] += 1
        self.profiles.append(paths)
        while len(self.profiles) > self.config.profile_keep:
            for p in self.profiles.pop(0):
                try:
                    os.unlink(p)
                except OSError:
                    pass
        return paths

    # -- counters / teardown ------------------------------------------------------------
    def stats(self) -> dict:
        if self.bpf is None:
            return {}
        out = self.counters()
        if not self.config.profile:
            for name in ("samples", "stack_lost", "stack_collision", "profile_map_full"):
                out.pop(name)
        else:
            out["stack_missing"] = self._py_stats["stack_missing"]
            out["profiles_written"] = self._py_stats["profiles_written"]
            out["profile_write_failed"] = self._py_stats["profile_write_failed"]
        out["procs_entries"] = len(self.bpf[b"procs"])
        return out

    def detach(self):
        if self.bpf is None:
            return
        try:
            if self.config.profile:
                self.write_profile()
        finally:
            super().detach()
            from bcc.libbcc import lib
            for pid, cache in self._symcaches.items():
                lib.bcc_free_symcache(cache.cache, pid)
            self._symcaches.clear()
