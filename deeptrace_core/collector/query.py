"""Trace queries over the collector's tables, answering in the local store's shapes
(``traces_cli.SPAN_COLUMNS``), so ``deeptrace traces`` and the API read both alike.
Trace ids are canonical: a stitched trace is found by any of its parts' ids."""

import re

from .store import quote

# Joined with spans, the map tables are named with `local` (maps()): over Distributed
# tables, each shard joins its spans with its own map rows (schema.SHARDING_KEY puts a
# trace's rows on one shard), where the Distributed map table would be read by every
# shard from every shard. Spans joined with spans of other traces (a client with the
# server it called) may sit on another shard: those joins are GLOBAL (the right side is
# read once, on the node asked, and sent to the shards; on one node it changes nothing).
_CANON = ("(SELECT TraceId, argMax(CanonicalTraceId, Version) AS C "
          "FROM {db}.deeptrace_trace_map{local} GROUP BY TraceId)")
_PARENT = ("(SELECT SpanId, argMax(ParentSpanId, Version) AS P "
           "FROM {db}.deeptrace_parent_map{local} GROUP BY SpanId)")


def maps(store) -> str:
    """The map tables' suffix in joins with spans: `_local` over Distributed tables."""
    return "_local" if getattr(store, "distributed", False) else ""
_SPAN = """
    {tid} AS trace_id, t.SpanId AS span_id,
    if(p.P = '', t.ParentSpanId, p.P) AS parent_span_id,
    toUnixTimestamp64Nano(t.Timestamp) AS start_ns,
    toUnixTimestamp64Nano(t.Timestamp) + t.Duration AS end_ns, t.Duration AS duration_ns,
    t.ServiceName AS service, t.SpanName AS operation,
    t.SpanAttributes['deeptrace.protocol'] AS protocol, lower(t.SpanKind) AS role,
    t.StatusMessage AS status_message, t.SpanAttributes['http.response.status_code'] AS http_status,
    t.StatusCode = 'Error' AS error, toInt64OrZero(t.ResourceAttributes['process.pid']) AS pid,
    t.ResourceAttributes['process.executable.name'] AS comm,
    t.ResourceAttributes['host.name'] AS host, t.SpanAttributes['deeptrace.link_source'] AS link_source,
    t.SpanAttributes AS attributes, t.ResourceAttributes AS resource,
    p.Src AS stitched_by"""
_TRACE_ID = re.compile(r"[0-9a-f]{1,32}")


# One error type for both back-ends of deeptrace_core.query (the web UI catches it).
from deeptrace_core.query import QueryError  # noqa: E402


class ClickHouseQuery:
    def __init__(self, store, database: str):
        self.store = store
        self.db = f"`{database}`"
        self.local = maps(store)

    def _canon(self):
        return _CANON.format(db=self.db, local=self.local)

    def _parent(self):
        return _PARENT.format(db=self.db, local=self.local)

    def list_traces(self, *, service=None, operation=None, min_duration_ns=0, errors=False,
                    since_ns=None, limit=20, now_ns=None) -> list:
        import time
        where, having = [], [f"end_ns - start_ns >= {int(min_duration_ns or 0)}"]
        if since_ns is not None:
            cutoff = (now_ns or time.time_ns()) - int(since_ns)
            where.append(f"t.Timestamp >= fromUnixTimestamp64Nano(toInt64({cutoff}))")
            having.append(f"start_ns >= {cutoff}")
        match = []
        if service:
            match.append(f"t.ServiceName = {quote(service)}")
        if operation:
            match.append(f"positionCaseInsensitive(t.SpanName, {quote(operation)}) > 0")
        if match:
            having.append(f"countIf({' AND '.join(match)}) > 0")
        if errors:
            having.append("errors > 0")
        sql = f"""
SELECT if(m.C = '', t.TraceId, m.C) AS trace_id,
       min(toUnixTimestamp64Nano(t.Timestamp)) AS start_ns,
       max(toUnixTimestamp64Nano(t.Timestamp) + t.Duration) AS end_ns,
       count() AS spans, countIf(t.StatusCode = 'Error') AS errors
FROM {self.db}.otel_traces AS t LEFT JOIN {self._canon()} AS m ON m.TraceId = t.TraceId
{('WHERE ' + ' AND '.join(where)) if where else ''}
GROUP BY trace_id HAVING {' AND '.join(having)}
ORDER BY start_ns DESC LIMIT {max(0, int(limit))}"""
        traces = self.store.rows(sql)
        for t in traces:
            t["duration_ns"] = t["end_ns"] - t["start_ns"]
            spans = self.load_trace(t["trace_id"])
            t["root"] = _root(spans)
        return traces

    def _parts(self, trace_id: str) -> list:
        """The stored trace ids that make up canonical trace `trace_id`."""
        rows = self.store.rows(
            f"SELECT TraceId FROM {self.db}.deeptrace_trace_map GROUP BY TraceId "
            f"HAVING argMax(CanonicalTraceId, Version) = {quote(trace_id)}")
        return [trace_id] + [r["TraceId"] for r in rows if r["TraceId"] != trace_id]

    def load_trace(self, trace_id: str) -> list:
        ids = ", ".join(quote(t) for t in self._parts(trace_id))
        parent = (f"(SELECT SpanId, argMax(ParentSpanId, Version) AS P, "
                  f"argMax(Source, Version) AS Src "
                  f"FROM {self.db}.deeptrace_parent_map{self.local} "
                  f"WHERE TraceId IN ({ids}) GROUP BY SpanId)")
        rows = self.store.rows(f"""
SELECT {_SPAN.format(tid=quote(trace_id))}
FROM {self.db}.otel_traces AS t LEFT JOIN {parent} AS p ON p.SpanId = t.SpanId
WHERE t.TraceId IN ({ids}) ORDER BY start_ns, span_id""")
        for r in rows:
            r["error"] = bool(r["error"])
            r["status"] = r.pop("http_status") or r.pop("status_message") or None
            r.pop("status_message", None)
            r["link_source"] = r.pop("stitched_by") or r["link_source"] or None
        return rows

    def find_trace(self, prefix: str) -> str:
        prefix = prefix.strip().lower()
        if not _TRACE_ID.fullmatch(prefix):
            raise QueryError(f"not a trace id: {prefix!r}")
        rows = self.store.rows(
            f"SELECT DISTINCT if(m.C = '', t.TraceId, m.C) AS id FROM "
            f"{self.db}.otel_traces_trace_id_ts AS t LEFT JOIN {self._canon()} AS m "
            f"ON m.TraceId = t.TraceId WHERE startsWith(t.TraceId, {quote(prefix)}) LIMIT 6")
        ids = sorted({r["id"] for r in rows})
        if not ids:
            raise QueryError(f"no trace {prefix} in the collector")
        if len(ids) > 1:
            raise QueryError(f"trace id prefix {prefix} is ambiguous: {', '.join(ids[:5])}"
                             + (", ..." if len(ids) > 5 else ""))
        return ids[0]

    def services(self) -> list:
        return [r["s"] for r in self.store.rows(
            f"SELECT DISTINCT ServiceName AS s FROM {self.db}.otel_traces ORDER BY s")]

    def service_map(self, since_ns: int, now_ns=None) -> list:
        """Edges caller service -> callee (a service, or protocol://address:port where the
        callee is not traced) with calls, errors and latency percentiles seen by callers."""
        import time
        now_ns = now_ns or time.time_ns()
        cutoff = f"fromUnixTimestamp64Nano(toInt64({now_ns - int(since_ns)}))"
        parent = self._parent()
        seconds = max(1e-9, since_ns / 1e9)
        return self.store.rows(f"""
SELECT c.ServiceName AS source,
       if(s.svc = '', concat(c.SpanAttributes['deeptrace.protocol'], '://',
          c.SpanAttributes['server.address'], ':', c.SpanAttributes['server.port']), s.svc)
         AS target,
       count() AS calls, count() / {seconds} AS rate, countIf(c.StatusCode = 'Error') AS errors,
       quantile(0.5)(c.Duration) AS p50_ns, quantile(0.99)(c.Duration) AS p99_ns
FROM {self.db}.otel_traces AS c
GLOBAL LEFT JOIN (SELECT if(p.P = '', t.ParentSpanId, p.P) AS parent, t.ServiceName AS svc
           FROM {self.db}.otel_traces AS t LEFT JOIN {parent} AS p ON p.SpanId = t.SpanId
           WHERE t.SpanKind = 'Server' AND t.Timestamp >= {cutoff}) AS s ON s.parent = c.SpanId
WHERE c.SpanKind = 'Client' AND c.Timestamp >= {cutoff}
GROUP BY source, target ORDER BY source, target""")

    # -- the web UI's queries (deeptrace_core.query; the SQLite back-end's shapes) ----------
    def _since(self, ns):
        return f"fromUnixTimestamp64Nano(toInt64({int(ns)}))"

    def search(self, *, service=None, operation=None, text=None, min_duration_ns=0,
               errors=False, start_ns=None, end_ns=None, offset=0, limit=50,
               scatter=False) -> dict:
        """Traces by start, newest first, a page of them, with the total and the newest
        1000 as (start, duration, errors, id) for the scatter."""
        where, having = [], []
        if start_ns is not None:
            where.append(f"t.Timestamp >= {self._since(start_ns)}")
            having.append(f"start_ns >= {int(start_ns)}")
        if end_ns is not None:
            having.append(f"start_ns < {int(end_ns)}")
        if min_duration_ns:
            having.append(f"end_ns - start_ns >= {int(min_duration_ns)}")
        if errors:
            having.append("errors > 0")
        match = []
        if service:
            match.append(f"t.ServiceName = {quote(service)}")
        if operation:
            match.append(f"t.SpanName = {quote(operation)}")
        if text:
            match.append(f"positionCaseInsensitive(t.SpanName, {quote(text)}) > 0")
        if match:
            having.append(f"countIf({' AND '.join(match)}) > 0")
        inner = f"""
SELECT if(m.C = '', t.TraceId, m.C) AS trace_id,
       min(toUnixTimestamp64Nano(t.Timestamp)) AS start_ns,
       max(toUnixTimestamp64Nano(t.Timestamp) + t.Duration) AS end_ns,
       count() AS spans, countIf(t.StatusCode = 'Error') AS errors,
       -- the root: the earliest span without a parent, stitched ones included (hosts'
       -- clocks differ: the earliest span of all may be a callee's)
       if(countIf(if(p.P = '', t.ParentSpanId, p.P) = '') > 0,
          argMinIf(tuple(t.ServiceName, t.SpanName, lower(t.SpanKind)),
                   tuple(t.Timestamp, -toInt64(t.Duration)),
                   if(p.P = '', t.ParentSpanId, p.P) = ''),
          argMin(tuple(t.ServiceName, t.SpanName, lower(t.SpanKind)),
                 tuple(t.Timestamp, -toInt64(t.Duration)))) AS root
FROM {self.db}.otel_traces AS t LEFT JOIN {self._canon()} AS m ON m.TraceId = t.TraceId
LEFT JOIN {self._parent()} AS p ON p.SpanId = t.SpanId
{('WHERE ' + ' AND '.join(where)) if where else ''}
GROUP BY trace_id {('HAVING ' + ' AND '.join(having)) if having else ''}"""
        limit, offset = max(0, min(int(limit), 1000)), max(0, int(offset))
        total = int(self.store.rows(f"SELECT count() AS n FROM ({inner})")[0]["n"])
        traces = []
        for r in self.store.rows(f"SELECT * FROM ({inner}) ORDER BY start_ns DESC, trace_id "
                                 f"LIMIT {limit} OFFSET {offset}"):
            start, end = int(r["start_ns"]), int(r["end_ns"])
            svc, op, role = r["root"]
            traces.append({"trace_id": r["trace_id"], "start_ns": start, "end_ns": end,
                           "duration_ns": end - start, "spans": int(r["spans"]),
                           "errors": int(r["errors"]),
                           "root": {"service": svc, "operation": op, "role": role}})
        points = []
        if scatter:
            points = [[int(r["start_ns"]), int(r["end_ns"]) - int(r["start_ns"]),
                       int(r["errors"]), r["trace_id"]] for r in self.store.rows(
                f"SELECT start_ns, end_ns, errors, trace_id FROM ({inner}) "
                "ORDER BY start_ns DESC LIMIT 1000")]
        return {"traces": traces, "total": total, "offset": offset, "limit": limit,
                "scatter": points}

    def operations(self, service=None, limit=50) -> list:
        cond = f"WHERE ServiceName = {quote(service)}" if service else ""
        return [r["op"] for r in self.store.rows(
            f"SELECT SpanName AS op, count() AS n FROM {self.db}.otel_traces {cond} "
            f"GROUP BY op ORDER BY n DESC, op LIMIT {int(limit)}")]

    def edge_traces(self, source, target, since_ns, limit=10, now_ns=None) -> list:
        """The slowest calls `source` made to `target` (as service_map names them)."""
        import time
        now_ns = now_ns or time.time_ns()
        cutoff = self._since(now_ns - int(since_ns))
        parent = self._parent()
        rows = self.store.rows(f"""
SELECT * FROM (
  SELECT if(m.C = '', c.TraceId, m.C) AS trace_id, c.SpanName AS operation,
         toUnixTimestamp64Nano(c.Timestamp) AS start_ns, c.Duration AS duration_ns,
         c.StatusCode = 'Error' AS error, c.ServiceName AS source,
         if(s.svc = '', concat(c.SpanAttributes['deeptrace.protocol'], '://',
            c.SpanAttributes['server.address'], ':', c.SpanAttributes['server.port']), s.svc)
           AS target
  FROM {self.db}.otel_traces AS c
  LEFT JOIN {self._canon()} AS m ON m.TraceId = c.TraceId
  GLOBAL LEFT JOIN (SELECT if(p.P = '', t.ParentSpanId, p.P) AS parent, t.ServiceName AS svc
             FROM {self.db}.otel_traces AS t LEFT JOIN {parent} AS p ON p.SpanId = t.SpanId
             WHERE t.SpanKind = 'Server' AND t.Timestamp >= {cutoff}) AS s ON s.parent = c.SpanId
  WHERE c.SpanKind = 'Client' AND c.Timestamp >= {cutoff} AND c.ServiceName = {quote(source)})
WHERE target = {quote(target)} ORDER BY duration_ns DESC LIMIT {int(limit)}""")
        return [{"trace_id": r["trace_id"], "start_ns": int(r["start_ns"]),
                 "duration_ns": int(r["duration_ns"]), "error": bool(r["error"]),
                 "operation": r["operation"]} for r in rows]

    def service_red(self, service, since_ns, step_ns, now_ns=None) -> dict:
        """Rate, errors, p50/p99 per time step of what `service` serves (its server spans;
        a service that only calls out: its client spans), the busiest operations apart."""
        import time

        from deeptrace_core.query import TOP_OPERATIONS, buckets_for
        now_ns = now_ns or time.time_ns()
        step_ns, buckets = buckets_for(since_ns, step_ns)
        t0 = now_ns - buckets * step_ns
        span = (f"FROM {self.db}.otel_traces WHERE ServiceName = {quote(service)} "
                f"AND Timestamp >= {self._since(t0)} AND Timestamp < {self._since(now_ns)}")
        kinds = {r["k"]: int(r["n"]) for r in self.store.rows(
            f"SELECT SpanKind AS k, count() AS n {span} GROUP BY k")}
        kind = "Server" if "Server" in kinds or not kinds else max(kinds, key=kinds.get)
        top = [r["op"] for r in self.store.rows(
            f"SELECT SpanName AS op, count() AS n {span} AND SpanKind = {quote(kind)} "
            f"GROUP BY op ORDER BY n DESC, op LIMIT {TOP_OPERATIONS}")]
        name = (f"if(SpanName IN ({', '.join(quote(o) for o in top)}), SpanName, '(other)')"
                if top else "'(other)'")
        cells = {}
        for r in self.store.rows(
                f"SELECT {name} AS op, intDiv(toUnixTimestamp64Nano(Timestamp) - {t0}, "
                f"{step_ns}) AS b, count() AS n, countIf(StatusCode = 'Error') AS e, "
                f"quantileExact(0.5)(Duration) AS p50, quantileExact(0.99)(Duration) AS p99 "
                f"{span} AND SpanKind = {quote(kind)} GROUP BY op, b"):
            cells.setdefault(r["op"], {})[min(int(r["b"]), buckets - 1)] = r
        ops = []
        for op in sorted(cells, key=lambda o: (o == "(other)", -sum(
                int(c["n"]) for c in cells[o].values()), o)):
            points = []
            for b in range(buckets):
                c = cells[op].get(b)
                n = int(c["n"]) if c else 0
                points.append({"t_ns": t0 + b * step_ns, "count": n, "rate": n / (step_ns / 1e9),
                               "errors": int(c["e"]) if c else 0,
                               "p50_ns": int(c["p50"]) if c else None,
                               "p99_ns": int(c["p99"]) if c else None})
            ops.append({"operation": op, "total": sum(p["count"] for p in points),
                        "points": points})
        return {"service": service, "role": kind.lower(), "start_ns": t0, "step_ns": step_ns,
                "buckets": buckets, "operations": ops}

    def profile(self, service) -> dict:
        return {"available": False, "stacks": {},
                "reason": "the collector stores spans only: agents do not send CPU profiles "
                          "over OTLP"}


def _root(spans):
    ids = {s["span_id"] for s in spans}
    roots = [s for s in spans if not s["parent_span_id"] or s["parent_span_id"] not in ids]
    roots.sort(key=lambda s: (s["start_ns"], -s["duration_ns"]))
    return roots[0] if roots else None
