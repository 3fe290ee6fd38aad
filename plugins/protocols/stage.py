"""The `spans` processor: socket records in, L7 spans out.

Per connection it keeps the protocol's parser and the requests waiting for a response.
The protocol and this process's role come from the kernel detector when the trace probe
has `protocols` set; otherwise the same detectors run here, in Python, on the first data.
Responses pair with requests by the key the parser sets (stream id, transaction id,
requestID) or, without one, first-in-first-out (HTTP/1 pipelining, Redis, SQL).
"""

import logging
import time
from collections import Counter, OrderedDict, defaultdict, deque
from collections.abc import Mapping

import attrs
from attrs import validators as v

from deeptrace_core import clock
from deeptrace_core.hookspecs import hookimpl
from deeptrace_core.l7 import REQ, REQUEST, RESP, check_protocols
from deeptrace_core.span import NO_SERVER_OPEN, Span

log = logging.getLogger("deeptrace.spans")
NOT_YET = None          # no protocol recognised yet on this connection
# SpanStage._span passes these Span fields by position.
_SPAN_ARGS = ("start_ns", "end_ns", "protocol", "role", "pid", "tid", "comm", "cmdline", "l4",
              "family", "local_addr", "local_port", "remote_addr", "remote_port", "conn_id",
              "operation", "status", "error", "request_size", "response_size", "request_seq",
              "response_seq", "attributes")
if tuple(a.name for a in attrs.fields(Span))[:len(_SPAN_ARGS)] != _SPAN_ARGS:
    raise ImportError("deeptrace_core.span.Span's fields changed order: update _SPAN_ARGS "
                      "and SpanStage._span")
DETECT_TRIES = 4        # records looked at before a connection is left alone
CONNECTS = 65536        # connect() times kept for connections without data yet
TLS_TUPLES = 65536      # TLS connections remembered, so their ciphertext is never parsed
# How long a TLS handshake span waits for the tls probe's plaintext of its connection:
# then it is the only span the connection gives (its plaintext could not be read).
TLS_WAIT = 2.0


def looks_like_tls(data: bytes) -> bool:
    """Whether a connection's first captured bytes are a TLS record: a ClientHello or
    ServerHello, or (capture started mid-connection) application data, an alert or
    change_cipher_spec, under the record versions TLS 1.0-1.3 use."""
    if len(data) < 6 or data[1] != 3 or not 1 <= data[2] <= 3:
        return False
    if data[0] == 22:                      # handshake: hello first
        return data[5] in (1, 2)
    return 20 <= data[0] <= 23


def _enabled(inst, attribute, value):
    for name in value:
        if inst.protocols and name not in inst.protocols:
            raise ValueError(f"{name!r} is not enabled (allowed: the protocols listed in "
                             f"`protocols`: {', '.join(inst.protocols)})")


@attrs.define
class SpansConfig:
    """``processors.spans`` in the YAML config."""

    # Parsed protocols; empty: every registered one. Names are checked against the
    # registry when the file is loaded ("registered" metadata, config.py).
    protocols: list[str] = attrs.field(factory=list, metadata={"registered": "protocols"})
    # Each protocol's own settings, by name (e.g. mysql: {max_statements: 100}): built as
    # its config_class when the file is loaded. A separate key, as the trace probe's
    # protocol_payload_bytes, so configuring one protocol does not disable the others.
    protocol_config: dict[str, object] = attrs.field(
        factory=dict, validator=_enabled, metadata={"registered": "protocols"})
    max_connections: int = attrs.field(default=20000, validator=[v.ge(1), v.le(1_000_000)])
    max_pending: int = attrs.field(default=1000, validator=[v.ge(1), v.le(1_000_000)])  # per connection
    request_timeout: float = attrs.field(default=60.0, validator=v.gt(0),
                                         metadata={"unit": "seconds"})


class _Conn:
    __slots__ = ("proto", "name", "parser", "role", "fifo", "keyed", "last_ns", "tries",
                 "req_tid", "errors", "rec", "tls", "connect_ns", "tls_attrs", "req_go")

    def __init__(self):
        self.proto = NOT_YET
        self.name = None
        self.parser = None
        self.role = None
        self.fifo = deque()
        self.keyed = {}
        self.last_ns = 0
        self.tries = 0
        self.req_tid = 0
        self.errors = 0
        self.rec = None  # the latest record: addresses and process for spans built later
        self.tls = False  # its records are TLS plaintext (the tls probe)
        self.tls_attrs = None  # then: its handshake's attributes (server name, version)
        self.connect_ns = 0  # when this process connect()ed it, until its first request
        self.req_go = None   # Go: (goid, ancestors) of the request's side, as req_tid


class SpanStage:
    name = "spans"
    config_class = SpansConfig

    def __init__(self, config: SpansConfig, context=None):
        self.config = config
        registry = getattr(context, "registry", None)
        known = registry.protocols if registry is not None else {}
        names = config.protocols or sorted(known)
        check_protocols(names, known)
        check_protocols(config.protocol_config, known)
        self.protocols = {n: known[n].cls(self._protocol_config(n, known[n].cls))
                          for n in names}
        self.conns: OrderedDict = OrderedDict()
        self.counts = defaultdict(Counter)
        self._cmdlines: dict = {}
        self._next_expiry = 0.0
        # Server requests open per (pid, tid). A thread that reads a second request before
        # answering the first is an event loop (asyncio, epoll servers): its calls cannot
        # be attributed by thread, and its spans say so (deeptrace.thread_concurrent).
        self.open_server = defaultdict(int)
        # The same per process: a call made while its process serves no request has no
        # parent here, and the linker need not hold it (deeptrace.no_server_open).
        self.open_server_pid = defaultdict(int)
        self.concurrent_threads: OrderedDict = OrderedDict()
        # (pid, local port, remote address, remote port) of connections the tls probe
        # decrypted: the trace probe's records of their ciphertext are never parsed.
        self.tls_tuples: OrderedDict = OrderedDict()
        # Handshake spans (the tls protocol) waiting for plaintext of their connection:
        # same tuple -> (span, monotonic deadline).
        self.handshakes: OrderedDict = OrderedDict()
        self._tls_counts = self.counts["tls"]
        # (pid, conn_id) -> when the process called connect() on it: an event loop's
        # first call on a new connection belongs to whoever was current then, and the
        # linker reads it from that call's span (deeptrace.connect_ns).
        self.connects: OrderedDict = OrderedDict()

    def _protocol_config(self, name, cls):
        """The protocol's config_class instance: as loaded from YAML, or built from a
        mapping (a config built in code, or a registry that gave the loader no protocol
        schemas), or the defaults."""
        given = self.config.protocol_config.get(name)
        if given is None:
            return cls.config_class()
        if isinstance(given, cls.config_class):
            return given
        if not isinstance(given, Mapping):
            raise ValueError(f"protocol_config.{name}: expected a mapping, got {given!r}")
        fields = sorted(a.name for a in attrs.fields(cls.config_class) if a.init)
        unknown = [k for k in given if k not in fields]
        if unknown:
            raise ValueError(f"protocol_config.{name}: unknown key {unknown[0]!r} "
                             f"(allowed: {', '.join(fields) or 'none'})")
        return cls.config_class(**given)

    # -- the hot path ---------------------------------------------------------------------
    def process(self, batch):
        spans = []
        tls = self._tls_counts
        handshakes = tls["spans"]
        for rec in batch:
            kind = getattr(rec, "kind", None)
            if kind == "socket":
                self._record(rec, spans)
            elif kind == "asyncio_task":   # task lineage: for the traces processor
                spans.append(rec)
        now = time.monotonic()
        if now >= self._next_expiry:
            self._expire(clock.wall_ns(), spans)   # the records' clock, not time.time_ns()
            self._next_expiry = now + 1.0
        if self.handshakes or tls["spans"] != handshakes:   # only then: a walk over spans
            spans = self._hold_handshakes(spans, now)
        return spans

    # -- TLS handshake spans --------------------------------------------------------------
    def _hold_handshakes(self, spans, now):
        """A handshake span (protocol tls) leaves only for a connection whose plaintext
        the tls probe did not send within TLS_WAIT; otherwise its attributes go on the
        plaintext's spans."""
        held = self.handshakes
        out = []
        for span in spans:
            if span.kind != "span" or span.protocol != "tls":   # task edges pass
                out.append(span)
                continue
            tup = (span.pid, span.local_port, span.remote_addr, span.remote_port)
            if tup in self.tls_tuples:   # its plaintext came first (maybe closed already)
                self._decrypted_handshake(self.conns.get(self.tls_tuples[tup]), span)
                continue
            held[tup] = (span, now + TLS_WAIT)
            if len(held) > self.config.max_connections:
                out.append(held.popitem(last=False)[1][0])
        while held:
            span, deadline = next(iter(held.values()))
            if deadline > now:
                break
            held.popitem(last=False)
            self.counts["tls"]["handshakes_unread"] += 1
            out.append(span)
        return out

    def _decrypted_handshake(self, conn, span):
        if conn is not None:
            conn.tls_attrs = {k: v for k, v in span.attributes.items() if k.startswith("tls.")}
        self.counts["tls"]["handshakes_decrypted"] += 1

    def flush(self):
        """At shut-down: the handshake spans still waiting."""
        out = [span for span, _ in self.handshakes.values()]
        self.handshakes.clear()
        return out

    def _record(self, rec, spans):
        key = (rec.pid, rec.conn_id) if rec.l4 == "tcp" else \
            (rec.pid, rec.conn_id, rec.remote_addr, rec.remote_port)
        if rec.direction == "none":
            if rec.syscall == "close":
                self._close(key, rec, spans)
            elif rec.syscall == "connect" and rec.l4 == "tcp":
                self.connects[key] = rec.ts_enter_ns
                if len(self.connects) > CONNECTS:
                    self.connects.popitem(last=False)
                    self.counts["connect"]["evicted"] += 1
            return
        conn = self.conns.get(key)
        if conn is None:
            conn = self.conns[key] = _Conn()
            if self.connects:
                conn.connect_ns = self.connects.pop(key, 0)
            if rec.tls:
                conn.tls = True
                tup = (rec.pid, rec.local_port, rec.remote_addr, rec.remote_port)
                self.tls_tuples[tup] = key
                if len(self.tls_tuples) > TLS_TUPLES:
                    self.tls_tuples.popitem(last=False)
                if self.handshakes:
                    held = self.handshakes.pop(tup, None)
                    if held is not None:
                        self._decrypted_handshake(conn, held[0])
            if len(self.conns) > self.config.max_connections:
                old_key, old = self.conns.popitem(last=False)
                self._flush(old, old.rec, spans, "evicted")
                self.counts[old.name or "-"]["connections_evicted"] += 1
        else:
            self.conns.move_to_end(key)
        conn.last_ns = rec.ts_exit_ns
        conn.rec = rec
        if conn.proto is NOT_YET and not self._classify(conn, rec):
            return
        if conn.proto is False:
            return
        side = REQ if (conn.role == "client") == (rec.direction == "egress") else RESP
        if side == REQ:
            conn.req_tid = rec.tid
            if rec.goid:
                conn.req_go = (rec.goid, rec.go_parents)
        # A read may block before its bytes arrive: ingress bytes count from the read's exit.
        ts_start = rec.ts_exit_ns if rec.direction == "ingress" else rec.ts_enter_ns
        parser = conn.parser
        try:
            msgs = parser.feed(side, rec.payload, rec.bytes, ts_start, rec.ts_exit_ns,
                               rec.tcp_seq_start)
        except Exception as exc:  # a parser bug must never stop the agent
            self.counts[conn.name]["parser_crashes"] += 1
            log.debug("%s parser failed: %r", conn.name, exc)
            parser.reset(side)
            return
        if parser.errors != conn.errors:
            self.counts[conn.name]["parse_errors"] += parser.errors - conn.errors
            conn.errors = parser.errors
        for msg in msgs:
            self._message(conn, msg, rec, spans)

    def _classify(self, conn, rec) -> bool:
        if not conn.tls and (looks_like_tls(rec.payload) or (
                rec.pid, rec.local_port, rec.remote_addr, rec.remote_port) in self.tls_tuples):
            # Ciphertext: never parsed by a protocol, whatever a detector would say of its
            # bytes; only its hellos, by the tls handshake parser if it is enabled.
            hs = self.protocols.get("tls")
            r = hs.detect(rec.payload, rec.local_port, rec.remote_port, rec.l4) if hs else 0
            if not r:
                conn.proto = False
                self.counts["tls"]["ciphertext_connections"] += 1
                return False
            sent = rec.direction == "egress"
            name, role = "tls", "client" if (r == REQUEST) == sent else "server"
        elif rec.protocol in self.protocols and rec.role:
            name, role = rec.protocol, rec.role
        else:
            name = role = None
            if rec.payload:
                for pname, proto in self.protocols.items():
                    r = proto.detect(rec.payload, rec.local_port, rec.remote_port, rec.l4)
                    if r:
                        sent = rec.direction == "egress"
                        name, role = pname, "client" if (r == REQUEST) == sent else "server"
                        break
            if name is None:
                conn.tries += 1
                if conn.tries >= DETECT_TRIES:
                    conn.proto = False
                return False
        conn.proto = self.protocols[name]
        conn.name, conn.role = name, role
        conn.parser = conn.proto.parser()
        conn.parser.set_l4(rec.l4)
        self.counts[name]["connections"] += 1
        return True

    def _message(self, conn, msg, rec, spans):
        counts = self.counts[conn.name]
        # The execution unit of the record that completed the message: the loop iteration,
        # and the asyncio task of the span's own write (a client's request, a server's
        # response: the task that answers; reads mostly run in the loop's callbacks).
        if rec.loop_iter:
            msg.attributes["deeptrace.loop_iter" if msg.is_request
                           else "deeptrace.response_loop_iter"] = rec.loop_iter
        if rec.asyncio_task and rec.direction == "egress":
            msg.attributes["deeptrace.asyncio_task"] = rec.asyncio_task
        if msg.is_request:
            if not msg.expects_response:
                spans.append(self._span(conn, msg, None, rec))
                return
            if msg.key is not None:
                # A retransmission (or a reused id) replaces the request it repeats, first:
                # it is not a second request open on the thread.
                replaced = conn.keyed.pop(msg.key, None)
                if replaced is not None:
                    counts["requests_replaced"] += 1
                    self._closed(rec.pid, replaced)
            if conn.role == "client" and rec.pid not in self.open_server_pid:
                msg.attributes[NO_SERVER_OPEN] = True
            if conn.connect_ns:
                if conn.role == "client":
                    msg.attributes["deeptrace.connect_ns"] = conn.connect_ns
                conn.connect_ns = 0
            # A TLS handshake (the tls parser's ClientHello) is no request the thread
            # serves: counted, it marked thread-per-request HTTPS servers concurrent, so
            # their client calls lost the thread rule (tests/test_tls_more.py's chain).
            if conn.role == "server" and conn.name != "tls":
                thread = (rec.pid, conn.req_tid or rec.tid)
                if self.open_server[thread] > 0:
                    self.concurrent_threads[thread] = True
                    if len(self.concurrent_threads) > 10000:
                        self.concurrent_threads.popitem(last=False)
                self.open_server[thread] += 1
                self.open_server_pid[rec.pid] += 1
                msg.attributes["deeptrace.server_thread"] = thread[1]
                if conn.req_go is not None:  # the same for a Go request's goroutine
                    g = (rec.pid, "go", conn.req_go[0])
                    if self.open_server[g] > 0:
                        self.concurrent_threads[g] = True
                        if len(self.concurrent_threads) > 10000:
                            self.concurrent_threads.popitem(last=False)
                    self.open_server[g] += 1
                    msg.attributes["deeptrace.server_goroutine"] = g[2]
            if msg.key is not None:
                conn.keyed[msg.key] = msg
            else:
                conn.fifo.append(msg)
            if len(conn.fifo) + len(conn.keyed) > self.config.max_pending:
                counts["pending_dropped"] += 1
                dropped = conn.fifo.popleft() if conn.fifo else \
                    conn.keyed.pop(next(iter(conn.keyed)))
                self._closed(rec.pid, dropped)
            return
        if msg.key is not None:
            req = conn.keyed.pop(msg.key, None)
        else:
            req = conn.fifo.popleft() if conn.fifo else None
        if req is None:
            counts["unmatched_responses"] += 1
            return
        spans.append(self._span(conn, req, msg, rec))

    def _closed(self, pid, req):
        """The thread a server request was read on, its open count taken back (None for
        a client request). Every way a request leaves passes here once: answered, timed
        out, replaced by a retransmission, dropped past max_pending; a count left behind
        would mark every later request on that thread concurrent."""
        tid = req.attributes.pop("deeptrace.server_thread", None)
        if tid is not None:
            thread = (pid, tid)
            self.open_server[thread] -= 1
            if self.open_server[thread] <= 0:
                del self.open_server[thread]
            self.open_server_pid[pid] -= 1
            if self.open_server_pid[pid] <= 0:
                del self.open_server_pid[pid]
        goid = req.attributes.pop("deeptrace.server_goroutine", None)
        if goid is not None:
            g = (pid, "go", goid)
            self.open_server[g] -= 1
            if self.open_server[g] <= 0:
                del self.open_server[g]
        return tid

    def _span(self, conn, req, resp, rec, missing=None):
        pid, role = rec.pid, conn.role
        tid = conn.req_tid or rec.tid
        if role == "server":
            tid = self._closed(pid, req) or tid
        if resp is not None:
            protocol = resp.protocol or req.protocol or conn.name
            status, end, operation = resp.status, resp.ts_end, req.operation or resp.operation
            # Beyond the messages' own flags, the protocol's rule (HTTP: 4xx for clients).
            error = bool(req.error or resp.error) or conn.parser.span_error(status, role, protocol)
            attributes = {**req.attributes, **resp.attributes}
            response_seq = ((resp.seq_start, resp.seq_end)
                            if resp.seq_start is not None else None)
        else:
            protocol = req.protocol or conn.name
            status, end, operation = missing, max(req.ts_end, conn.last_ns), req.operation or ""
            error = bool(req.error or missing not in (None, ""))
            attributes = dict(req.attributes)
            response_seq = None
        if missing:
            attributes["deeptrace.no_response"] = missing
        if (pid, tid) in self.concurrent_threads:
            attributes["deeptrace.thread_concurrent"] = True
        if conn.req_go is not None:  # Go: what the goroutine linker rule keys on
            attributes["deeptrace.goid"] = conn.req_go[0]
            if conn.req_go[1]:
                attributes["deeptrace.go_parents"] = list(conn.req_go[1])
            if (pid, "go", conn.req_go[0]) in self.concurrent_threads:
                # One goroutine read requests it served at once (an HTTP/2 reader, say).
                attributes["deeptrace.goroutine_concurrent"] = True
        if conn.tls:
            attributes["deeptrace.tls"] = True
            if conn.tls_attrs:
                attributes.update(conn.tls_attrs)
        self.counts[conn.name]["spans"] += 1
        # Positional, in _SPAN_ARGS order (checked at import): with one branch on resp
        # instead of five, 6-7% less CPU per span than 23 keywords (replayed records).
        return Span(req.ts_start, end, protocol, role, pid, tid, rec.comm,
                    self._cmdline(pid), rec.l4, rec.family, rec.local_addr, rec.local_port,
                    rec.remote_addr, rec.remote_port, rec.conn_id, operation, status, error,
                    req.size, resp.size if resp is not None else 0,
                    (req.seq_start, req.seq_end) if req.seq_start is not None else None,
                    response_seq, attributes)

    # -- connection end, timeouts, eviction -----------------------------------------------
    def _close(self, key, rec, spans):
        self.connects.pop(key, None)
        conn = self.conns.pop(key, None)
        if conn is not None:
            self._flush(conn, rec, spans, "connection closed")

    def _flush(self, conn, rec, spans, why):
        if not conn.name or rec is None:
            return
        pending = list(conn.fifo) + list(conn.keyed.values())
        conn.fifo.clear()
        conn.keyed.clear()
        for req in pending:
            self.counts[conn.name]["no_response"] += 1
            spans.append(self._span(conn, req, None, rec, missing=why))

    def _expire(self, now_ns, spans):
        """Requests unanswered for request_timeout become spans without a response."""
        limit = now_ns - int(self.config.request_timeout * 1e9)
        for conn in self.conns.values():
            if not conn.name:
                continue
            late = []
            while conn.fifo and conn.fifo[0].ts_start < limit:
                late.append(conn.fifo.popleft())
            for k in [k for k, m in conn.keyed.items() if m.ts_start < limit]:
                late.append(conn.keyed.pop(k))
            for req in late:
                self.counts[conn.name]["timeouts"] += 1
                spans.append(self._span(conn, req, None, conn.rec, missing="timeout"))

    def _cmdline(self, pid):
        cmd = self._cmdlines.get(pid)
        if cmd is None:
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmd = f.read(4096).replace(b"\0", b" ").strip().decode("utf-8", "replace")
            except OSError:
                cmd = ""
            if len(self._cmdlines) > 10000:
                self._cmdlines.clear()
            self._cmdlines[pid] = cmd
        return cmd

    def stats(self) -> dict:
        return {f"{proto}.{k}": n for proto, c in sorted(self.counts.items())
                for k, n in sorted(c.items())}


@hookimpl
def deeptrace_register_processors(registry):
    registry.add_processor(SpanStage)
