"""RESP2/RESP3 parser: commands (RESP arrays and inline) and replies of one connection.

The framing is hand-written on purpose. hiredis (the reference C decoder) was evaluated:
it cannot step over bytes the capture did not keep, does not report how many bytes a
reply used (``Reader.len()`` is its buffer size), returns RESP3 push frames (``>``) as
plain lists so a push cannot be told from a reply, rejects ``!`` blob errors and returns
``|`` attributes as replies of their own. Since the framer has to walk every token
anyway and already yields all a span records (type, error prefix, the first elements),
decoding a second time with hiredis would only add cost; the tests use it as an oracle.

Replies pair with commands first-in-first-out, so exactly one reply Message is emitted per
command that gets one: RESP3 pushes, pub/sub messages and MONITOR lines are skipped, and
the N confirmations of ``SUBSCRIBE a b ...`` are merged into one reply.
"""

from collections import deque

from deeptrace_core.l7 import CursorParser, Message, ParseError

MAX_LINE = 64 * 1024       # Redis' own inline limit; a longer "line" is not RESP
MAX_DEPTH = 32
MAX_BULK = 1 << 40
MAX_COUNT = 1 << 32
ARG_BYTES = 64             # bytes of each argument kept for db.query.text
MAX_ARGS = 32              # arguments shown in db.query.text
MAX_SUBS = 10000           # channels remembered per kind (for UNSUBSCRIBE with no args)

CONTAINERS = {b"ACL", b"CLIENT", b"CLUSTER", b"COMMAND", b"CONFIG", b"DEBUG", b"FUNCTION",
              b"LATENCY", b"MEMORY", b"MODULE", b"OBJECT", b"PUBSUB", b"SCRIPT", b"SLOWLOG",
              b"XGROUP", b"XINFO"}
SUBSCRIBE = {b"SUBSCRIBE", b"PSUBSCRIBE", b"SSUBSCRIBE"}
UNSUBSCRIBE = {b"UNSUBSCRIBE", b"PUNSUBSCRIBE", b"SUNSUBSCRIBE"}
CONFIRM = {c.lower() for c in SUBSCRIBE | UNSUBSCRIBE}
PUBSUB_MESSAGES = {b"message", b"pmessage", b"smessage"}
SECRET_CONFIG = {b"REQUIREPASS", b"MASTERAUTH", b"MASTERUSER", b"TLS-KEY-FILE-PASS",
                 b"TLS-CLIENT-KEY-FILE-PASS"}
# Sentinel's secret settings: SENTINEL SET <master> auth-pass <pw>, SENTINEL CONFIG SET
# sentinel-pass <pw>.
SECRET_SENTINEL = {b"AUTH-PASS", b"SENTINEL-PASS"}
SCALARS = frozenset(b"+-:,(#_")
BULKS = frozenset(b"$!=")
AGGREGATES = frozenset(b"*%~>|")


class _State:
    """One direction's position inside a message (RESP is a tree of counted tokens)."""
    __slots__ = ("stack", "started", "top", "scalar", "elems", "nelems", "count", "want",
                 "skip", "finished", "scanned")

    def __init__(self):
        self.reset()

    def reset(self):
        self.stack = []        # [elements left, is_attribute] per open aggregate
        self.started = False
        self.top = None        # type byte of the message's value (an int)
        self.scalar = None     # top-level scalar (bytes)
        self.elems = []        # (value bytes | None, truncated) of the first elements
        self.nelems = 0
        self.count = 0         # the top aggregate's declared size (entries for a map)
        self.want = None       # (length, type) of a bulk whose body comes next
        self.skip = 0          # bytes of a bulk body (and its CRLF) still to step over
        self.finished = False  # the message ends once `skip` is done
        self.scanned = 0       # bytes of an unfinished line searched for its end already


def _int(b: bytes) -> int:
    if len(b) > 20 or not (b.isdigit() or b[:1] == b"-" and b[1:].isdigit()):
        raise ParseError("bad number")
    return int(b)


def _show(value, truncated) -> str:
    if value is None:
        return "(nil)"
    s = value[:ARG_BYTES].decode("utf-8", "replace")
    if not s or any(ch in s for ch in ' "\\\r\n\t'):
        s = '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\r", "\\r") \
            .replace("\n", "\\n").replace("\t", "\\t") + '"'
    if truncated or len(value) > ARG_BYTES:
        s += "..."
    return s


def redact(args: list) -> list:
    """Argument bytes with credentials replaced by b'?' (AUTH, HELLO AUTH, MIGRATE AUTH,
    CONFIG SET of secret settings, ACL SETUSER password rules, Sentinel's auth-pass and
    sentinel-pass)."""
    if not args:
        return args
    cmd = args[0].upper() if args[0] else b""
    out = list(args)
    if cmd == b"AUTH":
        out[1:] = [b"?"] * (len(args) - 1)
    elif cmd in (b"HELLO", b"MIGRATE"):
        for i, a in enumerate(args):
            u = (a or b"").upper()
            if u == b"AUTH":
                out[i + 1:i + 2] = [b"?"] * len(out[i + 1:i + 2])
                if cmd == b"HELLO":
                    out[i + 2:i + 3] = [b"?"] * len(out[i + 2:i + 3])
            elif u == b"AUTH2":
                out[i + 1:i + 3] = [b"?"] * len(out[i + 1:i + 3])
    elif cmd == b"CONFIG" and len(args) > 2 and (args[1] or b"").upper() == b"SET":
        for i in range(2, len(args) - 1, 2):
            if (args[i] or b"").upper() in SECRET_CONFIG:
                out[i + 1] = b"?"
    elif cmd == b"SENTINEL" and len(args) > 2:
        sub = (args[1] or b"").upper()
        if sub == b"SET" or sub == b"CONFIG" and (args[2] or b"").upper() == b"SET":
            for i in range(3, len(args) - 1, 2):     # option/value pairs
                if (args[i] or b"").upper() in SECRET_SENTINEL:
                    out[i + 1] = b"?"
    elif cmd == b"ACL" and len(args) > 2 and (args[1] or b"").upper() == b"SETUSER":
        for i in range(3, len(args)):
            if (args[i] or b"")[:1] in (b">", b"<", b"#", b"!"):
                out[i] = b"?"
    return out


class RedisParser(CursorParser):
    protocol = "redis"

    def __init__(self):
        super().__init__()
        self._st = {"req": _State(), "resp": _State()}
        self.db = None              # from SELECT, for db.namespace
        self.reply_off = False      # CLIENT REPLY OFF / SKIP
        self.skip_next = False
        self.monitor = False
        self.sub_expect = deque(maxlen=1024)   # (kind, n | None) per (UN)SUBSCRIBE sent
        self.merge_kind = None      # confirmations still to fold into the reply sent
        self.merge_left = 0
        self.subs = {b"": set(), b"p": set(), b"s": set()}

    # -- framing ----------------------------------------------------------------------

    def parse(self, side, stream):
        # One-byte writes after an unfinished line: look for its end in place, from where
        # the last search stopped, before copying anything (else each record would copy
        # and search the whole line again: quadratic).
        st = self._st[side]
        if st.scanned:
            n = stream.captured()
            if n == len(stream) and n < MAX_LINE and \
                    stream.find(b"\n", max(0, st.scanned - 1)) < 0:
                st.scanned = n
                return []
            st.scanned = 0
        return super().parse(side, stream)

    def _run(self, req, st, c, out):
        while True:
            if st.skip:                        # a bulk body, captured or not
                c.commit()
                st.skip -= c.s.consume(st.skip)
                if st.skip:
                    return
                c.refresh()
                if st.finished:
                    self._complete(req, st, c, out)
                continue
            if st.want is not None:
                if not self._bulk(st, c):
                    return
                if self._elem_done(st):
                    if st.skip:
                        st.finished = True
                    else:
                        self._complete(req, st, c, out)
                continue
            if c.i >= len(c.buf):
                if not c.hole:
                    return                     # wait for more bytes
                if st.started:
                    self._incomplete(req, st, c, out)
                    continue
                raise ParseError("bytes not captured at a message boundary")
            first = c.buf[c.i]
            if req and not st.started and first != 0x2A:   # '*'
                if not self._inline(st, c, out):
                    return
                continue
            j = c.buf.find(b"\r\n", c.i, c.i + MAX_LINE)
            if j < 0:
                if len(c.buf) - c.i >= MAX_LINE:
                    c.i = len(c.buf)           # drop all of it, not one syscall's bytes
                    raise ParseError("line too long")
                if not c.hole:
                    st.scanned = len(c.buf) - c.i   # the line starts at the read position
                    return
                # The line is cut by a hole: keep what its head says, then resync.
                if not st.started:
                    if first not in SCALARS and first not in BULKS and \
                            first not in AGGREGATES:
                        raise ParseError("not a RESP type byte")
                    st.started, st.top = True, first
                    st.scalar = c.buf[c.i + 1:c.i + 1 + ARG_BYTES]
                self._incomplete(req, st, c, out)
                continue
            line = c.buf[c.i:j]
            c.i = j + 2
            if self._token(req, st, line) and not st.skip:
                self._complete(req, st, c, out)

    def _bulk(self, st, c) -> bool:
        """The body of a bulk string whose header was read: keep its head, skip the rest."""
        n, t = st.want
        avail = len(c.buf) - c.i
        keep = min(n, ARG_BYTES)
        if avail < keep and not c.hole:
            return False
        value = c.buf[c.i:c.i + min(keep, avail)]
        if avail >= n + 2:
            if c.buf[c.i + n:c.i + n + 2] != b"\r\n":
                raise ParseError("bulk not followed by CRLF")
            c.i += n + 2
        else:
            c.commit()
            st.skip = n + 2
        st.want = None
        self._record(st, t, value, len(value) < n)
        return True

    def _token(self, req, st, line) -> bool:
        """One header line; True when it completes the message."""
        if not line:
            raise ParseError("empty line")
        t, rest = line[0], line[1:]
        st.started = True
        if req and (t != 0x24 if st.stack else t != 0x2A):   # '$' inside '*'
            raise ParseError("a command is an array of bulk strings")
        if t in BULKS:
            n = _int(rest)
            if n == -1 and t == 0x24:
                self._record(st, t, None, False)
                return self._elem_done(st)
            if not 0 <= n <= MAX_BULK:
                raise ParseError("bad bulk length")
            st.want = (n, t)
            return False
        if t in AGGREGATES:
            n = _int(rest)
            if n == -1 and t == 0x2A:
                if req and not st.stack:
                    st.reset()                 # an empty command: Redis ignores it
                    return False
                self._record(st, t, None, False)
                return self._elem_done(st)
            if not 0 <= n <= MAX_COUNT:
                raise ParseError("bad aggregate length")
            if req and n == 0:
                st.reset()
                return False
            attr = t == 0x7C                   # '|': an attribute, then the real value
            if not attr:
                if not st.stack:
                    st.count = n
                self._record(st, t, None, False)
            if n == 0:
                return self._elem_done(st, attr)
            if len(st.stack) >= MAX_DEPTH:
                raise ParseError("nested too deep")
            st.stack.append([n * 2 if t in b"%|" else n, attr])
            return False
        if t in SCALARS:
            if t == 0x3A:
                _int(rest)
            elif t == 0x28 and not rest.lstrip(b"+-").isdigit():
                raise ParseError("bad big number")
            elif t == 0x5F and rest:
                raise ParseError("bad null")
            elif t == 0x23 and rest not in (b"t", b"f"):
                raise ParseError("bad boolean")
            self._record(st, t, rest, False)
            return self._elem_done(st)
        raise ParseError("not a RESP type byte")

    def _record(self, st, t, value, truncated):
        if not st.stack:
            st.top, st.scalar = t, value
            if t in AGGREGATES:
                st.scalar = None
        elif len(st.stack) == 1 and not st.stack[0][1]:
            st.nelems += 1
            if len(st.elems) <= MAX_ARGS:
                st.elems.append((value, truncated))

    @staticmethod
    def _elem_done(st, attr=False) -> bool:
        """An element ended; close the aggregates it completes. True: message complete."""
        while st.stack:
            if attr:
                return False                   # attributes do not count as elements
            top = st.stack[-1]
            top[0] -= 1
            if top[0]:
                return False
            st.stack.pop()
            attr = top[1]
        return not attr

    def _inline(self, st, c, out) -> bool:
        first = c.buf[c.i]
        if not (0x61 <= first | 0x20 <= 0x7A or first in b" \t\r\n"):
            raise ParseError("not a command")  # no need to wait for the end of the line
        j = c.buf.find(b"\n", c.i, c.i + MAX_LINE)
        if j < 0:
            if len(c.buf) - c.i >= MAX_LINE:
                c.i = len(c.buf)               # drop all of it, not one syscall's bytes
                raise ParseError("inline command too long")
            if not c.hole:
                st.scanned = len(c.buf) - c.i
                return False
            line, incomplete = c.buf[c.i:], True
        else:
            line, incomplete = c.buf[c.i:j], False
            c.i = j + 1
        args = line.rstrip(b"\r").split()
        if not args:                           # an empty line: Redis ignores it
            c.commit()
            if incomplete:
                c.s.skip_hole()
                c.refresh()
            c.s.take_span()
            return True
        if any(b < 0x20 and b not in (9, 13) or b == 0x7F for b in line) or \
                not args[0][:1].isalpha() or not args[0].replace(b".", b"").replace(
                    b"_", b"").replace(b"-", b"").replace(b"|", b"").isalnum():
            raise ParseError("not an inline command")
        st.started = True
        st.top = 0x2A
        st.elems = [(a[:ARG_BYTES], len(a) > ARG_BYTES) for a in args[:MAX_ARGS + 1]]
        st.nelems = len(args)
        if incomplete:
            self._incomplete(True, st, c, out)
        else:
            self._complete(True, st, c, out)
        return True

    def _incomplete(self, req, st, c, out):
        c.commit()
        c.s.skip_hole()
        self._complete(req, st, c, out, incomplete=True)
        c.refresh()

    def _complete(self, req, st, c, out, incomplete=False):
        c.commit()
        msg = self._request(st) if req else self._reply(st)
        st.reset()
        if msg is None:
            c.s.take_span()                    # not a reply: drop its timing
            return
        if incomplete:
            msg.attributes["deeptrace.incomplete"] = True
        out.append(c.s.stamp(msg))

    # -- meaning ----------------------------------------------------------------------
    def _request(self, st) -> Message:
        args = [v or b"" for v, _ in st.elems]
        name = args[0].upper() if args else b""
        op = name
        if name in CONTAINERS and len(args) > 1 and \
                args[1].replace(b"_", b"").replace(b"-", b"").isalpha():
            op = name + b" " + args[1].upper()
        shown = redact(args)
        text = [name.decode("utf-8", "replace")] + [
            _show(s, st.elems[i][1] and s is args[i])
            for i, s in enumerate(shown[1:MAX_ARGS + 1], 1)]
        if st.nelems > MAX_ARGS + 1:
            text.append("...")
        opname = op.decode("utf-8", "replace") or "?"
        msg = Message(True, operation=opname, attributes={
            "db.system": "redis", "db.operation.name": opname,
            "db.query.text": " ".join(text)})
        if self.db is not None:
            msg.attributes["db.namespace"] = self.db
        nargs = st.nelems - 1
        if name == b"SELECT" and nargs == 1 and args[1].isdigit():
            self.db = args[1].decode()
        elif name in SUBSCRIBE and nargs > 0:
            self.sub_expect.append((name.lower(), nargs))
        elif name in UNSUBSCRIBE:
            self.sub_expect.append((name.lower(), nargs or None))
        elif name == b"MONITOR":
            self.monitor = True
        # CLIENT REPLY OFF|SKIP: the server stays silent (for all commands or the next).
        mode = args[2].upper() if op == b"CLIENT REPLY" and nargs >= 2 else None
        if self.reply_off:
            msg.expects_response = mode == b"ON"
        elif self.skip_next:
            msg.expects_response = self.skip_next = False
        if mode is not None:
            self.reply_off, self.skip_next = mode == b"OFF", mode == b"SKIP"
            msg.expects_response = msg.expects_response and mode == b"ON"
        if name == b"RESET":
            self.reply_off = self.skip_next = False
        return msg

    def _reply(self, st):
        t = st.top
        first = st.elems[0][0] if st.elems else None
        first = first.lower() if isinstance(first, bytes) else None
        in_sub = any(self.subs.values())
        if first in CONFIRM and st.nelems == 3 and (t == 0x3E or t == 0x2A and (
                in_sub or self.sub_expect or self.merge_left)):
            return self._confirmation(first, st)
        if t == 0x3E:
            return None                        # a RESP3 push is never a reply
        if t == 0x2A and in_sub and first in PUBSUB_MESSAGES:
            return None                        # RESP2 pub/sub delivery
        scalar = st.scalar or b""
        if self.monitor and t == 0x2B and scalar[:1].isdigit() and b" [" in scalar[:40]:
            return None                        # a MONITOR feed line
        msg = Message(False, status="OK")
        if t == 0x2D or t == 0x21:             # '-' error, '!' blob error
            prefix = scalar.split(b" ", 1)[0][:32].decode("utf-8", "replace") or "ERR"
            msg.status, msg.error = prefix, True
            msg.attributes["db.response.status_code"] = prefix
        elif t == 0x2B and scalar == b"RESET":
            for s in self.subs.values():
                s.clear()
            self.monitor = False
        elif t in AGGREGATES and st.count:
            msg.attributes["db.response.returned_rows"] = st.count
        return msg

    def _confirmation(self, kind, st):
        fam = kind.replace(b"unsubscribe", b"subscribe")[:-len(b"subscribe")]  # b"", p, s
        subs = self.subs[fam]
        before = len(subs)
        name = st.elems[1][0]
        try:
            count = int(st.elems[2][0] or b"0")
        except ValueError:
            count = 0
        if b"unsubscribe" in kind:
            subs.discard(name)
            if count == 0:
                for f in ((b"s",) if fam == b"s" else (b"", b"p")):
                    self.subs[f].clear()
        elif name is not None and len(subs) < MAX_SUBS:
            subs.add(name)
        if self.merge_left and kind == self.merge_kind:
            self.merge_left -= 1
            return None                        # folded into the reply already sent
        exp_kind, n = self.sub_expect.popleft() if self.sub_expect else (kind, 1)
        if n is None:
            n = max(1, before)
        self.merge_kind, self.merge_left = kind, n - 1
        return Message(False, status="OK")
