"""The tables: the OpenTelemetry Collector's ClickHouse schema (``otel_traces``,
``otel_traces_trace_id_ts`` and its view, as its clickhouseexporter creates them, so
readers of that schema work unchanged), and ours beside it:

- ``deeptrace_stitch_keys``: each span's stitch keys (addresses, TCP sequence numbers),
  filled by a materialized view from ``otel_traces`` whoever writes it (us, or an
  OpenTelemetry Collector), ordered for the join on the request's sequence number;
- ``deeptrace_trace_map``: a trace's canonical id once stitched (latest version wins);
- ``deeptrace_parent_map``: a stitched server span's new parent;
- ``otel_traces_stitched``: ``otel_traces`` with both applied, the same columns (point
  Grafana's trace table at it to see stitched traces).
"""

TRACES_COLUMNS = """
    Timestamp DateTime64(9) CODEC(Delta, ZSTD(1)),
    TraceId String CODEC(ZSTD(1)),
    SpanId String CODEC(ZSTD(1)),
    ParentSpanId String CODEC(ZSTD(1)),
    TraceState String CODEC(ZSTD(1)),
    SpanName LowCardinality(String) CODEC(ZSTD(1)),
    SpanKind LowCardinality(String) CODEC(ZSTD(1)),
    ServiceName LowCardinality(String) CODEC(ZSTD(1)),
    ResourceAttributes Map(LowCardinality(String), String) CODEC(ZSTD(1)),
    ScopeName String CODEC(ZSTD(1)),
    ScopeVersion String CODEC(ZSTD(1)),
    SpanAttributes Map(LowCardinality(String), String) CODEC(ZSTD(1)),
    Duration UInt64 CODEC(ZSTD(1)),
    StatusCode LowCardinality(String) CODEC(ZSTD(1)),
    StatusMessage String CODEC(ZSTD(1)),
    Events Nested (
        Timestamp DateTime64(9),
        Name LowCardinality(String),
        Attributes Map(LowCardinality(String), String)
    ) CODEC(ZSTD(1)),
    Links Nested (
        TraceId String,
        SpanId String,
        TraceState String,
        Attributes Map(LowCardinality(String), String)
    ) CODEC(ZSTD(1)),
    INDEX idx_trace_id TraceId TYPE bloom_filter(0.001) GRANULARITY 1,{attr_indexes}
    INDEX idx_duration Duration TYPE minmax GRANULARITY 1"""

# The clickhouseexporter's indexes on attribute keys and values: they speed up searches
# by attribute, and cost about half of the insert's CPU (bench/collector.py), so they
# are made only with `storage.attribute_indexes`.
ATTR_INDEXES = """
    INDEX idx_res_attr_key mapKeys(ResourceAttributes) TYPE bloom_filter(0.01) GRANULARITY 1,
    INDEX idx_res_attr_value mapValues(ResourceAttributes) TYPE bloom_filter(0.01) GRANULARITY 1,
    INDEX idx_span_attr_key mapKeys(SpanAttributes) TYPE bloom_filter(0.01) GRANULARITY 1,
    INDEX idx_span_attr_value mapValues(SpanAttributes) TYPE bloom_filter(0.01) GRANULARITY 1,"""

# Columns we insert, in order (Events and Links are left empty: agents send none).
INSERT_COLUMNS = ("Timestamp", "TraceId", "SpanId", "ParentSpanId", "TraceState", "SpanName",
                  "SpanKind", "ServiceName", "ResourceAttributes", "ScopeName", "ScopeVersion",
                  "SpanAttributes", "Duration", "StatusCode", "StatusMessage")

# The stitch keys, read from the attributes the agents send (plugins/exporters/otlp.py).
_ATTR = "SpanAttributes['{}']"
STITCH_SELECT = f"""
    toUInt32OrZero({_ATTR.format('deeptrace.request.seq_start')}) AS ReqSeq,
    toInt64OrDefault({_ATTR.format('deeptrace.response.seq_start')}, toInt64(-1)) AS RespSeq,
    SpanKind AS Kind,
    replaceOne({_ATTR.format('network.local.address')}, '::ffff:', '') AS LocalAddr,
    toUInt16OrZero({_ATTR.format('network.local.port')}) AS LocalPort,
    replaceOne({_ATTR.format('network.peer.address')}, '::ffff:', '') AS PeerAddr,
    toUInt16OrZero({_ATTR.format('network.peer.port')}) AS PeerPort,
    Timestamp, Duration, TraceId, SpanId, ParentSpanId,
    {_ATTR.format('deeptrace.protocol')} AS Protocol, SpanName,
    ResourceAttributes['deeptrace.agent.id'] AS AgentId,
    now64(3) AS Inserted"""


# With `storage.distributed`, the default sharding key. Every table of ours has TraceId
# and all of them are sharded by the same expression of it, so all of a trace's rows sit
# on one shard: its spans, its otel_traces_trace_id_ts row and stitch keys (their views
# run on the node the span landed on), and its map rows (a trace_map row is keyed by the
# trace it maps, a parent_map row by its server span's own trace). The readers' joins of
# spans with the map tables then run on each shard against its `_local` map tables.
# The map tables are sharded, not a full copy on every node: a copy would need a
# Replicated path without {shard} (table_engine has one per shard) and could not be
# had at all with a plain MergeTree per node.
# The stitch keys are not sharded by ReqSeq, though that would put both ends of a hop on
# one shard: their view would have to write through the Distributed table, a second
# (asynchronous) insert per span; the stitcher instead reads both ends through the
# Distributed table and joins them on its own node (GLOBAL IN: the new rows' sequence
# numbers are sent to every shard once), reading what a round reads on one node.
SHARDING_KEY = "cityHash64(TraceId)"


def ddl(database: str, cluster: str = "", engine: str = "MergeTree()", ttl_days: float = 7,
        attribute_indexes: bool = False, distributed: bool = False,
        sharding_key: str = SHARDING_KEY) -> list:
    """The statements that create every table (idempotent). With `cluster`, each runs
    ON CLUSTER and every table uses `engine` (e.g. ReplicatedMergeTree: one shard,
    replicas), our map tables its Replacing variant; a Replicated engine's path must
    tell the tables apart ({table} or {uuid}), or they would share one.

    With `distributed` (several shards), each table is `<name>_local` on every node
    with `engine`, and `<name>` a Distributed table over them by `sharding_key`: readers
    and writers keep the plain names. The materialized views sit on the local tables
    (a view on a Distributed table sees only the inserts made on its own node)."""
    if "Replicated" in engine and "{table}" not in engine and "{uuid}" not in engine:
        raise ValueError(f"storage.table_engine {engine!r}: a Replicated engine's path "
                         "needs {table} or {uuid}, one path per table")
    if distributed and not cluster:
        raise ValueError("storage.distributed needs storage.cluster (the Distributed "
                         "tables' cluster)")
    columns = TRACES_COLUMNS.format(attr_indexes=ATTR_INDEXES if attribute_indexes else "")
    on = f" ON CLUSTER `{cluster}`" if cluster else ""
    db = f"`{database}`"
    local = "_local" if distributed else ""
    days = max(1, int(round(ttl_days)))
    ttl = f"TTL toDateTime(Timestamp) + toIntervalDay({days})"
    replacing = (engine if "Replacing" in engine
                 else engine.replace("MergeTree", "ReplacingMergeTree"))

    def table(name, body):
        """CREATE TABLE `name` (and with `distributed`, its local table first)."""
        create = [f"CREATE TABLE IF NOT EXISTS {db}.{name}{local}{on} {body}"]
        if distributed:
            create.append(
                f"CREATE TABLE IF NOT EXISTS {db}.{name}{on} AS {db}.{name}_local\n"
                f"ENGINE = Distributed({quote(cluster)}, {quote(database)}, "
                f"{quote(name + '_local')}, {sharding_key})")
        return create

    return [
        f"CREATE DATABASE IF NOT EXISTS {db}{on}",
        *table("otel_traces", f"""({columns}
) ENGINE = {engine}
PARTITION BY toDate(Timestamp)
ORDER BY (ServiceName, SpanName, toDateTime(Timestamp))
{ttl}
SETTINGS index_granularity=8192, ttl_only_drop_parts = 1"""),
        *table("otel_traces_trace_id_ts", f"""(
    TraceId String CODEC(ZSTD(1)),
    Start DateTime CODEC(Delta, ZSTD(1)),
    End DateTime CODEC(Delta, ZSTD(1)),
    INDEX idx_trace_id TraceId TYPE bloom_filter(0.01) GRANULARITY 1
) ENGINE = {engine}
PARTITION BY toDate(Start)
ORDER BY (TraceId, Start)
TTL toDateTime(Start) + toIntervalDay({days})
SETTINGS index_granularity=8192, ttl_only_drop_parts = 1"""),
        f"""CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.otel_traces_trace_id_ts_mv{on}
TO {db}.otel_traces_trace_id_ts{local}
AS SELECT TraceId, min(Timestamp) AS Start, max(Timestamp) AS End
FROM {db}.otel_traces{local} WHERE TraceId != '' GROUP BY TraceId""",
        # Partitioned by arrival so the stitcher's rounds read only recent parts; kept a
        # day, the longest stitcher window.
        *table("deeptrace_stitch_keys", f"""(
    ReqSeq UInt32, RespSeq Int64, Kind LowCardinality(String),
    LocalAddr String, LocalPort UInt16, PeerAddr String, PeerPort UInt16,
    Timestamp DateTime64(9), Duration UInt64, TraceId String, SpanId String,
    ParentSpanId String, Protocol LowCardinality(String), SpanName String,
    AgentId String, Inserted DateTime64(3)
) ENGINE = {engine}
PARTITION BY toStartOfTenMinutes(Inserted)
ORDER BY (ReqSeq, Timestamp)
TTL toDateTime(Inserted) + toIntervalDay(1)
SETTINGS ttl_only_drop_parts = 1"""),
        f"""CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.deeptrace_stitch_keys_mv{on}
TO {db}.deeptrace_stitch_keys{local}
AS SELECT {STITCH_SELECT}
FROM {db}.otel_traces{local}
WHERE SpanKind IN ('Server', 'Client')
  AND SpanAttributes['deeptrace.request.seq_start'] != ''""",
        *table("deeptrace_trace_map", f"""(
    TraceId String, CanonicalTraceId String, Version UInt64, Stitched DateTime64(3)
) ENGINE = {replacing}
ORDER BY TraceId
TTL toDateTime(Stitched) + toIntervalDay({days})"""),
        *table("deeptrace_parent_map", f"""(
    SpanId String, TraceId String, ParentSpanId String, Source LowCardinality(String),
    Version UInt64, Stitched DateTime64(3)
) ENGINE = {replacing}
ORDER BY SpanId
TTL toDateTime(Stitched) + toIntervalDay({days})"""),
        # Over the Distributed otel_traces: each shard joins its spans with its own
        # `_local` map rows (a trace's rows share its shard), the same for any reader.
        f"""CREATE VIEW IF NOT EXISTS {db}.otel_traces_stitched{on} AS
SELECT t.Timestamp AS Timestamp,
       if(m.Canonical = '', t.TraceId, m.Canonical) AS TraceId,
       t.SpanId AS SpanId,
       if(p.Parent = '', t.ParentSpanId, p.Parent) AS ParentSpanId,
       t.TraceState AS TraceState, t.SpanName AS SpanName, t.SpanKind AS SpanKind,
       t.ServiceName AS ServiceName, t.ResourceAttributes AS ResourceAttributes,
       t.ScopeName AS ScopeName, t.ScopeVersion AS ScopeVersion,
       t.SpanAttributes AS SpanAttributes, t.Duration AS Duration,
       t.StatusCode AS StatusCode, t.StatusMessage AS StatusMessage
FROM {db}.otel_traces AS t
LEFT JOIN (SELECT TraceId, argMax(CanonicalTraceId, Version) AS Canonical
           FROM {db}.deeptrace_trace_map{local} GROUP BY TraceId) AS m ON m.TraceId = t.TraceId
LEFT JOIN (SELECT SpanId, argMax(ParentSpanId, Version) AS Parent
           FROM {db}.deeptrace_parent_map{local} GROUP BY SpanId) AS p ON p.SpanId = t.SpanId""",
    ]


def quote(value) -> str:
    """A ClickHouse string literal."""
    return "'" + str(value).replace("\\", "\\\\").replace("'", "\\'") + "'"


# OTLP requests straight into otel_traces: ClickHouse parses the protobuf itself
# (otlp_trace.proto), so no span or attribute passes through Python. Values as the
# clickhouseexporter writes them: an attribute's value as text (an array as JSON).
_SCALAR = ("string_value Nullable(String), bool_value Nullable(Bool), "
           "int_value Nullable(Int64), double_value Nullable(Float64)")
_KV = (f"Array(Tuple(key String, value Tuple({_SCALAR}, array_value Tuple(values "
       f"Array(Tuple({_SCALAR}))), bytes_value Nullable(String))))")
OTLP_STRUCTURE = (
    f"resource_spans Array(Tuple(resource Tuple(attributes {_KV}), scope_spans Array(Tuple("
    f"scope Tuple(name String, version String), spans Array(Tuple(trace_id String, "
    f"span_id String, trace_state String, parent_span_id String, name String, kind Int32, "
    f"start_time_unix_nano UInt64, end_time_unix_nano UInt64, attributes {_KV}, "
    f"status Tuple(message String, code Int32)))))))")


def _text(x):
    return (f"coalesce({x}.string_value, toString({x}.int_value), "
            f"if({x}.bool_value, 'true', 'false'), toString({x}.double_value))")


_VALUE = (f"if(notEmpty(kv.value.array_value.values), concat('[', arrayStringConcat(arrayMap("
          f"e -> toJSONString({_text('e')}), kv.value.array_value.values), ','), ']'), "
          f"coalesce({_text('kv.value')}, base64Encode(kv.value.bytes_value), ''))")


def _attrs(arr):
    return f"mapFromArrays(arrayMap(kv -> kv.key, {arr}), arrayMap(kv -> {_VALUE}, {arr}))"


def otlp_insert(database: str, source: str, proto_path: str) -> str:
    """INSERT of length-delimited ExportTraceServiceRequest messages read by `source`
    (a table function, e.g. file('...', Protobuf, STRUCTURE))."""
    return f"""INSERT INTO `{database}`.otel_traces ({', '.join(INSERT_COLUMNS)})
SELECT fromUnixTimestamp64Nano(toInt64(s.start_time_unix_nano)), lower(hex(s.trace_id)),
       lower(hex(s.span_id)), lower(hex(s.parent_span_id)), s.trace_state, s.name,
       ['Unspecified', 'Internal', 'Server', 'Client', 'Producer', 'Consumer'][s.kind + 1],
       res['service.name'], res, ss.scope.name, ss.scope.version, {_attrs('s.attributes')},
       if(s.end_time_unix_nano > s.start_time_unix_nano,
          s.end_time_unix_nano - s.start_time_unix_nano, 0),
       ['Unset', 'Ok', 'Error'][s.status.code + 1], s.status.message
FROM (SELECT rs, {_attrs('rs.resource.attributes')} AS res FROM {source}
      ARRAY JOIN resource_spans AS rs)
ARRAY JOIN rs.scope_spans AS ss ARRAY JOIN ss.spans AS s
SETTINGS format_schema = '{proto_path}:ExportTraceServiceRequest'"""
