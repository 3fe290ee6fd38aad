"""HTTP/1.x parser: keep-alive, pipelining, Content-Length and chunked bodies, 1xx.

Heads (request/status line and header fields) are parsed by ``httptools`` (llhttp), fed
exactly the head's bytes, so it validates and tokenises them. Bodies are framed here:
llhttp must see every body byte, but the capture keeps only a prefix of each syscall,
so bodies are skipped with ``Stream.consume`` (which steps over the uncaptured holes)
from Content-Length or the chunk sizes.

Requests and responses are paired first-in-first-out by the stage (no key). To keep that
pairing aligned, every final response is emitted exactly once (1xx interim responses
other than 101 are skipped), and a message whose head was parsed but whose body framing
was lost in a hole is still emitted, marked ``deeptrace.incomplete``; the side then
resyncs at the next syscall that starts like an HTTP message.
"""

import re
from collections import deque

import httptools

from deeptrace_core.l7 import REQ, RESP, Message, ParseError, Parser
from deeptrace_plugins.protocols.http_attributes import (HEADER_ALLOW, HttpErrorRule,
                                                         header_attributes, request_attributes)

MAX_HEAD = 64 * 1024
MAX_PENDING = 1024           # requests awaiting a response (pipelining depth), capped
_METHOD = re.compile(rb"[A-Z_-]*")
_HEX = re.compile(rb"[0-9A-Fa-f]{1,16}\Z")

# Every header the parser reads: framing, attributes, and the allow-list.
_USED = HEADER_ALLOW | {"host", "user-agent", "transfer-encoding", "expect"}


def content_length(headers: dict):
    """Content-Length as an int (0 if absent), None if not a plain number."""
    value = headers.get("content-length", "0").strip()
    return int(value) if value.isdigit() and value.isascii() else None


class _Head:
    """httptools callback target: collects one head."""
    __slots__ = ("url", "headers", "status_line")

    def __init__(self):
        self.url = b""
        self.headers = {}
        self.status_line = False

    def on_url(self, url):
        self.url += url

    def on_status(self, _reason):
        self.status_line = True

    def on_header(self, name, value):
        k = name.decode("latin-1").lower()
        if k not in _USED:
            return  # never looked at: not worth decoding (this runs for every header)
        v = value.decode("latin-1")
        self.headers[k] = f"{self.headers[k]}, {v}" if k in self.headers else v


def parse_head(is_request: bool, data: bytes):
    """(head, method or status code, version) of head bytes; ParseError if not HTTP."""
    head = _Head()
    parser = (httptools.HttpRequestParser if is_request else httptools.HttpResponseParser)(head)
    try:
        parser.feed_data(data)
    except httptools.HttpParserUpgrade:
        pass  # Upgrade/CONNECT: the head is complete, what follows is not HTTP/1
    except httptools.HttpParserError as exc:
        raise ParseError(f"http/1 head: {exc}") from None
    what = parser.get_method().decode("latin-1") if is_request else parser.get_status_code()
    return head, what, parser.get_http_version() or "1.1"


def start_verdict(side: str, data: bytes):
    """True if data starts like a request (REQ) / response (RESP), False if it cannot,
    None if too short to tell."""
    if side == RESP:
        n = min(len(data), 7)
        if data[:n] != b"HTTP/1."[:n]:
            return False
        return True if n == 7 else None
    m = _METHOD.match(data, 0, 21)   # the method's characters, in C
    i = m.end()
    if i < len(data) and i < 21:
        return i > 0 and data[i] == 0x20
    return None if len(data) < 21 else False


class _Side:
    __slots__ = ("msg", "left", "chunk", "until_close", "resync", "expect_continue", "scan")

    def __init__(self):
        self.reset()
        self.until_close = False
        self.resync = False
        self.scan = (-1, 0)        # (stream.read, bytes searched) of an unfinished head

    def reset(self):
        self.msg = None            # message whose body is being skipped
        self.left = 0              # body (or chunk data + CRLF) bytes still to skip
        self.chunk = None          # None, "size", "data", "trailer"
        self.expect_continue = False


class Http1Parser(HttpErrorRule, Parser):
    protocol = "http1"

    def __init__(self):
        super().__init__()
        self.sides = {REQ: _Side(), RESP: _Side()}
        self.pending = deque(maxlen=MAX_PENDING)   # methods of requests not yet answered
        self.tunnel = False        # after 101 or CONNECT 2xx: no more HTTP/1 here

    def feed(self, side, data, nbytes, ts_start, ts_end, seq=None):
        # Fast path: most calls carry exactly one whole, plainly framed message (a GET, a
        # response with Content-Length) with nothing buffered before it; it is read from
        # the call's bytes without the stream machinery. Anything else (and anything this
        # does not recognise) takes the general path, which gives the same messages.
        st = self.sides[side]
        if (nbytes > 0 and len(data) == nbytes and not self.streams[side].size
                and st.msg is None and not st.resync and not st.until_close
                and not self.tunnel):
            msg = self._whole(side, data)
            if msg is not None:
                msg.ts_start, msg.ts_end, msg.size = ts_start, ts_end, nbytes
                if seq is not None:
                    msg.seq_start, msg.seq_end = seq, seq + nbytes
                return [msg]
        return super().feed(side, data, nbytes, ts_start, ts_end, seq)

    def _whole(self, side, data):
        """The message if `data` is exactly one with simple framing, else None, with no
        state changed (the general path then reads the same bytes)."""
        # No start check first: llhttp rejects what does not start like a message. It
        # skips empty lines before one, which the general path counts apart (size).
        end = data.find(b"\r\n\r\n") + 4
        if end < 4 or data[0] in (13, 10):
            return None
        try:
            head, what, version = parse_head(side == REQ, data[:end])
        except ParseError:
            return None
        h = head.headers
        if "transfer-encoding" in h or content_length(h) != len(data) - end:
            return None
        if side == REQ:
            if what == "CONNECT" or "expect" in h or len(self.pending) >= MAX_PENDING:
                return None
            msg = self._request_message(head, what, version)
            self.pending.append(what)
            return msg
        method = self.pending[0] if self.pending else None
        if (what < 200 or what in (204, 304) or "content-length" not in h
                or method in ("HEAD", "CONNECT") or self.sides[REQ].msg is not None):
            return None
        if self.pending:
            self.pending.popleft()
        return self._response_message(head, what, version)

    def parse(self, side, stream):
        st = self.sides[side]
        if self.tunnel or st.until_close:
            stream.consume(len(stream))
            stream.take_span()
            return []
        if st.msg is not None:
            return self._body(st, stream)
        if st.resync:
            verdict = self._verdict(side, stream) if stream.at_segment_start() else False
            if verdict is None:
                return []
            if not verdict:
                stream.drop_segment()  # resync only where a syscall starts a message
                return []
            st.resync = False
        return self._head(side, st, stream)

    @staticmethod
    def _verdict(side, stream):
        data = stream.peek(21)
        verdict = start_verdict(side, data) if data else False
        if verdict is None:
            try:
                stream.need(len(data) + 1)
            except ParseError:
                return False   # too short to tell, and a hole follows: not a start
        return verdict

    # -- heads ---------------------------------------------------------------------------
    def _head(self, side, st, stream):
        # Work per call is what arrived since the last: an unfinished head is searched
        # from where the previous search stopped, in place (Stream.find).
        data = stream.peek(21)
        if side == REQ and data[:1] in (b"\r", b"\n"):
            # RFC 9112 2.2: empty lines before a request-line are ignored
            data = stream.peek(MAX_HEAD)
            stream.consume(len(data) - len(data.lstrip(b"\r\n")))
            stream.take_span()
            return []
        if not data:
            if stream.at_hole():
                raise ParseError("message start not captured")
            return []
        if start_verdict(side, data) is False:
            raise ParseError("not an HTTP/1 message start")
        read, searched = st.scan
        end = stream.find(b"\r\n\r\n", max(searched - 3, 0) if read == stream.read else 0,
                          MAX_HEAD)
        if end < 0:
            have = min(stream.captured(), MAX_HEAD)
            st.scan = (stream.read, have)
            if have >= MAX_HEAD:
                # Drop the whole unfinished head (not one syscall of it: the rest would be
                # searched again per call), counted; resync where a message starts.
                self.errors += 1
                stream.consume(have)
                stream.take_span()
                st.resync = True
                return []
            try:
                stream.need(have + 1)
            except ParseError:
                return self._cut_head(side, st, stream, stream.peek(MAX_HEAD))
            return []  # the rest of the head has not arrived yet
        data = stream.peek(end + 4)
        head, what, version = parse_head(side == REQ, data)
        stream.consume(end + 4)
        if side == REQ:
            return self._request(st, stream, head, what, version)
        return self._response(st, stream, head, what, version)

    def _cut_head(self, side, st, stream, data):
        """The capture cut this head: emit what it has, then resync."""
        i = data.rfind(b"\r\n")
        cut = data[:i + 2] if i >= 0 else data
        head, what, version = parse_head(side == REQ, cut)
        if side == REQ:
            if not head.url:
                raise ParseError("request line not captured")
            msg = self._request_message(head, what, version)
            self.pending.append(what)
        else:
            if i < 0:
                raise ParseError("status line not captured")
            if 100 <= what < 200 and what != 101:
                stream.drop_segment()
                st.resync = True
                return []
            if self.pending:
                self.pending.popleft()
            msg = self._response_message(head, what, version)
        msg.attributes["deeptrace.incomplete"] = True
        stream.consume(len(data))
        stream.stamp(msg)
        stream.drop_segment()
        st.resync = True
        return [msg]

    @staticmethod
    def _request_message(head, method, version):
        op, attrs = request_attributes(method, head.url.decode("latin-1"), head.headers, version)
        return Message(True, operation=op, attributes=attrs)

    @staticmethod
    def _response_message(head, status, version):
        attrs = {"http.response.status_code": status, "network.protocol.version": version}
        attrs.update(header_attributes(head.headers, "http.response.header"))
        return Message(False, attributes=attrs, status=str(status), error=status >= 500)

    def _request(self, st, stream, head, method, version):
        msg = self._request_message(head, method, version)
        self.pending.append(method)
        h = head.headers
        te = h.get("transfer-encoding", "").lower()
        if te:
            if te.rsplit(",", 1)[-1].strip() != "chunked":
                return self._incomplete(st, stream, msg)  # RFC 9112 6.3: unframeable
            st.chunk = "size"
        else:
            st.left = content_length(h)
            if st.left is None:
                return self._incomplete(st, stream, msg)
            if not st.left:
                return [stream.stamp(msg)]
        st.msg = msg
        st.expect_continue = "100-continue" in h.get("expect", "").lower()
        return []

    def _response(self, st, stream, head, status, version):
        if 100 <= status < 200 and status != 101:
            stream.take_span()  # interim (100 Continue, 103 Early Hints): not the response
            return []
        method = self.pending.popleft() if self.pending else None
        msg = self._response_message(head, status, version)
        out = []
        req = self.sides[REQ]
        if req.msg is not None and req.expect_continue:
            # A final answer to "Expect: 100-continue" before the body: the client
            # either never sends it or closes; emit the request now, resync its side.
            out.append(self.streams[REQ].stamp(req.msg))
            req.reset()
            req.resync = True
        h = head.headers
        if status == 101 or (method == "CONNECT" and 200 <= status < 300):
            self.tunnel = True
            out.append(stream.stamp(msg))
            return out
        te = h.get("transfer-encoding", "").lower()
        if method == "HEAD" or status in (204, 304):
            out.append(stream.stamp(msg))
        elif te and te.rsplit(",", 1)[-1].strip() == "chunked":
            st.msg, st.chunk = msg, "size"
        elif not te and (length := content_length(h) if "content-length" in h else None) \
                is not None:
            st.left = length
            if st.left:
                st.msg = msg
            else:
                out.append(stream.stamp(msg))
        else:
            # The body ends when the connection closes, which the parser is not told:
            # emit the response now, its size and end time are those of the head.
            msg.attributes["deeptrace.incomplete"] = True
            st.until_close = True
            out.append(stream.stamp(msg))
        return out

    # -- bodies --------------------------------------------------------------------------
    def _body(self, st, stream):
        if st.chunk is None or st.chunk == "data":
            st.left -= stream.consume(st.left)
            if st.left:
                return []
            if st.chunk is None:
                return self._finish(st, stream)
            st.chunk = "size"
            return []
        line = self._line(stream, 1024)
        if line is None:
            return []
        if line is False:
            return self._incomplete(st, stream, st.msg)
        if st.chunk == "trailer":
            stream.consume(len(line) + 2)
            return self._finish(st, stream) if not line else []
        size = line.split(b";", 1)[0].strip()
        if not _HEX.match(size):
            return self._incomplete(st, stream, st.msg)
        stream.consume(len(line) + 2)
        size = int(size, 16)
        if size:
            st.chunk, st.left = "data", size + 2   # chunk data and its CRLF
        else:
            st.chunk = "trailer"
        return []

    @staticmethod
    def _line(stream, limit):
        """The next CRLF-terminated line (without CRLF); None: not arrived yet;
        False: cannot be read (a hole, or longer than limit)."""
        data = stream.peek(limit)
        i = data.find(b"\r\n")
        if i >= 0:
            return data[:i]
        if len(data) >= limit:
            return False
        try:
            stream.need(len(data) + 1)
        except ParseError:
            return False
        return None

    def _finish(self, st, stream):
        msg = st.msg
        st.reset()
        return [stream.stamp(msg)]

    def _incomplete(self, st, stream, msg):
        """Body framing lost (in a hole or malformed): emit the message, resync."""
        msg.attributes["deeptrace.incomplete"] = True
        stream.skip_segment()   # the rest of this syscall's bytes are the message's too
        stream.stamp(msg)
        st.reset()
        st.resync = True
        return [msg]
