"""The host probe: the machine's baseline from procfs, no BPF.

Every ``interval`` it reads /proc/stat, /proc/meminfo, /proc/diskstats, /proc/net/dev and
/proc/loadavg and returns (OpenTelemetry hostmetrics names and attributes):

====================================  =====  =========  ===================================
name                                  type   unit       attributes
====================================  =====  =========  ===================================
system.cpu.time                       sum    s          cpu.logical_number, cpu.mode (user,
                                                        nice, system, idle, iowait,
                                                        interrupt, softirq, steal)
system.cpu.logical.count              gauge  {cpu}
system.memory.usage                   gauge  By         system.memory.state (used, free,
                                                        cached, buffers; they sum to
                                                        MemTotal)
system.memory.limit                   gauge  By
system.memory.utilization             gauge  1          system.memory.state (used)
system.paging.usage                   gauge  By         system.paging.state (used, free)
system.disk.io                        sum    By         system.device, disk.io.direction
system.disk.operations                sum    {operation}  system.device, disk.io.direction
system.disk.operation_time            sum    s          system.device, disk.io.direction
system.disk.merged                    sum    {operation}  system.device, disk.io.direction
system.disk.io_time                   sum    s          system.device
system.network.io                     sum    By         network.interface.name,
                                                        network.io.direction
                                                        (receive/transmit)
system.network.packets                sum    {packet}   (same)
system.network.errors                 sum    {error}    (same)
system.network.dropped                sum    {packet}   (same)
system.cpu.load_average.1m/5m/15m     gauge  {thread}
====================================  =====  =========  ===================================

Sums are the kernel's counters since boot (``start_ns`` is the boot time): cumulative
and monotonic, as OpenTelemetry wants them. Disk devices with no I/O at all since boot
(unused loop devices) are left out. /proc/net/dev is the agent's network namespace.
"""

import os
import time

import attrs

from deeptrace_core.metricprobe import Interval, IntervalConfig
from deeptrace_core.metrics import GAUGE, SUM, MetricPoint

# /proc/stat cpu columns -> OpenTelemetry cpu.mode (guest time is already in user/nice).
CPU_MODES = ("user", "nice", "system", "idle", "iowait", "interrupt", "softirq", "steal")
SECTOR = 512                    # /proc/diskstats counts 512-byte sectors on every device
NET_FIELDS = ("bytes", "packets", "errs", "drop")


@attrs.define
class HostConfig(IntervalConfig):
    """``probes.host`` in the YAML config."""

    procfs: str = "/proc"       # another mount of procfs (e.g. the host's, from a container)


def read_stat(procfs="/proc") -> dict:
    """cpu number -> {mode: seconds}, from the per-cpu lines of /proc/stat."""
    hz = os.sysconf("SC_CLK_TCK")
    out = {}
    with open(f"{procfs}/stat") as f:
        for line in f:
            if line.startswith("cpu") and line[3].isdigit():
                parts = line.split()
                ticks = [int(x) for x in parts[1:1 + len(CPU_MODES)]]
                ticks += [0] * (len(CPU_MODES) - len(ticks))
                out[int(parts[0][3:])] = {m: t / hz for m, t in zip(CPU_MODES, ticks)}
    return out


def read_meminfo(procfs="/proc") -> dict:
    """/proc/meminfo in bytes."""
    out = {}
    with open(f"{procfs}/meminfo") as f:
        for line in f:
            key, _, rest = line.partition(":")
            parts = rest.split()
            if parts:
                out[key] = int(parts[0]) * (1024 if len(parts) > 1 and parts[1] == "kB" else 1)
    return out


def memory_states(mi: dict) -> dict:
    """used/free/cached/buffers in bytes, summing to MemTotal (as hostmetrics does:
    cached includes reclaimable slab)."""
    total = mi.get("MemTotal", 0)
    free = mi.get("MemFree", 0)
    buffers = mi.get("Buffers", 0)
    cached = mi.get("Cached", 0) + mi.get("SReclaimable", 0)
    used = total - free - buffers - cached
    return {"used": used, "free": free, "cached": cached, "buffers": buffers}


def read_diskstats(procfs="/proc") -> dict:
    """device -> counters from /proc/diskstats (see Documentation/admin-guide/iostats)."""
    out = {}
    with open(f"{procfs}/diskstats") as f:
        for line in f:
            p = line.split()
            if len(p) < 14:
                continue
            n = [int(x) for x in p[3:]]
            out[p[2]] = {
                "reads": n[0], "reads_merged": n[1], "read_bytes": n[2] * SECTOR,
                "read_ms": n[3], "writes": n[4], "writes_merged": n[5],
                "write_bytes": n[6] * SECTOR, "write_ms": n[7], "in_flight": n[8],
                "io_ms": n[9], "weighted_ms": n[10],
            }
    return out


def read_net_dev(procfs="/proc") -> dict:
    """interface -> {"receive"|"transmit": {bytes, packets, errs, drop}}."""
    out = {}
    with open(f"{procfs}/net/dev") as f:
        lines = f.read().splitlines()[2:]
    for line in lines:
        name, _, rest = line.partition(":")
        n = [int(x) for x in rest.split()]
        if len(n) < 16:
            continue
        out[name.strip()] = {"receive": dict(zip(NET_FIELDS, n[0:4])),
                             "transmit": dict(zip(NET_FIELDS, n[8:12]))}
    return out


def read_loadavg(procfs="/proc") -> tuple:
    with open(f"{procfs}/loadavg") as f:
        return tuple(float(x) for x in f.read().split()[:3])


def boot_time_ns(procfs="/proc") -> int:
    with open(f"{procfs}/stat") as f:
        for line in f:
            if line.startswith("btime "):
                return int(line.split()[1]) * 1_000_000_000
    return 0


class HostProbe:
    name = "host"
    config_class = HostConfig
    kernel_fields = ()           # no BPF

    def __init__(self, config: HostConfig, context=None):
        self.config = config
        self.context = context
        self.start_ns = 0        # when attach() ran
        self.boot_ns = 0
        self.interval = Interval(config.interval)
        self.read_errors = 0
        self.collections = 0

    def render(self, defines: dict) -> str:
        return ""                # no BPF program

    def attach(self, defines: dict):
        """Nothing to load: only note the start (the first poll reports at once)."""
        self.start_ns = time.time_ns()
        self.interval.start(at_once=True)

    def poll(self, timeout_ms: int | None = None) -> list:
        """Never blocks: every point when due (deeptrace_core.metricprobe), else []."""
        return self.collect() if self.interval.due(timeout_ms) else []

    def collect(self) -> list:
        now = time.time_ns()
        proc = self.config.procfs
        if not self.boot_ns:
            try:
                self.boot_ns = boot_time_ns(proc)
            except OSError:
                self.read_errors += 1
        points = []

        def add(name, kind, unit, value, attributes=None, desc=""):
            points.append(MetricPoint(name, kind, unit, value, attributes or {}, desc,
                                      start_ns=self.boot_ns if kind == SUM else 0,
                                      time_ns=now))

        for reader, emit in ((read_stat, self._cpu), (read_meminfo, self._memory),
                             (read_diskstats, self._disks), (read_net_dev, self._network),
                             (read_loadavg, self._load)):
            try:
                data = reader(proc)
            except (OSError, ValueError, IndexError):
                self.read_errors += 1
                continue
            emit(data, add)
        self.collections += 1
        return points

    @staticmethod
    def _cpu(cpus, add):
        for cpu, modes in sorted(cpus.items()):
            for mode, seconds in modes.items():
                add("system.cpu.time", SUM, "s", seconds,
                    {"cpu.logical_number": cpu, "cpu.mode": mode},
                    "Seconds each logical CPU spent in each mode")
        add("system.cpu.logical.count", GAUGE, "{cpu}", len(cpus))

    @staticmethod
    def _memory(mi, add):
        states = memory_states(mi)
        for state, nbytes in states.items():
            add("system.memory.usage", GAUGE, "By", nbytes, {"system.memory.state": state},
                "Reported memory in use, by state")
        total = mi.get("MemTotal", 0)
        add("system.memory.limit", GAUGE, "By", total)
        if total:
            add("system.memory.utilization", GAUGE, "1", states["used"] / total,
                {"system.memory.state": "used"})
        if "SwapTotal" in mi:
            swap_free = mi.get("SwapFree", 0)
            add("system.paging.usage", GAUGE, "By", mi["SwapTotal"] - swap_free,
                {"system.paging.state": "used"})
            add("system.paging.usage", GAUGE, "By", swap_free, {"system.paging.state": "free"})

    @staticmethod
    def _disks(disks, add):
        for dev, d in sorted(disks.items()):
            if not (d["reads"] or d["writes"] or d["io_ms"]):
                continue                           # never used since boot
            for direction, pre in (("read", "read"), ("write", "write")):
                a = {"system.device": dev, "disk.io.direction": direction}
                add("system.disk.io", SUM, "By", d[f"{pre}_bytes"], dict(a))
                add("system.disk.operations", SUM, "{operation}", d[f"{pre}s"], dict(a))
                add("system.disk.operation_time", SUM, "s", d[f"{pre}_ms"] / 1000, dict(a))
                add("system.disk.merged", SUM, "{operation}", d[f"{pre}s_merged"], dict(a))
            add("system.disk.io_time", SUM, "s", d["io_ms"] / 1000, {"system.device": dev},
                "Time the device had I/O in flight")

    @staticmethod
    def _network(ifaces, add):
        names = (("bytes", "system.network.io", "By"),
                 ("packets", "system.network.packets", "{packet}"),
                 ("errs", "system.network.errors", "{error}"),
                 ("drop", "system.network.dropped", "{packet}"))
        for iface, dirs in sorted(ifaces.items()):
            for direction, counters in dirs.items():
                a = {"network.interface.name": iface, "network.io.direction": direction}
                for field, name, unit in names:
                    add(name, SUM, unit, counters[field], dict(a))

    @staticmethod
    def _load(loads, add):
        for period, value in zip(("1m", "5m", "15m"), loads):
            add(f"system.cpu.load_average.{period}", GAUGE, "{thread}", value)

    def stats(self) -> dict:
        return {"collections": self.collections, "read_errors": self.read_errors}

    def detach(self):
        self.interval.stop()
