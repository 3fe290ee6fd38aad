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
  4. ``event_loop``: a thread that serves requests concurrently (the spans stage marks
     its spans ``deeptrace.thread_concurrent``: Node, asyncio, any epoll loop) runs one
     callback at a time, and each callback starts with the read of its own socket. So,
     in the order of that thread's calls: a server span's request read makes it the
     thread's current context; a client span's response read makes its parent current;
     a client span's request write takes the current context as its parent -- or, for
     the first call on a connection the thread opened, the context at its connect()
     (``deeptrace.connect_ns``, from the stage). What this cannot decide is marked
     ``deeptrace.link_deferred`` and left to the fallback: ``no_context`` (nothing
     current), ``outside_context`` (the current span does not contain the call: deferred
     work, e.g. a timer), ``no_connect_time`` (the first call seen on a connection whose
     connect() was not seen, e.g. one opened before the agent started), ``shared_read`` (the current requests came
     in one read: pipelined), ``order_unreliable`` (the thread's recent calls misfit too
     often for its order to be trusted: asyncio, timers, a full pool).
  4a. ``asyncio_task`` (tried before ``event_loop``): asyncio reads requests in the
     loop's callbacks and makes the calls they cause from Tasks, loop iterations later,
     so the order above misleads; the trace probe's uprobes say which Task made each
     write (``deeptrace.asyncio_task``) and which Task created which (edge records). A
     server span's response is written by the task that handled the request; a client
     span whose request write's task descends from it (or is it), made while that
     server span was open, is its child. Undecided (``deeptrace.asyncio_deferred``:
     ``no_server_task``, ``ambiguous``) goes on to ``event_loop`` and the fallback.
  4b. ``goroutine``: spans of Go processes carry the goroutine their request side ran on
     (``deeptrace.goid``; an http.Client call's writeLoop write is the caller's, in the
     kernel) and its ancestors by spawn (``deeptrace.go_parents``, nearest first). A
     client span's parent is the server span read by the same goroutine, or by the
     nearest ancestor that has one, whose interval contains it: the thread rule keyed by
     (pid, goroutine), as a Go request is served by one goroutine on whichever threads.
     Go spans skip the thread and event-loop rules (threads run many goroutines). A
     goroutine that read a request before answering the last (the stage marks it
     ``deeptrace.goroutine_concurrent``: an HTTP/2 connection's reader, say) serves
     several at once: it is not used (``goroutine_shared``), the fallback decides.
  5. ``statistical``: otherwise (thread pools, deferred work), the server spans of the same
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
import re
import time
from bisect import bisect_left, bisect_right
from collections import OrderedDict, defaultdict, deque

import attrs
from attrs import validators as v

from deeptrace_core.hookspecs import hookimpl
from deeptrace_core.span import NO_SERVER_OPEN, new_id

TOLERANCE_NS = 200_000  # syscall timestamps of nested calls may touch: 0.2 ms slack
CONCURRENT = "deeptrace.thread_concurrent"
SERVER_START, CLIENT_END = 0, 1    # the events that change an event loop's context
MAX_CHAIN = 64                     # client ends followed back to a server start
# A thread whose calls often fall outside the context its order gives (asyncio: writes
# lag their read by loop iterations; timers; pooled connections handed over) is not run
# callback-by-read: past this share of misfits (of at least FIT_MIN recent decisions)
# its calls go to the fallback. Node services measured ~1%, asyncio, timers, a full
# agent pool 34-58% (bench.accuracy).
MISFIT_MAX = 0.10
FIT_MIN = 16
FIT_WINDOW = 256                   # the counts halve past this: recent behaviour decides
LOOP_HOLD = 4                      # at most this many `wait`s for the pipeline to catch up
LOOP_THREADS = 4096                # event-loop threads remembered (LRU, counted)
ORPHAN_HOLD = 0.3                  # s: a poll round or two, for the other ring's records
CALLING_PIDS = 65536               # processes known to make calls (LRU)
RECENT_SERVERS = 20000             # released server spans kept as statistical candidates
LOOP_CONNS = 65536                 # event-loop client connections seen (LRU): a forgotten
                                   # one only has its next call deferred
GOID, GO_PARENTS = "deeptrace.goid", "deeptrace.go_parents"
GO_SHARED = "deeptrace.goroutine_concurrent"   # the stage's mark, as thread_concurrent
TASK_ATTR = "deeptrace.asyncio_task"
TASK_EDGES = 200_000               # asyncio task creations remembered, at most (counted)
TASK_DEPTH = 32                    # creators followed up from a call's task


@attrs.define
class TracesConfig:
    # How long a span waits, after it reaches this stage, for its parent to arrive.
    wait: float = attrs.field(default=2.0, validator=v.ge(0), metadata={"unit": "seconds"})
    max_hold: float = attrs.field(default=30.0, validator=v.gt(0), metadata={"unit": "seconds"})
    max_spans: int = attrs.field(default=200_000, validator=[v.ge(1), v.le(10_000_000)])
    statistical: bool = True
    # The event-loop rule (link_source event_loop); off, such threads' calls go to the
    # statistical fallback as they did before it (bench.accuracy --no-event-loop).
    event_loop: bool = True
    # The asyncio task rule (link_source asyncio_task): needs the trace probe's asyncio
    # uprobes (probes.trace.asyncio); off, such calls go to event_loop and the fallback.
    asyncio_task: bool = True
    min_confidence: float = attrs.field(default=0.0, validator=[v.ge(0), v.le(1)])
    # Operation pairs (and server operations) the statistical fallback remembers; the
    # least recently learned go first (counted as learned_evicted). Paths with ids in
    # them make a new operation per request: the tables must not grow with traffic.
    max_learned: int = attrs.field(default=10_000, validator=[v.ge(1), v.le(1_000_000)])
    # How long a released span stays findable by what comes after it: its tcp_seq
    # partner (from the same ring, so within the pipeline's batching) or a call whose
    # decision was held back (LOOP_HOLD waits; the window is never shorter than that).
    # Memory follows the traffic of this window: 32 s of it (max_hold + wait) was ~30 MB
    # at 2,000 spans/s (bench.hostile). Later partners become roots.
    recall: float = attrs.field(default=10.0, validator=[v.gt(0), v.le(3600)],
                                metadata={"unit": "seconds"})


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


_TOKEN = re.compile(r"[0-9A-Za-z_.:-]{2,}")


def _tokens(text: str) -> frozenset:
    """Words of a request's text (an id such as 7f3a-0012 is one): a word that only one
    candidate shares with the call names its parent far better than 4-grams, which every
    request of the same shape mostly shares."""
    return frozenset(_TOKEN.findall(text[:512]))


def _request_text(span) -> str:
    text = getattr(span, "text", None)
    if text is not None:                 # a _Recent keeps it, not the attributes
        return text
    a = span.attributes
    return " ".join(str(a.get(k, "")) for k in ("url.path", "url.query", "db.query.text")) \
        or span.operation


_UNLEARNED = (0, 0.0, 0.0)


class _Held:
    __slots__ = ("span", "arrived", "decided", "children", "grams", "tokens", "parent_h",
                 "loop_done", "first_call", "on_loop", "orphan")

    def __init__(self, span, now):
        self.span = span
        self.arrived = now
        self.decided = False
        self.children = ()      # a list once it has any: most spans never do
        self.grams = None
        self.tokens = None
        self.parent_h = None    # the parent's _Held once linked (an event loop's context)
        self.loop_done = False  # the event-loop rule ran for it (linked or deferred)
        self.first_call = False  # the first call seen on its connection
        self.on_loop = False     # on an event loop's timeline: kept, slimmed, once released
        self.orphan = False      # a client call made while its process served nothing


class _Slim:
    """What a timeline needs of a released span: the exporters own the span itself, and
    an event loop's timeline would otherwise keep every span of its window alive."""
    __slots__ = ("span_id", "trace_id", "role", "pid", "start_ns", "end_ns")

    def __init__(self, span):
        self.span_id, self.trace_id, self.role = span.span_id, span.trace_id, span.role
        self.pid, self.start_ns, self.end_ns = span.pid, span.start_ns, span.end_ns


class _Recent:
    """What the statistical fallback needs of a released server span: a whole span (its
    attributes dict) is ~1 KB, and 20,000 of them were a fifth of the agent's memory."""
    __slots__ = ("span_id", "trace_id", "role", "pid", "start_ns", "end_ns", "operation",
                 "text")

    def __init__(self, span):
        self.span_id, self.trace_id, self.operation = span.span_id, span.trace_id, span.operation
        self.role, self.pid = span.role, span.pid
        self.start_ns, self.end_ns = span.start_ns, span.end_ns
        self.text = _request_text(span)


_MISSING = object()


class _Recall:
    """A map whose entries are forgotten `window` to 1.25 x `window` seconds after they
    were set: five generations, the oldest dropped as a new one starts. Cheaper than a
    per-entry time (no tuple per entry) and O(1) to expire. A generation also starts
    early when it holds a quarter of `limit` entries (counted in `early`)."""
    __slots__ = ("gens", "period", "started", "per_gen", "early")
    GENS = 5

    def __init__(self, window: float, limit: int):
        self.gens = deque([{}])
        self.period = window / (self.GENS - 1)
        self.started = time.monotonic()
        self.per_gen = max(1, limit // (self.GENS - 1))
        self.early = 0

    def _new_gen(self, now):
        self.gens.append({})
        self.started = now
        while len(self.gens) > self.GENS:
            self.gens.popleft()

    def rotate(self, now):
        # One generation per period gone by (a quiet linker may not look for a while).
        periods = int((now - self.started) / self.period)
        for _ in range(min(periods, self.GENS)):
            self._new_gen(now)

    def __setitem__(self, key, value):
        gen = self.gens[-1]
        if len(gen) >= self.per_gen:
            self.early += 1
            self._new_gen(time.monotonic())
            gen = self.gens[-1]
        gen[key] = value

    def get(self, key, default=None):
        for gen in reversed(self.gens):   # the newest setting wins
            if key in gen:
                return gen[key]
        return default

    def __getitem__(self, key):
        value = self.get(key, _MISSING)
        if value is _MISSING:
            raise KeyError(key)
        return value

    def __contains__(self, key):
        return any(key in gen for gen in self.gens)

    def setdefault(self, key, value):
        found = self.get(key, _MISSING)
        if found is _MISSING:
            self[key] = found = value
        return found

    def pop(self, key, default=None):
        found = default
        for gen in self.gens:
            found = gen.pop(key, found)
        return found

    def __len__(self):
        return sum(len(gen) for gen in self.gens)


class _Loop:
    """One event-loop thread's context switches, in time order: ts[i] is the time of
    ev[i] = (SERVER_START, server _Held) or (CLIENT_END, client _Held). Spans arrive when
    they end, so a server's start is inserted behind later events: the bisect is
    O(log n), the insert moves only the events of that request's own lifetime."""
    __slots__ = ("ts", "ev", "decided_upto", "fit", "misfit")

    def __init__(self):
        self.ts = []
        self.ev = []
        self.decided_upto = 0   # latest time a decision looked up: earlier events are late
        self.fit = self.misfit = 0  # recent calls inside / outside the context found

    def judge(self, fits: bool) -> bool:
        """Count one decision; whether this thread's order is to be trusted."""
        if fits:
            self.fit += 1
        else:
            self.misfit += 1
        n = self.fit + self.misfit
        if n >= FIT_WINDOW:
            self.fit //= 2
            self.misfit //= 2
        return n < FIT_MIN or self.misfit <= MISFIT_MAX * n

    def add(self, t, event):
        ts = self.ts
        if not ts or t >= ts[-1]:
            ts.append(t)
            self.ev.append(event)
        else:
            i = bisect_right(ts, t)
            ts.insert(i, t)
            self.ev.insert(i, event)

    def at(self, t):
        """The latest event at or before t, or None; "shared" when it and the one before
        it are request reads at the same time: requests pipelined in one read, whose
        handlers ran in one callback in an order the calls do not show."""
        i = bisect_right(self.ts, t) - 1
        if i < 0:
            return None
        event = self.ev[i]
        if i and event[0] == SERVER_START and self.ts[i - 1] == self.ts[i] and \
                self.ev[i - 1][0] == SERVER_START:
            return "shared"
        return event

    def drop_before(self, horizon) -> int:
        i = bisect_right(self.ts, horizon)
        if i:
            del self.ts[:i]
            del self.ev[:i]
        return i


class TraceLinker:
    name = "traces"
    config_class = TracesConfig

    def __init__(self, config: TracesConfig, context=None):
        self.config = config
        self.held: dict = {}                       # span_id -> _Held
        # Released spans and client sequence keys, for what comes after them: kept for
        # the recall window (not max_hold: memory follows that window's traffic).
        self.window = window = max(config.recall, (LOOP_HOLD + 1) * config.wait)
        self.released = _Recall(window, config.max_spans)  # span_id -> trace_id
        self.by_seq = _Recall(window, config.max_spans)  # (client tuple, seq) -> span_id
        self.waiting_server: dict = {}             # (client tuple, seq) -> server span_id
        self.servers_by_pid = defaultdict(list)    # pid -> held/recent server spans
        self.clients_by_thread = defaultdict(list)  # (pid, tid) -> undecided client span_ids
        # What confident links taught, least recently learned first (bounded, LRU):
        # (server op, client op) -> [links, mean, M2 of log-gap]; server op -> links.
        self.learned_pairs: OrderedDict = OrderedDict()
        self.learned_ops: OrderedDict = OrderedDict()
        self.counts = defaultdict(int)
        self._next_expiry = 0.0
        # Released server spans, slim, as statistical candidates (recall window, bounded).
        self.recent_servers = _Recall(window, RECENT_SERVERS)
        # Processes that made calls: only their server spans can be parents. A server's
        # calls end before it and mostly arrive first (a call from the other ring, TLS or
        # plaintext, may come a poll round after it: known from the process's earlier
        # calls, so not forgotten with time; LRU).
        self.calling_pids: OrderedDict = OrderedDict()
        # Event-loop threads, learned from the stage's mark (LRU), and their timelines.
        self.loops: OrderedDict = OrderedDict()    # (pid, tid) -> _Loop
        self.loop_events = 0                       # events over all timelines (bounded)
        self.loop_conns: OrderedDict = OrderedDict()  # (pid, conn_id) of loop clients
        self.watermark = 0   # the latest end of any span arrived: how far the records got
        # The goroutine rule: (pid, goid) -> undecided Go client span ids (filed under their
        # goroutine and each ancestor) / server span ids; goroutines serving overlapping
        # requests (LRU-bounded).
        self.go_clients = defaultdict(list)
        self.go_servers = defaultdict(list)
        self.go_shared: OrderedDict = OrderedDict()
        # asyncio: (pid, task address) -> ([created ns], [creator task]) in time order (an
        # address is reused by task after task); (pid, task) -> ([end ns], [server _Held])
        # of the server spans whose response that task wrote, in end order.
        self.task_parents: dict = {}
        self.task_edge_count = 0
        self.task_servers: dict = {}

    # -- intake ---------------------------------------------------------------------------
    def process(self, batch):
        out = []
        now = time.monotonic()
        for rec in batch:
            kind = getattr(rec, "kind", None)
            if kind == "span":
                self._arrive(rec, now, out)
            elif kind == "asyncio_task":
                self._task_edge(rec)      # consumed here: lineage, not telemetry
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
        if span.end_ns > self.watermark:
            self.watermark = span.end_ns
        self._loop_event(h)
        if span.role == "server" and TASK_ATTR in span.attributes and self.config.asyncio_task:
            ends, helds = self.task_servers.setdefault(
                (span.pid, span.attributes[TASK_ATTR]), ([], []))
            i = bisect_right(ends, span.end_ns)
            ends.insert(i, span.end_ns)
            helds.insert(i, h)
            h.on_loop = True   # kept for the window: slimmed once released
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
            if span.attributes.pop(NO_SERVER_OPEN, False) and not header:
                # Its process served nothing when it called (as far as the stage had read:
                # a server request from the other ring, TLS or plaintext, may be a poll
                # round behind): held briefly, not for `wait`.
                h.orphan = True
            if span.pid in self.calling_pids:
                self.calling_pids.move_to_end(span.pid)
            else:
                self.calling_pids[span.pid] = True
                if len(self.calling_pids) > CALLING_PIDS:
                    self.calling_pids.popitem(last=False)
                    self.counts["calling_pids_evicted"] += 1
            if GOID in span.attributes:
                if not h.decided:
                    self._go_client(h, out)
            else:
                self.clients_by_thread[(span.pid, span.tid)].append(span.span_id)
        else:
            if span.pid in self.calling_pids:   # a statistical candidate
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
            if GOID in span.attributes:
                self._adopt_goroutine_children(h, out)
            else:
                self._adopt_thread_children(h, out)

    # -- the goroutine rule ---------------------------------------------------------------
    def _go_client(self, h, out):
        """A Go client span: linked now if the server span of its goroutine (or of an
        ancestor) already arrived, else filed for that server span's arrival."""
        c = h.span
        chain = [c.attributes[GOID], *c.attributes.get(GO_PARENTS, ())]
        for goid in chain:
            key = (c.pid, goid)
            if key in self.go_shared:
                continue
            for sid in reversed(self.go_servers.get(key, ())):
                sh = self._server(sid)
                if sh is None:
                    continue
                s = sh.span
                if s.end_ns + TOLERANCE_NS < c.end_ns:
                    break   # in arrival (end) order: the older ones ended before it too
                if s.start_ns - TOLERANCE_NS <= c.start_ns:
                    self._link(h, sh, "goroutine", out)
                    return
        for goid in chain:
            self.go_clients[(c.pid, goid)].append(c.span_id)

    def _adopt_goroutine_children(self, server_h, out):
        """Held Go client spans of this server span's goroutine (or of its descendants)
        that it contains are its children."""
        s = server_h.span
        key = (s.pid, s.attributes[GOID])
        if s.attributes.get(GO_SHARED) and key not in self.go_shared:
            self.go_shared[key] = True   # it served requests at once: it says nothing
            self.counts["goroutine_shared"] += 1
            if len(self.go_shared) > LOOP_THREADS:
                self.go_shared.popitem(last=False)
                self.counts["goroutine_shared_evicted"] += 1
        self.go_servers[key].append(s.span_id)
        if key in self.go_shared:
            return
        self._adopt(server_h, self.go_clients, key, "goroutine", out)

    # -- the event-loop rule --------------------------------------------------------------
    def _loop_event(self, h):
        """Put a span's context switch on its thread's timeline, when the thread is (or
        has been marked as) an event loop."""
        span = h.span
        if GOID in span.attributes:
            return   # a Go thread runs many goroutines: the goroutine rule links them
        key = (span.pid, span.tid)
        loop = self.loops.get(key)
        if loop is None:
            # A timeline starts with a thread's first call: a server's own calls end
            # before it and arrive first, so threads that only serve (databases, caches,
            # nginx) keep none (bench.hostile: 20,000 such events were ~10 MB).
            if span.role == "server" or not span.attributes.get(CONCURRENT) or \
                    not self.config.event_loop:
                return
            loop = self.loops[key] = _Loop()
            if len(self.loops) > LOOP_THREADS:
                _, gone = self.loops.popitem(last=False)
                self.loop_events -= len(gone.ts)
                self.counts["event_loop_threads_evicted"] += 1
        else:
            self.loops.move_to_end(key)
        if span.role == "server":
            t, event = span.start_ns, (SERVER_START, h)
        elif "deeptrace.no_response" in span.attributes:
            return      # no response read: it never resumed anything on the thread
        else:
            t, event = span.end_ns, (CLIENT_END, h)
            conn = (span.pid, span.conn_id)
            if conn in self.loop_conns:
                self.loop_conns.move_to_end(conn)
            else:
                h.first_call = True
                self.loop_conns[conn] = True
                if len(self.loop_conns) > LOOP_CONNS:
                    self.loop_conns.popitem(last=False)
        if t < loop.decided_upto:
            # Arrived after a decision that looked past its time: that decision may be
            # wrong (a request longer than the linker's wait). Counted, not undone.
            self.counts["event_loop_late"] += 1
        loop.add(t, event)
        h.on_loop = True
        self.loop_events += 1

    def _loop_parent(self, h, depth=0):
        """(parent _Held or None, why not): the context current on the client span's
        thread when it wrote its request (or connected, for a connection's first call)."""
        c = h.span
        if h.parent_h is not None:
            return h.parent_h, None
        loop = self.loops.get((c.pid, c.tid))
        if loop is None:
            return None, "no_context"
        t = c.attributes.get("deeptrace.connect_ns")
        if t is None:
            if h.first_call:
                # A new connection whose connect() we did not see (opened before we
                # looked, or its record lost). The loop ran other callbacks while it
                # connected, so the context at the write says nothing.
                return None, "no_connect_time"
            t = c.start_ns
        if t > loop.decided_upto:
            loop.decided_upto = t
        event = loop.at(t)
        if event is None:
            return None, "no_context"
        if event == "shared":
            return None, "shared_read"
        if event[0] == SERVER_START:
            return self._contains(event[1], c)
        prev = event[1]     # a response read: its caller's context resumed
        if prev.parent_h is None:
            if prev.loop_done or depth >= MAX_CHAIN:
                return None, "no_context"   # that call's parent was not decided by order
            parent, why = self._loop_parent(prev, depth + 1)
            if parent is None:
                return None, why
            return self._contains(parent, c)
        return self._contains(prev.parent_h, c)

    @staticmethod
    def _contains(parent_h, c):
        p = parent_h.span
        if p.role != "server" or p.pid != c.pid:
            return None, "no_context"
        if p.start_ns - TOLERANCE_NS <= c.start_ns and c.end_ns <= p.end_ns + TOLERANCE_NS:
            return parent_h, None
        # The current request had answered (or not started) around this call: the call
        # was made by deferred work (a timer, a pooled connection handed over), which the
        # order of the thread's calls cannot attribute.
        return None, "outside_context"

    def _loop_pending(self, h, now) -> bool:
        """Whether an event-loop call should wait longer: a request that was current
        when it wrote may still be on its way (it arrives when it ends). Under a backlog
        (the ring buffer read in rounds) time at the linker runs ahead of the records, so
        the call waits until spans ending `wait` after it have arrived, for at most
        LOOP_HOLD waits."""
        c = h.span
        if (c.pid, c.tid) not in self.loops or \
                self.watermark >= c.end_ns + int(self.config.wait * 1e9):
            return False
        return now - h.arrived < LOOP_HOLD * self.config.wait

    def _event_loop(self, h, out) -> bool:
        """Link a held client span on an event-loop thread by the order of its thread's
        calls; False (and the reason on the span) when that order cannot decide."""
        c = h.span
        loop = self.loops.get((c.pid, c.tid))
        if loop is None:
            return False
        parent, why = self._loop_parent(h)
        h.loop_done = True
        if why in (None, "outside_context") and not loop.judge(parent is not None) \
                and parent is not None:
            parent, why = None, "order_unreliable"
        if parent is None:
            c.attributes["deeptrace.link_deferred"] = why
            self.counts[f"event_loop_deferred_{why}"] += 1
            return False
        self._link(h, parent, "event_loop", out)
        return True

    # -- the asyncio task rule ------------------------------------------------------------
    def _task_edge(self, e):
        """Remember who created task `e.child` (several creations per address: CPython
        reuses a freed task's memory for the next one)."""
        if not self.config.asyncio_task:
            return
        if self.task_edge_count >= TASK_EDGES:   # kept for the recall window (_prune)
            self.counts["asyncio_task_edges_dropped"] += 1
            return
        versions = self.task_parents.get((e.pid, e.child))
        if versions is None:
            versions = self.task_parents[(e.pid, e.child)] = ([], [])
        times, parents = versions
        i = len(times) if not times or e.ts_ns >= times[-1] else bisect_right(times, e.ts_ns)
        times.insert(i, e.ts_ns)
        parents.insert(i, e.parent)
        self.task_edge_count += 1
        self.counts["asyncio_task_edges"] += 1

    def _lineage(self, pid, task, t):
        """The task current at time t, its creator, that one's creator, ... (each the
        creation of that address last before the time its child was created)."""
        chain = [task]
        while len(chain) < TASK_DEPTH:
            versions = self.task_parents.get((pid, task))
            if versions is None:
                break
            i = bisect_right(versions[0], t) - 1
            if i < 0:
                break
            parent, t = versions[1][i], versions[0][i]
            if not parent or parent in chain:
                break
            chain.append(parent)
            task = parent
        return chain

    def _asyncio_task(self, h, out) -> bool:
        """Link a client span by its request write's task: the nearest of that task and
        its creators that wrote the response of a server span of the same process open
        at the write. False (the reason on the span) when none or several fit."""
        c = h.span
        task = c.attributes.get(TASK_ATTR)
        if not task or not self.config.asyncio_task:
            return False
        t = c.start_ns
        why = "no_server_task"
        for anc in self._lineage(c.pid, task, t):
            servers = self.task_servers.get((c.pid, anc))
            if not servers:
                continue
            # The write comes after the request's read and before its answer: no slack,
            # the task's previous request (keep-alive) ended just before. A task answers
            # its requests one after another (pipelined ones in order): the spans ending
            # at or after t are those that may hold it, and the first few decide.
            ends, helds = servers
            i = bisect_left(ends, t)
            fit = [sh for sh in helds[i:i + 4] if sh.span.start_ns <= t]
            if len(fit) == 1:
                self._link(h, fit[0], "asyncio_task", out)
                return True
            if fit:
                why = "ambiguous"
                break
        c.attributes["deeptrace.asyncio_deferred"] = why
        self.counts[f"asyncio_task_deferred_{why}"] += 1
        return False

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
        self._adopt(server_h, self.clients_by_thread, (s.pid, s.tid), "thread", out)

    def _adopt(self, server_h, table, key, source, out):
        """Link the held, undecided client spans filed under `key` that the server span
        contains (thread: but those marked concurrent); keep the rest filed."""
        ids = table.get(key)
        if not ids:
            return
        s = server_h.span
        thread = source == "thread"
        keep = []
        for cid in ids:
            ch = self.held.get(cid)
            if ch is None or ch.decided:
                continue
            c = ch.span
            if thread and c.attributes.get(CONCURRENT):
                keep.append(cid)
            elif s.start_ns - TOLERANCE_NS <= c.start_ns and c.end_ns <= s.end_ns + TOLERANCE_NS:
                if thread:   # confident links teach the statistical fallback
                    self._learn(s, c)
                self._link(ch, server_h, source, out)
            else:
                keep.append(cid)
        table[key] = keep

    # -- decisions ------------------------------------------------------------------------
    def _link(self, child_h, parent_h, source, out):
        child = child_h.span
        child.parent_span_id = parent_h.span.span_id
        child.link_source = child.link_source or source
        child_h.decided = True
        child_h.parent_h = parent_h
        self.counts[f"links_{source}"] += 1
        pid = parent_h.span.span_id
        if pid in self.held:
            if parent_h.children:
                parent_h.children.append(child_h)
            else:
                parent_h.children = [child_h]
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
            if span.role == "client":   # a tcp_seq partner may come after it
                self.released[span.span_id] = span.trace_id
            elif span.pid in self.calling_pids:  # a parent of calls still on their way
                self.released[span.span_id] = span.trace_id
                self.recent_servers[span.span_id] = _Recent(span)
            out.append(span)
            if cur.on_loop:  # a timeline needs its times, ids and (a client's) parent
                cur.span = _Slim(span)
                cur.grams = cur.tokens = None
                if span.role == "server":
                    cur.parent_h = None
            for ch in cur.children:
                ch.span.trace_id = span.trace_id
                stack.append(ch)
            cur.children = ()

    def _expire(self, now, out):
        wait, max_hold = self.config.wait, self.config.max_hold
        wall = time.time_ns()
        for h in list(self.held.values()):
            if h.span.span_id not in self.held:
                continue
            # Counted from arrival, not from the span's end: a lagging pipeline must not
            # make spans give up on parents that are just behind them in the queue.
            waited = now - h.arrived
            if h.orphan and not h.decided and waited >= min(wait, ORPHAN_HOLD):
                self.counts["roots_no_server_open"] += 1
                self._root(h, out)
            elif not h.decided and waited >= wait:
                if h.span.role == "client" and self._loop_pending(h, now):
                    continue
                if h.span.role == "client" and (
                        self._asyncio_task(h, out) or self._event_loop(h, out) or (
                        self.config.statistical and self._statistical(h, out))):
                    continue
                self._root(h, out)
            elif h.decided and now - h.arrived >= max_hold:
                self._root(h, out, forced=True)  # its parent never got released
        self._prune(wall)
        for table in (self.released, self.by_seq, self.recent_servers):
            table.rotate(now)

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
        held = self.held
        for key in list(self.go_clients):   # filed under ancestors too: main's list has all
            ids = [i for i in self.go_clients[key] if i in held and not held[i].decided]
            if ids:
                self.go_clients[key] = ids
            else:
                del self.go_clients[key]
        for key in list(self.go_servers):
            ids = [i for i in self.go_servers[key] if i in self.held or i in self.recent_servers]
            if ids:
                self.go_servers[key] = ids[-64:]
            else:
                del self.go_servers[key]
        if len(self.waiting_server) > self.config.max_spans:
            for k in list(self.waiting_server)[: len(self.waiting_server) // 2]:
                del self.waiting_server[k]
        # A timeline's events older than the recall window could only answer calls that
        # started before it (held that long: rare); what looks there finds no context.
        horizon = wall - int(self.window * 1e9)
        self._prune_loops(horizon)
        for key in list(self.task_parents):
            times, parents = self.task_parents[key]
            i = bisect_right(times, horizon)
            if i:
                del times[:i], parents[:i]
                self.task_edge_count -= i
            if not times:
                del self.task_parents[key]
        for key in list(self.task_servers):
            ends, helds = self.task_servers[key]
            i = bisect_right(ends, horizon)
            if i:
                del ends[:i], helds[:i]
            if not ends:
                del self.task_servers[key]

    def _prune_loops(self, horizon):
        """Timelines keep what a held span may still look up (as servers_by_pid does),
        and at most max_spans events in all: past that, the longest loses its oldest
        half (counted: a call whose context went is left to the fallback)."""
        for key in list(self.loops):
            loop = self.loops[key]
            self.loop_events -= loop.drop_before(horizon)
            if not loop.ts:
                del self.loops[key]
        while self.loop_events > self.config.max_spans:
            loop = max(self.loops.values(), key=lambda lp: len(lp.ts))
            n = loop.drop_before(loop.ts[len(loop.ts) // 2])
            self.loop_events -= n
            self.counts["event_loop_evicted"] += n

    # -- the statistical fallback ---------------------------------------------------------
    def _server(self, sid):
        """A server span still held, or a released one (slim, decided), or None."""
        sh = self.held.get(sid)
        if sh is None:
            recent = self.recent_servers.get(sid)
            if recent is None:
                return None
            sh = _Held(recent, 0)
            sh.decided = True
        return sh

    def _statistical(self, h, out) -> bool:
        c = h.span
        candidates = []
        for sid in self.servers_by_pid.get(c.pid, ()):
            sh = self._server(sid)
            if sh is None:
                continue
            s = sh.span
            if s.start_ns - TOLERANCE_NS <= c.start_ns and c.end_ns <= s.end_ns + TOLERANCE_NS:
                candidates.append(sh)
        if not candidates:
            return False
        # How many candidates share each of the call's words: a word only one shares is
        # worth the most (its weight is 1 / that count).
        if h.tokens is None:
            h.tokens = _tokens(_request_text(c))
        df = defaultdict(int)
        for sh in candidates:
            if sh.tokens is None:
                sh.tokens = _tokens(_request_text(sh.span))
            for t in sh.tokens & h.tokens:
                df[t] += 1
        scores = [self._score(sh, h, df) for sh in candidates]
        total = sum(scores)
        best = max(range(len(candidates)), key=scores.__getitem__)
        confidence = scores[best] / total if total > 0 else 1.0 / len(candidates)
        if confidence < self.config.min_confidence:
            return False
        c.attributes["deeptrace.link_confidence"] = round(confidence, 3)
        self._link(h, candidates[best], "statistical", out)
        return True

    def _score(self, server_h, client_h, df=None) -> float:
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
        words = sum(1.0 / df[t] for t in server_h.tokens & client_h.tokens) if df else 0.0
        return (0.05 + 10 * similarity + 20 * words) * cooc * (0.1 + timing)

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
                if not (h.span.role == "client" and (
                        self._asyncio_task(h, out) or self._event_loop(h, out) or (
                        self.config.statistical and self._statistical(h, out)))):
                    self._root(h, out)
        for h in list(self.held.values()):
            if h.span.span_id in self.held:
                self._root(h, out, forced=True)
        return out

    def stats(self) -> dict:
        early = self.released.early + self.by_seq.early + self.recent_servers.early
        return {**self.counts, "held": len(self.held), "event_loop_threads": len(self.loops),
                **({"recall_full": early} if early else {})}


@hookimpl
def deeptrace_register_processors(registry):
    registry.add_processor(TraceLinker)
