"""Metric points: what system probes (cpu, memory, disk, network, host) emit.

A probe's ``poll()`` returns MetricPoint records (``kind == "metric"``) alongside or
instead of other records; exporters that understand metrics (prometheus, otlp, console)
export them, the others skip them. Names and attribute keys follow the OpenTelemetry
semantic conventions where one exists (``process.cpu.time``, ``process.pid``,
``disk.io.direction``, ...); ``deeptrace.*`` names where none does.

Cumulative semantics: a ``sum`` point carries the running total since the agent started
(monotonic), a ``gauge`` the current value, a ``histogram`` cumulative counts per bucket
since start. Points are re-emitted every interval, so an exporter can keep only the
latest point per (name, attributes).
"""

import time

import attrs

SUM, GAUGE, HISTOGRAM = "sum", "gauge", "histogram"


@attrs.define(slots=True)
class MetricPoint:
    name: str                          # e.g. "process.cpu.time"
    type: str                          # SUM | GAUGE | HISTOGRAM
    unit: str                          # UCUM: "s", "By", "{fault}", "1"
    value: float = 0                   # SUM / GAUGE
    attributes: dict = attrs.Factory(dict)
    description: str = ""
    # HISTOGRAM: explicit upper bounds (ascending; the last bucket is +Inf, implicit) and
    # the count in each bucket (len(counts) == len(bounds) + 1), plus count and sum.
    bounds: tuple = ()
    counts: tuple = ()
    count: int = 0
    sum: float = 0.0
    start_ns: int = 0                  # when accumulation started (the probe's attach)
    time_ns: int = attrs.Factory(time.time_ns)

    kind = "metric"

    def key(self) -> tuple:
        return (self.name, tuple(sorted(self.attributes.items())))

    def to_dict(self) -> dict:
        return attrs.asdict(self)

    def line(self) -> str:
        attrs_text = ",".join(f"{k}={v}" for k, v in sorted(self.attributes.items()))
        if self.type == HISTOGRAM:
            mean = self.sum / self.count if self.count else 0
            return (f"{self.name}{{{attrs_text}}} count={self.count} sum={self.sum:g} "
                    f"mean={mean:g}{self.unit}")
        return f"{self.name}{{{attrs_text}}} {self.value:g}{self.unit}"


def log2_bounds(lowest: float, buckets: int) -> tuple:
    """Upper bounds lowest, 2*lowest, 4*lowest, ...: BCC-style log2 histograms."""
    return tuple(lowest * (1 << i) for i in range(buckets))


def log2_histogram_text(bounds, counts, unit="", width=40) -> str:
    """A BCC-style text histogram (one line per non-empty bucket range)."""
    if not counts or not any(counts):
        return "  (no samples)\n"
    top = max(counts)
    last = max(i for i, c in enumerate(counts) if c)
    lines = []
    low = 0
    for i in range(last + 1):
        high = bounds[i] if i < len(bounds) else float("inf")
        bar = "*" * (round(counts[i] * width / top) if top else 0)
        lines.append(f"  {low:>12g} -> {high:<12g} {unit:<3}: {counts[i]:<8} |{bar:<{width}}|")
        low = high
    return "\n".join(lines) + "\n"
