"""PostgreSQL frontend/backend protocol v3 from passively captured bytes.

Hand-written: psycopg and asyncpg speak the protocol as clients over their own socket
(libpq inside psycopg); none can be fed one direction's bytes, resume mid-connection,
step over bytes the capture cut, or say how many bytes a message used. The framing is
simple: a type byte and a 4-byte big-endian length that counts itself.

A request is a simple Query (or FunctionCall), or an extended-protocol group: every
message up to and including Sync. Each is answered by everything the server sends up to
the matching ReadyForQuery; groups may be pipelined before any reply, so replies are
matched first-in-first-out and messages carry no key. The start-up packet, SSL/GSSENC
requests, CancelRequest and the authentication exchange (PasswordMessage, SASL) are
skipped unread.
"""

import re
from collections import deque

from deeptrace_core.l7 import REQ, RESP, Message, ParseError
from deeptrace_plugins.protocols.sql import (QUERY_MAX, StatementsParser, decode, first_keyword,
                                             redact)

FRONTEND = set(b"QPBDECHSXpFdcf")
BACKEND = set(b"RSKZTDCEN123nsItAGHWdcVv")
MAX_LEN = 1 << 30                  # the server refuses messages of 1 GiB or more
SSL_REQUEST, GSSENC_REQUEST, CANCEL_REQUEST = 80877103, 80877104, 80877102
TEXT_PEEK = QUERY_MAX * 4          # body bytes looked at for Query / Parse text
HEAD_PEEK = 512                    # body bytes looked at for any other message we read
PENDING_MAX = 1024
GROUP_TEXTS_MAX = 32               # statement texts kept per extended group (no Sync: bound)
_COUNT = re.compile(r"^(\w+)(?: \d+)? (\d+)$")
RETURNED = {"SELECT", "FETCH", "MOVE"}
AFFECTED = {"INSERT", "UPDATE", "DELETE", "MERGE", "COPY"}


def cstr(b: bytes, i: int):
    """(string, index after its NUL) at b[i]; the string runs to the end if cut."""
    j = b.find(b"\0", i)
    if j < 0:
        return decode(b[i:]), len(b)
    return decode(b[i:j]), j + 1


class _Pending:
    """A request awaiting its ReadyForQuery, and the reply gathered so far."""
    __slots__ = ("msg", "rows", "affected", "err", "texts", "execs", "capped")

    def __init__(self):
        self.msg = None          # the request Message once complete (group: at Sync)
        self.rows = None
        self.affected = None
        self.err = None          # (SQLSTATE, message) of the first ErrorResponse
        self.texts = []          # extended group: statement texts seen (Parse / Execute)
        self.execs = 0
        self.capped = False      # texts reached GROUP_TEXTS_MAX (counted once as an error)


class PostgreSQLParser(StatementsParser):
    protocol = "postgresql"

    def __init__(self, max_statements: int = 4096):
        super().__init__(max_statements)   # statements: prepared statement name -> text
        self.portals = {}                 # portal name -> text (unnamed mostly; capped)
        self.group = None                 # the extended-protocol group not yet Synced
        self.pending = deque()            # requests awaiting ReadyForQuery, oldest first
        self.db = None
        self.ssl_reply = False            # the server's next byte answers SSL/GSSENCRequest
        self.lost = False                 # reply framing lost: skip to ReadyForQuery
        self.started = False              # the reply of pending[0] has begun

    # -- framing ------------------------------------------------------------------------
    def frame(self, side, stream, out) -> bool:
        if side == RESP and self.ssl_reply:
            b = stream.peek(1)
            if not b:
                return self.lose(side, stream, out)
            if b in (b"S", b"G", b"N"):
                self.ssl_reply = False
                self.encrypted = b != b"N"
                stream.consume(1)
                stream.take_span()
                return True
            self.ssl_reply = False
        head = stream.peek(8 if side == REQ else 5)
        untyped = side == REQ and head[:1] == b"\0"
        need = 8 if untyped else 5
        if len(head) < need:
            return self.short_header(side, stream, head, out)
        if untyped:
            kind = None
            size = total = int.from_bytes(head[:4], "big")
            if not 8 <= size <= 10000:
                raise ParseError("postgresql: implausible start-up packet")
        else:
            kind, size = head[0], int.from_bytes(head[1:5], "big")
            total = 1 + size
            if kind not in (FRONTEND if side == REQ else BACKEND) or not 4 <= size < MAX_LEN:
                if side == RESP and self.pending and self.started:
                    return self.lose(side, stream, out)
                raise ParseError(f"postgresql: not a message start {head[:1]!r}")
        want = self._want(side, kind, total)
        data = stream.peek(want)
        if len(data) < want and len(stream) <= len(data):
            return False                          # the rest has not arrived yet
        if side == REQ:
            msg, keep = self._frontend(kind, size, data, head)
        else:
            msg, keep = self._backend(kind, data)
        return self.take(side, stream, total, msg, keep)

    @staticmethod
    def _want(side, kind, total):
        """How many bytes of a message to look at (the password message: its header)."""
        if side == REQ:
            if kind is None or kind in b"BDECF":
                return min(total, HEAD_PEEK)
            if kind in b"QP":
                return min(total, TEXT_PEEK)
        elif kind in b"EC":
            return min(total, HEAD_PEEK)
        return 5

    def lost_framing(self, side):
        """A header fell in uncaptured bytes (or a reply's framing broke): close what is
        open (replies: resync after the next ReadyForQuery or the next request)."""
        if side == REQ:
            if self.group is not None:        # its Sync is in the hole, most likely
                return [self._close_group(incomplete=True)]
            return super().lost_framing(side)
        if self.pending and not self.lost:
            self.lost = True
            self.started = False
            return [self._reply(self.pending.popleft(), incomplete=True)]
        return []

    # -- frontend -----------------------------------------------------------------------
    def _frontend(self, kind, size, data, head):
        """One client message; returns (request Message or None, bytes belong to one)."""
        if kind is None:
            self._startup(data)
            return None, False
        body = data[5:]
        g = self.group
        if kind == ord("Q") or kind == ord("F"):
            req = g if g is not None else self._open()
            self.group = None
            if kind == ord("Q"):
                text, _ = cstr(body, 0)
                req.texts.append(text)
                return self._request(req, first_keyword(text) or "QUERY"), True
            return self._request(req, "FUNCTION_CALL"), True
        if kind == ord("X"):
            msg = Message(True, operation="TERMINATE", expects_response=False,
                          attributes=self._attrs("TERMINATE"))
            return msg, True
        if kind in b"pdcf" or (kind == ord("H") and g is None):
            return None, g is not None        # password/SASL, COPY data, lone Flush
        if g is None:
            g = self._open()
            self.group = g
        if kind == ord("P"):
            name, i = cstr(body, 0)
            text, _ = cstr(body, i)
            self.statements.remember(name, text)
            self._add_text(g, text)
        elif kind == ord("B"):
            portal, i = cstr(body, 0)
            stmt, _ = cstr(body, i)
            if len(self.portals) > 64:
                self.portals.clear()
            self.portals[portal] = self.statements.get(stmt)
        elif kind == ord("E"):
            portal, _ = cstr(body, 0)
            text = self.portals.get(portal)
            g.execs += 1
            if text is not None:
                self._add_text(g, text)
        elif kind == ord("C") and body[:1] == b"S":
            self.statements.pop(cstr(body, 1)[0], None)
        elif kind == ord("S"):
            return self._close_group(), True
        return None, True

    def _add_text(self, g, text):
        """Note a statement text of a group once; a group that never Syncs must not grow
        without bound (nor cost a scan of all its texts per message): past
        GROUP_TEXTS_MAX distinct texts the rest are dropped, counted once as an error."""
        if text in g.texts:
            return
        if len(g.texts) < GROUP_TEXTS_MAX:
            g.texts.append(text)
        elif not g.capped:
            g.capped = True
            self.errors += 1

    def _open(self):
        req = _Pending()
        if not self.pending:
            # Server bytes still buffered came before this request (start-up, a lost
            # reply, async messages): no length read from them may swallow its reply.
            self.lost = self.started = False
            if self.held[RESP] is None:
                self.reset(RESP)
        elif len(self.pending) >= PENDING_MAX:
            self.pending.popleft()
        self.pending.append(req)
        return req

    def _close_group(self, incomplete=False):
        g, self.group = self.group, None
        op = first_keyword(g.texts[0]) if g.texts else ""
        msg = self._request(g, op or ("EXECUTE" if g.execs else "SYNC"))
        if g.execs > 1:
            msg.attributes["db.operation.batch.size"] = g.execs
        if incomplete:
            msg.attributes["deeptrace.incomplete"] = True
        return msg

    def _request(self, req, op):
        attrs = self._attrs(op)
        text = "; ".join(t for t in req.texts if t)
        if text:
            attrs["db.query.text"] = redact(text)
        req.msg = Message(True, operation=op, attributes=attrs)
        return req.msg

    def _attrs(self, op):
        attrs = {"db.system": "postgresql", "db.operation.name": op}
        if self.db:
            attrs["db.namespace"] = self.db
        return attrs

    def _startup(self, data):
        code = int.from_bytes(data[4:8], "big")
        if code in (SSL_REQUEST, GSSENC_REQUEST):
            self.ssl_reply = True
        elif code >> 16 == 3:                 # StartupMessage: user, database, options...
            params = data[8:].split(b"\0")
            kv = dict(zip(params[::2], params[1::2]))
            db = kv.get(b"database") or kv.get(b"user")
            if db:
                self.db = decode(db)

    # -- backend ------------------------------------------------------------------------
    def _backend(self, kind, data):
        """One server message; returns (reply Message or None, bytes belong to one)."""
        if self.lost or not self.pending:
            if kind == ord("Z"):
                self.lost = False
            return None, False                # start-up, auth, async notices, lost reply
        req = self.pending[0]
        body = data[5:]
        if kind == ord("A") and not self.started:
            return None, False                # a notification between replies
        self.started = True
        if kind == ord("E") and req.err is None:
            fields = {}
            i = 0
            while i < len(body) and body[i]:
                value, j = cstr(body, i + 1)
                fields[body[i]] = value
                i = j
            req.err = (fields.get(ord("C"), ""), fields.get(ord("M"), ""))
        elif kind == ord("C"):
            tag, _ = cstr(body, 0)
            m = _COUNT.match(tag)
            if m and m.group(1) in RETURNED:
                req.rows = (req.rows or 0) + int(m.group(2))
            elif m and m.group(1) in AFFECTED:
                req.affected = (req.affected or 0) + int(m.group(2))
        elif kind == ord("Z"):
            self.pending.popleft()
            self.started = False
            return self._reply(req), True
        return None, True

    def _reply(self, req, incomplete=False):
        attrs = {}
        op = req.msg.operation if req.msg is not None else ""
        msg = Message(False, operation=op, attributes=attrs, status="OK")
        if req.err:
            code, text = req.err
            msg.status, msg.error = code or "ERROR", True
            attrs["db.response.status_code"] = code
            attrs["error.message"] = text[:QUERY_MAX // 8]
        elif incomplete:
            msg.status = None
        if req.rows is not None:
            attrs["db.response.returned_rows"] = req.rows
        if req.affected is not None:
            attrs["db.response.affected_rows"] = req.affected
        if incomplete:
            attrs["deeptrace.incomplete"] = True
        return msg
