"""Where the tables live: chdb (ClickHouse inside this process, persisted to a folder) or a
ClickHouse server over HTTP (clickhouse-connect). Both take the same SQL; inserts go as
Arrow tables (columnar, no per-row Python formatting)."""

import itertools
import json
import os
import threading
import time

from . import schema
from .schema import quote

PROTO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "otlp_trace.proto")


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


class FairLock:
    """A lock handed over in arrival order: the writer, inserting group after group,
    would otherwise take it back before the stitcher's or the API's waiting query (a
    plain lock is not fair), delaying stitches by many inserts."""

    def __init__(self):
        self._cond = threading.Condition(threading.Lock())
        self._tickets = itertools.count()
        self._serving = 0

    def __enter__(self):
        with self._cond:
            ticket = next(self._tickets)
            while ticket != self._serving:
                self._cond.wait()

    def __exit__(self, *exc):
        with self._cond:
            self._serving += 1
            self._cond.notify_all()


def _tuples(table) -> list:
    return list(zip(*(col.to_pylist() for col in table.columns)))


class ChdbStore:
    """ClickHouse in process: one session for the writer's inserts, one for everything
    else; each runs one query at a time (calls on it are serialised)."""

    distributed = False        # no Distributed tables (see ClickHouseStore)
    # Rows of an insert under way are not yet visible; the stitcher asks
    # `pending_since_ms` for how far back that reaches instead of a fixed lag.
    visibility_lag = 0.0

    # ClickHouse's caches are sized for a server of its own (5 GiB each by default); the
    # collector's queries touch recent parts only.
    SETTINGS = {"mark_cache_size": 64 << 20, "index_mark_cache_size": 16 << 20,
                "primary_index_cache_size": 64 << 20, "uncompressed_cache_size": 0}
    PURGE_EVERY = 1.0     # s: hand freed memory back to the system at most this often

    def __init__(self, path: str, database: str, max_memory: int = 0, streams: int = 0):
        from chdb import session
        os.makedirs(path, mode=0o700, exist_ok=True)
        settings = dict(self.SETTINGS)
        if max_memory:
            # A query past it fails (an insert is then refused and retried by the agent).
            settings["max_server_memory_usage"] = max_memory
        conn = path + "?" + "&".join(f"{k}={v}" for k, v in settings.items())
        self.session = session.Session(conn)
        # Inserts have a session of their own: one session runs one query at a time,
        # two run side by side, so the stitcher's and the API's queries do not wait for
        # an insert (nor inserts for them).
        self.writer = session.Session(conn)
        self.write_lock = threading.Lock()
        self._insert_started_ms = None     # wall-clock start of the insert under way
        self._purged = time.monotonic()
        self._purge = True
        self.streams = streams or os.cpu_count() or 1
        self.database = database
        self.lock = FairLock()
        # Requests wait here for ClickHouse to read them (private: they hold payloads).
        self.incoming = os.path.join(path, "incoming")
        os.makedirs(self.incoming, mode=0o700, exist_ok=True)
        self._seq = itertools.count()

    def command(self, sql: str):
        with self.lock:
            self.session.query(sql)

    def rows(self, sql: str) -> list:
        with self.lock:
            res = self.session.query(sql, "JSONEachRow")
        text = res.bytes() if hasattr(res, "bytes") else bytes(res)
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def records(self, sql: str) -> list:
        """Rows as tuples in the SELECT's order, read as Arrow (columnar: far cheaper in
        Python than JSON)."""
        import pyarrow as pa
        with self.lock:
            res = self.session.query(sql, "Arrow")
        data = res.bytes() if hasattr(res, "bytes") else bytes(res)
        return _tuples(pa.ipc.open_file(pa.py_buffer(data)).read_all())

    def insert_arrow(self, table: str, arrow_table):
        """Through an Arrow file: ClickHouse reads it without the GIL (its Python() table
        function would read Python objects, holding it)."""
        import pyarrow as pa
        cols = ", ".join(arrow_table.column_names)
        path = os.path.join(self.incoming, f"{os.getpid()}-{next(self._seq)}.arrow")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as f, pa.ipc.new_file(f, arrow_table.schema) as w:
                w.write_table(arrow_table)
            self.command(f"INSERT INTO `{self.database}`.{table} ({cols}) "
                         f"SELECT {cols} FROM file({quote(path)}, Arrow)")
        finally:
            os.unlink(path)

    def insert_otlp(self, payloads: list):
        """Serialized ExportTraceServiceRequests into otel_traces, parsed by ClickHouse,
        in one INSERT. The group is split over up to `streams` files read as one glob:
        one file is one parsing stream, several are parsed and inserted in parallel."""
        n = max(1, min(self.streams, len(payloads)))
        stem = f"{os.getpid()}-{next(self._seq)}"
        paths = []
        try:
            for i in range(n):
                paths.append(os.path.join(self.incoming, f"{stem}-{i}.bin"))
                fd = os.open(paths[-1], os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "wb") as f:
                    for p in payloads[i::n]:
                        f.write(_varint(len(p)))
                        f.write(p)
            pattern = os.path.join(self.incoming, f"{stem}-{{0..{n - 1}}}.bin")
            source = f"file({quote(pattern)}, Protobuf, {quote(schema.OTLP_STRUCTURE)})"
            self._write(schema.otlp_insert(self.database, source, PROTO)
                        + f", max_threads = {n}, max_insert_threads = {n}")
        finally:
            for path in paths:
                os.unlink(path)
        self._release_memory()

    def _write(self, sql: str):
        with self.write_lock:
            # Its rows' Inserted stamps are at least this (set before the insert starts).
            self._insert_started_ms = int(time.time() * 1000)
            try:
                self.writer.query(sql)
            finally:
                self._insert_started_ms = None

    def wait_for_writes(self):
        """Return once the insert under way (if any) is written."""
        with self.write_lock:
            pass

    def pending_since_ms(self):
        """The start (wall-clock ms) of an insert whose rows may not be visible yet, or
        None: a query that starts now sees every row stamped before this."""
        return self._insert_started_ms

    def _release_memory(self):
        """jemalloc keeps what an insert freed (a few hundred MB after each big one) until
        told: purged after an insert, at most every PURGE_EVERY seconds (~40 ms)."""
        if not self._purge or time.monotonic() - self._purged < self.PURGE_EVERY:
            return
        try:
            with self.write_lock:
                self.writer.query("SYSTEM JEMALLOC PURGE")
        except Exception:             # a build without jemalloc: nothing to hand back
            self._purge = False
        self._purged = time.monotonic()

    def close(self):
        with self.write_lock:
            self.writer.close()
        with self.lock:
            self.session.close()


class ClickHouseStore:
    """A ClickHouse server or cluster, over HTTP."""

    # Other writers' inserts (an OpenTelemetry Collector's, async inserts) may become
    # visible a while after their Inserted stamp: the stitcher looks this far back.
    visibility_lag = 5.0

    def __init__(self, url: str, database: str, username: str = "default", password: str = "",
                 distributed: bool = False):
        import clickhouse_connect
        from urllib.parse import urlparse
        u = urlparse(url)
        # Over Distributed tables (`storage.distributed`), an insert returns once every
        # shard has its rows (an acknowledged span is stored; the default queues them on
        # the node for a background send), and readers join the `_local` map tables.
        settings = {"insert_distributed_sync": 1} if distributed else {}
        self.client = clickhouse_connect.get_client(
            host=u.hostname, port=u.port or (8443 if u.scheme == "https" else 8123),
            secure=u.scheme == "https", username=username, password=password,
            settings=settings)
        self.database = database
        self.distributed = distributed
        self.lock = threading.Lock()   # one client session, used from several threads

    def command(self, sql: str):
        with self.lock:
            self.client.command(sql)

    def rows(self, sql: str) -> list:
        with self.lock:
            return list(self.client.query(sql).named_results())

    def records(self, sql: str) -> list:
        with self.lock:
            return _tuples(self.client.query_arrow(sql))

    def insert_arrow(self, table: str, arrow_table):
        with self.lock:
            self.client.insert_arrow(f"{self.database}.{table}", arrow_table)

    def insert_otlp(self, payloads: list):
        """A server cannot read our files: requests are converted here (slower)."""
        import pyarrow as pa
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

        from .convert import to_arrow
        tables = [to_arrow(trace_service_pb2.ExportTraceServiceRequest.FromString(p))[0]
                  for p in payloads]
        self.insert_arrow("otel_traces", pa.concat_tables(tables))

    def close(self):
        self.client.close()


def open_store(cfg):
    if cfg.engine == "chdb":
        return ChdbStore(cfg.path, cfg.database, cfg.max_memory)
    return ClickHouseStore(cfg.url, cfg.database, cfg.username, cfg.password,
                           cfg.distributed)
