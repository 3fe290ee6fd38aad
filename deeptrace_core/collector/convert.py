"""OTLP trace requests to ``otel_traces`` rows, as one Arrow table per request.

Values follow the OpenTelemetry Collector's clickhouseexporter: ids as lower-case hex
(empty when unset), ``SpanKind`` "Server"/"Client"/..., ``StatusCode`` "Unset"/"Ok"/
"Error", attribute values as strings (arrays and maps as JSON), ``Duration`` in ns.
"""

import base64
import json

import pyarrow as pa

KINDS = ("Unspecified", "Internal", "Server", "Client", "Producer", "Consumer")
STATUS = ("Unset", "Ok", "Error")
_MAP = pa.map_(pa.string(), pa.string())


def _value(v) -> str:
    which = v.WhichOneof("value")
    if which == "string_value":
        return v.string_value
    if which == "int_value":
        return str(v.int_value)
    if which == "bool_value":
        return "true" if v.bool_value else "false"
    if which == "double_value":
        return repr(v.double_value)
    if which == "bytes_value":
        return base64.b64encode(v.bytes_value).decode()
    if which == "array_value":
        return json.dumps([_plain(x) for x in v.array_value.values])
    if which == "kvlist_value":
        return json.dumps({kv.key: _plain(kv.value) for kv in v.kvlist_value.values})
    return ""


def _plain(v):
    which = v.WhichOneof("value")
    if which in ("array_value", "kvlist_value"):
        return json.loads(_value(v))
    return getattr(v, which) if which and which != "bytes_value" else _value(v)


class _Map:
    """A column of maps, built flat (offsets, keys, values): much cheaper than Arrow
    converting a list of lists of pairs."""

    def __init__(self):
        self.offsets, self.keys, self.values = [0], [], []

    def add(self, kvs):
        keys_append, values_append = self.keys.append, self.values.append
        for kv in kvs:
            keys_append(kv.key)
            v = kv.value
            which = v.WhichOneof("value")
            # The agents send strings and ints; everything else takes the general path.
            values_append(v.string_value if which == "string_value" else
                          str(v.int_value) if which == "int_value" else _value(v))
        self.offsets.append(len(self.keys))

    def repeat(self, other, n):
        """`other`'s one map, `n` times (a resource's attributes on each of its spans)."""
        for _ in range(n):
            self.keys += other.keys
            self.values += other.values
            self.offsets.append(len(self.keys))

    def array(self):
        return pa.MapArray.from_arrays(pa.array(self.offsets, pa.int32()),
                                       pa.array(self.keys, pa.string()),
                                       pa.array(self.values, pa.string()))


def to_arrow(request):
    """(Arrow table of otel_traces rows, number of spans) of an ExportTraceServiceRequest."""
    ts, trace, span_id, parent, state, name, kind, service = [], [], [], [], [], [], [], []
    scope_name, scope_version, duration, status, message = [], [], [], [], []
    res_map, span_map = _Map(), _Map()
    for rs in request.resource_spans:
        svc = ""
        for kv in rs.resource.attributes:
            if kv.key == "service.name":
                svc = _value(kv.value)
        tmp = _Map()
        tmp.add(rs.resource.attributes)
        for ss in rs.scope_spans:
            sname, sver = ss.scope.name, ss.scope.version
            n = 0
            for s in ss.spans:
                n += 1
                start = s.start_time_unix_nano
                ts.append(start)
                trace.append(s.trace_id.hex())
                span_id.append(s.span_id.hex())
                parent.append(s.parent_span_id.hex())
                state.append(s.trace_state)
                name.append(s.name)
                kind.append(KINDS[s.kind] if 0 <= s.kind < len(KINDS) else "Unspecified")
                service.append(svc)
                scope_name.append(sname)
                scope_version.append(sver)
                duration.append(max(0, s.end_time_unix_nano - start))
                code = s.status.code
                status.append(STATUS[code] if 0 <= code < len(STATUS) else "Unset")
                message.append(s.status.message)
                span_map.add(s.attributes)
            res_map.repeat(tmp, n)
    table = pa.table({
        "Timestamp": pa.array(ts, pa.timestamp("ns")), "TraceId": pa.array(trace, pa.string()),
        "SpanId": pa.array(span_id, pa.string()), "ParentSpanId": pa.array(parent, pa.string()),
        "TraceState": pa.array(state, pa.string()), "SpanName": pa.array(name, pa.string()),
        "SpanKind": pa.array(kind, pa.string()), "ServiceName": pa.array(service, pa.string()),
        "ResourceAttributes": res_map.array(), "ScopeName": pa.array(scope_name, pa.string()),
        "ScopeVersion": pa.array(scope_version, pa.string()),
        "SpanAttributes": span_map.array(), "Duration": pa.array(duration, pa.uint64()),
        "StatusCode": pa.array(status, pa.string()), "StatusMessage": pa.array(message, pa.string()),
    })
    return table, len(ts)
