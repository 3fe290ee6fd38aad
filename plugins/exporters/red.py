"""RED metrics (Rate, Errors, Duration) derived from spans, shared by the otlp and
prometheus exporters, and the service-name rules both use.

One series per (service.name, span.kind, deeptrace.protocol, operation):

=============================  =========  ==========  ==========================================
name                           type       unit        meaning
=============================  =========  ==========  ==========================================
``deeptrace.requests``         sum        {request}   spans seen (cumulative, monotonic)
``deeptrace.errors``           sum        {error}     spans with ``error`` set
``deeptrace.request.duration`` histogram  s           span durations; log2 bounds from 100 µs
=============================  =========  ==========  ==========================================

Attribute values: ``service.name`` (first matching service-name rule, else the comm),
``span.kind`` (``server`` | ``client``, the span's role), ``deeptrace.protocol`` and
``operation`` (the span's operation, route-like, or its protocol when empty).

Cardinality is bounded: at most ``max_series`` distinct series keep their operation;
spans of any further series are aggregated into ``operation="other"`` of the same
service, kind and protocol (counted in ``overflow_spans``). Those "other" series are
themselves capped at ``max_series``; beyond that everything lands in one
``service.name="other"`` series per kind. So there are never more than
``2 * max_series + 2`` series. A series no span has updated for ``ttl`` seconds (the
Prometheus exporter's ``series_ttl``, default 300 s; 0 keeps them) is forgotten and frees
its place, so a burst of one-off operations does not fold every later operation into
"other" for good (counted in ``expired``). A series that comes back starts again from
zero with a new start time (a counter reset, as Prometheus and OTLP expect).

Aggregation is O(1) per span (a dict look-up and a bisect) and thread-safe: exporters
call :meth:`Red.add` on the hot path and :meth:`Red.points` from another thread.
"""

from __future__ import annotations

import bisect
import re
import threading
import time

import attrs

from deeptrace_core.metrics import HISTOGRAM, SUM, MetricPoint, log2_bounds

REQUESTS = "deeptrace.requests"
ERRORS = "deeptrace.errors"
DURATION = "deeptrace.request.duration"
# 100 µs, 200 µs, ... 2^20 * 100 µs (~105 s); the last bucket (+Inf) is implicit.
DURATION_BOUNDS = log2_bounds(100e-6, 21)
OTHER = "other"
NAMED, OTHERS, LAST = 0, 1, 2


def _compile(_inst, attribute, value):
    try:
        re.compile(value)
    except re.error as e:
        raise ValueError(f"'{attribute.name}' is not a valid regular expression: {e}") from None


@attrs.define
class ServiceRule:
    """``{match: REGEX, service: NAME}``: REGEX is searched in the comm, then the cmdline."""
    match: str = attrs.field(validator=_compile)
    service: str = attrs.field(validator=attrs.validators.min_len(1))


class ServiceNamer:
    """service.name of a process: the first rule whose regex matches its comm or its
    cmdline wins; otherwise the comm itself. Results are cached (bounded)."""

    MAX_CACHE = 10000

    def __init__(self, rules=()):
        self.rules = [(re.compile(r.match), r.service) for r in rules]
        self._cache: dict = {}

    def __call__(self, comm: str, cmdline: str = "") -> str:
        key = (comm, cmdline)
        name = self._cache.get(key)
        if name is None:
            name = next((service for rx, service in self.rules
                         if rx.search(comm or "") or rx.search(cmdline or "")),
                        None) or comm or "unknown_service"
            if len(self._cache) >= self.MAX_CACHE:
                self._cache.clear()
            self._cache[key] = name
        return name


class _Series:
    __slots__ = ("requests", "errors", "counts", "sum", "start_ns", "seen", "tier")

    def __init__(self, nbuckets, seen, tier):
        self.requests = 0
        self.errors = 0
        self.counts = [0] * nbuckets
        self.sum = 0.0
        self.start_ns = time.time_ns()
        self.seen = seen          # monotonic seconds of the last span
        self.tier = tier          # NAMED, OTHERS or LAST: which cap it counts against


class Red:
    def __init__(self, namer: ServiceNamer | None = None, max_series: int = 1000,
                 bounds: tuple = DURATION_BOUNDS, ttl: float = 300.0, clock=time.monotonic):
        if max_series < 1:
            raise ValueError("red_max_series must be at least 1")
        self.namer = namer or ServiceNamer()
        self.max_series = max_series
        self.bounds = tuple(bounds)
        self.start_ns = time.time_ns()
        self.series: dict[tuple, _Series] = {}
        self.named = 0            # series that kept their own operation
        self.others = 0           # operation="other" series
        self.overflow_spans = 0   # spans folded into an "other" series
        self.expired = 0          # series forgotten after `ttl` seconds without a span
        self.ttl = ttl
        self.clock = clock
        self._last_expiry = clock()
        self._lock = threading.Lock()

    def add(self, span) -> None:
        """Account one span (anything with comm, cmdline, role, protocol, operation,
        error, start_ns and end_ns)."""
        self.add_all((span,))

    def add_all(self, spans) -> None:
        namer, bounds, bisect_left = self.namer, self.bounds, bisect.bisect_left
        rows = [((namer(s.comm, s.cmdline), s.role, s.protocol, s.operation or s.protocol),
                 s.error, max(0, s.end_ns - s.start_ns) / 1e9) for s in spans]
        series = self.series
        now = self.clock()
        with self._lock:
            for key, error, seconds in rows:
                s = series.get(key)
                if s is None:
                    s = self._new_series(key, now)
                s.seen = now
                s.requests += 1
                if error:
                    s.errors += 1
                s.counts[bisect_left(bounds, seconds)] += 1
                s.sum += seconds

    def _new_series(self, key, now):
        if self.named >= self.max_series and now - self._last_expiry >= 1.0:
            self._expire_locked(now)      # stale series make room (at most once a second)
        tier = NAMED
        if self.named < self.max_series:
            self.named += 1
        else:
            self.overflow_spans += 1
            tier, key = OTHERS, (key[0], key[1], key[2], OTHER)
            s = self.series.get(key)
            if s is not None:
                return s
            if self.others >= self.max_series:
                tier, key = LAST, (OTHER, key[1], OTHER, OTHER)
                s = self.series.get(key)
                if s is not None:
                    return s
            else:
                self.others += 1
        s = self.series[key] = _Series(len(self.bounds) + 1, now, tier)
        return s

    def _expire_locked(self, now):
        self._last_expiry = now
        if self.ttl <= 0:
            return
        limit = now - self.ttl
        for key in [k for k, s in self.series.items() if s.seen < limit]:
            tier = self.series.pop(key).tier
            self.expired += 1
            if tier == NAMED:
                self.named -= 1
            elif tier == OTHERS:
                self.others -= 1

    def __len__(self):
        return len(self.series)

    def points(self, time_ns: int | None = None) -> list[MetricPoint]:
        """The current cumulative values, as MetricPoints (three per series)."""
        now = time_ns or time.time_ns()
        with self._lock:
            self._expire_locked(self.clock())
            snapshot = [(k, s.requests, s.errors, tuple(s.counts), s.sum, s.start_ns)
                        for k, s in self.series.items()]
        out = []
        for (service, kind, protocol, operation), requests, errors, counts, total, start_ns \
                in snapshot:
            labels = {"service.name": service, "span.kind": kind,
                      "deeptrace.protocol": protocol, "operation": operation}
            out.append(MetricPoint(REQUESTS, SUM, "{request}", requests, labels,
                                   "Requests seen in spans", start_ns=start_ns, time_ns=now))
            out.append(MetricPoint(ERRORS, SUM, "{error}", errors, dict(labels),
                                   "Requests whose span is an error", start_ns=start_ns,
                                   time_ns=now))
            out.append(MetricPoint(DURATION, HISTOGRAM, "s", 0, dict(labels),
                                   "Request duration seen in spans", bounds=self.bounds,
                                   counts=counts, count=requests, sum=total,
                                   start_ns=start_ns, time_ns=now))
        return out

    def stats(self) -> dict:
        return {"red_series": len(self.series), "red_overflow_spans": self.overflow_spans,
                "red_expired": self.expired}
