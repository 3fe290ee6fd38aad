"""Re-export of stitched traces to a downstream OTLP backend (``export.otlp``): spans whose
end is `settle` old go out with their canonical trace id and stitched parent, once.

Attribute values go out as the strings ClickHouse holds. A span that reaches the collector
more than `settle` after its end is stored and stitched but not re-exported (counted
only as what the window passed over: agents deliver within seconds, so keep `settle`
above their linker wait plus export interval)."""

import logging
import time

from .query import _CANON, _PARENT, maps

log = logging.getLogger("deeptrace.collector.export")
KINDS = {"Unspecified": 0, "Internal": 1, "Server": 2, "Client": 3, "Producer": 4, "Consumer": 5}
STATUS = {"Unset": 0, "Ok": 1, "Error": 2}
MAX_SPAN_NS = 3600 * 10**9     # spans longer than an hour are not looked for


class Reexporter:
    def __init__(self, store, database, config):
        from deeptrace_plugins.exporters.otlp import (GrpcTransport, HttpTransport,
                                                      OtlpConfig)
        self.store = store
        self.db = f"`{database}`"
        self.local = maps(store)
        self.config = config
        cfg = OtlpConfig(protocol=config.protocol, endpoint=config.endpoint,
                         headers=dict(config.headers))
        self.transport = (GrpcTransport if config.protocol == "grpc" else HttpTransport)(cfg)
        self.watermark_ns = time.time_ns() - int(config.settle * 1e9)   # only new spans
        self.counts = {"spans_sent": 0, "requests_failed": 0}

    def run_once(self, now_ns=None) -> int:
        hi = (now_ns or time.time_ns()) - int(self.config.settle * 1e9)
        lo = self.watermark_ns
        if hi <= lo:
            return 0
        # An insert under way (its own session) finishes first: its spans are in this
        # round's answer, as they were when inserts and queries took turns.
        getattr(self.store, "wait_for_writes", lambda: None)()
        rows = self.store.rows(f"""
SELECT if(m.C = '', t.TraceId, m.C) AS trace_id, t.SpanId AS span_id,
       if(p.P = '', t.ParentSpanId, p.P) AS parent, t.TraceState AS state, t.SpanName AS name,
       t.SpanKind AS kind, t.ResourceAttributes AS resource, t.ScopeName AS scope,
       t.ScopeVersion AS scope_version, t.SpanAttributes AS attributes,
       toUnixTimestamp64Nano(t.Timestamp) AS start_ns, t.Duration AS duration,
       t.StatusCode AS status, t.StatusMessage AS message
FROM {self.db}.otel_traces AS t
LEFT JOIN {_CANON.format(db=self.db, local=self.local)} AS m ON m.TraceId = t.TraceId
LEFT JOIN {_PARENT.format(db=self.db, local=self.local)} AS p ON p.SpanId = t.SpanId
WHERE t.Timestamp >= fromUnixTimestamp64Nano(toInt64({lo - MAX_SPAN_NS}))
  AND toUnixTimestamp64Nano(t.Timestamp) + t.Duration > {lo}
  AND toUnixTimestamp64Nano(t.Timestamp) + t.Duration <= {hi}""")
        for i in range(0, len(rows), self.config.max_batch):
            request = self.request(rows[i:i + self.config.max_batch])
            try:
                self.transport.send("traces", request, 30.0)
            except Exception as exc:            # the window is tried again next round
                self.counts["requests_failed"] += 1
                log.warning("re-export failed, will retry: %s", exc)
                return 0
        self.watermark_ns = hi
        self.counts["spans_sent"] += len(rows)
        return len(rows)

    @staticmethod
    def request(rows):
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
        req = trace_service_pb2.ExportTraceServiceRequest()
        groups = {}
        for r in rows:
            key = (tuple(sorted(r["resource"].items())), r["scope"], r["scope_version"])
            groups.setdefault(key, []).append(r)
        for (resource, scope, version), group in groups.items():
            rs = req.resource_spans.add()
            for k, v in resource:
                kv = rs.resource.attributes.add()
                kv.key, kv.value.string_value = k, v
            ss = rs.scope_spans.add()
            ss.scope.name, ss.scope.version = scope, version
            for r in group:
                s = ss.spans.add()
                s.trace_id = bytes.fromhex(r["trace_id"])
                s.span_id = bytes.fromhex(r["span_id"])
                if r["parent"]:
                    s.parent_span_id = bytes.fromhex(r["parent"])
                s.trace_state, s.name = r["state"], r["name"]
                s.kind = KINDS.get(r["kind"], 0)
                s.start_time_unix_nano = r["start_ns"]
                s.end_time_unix_nano = r["start_ns"] + r["duration"]
                s.status.code = STATUS.get(r["status"], 0)
                s.status.message = r["message"]
                for k, v in r["attributes"].items():
                    kv = s.attributes.add()
                    kv.key, kv.value.string_value = k, v
        return req

    def close(self):
        self.transport.close()
