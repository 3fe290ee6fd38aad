"""Memcached parser: the text protocol (classic and meta commands) and the binary one.

Hand-written: no maintained library parses memcached passively. Client libraries
(pymemcache, pylibmc) read replies inside their own request loop; none can be fed both
directions of a connection, step over value bytes the capture did not keep, or say how
many bytes a message used.

Text replies pair with commands first-in-first-out; commands with ``noreply`` (and
``quit``) expect none. Binary messages carry an ``opaque`` that the server echoes; the
parser matches each response to the oldest request with that opaque and gives both the
same ``key`` (its own request number, so reused opaques still pair). Quiet commands
(getq, setq, ...) are answered only on a miss / on failure: once a later response shows
the server went past them, the parser emits the response they implicitly got (getq: not
found; setq: stored), so every request still gets exactly one response.
"""

import struct
from collections import OrderedDict, deque

from deeptrace_core.l7 import Cursor, CursorParser, Message, ParseError

MAX_LINE = 64 * 1024
MAX_VALUE = 1 << 32
MAX_PENDING = 4096
SHOW = 256                 # characters of a command line kept in db.query.text

STORAGE = {b"set", b"add", b"replace", b"append", b"prepend", b"cas"}
NOREPLY_OK = STORAGE | {b"delete", b"incr", b"decr", b"touch", b"flush_all", b"verbosity"}
GETS = {b"get": 1, b"gets": 1, b"gat": 2, b"gats": 2}   # command -> index of the first key
META = {b"mg", b"ms", b"md", b"ma", b"mn", b"me"}
ERRORS = {b"ERROR", b"CLIENT_ERROR", b"SERVER_ERROR"}
LISTS = {b"STAT", b"ITEM", b"PREFIX"}    # lines of a multi-line reply ended by END

HEADER = struct.Struct(">BBHBBHIIQ")
OPCODES = {
    0x00: "get", 0x01: "set", 0x02: "add", 0x03: "replace", 0x04: "delete",
    0x05: "increment", 0x06: "decrement", 0x07: "quit", 0x08: "flush", 0x09: "getq",
    0x0A: "noop", 0x0B: "version", 0x0C: "getk", 0x0D: "getkq", 0x0E: "append",
    0x0F: "prepend", 0x10: "stat", 0x11: "setq", 0x12: "addq", 0x13: "replaceq",
    0x14: "deleteq", 0x15: "incrementq", 0x16: "decrementq", 0x17: "quitq", 0x18: "flushq",
    0x19: "appendq", 0x1A: "prependq", 0x1B: "verbosity", 0x1C: "touch", 0x1D: "gat",
    0x1E: "gatq", 0x20: "sasl_list_mechs", 0x21: "sasl_auth", 0x22: "sasl_step",
    0x23: "gatk", 0x24: "gatkq",
}
QUIET_GETS = {0x09, 0x0D, 0x1E, 0x24}                 # no response on a miss
QUIET = QUIET_GETS | {0x11, 0x12, 0x13, 0x14, 0x15, 0x16, 0x17, 0x18, 0x19, 0x1A}
STATUS = {0x00: "OK", 0x01: "NOT_FOUND", 0x02: "EXISTS", 0x03: "E2BIG", 0x04: "EINVAL",
          0x05: "NOT_STORED", 0x06: "DELTA_BADVAL", 0x07: "NOT_MY_VBUCKET",
          0x08: "AUTH_ERROR", 0x09: "AUTH_CONTINUE", 0x20: "AUTH_ERROR",
          0x81: "UNKNOWN_COMMAND", 0x82: "ENOMEM", 0x83: "NOT_SUPPORTED",
          0x84: "EINTERNAL", 0x85: "EBUSY", 0x86: "ETMPFAIL"}


class _Cursor(Cursor):
    __slots__ = ()

    def line(self):
        """The next line (without CR LF) or None if it is not all there yet."""
        j = self.buf.find(b"\n", self.i, self.i + MAX_LINE)
        if j < 0:
            if len(self.buf) - self.i >= MAX_LINE:
                raise ParseError("line too long")
            return None
        line = self.buf[self.i:j]
        self.i = j + 1
        return line[:-1] if line.endswith(b"\r") else line


def _text(line: bytes) -> bool:
    """No control characters (keys may hold any other byte, UTF-8 included)."""
    return not any(b < 0x20 and b != 9 or b == 0x7F for b in line)


def _num(b) -> int:
    if not b.isdigit() or len(b) > 20:
        raise ParseError("bad number")
    return int(b)


class _Side:
    __slots__ = ("msg", "skip", "then", "values", "implied")

    def __init__(self):
        self.reset()

    def reset(self):
        self.msg = None     # the message being read
        self.skip = 0       # data block / body bytes still to step over
        self.then = None    # after the skip: "emit", or None (more lines / parts follow)
        self.values = 0     # VALUE items so far in a retrieval reply
        self.implied = []   # responses quiet requests got implicitly, sent before msg


class MemcachedParser(CursorParser):
    protocol = "memcached"
    cursor_class = _Cursor

    def __init__(self):
        super().__init__()
        self._st = {"req": _Side(), "resp": _Side()}
        self._seq = 0
        self._pending = OrderedDict()   # binary: request number -> (opaque, opcode)
        self._by_opaque = {}            # opaque -> deque of its pending request numbers


    def _run(self, req, st, c, out):
        while True:
            if st.skip:                        # a data block or binary body
                if st.skip <= len(c.buf) - c.i:
                    c.i += st.skip             # all captured: no need to touch the stream
                    st.skip = 0
                else:
                    c.commit()
                    st.skip -= c.s.consume(st.skip)
                    if st.skip:
                        return
                    c.refresh()
                if st.then == "emit":
                    self._emit(st, c, out)
                continue
            if c.i >= len(c.buf):
                if not c.hole:
                    return
                if st.msg is None:
                    raise ParseError("bytes not captured at a message boundary")
                self._cut(req, st, c, out)
                continue
            if st.msg is None and c.buf[c.i] in (0x80, 0x81):
                if not self._binary(req, st, c, out):
                    return
                continue
            start = c.i
            line = c.line()
            if line is None:
                head = c.buf[c.i:c.i + 64]
                if not _text(head.rstrip(b"\r")) or st.msg is None and not head[:1].isalnum():
                    raise ParseError("not a memcached line")  # no use waiting for its end
                if not c.hole:
                    return
                # A hole cuts the line: keep what its head says (incomplete), resync.
                if st.msg is None:
                    st.msg = self._request(head, st, True) if req else self._reply_head(head)
                self._cut(req, st, c, out)
                continue
            if not _text(line) or st.msg is None and not line[:1].isalnum():
                c.i = start
                raise ParseError("not a memcached line")
            if req:
                st.msg = self._request(line, st, False)
                st.then = "emit"
                if not st.skip:
                    self._emit(st, c, out)
            elif self._reply_line(line, st):
                if st.skip:
                    st.then = "emit"
                else:
                    self._emit(st, c, out)

    # -- text -------------------------------------------------------------------------
    def _request(self, line, st, cut) -> Message:
        tok = line.split()
        if not tok:
            raise ParseError("empty command")
        cmd = tok[0]
        if not cmd.replace(b"_", b"").isalpha() or not cmd.islower() or len(cmd) > 32:
            raise ParseError("not a memcached command")
        op = cmd.decode()
        text = line[:SHOW].decode("utf-8", "replace") + ("..." if len(line) > SHOW else "")
        msg = Message(True, operation=op, attributes={
            "db.system": "memcached", "db.operation.name": op, "db.query.text": text})
        if cmd in GETS and len(tok) > GETS[cmd] + 1:
            msg.attributes["db.operation.batch.size"] = len(tok) - GETS[cmd]
        if not cut:
            n = None
            if cmd in STORAGE and len(tok) >= 5:
                n = _num(tok[4])
            elif cmd == b"ms" and len(tok) >= 3 and tok[2].isdigit():
                n = _num(tok[2])
            if n is not None:
                if n > MAX_VALUE:
                    raise ParseError("value too big")
                st.skip = n + 2          # the data block and its CR LF, captured or not
        if cmd in NOREPLY_OK and tok[-1] == b"noreply" or cmd == b"quit":
            msg.expects_response = False
        elif cmd in META and b"q" in tok[2:]:
            # Meta quiet mode hides some replies (mg: misses); which ones cannot be known
            # from the command alone, so such commands are not paired.
            msg.expects_response = False
        return msg

    @staticmethod
    def _reply_head(head) -> Message:
        word = head.split(b" ", 1)[0]
        if word in ERRORS:
            return Message(False, status=word.decode(), error=True,
                           attributes={"db.response.status_code": word.decode()})
        return Message(False, status="OK")

    def _reply_line(self, line, st) -> bool:
        """One line of a reply; True when the reply ends with it (or its data block)."""
        tok = line.split()
        word = tok[0] if tok else b""
        first = st.msg is None
        if first:
            st.msg = Message(False, status="OK")
        msg = st.msg
        if word == b"VALUE" or word == b"VA":
            k = 3 if word == b"VALUE" else 1
            if len(tok) <= k:
                raise ParseError("bad VALUE line")
            st.skip = _num(tok[k]) + 2
            st.values += 1
            if word == b"VA":
                msg.status = "VA"
                return True
            return False
        if word == b"END":
            if first:
                msg.attributes["db.response.returned_rows"] = 0   # a retrieval miss
            return True
        if word in ERRORS:
            msg.status, msg.error = word.decode(), True
            msg.attributes["db.response.status_code"] = msg.status
            return True
        if not first or word in LISTS or word[:1].islower():
            return False                       # a line of a multi-line reply
        if not word.isdigit():                 # a number answers incr/decr
            msg.status = word.decode("ascii", "replace")
            msg.attributes["db.response.status_code"] = msg.status
        return True

    def _cut(self, req, st, c, out):
        """A hole where a line should be: end the message here (incomplete), resync."""
        c.commit()
        n = c.s.skip_hole()
        # A retrieval reply whose last value ran into the hole: 5 uncaptured bytes after
        # it can only be its "END\r\n".
        if req or not st.values or n != 5 or st.msg.error:
            st.msg.attributes["deeptrace.incomplete"] = True
        self._emit(st, c, out)
        c.refresh()

    def _emit(self, st, c, out):
        c.commit()
        msg = c.s.stamp(st.msg)
        if not msg.is_request and st.values and msg.status == "OK":
            msg.attributes["db.response.returned_rows"] = st.values
        for m in st.implied:
            m.ts_start, m.ts_end = msg.ts_start, msg.ts_end
            out.append(m)
        st.reset()
        out.append(msg)

    # -- binary -----------------------------------------------------------------------
    def _binary(self, req, st, c, out) -> bool:
        hdr = c.buf[c.i:c.i + 24]
        if len(hdr) < 24:
            if c.hole:
                raise ParseError("binary header not captured")
            return False
        magic, opcode, keylen, extlen, dtype, status, bodylen, opaque, _ = HEADER.unpack(hdr)
        if magic != (0x80 if req else 0x81) or dtype != 0 or extlen + keylen > bodylen:
            raise ParseError("not a memcached binary header")
        if len(c.buf) - c.i < 24 + extlen + keylen and not c.hole:
            return False                       # wait for the key (the value may be skipped)
        key = c.buf[c.i + 24 + extlen:c.i + 24 + extlen + keylen]
        op = OPCODES.get(opcode, f"0x{opcode:02x}")
        c.i += 24
        st.skip, st.then = bodylen, "emit"
        if req:
            self._seq += 1
            text = op + (" " + key[:SHOW].decode("utf-8", "replace") if key else "")
            st.msg = Message(True, operation=op, key=self._seq, attributes={
                "db.system": "memcached", "db.operation.name": op, "db.query.text": text})
            if opcode == 0x17:                 # quitq: the server just closes
                st.msg.expects_response = False
            else:
                self._pending[self._seq] = (opaque, opcode)
                self._by_opaque.setdefault(opaque, deque()).append(self._seq)
                if len(self._pending) > MAX_PENDING:
                    self._pop_oldest()
        elif opcode == 0x10 and keylen:
            # One response per statistic, all for one request; the last has no key. Their
            # bytes add up into that last one's timing and size.
            st.then = None
        else:
            st.msg = self._response(opaque, status, st)
        if not st.skip:
            if st.then == "emit":
                self._emit(st, c, out)
            st.reset()
        return True

    def _response(self, opaque, status, st) -> Message:
        name = STATUS.get(status, f"0x{status:04x}")
        # Not found / exists / not stored are answers, not failures (as in the text protocol).
        msg = Message(False, status=name, error=status not in (0, 1, 2, 5),
                      key=("orphan", opaque),
                      attributes={"db.response.status_code": name})
        seqs = self._by_opaque.get(opaque)
        if not seqs:
            return msg
        match = seqs[0]                 # the oldest pending request with this opaque
        msg.key = match
        # Responses come in request order: quiet requests sent before this one that got
        # no response of their own got the quiet answer (getq: a miss; setq: success).
        # Each pending request is popped once: O(1) per request, amortised.
        while self._pending:
            seq, opcode = self._pop_oldest()
            if seq == match:
                break
            if opcode in QUIET:
                miss = opcode in QUIET_GETS
                status = "NOT_FOUND" if miss else "OK"
                st.implied.append(Message(False, status=status, error=False, key=seq,
                                          attributes={"db.response.status_code": status,
                                                      "deeptrace.implied": True}))
        return msg

    def _pop_oldest(self):
        """Forget the oldest pending binary request: (its number, its opcode)."""
        seq, (opaque, opcode) = self._pending.popitem(last=False)
        seqs = self._by_opaque[opaque]
        seqs.popleft()                  # requests leave in order: it is the oldest
        if not seqs:
            del self._by_opaque[opaque]
        return seq, opcode
