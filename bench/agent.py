"""The agent under test, as a subprocess: `python -m deeptrace_core.cli --config FILE`.

Each run gets a generated config in its own temp dir. CPU comes from /proc/<pid>/stat
(utime + stime), RSS and peak RSS (VmRSS, VmHWM) from /proc/<pid>/status; start-up is the
time from launch to the "deeptrace: running" line on stderr; counters come from the
"deeptrace stats:" lines (every `stats_interval`) and the "deeptrace final:" lines at exit.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from deeptrace_core.testing import stop_process
from deeptrace_plugins.trace.probe import TraceProbe

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
# Records lost, by cause: the trace probe's own list (the agent exports the same).
LOSS_KEYS = TraceProbe.loss_counters
CLK_TCK = os.sysconf("SC_CLK_TCK")


def _yaml(value) -> str:
    """JSON is YAML: every generated value is written as JSON."""
    return json.dumps(value)


def trace_config(*, out_path, comms=(), ports=(), pids=(), protocols=(), spans=True,
                 drop_all=False, linker=False, stats_interval="1s", log_level="warning",
                 **trace) -> str:
    """The YAML of a trace-probe pipeline.

    spans: processors [spans] (L7 spans out); linker: then [traces] (the spans linked into
    traces, as config/agent.yaml has them); drop_all: a filter processor that drops every
    record after the probe decoded it (the agent drains and decodes, nothing is exported).
    """
    probe = {"payload_bytes": 1024, **trace}
    if comms:
        probe["comms"] = list(comms)
    if ports:
        probe["ports"] = list(ports)
    if pids:
        probe["pids"] = list(pids)
    if protocols:
        probe["protocols"] = list(protocols)
    processors, used = {}, []
    if spans:
        processors["spans"] = {}
        used.append("spans")
        if linker:
            processors["traces"] = {}
            used.append("traces")
    if drop_all:
        processors["filter/drop-all"] = {"include": {"pid": ["-1"]}}
        used.append("filter/drop-all")
    lines = [f"agent: {{stats_interval: {stats_interval}, log_level: {log_level}}}",
             "probes:",
             f"  trace: {_yaml(probe)}"]
    if processors:
        lines.append("processors:")
        lines += [f"  {k}: {_yaml(v)}" for k, v in processors.items()]
    lines += ["exporters:",
              f"  jsonl: {{path: {_yaml(out_path)}, append: false}}",
              "pipelines:",
              "  main:",
              "    probes: [trace]",
              f"    processors: {_yaml(used)}",
              "    exporters: [jsonl]", ""]
    return "\n".join(lines)


def all_probes_config(out_path, comms=("dtb-startup",)) -> tuple[str, list]:
    """Every probe the installed plugins register, at defaults (the trace probe with every
    registered protocol detected in the kernel, selecting only `comms` so a start-up
    measurement records nobody else's traffic), spans processor, jsonl exporter."""
    from deeptrace_core.plugins import PluginHost
    import logging
    logging.getLogger("deeptrace").setLevel(logging.ERROR)
    registry = PluginHost().load_entry_points().registry()
    probes = sorted(registry.probes)
    protocols = sorted(registry.protocols)
    lines = ["agent: {stats_interval: 60s, log_level: info}", "probes:"]
    for p in probes:
        body = {"protocols": protocols, "comms": list(comms)} if p == "trace" else {}
        lines.append(f"  {p}: {_yaml(body)}")
    lines += ["processors:", "  spans: {}",
              "exporters:", f"  jsonl: {{path: {_yaml(out_path)}, append: false}}",
              "pipelines:", "  main:", f"    probes: {_yaml(probes)}",
              "    processors: [spans]" if "trace" in probes else "    processors: []",
              "    exporters: [jsonl]", ""]
    return "\n".join(lines), probes


def parse_counters(text: str, label: str) -> dict:
    """The last '<label>' line of each section: {section: {counter: value}}."""
    out = {}
    prefix = f"deeptrace {label}: "
    for line in text.splitlines():
        if not line.startswith(prefix):
            continue
        section, _, rest = line[len(prefix):].partition(": ")
        vals = {}
        for kv in rest.split():
            k, _, v = kv.partition("=")
            try:
                vals[k] = int(v)
            except ValueError:
                try:
                    vals[k] = float(v)
                except ValueError:
                    vals[k] = v
        out[section] = vals
    return out


def lost(counters: dict) -> int:
    t = counters.get("probe.trace", {})
    return sum(int(t.get(k, 0)) for k in LOSS_KEYS)


def spans_made(counters: dict) -> int:
    s = counters.get("processor.spans", {})
    return sum(int(v) for k, v in s.items() if k.endswith(".spans"))


def proc_cpu_seconds(pid) -> float:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK
    except (OSError, IndexError, ValueError):
        return float("nan")


def proc_status_kb(pid, key) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


class Agent:
    """One agent run. Use as a context manager; `started()` waits for attach."""

    def __init__(self, config_text: str, name="agent", stdout_path=None):
        self.stdout_path = stdout_path   # the agent's stdout (console exporter), else dropped
        self.dir = tempfile.mkdtemp(prefix=f"dtb-{name}-")
        self.config_path = os.path.join(self.dir, "agent.yaml")
        with open(self.config_path, "w") as f:
            f.write(config_text)
        self.stderr_path = os.path.join(self.dir, "agent.stderr")
        self.proc = None
        self.startup_s = None
        self.hwm_at_start_kb = 0
        self.final = {}

    def start(self, timeout=120):
        self._err = open(self.stderr_path, "wb")
        self._out = open(self.stdout_path, "wb") if self.stdout_path else None
        t0 = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "deeptrace_core.cli", "--config", self.config_path],
            stdin=subprocess.DEVNULL, stdout=self._out or subprocess.DEVNULL, stderr=self._err,
            cwd=REPO,
            start_new_session=True)
        deadline = t0 + timeout
        while True:
            if "deeptrace: running" in self.text():
                self.startup_s = time.monotonic() - t0
                break
            if self.proc.poll() is not None:
                raise RuntimeError(f"agent exited with {self.proc.returncode}:\n"
                                   f"{self.text()[-3000:]}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"agent did not start within {timeout}s")
            time.sleep(0.01)
        # Compilation is over: the high-water mark now is the compile-time peak.
        self.hwm_at_start_kb = proc_status_kb(self.proc.pid, "VmHWM")
        return self

    @property
    def pid(self):
        return self.proc.pid

    def text(self) -> str:
        try:
            with open(self.stderr_path, errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def cpu_seconds(self) -> float:
        return proc_cpu_seconds(self.proc.pid)

    def rss_kb(self) -> int:
        return proc_status_kb(self.proc.pid, "VmRSS")

    def hwm_kb(self) -> int:
        return proc_status_kb(self.proc.pid, "VmHWM")

    def counters(self) -> dict:
        """The latest periodic stats (cumulative since start)."""
        return parse_counters(self.text(), "stats")

    def fresh_counters(self, timeout=5.0):
        """Stats printed after this call (waits for the next periodic report), or None
        when none came within `timeout` (the agent is busy inside one long batch)."""
        n0 = self.text().count("deeptrace stats: pipeline.")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.text().count("deeptrace stats: pipeline.") > n0:
                return parse_counters(self.text(), "stats")
            if self.proc.poll() is not None:
                raise RuntimeError(f"agent exited with {self.proc.returncode}:\n"
                                   f"{self.text()[-3000:]}")
            time.sleep(0.05)
        return None

    @staticmethod
    def caught_up(c: dict) -> bool:
        """Every record the probe submitted has gone through the pipeline (the probe's
        section and the pipeline's come from the same report)."""
        t, p = c.get("probe.trace", {}), c.get("pipeline.main", {})
        return p.get("records_in", 0) + t.get("decode_failed", 0) >= t.get("events", 0)

    def settle(self, quiet_s=0.5, timeout=60.0) -> dict:
        """Wait until the agent has drained what the probe submitted, and the counters no
        longer move (two reports `quiet_s` apart). Returns the last counters, with
        `_settle_s` (how long the agent needed to catch up) and `_settled`."""
        t0 = time.monotonic()
        deadline = t0 + timeout
        prev = None
        while time.monotonic() < deadline:
            cur = self.fresh_counters()
            if cur is not None and self.caught_up(cur):
                if prev is not None and cur.get("pipeline.main") == prev.get("pipeline.main"):
                    cur.update(_settle_s=time.monotonic() - t0, _settled=True)
                    return cur
                prev = cur
                time.sleep(quiet_s)
        cur = self.counters()
        cur.update(_settle_s=time.monotonic() - t0, _settled=False)
        return cur

    def stop(self, timeout=60) -> dict:
        if self.proc is not None:
            stop_process(self.proc, timeout)
        for f in (getattr(self, "_err", None), getattr(self, "_out", None)):
            if f:
                f.close()
        self.final = parse_counters(self.text(), "final")
        return self.final

    def cleanup(self, keep=False):
        if not keep:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
        self.cleanup()
        return False


class Sampler:
    """CPU share and RSS of a process over a window: start(), then sample() now and then
    (RSS maximum), then stop() -> {cpu_pct, rss_max_kb, rss_end_kb}."""

    def __init__(self, pid):
        self.pid = pid

    def start(self):
        self.t0 = time.monotonic()
        self.c0 = proc_cpu_seconds(self.pid)
        self.rss_max = proc_status_kb(self.pid, "VmRSS")
        return self

    def sample(self):
        self.rss_max = max(self.rss_max, proc_status_kb(self.pid, "VmRSS"))

    def stop(self) -> dict:
        self.sample()
        dt = time.monotonic() - self.t0
        dc = proc_cpu_seconds(self.pid) - self.c0
        return {"cpu_pct": 100.0 * dc / dt if dt > 0 else float("nan"),
                "cpu_s": dc, "wall_s": dt, "rss_max_kb": self.rss_max,
                "rss_end_kb": proc_status_kb(self.pid, "VmRSS")}


def children_cpu_seconds(pid) -> float:
    """CPU of a process and its children (nginx master + worker)."""
    total = proc_cpu_seconds(pid)
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            for child in f.read().split():
                total += proc_cpu_seconds(int(child))
    except OSError:
        pass
    return total
