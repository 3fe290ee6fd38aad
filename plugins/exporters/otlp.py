"""otlp exporter: spans and metric points to an OpenTelemetry collector, over OTLP/gRPC
or OTLP/HTTP (protobuf), plus RED metrics derived from the spans.

Hot path and back pressure
--------------------------
``export()`` never does I/O and never waits on the network: it accounts the batch's spans
into the RED aggregator (O(1) per span), then appends its spans and metric points to a
bounded in-memory queue of at most ``queue_size`` *items* (one span or one metric point
each; default 2048) and returns. What does not fit is dropped at once and counted
(``dropped_spans``, ``dropped_metric_points``). Other record kinds are ignored.

A background thread drains the queue: as soon as ``max_batch`` items wait, and every
``export_interval`` for whatever is left, it takes up to ``max_batch`` items, builds one
OTLP request per signal and sends it, up to ``max_in_flight`` requests at once (default
4: a collector that acknowledges after its write takes a round trip per request). A request that fails with a retryable error (gRPC
UNAVAILABLE, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, ABORTED, ...; HTTP 429/502/503/504,
refused or timed-out connections) is retried up to ``max_retries`` times after
``min(retry_max_backoff, retry_initial_backoff * 2**n)`` seconds, jittered to between half
and all of that (a ``Retry-After`` header, when given, is honoured up to the same cap).
Then, or on a permanent error, its items are counted as ``failed_*``. While the thread
waits on a slow or absent endpoint the queue fills and further items are dropped, so
memory stays bounded by ``queue_size`` items plus ``max_in_flight`` batches in flight.

Accounting is exact at every instant (all under one lock)::

    exported_X == sent_X + dropped_X + failed_X + queued_X + in_flight_X

for X in spans and metric_points. ``sent`` counts items in requests the receiver
accepted; of those, ``rejected_*`` counts what it reported rejecting (partial success).

``flush(timeout)`` sends everything queued (and the RED metrics) now and waits for it.
``shutdown()`` does the same within ``shutdown_timeout``: retries stop at the deadline,
a gRPC request still in flight then is cancelled (an HTTP one ends by its ``timeout``),
and what is still queued is counted as dropped (also in ``dropped_at_shutdown``).

Mapping
-------
Spans: one Resource per process (``service.name`` from ``service_name_rules`` else the
comm, ``host.name``, ``process.pid``, ``process.command_line``,
``process.executable.name``, ``telemetry.sdk.name=deeptrace``), kind SERVER/CLIENT from
the role, name = operation (or protocol), ids from the span (a fresh trace id when it
has none), status ERROR when ``error``; attributes are the span's own plus
``network.transport``, ``network.type``, ``network.peer.address/port``,
``server.address/port``, ``client.address/port`` (SERVER), ``network.local.address/port``,
``deeptrace.protocol``, ``deeptrace.conn_id``, ``deeptrace.link_source``, ``thread.id``
and the stitch
keys a collector joins two hosts' ends of one request on: ``deeptrace.request.seq_start/
seq_end`` and ``deeptrace.response.seq_start/seq_end`` (TCP stream positions). The span's
own win on a clash (e.g. ``server.address`` from an HTTP Host header). Every resource
also carries ``OTEL_RESOURCE_ATTRIBUTES`` overlaid by the config's ``resource`` (e.g. its
``host.name``) and ``deeptrace.agent.id`` (this agent run).

Metric points: SUM -> cumulative monotonic Sum, GAUGE -> Gauge, HISTOGRAM -> cumulative
explicit-bounds Histogram. Points whose attributes carry ``process.pid`` are grouped
under that process's resource (the same resource as its spans); they keep their
``process.*`` attributes, so series of two processes of one service stay apart where
resource attributes are not labels (e.g. after conversion to Prometheus). The others go
under the host resource (``service.name = deeptrace-host``). RED metrics (see ``red.py``) go every ``export_interval`` under one
resource per service; they bypass the queue (they are bounded by ``red_max_series``)
and, being cumulative, are simply sent again next time when a send fails.
"""

from __future__ import annotations

import gzip
import http.client
import logging
import os
import random
import socket
import threading
import time
import traceback
import urllib.error
import urllib.parse
import urllib.request
from collections import deque
from typing import Literal

import attrs
from attrs import validators as v

from deeptrace_core.escape import printable
from deeptrace_core.hookspecs import hookimpl
from deeptrace_core.metrics import GAUGE, HISTOGRAM, SUM

from .red import Red, ServiceNamer, ServiceRule

log = logging.getLogger("deeptrace.exporter.otlp")

SECONDS = {"unit": "seconds"}
GRPC_DEFAULT = "127.0.0.1:4317"
HTTP_DEFAULT = "http://127.0.0.1:4318"
HOST_SERVICE = "deeptrace-host"
SCOPE = "deeptrace"
RETRYABLE_HTTP = (429, 502, 503, 504)

try:
    from importlib.metadata import version as _dist_version
    VERSION = _dist_version("deeptrace")
except Exception:  # pragma: no cover - running from a bare checkout
    VERSION = "0"


def _positive(_inst, attribute, value):
    if value <= 0:
        raise ValueError(f"'{attribute.name}' must be > 0, got {value}")


def _not_negative(_inst, attribute, value):
    if value < 0:
        raise ValueError(f"'{attribute.name}' must be >= 0, got {value}")


@attrs.define
class OtlpConfig:
    protocol: Literal["grpc", "http/protobuf"] = "grpc"
    # grpc: host:port (an http:// or https:// prefix is accepted and decides TLS);
    # http/protobuf: a base URL, /v1/traces and /v1/metrics are appended.
    # Default: 127.0.0.1:4317 (grpc), http://127.0.0.1:4318 (http/protobuf).
    endpoint: str | None = None
    headers: dict[str, str] = attrs.Factory(dict)   # gRPC metadata / HTTP headers
    timeout: float = attrs.field(default=10.0, validator=_positive, metadata=SECONDS)
    # grpc without a scheme in endpoint: plaintext when true, TLS (system roots) when
    # false. http/protobuf: the URL's scheme decides; this only picks the scheme of an
    # endpoint given without one. Certificates are always verified when TLS is used.
    insecure: bool = True
    compression: Literal["none", "gzip"] = "none"
    queue_size: int = attrs.field(default=2048, validator=[_positive, v.le(10_000_000)])   # items, not batches
    max_batch: int = attrs.field(default=512, validator=[_positive, v.le(1_000_000)])     # items per request
    # Requests sent at once: with one, an agent's rate is capped at max_batch per round
    # trip (512 spans per 0.3 s ack from a busy collector: ~1,700 spans/s).
    max_in_flight: int = attrs.field(default=4, validator=[_positive, v.le(64)])
    export_interval: float = attrs.field(default=1.0, validator=_positive, metadata=SECONDS)
    max_retries: int = attrs.field(default=5, validator=[_not_negative, v.le(1000)])
    retry_initial_backoff: float = attrs.field(default=0.5, validator=_positive,
                                               metadata=SECONDS)
    retry_max_backoff: float = attrs.field(default=5.0, validator=_positive, metadata=SECONDS)
    shutdown_timeout: float = attrs.field(default=5.0, validator=_not_negative,
                                          metadata=SECONDS)
    service_name_rules: list[ServiceRule] = attrs.Factory(list)
    red_metrics: bool = True
    red_max_series: int = attrs.field(default=1000, validator=[_positive, v.le(1_000_000)])
    # Resource attributes of everything this agent sends (host.name, deployment.environment,
    # ...), over those of OTEL_RESOURCE_ATTRIBUTES, as OpenTelemetry SDKs take them.
    resource: dict[str, str] = attrs.Factory(dict)


# This agent run, on every resource: a collector tells agents apart by it (two agents may
# share a host.name, e.g. one per network namespace).
AGENT_ID = os.urandom(8).hex()


def resource_attributes(config_resource: dict, env=None) -> dict:
    """OTEL_RESOURCE_ATTRIBUTES ("k=v,k2=v2", values percent-encoded as the spec says)
    overlaid by the config's `resource`. Malformed pairs are skipped, as SDKs do."""
    env = os.environ if env is None else env
    out = {}
    for pair in env.get("OTEL_RESOURCE_ATTRIBUTES", "").split(","):
        key, eq, value = pair.partition("=")
        if eq and key.strip():
            out[key.strip()] = urllib.parse.unquote(value.strip())
    out.update(config_resource)
    return out


def forget(exc) -> None:
    """Drop the tracebacks of an exception and of those it chains to, clearing their
    finished frames' locals.

    Failed sends raise exceptions that sit in reference cycles (gRPC's failed future *is*
    the exception, and its traceback holds a frame whose ``self`` is that future); a cycle
    through a traceback keeps its frames and their callers' frames alive until a full
    garbage collection, and with them the request, its serialized body and the batch's
    spans. Clearing breaks such cycles, so a failed batch is freed at once and memory
    stays bounded by the queue."""
    seen = set()
    todo = [exc]
    while todo:
        e = todo.pop()
        if not isinstance(e, BaseException) or id(e) in seen:
            continue
        seen.add(id(e))
        if e.__traceback__ is not None:
            traceback.clear_frames(e.__traceback__)
            e.__traceback__ = None
        todo += [e.__context__, e.__cause__, getattr(e, "reason", None)]


class SendError(Exception):
    def __init__(self, message, retryable, retry_after=None):
        super().__init__(message)
        self.retryable = retryable
        self.retry_after = retry_after


# -- transports ---------------------------------------------------------------------------

def _pb():
    """The protobuf modules, imported on first use (they take a while to load)."""
    from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2 as ms
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as ts
    from opentelemetry.proto.common.v1 import common_pb2 as common
    from opentelemetry.proto.metrics.v1 import metrics_pb2 as metrics
    from opentelemetry.proto.trace.v1 import trace_pb2 as trace
    return ts, ms, common, trace, metrics


class GrpcTransport:
    def __init__(self, config: OtlpConfig):
        import grpc
        from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2_grpc
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc

        self.grpc = grpc
        target = config.endpoint or GRPC_DEFAULT
        secure = not config.insecure
        for scheme, tls in (("https://", True), ("http://", False)):
            if target.startswith(scheme):
                target, secure = target[len(scheme):].rstrip("/"), tls
        self.target = target
        # grpc's own reconnect backoff grows to 120 s by default: cap it by ours, so a
        # collector that comes back is used again within retry_max_backoff.
        backoff_ms = max(100, int(config.retry_max_backoff * 1000))
        options = [("grpc.initial_reconnect_backoff_ms", min(1000, backoff_ms)),
                   ("grpc.min_reconnect_backoff_ms", 100),
                   ("grpc.max_reconnect_backoff_ms", backoff_ms)]
        if secure:
            self.channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(), options)
        else:
            self.channel = grpc.insecure_channel(target, options)
        self.stubs = {"traces": trace_service_pb2_grpc.TraceServiceStub(self.channel),
                      "metrics": metrics_service_pb2_grpc.MetricsServiceStub(self.channel)}
        self.metadata = tuple((k.lower(), v) for k, v in config.headers.items())
        self._current = set()  # the RPCs in flight, for cancel()
        self.compression = grpc.Compression.Gzip if config.compression == "gzip" else None
        c = grpc.StatusCode
        self.retryable = {c.UNAVAILABLE, c.DEADLINE_EXCEEDED, c.RESOURCE_EXHAUSTED, c.ABORTED,
                          c.CANCELLED, c.OUT_OF_RANGE, c.DATA_LOSS}

    def send(self, signal, request, timeout):
        grpc = self.grpc
        future = self.stubs[signal].Export.future(request, timeout=timeout,
                                                  metadata=self.metadata,
                                                  compression=self.compression)
        self._current.add(future)
        try:
            return future.result()
        except grpc.FutureCancelledError as e:
            forget(e)
            raise SendError("CANCELLED: at shutdown", True) from None
        except grpc.RpcError as e:
            forget(e)
            code = e.code() if callable(getattr(e, "code", None)) else None
            details = e.details() if callable(getattr(e, "details", None)) else str(e)
            name = code.name if code is not None else "UNKNOWN"
            raise SendError(f"{name}: {details}", code in self.retryable) from None
        finally:
            # A failed RPC's future is also its exception: dropping our reference
            # breaks the cycle exception -> traceback -> this frame -> future, which
            # would keep the callers' frames (and the batch's spans) alive until a
            # full garbage collection.
            self._current.discard(future)
            future = None

    def cancel(self):
        """Cancel the RPCs in flight (shutdown's deadline has passed)."""
        for future in list(self._current):
            future.cancel()

    def close(self):
        self.channel.close()


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Never follow a redirect: urllib would resend as a body-less GET, with our headers
    (Authorization) to wherever Location points. The 3xx reaches send() as an HTTPError."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


class HttpTransport:
    def __init__(self, config: OtlpConfig):
        ts, ms = _pb()[:2]
        base = config.endpoint or HTTP_DEFAULT
        if "://" not in base:
            base = ("http://" if config.insecure else "https://") + base
        base = base.rstrip("/")
        self.urls = {"traces": base + "/v1/traces", "metrics": base + "/v1/metrics"}
        self.responses = {"traces": ts.ExportTraceServiceResponse,
                          "metrics": ms.ExportMetricsServiceResponse}
        self.headers = {"Content-Type": "application/x-protobuf",
                        "User-Agent": f"deeptrace-otlp/{VERSION}", **config.headers}
        self.gzip = config.compression == "gzip"
        if self.gzip:
            self.headers["Content-Encoding"] = "gzip"
        self.opener = urllib.request.build_opener(_NoRedirect)

    def send(self, signal, request, timeout):
        body = request.SerializeToString()
        if self.gzip:
            body = gzip.compress(body, 6)
        req = urllib.request.Request(self.urls[signal], data=body, headers=self.headers,
                                     method="POST")
        try:
            with self.opener.open(req, timeout=timeout) as resp:
                data = resp.read()
                ctype = resp.headers.get("Content-Type", "")
        except urllib.error.HTTPError as e:
            forget(e)
            retry_after = None
            try:
                retry_after = float(e.headers.get("Retry-After", ""))
            except (TypeError, ValueError, AttributeError):
                pass
            try:
                e.close()
            except Exception:
                pass
            if 300 <= e.code < 400:  # a failure like any other, not retried
                raise SendError(f"HTTP {e.code} {printable(e.reason)} (redirects are not "
                                "followed; set the endpoint to the final URL)", False) from None
            raise SendError(f"HTTP {e.code} {printable(e.reason)}", e.code in RETRYABLE_HTTP,
                            retry_after) from None
        except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
            forget(e)
            reason = getattr(e, "reason", e)
            raise SendError(f"{type(reason).__name__}: {reason}", True) from None
        response = self.responses[signal]()
        if data and "protobuf" in ctype:
            try:
                response.ParseFromString(data)
            except Exception:
                pass  # a 2xx is a success even if its body is not what we expect
        return response

    def close(self):
        pass


# -- conversion ---------------------------------------------------------------------------

def _id_bytes(hexstr, n):
    if not hexstr:
        return None
    try:
        b = bytes.fromhex(hexstr)
    except (TypeError, ValueError):
        return None
    return b if len(b) == n and any(b) else None


_INT64 = (-(1 << 63), (1 << 63) - 1)


def set_any(any_value, value) -> bool:
    """Fill an AnyValue from a Python value; False (and nothing set) for None."""
    if value is None:
        return False
    if isinstance(value, bool):
        any_value.bool_value = value
    elif isinstance(value, int):
        if _INT64[0] <= value <= _INT64[1]:
            any_value.int_value = value
        else:
            any_value.string_value = str(value)
    elif isinstance(value, float):
        any_value.double_value = value
    elif isinstance(value, str):
        any_value.string_value = value
    elif isinstance(value, (bytes, bytearray, memoryview)):
        any_value.bytes_value = bytes(value)
    elif isinstance(value, (list, tuple, set, frozenset)):
        array = any_value.array_value
        array.SetInParent()
        for item in value:
            if item is not None:
                set_any(array.values.add(), item)
    elif isinstance(value, dict):
        kvlist = any_value.kvlist_value
        kvlist.SetInParent()
        add_attributes(kvlist.values, value)
    else:
        any_value.string_value = str(value)
    return True


def add_attributes(repeated_kv, mapping) -> None:
    for key, value in mapping.items():
        if value is None:
            continue
        kv = repeated_kv.add()
        kv.key = str(key)
        set_any(kv.value, value)


class Converter:
    """Builds OTLP request messages from spans and metric points."""

    MAX_RESOURCES = 4096

    def __init__(self, namer: ServiceNamer, hostname: str | None = None,
                 resource: dict | None = None):
        self.ts, self.ms, self.common, self.trace, self.metrics = _pb()
        self.namer = namer
        resource = dict(resource or {})
        self.hostname = resource.pop("host.name", None) or hostname or socket.gethostname()
        # On every resource, under what describes the process or service.
        self.base = {**resource, "host.name": self.hostname, "deeptrace.agent.id": AGENT_ID}
        self.start_ns = time.time_ns()   # start of cumulative points that carry none
        self._resources: dict = {}
        self._procs: dict = {}   # pid -> (comm, cmdline), learned from spans
        self.SERVER = self.trace.Span.SpanKind.SPAN_KIND_SERVER
        self.CLIENT = self.trace.Span.SpanKind.SPAN_KIND_CLIENT
        self.ERROR = self.trace.Status.StatusCode.STATUS_CODE_ERROR
        self.CUMULATIVE = self.metrics.AggregationTemporality.AGGREGATION_TEMPORALITY_CUMULATIVE

    # resources
    def process_resource(self, pid, comm, cmdline):
        key = ("p", pid, comm, cmdline)
        res = self._resources.get(key)
        if res is None:
            attributes = {**self.base, "service.name": self.namer(comm, cmdline),
                          "process.pid": pid, "process.executable.name": comm,
                          "process.command_line": cmdline or None,
                          "telemetry.sdk.name": SCOPE, "telemetry.sdk.version": VERSION}
            res = self._cache(key, attributes)
        return res

    def named_resource(self, service):
        key = ("s", service)
        res = self._resources.get(key)
        if res is None:
            res = self._cache(key, {**self.base, "service.name": service,
                                    "telemetry.sdk.name": SCOPE,
                                    "telemetry.sdk.version": VERSION})
        return res

    def _cache(self, key, attributes):
        from opentelemetry.proto.resource.v1 import resource_pb2
        res = resource_pb2.Resource()
        add_attributes(res.attributes, attributes)
        if len(self._resources) >= self.MAX_RESOURCES:
            self._resources.clear()
        self._resources[key] = res
        return res

    def _scope(self, scope):
        scope.name = SCOPE
        scope.version = VERSION

    # spans
    def traces_request(self, spans):
        groups: dict = {}
        for s in spans:
            groups.setdefault((s.pid, s.comm, s.cmdline), []).append(s)
            if len(self._procs) >= self.MAX_RESOURCES:
                self._procs.clear()
            self._procs[s.pid] = (s.comm, s.cmdline)
        req = self.ts.ExportTraceServiceRequest()
        for (pid, comm, cmdline), group in groups.items():
            rs = req.resource_spans.add()
            rs.resource.CopyFrom(self.process_resource(pid, comm, cmdline))
            ss = rs.scope_spans.add()
            self._scope(ss.scope)
            for s in group:
                self.fill_span(ss.spans.add(), s)
        return req

    def fill_span(self, p, s):
        p.trace_id = _id_bytes(s.trace_id, 16) or os.urandom(16)
        p.span_id = _id_bytes(s.span_id, 8) or os.urandom(8)
        parent = _id_bytes(s.parent_span_id, 8)
        if parent:
            p.parent_span_id = parent
        p.name = s.operation or s.protocol
        server = s.role == "server"
        p.kind = self.SERVER if server else self.CLIENT
        p.start_time_unix_nano = max(0, s.start_ns)
        p.end_time_unix_nano = max(0, s.start_ns, s.end_ns)
        if s.error:
            p.status.code = self.ERROR
            if s.status:
                p.status.message = str(s.status)
        net = {"network.transport": s.l4, "network.type": s.family,
               "network.peer.address": s.remote_addr, "network.peer.port": s.remote_port}
        if server:
            net.update({"server.address": s.local_addr, "server.port": s.local_port,
                        "client.address": s.remote_addr, "client.port": s.remote_port})
        else:
            net.update({"server.address": s.remote_addr, "server.port": s.remote_port})
        # The stitch keys a collector joins the two ends of a request on, across hosts:
        # both ends' addresses and the TCP stream positions of the request and response.
        # thread.id: which thread served or called (the collector's and other readers'
        # view of thread-per-request linking).
        net.update({"network.local.address": s.local_addr, "network.local.port": s.local_port,
                    "deeptrace.protocol": s.protocol, "deeptrace.conn_id": s.conn_id,
                    "deeptrace.link_source": s.link_source, "thread.id": s.tid})
        if s.request_seq is not None:
            net["deeptrace.request.seq_start"], net["deeptrace.request.seq_end"] = s.request_seq
        if s.response_seq is not None:
            net["deeptrace.response.seq_start"], net["deeptrace.response.seq_end"] = \
                s.response_seq
        for k in s.attributes:
            net.pop(k, None)  # the span's own attributes win
        add_attributes(p.attributes, s.attributes)
        add_attributes(p.attributes, net)

    # metrics
    def metrics_request(self, points, by_service=False):
        """by_service: RED points, one resource per service.name (which stays an
        attribute of the points too)."""
        resources: dict = {}   # resource key -> (Resource, {(name, type, unit): [points]})
        for mp in points:
            attributes = mp.attributes
            if by_service:
                service = attributes.get("service.name", HOST_SERVICE)
                rkey, make = ("s", service), (lambda s=service: self.named_resource(s))
            elif "process.pid" in attributes:
                pid = attributes["process.pid"]
                comm, cmdline = self._process_of(pid, attributes)
                rkey = ("p", pid, comm, cmdline)
                make = (lambda p=pid, c=comm, l=cmdline: self.process_resource(p, c, l))
            else:
                rkey, make = ("s", HOST_SERVICE), (lambda: self.named_resource(HOST_SERVICE))
            entry = resources.get(rkey)
            if entry is None:
                entry = resources[rkey] = (make(), {})
            entry[1].setdefault((mp.name, mp.type, mp.unit), []).append((mp, attributes))
        req = self.ms.ExportMetricsServiceRequest()
        for resource, metrics in resources.values():
            rm = req.resource_metrics.add()
            rm.resource.CopyFrom(resource)
            sm = rm.scope_metrics.add()
            self._scope(sm.scope)
            for (name, mtype, unit), group in metrics.items():
                m = sm.metrics.add()
                m.name, m.unit = name, unit or ""
                m.description = group[0][0].description or ""
                if mtype == SUM:
                    m.sum.aggregation_temporality = self.CUMULATIVE
                    m.sum.is_monotonic = True
                    for mp, attributes in group:
                        self._number(m.sum.data_points.add(), mp, attributes)
                elif mtype == GAUGE:
                    m.gauge.SetInParent()
                    for mp, attributes in group:
                        self._number(m.gauge.data_points.add(), mp, attributes)
                elif mtype == HISTOGRAM:
                    m.histogram.aggregation_temporality = self.CUMULATIVE
                    for mp, attributes in group:
                        dp = m.histogram.data_points.add()
                        self._times(dp, mp)
                        add_attributes(dp.attributes, attributes)
                        dp.count = int(mp.count)
                        dp.sum = float(mp.sum)
                        dp.explicit_bounds.extend(float(b) for b in mp.bounds)
                        dp.bucket_counts.extend(int(c) for c in mp.counts)
                else:
                    raise ValueError(f"unknown metric type {mtype!r} of {name}")
        return req

    def _process_of(self, pid, attributes):
        comm = attributes.get("process.executable.name")
        cmdline = attributes.get("process.command_line")
        if comm is None or cmdline is None:
            known = self._procs.get(pid)
            if known is None:
                known = self._read_proc(pid)
            comm = comm if comm is not None else known[0]
            cmdline = cmdline if cmdline is not None else known[1]
        return str(comm), str(cmdline)

    def _read_proc(self, pid):
        comm, cmdline = "unknown_service", ""
        try:
            with open(f"/proc/{int(pid)}/comm", "rb") as f:
                comm = f.read(64).strip().decode("utf-8", "replace") or comm
            with open(f"/proc/{int(pid)}/cmdline", "rb") as f:
                cmdline = f.read(4096).replace(b"\0", b" ").strip().decode("utf-8", "replace")
        except (OSError, ValueError):
            pass
        if len(self._procs) >= self.MAX_RESOURCES:
            self._procs.clear()
        self._procs[pid] = (comm, cmdline)
        return comm, cmdline

    def _times(self, dp, mp):
        dp.start_time_unix_nano = mp.start_ns or min(self.start_ns, mp.time_ns)
        dp.time_unix_nano = mp.time_ns

    def _number(self, dp, mp, attributes):
        self._times(dp, mp)
        add_attributes(dp.attributes, attributes)
        v = mp.value
        if isinstance(v, int) and not isinstance(v, bool) and _INT64[0] <= v <= _INT64[1]:
            dp.as_int = v
        else:
            dp.as_double = float(v)


# -- the exporter -------------------------------------------------------------------------

class OtlpExporter:
    takes_agent_metrics = True  # lost events and counters of the agent itself
    name = "otlp"
    config_class = OtlpConfig

    def __init__(self, config: OtlpConfig, context=None, transport=None):
        self.config = config
        namer = ServiceNamer(config.service_name_rules)
        self.red = Red(namer, config.red_max_series) if config.red_metrics else None
        self.converter = Converter(namer, resource=resource_attributes(config.resource))
        if transport is None:
            transport = (GrpcTransport if config.protocol == "grpc" else HttpTransport)(config)
        self.transport = transport
        self._cond = threading.Condition(threading.Lock())
        self._queue: deque = deque()
        self._stopping = False
        self._stop_event = threading.Event()
        self._deadline = None          # monotonic deadline once shutdown() is called
        self._flush_gen = 0            # flush() requests
        self._flushed_gen = 0          # ... served
        self._errors_logged = 0
        self.c = dict.fromkeys(
            ("exported_spans", "sent_spans", "dropped_spans", "failed_spans", "rejected_spans",
             "in_flight_spans", "queued_spans",
             "exported_metric_points", "sent_metric_points", "dropped_metric_points",
             "failed_metric_points", "rejected_metric_points", "in_flight_metric_points",
             "queued_metric_points",
             "requests_sent", "requests_failed", "retries", "dropped_at_shutdown",
             "red_requests_sent", "red_requests_failed", "red_points_sent", "conversion_errors"),
            0)
        self._pool = None
        if config.max_in_flight > 1:
            from concurrent.futures import ThreadPoolExecutor
            self._pool = ThreadPoolExecutor(config.max_in_flight,
                                            thread_name_prefix="deeptrace-otlp-send")
        self._thread = threading.Thread(target=self._run, name="deeptrace-otlp", daemon=True)
        self._thread.start()

    # -- hot path -------------------------------------------------------------------------
    def export(self, batch):
        items = [r for r in batch if getattr(r, "kind", None) in ("span", "metric")]
        if not items:
            return
        spans = [r for r in items if r.kind == "span"] if self.red is not None else None
        if spans:
            self.red.add_all(spans)
        c = self.c
        with self._cond:
            room = 0 if self._stopping else self.config.queue_size - len(self._queue)
            accepted = items[:room] if room < len(items) else items
            n_spans = n_accepted_spans = 0
            for r in items:
                if r.kind == "span":
                    n_spans += 1
            for r in accepted:
                if r.kind == "span":
                    n_accepted_spans += 1
            n_points = len(items) - n_spans
            n_accepted_points = len(accepted) - n_accepted_spans
            c["exported_spans"] += n_spans
            c["exported_metric_points"] += n_points
            c["dropped_spans"] += n_spans - n_accepted_spans
            c["dropped_metric_points"] += n_points - n_accepted_points
            c["queued_spans"] += n_accepted_spans
            c["queued_metric_points"] += n_accepted_points
            self._queue.extend(accepted)
            if len(self._queue) >= self.config.max_batch:
                self._cond.notify()

    # -- control --------------------------------------------------------------------------
    def flush(self, timeout: float | None = None) -> bool:
        """Send what is queued now (and the RED metrics); wait up to `timeout` seconds
        (default: the config's timeout). True when everything queued before the call is
        sent or given up on."""
        timeout = self.config.timeout if timeout is None else timeout
        with self._cond:
            if not self._thread.is_alive():
                return not self._queue
            self._flush_gen += 1
            gen = self._flush_gen
            self._cond.notify_all()
            return self._cond.wait_for(lambda: self._flushed_gen >= gen, timeout)

    def shutdown(self):
        with self._cond:
            if self._stopping:
                return
            self._stopping = True
            self._deadline = time.monotonic() + self.config.shutdown_timeout
            self._stop_event.set()
            self._cond.notify_all()
        self._thread.join(self.config.shutdown_timeout)
        if self._thread.is_alive():
            # Past the deadline with a request still in flight: cancel it (gRPC), or
            # let it run into its own timeout (HTTP).
            cancel = getattr(self.transport, "cancel", None)
            if cancel is not None:
                cancel()
            self._thread.join(self.config.timeout + 1)
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        try:
            self.transport.close()
        except Exception as exc:
            log.debug("closing the otlp transport: %r", exc)

    def stats(self) -> dict:
        with self._cond:
            out = dict(self.c)
            out["queue_length"] = len(self._queue)
        out["queue_size"] = self.config.queue_size
        if self.red is not None:
            out.update(self.red.stats())
        return out

    # -- background thread ----------------------------------------------------------------
    def _run(self):
        interval = self.config.export_interval
        next_tick = time.monotonic() + interval
        while True:
            with self._cond:
                while not (self._stopping or self._flush_gen > self._flushed_gen
                           or len(self._queue) >= self.config.max_batch
                           or time.monotonic() >= next_tick):
                    self._cond.wait(max(0.0, next_tick - time.monotonic()))
                stopping = self._stopping
                gen = self._flush_gen
                full_round = (stopping or gen > self._flushed_gen
                              or time.monotonic() >= next_tick)
                pending = len(self._queue)
            try:
                if full_round:
                    # Everything queued now (not what arrives meanwhile, or a busy
                    # endpoint would starve the RED metrics), then the RED metrics.
                    self._drain(pending)
                    self._send_red()
                    next_tick = time.monotonic() + interval
                else:
                    self._drain(pending - pending % self.config.max_batch)
            except Exception as exc:  # never let the thread die
                self._log_error("otlp export thread", exc)
            if gen > self._flushed_gen or stopping:
                with self._cond:
                    self._flushed_gen = max(self._flushed_gen, gen)
                    self._cond.notify_all()
            if stopping:
                self._drop_rest()
                return

    def _drain(self, n):
        """Send n queued items, in requests of max_batch, up to max_in_flight at once;
        returns when all of them are sent or given up on."""
        sending = deque()
        try:
            while n > 0:
                if self._deadline is not None and time.monotonic() >= self._deadline:
                    return  # shutdown's deadline: _drop_rest() accounts what is left
                with self._cond:
                    take = min(n, self.config.max_batch, len(self._queue))
                    if take <= 0:
                        return
                    items = [self._queue.popleft() for _ in range(take)]
                    n_spans = sum(1 for r in items if r.kind == "span")
                    self._move("queued", "in_flight", n_spans, take - n_spans)
                n -= take
                if self._pool is None:
                    self._send_items(items, n_spans)
                    continue
                if len(sending) >= self.config.max_in_flight:
                    sending.popleft().result()
                sending.append(self._pool.submit(self._send_items, items, n_spans))
        finally:
            for future in sending:
                future.result()

    def _move(self, src, dst, n_spans, n_points):
        c = self.c
        c[f"{src}_spans"] -= n_spans
        c[f"{dst}_spans"] += n_spans
        c[f"{src}_metric_points"] -= n_points
        c[f"{dst}_metric_points"] += n_points

    def _send_items(self, items, n_spans):
        n_points = len(items) - n_spans
        for signal, n, build in (
                ("traces", n_spans, lambda: self.converter.traces_request(
                    [r for r in items if r.kind == "span"])),
                ("metrics", n_points, lambda: self.converter.metrics_request(
                    [r for r in items if r.kind == "metric"]))):
            if not n:
                continue
            outcome, rejected = "failed", 0
            try:
                request = build()
            except Exception as exc:
                self.c["conversion_errors"] += 1
                self._log_error(f"building the otlp {signal} request", exc)
            else:
                response = self._send(signal, request)
                if response is not None:
                    outcome = "sent"
                    rejected = self._rejected(signal, response)
            with self._cond:
                if signal == "traces":
                    self._move("in_flight", outcome, n, 0)
                    self.c["rejected_spans"] += rejected
                else:
                    self._move("in_flight", outcome, 0, n)
                    self.c["rejected_metric_points"] += rejected

    @staticmethod
    def _rejected(signal, response):
        ps = getattr(response, "partial_success", None)
        if ps is None:
            return 0
        n = ps.rejected_spans if signal == "traces" else ps.rejected_data_points
        if n or ps.error_message:
            log.warning("otlp receiver rejected %d %s: %s", n, signal,
                        printable(ps.error_message))
        return n

    def _send_red(self):
        if self.red is None or not len(self.red):
            return
        points = self.red.points()
        step = max(3, self.config.max_batch - self.config.max_batch % 3)
        for i in range(0, len(points), step):
            chunk = points[i:i + step]
            try:
                request = self.converter.metrics_request(chunk, by_service=True)
            except Exception as exc:
                self.c["conversion_errors"] += 1
                self._log_error("building the RED metrics request", exc)
                return
            # Cumulative: a failed send is superseded by the next interval's, so it is
            # tried once, never retried (the queue's batches need the endpoint more).
            if self._send("metrics", request, retries=0, count=False) is None:
                with self._cond:
                    self.c["red_requests_failed"] += 1
                return
            with self._cond:
                self.c["red_requests_sent"] += 1
                self.c["red_points_sent"] += len(chunk)

    def _send(self, signal, request, retries=None, count=True):
        """One request with retries; the response, or None when given up."""
        retries = self.config.max_retries if retries is None else retries
        attempt = 0
        while True:
            timeout = self.config.timeout
            if self._deadline is not None:
                timeout = min(timeout, self._deadline - time.monotonic())
                if timeout <= 0:
                    break
            try:
                response = self.transport.send(signal, request, timeout)
            except SendError as exc:
                forget(exc)
                self._log_error(f"otlp {signal} export", exc)
                if not exc.retryable or attempt >= retries:
                    break
                cap = min(self.config.retry_max_backoff,
                          self.config.retry_initial_backoff * (2 ** min(attempt, 30)))
                delay = cap * random.uniform(0.5, 1.0)
                if exc.retry_after is not None:
                    delay = min(self.config.retry_max_backoff, max(delay, exc.retry_after))
                attempt += 1
                if count:
                    with self._cond:
                        self.c["retries"] += 1
                if not self._sleep(delay):
                    break
            except Exception as exc:  # a transport bug: do not retry blindly
                forget(exc)
                self._log_error(f"otlp {signal} export", exc)
                break
            else:
                if count:
                    with self._cond:
                        self.c["requests_sent"] += 1
                return response
        if count:
            with self._cond:
                self.c["requests_failed"] += 1
        return None

    def _sleep(self, delay) -> bool:
        """Sleep `delay` seconds, or less once shutdown() set a deadline; False when the
        deadline has passed."""
        end = time.monotonic() + delay
        while True:
            limit = end if self._deadline is None else min(end, self._deadline)
            now = time.monotonic()
            if now >= limit:
                return self._deadline is None or now < self._deadline
            if self._stop_event.is_set():
                time.sleep(limit - now)
            else:
                self._stop_event.wait(limit - now)

    def _drop_rest(self):
        with self._cond:
            items = list(self._queue)
            self._queue.clear()
            n_spans = sum(1 for r in items if r.kind == "span")
            self._move("queued", "dropped", n_spans, len(items) - n_spans)
            self.c["dropped_at_shutdown"] += len(items)
            self._cond.notify_all()

    def _log_error(self, what, exc):
        self._errors_logged += 1
        n = self._errors_logged
        if n & (n - 1) == 0:  # the 1st, 2nd, 4th, 8th ... error
            log.error("%s failed (%d errors so far): %s", what, n, printable(exc))


@hookimpl
def deeptrace_register_exporters(registry):
    registry.add_exporter(OtlpExporter)
