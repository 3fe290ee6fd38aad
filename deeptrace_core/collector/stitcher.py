"""The continuous stitcher: joins the client end and the server end of each request seen
by two agents, and merges their traces under one canonical trace id.

Every `interval` it reads, from ``deeptrace_stitch_keys``, the client/server pairs of the
recent `window` that share the request's first TCP sequence number and where either end
is new since the last round, then decides per server span:

1. **exact** (``tcp_seq``): the addresses mirror (the client's local end is the server's
   peer and the other way round) and the response sequence numbers agree where both are
   known. Two different requests cannot share all of these, so a wrong stitch is
   impossible; clocks play no part, so any skew is tolerated.
2. **nat** (``tcp_seq_nat``, when enabled): the addresses do not mirror (a NAT or proxy
   rewrote them), so it also needs both sequence numbers equal, the same protocol and
   operation, starts within `max_skew` and the server inside the client (give or take
   twice the skew). Used only when exactly one client fits the server, that client fits
   only it and has no exact partner, and both ends arrived `nat_hold` ago (so an exact
   partner that was on its way has come); otherwise counted as ambiguous and left alone.

A stitched server span gets the client span as parent (``deeptrace_parent_map``) and its
trace the client trace's canonical id (``deeptrace_trace_map``); traces already merged
under the server's trace move with it, so the order spans arrive in does not matter.
"""

import logging
import time
from collections import Counter, OrderedDict, defaultdict

import pyarrow as pa

log = logging.getLogger("deeptrace.collector.stitcher")

# The pairs where either end is new since the last round. Only rows whose request
# sequence number is among the new rows' are read on either side (the table is ordered
# by it), and only partitions of the recent `Inserted` range: a round reads what is new
# and its partners, not the whole window. ClickHouse decides which pairs could be
# exact or NAT stitches (the rules in the module's docstring); Python keeps the state.
# Over Distributed tables (`storage.distributed`) both ends are read through them and
# joined here (the ends of a hop belong to two traces, so often to two shards); GLOBAL
# IN sends the new rows' sequence numbers to the shards once (on one node it changes
# nothing).
_PAIRS = """
WITH fresh AS (SELECT ReqSeq FROM {db}.deeptrace_stitch_keys
               WHERE Inserted >= {since} AND Timestamp >= {lo})
SELECT c.SpanId AS cs, c.TraceId AS ct, s.SpanId AS ss, s.TraceId AS st,
       s.ParentSpanId AS sp,
       c.LocalAddr = s.PeerAddr AND c.LocalPort = s.PeerPort
         AND c.PeerAddr = s.LocalAddr AND c.PeerPort = s.LocalPort AS mirrored,
       mirrored AND (c.RespSeq < 0 OR s.RespSeq < 0 OR c.RespSeq = s.RespSeq) AS exact,
       NOT mirrored AND c.RespSeq >= 0 AND c.RespSeq = s.RespSeq
         AND c.Protocol = s.Protocol AND c.SpanName = s.SpanName
         AND abs(toUnixTimestamp64Nano(c.Timestamp) - toUnixTimestamp64Nano(s.Timestamp))
             <= {skew}
         AND s.Duration <= c.Duration + 2 * {skew} AS nat_ok,
       toUnixTimestamp64Milli(greatest(c.Inserted, s.Inserted)) AS arrived_ms,
       toUnixTimestamp64Nano(c.Timestamp) AS c_start
FROM (SELECT * FROM {db}.deeptrace_stitch_keys WHERE Kind = 'Client' AND Timestamp >= {lo}
      AND Inserted >= {old} AND ReqSeq GLOBAL IN fresh) AS c
INNER JOIN (SELECT * FROM {db}.deeptrace_stitch_keys WHERE Kind = 'Server'
            AND Timestamp >= {lo} AND Inserted >= {old} AND ReqSeq GLOBAL IN fresh) AS s
  ON c.ReqSeq = s.ReqSeq
WHERE (c.Inserted >= {since} OR s.Inserted >= {since}) AND (exact OR nat_ok)
ORDER BY c_start
"""

# Columns of a pair row (tuples: cheaper than dicts at tens of thousands a round).
CS, CT, SS, ST, SP, MIRRORED, EXACT, NAT_OK, ARRIVED = range(9)


class Stitcher:
    def __init__(self, store, config, database: str):
        self.store = store
        self.config = config
        self.db = f"`{database}`"
        self.canon: OrderedDict = OrderedDict()      # trace id -> canonical trace id
        self.members: dict = {}                      # canonical -> traces mapped to it
        self.done: OrderedDict = OrderedDict()       # server span ids decided (bounded)
        self.clients_done: OrderedDict = OrderedDict()  # client span ids given a server
        self.counts = defaultdict(int)
        # Written -> stitched, per pair, in 10 ms steps: percentiles over every pair.
        self.delay_hist: Counter = Counter()
        self._since_ms = None                        # Inserted watermark (ms)
        # NAT candidates waiting `nat_hold` for an exact partner: server span -> rows.
        # Later rounds read only new pairs, so these are kept here, not re-read.
        self.nat_pending: OrderedDict = OrderedDict()
        # How long after its Inserted stamp a row may still become visible: nothing on
        # chdb (inserts and queries take turns), a few seconds on a server.
        self.lag_ms = int(getattr(store, "visibility_lag", 5.0) * 1000)
        self._load()

    def _load(self):
        """What earlier runs decided, for the traces of the window (restart-safe)."""
        rows = self.store.rows(
            f"SELECT TraceId, argMax(CanonicalTraceId, Version) AS c FROM "
            f"{self.db}.deeptrace_trace_map WHERE Stitched >= now64(3) - "
            f"toIntervalSecond({int(self.config.window)}) GROUP BY TraceId")
        for r in rows:
            self._set(r["TraceId"], r["c"])
        for r in self.store.rows(
                f"SELECT DISTINCT SpanId FROM {self.db}.deeptrace_parent_map WHERE "
                f"Stitched >= now64(3) - toIntervalSecond({int(self.config.window)})"):
            self.done[r["SpanId"]] = True
        for r in self.store.rows(
                f"SELECT DISTINCT ParentSpanId AS c FROM {self.db}.deeptrace_parent_map WHERE "
                f"Stitched >= now64(3) - toIntervalSecond({int(self.config.window)})"):
            self.clients_done[r["c"]] = True

    # -- canonical ids --------------------------------------------------------------------
    def find(self, trace: str) -> str:
        seen = 0
        while trace in self.canon and self.canon[trace] != trace and seen < 64:
            trace = self.canon[trace]
            seen += 1
        return trace

    def _drop_member(self, canonical, trace):
        m = self.members.get(canonical)
        if m is not None:
            m.discard(trace)
            if not m:
                del self.members[canonical]      # no empty sets left behind

    def _set(self, trace, canonical):
        canon = self.canon
        old = canon.get(trace)
        if old is not None:
            self._drop_member(old, trace)
        canon[trace] = canonical
        canon.move_to_end(trace)
        m = self.members.get(canonical)
        if m is None:
            self.members[canonical] = {trace}
        else:
            m.add(trace)
        while len(canon) > self.config.max_traces:
            t, c = canon.popitem(last=False)
            self._drop_member(c, t)
            self.counts["traces_forgotten"] += 1

    def _merge(self, server_trace, root, changed):
        """Put `server_trace` and every trace already under it under `root`."""
        if server_trace == root:
            return
        self._set(server_trace, root)
        changed[server_trace] = root
        for t in self.members.pop(server_trace, ()):
            if t != root:
                self._set(t, root)
                changed[t] = root

    # -- one round ------------------------------------------------------------------------
    def run_once(self, now_ns: int | None = None) -> int:
        """Stitch what is new; returns the number of server spans stitched."""
        now_ns = now_ns or time.time_ns()
        started_ms = int(time.time() * 1000)
        lo = now_ns - int(self.config.window * 1e9)
        # New since the last round, give or take the visibility lag (and a clock tick);
        # `done` keeps a pair from being decided twice.
        since = (self._since_ms - self.lag_ms - 1) if self._since_ms else 0
        # Rows of an insert still under way are not in this round's answer: the next
        # round starts from that insert's start (its rows are stamped after it).
        pending = getattr(self.store, "pending_since_ms", lambda: None)()
        # A partner arrived at most a window (and the hosts' skew) before its span's start.
        old = started_ms - int((self.config.window + self.config.max_skew + 60) * 1000)
        rows = self.store.records(_PAIRS.format(
            db=self.db, lo=f"fromUnixTimestamp64Nano(toInt64({lo}))",
            since=f"fromUnixTimestamp64Milli(toInt64({since}))",
            old=f"fromUnixTimestamp64Milli(toInt64({max(0, old) if since else 0}))",
            skew=int(self.config.max_skew * 1e9)))
        self._since_ms = started_ms if pending is None else min(started_ms, pending)
        done, clients_done = self.done, self.clients_done
        by_server = defaultdict(list)
        for r in rows:
            if r[SS] not in done:
                by_server[r[SS]].append(r)
        for ss, held in self.nat_pending.items():   # with what arrived for them since
            if ss not in done:
                known = {r[CS] for r in by_server.get(ss, ())}
                by_server[ss] += [r for r in held if r[CS] not in known]
        self.nat_pending.clear()
        nat_clients = defaultdict(int)
        chosen, nat_wait = [], []
        exact_clients = set()
        hold_ms = int(self.config.nat_hold * 1000)
        for ss, cands in by_server.items():
            exact = [r for r in cands if r[EXACT]]
            if exact:
                if len(exact) > 1 and len({r[CS] for r in exact}) > 1:
                    self.counts["ambiguous_exact"] += 1    # the same request twice: skip
                    done[ss] = True
                    continue
                chosen.append((exact[0], "tcp_seq"))
                exact_clients.add(exact[0][CS])
                continue
            if self.config.nat:
                nat_wait.append([r for r in cands if r[NAT_OK]])
        for nat in nat_wait:
            nat = [r for r in nat if r[CS] not in exact_clients and r[CS] not in clients_done]
            if any(r[ARRIVED] > started_ms - hold_ms for r in nat):
                self.nat_pending[nat[0][SS]] = nat        # decided in a later round
                continue
            if len(nat) == 1:
                nat_clients[nat[0][CS]] += 1
                chosen.append((nat[0], "tcp_seq_nat"))
            elif len(nat) > 1:
                self.counts["ambiguous_nat"] += 1
                done[nat[0][SS]] = True
        parents, changed, delays = [], {}, []
        find = self.find
        for r, source in chosen:
            cs, ct, ss, st, sp = r[CS], r[CT], r[SS], r[ST], r[SP]
            if source == "tcp_seq_nat" and nat_clients[cs] > 1:
                self.counts["ambiguous_nat"] += 1          # one client fits two servers
                done[ss] = True
                continue
            done[ss] = True
            clients_done[cs] = True
            if sp == cs:
                self.counts["already_linked"] += 1         # one agent saw both ends
                continue
            if sp:
                self.counts["kept_agent_parent"] += 1      # e.g. traceparent: trust it
                continue
            root = find(ct)
            server_root = find(st)
            if server_root == root:
                self.counts["already_linked"] += 1
                continue
            self._merge(server_root, root, changed)
            if st != root and changed.get(st) is None:
                self._set(st, root)
                changed[st] = root
            parents.append((ss, st, cs, source))
            delays.append(r[ARRIVED])
        for table in (self.done, self.clients_done):
            while len(table) > self.config.max_traces:
                table.popitem(last=False)
        while len(self.nat_pending) > self.config.max_traces:
            self.nat_pending.popitem(last=False)
            self.counts["nat_pending_forgotten"] += 1
        self._write(parents, changed)
        # From the later end's write to this round's stitch being written.
        done_ms = int(time.time() * 1000)
        delays = [done_ms - a for a in delays]
        # Counted once written, so a reader of the counts finds what they count.
        for _, _, _, source in parents:
            self.counts[f"stitched_{source}"] += 1
        self.delay_hist.update(max(0, d) // 10 for d in delays)
        self.counts["rounds"] += 1
        return len(parents)

    def _write(self, parents, changed):
        if not parents and not changed:
            return
        version = time.time_ns()
        stamp = pa.array([version] * len(parents), pa.timestamp("ns"))
        if parents:
            ss, st, cs, src = zip(*parents)
            self.store.insert_arrow("deeptrace_parent_map", pa.table({
                "SpanId": pa.array(ss), "TraceId": pa.array(st), "ParentSpanId": pa.array(cs),
                "Source": pa.array(src), "Version": pa.array([version] * len(parents), pa.uint64()),
                "Stitched": stamp}))
        if changed:
            traces = list(changed)
            self.store.insert_arrow("deeptrace_trace_map", pa.table({
                "TraceId": pa.array(traces), "CanonicalTraceId": pa.array([changed[t] for t in traces]),
                "Version": pa.array([version] * len(traces), pa.uint64()),
                "Stitched": pa.array([version] * len(traces), pa.timestamp("ns"))}))

    def stats(self) -> dict:
        hist = sorted(self.delay_hist.items())
        total = sum(n for _, n in hist)

        def pct(q):
            if not total:
                return None
            seen, want = 0, q * total
            for step, n in hist:
                seen += n
                if seen >= want:
                    return step * 10 + 10          # the step's upper end (ms)
            return hist[-1][0] * 10 + 10
        return {**self.counts, "canonical_traces": len(self.canon),
                "stitch_delay_p50_ms": pct(0.5), "stitch_delay_p99_ms": pct(0.99)}
