"""The trace query interface the web UI reads, with its SQLite back-end (the local store
the ``store`` exporter writes). The ClickHouse back-end is
``deeptrace_core.collector.query.ClickHouseQuery``; both answer every method below with
the same shapes, so one UI serves either.

  list_traces(**filters) -> [trace]        as ``deeptrace traces`` lists them
  find_trace(id or unique prefix) -> id    (raises NotFound / QueryError)
  load_trace(id) -> [span]                 every span, every column, attributes as a dict
  services() -> [name]
  operations(service, limit) -> [name]     its most frequent operations
  search(service, operation, text, min_duration_ns, errors, start_ns, end_ns,
         offset, limit, scatter) -> {"traces", "total", "offset", "limit", "scatter"}
  service_map(since_ns, now_ns) -> [edge]  source, target, calls, rate, errors, p50/p99
  edge_traces(source, target, since_ns, limit, now_ns) -> slowest calls on that edge
  service_red(service, since_ns, step_ns, now_ns) -> RED series per operation
  profile(service) -> {"available", "reason", "stacks"}   CPU profiler's folded stacks

A trace is {"trace_id", "start_ns", "end_ns", "duration_ns", "spans", "errors", "root"};
a span has at least ``traces_cli.SPAN_COLUMNS`` plus link_source, host, tid, attributes.

Searching 100,000 traces fast: the store has one row per span, so per-trace figures
(start, duration, errors) would be a GROUP BY over every span on every page. This
back-end keeps them in an in-memory table of its own (one row per trace, indexed by
start and duration), built once and then brought up to date from the spans added since
(the store only appends; retention deletes the oldest, which is pruned here too).
"""

import glob
import os
import re
import threading
import time

from deeptrace_core import traces_cli
from deeptrace_core.traces_cli import StoreError

# Every column of the store the UI shows (the store exporter's table; tid and host are
# newer, so older files may lack them).
FULL_COLUMNS = traces_cli.SPAN_COLUMNS + (
    "cmdline", "local_addr", "local_port", "remote_addr", "remote_port", "request_size",
    "response_size", "attributes", "link_source")
OPTIONAL_COLUMNS = ("tid", "host")
TOP_OPERATIONS = 8        # RED charts: the busiest operations, the rest as "(other)"
SCATTER_POINTS = 1000     # search scatter: at most this many of the newest matches
REFRESH_EVERY = 1.0       # seconds between looks for new spans


class QueryError(Exception):
    """A bad request (the message says what)."""


class NotFound(QueryError):
    pass


def like_pattern(text: str) -> str:
    return "%" + re.sub(r"([%_\\])", r"\\\1", text) + "%"


def percentile(sorted_values, q):
    """Nearest-rank percentile of an ascending list (None when empty)."""
    if not sorted_values:
        return None
    k = max(0, min(len(sorted_values) - 1, int(q * len(sorted_values) + 0.999999) - 1))
    return sorted_values[k]


def red_series(rows, t0, step_ns, buckets):
    """rows of (operation, start_ns, duration_ns, error) -> RED series per operation:
    the TOP_OPERATIONS busiest by name, the rest folded into "(other)"."""
    counts = {}
    for op, *_ in rows:
        counts[op] = counts.get(op, 0) + 1
    top = set(sorted(counts, key=lambda o: (-counts[o], o))[:TOP_OPERATIONS])
    cells = {}
    for op, start, dur, err in rows:
        name = op if op in top else "(other)"
        b = min(buckets - 1, max(0, (start - t0) // step_ns))
        cells.setdefault(name, {}).setdefault(b, []).append((dur, err))
    out = []
    for name in sorted(cells, key=lambda o: (o == "(other)", -counts.get(o, 0), o)):
        points = []
        for b in range(buckets):
            got = cells[name].get(b, [])
            durs = sorted(d for d, _ in got)
            points.append({"t_ns": t0 + b * step_ns, "count": len(got),
                           "rate": len(got) / (step_ns / 1e9),
                           "errors": sum(1 for _, e in got if e),
                           "p50_ns": percentile(durs, 0.5), "p99_ns": percentile(durs, 0.99)})
        out.append({"operation": name, "total": sum(p["count"] for p in points),
                    "points": points})
    return out


def buckets_for(since_ns, step_ns):
    step_ns = max(int(step_ns), 1_000_000)
    return step_ns, max(1, min(2000, -(-int(since_ns) // step_ns)))


def read_profiles(directory, comms, max_files=60):
    """The CPU profiler's folded stacks (``probes.cpu.profile``) in `directory` whose
    first frame (the process name) is one of `comms`, merged: {"stack;frames": count}."""
    if not directory or not os.path.isdir(directory):
        return None
    files = sorted(glob.glob(os.path.join(directory, "*.folded")))[-max_files:]
    if not files:
        return None
    stacks = {}
    for path in files:
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                for line in f:
                    stack, _, count = line.rstrip("\n").rpartition(" ")
                    if stack and count.isdigit() and stack.split(";", 1)[0] in comms:
                        stacks[stack] = stacks.get(stack, 0) + int(count)
        except OSError:
            continue
    return stacks


# The in-memory index: one row per trace (tn: its number here), the distinct (service,
# operation) pairs, and which traces have a span of each pair. Text over the operation
# is matched against the pairs (few), not against every span.
INDEX_SCHEMA = """
    CREATE TABLE ix.traces (tn INTEGER PRIMARY KEY, trace_id TEXT UNIQUE, start_ns INTEGER,
        end_ns INTEGER, duration_ns INTEGER, spans INTEGER, errors INTEGER);
    CREATE INDEX ix.traces_start ON traces (start_ns);
    CREATE INDEX ix.traces_duration ON traces (duration_ns);
    CREATE TABLE ix.ops (op_id INTEGER PRIMARY KEY, service TEXT, operation TEXT,
        UNIQUE (service, operation));
    CREATE TABLE ix.keys (op_id INTEGER, tn INTEGER, PRIMARY KEY (op_id, tn)) WITHOUT ROWID;
"""


class SqliteQuery:
    """The local store, read-only. One connection shared under a lock: the in-memory
    trace table is attached to it, and SQLite serialises a connection's work anyway."""

    def __init__(self, path: str, profiles_dir: str | None = None):
        self.path = path
        self.profiles_dir = profiles_dir
        self.conn = traces_cli.open_store(path, check_same_thread=False)
        # Reads only: mapping the file spares a system call per page on look-ups.
        self.conn.execute("PRAGMA mmap_size = 1073741824")
        self.conn.execute("PRAGMA cache_size = -65536")
        self.conn.execute("ATTACH DATABASE ':memory:' AS ix")
        self.conn.executescript(INDEX_SCHEMA)
        have = {r[1] for r in self.conn.execute("PRAGMA table_info(spans)")}
        self.columns = FULL_COLUMNS + tuple(c for c in OPTIONAL_COLUMNS if c in have)
        self.lock = threading.RLock()
        self._last_rowid = 0
        self._pruned = 0           # traces dropped from the index since it was built
        self._refreshed = 0.0
        self.refresh(force=True)

    def close(self):
        self.conn.close()

    # -- the trace table ------------------------------------------------------------------
    def refresh(self, force=False):
        """Fold spans added since the last look into the index; drop what retention
        deleted. Cheap when nothing changed (two index look-ups)."""
        with self.lock:
            if not force and time.monotonic() - self._refreshed < REFRESH_EVERY:
                return
            self._refreshed = time.monotonic()
            c = self.conn
            top = c.execute("SELECT MAX(rowid) FROM spans").fetchone()[0] or 0
            live = c.execute("SELECT COUNT(*) FROM ix.traces").fetchone()[0]
            # Rowids restarted (emptied and refilled), or most keys point at traces
            # retention deleted: start again.
            if top < self._last_rowid or self._pruned > max(live, 10_000):
                c.executescript("DELETE FROM ix.traces; DELETE FROM ix.ops; DELETE FROM ix.keys;")
                self._last_rowid = self._pruned = 0
            if top > self._last_rowid:
                rng = (self._last_rowid, top)
                c.execute("""
                    INSERT INTO ix.traces (trace_id, start_ns, end_ns, duration_ns, spans, errors)
                    SELECT trace_id, MIN(start_ns), MAX(end_ns), MAX(end_ns) - MIN(start_ns),
                           COUNT(*), SUM(error)
                    FROM main.spans WHERE rowid > ? AND rowid <= ? GROUP BY trace_id
                    ON CONFLICT(trace_id) DO UPDATE SET
                        start_ns = min(start_ns, excluded.start_ns),
                        end_ns = max(end_ns, excluded.end_ns),
                        duration_ns = max(end_ns, excluded.end_ns)
                                      - min(start_ns, excluded.start_ns),
                        spans = spans + excluded.spans, errors = errors + excluded.errors""", rng)
                c.execute("INSERT OR IGNORE INTO ix.ops (service, operation) "
                          "SELECT DISTINCT service, COALESCE(operation, '') FROM main.spans "
                          "WHERE rowid > ? AND rowid <= ?", rng)
                c.execute("""
                    INSERT OR IGNORE INTO ix.keys (op_id, tn)
                    SELECT o.op_id, t.tn FROM main.spans s
                    JOIN ix.ops o ON o.service = s.service
                                 AND o.operation = COALESCE(s.operation, '')
                    JOIN ix.traces t ON t.trace_id = s.trace_id
                    WHERE s.rowid > ? AND s.rowid <= ?""", rng)
                self._last_rowid = top
            oldest = c.execute("SELECT MIN(start_ns) FROM spans").fetchone()[0]
            self._pruned += c.execute("DELETE FROM ix.traces WHERE start_ns < ?",
                                      (oldest if oldest is not None else 2**62,)).rowcount
            c.commit()

    def _tuples(self):
        """A cursor yielding plain tuples: a third cheaper than sqlite3.Row over the
        hundreds of thousands of rows the map and RED charts aggregate."""
        cur = self.conn.cursor()
        cur.row_factory = None
        return cur

    # -- the interface --------------------------------------------------------------------
    def list_traces(self, *, service=None, operation=None, min_duration_ns=0, errors=False,
                    since_ns=None, limit=20, now_ns=None) -> list:
        with self.lock:
            return traces_cli.list_traces(
                self.conn, service=service, operation=operation,
                min_duration_ns=min_duration_ns, errors=errors, since_ns=since_ns,
                limit=limit, now_ns=now_ns)

    def find_trace(self, trace_id: str) -> str:
        if not re.fullmatch(r"[0-9a-fA-F]{1,32}", trace_id.strip()):
            raise NotFound(f"not a trace id: {trace_id!r}")
        with self.lock:
            try:
                return traces_cli.find_trace(self.conn, trace_id)
            except StoreError as exc:
                raise NotFound(str(exc)) from None

    def load_trace(self, trace_id: str) -> list:
        import json
        with self.lock:
            rows = self.conn.execute(
                f"SELECT {', '.join(self.columns)} FROM spans WHERE trace_id = ? "
                "ORDER BY start_ns, rowid", (trace_id,)).fetchall()
        out = []
        for r in rows:
            s = dict(r)
            try:
                s["attributes"] = json.loads(s["attributes"]) if s["attributes"] else {}
            except ValueError:
                s["attributes"] = {"(unreadable)": s["attributes"]}
            s["error"] = bool(s["error"])
            out.append(s)
        return out

    def services(self) -> list:
        self.refresh()
        with self.lock:
            return [r[0] for r in self.conn.execute(
                "SELECT DISTINCT service FROM ix.ops ORDER BY service")]

    def operations(self, service=None, limit=50) -> list:
        """The operations with the most traces (of `service`), for suggestions."""
        self.refresh()
        sql = ("SELECT o.operation, (SELECT COUNT(*) FROM ix.keys k WHERE k.op_id = o.op_id) n "
               "FROM ix.ops o WHERE o.operation != ''")
        args = []
        if service:
            sql += " AND o.service = ?"
            args.append(service)
        with self.lock:
            return [r[0] for r in self.conn.execute(
                f"SELECT operation FROM ({sql}) GROUP BY operation ORDER BY SUM(n) DESC, "
                "operation LIMIT ?", (*args, int(limit)))]

    def search(self, *, service=None, operation=None, text=None, min_duration_ns=0,
               errors=False, start_ns=None, end_ns=None, offset=0, limit=50,
               scatter=False) -> dict:
        self.refresh()
        where, args = [], []
        if start_ns is not None:
            where.append("t.start_ns >= ?")
            args.append(int(start_ns))
        if end_ns is not None:
            where.append("t.start_ns < ?")
            args.append(int(end_ns))
        if min_duration_ns:
            where.append("t.duration_ns >= ?")
            args.append(int(min_duration_ns))
        if errors:
            where.append("t.errors > 0")
        op_where, op_args = [], []
        if service:
            op_where.append("service = ?")
            op_args.append(service)
        if operation:
            op_where.append("operation = ?")
            op_args.append(operation)
        if text:
            op_where.append("operation LIKE ? ESCAPE '\\'")
            op_args.append(like_pattern(text))
        if op_where:
            where.append("t.tn IN (SELECT k.tn FROM ix.keys k WHERE k.op_id IN "
                         f"(SELECT op_id FROM ix.ops WHERE {' AND '.join(op_where)}))")
            args += op_args
        cond = (" WHERE " + " AND ".join(where)) if where else ""
        limit, offset = max(0, min(int(limit), 1000)), max(0, int(offset))
        cols = "t.trace_id, t.start_ns, t.end_ns, t.duration_ns, t.spans, t.errors"
        with self.lock:
            total = self.conn.execute(f"SELECT COUNT(*) FROM ix.traces t{cond}", args).fetchone()[0]
            rows = self.conn.execute(
                f"SELECT {cols} FROM ix.traces t{cond} ORDER BY t.start_ns DESC, t.tn DESC "
                "LIMIT ? OFFSET ?", (*args, limit, offset)).fetchall()
            traces = []
            for r in rows:
                t = dict(r)
                t["root"] = traces_cli.root_span(self.conn, t["trace_id"])
                traces.append(t)
            points = []
            if scatter:
                points = [list(p) for p in self.conn.execute(
                    f"SELECT t.start_ns, t.duration_ns, t.errors, t.trace_id FROM ix.traces t"
                    f"{cond} ORDER BY t.start_ns DESC LIMIT ?", (*args, SCATTER_POINTS))]
        return {"traces": traces, "total": total, "offset": offset, "limit": limit,
                "scatter": points}

    # A client span's callee: the service of the server span it is the parent of, else
    # where it went (the callee is not traced).
    _EDGES = """
        SELECT c.service AS source,
               COALESCE((SELECT s.service FROM main.spans s WHERE s.trace_id = c.trace_id
                         AND s.parent_span_id = c.span_id AND s.role = 'server' LIMIT 1),
                        COALESCE(c.protocol, '?') || '://' || COALESCE(c.remote_addr, '?')
                        || ':' || COALESCE(c.remote_port, '?')) AS target,
               c.duration_ns, c.error, c.trace_id, c.start_ns, c.operation
        FROM main.spans c WHERE c.role = 'client' AND c.start_ns >= ? AND c.start_ns < ?"""

    def service_map(self, since_ns, now_ns=None) -> list:
        now_ns = time.time_ns() if now_ns is None else int(now_ns)
        seconds = max(1e-9, since_ns / 1e9)
        edges = {}
        with self.lock:
            for src, dst, dur, err, *_ in self._tuples().execute(
                    self._EDGES, (now_ns - int(since_ns), now_ns)):
                e = edges.setdefault((src, dst), [[], 0])
                e[0].append(dur)
                e[1] += err
        out = []
        for (src, dst), (durs, errs) in sorted(edges.items()):
            durs.sort()
            out.append({"source": src, "target": dst, "calls": len(durs),
                        "rate": len(durs) / seconds, "errors": errs,
                        "p50_ns": percentile(durs, 0.5), "p99_ns": percentile(durs, 0.99)})
        return out

    def edge_traces(self, source, target, since_ns, limit=10, now_ns=None) -> list:
        now_ns = time.time_ns() if now_ns is None else int(now_ns)
        with self.lock:
            rows = self.conn.execute(
                f"SELECT * FROM ({self._EDGES}) WHERE source = ? AND target = ? "
                "ORDER BY duration_ns DESC LIMIT ?",
                (now_ns - int(since_ns), now_ns, source, target, int(limit))).fetchall()
        return [{"trace_id": r["trace_id"], "start_ns": r["start_ns"],
                 "duration_ns": r["duration_ns"], "error": bool(r["error"]),
                 "operation": r["operation"]} for r in rows]

    def service_red(self, service, since_ns, step_ns, now_ns=None) -> dict:
        """Rate, errors and duration over time of what `service` serves (its server
        spans; a service that only calls out: its client spans)."""
        now_ns = time.time_ns() if now_ns is None else int(now_ns)
        step_ns, buckets = buckets_for(since_ns, step_ns)
        t0 = now_ns - buckets * step_ns
        with self.lock:
            roles = [r[0] for r in self.conn.execute(
                "SELECT DISTINCT role FROM spans WHERE service = ? AND start_ns >= ?",
                (service, t0))]
            role = "server" if "server" in roles or not roles else roles[0]
            rows = self._tuples().execute(
                "SELECT COALESCE(operation, ''), start_ns, duration_ns, error FROM spans "
                "WHERE service = ? AND start_ns >= ? AND start_ns < ? AND role = ?",
                (service, t0, now_ns, role)).fetchall()
        return {"service": service, "role": role, "start_ns": t0, "step_ns": step_ns,
                "buckets": buckets, "operations": red_series(rows, t0, step_ns, buckets)}

    def profile(self, service) -> dict:
        with self.lock:
            comms = {r[0] for r in self.conn.execute(
                "SELECT DISTINCT comm FROM spans WHERE service = ? AND comm IS NOT NULL "
                "LIMIT 20", (service,))} | {service}
        stacks = read_profiles(self.profiles_dir, comms)
        if stacks is None:
            return {"available": False, "stacks": {},
                    "reason": f"no CPU profiles in {self.profiles_dir or '(no folder given)'} "
                              "(run the agent with probes.cpu.profile: true)"}
        if not stacks:
            return {"available": False, "stacks": {},
                    "reason": f"the CPU profiles in {self.profiles_dir} have no samples of "
                              f"{', '.join(sorted(comms))}"}
        return {"available": True, "stacks": stacks, "reason": None}
