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


class Sink:
    """Writes requests' spans, counting what it accepted and refused.

    Group commit: an insert into ClickHouse costs ~100 ms whatever its size (a new part,
    the materialized views), so the requests that arrive while one insert runs are
    written together by the next; each request's caller waits for the insert that holds
    its spans (its acknowledgement follows the write)."""

    MAX_ROWS = 50_000      # spans per insert

    def __init__(self, store):
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
        self.store = store
        self.parse = trace_service_pb2.ExportTraceServiceRequest.FromString
        self.lock = threading.Lock()
        self._cond = threading.Condition(threading.Lock())
        self._pending = []          # [(table, done Event, [exception])]
        self._writing = False
        self.counts = {"requests": 0, "spans": 0, "failed_requests": 0, "bad_requests": 0,
                       "metric_points_not_stored": 0, "inserts": 0, "insert_seconds": 0.0}

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
        entry = [payload, False, None]          # payload, written, error
        with self._cond:
            self._pending.append(entry)
            while True:
                while self._writing and not entry[1]:
                    self._cond.wait()
                if entry[1]:
                    if entry[2] is not None:
                        raise entry[2]
                    return
                # No one is writing: this thread writes what waits, from the oldest.
                self._writing = True
                batch, rows = [], 0
                while self._pending and (not batch or rows < self.MAX_ROWS):
                    batch.append(self._pending.pop(0))
                    rows += len(batch[-1][0]) // 100      # ~100 bytes a span
                self._cond.release()
                error = RuntimeError("interrupted while writing")
                t0 = time.monotonic()
                try:
                    self.store.insert_otlp([e[0] for e in batch])
                    error = None
                    self.counts["inserts"] += 1
                    self.counts["insert_seconds"] = round(
                        self.counts["insert_seconds"] + time.monotonic() - t0, 3)
                except Exception as exc:      # every request of the batch is refused
                    error = exc
                finally:
                    self._cond.acquire()
                    for e in batch:
                        e[1], e[2] = True, error
                    self._writing = False
                    self._cond.notify_all()

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


def start_grpc(address: str, sink: Sink, max_message_bytes: int):
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

    # Requests waiting on one insert are written by the next together: more workers,
    # bigger inserts.
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16), options=[
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
