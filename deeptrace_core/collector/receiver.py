"""OTLP receivers (gRPC and HTTP/protobuf) for traces. A request is acknowledged only
after its spans are written: a batch an agent was told is accepted is never lost; one
that fails to be written gets UNAVAILABLE / 503, and the agent retries it."""

import gzip
import http.server
import logging
import threading
from concurrent import futures

log = logging.getLogger("deeptrace.collector.receiver")


class Sink:
    """Writes one request's spans, counting what it accepted and refused."""

    def __init__(self, store):
        from .convert import to_arrow
        self.store = store
        self.to_arrow = to_arrow
        self.lock = threading.Lock()
        self.counts = {"requests": 0, "spans": 0, "failed_requests": 0, "bad_requests": 0}

    def write(self, request) -> int:
        table, n = self.to_arrow(request)
        if n:
            self.store.insert_arrow("otel_traces", table)
        with self.lock:
            self.counts["requests"] += 1
            self.counts["spans"] += n
        return n

    def count(self, key):
        with self.lock:
            self.counts[key] += 1


def _split(address):
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def start_grpc(address: str, sink: Sink, max_message_bytes: int):
    import grpc
    from opentelemetry.proto.collector.trace.v1 import (trace_service_pb2,
                                                        trace_service_pb2_grpc)

    class TraceService(trace_service_pb2_grpc.TraceServiceServicer):
        def Export(self, request, context):
            try:
                sink.write(request)
            except Exception as exc:     # storage down or full: the agent retries
                sink.count("failed_requests")
                log.warning("write failed, batch refused: %r", exc)
                context.abort(grpc.StatusCode.UNAVAILABLE, f"storage: {exc}")
            return trace_service_pb2.ExportTraceServiceResponse()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=[
        ("grpc.max_receive_message_length", max_message_bytes)])
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(TraceService(), server)
    port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot listen on {address}")
    server.start()
    return server, port


class _HttpServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 64


def start_http(address: str, sink: Sink, max_message_bytes: int):
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

    class Handler(http.server.BaseHTTPRequestHandler):
        timeout = 30

        def do_POST(self):
            if self.path.split("?")[0] != "/v1/traces":
                return self._reply(404, b"only /v1/traces")
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
                req = trace_service_pb2.ExportTraceServiceRequest.FromString(body)
            except Exception:
                sink.count("bad_requests")
                return self._reply(400, b"not an OTLP protobuf trace request")
            try:
                sink.write(req)
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
