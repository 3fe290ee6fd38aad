"""``deeptrace collector`` config: the same YAML rules as the agent's (``${env:...}``,
errors with file, line and key, ranges on durations and counts)."""

import attrs
import yaml
from attrs import validators as v

from deeptrace_core import config as agent_config
from deeptrace_core.config import ConfigError

from .schema import SHARDING_KEY

SECONDS = {"unit": "seconds"}


def _address(_inst, attribute, value):
    if value:
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError(f"{attribute.name}: expected HOST:PORT, got {value!r}")


def _needs_cluster(inst, _attribute, value):
    if value and not getattr(inst, "cluster", ""):
        raise ValueError("needs storage.cluster (the cluster whose shards the "
                         "Distributed tables span)")


def _of_trace_id(_inst, _attribute, value):
    if "TraceId" not in value:
        raise ValueError(f"{value!r} is not an expression of TraceId "
                         "(every table is sharded by it: a trace's rows share a shard)")


@attrs.define
class OtlpReceiver:
    """``receivers.otlp``: where agents send. Empty disables that transport."""

    grpc: str = attrs.field(default="127.0.0.1:4317", validator=_address)
    http: str = attrs.field(default="127.0.0.1:4318", validator=_address)
    max_message_bytes: int = attrs.field(default=64 << 20, validator=[v.ge(1024), v.le(1 << 30)])
    # gRPC requests handled at once; each waits for its write (ack after the write), so
    # this also bounds how many requests one insert can group.
    max_concurrent_requests: int = attrs.field(default=128, validator=[v.ge(1), v.le(4096)])


@attrs.define
class Receivers:
    otlp: OtlpReceiver = attrs.Factory(OtlpReceiver)


@attrs.define
class Batch:
    """``storage.batch``: group commit. The requests waiting are inserted as one group
    once they reach `max_bytes` or the oldest has waited `max_delay`."""

    max_bytes: int = attrs.field(default=32 << 20, validator=[v.ge(1024), v.le(1 << 30)])
    max_delay: float = attrs.field(default=0.1, validator=[v.ge(0), v.le(10)], metadata=SECONDS)


@attrs.define
class Storage:
    """``storage``: chdb (ClickHouse in this process, persisted to `path`) or a ClickHouse
    server or cluster over HTTP (`url`, via clickhouse-connect)."""

    engine: str = attrs.field(default="chdb", validator=v.in_(("chdb", "clickhouse")))
    path: str = "/var/lib/deeptrace/collector"
    url: str = "http://127.0.0.1:8123"
    username: str = "default"
    password: str = ""
    database: str = "otel"
    # A ClickHouse cluster: the DDL runs ON CLUSTER this name and the tables use
    # `table_engine`, e.g. "ReplicatedMergeTree('/clickhouse/tables/{shard}/{table}',
    # '{replica}')" (our own tables get its Replacing variant).
    cluster: str = ""
    table_engine: str = "MergeTree()"
    # Several shards: each table is `<name>_local` (`table_engine`) on every node of
    # `cluster` and `<name>` a Distributed table over them, sharded by `sharding_key`
    # (schema.SHARDING_KEY says why by the trace id). Readers and writers, this
    # collector's and others' (Grafana, an OpenTelemetry Collector), use the plain names.
    distributed: bool = attrs.field(default=False, validator=_needs_cluster)
    sharding_key: str = attrs.field(default=SHARDING_KEY, validator=_of_trace_id)
    ttl: float = attrs.field(default=7 * 86400.0, validator=v.gt(0), metadata=SECONDS)
    batch: Batch = attrs.Factory(Batch)
    # chdb: ClickHouse's memory limit in this process (bytes; 0: its own default, 90% of
    # RAM). A query past it fails: an insert is refused and the agent retries it.
    max_memory: int = attrs.field(default=2 << 30, validator=[v.ge(0), v.le(1 << 40)])
    # The clickhouseexporter's bloom-filter indexes on attribute keys and values (faster
    # searches by attribute, about twice the insert CPU). Applies to a new otel_traces.
    attribute_indexes: bool = False


@attrs.define
class Stitcher:
    """``stitcher``: how often it runs and how far back it looks."""

    interval: float = attrs.field(default=1.0, validator=[v.gt(0), v.le(3600)], metadata=SECONDS)
    # Spans older than this (by their start) are no longer stitched.
    window: float = attrs.field(default=300.0, validator=[v.gt(0), v.le(86400)], metadata=SECONDS)
    # Clock difference between hosts tolerated where addresses do not mirror (NAT).
    max_skew: float = attrs.field(default=1.0, validator=[v.ge(0), v.le(60)], metadata=SECONDS)
    nat: bool = True            # also stitch by sequence numbers alone, behind NAT
    # A NAT stitch waits this long after both ends arrived, for an exact partner.
    nat_hold: float = attrs.field(default=5.0, validator=[v.ge(0), v.le(600)], metadata=SECONDS)
    max_traces: int = attrs.field(default=1_000_000, validator=[v.ge(1000), v.le(100_000_000)])


@attrs.define
class Api:
    address: str = attrs.field(default="127.0.0.1:8686", validator=_address)


@attrs.define
class OtlpExport:
    """``export.otlp``: re-send stitched traces downstream; empty endpoint: off."""

    endpoint: str = ""
    protocol: str = attrs.field(default="grpc", validator=v.in_(("grpc", "http/protobuf")))
    headers: dict[str, str] = attrs.Factory(dict)
    # How long after a span's end it goes out: its stitch is settled by then.
    settle: float = attrs.field(default=10.0, validator=[v.ge(1), v.le(3600)], metadata=SECONDS)
    interval: float = attrs.field(default=2.0, validator=[v.gt(0), v.le(3600)], metadata=SECONDS)
    max_batch: int = attrs.field(default=1000, validator=[v.ge(1), v.le(100_000)])


@attrs.define
class Export:
    otlp: OtlpExport = attrs.Factory(OtlpExport)


@attrs.define
class CollectorConfig:
    receivers: Receivers = attrs.Factory(Receivers)
    storage: Storage = attrs.Factory(Storage)
    stitcher: Stitcher = attrs.Factory(Stitcher)
    api: Api = attrs.Factory(Api)
    export: Export = attrs.Factory(Export)


def load(path: str, env=None) -> CollectorConfig:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(path, None, "", f"cannot read config: {e}") from None
    return parse(text, path, env)


def parse(text: str, path: str, env=None) -> CollectorConfig:
    import os
    env = os.environ if env is None else env
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise ConfigError(path, mark.line + 1 if mark else None, "", f"invalid YAML: {e}") from None
    return agent_config.build(CollectorConfig, root, "", path, env)
