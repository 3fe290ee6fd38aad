"""The otlp exporter against REAL receivers started here: a grpcio server implementing
the OTLP TraceService and MetricsService, and an http.server taking OTLP/HTTP protobuf.

What is checked: the exact spans and metric points that arrive (names, kinds, ids,
status, attributes, resources, sums, histogram buckets, RED metrics, headers); then an
outage of ~10 s under load (2000 spans/s): export() never blocks, memory stays bounded,
drops are counted exactly and the exporter recovers when the receiver comes back on the
same port. Plus a slow receiver, shutdown's deadline, HTTP status handling, and the
pieces (RED aggregation, service names, AnyValue conversion, config) on their own.
"""

import gc
import gzip
import http.server
import socket
import threading
import time
import tracemalloc
from concurrent import futures

import grpc
import pytest
from opentelemetry.proto.collector.metrics.v1 import (metrics_service_pb2,
                                                      metrics_service_pb2_grpc)
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

from deeptrace_core.config import ConfigError, parse_config
from deeptrace_core.metrics import GAUGE, HISTOGRAM, SUM, MetricPoint, log2_bounds
from deeptrace_core.span import Span
from deeptrace_plugins.exporters import otlp, red
from deeptrace_plugins.exporters.otlp import OtlpConfig, OtlpExporter
from deeptrace_plugins.exporters.red import Red, ServiceNamer, ServiceRule

T0 = 1_700_000_000_000_000_000
HOST = socket.gethostname()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- receivers ----------------------------------------------------------------------------

class Receiver:
    """What a receiver got: requests per signal and the headers/metadata they came with."""

    def __init__(self, port=0):
        self.port = port
        self.lock = threading.Lock()
        self.traces, self.metrics, self.headers = [], [], []
        self.delay = 0.0

    def record(self, signal, request, headers):
        if self.delay:
            time.sleep(self.delay)
        with self.lock:
            (self.traces if signal == "traces" else self.metrics).append(request)
            self.headers.append(headers)

    def spans(self):
        with self.lock:
            requests = list(self.traces)
        return [(attributes(rs.resource.attributes), s) for req in requests
                for rs in req.resource_spans for ss in rs.scope_spans for s in ss.spans]

    def points(self):
        """(resource attributes, metric, data point) for every point received, in order."""
        with self.lock:
            requests = list(self.metrics)
        out = []
        for req in requests:
            for rm in req.resource_metrics:
                res = attributes(rm.resource.attributes)
                for sm in rm.scope_metrics:
                    for m in sm.metrics:
                        kind = m.WhichOneof("data")
                        for dp in getattr(m, kind).data_points:
                            out.append((res, m, dp))
        return out

    def latest(self, name):
        """The last point received of each series of metric `name`, by attributes."""
        out = {}
        for res, m, dp in self.points():
            if m.name == name:
                out[tuple(sorted(attributes(dp.attributes).items()))] = (res, m, dp)
        return out


class GrpcReceiver(Receiver):
    def start(self):
        rec = self

        class Traces(trace_service_pb2_grpc.TraceServiceServicer):
            def Export(self, request, context):
                rec.record("traces", request, dict(context.invocation_metadata()))
                return trace_service_pb2.ExportTraceServiceResponse()

        class Metrics(metrics_service_pb2_grpc.MetricsServiceServicer):
            def Export(self, request, context):
                rec.record("metrics", request, dict(context.invocation_metadata()))
                return metrics_service_pb2.ExportMetricsServiceResponse()

        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Traces(), server)
        metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(Metrics(), server)
        self.port = server.add_insecure_port(f"127.0.0.1:{self.port}")
        assert self.port
        server.start()
        self.server = server
        return self

    def stop(self):
        self.server.stop(0).wait()

    @property
    def endpoint(self):
        return f"127.0.0.1:{self.port}"


class HttpReceiver(Receiver):
    def __init__(self, port=0):
        super().__init__(port)
        self.statuses = []   # replies to give before 200s: (status, retry_after)

    def start(self):
        rec = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                with rec.lock:
                    status, retry_after = rec.statuses.pop(0) if rec.statuses else (200, None)
                if status != 200:
                    self.send_response(status)
                    if retry_after is not None:
                        self.send_header("Retry-After", str(retry_after))
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if self.path == "/v1/traces":
                    signal, req = "traces", trace_service_pb2.ExportTraceServiceRequest()
                    resp = trace_service_pb2.ExportTraceServiceResponse()
                elif self.path == "/v1/metrics":
                    signal, req = "metrics", metrics_service_pb2.ExportMetricsServiceRequest()
                    resp = metrics_service_pb2.ExportMetricsServiceResponse()
                else:
                    self.send_error(404)
                    return
                req.ParseFromString(body)
                rec.record(signal, req, {k.lower(): v for k, v in self.headers.items()})
                data = resp.SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        server.daemon_threads = True
        self.port = server.server_address[1]
        self.server = server
        self.thread = threading.Thread(target=server.serve_forever, daemon=True)
        self.thread.start()
        return self

    def stop(self):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)

    @property
    def endpoint(self):
        return f"http://127.0.0.1:{self.port}"


RECEIVERS = {"grpc": GrpcReceiver, "http/protobuf": HttpReceiver}


@pytest.fixture(params=["grpc", "http/protobuf"])
def receiver(request):
    rec = RECEIVERS[request.param]().start()
    rec.protocol = request.param
    yield rec
    try:
        rec.stop()
    except Exception:
        pass


def value_of(v: common_pb2.AnyValue):
    which = v.WhichOneof("value")
    if which == "array_value":
        return [value_of(x) for x in v.array_value.values]
    if which == "kvlist_value":
        return attributes(v.kvlist_value.values)
    return getattr(v, which) if which else None


def attributes(kvs):
    return {kv.key: value_of(kv.value) for kv in kvs}


def make_span(i=0, **kw):
    fields = dict(start_ns=T0 + i * 1000, end_ns=T0 + i * 1000 + 1_500_000, protocol="http1",
                  role="server", pid=4242, tid=4243, comm="myserv",
                  cmdline="/usr/bin/myserv --port 8080", l4="tcp", family="ipv4",
                  local_addr="10.0.0.1", local_port=8080, remote_addr="10.0.0.2",
                  remote_port=50000 + i % 1000, conn_id=7, operation="GET /items",
                  status="200", error=False, request_size=100, response_size=200,
                  attributes={"http.request.method": "GET", "url.path": "/items",
                              "http.response.status_code": 200})
    fields.update(kw)
    return Span(**fields)


def make_exporter(rec, **kw):
    kw.setdefault("export_interval", 0.2)
    return OtlpExporter(OtlpConfig(protocol=rec.protocol, endpoint=rec.endpoint, **kw))


def balance(st):
    """exported - (sent + dropped + failed + queued + in flight), per kind: must be 0."""
    return {k: st[f"exported_{k}"] - sum(st[f"{c}_{k}"] for c in
                                          ("sent", "dropped", "failed", "queued", "in_flight"))
            for k in ("spans", "metric_points")}


class SocketRecord:   # stands for the trace probe's records, which otlp ignores
    kind = "socket"


# -- content ------------------------------------------------------------------------------

def test_spans_and_metrics_arrive_exactly(receiver):
    exp = make_exporter(receiver, headers={"authorization": "Bearer s3cret", "x-tenant": "t1"},
                        service_name_rules=[ServiceRule(match=r"--port 8080", service="shop-api"),
                                            ServiceRule(match=r"^never$", service="nope")])
    trace_id, parent = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"
    server = make_span(0, trace_id=trace_id, parent_span_id=parent, span_id="00f067aa0ba902b7",
                       link_source="tcp_seq", request_seq=(4294967000, 4294967100),
                       response_seq=(77, 277))
    client = make_span(1, role="client", pid=5151, tid=5151, comm="curl",
                       cmdline="curl http://x/", local_addr="10.0.0.2", local_port=50001,
                       remote_addr="10.0.0.1", remote_port=8080, conn_id=9,
                       operation="", protocol="redis", status="ERR boom", error=True,
                       attributes={"db.system": "redis", "db.operation.name": "GET",
                                   "db.query.text": "GET k", "server.address": "cache.local",
                                   "deeptrace.incomplete": True, "ratio": 0.5,
                                   "http.request.header.accept": ["a", "b"], "none": None})
    v6 = make_span(2, family="ipv6", l4="udp", protocol="dns", operation="QUERY example.com",
                   local_addr="::1", remote_addr="::2", attributes={})
    pid_attrs = {"process.pid": 4242, "process.executable.name": "myserv",
                 "process.command_line": "/usr/bin/myserv --port 8080"}
    points = [
        MetricPoint("process.cpu.time", SUM, "s", 12.5, {**pid_attrs, "cpu.mode": "user"},
                    "CPU time", start_ns=T0, time_ns=T0 + 10),
        MetricPoint("process.disk.io", SUM, "By", 4096, {**pid_attrs, "disk.io.direction": "read"},
                    start_ns=T0, time_ns=T0 + 10),
        MetricPoint("system.memory.usage", GAUGE, "By", 1 << 40, {"system.memory.state": "used"},
                    time_ns=T0 + 10),
        MetricPoint("disk.io.latency", HISTOGRAM, "s", attributes={"disk.device": "sda"},
                    bounds=log2_bounds(1e-4, 3), counts=(1, 0, 5, 2), count=8, sum=0.004,
                    start_ns=T0, time_ns=T0 + 10),
    ]
    exp.export([SocketRecord(), server, points[0], client])
    exp.export([v6, *points[1:], object()])
    assert exp.flush(10)
    st = exp.stats()
    assert (st["exported_spans"], st["sent_spans"], st["failed_spans"], st["dropped_spans"]) == \
        (3, 3, 0, 0)
    assert (st["exported_metric_points"], st["sent_metric_points"]) == (4, 4)
    assert st["queue_length"] == 0 and balance(st) == {"spans": 0, "metric_points": 0}

    got = {s.name: (res, s) for res, s in receiver.spans()}
    assert set(got) == {"GET /items", "redis", "QUERY example.com"}

    res, s = got["GET /items"]
    assert res == {"service.name": "shop-api", "host.name": HOST, "process.pid": 4242,
                   "deeptrace.agent.id": otlp.AGENT_ID, "process.executable.name": "myserv",
                   "process.command_line": "/usr/bin/myserv --port 8080",
                   "telemetry.sdk.name": "deeptrace", "telemetry.sdk.version": otlp.VERSION}
    assert s.kind == trace_pb2.Span.SpanKind.SPAN_KIND_SERVER
    assert (s.trace_id.hex(), s.span_id.hex(), s.parent_span_id.hex()) == \
        (trace_id, "00f067aa0ba902b7", parent)
    assert (s.start_time_unix_nano, s.end_time_unix_nano) == (T0, T0 + 1_500_000)
    assert s.status.code == trace_pb2.Status.StatusCode.STATUS_CODE_UNSET
    assert attributes(s.attributes) == {
        "http.request.method": "GET", "url.path": "/items", "http.response.status_code": 200,
        "network.transport": "tcp", "network.type": "ipv4",
        "network.peer.address": "10.0.0.2", "network.peer.port": 50000,
        "server.address": "10.0.0.1", "server.port": 8080,
        "client.address": "10.0.0.2", "client.port": 50000,
        "network.local.address": "10.0.0.1", "network.local.port": 8080,
        "deeptrace.protocol": "http1", "deeptrace.conn_id": 7, "deeptrace.link_source": "tcp_seq",
        "thread.id": 4243,
        # the stitch keys: the request's and the response's TCP stream positions
        "deeptrace.request.seq_start": 4294967000, "deeptrace.request.seq_end": 4294967100,
        "deeptrace.response.seq_start": 77, "deeptrace.response.seq_end": 277}

    res, s = got["redis"]
    assert res["service.name"] == "curl" and res["process.pid"] == 5151
    assert s.kind == trace_pb2.Span.SpanKind.SPAN_KIND_CLIENT
    assert len(s.trace_id) == 16 and any(s.trace_id) and s.trace_id != got["GET /items"][1].trace_id
    assert s.parent_span_id == b"" and s.span_id.hex() == client.span_id
    assert (s.status.code, s.status.message) == (trace_pb2.Status.StatusCode.STATUS_CODE_ERROR,
                                                 "ERR boom")
    assert attributes(s.attributes) == {
        "db.system": "redis", "db.operation.name": "GET", "db.query.text": "GET k",
        "server.address": "cache.local",      # the span's own wins over the socket's
        "deeptrace.incomplete": True, "ratio": 0.5, "http.request.header.accept": ["a", "b"],
        "network.transport": "tcp", "network.type": "ipv4",
        "network.peer.address": "10.0.0.1", "network.peer.port": 8080, "server.port": 8080,
        "network.local.address": "10.0.0.2", "network.local.port": 50001,
        "deeptrace.protocol": "redis", "deeptrace.conn_id": 9, "thread.id": 5151}

    res, s = got["QUERY example.com"]
    a = attributes(s.attributes)
    assert (a["network.type"], a["network.transport"], a["server.address"]) == \
        ("ipv6", "udp", "::1")

    # metric points
    pts = {m.name: (r, m, dp) for r, m, dp in receiver.points()
           if not m.name.startswith("deeptrace.")}
    r, m, dp = pts["process.cpu.time"]
    assert r == got["GET /items"][0]         # the process's resource, the same as its spans'
    assert m.unit == "s" and m.description == "CPU time" and m.sum.is_monotonic
    assert m.sum.aggregation_temporality == 2  # CUMULATIVE
    assert (dp.as_double, attributes(dp.attributes)) == (12.5, {**pid_attrs, "cpu.mode": "user"})
    assert (dp.start_time_unix_nano, dp.time_unix_nano) == (T0, T0 + 10)
    r, m, dp = pts["process.disk.io"]
    assert (dp.as_int, m.unit, r["service.name"]) == (4096, "By", "shop-api")
    r, m, dp = pts["system.memory.usage"]
    assert m.WhichOneof("data") == "gauge" and dp.as_int == 1 << 40
    assert r == {"service.name": "deeptrace-host", "host.name": HOST,
                 "deeptrace.agent.id": otlp.AGENT_ID,
                 "telemetry.sdk.name": "deeptrace", "telemetry.sdk.version": otlp.VERSION}
    r, m, dp = pts["disk.io.latency"]
    assert m.histogram.aggregation_temporality == 2
    assert list(dp.explicit_bounds) == [1e-4, 2e-4, 4e-4]
    assert list(dp.bucket_counts) == [1, 0, 5, 2] and (dp.count, dp.sum) == (8, 0.004)
    assert attributes(dp.attributes) == {"disk.device": "sda"}

    # RED metrics of the three spans, under one resource per service
    requests = receiver.latest("deeptrace.requests")
    assert {k: dp.as_int for k, (_, _, dp) in requests.items()} == {
        (("deeptrace.protocol", "http1"), ("operation", "GET /items"),
         ("service.name", "shop-api"), ("span.kind", "server")): 1,
        (("deeptrace.protocol", "redis"), ("operation", "redis"),
         ("service.name", "curl"), ("span.kind", "client")): 1,
        (("deeptrace.protocol", "dns"), ("operation", "QUERY example.com"),
         ("service.name", "shop-api"), ("span.kind", "server")): 1}
    res, m, _ = next(iter(requests.values()))
    assert m.sum.is_monotonic and res["telemetry.sdk.name"] == "deeptrace"
    errors = {dict(k)["service.name"]: dp.as_int
              for k, (_, _, dp) in receiver.latest("deeptrace.errors").items()}
    assert errors == {"shop-api": 0, "curl": 1}
    hist = receiver.latest("deeptrace.request.duration")
    _, m, dp = [v for k, v in hist.items() if dict(k)["operation"] == "GET /items"][0]
    assert m.unit == "s" and dp.count == 1 and abs(dp.sum - 0.0015) < 1e-12
    assert list(dp.explicit_bounds) == list(red.DURATION_BOUNDS)
    assert dp.bucket_counts[4] == 1 and sum(dp.bucket_counts) == 1  # 0.8 ms < 1.5 ms <= 1.6 ms

    # headers / metadata on every request
    assert receiver.headers and all(h.get("authorization") == "Bearer s3cret"
                                    and h.get("x-tenant") == "t1" for h in receiver.headers)
    if receiver.protocol == "http/protobuf":
        assert all(h["content-type"] == "application/x-protobuf" for h in receiver.headers)
    exp.shutdown()


def test_gzip_compression(receiver):
    exp = make_exporter(receiver, compression="gzip")
    exp.export([make_span(i) for i in range(10)])
    assert exp.flush(10)
    assert len(receiver.spans()) == 10 and exp.stats()["sent_spans"] == 10
    exp.shutdown()


# -- outage under load --------------------------------------------------------------------

def _rss_kib():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def test_outage_under_load(receiver):
    """Receiver down for 10 s while 2000 spans/s are exported: export() never blocks,
    memory stays bounded, every span is accounted for, and spans flow again after the
    receiver restarts on the same port."""
    queue_size, max_batch = 2048, 512
    exp = make_exporter(receiver, queue_size=queue_size, max_batch=max_batch, timeout=2.0,
                        export_interval=1.0, max_retries=3, retry_initial_backoff=0.2,
                        retry_max_backoff=1.0, shutdown_timeout=3.0)
    # 1. up: everything arrives
    for i in range(0, 1000, 50):
        exp.export([make_span(i + j) for j in range(50)])
    assert exp.flush(10)
    assert len(receiver.spans()) == 1000 and exp.stats()["sent_spans"] == 1000

    # what one span costs, to bound the queue's memory
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    sample = [make_span(i) for i in range(1000)]
    per_span = (tracemalloc.get_traced_memory()[0] - base) / 1000
    del sample

    # 2. down for 10 s under 2000 spans/s (20 spans every 10 ms)
    receiver.stop()
    rss0 = _rss_kib()
    mem0 = tracemalloc.get_traced_memory()[0]
    tracemalloc.reset_peak()
    durations, n, max_queue = [], 0, 0
    start = time.monotonic()
    tick = start
    while time.monotonic() - start < 10.0:
        batch = [make_span(n + j, operation="during-outage") for j in range(20)]
        n += 20
        t = time.perf_counter()
        exp.export(batch)
        durations.append(time.perf_counter() - t)
        del batch
        if n % 200 == 0:
            st = exp.stats()
            max_queue = max(max_queue, st["queue_length"])
            assert st["queue_length"] <= queue_size
            assert balance(st) == {"spans": 0, "metric_points": 0}
        tick += 0.01
        time.sleep(max(0.0, tick - time.monotonic()))
    current, peak = (m - mem0 for m in tracemalloc.get_traced_memory())
    alive = sum(1 for o in gc.get_objects() if type(o) is Span)   # no gc.collect() first
    tracemalloc.stop()
    rss_growth = _rss_kib() - rss0
    st = exp.stats()
    durations.sort()
    p50, p99, worst = (durations[len(durations) // 2], durations[int(len(durations) * 0.99)],
                       durations[-1])
    print(f"\n[{receiver.protocol}] outage: {n} spans exported in 10 s; export() of 20 spans: "
          f"p50 {p50 * 1e6:.0f} us, p99 {p99 * 1e6:.0f} us, max {worst * 1e3:.2f} ms "
          f"(under tracemalloc); queue max {max_queue}/{queue_size}; "
          f"traced memory +{current / 1e6:.1f} MB at the end, peak +{peak / 1e6:.1f} MB "
          f"({per_span:.0f} B/span; all {n} spans "
          f"would be {n * per_span / 1e6:.1f} MB); RSS +{rss_growth / 1024:.1f} MiB; "
          f"dropped {st['dropped_spans']}, failed {st['failed_spans']}, "
          f"retries {st['retries']}; Span objects alive {alive}")
    assert n >= 15000
    # Never waits on the network: a blocked call would take a refused connection's
    # retries (0.2-1 s each) or a timeout (2 s). The bounds leave room for a loaded VM.
    assert worst < 0.25 and p99 < 0.02
    assert st["exported_spans"] == 1000 + n and st["sent_spans"] == 1000
    assert st["dropped_spans"] > 0 and st["failed_spans"] > 0 and st["retries"] > 0
    assert balance(st) == {"spans": 0, "metric_points": 0}
    # Memory: the queue holds at most queue_size spans, plus max_in_flight batches in
    # flight (each retried while the receiver is down).
    flying = exp.config.max_in_flight * max_batch
    assert peak < (queue_size + flying + max_batch) * per_span + 2e6
    assert peak < n * per_span / 3
    assert alive <= queue_size + flying
    assert rss_growth < 64 * 1024

    # 3. the receiver comes back on the same port: spans flow again
    sent_before = st["sent_spans"]
    port = receiver.port
    type(receiver).__init__(receiver, port)   # fresh request lists, same port
    receiver.start()
    assert receiver.port == port
    t_back = time.monotonic()
    deadline = t_back + 20
    while exp.stats()["sent_spans"] == sent_before:
        assert time.monotonic() < deadline, "no span sent after the receiver came back"
        time.sleep(0.05)
    recovery = time.monotonic() - t_back
    while exp.stats()["queue_length"] > queue_size - 500:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    for i in range(0, 500, 50):
        exp.export([make_span(i + j, operation="after-restart") for j in range(50)])
    assert exp.flush(15)
    st = exp.stats()
    names = [s.name for _, s in receiver.spans()]
    print(f"[{receiver.protocol}] first span sent {recovery:.2f} s after the restart; "
          f"{len(names)} spans received after it")
    assert names.count("after-restart") == 500
    assert st["dropped_spans"] + st["failed_spans"] > 0
    assert st["queued_spans"] == st["in_flight_spans"] == 0
    # exactly what was sent arrived (no duplicates, no loss unaccounted for)
    ids = [s.span_id for _, s in receiver.spans()]
    assert len(ids) == len(set(ids)) == st["sent_spans"] - 1000
    assert st["sent_spans"] + st["dropped_spans"] + st["failed_spans"] == st["exported_spans"]
    exp.shutdown()
    assert balance(exp.stats()) == {"spans": 0, "metric_points": 0}


def test_shutdown_respects_its_deadline_when_the_endpoint_is_down():
    port = free_port()   # nothing listens there
    # One request in flight: what waits in the queue at the deadline is dropped (with
    # several, a batch in flight is failed instead; both counted below).
    exp = OtlpExporter(OtlpConfig(endpoint=f"127.0.0.1:{port}", queue_size=2048, timeout=5.0,
                                  max_in_flight=1, max_retries=10, retry_initial_backoff=0.5,
                                  retry_max_backoff=2.0, shutdown_timeout=1.0))
    exp.export([make_span(i) for i in range(3000)])
    st = exp.stats()
    assert (st["dropped_spans"], st["queue_length"] + st["in_flight_spans"]) == (952, 2048)
    t = time.monotonic()
    exp.shutdown()
    took = time.monotonic() - t
    st = exp.stats()
    assert took < 2.0, took
    assert st["queued_spans"] == st["in_flight_spans"] == st["queue_length"] == 0
    assert st["dropped_at_shutdown"] > 0 and st["sent_spans"] == 0
    assert st["dropped_spans"] + st["failed_spans"] == 3000 == st["exported_spans"]
    exp.export([make_span(1)])            # after shutdown: counted, not queued
    assert exp.stats()["dropped_spans"] == st["dropped_spans"] + 1


def test_slow_endpoint_does_not_block_export():
    rec = GrpcReceiver().start()
    rec.protocol, rec.delay = "grpc", 1.5
    try:
        exp = make_exporter(rec, timeout=0.3, max_retries=1, retry_initial_backoff=0.1,
                            max_batch=100, queue_size=500)
        worst = 0.0
        for i in range(100):
            t = time.perf_counter()
            exp.export([make_span(i * 20 + j) for j in range(20)])
            worst = max(worst, time.perf_counter() - t)
            time.sleep(0.01)
        deadline = time.monotonic() + 10
        while exp.stats()["failed_spans"] < 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        st = exp.stats()
        assert worst < 0.15      # each request here takes its 0.3 s timeout
        assert st["retries"] >= 2 and st["requests_failed"] >= 2 and st["dropped_spans"] > 0
        assert balance(st) == {"spans": 0, "metric_points": 0}
        exp.shutdown()
    finally:
        rec.stop()


def test_http_retry_after_then_success_and_permanent_errors():
    rec = HttpReceiver().start()
    rec.protocol = "http/protobuf"
    try:
        exp = make_exporter(rec, max_retries=2, retry_initial_backoff=0.05, red_metrics=False)
        rec.statuses = [(503, 0.2), (429, None)]
        t = time.monotonic()
        exp.export([make_span(i) for i in range(5)])
        assert exp.flush(10)
        st = exp.stats()
        assert (st["sent_spans"], st["retries"], st["failed_spans"]) == (5, 2, 0)
        assert time.monotonic() - t >= 0.2          # Retry-After honoured
        rec.statuses = [(400, None)]                # permanent: not retried
        exp.export([make_span(i) for i in range(3)])
        assert exp.flush(10)
        st = exp.stats()
        assert (st["sent_spans"], st["retries"], st["failed_spans"], st["requests_failed"]) == \
            (5, 2, 3, 1)
        rec.statuses = [(503, None)] * 3            # retries exhausted
        exp.export([make_span(i) for i in range(4)])
        assert exp.flush(10)
        st = exp.stats()
        assert (st["retries"], st["failed_spans"], st["requests_failed"]) == (4, 7, 2)
        assert len(rec.spans()) == 5
        exp.shutdown()
    finally:
        rec.stop()


def test_queue_bound_counts_drops_exactly_per_kind():
    port = free_port()
    exp = OtlpExporter(OtlpConfig(endpoint=f"127.0.0.1:{port}", queue_size=10, max_batch=1000,
                                  export_interval=3600, red_metrics=False, shutdown_timeout=0))
    pts = [MetricPoint("m", GAUGE, "1", i) for i in range(4)]
    exp.export([make_span(0), *pts[:2], SocketRecord(), make_span(1)])   # 4 items
    exp.export([make_span(i) for i in range(5)] + pts[2:])               # 7 items: 6 fit
    st = exp.stats()
    assert st["queue_length"] == 10
    assert (st["exported_spans"], st["queued_spans"], st["dropped_spans"]) == (7, 7, 0)
    assert (st["exported_metric_points"], st["queued_metric_points"],
            st["dropped_metric_points"]) == (4, 3, 1)
    exp.shutdown()
    st = exp.stats()
    assert st["dropped_at_shutdown"] == 10 and balance(st) == {"spans": 0, "metric_points": 0}


# -- pieces -------------------------------------------------------------------------------

def test_red_series_are_bounded_and_buckets_are_upper_inclusive():
    r = Red(ServiceNamer(), max_series=2)
    us = 1000
    r.add(make_span(0, end_ns=T0 + 50 * us, operation="a"))                 # bucket 0
    r.add(make_span(0, end_ns=T0 + 200 * us, operation="a", error=True))    # exactly 200 µs: 1
    r.add(make_span(0, end_ns=T0 + 201 * us, operation="b"))                # bucket 2
    for op in ("c", "d", "e"):
        r.add(make_span(0, end_ns=T0 + 10**9, operation=op))
    r.add(make_span(0, operation="f", protocol="dns"))
    pts = {(p.name, p.attributes["operation"], p.attributes["deeptrace.protocol"]): p
           for p in r.points()}
    assert pts["deeptrace.requests", "a", "http1"].value == 2
    assert pts["deeptrace.errors", "a", "http1"].value == 1
    assert pts["deeptrace.request.duration", "a", "http1"].counts[:3] == (1, 1, 0)
    assert pts["deeptrace.request.duration", "b", "http1"].counts[:3] == (0, 0, 1)
    assert pts["deeptrace.requests", "other", "http1"].value == 3
    assert pts["deeptrace.requests", "other", "dns"].value == 1
    other = pts["deeptrace.request.duration", "other", "http1"]
    # 1 s: 0.8192 s < 1 s <= 1.6384 s, bucket 14
    assert other.count == 3 and other.sum == 3.0 and other.counts[14] == 3
    assert r.stats() == {"red_series": 4, "red_overflow_spans": 4, "red_expired": 0}
    # "other" series are bounded too: past max_series of them, one per kind remains
    for proto in ("p1", "p2", "p3"):
        r.add(make_span(0, operation="x", protocol=proto))
    assert len(r) <= 2 * r.max_series + 2
    assert {k for k in r.series if k[0] == "other"} == {("other", "server", "other", "other")}


def test_red_series_expire_and_free_their_place():
    """A burst of one-off operations must not fold every later operation into "other" for
    good: a series without spans for `ttl` seconds is forgotten (issue 13, row 8)."""
    now = [1000.0]
    r = Red(ServiceNamer(), max_series=2, ttl=60.0, clock=lambda: now[0])
    for op in ("/item/1", "/item/2", "/item/3"):
        r.add(make_span(0, operation=op))
    assert sorted(k[3] for k in r.series) == ["/item/1", "/item/2", "other"]
    now[0] += 30
    r.add(make_span(0, operation="/item/2"))            # still in use: kept
    now[0] += 31                                         # /item/1 and other: 61 s idle
    r.add(make_span(0, operation="GET /health"))
    assert sorted(k[3] for k in r.series) == ["/item/2", "GET /health"]
    assert r.stats()["red_expired"] == 2
    pts = {(p.name, p.attributes["operation"]): p for p in r.points()}
    health = pts["deeptrace.requests", "GET /health"]
    assert health.value == 1 and health.start_ns > pts["deeptrace.requests", "/item/2"].start_ns
    now[0] += 61
    assert r.points() == [] and r.stats()["red_series"] == 0   # scrape-time expiry too
    r2 = Red(ServiceNamer(), max_series=1, ttl=0, clock=lambda: now[0])   # 0: kept forever
    r2.add(make_span(0, operation="x"))
    now[0] += 10 ** 6
    r2.add(make_span(0, operation="y"))
    assert sorted(k[3] for k in r2.series) == ["other", "x"]


def test_service_name_rules_first_match_on_comm_or_cmdline():
    namer = ServiceNamer([ServiceRule(match=r"^python", service="py"),
                          ServiceRule(match=r"manage\.py runserver", service="django"),
                          ServiceRule(match=r".*", service="catch-all")])
    assert namer("python3", "python3 manage.py runserver") == "py"       # first rule wins
    assert namer("uwsgi", "/usr/bin/python manage.py runserver") == "django"
    assert namer("nginx", "nginx: worker") == "catch-all"
    assert ServiceNamer()("nginx", "nginx: worker") == "nginx"
    assert ServiceNamer()("", "") == "unknown_service"


def test_any_value_conversion():
    kv = common_pb2.KeyValueList()
    otlp.add_attributes(kv.values, {"b": True, "i": -3, "big": 1 << 70, "f": 1.5, "s": "x",
                                    "raw": b"\x00\x01", "l": [1, "a", None], "d": {"k": 2},
                                    "n": None, "o": ValueError("e")})
    got = {x.key: (x.value.WhichOneof("value"), value_of(x.value)) for x in kv.values}
    assert got == {"b": ("bool_value", True), "i": ("int_value", -3),
                   "big": ("string_value", str(1 << 70)), "f": ("double_value", 1.5),
                   "s": ("string_value", "x"), "raw": ("bytes_value", b"\x00\x01"),
                   "l": ("array_value", [1, "a"]), "d": ("kvlist_value", {"k": 2}),
                   "o": ("string_value", "e")}


def test_config_from_yaml_and_its_errors():
    schemas = {"probes": {"trace": OtlpConfig}, "exporters": {"otlp": OtlpConfig}}
    head = "probes: {trace: {}}\nexporters:\n  otlp:\n"
    tail = "pipelines: {m: {probes: [trace], exporters: [otlp]}}\n"
    cfg = parse_config(head + """\
    protocol: http/protobuf
    endpoint: https://collector:4318
    headers: {authorization: "Bearer ${env:TOKEN}"}
    timeout: 500ms
    export_interval: 2s
    queue_size: 100
    service_name_rules:
      - {match: "^gunicorn", service: shop}
""" + tail, "a.yaml", schemas, {"TOKEN": "t0k"}).exporters["otlp"].config
    assert (cfg.protocol, cfg.endpoint, cfg.headers, cfg.timeout, cfg.export_interval,
            cfg.queue_size) == ("http/protobuf", "https://collector:4318",
                                {"authorization": "Bearer t0k"}, 0.5, 2.0, 100)
    assert cfg.service_name_rules == [ServiceRule("^gunicorn", "shop")]
    for body, where in (("    protocol: http\n", "exporters.otlp.protocol"),
                        ("    queue_size: 0\n", "exporters.otlp.queue_size"),
                        ("    service_name_rules: [{match: '(', service: x}]\n",
                         "exporters.otlp.service_name_rules[0].match")):
        with pytest.raises(ConfigError) as e:
            parse_config(head + body + tail, "a.yaml", schemas, {})
        assert e.value.key == where and e.value.line == 4


def test_default_endpoints():
    grpc_exp = OtlpExporter(OtlpConfig())
    http_exp = OtlpExporter(OtlpConfig(protocol="http/protobuf"))
    try:
        assert grpc_exp.transport.target == "127.0.0.1:4317"
        assert http_exp.transport.urls == {"traces": "http://127.0.0.1:4318/v1/traces",
                                           "metrics": "http://127.0.0.1:4318/v1/metrics"}
    finally:
        for e in (grpc_exp, http_exp):
            e.config.shutdown_timeout = 0
            e.shutdown()


def test_http_redirect_is_an_error_never_followed():
    """Issue 13: a 302 must not turn the export into a body-less GET that carries the
    Authorization header to the new location, counted as sent."""
    seen = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def _answer(self):
            seen.append((self.command, self.path, self.headers.get("Authorization")))
            n = int(self.headers.get("Content-Length") or 0)
            if n:
                self.rfile.read(n)
            if self.path.startswith("/v1/"):
                self.send_response(302)
                self.send_header("Location", f"http://127.0.0.1:{self.server.server_port}/stolen")
            else:
                self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_GET = do_POST = _answer

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        exp = OtlpExporter(OtlpConfig(protocol="http/protobuf", insecure=True,
                                      endpoint=f"127.0.0.1:{server.server_port}",
                                      headers={"Authorization": "Bearer s3cret"},
                                      max_retries=2, retry_initial_backoff=0.05,
                                      red_metrics=False))
        exp.export([make_span(i) for i in range(3)])
        assert exp.flush(10)
        st = exp.stats()
        exp.shutdown()
    finally:
        server.shutdown()
        server.server_close()
    assert [path for _, path, _ in seen] == ["/v1/traces"]   # one POST, no retry, no GET
    assert seen[0][0] == "POST"
    assert (st["sent_spans"], st["failed_spans"], st["requests_failed"], st["retries"]) == \
        (0, 3, 1, 0)


def test_resource_attributes_from_the_environment_and_the_config():
    """Agents take host.name and the rest from OTEL_RESOURCE_ATTRIBUTES, as SDKs do; the
    config's `resource` wins; every resource carries them and the agent's id."""
    env = {"OTEL_RESOURCE_ATTRIBUTES": "host.name=host-b,deployment.environment=prod%20eu,"
                                       "bad,=x,k8s.pod.name=web-1"}
    got = otlp.resource_attributes({"deployment.environment": "staging"}, env)
    assert got == {"host.name": "host-b", "deployment.environment": "staging",
                   "k8s.pod.name": "web-1"}
    conv = otlp.Converter(ServiceNamer(), resource=got)
    res = attributes(conv.traces_request([make_span(0)]).resource_spans[0].resource.attributes)
    assert (res["host.name"], res["k8s.pod.name"], res["deeptrace.agent.id"]) == \
        ("host-b", "web-1", otlp.AGENT_ID)
    assert res["service.name"] == "myserv" and res["process.pid"] == 4242
    host = attributes(conv.named_resource(otlp.HOST_SERVICE).attributes)
    assert host["host.name"] == "host-b" and host["deployment.environment"] == "staging"
    assert otlp.OtlpConfig(resource={"host.name": "a"}).resource == {"host.name": "a"}


def test_several_requests_in_flight_against_a_slow_receiver(receiver):
    """A receiver that takes 0.4 s per request (a busy collector acknowledging after its
    write): with one request in flight an agent sends max_batch spans per 0.4 s; with
    max_in_flight 4, four batches go at once (issue 16: one agent was capped at ~1,700
    spans/s by the collector's ack latency)."""
    receiver.delay = 0.4
    took = {}
    for flying in (1, 4):
        exp = make_exporter(receiver, max_batch=100, queue_size=1000, max_in_flight=flying,
                            export_interval=5.0, red_metrics=False)
        try:
            exp.export([make_span(i) for i in range(400)])
            t = time.monotonic()
            assert exp.flush(10)
            took[flying] = time.monotonic() - t
            st = exp.stats()
            assert st["sent_spans"] == 400 and balance(st) == {"spans": 0, "metric_points": 0}
        finally:
            exp.shutdown()
    assert took[1] >= 1.6 and took[4] < 1.0, took
    assert len(receiver.spans()) == 800
