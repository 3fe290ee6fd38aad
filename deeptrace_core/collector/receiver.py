"""OTLP receivers (gRPC and HTTP/protobuf) for traces. A request is acknowledged only
after its spans are written: a batch an agent was told is accepted is never lost; one
that fails to be written gets UNAVAILABLE / 503, and the agent retries it.

Metrics are not stored (the agents' Prometheus endpoint serves them): an agent's OTLP
exporter also sends its own counters, so metric requests are acknowledged and their
points counted as ``metric_points_not_stored``, never silently."""

import gzip
import http.server
import logging
import threading
import time
from concurrent import futures

log = logging.getLogger("deeptrace.collector.receiver")


class _Pending:
    __slots__ = ("payload", "arrived", "done", "error")

    def __init__(self, payload):
        self.payload = payload
        self.arrived = time.monotonic()
        self.done = threading.Event()
        self.error = None


class Sink:
    """Writes requests' spans, counting what it accepted and refused.

    Group commit: an insert into ClickHouse has a fixed cost (a new part, the
    materialized views), so one writer thread inserts what waits as one group, when the
    group reaches `max_batch_bytes` or its oldest request has waited `max_delay` seconds
    (requests that arrive while an insert runs go into the next). Each request's caller
    waits for the insert that holds its spans: its acknowledgement follows the write, and
    if the insert fails, every request of that group is refused (the agents retry)."""

    def __init__(self, store, max_batch_bytes: int = 32 << 20, max_delay: float = 0.0):
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
        self.store = store
        self.max_batch_bytes = max_batch_bytes
        self.max_delay = max_delay
        self.parse = trace_service_pb2.ExportTraceServiceRequest.FromString
        self.lock = threading.Lock()
        self._cond = threading.Condition(threading.Lock())
        self._pending: list = []
        self._pending_bytes = 0
        self._closed = False
        self.counts = {"requests": 0, "spans": 0, "failed_requests": 0, "bad_requests": 0,
                       "metric_points_not_stored": 0, "inserts": 0, "insert_seconds": 0.0,
                       "insert_max_seconds": 0.0, "insert_max_requests": 0}
        self._writer = threading.Thread(target=self._write_loop, name="sink-writer",
                                        daemon=True)
        self._writer.start()

    def write(self, payload: bytes) -> int:
        """Store one serialized ExportTraceServiceRequest; its span count. ValueError if
        it is not one (the protobuf parse is in C; ClickHouse reads the payload itself)."""
        try:
            request = self.parse(payload)
        except Exception as exc:
            raise ValueError(f"not an OTLP trace request: {exc}") from None
        n = sum(len(ss.spans) for rs in request.resource_spans for ss in rs.scope_spans)
        if n:
            self._commit(payload)
        with self.lock:
            self.counts["requests"] += 1
            self.counts["spans"] += n
        return n

    def _commit(self, payload):
        """Return once `payload` is written (or raise why it could not be)."""
        entry = _Pending(payload)
        with self._cond:
            if self._closed:
                raise RuntimeError("collector stopping")
            self._pending.append(entry)
            self._pending_bytes += len(payload)
            self._cond.notify_all()
        entry.done.wait()
        if entry.error is not None:
            raise entry.error

    def _next_group(self):
        """The next group to insert (empty: closed and drained)."""
        with self._cond:
            while True:
                if self._pending:
                    wait = self._pending[0].arrived + self.max_delay - time.monotonic()
                    if self._pending_bytes >= self.max_batch_bytes or wait <= 0 or self._closed:
                        break
                    self._cond.wait(wait)
                elif self._closed:
                    return []
                else:
                    self._cond.wait()
            group, size = [], 0
            for e in self._pending:
                if group and size + len(e.payload) > self.max_batch_bytes:
                    break
                group.append(e)
                size += len(e.payload)
            del self._pending[:len(group)]
            self._pending_bytes -= size
            return group

    def _write_loop(self):
        while True:
            group = self._next_group()
            if not group:
                return
            error = RuntimeError("interrupted while writing")
            t0 = time.monotonic()
            try:
                self.store.insert_otlp([e.payload for e in group])
                error = None
            except Exception as exc:          # every request of the group is refused
                error = exc
            finally:
                for e in group:
                    e.error = error
                    e.done.set()
            took = time.monotonic() - t0
            if error is None:
                with self.lock:
                    c = self.counts
                    c["inserts"] += 1
                    c["insert_seconds"] = round(c["insert_seconds"] + took, 3)
                    c["insert_max_seconds"] = round(max(c["insert_max_seconds"], took), 3)
                    c["insert_max_requests"] = max(c["insert_max_requests"], len(group))

    def close(self):
        """Write what was accepted and waits, then stop the writer."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._writer.join()

    def count(self, key, n=1):
        with self.lock:
            self.counts[key] += n

    def metrics(self, request):
        n = sum(len(m.gauge.data_points) + len(m.sum.data_points) + len(m.histogram.data_points)
                for rm in request.resource_metrics for sm in rm.scope_metrics for m in sm.metrics)
        self.count("metric_points_not_stored", n)


def _split(address):
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def start_grpc(address: str, sink: Sink, max_message_bytes: int, max_workers: int = 128):
    import grpc
    from opentelemetry.proto.collector.metrics.v1 import (metrics_service_pb2,
                                                          metrics_service_pb2_grpc)
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

    reply = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()

    def export(payload, context):       # the request as bytes: ClickHouse parses it
        try:
            sink.write(payload)
        except ValueError as exc:
            sink.count("bad_requests")
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except Exception as exc:     # storage down or full: the agent retries
            sink.count("failed_requests")
            log.warning("write failed, batch refused: %r", exc)
            context.abort(grpc.StatusCode.UNAVAILABLE, f"storage: {exc}")
        return reply

    class MetricsService(metrics_service_pb2_grpc.MetricsServiceServicer):
        def Export(self, request, context):
            sink.metrics(request)
            return metrics_service_pb2.ExportMetricsServiceResponse()

    # A worker waits for the insert that holds its request (ack after the write): the
    # workers bound how many requests one group can hold, so many of them (mostly idle).
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers), options=[
        ("grpc.max_receive_message_length", max_message_bytes)])
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "opentelemetry.proto.collector.trace.v1.TraceService",
        {"Export": grpc.unary_unary_rpc_method_handler(export)}),))
    metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(MetricsService(), server)
    port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot listen on {address}")
    server.start()
    return server, port


class _HttpServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 64


def start_http(address: str, sink: Sink, max_message_bytes: int):
    from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

    class Handler(http.server.BaseHTTPRequestHandler):
        timeout = 30

        def do_POST(self):
            path = self.path.split("?")[0]
            if path not in ("/v1/traces", "/v1/metrics"):
                return self._reply(404, b"only /v1/traces and /v1/metrics")
            try:
                n = int(self.headers.get("Content-Length", "0"))
            except ValueError:
                n = -1
            if not 0 <= n <= max_message_bytes:
                sink.count("bad_requests")
                return self._reply(413, b"body too large or without Content-Length")
            body = self.rfile.read(n)
            try:
                if self.headers.get("Content-Encoding", "") == "gzip":
                    body = gzip.decompress(body)
                if path == "/v1/metrics":
                    sink.metrics(metrics_service_pb2.ExportMetricsServiceRequest.FromString(body))
                    return self._reply(200, b"", "application/x-protobuf")
            except Exception:
                sink.count("bad_requests")
                return self._reply(400, b"not an OTLP protobuf request")
            try:
                sink.write(body)
            except ValueError:
                sink.count("bad_requests")
                return self._reply(400, b"not an OTLP protobuf request")
            except Exception as exc:
                sink.count("failed_requests")
                log.warning("write failed, batch refused: %r", exc)
                return self._reply(503, b"storage unavailable")
            self._reply(200, trace_service_pb2.ExportTraceServiceResponse().SerializeToString(),
                        "application/x-protobuf")

        def _reply(self, code, body, ctype="text/plain"):
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = _HttpServer(_split(address), Handler)
    threading.Thread(target=server.serve_forever, name="otlp-http", daemon=True).start()
    return server, server.server_address[1]
