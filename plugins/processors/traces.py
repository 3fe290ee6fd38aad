"""traces processor: links spans into distributed traces, without touching applications.

Order of trust, recorded per span in ``link_source``:
  1. ``traceparent`` / ``b3``: ids the application already propagates in HTTP headers;
     ``x-request-id`` gives a trace id (not a parent) to roots.
  2. ``tcp_seq``: across processes, a client span and a server span are the two ends of
     one request when the connection's addresses mirror each other and the request
     covers the same TCP stream bytes (the kernel's write_seq on one end, copied_seq on
     the other). Exact; no timing involved.
  3. ``thread``: within a process, the client calls a thread makes while serving a
     request are children of that request's server span (thread-per-request servers).
  4. ``statistical``: otherwise (thread pools, asyncio), the server spans of the same
     process whose interval contains the client span are candidates, scored by how
     similar their request texts are (ids passed from the incoming request to the
     outgoing one), by the learned timing of confident links between the same
     operations, and by how often those operations were confidently linked before;
     ``deeptrace.link_confidence`` records the winner's share of the total score.

A parent ends after its children (a server answers after its own calls return; a client
gets its answer after the server sent it), so a span waits (``wait``, after it ends) for
its parent to arrive. Spans are released as whole subtrees once their root is decided,
so every span of a trace leaves with the same trace id.
"""

import hashlib
import math
import time
from collections import OrderedDict, defaultdict

import attrs
from attrs import validators as v

from deeptrace_core.hookspecs import hookimpl
from deeptrace_core.span import new_id

TOLERANCE_NS = 200_000  # syscall timestamps of nested calls may touch: 0.2 ms slack


@attrs.define
class TracesConfig:
    # How long a span waits, after it reaches this stage, for its parent to arrive.
    wait: float = attrs.field(default=2.0, validator=v.ge(0), metadata={"unit": "seconds"})
    max_hold: float = attrs.field(default=30.0, validator=v.gt(0), metadata={"unit": "seconds"})
    max_spans: int = attrs.field(default=200_000, validator=[v.ge(1), v.le(10_000_000)])
    statistical: bool = True
    min_confidence: float = attrs.field(default=0.0, validator=[v.ge(0), v.le(1)])
    # Operation pairs (and server operations) the statistical fallback remembers; the
    # least recently learned go first (counted as learned_evicted). Paths with ids in
    # them make a new operation per request: the tables must not grow with traffic.
    max_learned: int = attrs.field(default=10_000, validator=[v.ge(1), v.le(1_000_000)])


def _addr(a: str) -> str:
    return a[7:] if a.startswith("::ffff:") else a


def _request_key(span, client: bool):
    """What both ends of a connection call one request: (client address, port, server
    address, port, the request's first TCP sequence number); None without a sequence.
    `client`: the span is the client's (its local end is the client)."""
    if span.request_seq is None:
        return None
    here = (_addr(span.local_addr), span.local_port)
    there = (_addr(span.remote_addr), span.remote_port)
    client_end, server_end = (here, there) if client else (there, here)
    return (*client_end, *server_end, span.request_seq[0])


def _header(span, name):
    return span.attributes.get(f"http.request.header.{name}")


def _traceparent(span):
    """(trace_id, parent_id, source) from W3C traceparent or B3 request headers."""
    tp = _header(span, "traceparent")
    if tp:
        parts = tp.strip().split("-")
        if len(parts) >= 4 and len(parts[1]) == 32 and len(parts[2]) == 16 \
                and parts[1] != "0" * 32:
            return parts[1].lower(), parts[2].lower(), "traceparent"
    b3 = _header(span, "b3")
    if b3:
        parts = b3.strip().split("-")
        if len(parts) >= 2 and len(parts[0]) in (16, 32) and len(parts[1]) == 16:
            return parts[0].lower().rjust(32, "0"), parts[1].lower(), "b3"
    tid, sid = _header(span, "x-b3-traceid"), _header(span, "x-b3-spanid")
    if tid and sid and len(sid.strip()) == 16:
        return tid.strip().lower().rjust(32, "0"), sid.strip().lower(), "b3"
    return None


def _grams(text: str) -> set:
    text = text[:512]
    return {text[i:i + 4] for i in range(max(0, len(text) - 3))}


def _request_text(span) -> str:
    a = span.attributes
    return " ".join(str(a.get(k, "")) for k in ("url.path", "url.query", "db.query.text")) \
        or span.operation


_UNLEARNED = (0, 0.0, 0.0)


class _Held:
    __slots__ = ("span", "arrived", "decided", "children", "grams")

    def __init__(self, span, now):
        self.span = span
        self.arrived = now
        self.decided = False
        self.children = []
        self.grams = None


class TraceLinker:
    name = "traces"
    config_class = TracesConfig

    def __init__(self, config: TracesConfig, context=None):
        self.config = config
        self.held: dict = {}                       # span_id -> _Held
        self.released: OrderedDict = OrderedDict()  # span_id -> trace_id (recent, bounded)
        self.by_seq: dict = {}                     # (client tuple, seq) -> client span_id
        self.waiting_server: dict = {}             # (client tuple, seq) -> server span_id
        self.servers_by_pid = defaultdict(list)    # pid -> held/recent server spans
        self.clients_by_thread = defaultdict(list)  # (pid, tid) -> undecided client span_ids
        # What confident links taught, least recently learned first (bounded, LRU):
        # (server op, client op) -> [links, mean, M2 of log-gap]; server op -> links.
        self.learned_pairs: OrderedDict = OrderedDict()
        self.learned_ops: OrderedDict = OrderedDict()
        self.counts = defaultdict(int)
        self._next_expiry = 0.0
        self.recent_servers: OrderedDict = OrderedDict()  # released server spans, bounded

    # -- intake ---------------------------------------------------------------------------
    def process(self, batch):
        out = []
        now = time.monotonic()
        for rec in batch:
            if getattr(rec, "kind", None) == "span":
                self._arrive(rec, now, out)
            else:
                out.append(rec)
        if now >= self._next_expiry:  # a scan of what is held, not per batch
            self._expire(now, out)
            self._next_expiry = now + 0.05
        return out

    def _arrive(self, span, now, out):
        h = _Held(span, now)
        self.held[span.span_id] = h
        if len(self.held) > self.config.max_spans:
            oldest = next(iter(self.held.values()))
            self._root(oldest, out, forced=True)
        header = _traceparent(span)
        if span.role == "client":
            if header:  # the application propagates: its outgoing parent-id is this span's id
                span.trace_id = header[0]
                self._rename(h, header[1])
            key = _request_key(span, client=True)
            if key:
                self.by_seq[key] = span.span_id
                waiting = self.waiting_server.pop(key, None)
                if waiting in self.held:
                    self._link(self.held[waiting], h, "tcp_seq", out)
            self.clients_by_thread[(span.pid, span.tid)].append(span.span_id)
        else:
            self.servers_by_pid[span.pid].append(span.span_id)
            if header:
                span.trace_id, span.parent_span_id, span.link_source = header
                h.decided = True
                self._release(h, out)
            else:
                key = _request_key(span, client=False)
                parent = self.by_seq.get(key) if key else None
                if parent in self.held:
                    self._link(h, self.held[parent], "tcp_seq", out)
                elif parent in self.released:
                    self._link_released(h, parent, "tcp_seq", out)
                elif key:
                    self.waiting_server[key] = span.span_id
            self._adopt_thread_children(h, out)

    def _rename(self, h, new_span_id):
        old = h.span.span_id
        self.held.pop(old, None)
        h.span.span_id = new_span_id
        self.held[new_span_id] = h


    def _adopt_thread_children(self, server_h, out):
        """Client spans this thread made while serving the request are its children
        (unless the thread serves requests concurrently: an event loop)."""
        s = server_h.span
        if s.attributes.get("deeptrace.thread_concurrent"):
            return
        ids = self.clients_by_thread.get((s.pid, s.tid))
        if not ids:
            return
        keep = []
        for cid in ids:
            ch = self.held.get(cid)
            if ch is None or ch.decided:
                continue
            c = ch.span
            if c.attributes.get("deeptrace.thread_concurrent"):
                keep.append(cid)
            elif s.start_ns - TOLERANCE_NS <= c.start_ns and c.end_ns <= s.end_ns + TOLERANCE_NS:
                self._learn(s, c)
                self._link(ch, server_h, "thread", out)
            else:
                keep.append(cid)
        self.clients_by_thread[(s.pid, s.tid)] = keep

    # -- decisions ------------------------------------------------------------------------
    def _link(self, child_h, parent_h, source, out):
        child = child_h.span
        child.parent_span_id = parent_h.span.span_id
        child.link_source = child.link_source or source
        child_h.decided = True
        self.counts[f"links_{source}"] += 1
        pid = parent_h.span.span_id
        if pid in self.held:
            parent_h.children.append(child_h)
        else:  # already released: it carries its trace id
            self.released.setdefault(pid, parent_h.span.trace_id)
            self._link_released(child_h, pid, source, out)

    def _link_released(self, child_h, parent_id, source, out):
        child = child_h.span
        child.parent_span_id = parent_id
        child.link_source = child.link_source or source
        child.trace_id = self.released[parent_id]
        child_h.decided = True
        self._release(child_h, out)

    def _root(self, h, out, forced=False):
        span = h.span
        if span.trace_id is None:
            rid = _header(span, "x-request-id")
            span.trace_id = (hashlib.sha256(rid.encode()).hexdigest()[:32] if rid
                             else new_id(16))
            if rid and not span.link_source:
                span.link_source = "x-request-id"
        h.decided = True
        self.counts["roots_forced" if forced else "roots"] += 1
        self._release(h, out)

    def _release(self, h, out):
        """Emit a decided span and, recursively, its decided children, with its trace id."""
        stack = [h]
        while stack:
            cur = stack.pop()
            span = cur.span
            if span.trace_id is None:
                span.trace_id = new_id(16)
            self.held.pop(span.span_id, None)
            self.released[span.span_id] = span.trace_id
            if span.role == "server":  # may still be a statistical parent for a while
                self.recent_servers[span.span_id] = span
                if len(self.recent_servers) > 20000:
                    self.recent_servers.popitem(last=False)
            out.append(span)
            for ch in cur.children:
                ch.span.trace_id = span.trace_id
                stack.append(ch)
            cur.children = []
        while len(self.released) > self.config.max_spans:
            self.released.popitem(last=False)

    def _expire(self, now, out):
        wait, max_hold = self.config.wait, self.config.max_hold
        wall = time.time_ns()
        for h in list(self.held.values()):
            if h.span.span_id not in self.held:
                continue
            # Counted from arrival, not from the span's end: a lagging pipeline must not
            # make spans give up on parents that are just behind them in the queue.
            waited = now - h.arrived
            if not h.decided and waited >= wait:
                if h.span.role == "client" and self.config.statistical and \
                        self._statistical(h, out):
                    continue
                self._root(h, out)
            elif h.decided and now - h.arrived >= max_hold:
                self._root(h, out, forced=True)  # its parent never got released
        self._prune(wall)

    def _prune(self, wall):
        horizon = wall - int((self.config.max_hold + self.config.wait) * 1e9)
        for pid in list(self.servers_by_pid):
            ids = [i for i in self.servers_by_pid[pid]
                   if i in self.held or i in self.recent_servers]
            ids = [i for i in ids if (self.held[i].span if i in self.held
                                      else self.recent_servers[i]).end_ns > horizon]
            if ids:
                self.servers_by_pid[pid] = ids[-2000:]
            else:
                del self.servers_by_pid[pid]
        for key in [k for k, ids in self.clients_by_thread.items()
                    if not any(i in self.held for i in ids)]:
            del self.clients_by_thread[key]
        if len(self.by_seq) > self.config.max_spans:
            for k in list(self.by_seq)[: len(self.by_seq) // 2]:
                del self.by_seq[k]
        if len(self.waiting_server) > self.config.max_spans:
            for k in list(self.waiting_server)[: len(self.waiting_server) // 2]:
                del self.waiting_server[k]

    # -- the statistical fallback ---------------------------------------------------------
    def _statistical(self, h, out) -> bool:
        c = h.span
        candidates = []
        for sid in self.servers_by_pid.get(c.pid, ()):
            sh = self.held.get(sid)
            if sh is None:
                recent = self.recent_servers.get(sid)
                if recent is None:
                    continue
                sh = _Held(recent, 0)
                sh.decided = True
            s = sh.span
            if s.start_ns - TOLERANCE_NS <= c.start_ns and c.end_ns <= s.end_ns + TOLERANCE_NS:
                candidates.append(sh)
        if not candidates:
            return False
        scores = [self._score(sh, h) for sh in candidates]
        total = sum(scores)
        best = max(range(len(candidates)), key=scores.__getitem__)
        confidence = scores[best] / total if total > 0 else 1.0 / len(candidates)
        if confidence < self.config.min_confidence:
            return False
        c.attributes["deeptrace.link_confidence"] = round(confidence, 3)
        self._link(h, candidates[best], "statistical", out)
        return True

    def _score(self, server_h, client_h) -> float:
        s, c = server_h.span, client_h.span
        if server_h.grams is None:
            server_h.grams = _grams(_request_text(s))
        if client_h.grams is None:
            client_h.grams = _grams(_request_text(c))
        inter = len(server_h.grams & client_h.grams)
        union = len(server_h.grams | client_h.grams) or 1
        similarity = inter / union
        pair = (s.operation, c.operation)
        n, mean, m2 = self.learned_pairs.get(pair, _UNLEARNED)   # reading adds no key
        cooc = (n + 1) / (self.learned_ops.get(s.operation, 0) + 2)
        gap = math.log1p(max(0, c.start_ns - s.start_ns) / 1000)
        if n >= 5:
            std = math.sqrt(m2 / (n - 1)) or 0.5
            timing = math.exp(-0.5 * ((gap - mean) / std) ** 2)
        else:
            timing = 1.0 / (1.0 + gap)
        return (0.05 + 10 * similarity) * cooc * (0.1 + timing)

    def _learn(self, s, c):
        """Confident (thread) links teach the fallback what normal looks like."""
        pair = (s.operation, c.operation)
        st = self._touch(self.learned_pairs, pair, [0, 0.0, 0.0])
        gap = math.log1p(max(0, c.start_ns - s.start_ns) / 1000)
        st[0] += 1
        delta = gap - st[1]
        st[1] += delta / st[0]
        st[2] += delta * (gap - st[1])
        self.learned_ops[s.operation] = self._touch(self.learned_ops, s.operation, 0) + 1

    def _touch(self, table: OrderedDict, key, new):
        """table[key] made most recent (created as `new`); the oldest entry goes when the
        table is full."""
        value = table.pop(key, None)
        if value is None:
            value = new
            if len(table) >= self.config.max_learned:
                table.popitem(last=False)
                self.counts["learned_evicted"] += 1
        table[key] = value
        return value

    def flush(self):
        out = []
        for h in list(self.held.values()):
            if h.span.span_id in self.held and not h.decided:
                if not (h.span.role == "client" and self.config.statistical
                        and self._statistical(h, out)):
                    self._root(h, out)
        for h in list(self.held.values()):
            if h.span.span_id in self.held:
                self._root(h, out, forced=True)
        return out

    def stats(self) -> dict:
        return {**self.counts, "held": len(self.held)}


@hookimpl
def deeptrace_register_processors(registry):
    registry.add_processor(TraceLinker)
