"""console exporter: for people. One readable line per span, socket record or other
record; metric points as a periodic summary.

Metric points (``kind == "metric"``) are not printed as they come: the latest point per
(name, attributes) is kept and, at most every ``summary_interval`` (default 10 s), printed
as one compact table per metric name (histograms drawn BCC-style with
:func:`deeptrace_core.metrics.log2_histogram_text`). What is pending is printed once
more at shutdown. At most ``max_rows`` series are shown per metric name (the rest are
counted), and at most ``max_series`` are held between summaries.
"""

import sys
import time

import attrs
from attrs import validators as v

from deeptrace_core.escape import printable
from deeptrace_core.hookspecs import hookimpl
from deeptrace_core.metrics import HISTOGRAM, log2_histogram_text


def _positive(_inst, attribute, value):
    if value <= 0:
        raise ValueError(f"'{attribute.name}' must be > 0, got {value}")


@attrs.define
class ConsoleConfig:
    stream: str = attrs.field(default="stdout", validator=attrs.validators.in_(["stdout", "stderr"]))
    summary_interval: float = attrs.field(default=10.0, validator=_positive,
                                          metadata={"unit": "seconds"})
    max_rows: int = attrs.field(default=20, validator=[_positive, v.le(100_000)])      # per metric name
    max_series: int = attrs.field(default=10000, validator=[_positive, v.le(10_000_000)])  # held between summaries


def _value(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def _cell(v) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (list, tuple)):
        return printable(",".join(map(str, v)))
    return printable(v)  # attribute values may come from payloads (a path, a key)


def _sort_key(p):
    # Numbers in numeric order (pid 7 before pid 12), then everything else as text.
    return [(str(k), (0, v, "") if isinstance(v, (int, float)) else (1, 0, _cell(v)))
            for k, v in sorted(p.attributes.items(), key=lambda kv: str(kv[0]))]


def format_summary(points, max_rows: int = 20, when: float | None = None, dropped: int = 0) -> str:
    """The summary text of metric points (the latest per series), grouped by name."""
    points = list(points)
    when = time.time() if when is None else when
    stamp = time.strftime("%H:%M:%S", time.localtime(when))
    head = f"=== metrics {stamp}: {len(points)} series"
    head += f", {dropped} points of further series dropped ===" if dropped else " ==="
    lines = [head]
    by_name: dict = {}
    for p in points:
        by_name.setdefault(p.name, []).append(p)
    for name in sorted(by_name):
        group = sorted(by_name[name], key=_sort_key)
        first = group[0]
        unit = f", {printable(first.unit)}" if first.unit else ""
        lines.append(f"{printable(name)} [{first.type}{unit}]")
        shown, rest = group[:max_rows], len(group) - max_rows
        if first.type == HISTOGRAM:
            for p in shown:
                mean = p.sum / p.count if p.count else 0
                label = " ".join(f"{_cell(k)}={_cell(v)}" for k, v in sorted(p.attributes.items()))
                lines.append(f"  {label + '  ' if label else ''}count={p.count} sum={p.sum:g} "
                             f"mean={mean:g}")
                lines.append(log2_histogram_text(p.bounds, p.counts, p.unit).rstrip("\n"))
        else:
            keys = sorted({k for p in shown for k in p.attributes})
            rows = [[_cell(p.attributes.get(k, "")) for k in keys] + [_value(p.value)]
                    for p in shown]
            header = [_cell(k) for k in keys] + ["value"]
            widths = [max(len(header[i]), *(len(r[i]) for r in rows)) for i in range(len(header))]
            fmt = "  " + "  ".join(f"{{:<{w}}}" for w in widths[:-1])
            fmt += ("  " if keys else "") + f"{{:>{widths[-1]}}}"
            lines.append(fmt.format(*header).rstrip())
            lines.extend(fmt.format(*r).rstrip() for r in rows)
        if rest > 0:
            lines.append(f"  ... {rest} more series")
    return "\n".join(lines) + "\n"


class ConsoleExporter:
    name = "console"
    config_class = ConsoleConfig

    def __init__(self, config: ConsoleConfig, context=None, clock=time.monotonic):
        self.config = config
        self._clock = clock
        self._pending: dict = {}     # (name, attrs) -> latest MetricPoint
        self._dropped = 0            # points of series beyond max_series since the last summary
        self._last_summary = clock()
        self.summaries = 0

    def _out(self):
        # Looked up per batch so a test's or a user's redirection of sys.stdout is honoured.
        return sys.stdout if self.config.stream == "stdout" else sys.stderr

    def export(self, batch):
        parts = []
        pending = self._pending
        for r in batch:
            if getattr(r, "kind", None) == "metric":
                key = r.key()
                if key in pending or len(pending) < self.config.max_series:
                    pending[key] = r
                else:
                    self._dropped += 1
            else:
                parts.append(printable(r.line()) + "\n")  # one line, no terminal escapes
        now = self._clock()
        if pending and now - self._last_summary >= self.config.summary_interval:
            parts.append(self._take_summary())
            self._last_summary = now
        if parts:
            out = self._out()
            out.write("".join(parts))
            out.flush()

    def _take_summary(self) -> str:
        text = format_summary(self._pending.values(), self.config.max_rows, dropped=self._dropped)
        self._pending = {}
        self._dropped = 0
        self.summaries += 1
        return text

    def flush(self):
        self._out().flush()

    def shutdown(self):
        if self._pending:
            self._out().write(self._take_summary())
        self.flush()


@hookimpl
def deeptrace_register_exporters(registry):
    registry.add_exporter(ConsoleExporter)
