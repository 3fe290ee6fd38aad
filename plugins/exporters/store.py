"""store exporter: spans into a local SQLite file, for ``deeptrace traces``.

One table of spans, written in WAL mode (readers such as ``deeptrace traces`` never
block the writer). ``export()`` only appends to a bounded in-memory queue and returns:
a background thread takes what is queued (up to WRITE_CHUNK spans at a time), inserts it
in one transaction, many rows a statement, and every
``retention_interval`` (and at start and shutdown) deletes spans older than ``max_age``
and then the oldest beyond ``max_spans``. When the queue is full, the spans that do not
fit are dropped and counted (``stats()["dropped"]``); the agent's hot path never waits
for the disk.

A span without a trace id is stored as a trace of its own: trace id = its span id,
left-padded with zeros to 32 hex digits. ``service`` is ``attributes["service.name"]``
when the span has one, else the process name (``comm``).

Spans can hold query texts and URLs: the directory the file is created in is made with
mode 0700 and the file itself with mode 0600.
"""

import json
import logging
import os
import sqlite3
import threading
import time

import attrs
from attrs import validators as v

from deeptrace_core.hookspecs import hookimpl
from deeptrace_core.traces_cli import DEFAULT_DB

log = logging.getLogger("deeptrace.store")

SCHEMA_VERSION = 2   # 2: tid and host (added to older files by connect())
SCHEMA = """
CREATE TABLE IF NOT EXISTS spans (
    trace_id       TEXT    NOT NULL,
    span_id        TEXT    NOT NULL,
    parent_span_id TEXT,
    start_ns       INTEGER NOT NULL,
    end_ns         INTEGER NOT NULL,
    duration_ns    INTEGER NOT NULL,
    service        TEXT    NOT NULL,
    operation      TEXT,
    protocol       TEXT,
    role           TEXT,
    status         TEXT,
    error          INTEGER NOT NULL DEFAULT 0,
    pid            INTEGER,
    comm           TEXT,
    cmdline        TEXT,
    local_addr     TEXT,
    local_port     INTEGER,
    remote_addr    TEXT,
    remote_port    INTEGER,
    request_size   INTEGER,
    response_size  INTEGER,
    attributes     TEXT,
    link_source    TEXT,
    tid            INTEGER,
    host           TEXT
);
-- a trace's spans (show, per-trace aggregates, root lookup by span id)
CREATE INDEX IF NOT EXISTS spans_trace ON spans (trace_id, span_id);
-- recent first; --since; retention by age and by count
CREATE INDEX IF NOT EXISTS spans_start ON spans (start_ns);
-- --service
CREATE INDEX IF NOT EXISTS spans_service ON spans (service, start_ns);
"""
COLUMNS = ("trace_id", "span_id", "parent_span_id", "start_ns", "end_ns", "duration_ns",
           "service", "operation", "protocol", "role", "status", "error", "pid", "comm",
           "cmdline", "local_addr", "local_port", "remote_addr", "remote_port",
           "request_size", "response_size", "attributes", "link_source", "tid", "host")
_HOST = os.uname().nodename   # the store is one host's: the web UI shows where a span came from
INSERT = f"INSERT INTO spans ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})"
# Rows per INSERT statement. sqlite3 releases the GIL around each statement step and
# must win it back after: row by row (executemany), a writer thread behind a busy main
# thread waits a switch interval per row (~200 rows/s on the 2-core VM while the agent
# decodes flat out: the queue then grew to 30,000 spans, 60 MB; bench.hostile row 4).
# Many rows a statement pay that wait once. Only power-of-two sizes, each its own
# statement: sqlite3 caches every statement text it compiled, ~2 KB a row of it (with
# 1,000-row statements, a text per remainder size held up to 180 MB).
ROWS_PER_STATEMENT = 256
# Spans taken from the queue per transaction: bounds the rows built at once.
WRITE_CHUNK = 2048


def _insert_many(n: int) -> str:
    return (f"INSERT INTO spans ({', '.join(COLUMNS)}) VALUES "
            + ", ".join(["(" + ", ".join("?" * len(COLUMNS)) + ")"] * n))


_INSERTS = {n: _insert_many(n) for n in (1 << k for k in range(ROWS_PER_STATEMENT.bit_length()))}


@attrs.define
class StoreConfig:
    path: str = DEFAULT_DB
    max_spans: int = attrs.field(default=1_000_000, validator=[v.ge(1), v.le(1 << 40)])
    max_age: float = attrs.field(default=7 * 86400.0, validator=v.gt(0), metadata={"unit": "seconds"})
    retention_interval: float = attrs.field(default=60.0, validator=v.gt(0),
                                            metadata={"unit": "seconds"})
    queue_size: int = attrs.field(default=50_000, validator=[v.ge(1), v.le(10_000_000)])  # spans waiting for the disk


def span_row(span) -> tuple:
    """The table row of one span."""
    attributes = getattr(span, "attributes", None) or {}
    trace_id = span.trace_id or span.span_id.rjust(32, "0")
    service = attributes.get("service.name") or span.comm
    return (trace_id, span.span_id, span.parent_span_id, span.start_ns, span.end_ns,
            span.end_ns - span.start_ns, str(service), span.operation, span.protocol, span.role,
            None if span.status is None else str(span.status), 1 if span.error else 0,
            span.pid, span.comm, getattr(span, "cmdline", None), span.local_addr,
            span.local_port, span.remote_addr, span.remote_port,
            getattr(span, "request_size", None), getattr(span, "response_size", None),
            json.dumps(attributes, separators=(",", ":"), default=str) if attributes else None,
            getattr(span, "link_source", None), getattr(span, "tid", None), _HOST)


def connect(path: str) -> sqlite3.Connection:
    """Open (creating if needed) the store at `path`, schema in place, WAL mode."""
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        os.makedirs(parent, mode=0o700, exist_ok=True)
        os.chmod(parent, 0o700)  # makedirs' mode is subject to the umask
    if not os.path.exists(path):
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
    conn = sqlite3.connect(path, timeout=10, check_same_thread=False, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.executescript(SCHEMA)
        have = {r[1] for r in conn.execute("PRAGMA table_info(spans)")}
        for col, kind in (("tid", "INTEGER"), ("host", "TEXT")):   # files of version 1
            if col not in have:
                conn.execute(f"ALTER TABLE spans ADD COLUMN {col} {kind}")
        conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
    except Exception:
        conn.close()
        raise
    return conn


def apply_retention(conn: sqlite3.Connection, max_age_s: float, max_spans: int,
                    now_ns: int | None = None) -> int:
    """Delete spans that started before now - max_age, then the oldest beyond max_spans.

    Returns the number of spans deleted.
    """
    now_ns = time.time_ns() if now_ns is None else now_ns
    cutoff = now_ns - int(max_age_s * 1e9)
    conn.execute("BEGIN IMMEDIATE")
    try:
        deleted = conn.execute("DELETE FROM spans WHERE start_ns < ?", (cutoff,)).rowcount
        excess = conn.execute("SELECT COUNT(*) FROM spans").fetchone()[0] - max_spans
        if excess > 0:
            deleted += conn.execute(
                "DELETE FROM spans WHERE rowid IN "
                "(SELECT rowid FROM spans ORDER BY start_ns, rowid LIMIT ?)", (excess,)).rowcount
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return deleted


class StoreExporter:
    name = "store"
    config_class = StoreConfig

    def __init__(self, config: StoreConfig, context=None):
        self.config = config
        try:
            self._conn = connect(config.path)
        except (OSError, sqlite3.Error) as exc:
            # A ValueError becomes a config error pointing at this exporter's section.
            raise ValueError(f"cannot open trace store {config.path}: {exc}") from exc
        self.written = self.dropped = self.deleted = self.failed = 0
        self._pending = []           # spans accepted, not yet taken by the writer
        self._accepted = 0           # spans ever accepted into the queue
        self._done = 0               # of those, how many the writer has finished with
        self._cond = threading.Condition()
        self._stopping = False
        self._retain_asked = 0       # retain() tickets handed out
        self._retain_served = 0      # tickets served by a retention run that took them
        self._next_retention = 0.0   # monotonic; 0: run at start
        self._thread = threading.Thread(target=self._run, name="deeptrace-store", daemon=True)
        self._thread.start()

    # -- the hot path ---------------------------------------------------------------------
    def export(self, batch):
        spans = [r for r in batch if getattr(r, "kind", None) == "span"]
        if not spans:
            return
        with self._cond:
            if self._stopping:
                self.dropped += len(spans)
                return
            room = self.config.queue_size - len(self._pending)
            if room < len(spans):
                self.dropped += len(spans) - max(room, 0)
                spans = spans[:max(room, 0)]
            if spans:
                self._pending.extend(spans)
                self._accepted += len(spans)
                self._cond.notify()

    # -- exporter contract ----------------------------------------------------------------
    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every span accepted so far is in the file (or failed); True if so."""
        with self._cond:
            target = self._accepted
            self._cond.notify()
            return self._cond.wait_for(lambda: self._done >= target or not self._thread.is_alive(),
                                       timeout)

    def retain(self, timeout: float = 30.0) -> bool:
        """Run retention now (in the writer thread) and wait for it; True when it ran."""
        with self._cond:
            self._retain_asked += 1
            ticket = self._retain_asked
            self._cond.notify()
            return self._cond.wait_for(
                lambda: self._retain_served >= ticket or not self._thread.is_alive(), timeout)

    def shutdown(self, timeout: float = 60.0):
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.error("store: writer did not finish within %.0f s", timeout)
            return
        self._conn.close()

    def stats(self) -> dict:
        out = {"written": self.written, "dropped": self.dropped, "deleted": self.deleted}
        if self.failed:
            out["failed"] = self.failed
        return out

    # -- the writer thread ----------------------------------------------------------------
    def _insert(self, conn, rows):
        """Insert rows in one transaction (a method, so tests can slow it down), many rows
        a statement (ROWS_PER_STATEMENT says why)."""
        conn.execute("BEGIN")
        try:
            i = 0
            while i < len(rows):
                n = min(ROWS_PER_STATEMENT, 1 << ((len(rows) - i).bit_length() - 1))
                conn.execute(_INSERTS[n], [value for row in rows[i:i + n] for value in row])
                i += n
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def _write(self, spans):
        try:
            rows = [span_row(s) for s in spans]
            self._insert(self._conn, rows)
            self.written += len(rows)
        except Exception as exc:
            self.failed += len(spans)
            log.error("store: writing %d spans to %s failed: %r", len(spans), self.config.path, exc)

    def _retention(self):
        try:
            self.deleted += apply_retention(self._conn, self.config.max_age, self.config.max_spans)
        except Exception as exc:
            log.error("store: retention on %s failed: %r", self.config.path, exc)

    def _run(self):
        while True:
            with self._cond:
                while True:
                    due = self._next_retention - time.monotonic()
                    asked = self._retain_asked > self._retain_served
                    if self._pending or self._stopping or asked or due <= 0:
                        break
                    self._cond.wait(due)
                # Spans accepted before a retain() call are written before it is served.
                spans = self._pending[:WRITE_CHUNK]
                del self._pending[:WRITE_CHUNK]
                more = bool(self._pending)
                stopping, tickets = self._stopping, self._retain_asked
            if spans:
                self._write(spans)
            # A retain() ticket or the shutdown waits until the queue is written.
            retain = (((tickets > self._retain_served or stopping) and not more)
                      or time.monotonic() >= self._next_retention)
            if retain:
                self._retention()
                self._next_retention = time.monotonic() + self.config.retention_interval
            with self._cond:
                self._done += len(spans)
                if retain and not more:
                    self._retain_served = tickets
                self._cond.notify_all()
                if stopping and not self._pending:
                    return


@hookimpl
def deeptrace_register_exporters(registry):
    registry.add_exporter(StoreExporter)
