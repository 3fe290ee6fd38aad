"""MySQL / MariaDB client-server protocol (command phase) from passively captured bytes.

Hand-written: no maintained library parses this protocol passively. PyMySQL and
mysql-connector are clients that drive their own socket; they cannot start mid-connection,
step over bytes the capture cut, or say how many bytes a packet used. The framing itself
is simple: 3-byte little-endian payload length, 1-byte sequence id, payload.

Requests are the client's sequence-0 packets (commands); every other client packet is the
handshake, authentication or LOCAL INFILE data and is skipped unread. Responses are
assembled per command (OK, ERR, result sets over many packets, prepare-OK with its
definitions) and emitted once complete. The protocol has no pipelining in practice, so
pairing is first-in-first-out and messages carry no key.
"""

import re
from collections import deque

from deeptrace_core.l7 import REQ, RESP, Message, ParseError
from deeptrace_plugins.protocols.sql import (QUERY_MAX, StatementsParser, decode, first_keyword,
                                             redact)

COMMANDS = {
    0x00: "SLEEP", 0x01: "QUIT", 0x02: "INIT_DB", 0x03: "QUERY", 0x04: "FIELD_LIST",
    0x05: "CREATE_DB", 0x06: "DROP_DB", 0x07: "REFRESH", 0x08: "SHUTDOWN",
    0x09: "STATISTICS", 0x0a: "PROCESS_INFO", 0x0b: "CONNECT", 0x0c: "PROCESS_KILL",
    0x0d: "DEBUG", 0x0e: "PING", 0x0f: "TIME", 0x10: "DELAYED_INSERT", 0x11: "CHANGE_USER",
    0x12: "BINLOG_DUMP", 0x13: "TABLE_DUMP", 0x14: "CONNECT_OUT", 0x15: "REGISTER_SLAVE",
    0x16: "STMT_PREPARE", 0x17: "STMT_EXECUTE", 0x18: "STMT_SEND_LONG_DATA",
    0x19: "STMT_CLOSE", 0x1a: "STMT_RESET", 0x1b: "SET_OPTION", 0x1c: "STMT_FETCH",
    0x1d: "DAEMON", 0x1e: "BINLOG_DUMP_GTID", 0x1f: "RESET_CONNECTION",
    0xfa: "STMT_BULK_EXECUTE",  # MariaDB
}
COM_QUERY, COM_STMT_PREPARE, COM_STMT_EXECUTE = 0x03, 0x16, 0x17
# No reply at all (binlog dumps reply with an endless event stream: nothing to pair).
NO_RESPONSE = {0x01, 0x12, 0x18, 0x19, 0x1e}
# How the reply of each command is shaped; everything else is one OK/ERR/EOF packet.
SHAPE = {0x03: "result", 0x17: "result", 0xfa: "result", 0x16: "prepare",
         0x04: "fields", 0x1c: "rows", 0x09: "string", 0x11: "auth"}

MAX_PAYLOAD = 0xffffff          # a packet this long continues in the next one
MORE_RESULTS = 0x0008           # SERVER_MORE_RESULTS_EXISTS status flag
CURSOR_EXISTS = 0x0040          # SERVER_STATUS_CURSOR_EXISTS status flag
CLIENT_SSL, CLIENT_PROTOCOL_41 = 0x0800, 0x0200
CLIENT_DEPRECATE_EOF = 0x01000000
TEXT_PEEK = QUERY_MAX * 4       # payload bytes looked at for statement text (utf-8)
HEAD_PEEK = 512                 # payload bytes looked at for any other packet
PENDING_MAX = 1024
_USE = re.compile(r"\s*USE\s+[`\"]?([^`\"\s;]+)", re.I)


def lenenc(b: bytes, i: int):
    """(value, next index) of a length-encoded integer at b[i]; (None, i) if cut."""
    if i >= len(b):
        return None, i
    c = b[i]
    size = {0xfc: 2, 0xfd: 3, 0xfe: 8}.get(c, 0)
    if c < 0xfb:
        return c, i + 1
    if not size or i + 1 + size > len(b):
        return None, i
    return int.from_bytes(b[i + 1:i + 1 + size], "little"), i + 1 + size


def ok_status(p: bytes):
    """(affected rows, status flags) of an OK packet (0x00 or 0xfe header); None if cut."""
    affected, i = lenenc(p, 1)
    _, i = lenenc(p, i)
    if affected is None or i + 2 > len(p):
        return affected, 0
    return affected, int.from_bytes(p[i:i + 2], "little")


class _Reply:
    """A response being assembled over several packets."""
    __slots__ = ("req", "shape", "state", "left", "rows", "affected", "err", "next")

    def __init__(self, req: Message, shape: str):
        self.req, self.shape = req, shape
        self.state = "rows" if shape in ("rows", "fields") else "first"
        self.left = 0            # definition packets still to come
        self.rows = None
        self.affected = None
        self.err = None          # (code, sqlstate, message)
        self.next = None         # prepare-OK: the column count, read after the params


class MySQLParser(StatementsParser):
    protocol = "mysql"

    def __init__(self, max_statements: int = 4096):
        super().__init__(max_statements)   # statements: prepared statement id -> text
        self.pending = deque()            # requests whose reply has not started
        self.reply = None                 # the reply being assembled
        self.db = None                    # current schema (handshake, INIT_DB, USE)
        self.server_caps = None
        self.deprecate_eof = None         # None: unknown (the handshake was not seen)
        self.lost = False                 # reply framing lost: skip replies until a request
        self.cont = {REQ: False, RESP: False}   # next packet continues a 16 MiB payload

    # -- framing ------------------------------------------------------------------------
    def frame(self, side, stream, out) -> bool:
        head = stream.peek(4)
        if len(head) < 4:
            return self.short_header(side, stream, head, out)
        size = int.from_bytes(head[:3], "little")
        want = TEXT_PEEK if side == REQ else HEAD_PEEK
        data = stream.peek(4 + min(size, want))
        if len(data) < 4 + min(size, want) and len(stream) <= len(data):
            return False                          # the rest has not arrived yet
        handler = self._request if side == REQ else self._response
        msg, keep = handler(head[3], size, data[4:], self.cont[side], stream)
        self.cont[side] = size == MAX_PAYLOAD
        return self.take(side, stream, 4 + size, msg, keep)

    def lost_framing(self, side):
        """A packet header fell in uncaptured bytes: close what is open (replies: resync
        at the next request's reply)."""
        self.cont[side] = False
        if side == REQ:
            return super().lost_framing(side)
        self.lost = True
        out = []
        if self.reply is not None:
            out.append(self._finish(self.reply, incomplete=True))
            self.reply = None
        while self.pending:                   # their replies went by unseen too
            out.append(self._finish(_Reply(self.pending.popleft()[0], ""), incomplete=True))
        return out

    def reset(self, side):
        super().reset(side)
        self.cont[side] = False

    # -- client side --------------------------------------------------------------------
    def _request(self, seq, size, p, cont, stream):
        if cont or seq != 0 or not p:
            if seq == 1 and not cont and len(p) >= 32:
                self._handshake_response(size, p)
            return None, False
        cmd = p[0]
        name = COMMANDS.get(cmd)
        if name is None:
            raise ParseError(f"mysql: unknown command 0x{cmd:02x}")
        attrs = {"db.system": "mysql", "db.mysql.command": name}
        op = name
        text = None
        if cmd in (COM_QUERY, COM_STMT_PREPARE):
            body = p[1:]
            if cmd == COM_QUERY and body[:2] == b"\x00\x01":
                body = body[2:]               # empty query attributes (MySQL 8 clients)
            text = decode(body)
            op = first_keyword(text) or name
            m = _USE.match(text) if op == "USE" else None
            if m:
                self.db = m.group(1)
        elif cmd in (COM_STMT_EXECUTE, 0xfa, 0x18, 0x19, 0x1a, 0x1c) and len(p) >= 5:
            sid = int.from_bytes(p[1:5], "little")
            attrs["db.mysql.statement_id"] = sid
            text = self.statements.get(sid)
            if cmd == 0x19:
                self.statements.pop(sid, None)
            elif text is not None:
                self.statements.move_to_end(sid)
                if cmd in (COM_STMT_EXECUTE, 0xfa):
                    op = first_keyword(text) or name
        elif cmd == 0x02:
            self.db = decode(p[1:])
        if text is not None:
            attrs["db.query.text"] = redact(text)
        if self.db:
            attrs["db.namespace"] = self.db
        attrs["db.operation.name"] = op
        msg = Message(True, operation=op, attributes=attrs,
                      expects_response=cmd not in NO_RESPONSE)
        if msg.expects_response:
            if len(self.pending) >= PENDING_MAX:
                self.pending.popleft()
            self.pending.append((msg, cmd, text))
            if self.reply is None and len(self.pending) == 1:
                self._fresh_replies()
        return msg, True

    def _fresh_replies(self):
        """The first request awaiting a reply: server bytes still buffered came before it
        (the handshake, a lost reply, a reply to a request never seen) and no length read
        from them may swallow the reply to come."""
        self.lost = False
        if self.held[RESP] is None:
            self.reset(RESP)

    def _handshake_response(self, size, p):
        """The client's HandshakeResponse41: capabilities and schema, never credentials."""
        caps = int.from_bytes(p[:4], "little")
        if not caps & CLIENT_PROTOCOL_41:
            return
        if size == 32 and caps & CLIENT_SSL:
            self.encrypted = True                   # an SSLRequest: TLS follows
            return
        if self.server_caps is not None:
            self.deprecate_eof = bool(caps & self.server_caps & CLIENT_DEPRECATE_EOF)
        if not caps & 0x8:                    # CLIENT_CONNECT_WITH_DB
            return
        i = p.find(b"\0", 32)
        if i < 0:
            return
        i += 1
        if caps & 0x200000:                   # CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA
            n, i = lenenc(p, i)
        elif caps & 0x8000:                   # CLIENT_SECURE_CONNECTION
            n, i = (p[i], i + 1) if i < len(p) else (None, i)
        else:
            j = p.find(b"\0", i)
            n = None if j < 0 else j - i + 1
        if n is None:
            return
        j = p.find(b"\0", i + n)
        if j > i + n:
            self.db = decode(p[i + n:j])

    # -- server side --------------------------------------------------------------------
    def _response(self, seq, size, p, cont, stream):
        """One server packet; returns (completed reply or None, packet belongs to it)."""
        r = self.reply
        if cont:
            return None, r is not None
        if r is None:
            if seq == 0 and p[:1] == b"\x0a":
                self._greeting(p)
            if self.lost or not self.pending or seq != 1:
                return None, False            # handshake, or a reply we did not wait for
            req, cmd, text = self.pending.popleft()
            r = self.reply = _Reply(req, SHAPE.get(cmd, "simple"))
            r.next = text
        if self._step(r, size, p, len(stream) > 4 + size):
            self.reply = None
            return self._finish(r), True
        return None, True

    def _greeting(self, p):
        i = p.find(b"\0", 1)
        if i < 0 or i + 16 > len(p):
            return
        caps = int.from_bytes(p[i + 14:i + 16], "little")
        if i + 21 <= len(p):
            caps |= int.from_bytes(p[i + 19:i + 21], "little") << 16
        self.server_caps = caps

    def _step(self, r, size, p, more) -> bool:
        """Advance the reply by one packet; True when it is complete. `more`: bytes beyond
        this packet have already arrived."""
        b0 = p[0] if p else None
        eof = b0 == 0xfe and size == 5                    # legacy EOF packet
        terminator = b0 == 0xfe and size < MAX_PAYLOAD    # EOF, or OK with 0xfe header
        if b0 == 0xff:
            if size >= 3 and p[1:3] == b"\xff\xff":
                return False                  # MariaDB progress report, not an error
            r.err = self._err(p)
            return True
        state = r.state
        if state == "first":
            if r.shape == "string":
                return True
            if r.shape == "auth":
                return b0 == 0x00             # auth switch / more data packets continue
            if r.shape == "prepare":
                if b0 != 0x00 or len(p) < 9:
                    return True
                sid = int.from_bytes(p[1:5], "little")
                if r.next is not None:
                    self.statements.remember(sid, r.next)
                r.req.attributes["db.mysql.statement_id"] = sid
                r.next = int.from_bytes(p[5:7], "little")           # columns
                params = int.from_bytes(p[7:9], "little")
                if params:
                    r.state, r.left = "pdefs", params
                    return False
                return self._columns(r)
            if b0 == 0x00 and (size >= 7 or r.shape == "simple"):
                affected, status = ok_status(p)
                if affected is not None and r.shape == "result":
                    r.affected = (r.affected or 0) + affected
                return r.shape == "simple" or not status & MORE_RESULTS
            if r.shape == "simple":
                return True                   # EOF (SET_OPTION, DEBUG) or anything else
            if b0 == 0xfb:                    # LOCAL INFILE: the client sends the file
                r.state = "infile"
                return False
            cols, _ = lenenc(p, 0)
            if not cols or terminator:
                return True                   # not a result set header: give up on it
            r.state, r.left = "defs", cols
            r.rows = r.rows or 0
            return False
        if state == "infile":
            if b0 == 0x00:
                affected, status = ok_status(p)
                r.affected = affected
                if status & MORE_RESULTS:
                    r.state = "first"
                    return False
            return True
        if state in ("defs", "pdefs", "cdefs"):
            r.left -= 1
            if r.left > 0:
                return False
            if state == "defs":
                r.state = "eof?"              # an EOF follows unless CLIENT_DEPRECATE_EOF
                return False
            # prepare-OK definitions: whether an EOF follows is known from the handshake
            # or an earlier reply; if not, wait for it only when more bytes are already
            # there or more definitions must come. A late EOF (sequence id > 1) is then
            # skipped as not the first packet of a reply.
            if self.deprecate_eof is False or (self.deprecate_eof is None and
                                               (more or (state == "pdefs" and r.next))):
                r.state = "peof" if state == "pdefs" else "ceof"
                return False
            return self._columns(r) if state == "pdefs" else True
        if state in ("peof", "ceof"):
            if eof:
                self.deprecate_eof = False
                return self._columns(r) if state == "peof" else True
            if state == "ceof":
                return True
            r.state = "cdefs"                 # no EOF: this is the first column definition
            r.left = r.next
            r.next = 0
            return self._step(r, size, p, more)
        if state == "eof?":
            r.state = "rows"
            if eof:
                self.deprecate_eof = False
                # STMT_EXECUTE opening a cursor: no rows follow (STMT_FETCH reads them)
                return len(p) >= 5 and bool(p[3] & CURSOR_EXISTS)
        # rows (also FIELD_LIST definitions and STMT_FETCH rows)
        if terminator:
            if eof:
                status = int.from_bytes(p[3:5], "little") if len(p) >= 5 else 0
            else:
                self.deprecate_eof = True
                status = ok_status(p)[1]
            if r.shape == "result" and status & MORE_RESULTS:
                r.state = "first"
                return False
            return True
        if r.shape != "fields":
            r.rows = (r.rows or 0) + 1
        return False

    @staticmethod
    def _columns(r) -> bool:
        """Prepare-OK: after the parameters, the column definitions (if any)."""
        cols, r.next = r.next, 0
        if cols:
            r.state, r.left = "cdefs", cols
            return False
        return True

    @staticmethod
    def _err(p):
        code = int.from_bytes(p[1:3], "little") if len(p) >= 3 else 0
        if p[3:4] == b"#":
            return code, decode(p[4:9]), decode(p[9:])
        return code, None, decode(p[3:])

    def _finish(self, r, incomplete=False):
        attrs = {}
        msg = Message(False, attributes=attrs, operation=r.req.operation, status="OK")
        if r.err:
            code, state, text = r.err
            msg.status, msg.error = str(code), True
            attrs["db.response.status_code"] = str(code)
            if state:
                attrs["db.mysql.sqlstate"] = state
            attrs["error.message"] = text[:QUERY_MAX // 8]
        if r.rows is not None:
            attrs["db.response.returned_rows"] = r.rows
        if r.affected is not None:
            attrs["db.response.affected_rows"] = r.affected
        if incomplete:
            msg.status = None if not r.err else msg.status
            attrs["deeptrace.incomplete"] = True
        return msg
