"""The console exporter: spans and socket records one line each, metric points as a
periodic summary (a compact table per metric name, BCC-style histograms)."""

import time

from deeptrace_core.config import parse_config
from deeptrace_core.metrics import GAUGE, HISTOGRAM, SUM, MetricPoint, log2_bounds, \
    log2_histogram_text
from deeptrace_core.span import Span
from deeptrace_plugins.exporters.console import ConsoleConfig, ConsoleExporter, format_summary

WHEN = time.mktime((2024, 5, 1, 12, 0, 5, 0, 0, -1))
T0 = 1_700_000_000_000_000_000


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


class Line:
    kind = "socket"

    def __init__(self, text):
        self.text = text

    def line(self):
        return self.text


def cpu(mode, value, pid=12):
    return MetricPoint("process.cpu.time", SUM, "s", value,
                       {"process.pid": pid, "cpu.mode": mode})


def latency(counts, device="sda"):
    return MetricPoint("disk.io.latency", HISTOGRAM, "s", attributes={"disk.device": device},
                       bounds=log2_bounds(1e-4, 4), counts=counts, count=sum(counts), sum=0.01)


def test_summary_table_per_metric_name():
    text = format_summary([cpu("user", 1.5), cpu("system", 0.25), cpu("user", 3, pid=7),
                           MetricPoint("system.memory.usage", GAUGE, "By", 123456789, {}),
                           latency((0, 3, 10, 1, 0))], when=WHEN)
    hist = log2_histogram_text(log2_bounds(1e-4, 4), (0, 3, 10, 1, 0), "s").rstrip("\n")
    assert text == "\n".join([
        "=== metrics 12:00:05: 5 series ===",
        "disk.io.latency [histogram, s]",
        "  disk.device=sda  count=14 sum=0.01 mean=0.000714286",
        hist,
        "process.cpu.time [sum, s]",
        "  cpu.mode  process.pid  value",
        "  system    12            0.25",
        "  user      7                3",
        "  user      12             1.5",
        "system.memory.usage [gauge, By]",
        "      value",
        "  123456789",
    ]) + "\n"
    # the histogram is BCC's drawing: one line per bucket up to the last non-empty one
    assert "0.0004       s  : 10       |****************************************|" in hist
    assert len(hist.splitlines()) == 4


def test_metrics_are_summarised_periodically_spans_printed_at_once(capsys):
    clock = Clock()
    exp = ConsoleExporter(ConsoleConfig(), clock=clock)
    span = Span(T0, T0 + 2_000_000, "http1", "server", 42, 42, "nginx", "nginx", "tcp", "ipv4",
                "127.0.0.1", 80, "127.0.0.1", 5000, 1, "GET /", "200", False, 10, 20)
    exp.export([Line("socket record 1"), cpu("user", 1.0), span, cpu("system", 0.5)])
    out = capsys.readouterr().out
    assert out.splitlines() == ["socket record 1", span.line()]      # no metric yet
    clock.now += 5
    exp.export([cpu("user", 2.0), Line("socket record 2")])
    assert capsys.readouterr().out == "socket record 2\n"
    clock.now += 5                                                    # 10 s: a summary
    exp.export([cpu("user", 3.0)])
    out = capsys.readouterr().out
    assert "process.cpu.time [sum, s]" in out and out.count("\n") == 5
    assert "  user      12               3" in out and "  system    12             0.5" in out
    assert exp.summaries == 1
    clock.now += 9.9                                                  # at most every 10 s
    exp.export([cpu("user", 4.0), cpu("user", 5.0, pid=13)])
    assert capsys.readouterr().out == ""
    exp.shutdown()                                                    # what is pending, once
    out = capsys.readouterr().out
    assert "=== metrics" in out and ": 2 series ===" in out
    assert "  user      12               4" in out and "  user      13               5" in out
    assert "system" not in out                                        # not re-emitted since
    assert exp.summaries == 2


def test_rows_and_series_are_bounded(capsys):
    clock = Clock()
    exp = ConsoleExporter(ConsoleConfig(max_rows=3, max_series=5, summary_interval=1.0),
                          clock=clock)
    exp.export([MetricPoint("m", GAUGE, "", i, {"i": i}) for i in range(8)])
    clock.now += 1
    exp.export([MetricPoint("m", GAUGE, "", 0, {"i": 0})])
    out = capsys.readouterr().out
    assert out.splitlines()[0].endswith(": 5 series, 3 points of further series dropped ===")
    assert "  ... 2 more series" in out and len(out.splitlines()) == 7


def test_config_default_and_yaml():
    assert ConsoleConfig().summary_interval == 10.0
    schemas = {"probes": {"trace": ConsoleConfig}, "exporters": {"console": ConsoleConfig}}
    cfg = parse_config("probes: {trace: {}}\nexporters:\n  console: {summary_interval: 30s}\n"
                       "pipelines: {m: {probes: [trace], exporters: [console]}}\n",
                       "a.yaml", schemas, {})
    assert cfg.exporters["console"].config.summary_interval == 30.0
