"""HTTP/2 (and gRPC) parser: frames over the Stream, HPACK per direction, many streams.

Framing is done here (a 9-byte header then ``length`` bytes), not by the ``h2`` state
machine: the capture keeps only a prefix of each syscall, so DATA payloads must be
skipped with ``Stream.consume`` over holes, and a connection whose start was missed
must be followed from the middle, which a protocol state machine refuses to do. Header
blocks are decoded with the ``hpack`` library, one ``Decoder`` per direction.

HPACK safety when bytes were missed (connection start missed, or a header block cut by
the capture): the decoder is replaced by an empty one. Every entry it then holds was
added by a block we did see, and they are the newest entries of the real table, at the
same indices; a reference to anything older is beyond our table and fails with
InvalidTableIndex. So decoding either succeeds with the right headers or fails, never
misparses; a failure resets the decoder again (the rest of that block may have added
entries we did not). Undecodable header blocks give messages with a placeholder
operation, keyed by stream id like the rest, so pairing still works.

Messages: a request is a client stream's HEADERS (+DATA) up to END_STREAM, the response
the server's HEADERS (+DATA, trailers) up to END_STREAM or RST_STREAM. Both carry
``key`` = stream id. A request not ended by the time its response ends (or is reset)
is emitted just before it, marked incomplete. A client RST_STREAM ends the call: the
parser then emits the response itself (status CANCELLED / the reset code).
"""

from collections import OrderedDict, deque

import hpack

from deeptrace_core.l7 import REQ, RESP, Message, ParseError, Parser
from deeptrace_plugins.protocols.http_attributes import (HttpErrorRule, header_attributes, number,
                                                         request_attributes, server_attributes)

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
(DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY,
 WINDOW_UPDATE, CONTINUATION) = range(10)
END_STREAM = ACK = 0x1
END_HEADERS, PADDED, PRIORITY_FLAG = 0x4, 0x8, 0x20
FLAGS = {DATA: 0x09, HEADERS: 0x2D, SETTINGS: 0x01, PUSH_PROMISE: 0x0C, PING: 0x01,
         CONTINUATION: 0x04}
DEFAULT_FRAME, MAX_FRAME = 16384, (1 << 24) - 1
MAX_STREAMS = 1024          # open streams tracked per connection
MAX_HEADER_BYTES = 1 << 20  # decoded header bytes kept for the open streams of a connection
MAX_CLOSED = 4096           # recently closed stream ids remembered (late frames ignored)
MAX_BLOCK = 256 * 1024      # header block bytes buffered across CONTINUATIONs
MAX_TABLE = 1 << 20         # largest HPACK table we agree to keep
MISSED_TABLE = 65536        # our table size when the real one's is unknown
PLACEHOLDER_MISSED = "HTTP/2 (connection start missed)"
PLACEHOLDER_LOST = "HTTP/2 (headers not captured)"
RST_NAMES = ("NO_ERROR", "PROTOCOL_ERROR", "INTERNAL_ERROR", "FLOW_CONTROL_ERROR",
             "SETTINGS_TIMEOUT", "STREAM_CLOSED", "FRAME_SIZE_ERROR", "REFUSED_STREAM",
             "CANCEL", "COMPRESSION_ERROR", "CONNECT_ERROR", "ENHANCE_YOUR_CALM",
             "INADEQUATE_SECURITY", "HTTP_1_1_REQUIRED")
# gRPC status for a stream reset without grpc-status, and for a non-200 HTTP status
# (grpc/doc/PROTOCOL-HTTP2.md, http-grpc-status-mapping.md).
GRPC_OF_RST = {7: "14", 8: "1", 11: "8", 12: "7"}           # default INTERNAL (13)
GRPC_OF_HTTP = {400: "13", 401: "16", 403: "7", 404: "12", 429: "14", 502: "14",
                503: "14", 504: "14"}                         # default UNKNOWN (2)


class _Half:
    """One direction of one stream: its headers, trailers, and the bytes it took."""
    __slots__ = ("headers", "trailers", "lost", "ended", "emitted", "reset", "body",
                 "ts_start", "ts_end", "seq_start", "seq_end", "size")

    def __init__(self):
        self.headers = None      # first (non-1xx) header block; {} if undecodable
        self.trailers = {}
        self.lost = False        # a header block could not be decoded
        self.ended = False
        self.emitted = False
        self.reset = None        # RST_STREAM error code
        self.body = 0            # DATA payload bytes
        self.ts_start = self.ts_end = self.size = 0
        self.seq_start = self.seq_end = None

    def add(self, span):
        ts_s, ts_e, seq_s, seq_e, size = span
        if not size:
            return
        if not self.size:
            self.ts_start, self.seq_start = ts_s, seq_s
        self.ts_end = ts_e
        if seq_e is not None:
            self.seq_end = seq_e
        self.size += size


class _H2Stream:
    __slots__ = ("sid", "req", "resp", "grpc", "hbytes")

    def __init__(self, sid):
        self.sid = sid
        self.req, self.resp = _Half(), _Half()
        self.grpc = False
        self.hbytes = 0          # decoded header bytes it holds (counted in the budget)


class _Block:
    """A header block being collected (HEADERS or PUSH_PROMISE, then CONTINUATIONs)."""
    __slots__ = ("sid", "end_stream", "frag", "lost", "push")

    def __init__(self, sid, end_stream, frag, push):
        self.sid, self.end_stream, self.push = sid, end_stream, push
        self.lost = frag is None
        self.frag = bytearray(frag or b"")


def _fragment(ftype, flags, payload):
    """The header block fragment of a HEADERS/PUSH_PROMISE/CONTINUATION payload."""
    if payload is None:
        return None
    off, pad = 0, 0
    if ftype != CONTINUATION and flags & PADDED:
        if not payload:
            return None
        pad, off = payload[0], 1
    if ftype == HEADERS and flags & PRIORITY_FLAG:
        off += 5
    elif ftype == PUSH_PROMISE:
        off += 4                 # promised stream id
    if off + pad > len(payload):
        return None
    return payload[off:len(payload) - pad]


class Http2Parser(HttpErrorRule, Parser):
    protocol = "http2"

    def __init__(self):
        super().__init__()
        self.decoders = {REQ: hpack.Decoder(), RESP: hpack.Decoder()}
        self.decoded = {REQ: 0, RESP: 0}             # header blocks decoded per side
        self.block = {REQ: None, RESP: None}
        self.skip = {REQ: None, RESP: None}          # [left, stream, frame] of a frame
        self.resync = {REQ: True, RESP: True}        # next frame header checked strictly
        self.frame_limit = {REQ: DEFAULT_FRAME, RESP: DEFAULT_FRAME}  # known max sizes
        self.h2streams = OrderedDict()
        self.closed = deque(maxlen=MAX_CLOSED)
        self.closed_set = set()
        self.preface = None        # REQ side: None until checked, then True/False
        self.first_resp = True
        self.missed_start = False  # the connection's start was not seen
        self.degraded = False      # bytes were missed: streams may be open unseen
        self.hpack_failures = 0    # header blocks that could not be decoded
        self.placeholders = 0      # messages emitted with a placeholder operation
        self.header_bytes = 0      # decoded header bytes held by open streams (budgeted)

    # -- framing -------------------------------------------------------------------------
    def parse(self, side, stream):
        try:
            return self._parse(side, stream)
        except ParseError:
            # Bytes of this side are being dropped: its framing must be found again and
            # the header blocks in them may have changed the HPACK table.
            self.resync[side] = True
            self.skip[side] = None
            self.block[side] = None
            self._taint(side)
            raise

    def _parse(self, side, stream):
        if self.skip[side]:
            return self._skip(side, stream)
        if side == REQ and self.preface is None:
            if not self._preface(stream):
                return []
        hdr = stream.need(9)
        if hdr is None:
            return []
        length = int.from_bytes(hdr[:3], "big")
        ftype, flags = hdr[3], hdr[4]
        sid = int.from_bytes(hdr[5:9], "big")
        if not self._plausible(side, length, ftype, flags, sid, self.resync[side]):
            raise ParseError(f"implausible frame header {hdr.hex()}")
        blk = self.block[side]
        if (blk is not None) != (ftype == CONTINUATION) or (blk and blk.sid != sid):
            raise ParseError("header block interrupted")
        self.resync[side] = False
        if side == RESP and self.first_resp:
            self.first_resp = False
            if ftype != SETTINGS or flags & ACK:
                self._set_missed()     # a server's first frame is always its SETTINGS
        payload = None
        if ftype in (HEADERS, CONTINUATION, PUSH_PROMISE, SETTINGS, RST_STREAM):
            try:
                # A frame bigger than we buffer is skipped, as if the capture had cut it.
                data = stream.need(9 + length) if length <= MAX_BLOCK else False
            except ParseError:
                data = False           # the capture cut the payload: skip it
            if data is None:
                return []              # the whole frame has not arrived yet
            if data:
                payload = data[9:]
        st = self._target(side, ftype, sid)
        self._take(side, stream, 9, st)
        self.skip[side] = [length, st, (ftype, flags, sid, length, payload)]
        return self._skip(side, stream)

    def _skip(self, side, stream):
        job = self.skip[side]
        job[0] -= self._take(side, stream, job[0], job[1])
        if job[0]:
            return []
        self.skip[side] = None
        return self._frame(side, job[1], *job[2])

    def _take(self, side, stream, n, st):
        got = stream.consume(n)
        span = stream.take_span()
        if st is not None:
            (st.req if side == REQ else st.resp).add(span)
        return got

    def _preface(self, stream):
        """Consume the client preface; False while waiting for the rest of it."""
        data = stream.peek(24)
        if data == PREFACE:
            stream.consume(24)
            stream.take_span()
            self.preface = True
            return True
        if data and len(data) < 24 and PREFACE.startswith(data):
            try:
                if stream.need(24) is None:
                    return False
            except ParseError:
                pass
        self.preface = False     # frames (or garbage) first: we attached mid-connection
        self._set_missed()
        return True

    def _plausible(self, side, length, ftype, flags, sid, strict):
        if sid >> 31:
            return False
        limit = MAX_FRAME if self.missed_start and not strict else self.frame_limit[side]
        if length > limit:
            return False
        if ftype in (DATA, HEADERS, PRIORITY, RST_STREAM, PUSH_PROMISE, CONTINUATION):
            if not sid:
                return False
        elif ftype in (SETTINGS, PING, GOAWAY) and sid:
            return False
        if ftype == SETTINGS and (length % 6 or (flags & ACK and length)):
            return False
        if (ftype == PING and length != 8) or (ftype == GOAWAY and length < 8) or \
                (ftype == PRIORITY and length != 5) or \
                (ftype in (RST_STREAM, WINDOW_UPDATE) and length != 4) or \
                (ftype == PUSH_PROMISE and side == REQ):
            return False
        if strict:  # a resync point: only well-known frames, no flags they do not define
            return ftype <= WINDOW_UPDATE and not flags & ~FLAGS.get(ftype, 0)
        return True

    # -- frames --------------------------------------------------------------------------
    def _frame(self, side, st, ftype, flags, sid, length, payload):
        if ftype == DATA:
            if st is not None:
                (st.req if side == REQ else st.resp).body += length
                if flags & END_STREAM:
                    return self._end(side, st)
            return []
        if ftype in (HEADERS, PUSH_PROMISE):
            self.block[side] = _Block(sid, flags & END_STREAM, _fragment(ftype, flags, payload),
                                      ftype == PUSH_PROMISE)
        elif ftype == CONTINUATION:
            frag = _fragment(ftype, flags, payload)
            blk = self.block[side]
            if frag is None or len(blk.frag) + len(frag) > MAX_BLOCK:
                blk.lost = True
                blk.frag.clear()
            elif not blk.lost:
                blk.frag += frag
        elif ftype == SETTINGS:
            if payload is not None and not flags & ACK:
                self._settings(side, payload)
            return []
        elif ftype == RST_STREAM:
            if st is None:
                return []
            code = int.from_bytes(payload, "big") if payload is not None else -1
            return self._reset(side, st, code)
        else:
            return []
        if flags & END_HEADERS:
            return self._block_done(side)
        return []

    def _settings(self, side, payload):
        # What one side announces limits what the other side sends.
        other = RESP if side == REQ else REQ
        for i in range(0, len(payload) - 5, 6):
            ident = int.from_bytes(payload[i:i + 2], "big")
            value = int.from_bytes(payload[i + 2:i + 6], "big")
            if ident == 1:     # SETTINGS_HEADER_TABLE_SIZE: the other side's encoder
                dec = self.decoders[other]
                dec.max_allowed_table_size = max(dec.max_allowed_table_size,
                                                 min(value, MAX_TABLE))
            elif ident == 5 and DEFAULT_FRAME <= value <= MAX_FRAME:  # MAX_FRAME_SIZE
                self.frame_limit[other] = value

    def _target(self, side, ftype, sid):
        """The stream a frame's bytes count for, or None (connection, push, closed)."""
        if not sid or not sid & 1 or ftype not in (DATA, HEADERS, CONTINUATION, RST_STREAM):
            return None
        st = self.h2streams.get(sid)
        if st is not None or sid in self.closed_set:
            return st
        if ftype == CONTINUATION or not (self.degraded or (side == REQ and ftype == HEADERS)):
            return None          # frames of a stream we never saw open: ignore them
        st = self.h2streams[sid] = _H2Stream(sid)
        if len(self.h2streams) > MAX_STREAMS:
            self._close(next(iter(self.h2streams)))
        return st

    def _close(self, sid):
        st = self.h2streams.pop(sid, None)
        if st is not None:
            self.header_bytes -= st.hbytes
        if len(self.closed) == self.closed.maxlen:
            self.closed_set.discard(self.closed[0])
        self.closed.append(sid)
        self.closed_set.add(sid)

    # -- header blocks -------------------------------------------------------------------
    def _block_done(self, side):
        blk, self.block[side] = self.block[side], None
        headers = self._decode(side, blk)
        st = self.h2streams.get(blk.sid)
        if blk.push or st is None:
            return []
        half = st.req if side == REQ else st.resp
        if headers is not None:
            # HPACK lets a few wire bytes name kilobytes of table entries: what open
            # streams hold is budgeted per connection. Past it a block's headers are
            # dropped (its message gets a placeholder), counted as a parse error.
            size = sum(len(k) + len(v) for k, v in headers.items())
            if self.header_bytes + size > MAX_HEADER_BYTES:
                self.errors += 1
                headers = None
            else:
                st.hbytes += size
                self.header_bytes += size
        if headers is None:
            half.lost = True
            if half.headers is None:
                half.headers = {}
        elif half.headers is None:
            if side == RESP and headers.get(":status", "").startswith("1"):
                return []        # interim response (100, 103): the final one follows
            half.headers = headers
        else:
            half.trailers.update(headers)
        if headers and headers.get("content-type", "").startswith("application/grpc"):
            st.grpc = True
        if blk.end_stream:
            return self._end(side, st)
        return []

    def _decode(self, side, blk):
        """The block's headers (lower-case names), or None if it cannot be decoded."""
        if not blk.lost:
            try:
                pairs = self.decoders[side].decode(bytes(blk.frag), raw=True)
            except Exception:  # hpack raises several kinds on bad input; all mean "lost"
                pass
            else:
                self.decoded[side] += 1
                headers = {}
                for name, value in pairs:
                    k = name.decode("latin-1").lower()
                    v = value.decode("utf-8", "replace")
                    headers[k] = f"{headers[k]}, {v}" if k in headers else v
                return headers
        self.hpack_failures += 1
        self._taint(side)
        return None

    def _taint(self, side):
        """Forget this side's HPACK table (see the module comment for why this is safe)."""
        old = self.decoders[side]
        dec = self.decoders[side] = hpack.Decoder()
        dec.max_allowed_table_size = max(old.max_allowed_table_size, MISSED_TABLE)
        dec.header_table_size = dec.max_allowed_table_size
        self.degraded = True

    def _set_missed(self):
        self.missed_start = self.degraded = True
        for side in (REQ, RESP):
            if not self.decoded[side]:
                self._taint(side)

    # -- messages ------------------------------------------------------------------------
    def _end(self, side, st):
        if side == REQ:
            st.req.ended = True
            if st.req.emitted:
                return []
            st.req.emitted = True
            return [self._request(st)]
        st.resp.ended = True
        out = []
        if not st.req.emitted:
            st.req.emitted = True
            out.append(self._request(st))
        out.append(self._response(st))
        self._close(st.sid)
        return out

    def _reset(self, side, st, code):
        if side == RESP:
            st.resp.reset = code
            return self._end(RESP, st)
        # The client cancelled: no more of the response will be read; end the call here.
        st.req.reset = code
        out = []
        if not st.req.emitted:
            st.req.emitted = True
            out.append(self._request(st))
        if not st.resp.size:     # nothing of the response came: it starts at the reset
            st.resp.ts_start = st.req.ts_end
        st.resp.ts_end = max(st.resp.ts_end, st.req.ts_end)   # and ends there
        st.resp.reset = code
        out.append(self._response(st))
        self._close(st.sid)
        return out

    def _base(self, st, half, is_request):
        msg = Message(is_request, ts_start=half.ts_start, ts_end=half.ts_end, size=half.size,
                      seq_start=half.seq_start, seq_end=half.seq_end, key=st.sid)
        if self.missed_start:
            msg.attributes["deeptrace.http2.missed_start"] = True
        if not half.ended or half.lost:
            msg.attributes["deeptrace.incomplete"] = True
        if st.grpc:
            msg.protocol = "grpc"
        return msg

    def _placeholder(self, msg):
        self.placeholders += 1
        msg.operation = PLACEHOLDER_MISSED if self.missed_start else PLACEHOLDER_LOST
        msg.attributes["deeptrace.incomplete"] = True

    def _request(self, st):
        half = st.req
        msg = self._base(st, half, True)
        h = half.headers or {}
        if ":path" not in h:
            self._placeholder(msg)
        elif st.grpc:
            path = h[":path"].split("?", 1)[0]
            msg.operation = path[1:] if path.startswith("/") else path
            service, _, method = msg.operation.rpartition("/")
            msg.attributes.update({"rpc.system": "grpc", "rpc.service": service,
                                   "rpc.method": method, "network.protocol.version": "2"})
            msg.attributes.update(server_attributes(h.get(":authority", "")))
            if "user-agent" in h:
                msg.attributes["user_agent.original"] = h["user-agent"]
        else:
            msg.operation, attrs = request_attributes(h.get(":method", "?"), h[":path"], h, "2")
            msg.attributes.update(attrs)
            if ":scheme" in h:
                msg.attributes["url.scheme"] = h[":scheme"]
        if half.body:
            msg.attributes["http.request.body.size"] = half.body
        return msg

    def _response(self, st):
        half = st.resp
        msg = self._base(st, half, False)
        h, t = half.headers or {}, half.trailers
        if half.lost and not h:
            self._placeholder(msg)
        http = number(h.get(":status", ""))
        if http is not None:
            msg.attributes["http.response.status_code"] = http
        if half.reset is not None and half.reset >= 0:
            name = RST_NAMES[half.reset] if half.reset < len(RST_NAMES) else str(half.reset)
            msg.attributes["deeptrace.http2.rst_stream"] = name
        if st.grpc:
            code = t.get("grpc-status") or h.get("grpc-status")
            if code is None and half.reset is not None:
                code = GRPC_OF_RST.get(half.reset, "13")
            elif code is None and http not in (None, 200):
                code = GRPC_OF_HTTP.get(http, "2")
            if code is not None:
                msg.status = code
                msg.error = code != "0"
                if number(code) is not None:
                    msg.attributes["rpc.grpc.status_code"] = number(code)
        else:
            msg.status = str(http) if http is not None else None
            msg.error = (http or 0) >= 500 or (half.reset is not None and half.reset != 0)
            msg.attributes.update(header_attributes(h, "http.response.header"))
        if half.body:
            msg.attributes["http.response.body.size"] = half.body
        return msg
