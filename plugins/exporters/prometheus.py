"""prometheus exporter: the latest metric points, and RED metrics of spans, served in the
Prometheus text exposition format (0.0.4) at http://ADDRESS/metrics.

The server listens on 127.0.0.1 unless ``address`` says otherwise and is bounded against
hostile clients: one accepting thread hands connections to ``HANDLER_THREADS`` handler
threads through a queue of ``WAITING_CONNECTIONS`` (a connection beyond it is closed at
once and counted in ``rejected_connections``); a request must arrive within
``request_timeout`` (5 s) per read; a client that drops or garbles its request is counted
in ``client_errors``, never a traceback. ``export()`` only stores: the latest
MetricPoint per (name, attributes), at most ``max_series`` of them (points of further
series are dropped and counted in ``dropped_points``; series not updated for
``series_ttl`` seconds are forgotten, 0 keeps them forever), and spans are accounted
into the RED metrics of ``red.py`` (bounded by ``red_max_series``).

Names follow the OpenTelemetry-to-Prometheus conventions: characters other than
``[a-zA-Z0-9_:]`` (dots included) become ``_``; the unit is appended as a suffix
(``s`` -> ``_seconds``, ``By`` -> ``_bytes``, ``By/s`` -> ``_bytes_per_second``, ``1`` on a
gauge -> ``_ratio``; ``{annotations}`` add nothing); counters (sums) end in ``_total``.
So ``process.cpu.time`` [s, sum] is ``process_cpu_time_seconds_total`` and
``deeptrace.request.duration`` [s, histogram] is ``deeptrace_request_duration_seconds``
with ``_bucket{le=...}`` (cumulative), ``_sum`` and ``_count``. Attribute keys become label
names the same way (``service.name`` -> ``service_name``); label values are escaped.
"""

from __future__ import annotations

import http.server
import logging
import math
import queue
import re
import socket
import sys
import threading
import time

import attrs
from attrs import validators as v

from deeptrace_core.escape import printable
from deeptrace_core.hookspecs import hookimpl
from deeptrace_core.metrics import GAUGE, HISTOGRAM, SUM

from .red import Red, ServiceNamer, ServiceRule

log = logging.getLogger("deeptrace.exporter.prometheus")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_UNIT_WORDS = {
    "s": "seconds", "ms": "milliseconds", "us": "microseconds", "ns": "nanoseconds",
    "min": "minutes", "h": "hours", "d": "days",
    "By": "bytes", "KBy": "kilobytes", "MBy": "megabytes", "GBy": "gigabytes",
    "KiBy": "kibibytes", "MiBy": "mebibytes", "GiBy": "gibibytes",
    "bit": "bits", "Hz": "hertz", "%": "percent", "Cel": "celsius", "V": "volts",
    "W": "watts", "J": "joules", "A": "amperes", "m": "meters", "g": "grams",
}
_PER_WORDS = {"s": "second", "m": "minute", "h": "hour", "d": "day"}
_BAD = re.compile(r"[^a-zA-Z0-9_:]")
_BAD_LABEL = re.compile(r"[^a-zA-Z0-9_]")
_UNDERSCORES = re.compile(r"__+")


def _sanitize(text: str, bad=_BAD) -> str:
    out = _UNDERSCORES.sub("_", bad.sub("_", text))
    if out and out[0].isdigit():
        out = "_" + out
    return out or "_"


def unit_suffix(unit: str, mtype: str) -> str:
    unit = re.sub(r"\{[^}]*\}", "", unit or "").strip()
    if not unit:
        return ""
    if unit == "1":
        return "ratio" if mtype == GAUGE else ""
    main, _, per = unit.partition("/")
    words = _UNIT_WORDS.get(main, main)
    if per:
        per_word = _PER_WORDS.get(per, _UNIT_WORDS.get(per, per))
        words = f"{words}_per_{per_word}" if main else f"per_{per_word}"
    return _sanitize(words).strip("_")


def metric_name(name: str, unit: str, mtype: str) -> str:
    """The Prometheus family name (what _total/_bucket/_sum/_count are added to)."""
    base = _sanitize(name)
    suffix = unit_suffix(unit, mtype)
    if base.endswith("_total"):
        base = base[:-len("_total")]
    if suffix and not base.endswith("_" + suffix) and base != suffix:
        base = f"{base}_{suffix}"
    return base + "_total" if mtype == SUM else base


def label_name(key: str) -> str:
    out = _sanitize(str(key), _BAD_LABEL)
    if out.startswith("__"):  # reserved for Prometheus' internal use
        out = "key" + out
    return out


def escape_label_value(value) -> str:
    text = value if isinstance(value, str) else _label_text(value)
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _label_text(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return ",".join(_label_text(v) for v in value)
    return str(value)


def format_value(v) -> str:
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, int):
        return str(v)
    v = float(v)
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(v)


def _labels(attributes: dict, extra: tuple = ()) -> str:
    merged: dict = {}
    for k, v in attributes.items():
        if v is None:
            continue
        name = label_name(k)
        text = _label_text(v)
        # Two keys that sanitize alike (a.b, a_b) share the label: values joined by ";".
        merged[name] = f"{merged[name]};{text}" if name in merged else text
    parts = [f'{k}="{escape_label_value(v)}"' for k, v in sorted(merged.items())]
    parts += [f'{k}="{v}"' for k, v in extra]
    return "{" + ",".join(parts) + "}" if parts else ""


def _help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def render(points, helps=None) -> str:
    """The exposition text of MetricPoints (at most one per (name, attributes));
    `helps` maps metric names to descriptions for points that carry none."""
    families: dict = {}  # prom name -> (type, help, [points])
    for p in points:
        name = metric_name(p.name, p.unit, p.type)
        fam = families.get(name)
        if fam is None:
            fam = families[name] = [p.type, p.description, []]
        elif fam[0] != p.type:
            continue  # the same name as another type: the first type wins
        elif not fam[1]:
            fam[1] = p.description
        fam[2].append(p)
    out = []
    for name in sorted(families):
        mtype, help_text, pts = families[name]
        help_text = help_text or (helps or {}).get(pts[0].name) or pts[0].name
        out.append(f"# HELP {name} {_help(help_text)}\n")
        out.append(f"# TYPE {name} {'counter' if mtype == SUM else mtype}\n")
        if mtype == HISTOGRAM:
            for p in sorted(pts, key=lambda p: _label_key(p.attributes)):
                running = 0
                bounds = list(p.bounds)
                for i, bound in enumerate(bounds):
                    running += p.counts[i] if i < len(p.counts) else 0
                    le = (("le", format_value(float(bound))),)
                    out.append(f"{name}_bucket{_labels(p.attributes, le)} {running}\n")
                # +Inf and _count must agree: take them from the buckets when given.
                total = sum(p.counts) if p.counts else p.count
                out.append(f"{name}_bucket{_labels(p.attributes, (('le', '+Inf'),))} {total}\n")
                lbl = _labels(p.attributes)
                out.append(f"{name}_sum{lbl} {format_value(p.sum)}\n")
                out.append(f"{name}_count{lbl} {total}\n")
        else:
            for p in sorted(pts, key=lambda p: _label_key(p.attributes)):
                out.append(f"{name}{_labels(p.attributes)} {format_value(p.value)}\n")
    return "".join(out)


def _label_key(attributes):
    return sorted((str(k), _label_text(v)) for k, v in attributes.items())


def _parse_address(address: str):
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"address {address!r} is not HOST:PORT")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    return host or "127.0.0.1", int(port)


@attrs.define
class PrometheusConfig:
    address: str = "127.0.0.1:9464"      # HOST:PORT ([v6]:PORT); port 0 picks a free one
    path: str = "/metrics"
    max_series: int = attrs.field(default=10000, validator=[v.ge(1), v.le(10_000_000)])
    series_ttl: float = attrs.field(default=300.0, metadata={"unit": "seconds"})
    red_metrics: bool = True
    red_max_series: int = attrs.field(default=1000, validator=[v.ge(1), v.le(1_000_000)])
    service_name_rules: list[ServiceRule] = attrs.Factory(list)
    request_timeout: float = attrs.field(default=5.0, metadata={"unit": "seconds"})

    def __attrs_post_init__(self):
        if not self.request_timeout > 0:
            raise ValueError(f"request_timeout must be > 0, got {self.request_timeout}")
        _parse_address(self.address)
        if not self.path.startswith("/"):
            raise ValueError(f"path must start with '/', got {self.path!r}")
        if self.series_ttl < 0:
            raise ValueError(f"series_ttl must be >= 0, got {self.series_ttl}")


HANDLER_THREADS = 4        # requests served at once
WAITING_CONNECTIONS = 32   # accepted connections waiting for a handler thread


class _Server(http.server.HTTPServer):
    """An HTTP server with a fixed pool of handler threads (ThreadingHTTPServer starts one
    per connection, without bound) that counts client errors instead of printing them."""

    allow_reuse_address = True
    request_queue_size = 128   # the listen backlog: a burst is accepted (and refused) fast

    def server_activate(self):
        super().server_activate()
        self.client_errors = 0
        self.rejected_connections = 0
        self._jobs = queue.Queue(WAITING_CONNECTIONS)
        self._workers = [threading.Thread(target=self._work, name=f"deeptrace-prometheus-{i}",
                                          daemon=True) for i in range(HANDLER_THREADS)]
        for t in self._workers:
            t.start()

    def process_request(self, request, client_address):
        try:
            self._jobs.put_nowait((request, client_address))
        except queue.Full:
            self.rejected_connections += 1
            self.shutdown_request(request)

    def _work(self):
        while (job := self._jobs.get()) is not None:
            request, client_address = job
            try:
                self.finish_request(request, client_address)
            except Exception:
                self.handle_error(request, client_address)
            finally:
                self.shutdown_request(request)

    def handle_error(self, request, client_address):
        # A client that resets or garbles its request: its problem, counted, one debug line.
        self.client_errors += 1
        log.debug("scrape from %s failed: %r", client_address[0], sys.exc_info()[1])

    def server_close(self):
        super().server_close()
        workers = getattr(self, "_workers", ())
        while True:  # connections still waiting: closed unanswered
            try:
                job = self._jobs.get_nowait()
            except (queue.Empty, AttributeError):
                break
            self.shutdown_request(job[0])
        for _ in workers:
            self._jobs.put(None)
        for t in workers:
            t.join(1)


class PrometheusExporter:
    takes_agent_metrics = True  # lost events and counters of the agent itself
    name = "prometheus"
    config_class = PrometheusConfig

    def __init__(self, config: PrometheusConfig, context=None):
        self.config = config
        self.red = (Red(ServiceNamer(config.service_name_rules), config.red_max_series,
                        ttl=config.series_ttl) if config.red_metrics else None)
        self._lock = threading.Lock()
        self._series: dict = {}          # (name, sorted attrs) -> (MetricPoint, monotonic)
        self._helps: dict = {}           # name -> description (points may omit it)
        self.points_in = 0
        self.dropped_points = 0
        self.expired_series = 0
        self._last_expiry = 0.0
        self.scrapes = 0
        host, port = _parse_address(config.address)
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            family = infos[0][0]
            server_cls = type("_BoundServer", (_Server,), {"address_family": family})
            self.server = server_cls((host, port), self._handler())
        except OSError as e:
            raise ValueError(f"cannot listen on {config.address}: {e.strerror or e}") from None
        self.address = self.server.server_address[:2]   # (host, port) actually bound
        self._thread = threading.Thread(target=self.server.serve_forever,
                                        kwargs={"poll_interval": 0.2},
                                        name="deeptrace-prometheus", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        host, port = self.address
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{port}{self.config.path}"

    # -- hot path -------------------------------------------------------------------------
    def export(self, batch):
        spans = None
        now = time.monotonic()
        with self._lock:
            series = self._series
            for r in batch:
                kind = getattr(r, "kind", None)
                if kind == "metric":
                    self.points_in += 1
                    key = r.key()
                    if key not in series and len(series) >= self.config.max_series \
                            and now - self._last_expiry >= 1.0:
                        self._expire_locked(now)   # stale series make room (once a second)
                    if key in series or len(series) < self.config.max_series:
                        series[key] = (r, now)
                        if r.description and r.name not in self._helps:
                            self._helps[r.name] = r.description
                    else:
                        self.dropped_points += 1
                elif kind == "span" and self.red is not None:
                    if spans is None:
                        spans = []
                    spans.append(r)
        if spans:
            self.red.add_all(spans)

    def _expire_locked(self, now):
        self._last_expiry = now
        ttl = self.config.series_ttl
        if ttl <= 0:
            return
        limit = now - ttl
        old = [k for k, (_, seen) in self._series.items() if seen < limit]
        for k in old:
            del self._series[k]
        self.expired_series += len(old)

    def render(self) -> str:
        with self._lock:
            self._expire_locked(time.monotonic())
            points = [p for p, _ in self._series.values()]
            helps = dict(self._helps)
            self.scrapes += 1
        if self.red is not None:
            points += self.red.points()
        return render(points, helps)

    def _handler(self):
        exporter = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            timeout = exporter.config.request_timeout  # per read of the request

            def log_error(self, fmt, *args):  # timeouts, bad request lines: counted
                exporter.server.client_errors += 1
                self.log_message(fmt, *args)

            def do_GET(self):
                if self.path.split("?", 1)[0] != exporter.config.path:
                    self._reply(404, "text/plain; charset=utf-8",
                                f"not found: try {exporter.config.path}\n".encode())
                    return
                try:
                    body = exporter.render().encode("utf-8")
                except Exception as exc:  # never take the server down
                    log.error("rendering metrics failed: %r", exc)
                    self._reply(500, "text/plain; charset=utf-8", b"internal error\n")
                    return
                self._reply(200, CONTENT_TYPE, body)

            def _reply(self, code, ctype, body):
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, fmt, *args):
                # The request line is the client's text: escaped before it reaches a log.
                log.debug("scrape from %s: %s", self.client_address[0],
                          printable(fmt % args))

        return Handler

    def flush(self):
        pass

    def shutdown(self):
        if self._thread.is_alive():
            self.server.shutdown()
            self._thread.join(5)
        self.server.server_close()

    def stats(self) -> dict:
        with self._lock:
            out = {"series": len(self._series), "points_in": self.points_in,
                   "dropped_points": self.dropped_points,
                   "expired_series": self.expired_series, "scrapes": self.scrapes,
                   "client_errors": self.server.client_errors,
                   "rejected_connections": self.server.rejected_connections}
        if self.red is not None:
            out.update(self.red.stats())
        return out


@hookimpl
def deeptrace_register_exporters(registry):
    registry.add_exporter(PrometheusExporter)
