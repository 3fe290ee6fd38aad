"""The L7 protocol kit every protocol plugin builds on: the byte stream of one direction
of a connection (with the syscall records it came from), the Message a parser produces,
the parser bases, and the protocol class a plugin registers.

A protocol plugin registers a ``ProtocolBase`` subclass through
``deeptrace_register_protocols``, which ``register_protocols`` writes:

    class RedisProtocol(ProtocolBase):
        name = "redis"                      # the name used in config
        config_class = NoConfig             # attrs class of its settings (the default)
        detect_c = ("deeptrace_redis", "detect.bpf.c")  # package, file: the kernel detector
        parser_class = RedisParser          # parser() builds one per connection
        detect = staticmethod(detect)       # (data, lport, rport, l4) -> 0/REQUEST/RESPONSE

    deeptrace_register_protocols = register_protocols(RedisProtocol)

The stage builds the class with its config (``processors.spans.protocol_config.<name>``
in YAML; defaults otherwise) and asks it for a parser per connection: ``parser()``
builds ``parser_class`` with the config's fields as keyword arguments.

``detect`` (and ``detect_<name>`` in the C file) looks at the first bytes of one syscall's
data and answers 0 (not this protocol), REQUEST (1: a request, so the sender is the
client) or RESPONSE (2: a response, so the sender is the server). The C function has
the signature

    static __always_inline int detect_<name>(const u8 *p, u32 n, u16 lport, u16 rport, u8 l4)

where ``p`` points at the payload (at least 32 readable bytes, ``n`` of them valid),
ports are host order and ``l4`` is 1 for TCP, 2 for UDP. It must only index ``p`` at
constant offsets below 32 after checking ``n``: the verifier has to prove every access.

A parser is fed the two directions of one connection in time order. ``feed`` is told
which side the bytes belong to (the client's requests or the server's responses; the
stage works that out from the connection's role), and returns the messages completed.
"""

from collections import deque

import attrs

from .hookspecs import hookimpl

REQUEST = 1
RESPONSE = 2
REQ, RESP = "req", "resp"


class ParseError(Exception):
    """The bytes are not this protocol (or not in a state we can follow): resync.

    A parser that completed messages before meeting the bad bytes puts them in ``done``;
    they are kept, and the rest of the syscall holding the bad bytes is dropped."""

    done = ()


@attrs.define(slots=True)
class Message:
    is_request: bool
    ts_start: int = 0                  # wall-clock ns of the first byte's syscall
    ts_end: int = 0                    # wall-clock ns of the last byte's syscall
    size: int = 0                      # bytes on the wire
    seq_start: int | None = None       # TCP stream position of the first byte
    seq_end: int | None = None
    operation: str = ""                # "GET /users", "SET", "SELECT", "pkg.Svc/Method", ...
    attributes: dict = attrs.Factory(dict)   # OpenTelemetry-style keys
    status: str | None = None          # "200", "OK", "ERR", "NXDOMAIN", "1062", ...
    error: bool = False
    key: object = None                 # match key (stream id, txid, requestID); None: FIFO
    expects_response: bool = True      # False: no reply will come (e.g. memcached noreply)
    protocol: str | None = None        # overrides the span's protocol (http2 -> grpc)
    count: int = 1                     # responses that complete one request (rarely > 1)


@attrs.define(slots=True)
class _Segment:
    data: bytes        # captured bytes
    hole: int          # bytes moved by the call beyond what was captured
    ts_start: int
    ts_end: int
    seq: int | None    # stream position of data[0]


class Stream:
    """One direction's bytes, with holes where the capture was cut, and their timing.

    Parsers look at ``peek()`` (captured bytes up to the first hole), then ``consume(n)``
    what they parsed; ``consume`` steps over holes too, so a body of known length can be
    skipped without having been captured. ``take_span()`` returns the timing and
    stream positions of everything consumed since the previous call: one message's.
    Where framing is lost, ``skip_segment``, ``skip_hole`` and ``lose_segment`` step to a
    syscall boundary, the only place a message can be hoped to start again.

    The captured bytes up to the first hole are also kept joined (``_buf`` from ``_pos``),
    extended as syscalls arrive: peeking, ``find`` and ``need`` cost what they return, not
    a walk over every buffered syscall (one-byte writes would make that quadratic).
    ``read`` counts every byte ever consumed or dropped: a parser can tell whether the
    read position moved since it last looked (to resume a search where it stopped).
    """

    def __init__(self, cap: int = 256 * 1024):
        self.cap = cap
        self.segments: deque[_Segment] = deque()
        self.offset = 0           # consumed bytes of segments[0] (data then hole)
        self.size = 0             # captured + hole bytes not consumed
        self.read = 0             # bytes consumed or dropped since the stream began
        self._span = None         # [ts_start, ts_end, seq_start, seq_end, size]
        self._buf = bytearray()   # captured bytes up to the first hole, read from _pos
        self._pos = 0
        self._open = True         # no hole buffered: appended bytes extend _buf
        self._holes = 0           # buffered segments whose capture was cut

    def append(self, data: bytes, nbytes: int, ts_start: int, ts_end: int, seq=None):
        """Add one syscall's bytes: `data` captured of `nbytes` moved."""
        if nbytes <= 0:
            return
        n = len(data)
        if n > nbytes:
            data, n = bytes(data[:nbytes]), nbytes
        hole = nbytes - n
        self.segments.append(_Segment(data, hole, ts_start, ts_end, seq))
        if self._open:
            self._buf += data
        if hole:
            self._holes += 1
            self._open = False
        self.size += nbytes
        while self.size > self.cap and len(self.segments) > 1:
            self.drop_segment()  # unbounded growth is never allowed; the parser resyncs

    def __len__(self):
        return self.size

    def peek(self, limit: int | None = None) -> bytes:
        """Captured bytes from the read position up to the first hole (at most `limit`)."""
        end = len(self._buf) if limit is None else min(len(self._buf), self._pos + limit)
        with memoryview(self._buf) as view:
            return bytes(view[self._pos:end])

    def captured(self) -> int:
        """How many captured bytes follow the read position before the first hole."""
        return len(self._buf) - self._pos

    def find(self, sub: bytes, start: int = 0, limit: int | None = None) -> int:
        """Where `sub` begins in peek() at or after `start`, ending within `limit` bytes;
        -1 if not there. Searches in place: nothing is copied."""
        end = len(self._buf) if limit is None else min(len(self._buf), self._pos + limit)
        i = self._buf.find(sub, self._pos + start, end)
        return i - self._pos if i >= 0 else -1

    def need(self, n: int):
        """The next n captured bytes; None if they have not arrived yet; ParseError if a
        hole (bytes the capture cut) comes first, so the message can never be read."""
        have = self.captured()
        if have >= n:
            return self.peek(n)
        if self._holes:
            raise ParseError(f"needed {n} bytes, only {have} captured")
        return None

    def _rebuild(self):
        """Join the captured bytes up to the first hole again (after stepping a hole)."""
        buf = bytearray()
        self._open = True
        for k, seg in enumerate(self.segments):
            start = self.offset if k == 0 else 0
            if start < len(seg.data):
                buf += seg.data[start:]
            if seg.hole:
                self._open = False
                break
        self._buf, self._pos = buf, 0

    def _advance(self, n: int):
        """The read position moved over n bytes: all captured ones at the front of _buf
        unless more than it holds (a hole was stepped over, join again)."""
        self.read += n
        if n <= len(self._buf) - self._pos:
            self._pos += n
            if self._pos > 4096 and 2 * self._pos > len(self._buf):
                del self._buf[:self._pos]       # amortised: each byte moved once or so
                self._pos = 0
        else:
            self._rebuild()

    def at_hole(self) -> bool:
        """True when the read position is inside bytes that were not captured."""
        return bool(self.segments) and self.offset >= len(self.segments[0].data) \
            and self.segments[0].hole > 0

    def at_segment_start(self) -> bool:
        """True when the read position is where a syscall's bytes begin."""
        return self.offset == 0

    def segment_data(self):
        """(captured bytes of the current syscall from the read position, whether the
        capture cut its end)."""
        if not self.segments:
            return b"", False
        seg = self.segments[0]
        return seg.data[self.offset:], seg.hole > 0

    def segment_left(self) -> int:
        """Bytes (captured or not) from the read position to the current syscall's end."""
        if not self.segments:
            return 0
        seg = self.segments[0]
        return len(seg.data) + seg.hole - self.offset

    def skip_segment(self) -> int:
        """Consume the rest of the current syscall's bytes; returns how many."""
        return self.consume(self.segment_left())

    def skip_hole(self) -> int:
        """Consume through the end of the first syscall whose capture was cut (all if
        none was): the next syscall is where a message boundary can be found again.
        Returns how many bytes were consumed."""
        n = 0
        for k, seg in enumerate(self.segments):
            n += len(seg.data) + seg.hole - (self.offset if k == 0 else 0)
            if seg.hole:
                break
        return self.consume(n)

    def lose_segment(self):
        """Drop the rest of the current syscall (its framing is lost) and return the span
        (as take_span) of the bytes consumed since the last take plus those dropped: what
        the messages cut short there covered."""
        seg = self.segments[0]
        rest = len(seg.data) + seg.hole - self.offset
        start, _, seq, _, size = self.take_span()
        if not size:
            start, seq = seg.ts_start, (seg.seq + self.offset if seg.seq is not None else None)
        span = (start, seg.ts_end, seq,
                seg.seq + len(seg.data) + seg.hole if seg.seq is not None else None,
                size + rest)
        self.drop_segment()
        return span

    def consume(self, n: int) -> int:
        """Step over n bytes (captured or not); returns how many were available."""
        done = 0
        while n > done and self.segments:
            seg = self.segments[0]
            total = len(seg.data) + seg.hole
            step = min(n - done, total - self.offset)
            self._note(seg, self.offset, step)
            self.offset += step
            done += step
            if self.offset >= total:
                self.segments.popleft()
                self.offset = 0
                if seg.hole:
                    self._holes -= 1
        self.size -= done
        if done:
            self._advance(done)
        return done

    def _note(self, seg, start, step):
        seq_s = seg.seq + start if seg.seq is not None else None
        seq_e = seq_s + step if seq_s is not None else None
        if self._span is None:
            self._span = [seg.ts_start, seg.ts_end, seq_s, seq_e, step]
        else:
            self._span[1] = seg.ts_end
            if seq_e is not None:
                self._span[3] = seq_e
            self._span[4] += step

    def take_span(self):
        """(ts_start, ts_end, seq_start, seq_end, size) of what was consumed since last call."""
        span, self._span = self._span, None
        return tuple(span) if span else (0, 0, None, None, 0)

    def drop_segment(self):
        """Discard the rest of the current syscall's bytes: resync at the next one."""
        if self.segments:
            seg = self.segments.popleft()
            rest = len(seg.data) + seg.hole - self.offset
            self.size -= rest
            self.offset = 0
            if seg.hole:
                self._holes -= 1
                self.read += rest
                self._rebuild()
            else:
                self._advance(rest)
        self._span = None

    def clear(self):
        """Forget every byte held: the parser starts afresh at the next syscall."""
        self.read += self.size
        self.segments.clear()
        self.offset = 0
        self.size = 0
        self._span = None
        self._buf, self._pos, self._open, self._holes = bytearray(), 0, True, 0

    def stamp(self, msg: Message, span=None) -> Message:
        """Give a message the timing, positions and size of the bytes just consumed (or
        those of `span`, a take_span tuple)."""
        msg.ts_start, msg.ts_end, msg.seq_start, msg.seq_end, msg.size = \
            span if span is not None else self.take_span()
        return msg


class Cursor:
    """Captured bytes up to the first hole, read ahead of the stream and consumed on
    commit: parsers of line- and prefix-framed protocols scan without copying."""
    __slots__ = ("s", "buf", "i", "c", "hole")

    def __init__(self, stream):
        self.s = stream
        self.refresh()

    def refresh(self):
        self.buf = self.s.peek()
        self.i = self.c = 0
        self.hole = len(self.s) > len(self.buf)   # uncaptured bytes follow buf

    def commit(self):
        if self.i > self.c:
            self.s.consume(self.i - self.c)
            self.c = self.i


class Parser:
    """Base class: one parser per connection. Subclasses implement ``parse(side, stream)``,
    which returns the messages it can complete from the stream (consuming their bytes via
    ``stream.consume`` and stamping them with ``stream.stamp``) and leaves incomplete
    ones in place. Raising ParseError resyncs that side at the next syscall boundary.

    What the stage calls besides ``feed``: ``set_l4`` once before the first feed,
    ``reset(side)`` after the parser failed on that side, ``span_error`` per span.
    """

    protocol = "?"
    stream_cap = 256 * 1024
    l4 = "tcp"         # the connection's transport: "tcp" or "udp"

    def __init__(self):
        self.streams = {REQ: Stream(self.stream_cap), RESP: Stream(self.stream_cap)}
        self.errors = 0

    def set_l4(self, l4: str):
        """The connection's transport, told once before the first feed."""
        self.l4 = l4

    def reset(self, side: str):
        """Forget what is buffered on one side: it resyncs at the next syscall."""
        self.streams[side].clear()

    def span_error(self, status: str | None, role: str, protocol: str) -> bool:
        """An error the messages do not flag themselves, by this protocol's rules: a
        response with `status` seen from `role` ("client"/"server") on a span of
        `protocol` (a parser may override its own name, as http2 with grpc)."""
        return False

    def feed(self, side: str, data: bytes, nbytes: int, ts_start: int, ts_end: int,
             seq=None) -> list:
        stream = self.streams[side]
        stream.append(data, nbytes, ts_start, ts_end, seq)
        out = []
        while stream.size:
            before = stream.size
            try:
                msgs = self.parse(side, stream)
            except ParseError as exc:
                out += exc.done
                self.errors += 1
                stream.drop_segment()
                continue
            if msgs:
                out += msgs
            elif stream.size == before:
                break  # needs more bytes
        return out

    def parse(self, side: str, stream: Stream) -> list:
        raise NotImplementedError


class FramedParser(Parser):
    """Base for length-framed protocols (MySQL, PostgreSQL, MongoDB): a message is read
    from its header, its bytes are consumed (stepping over uncaptured ones), and it is
    held until its last byte is consumed so its timing and positions cover all of it;
    bytes that belong to no message are left out of any message's timing. Subclasses
    implement ``frame`` and may set ``encrypted`` (after TLS starts nothing is readable).
    """

    def __init__(self):
        super().__init__()
        self.skip = {REQ: 0, RESP: 0}        # bytes of the current message still to consume
        self.held = {REQ: None, RESP: None}  # a message waiting for its last bytes
        self.orphan = {REQ: False, RESP: False}  # the bytes to skip belong to no message
        self.encrypted = False

    def reset(self, side):
        super().reset(side)
        self.skip[side] = 0    # a length read from the dropped bytes must not reach on

    def parse(self, side, stream):
        out = []
        try:
            while self._settle(side, stream, out) and self.frame(side, stream, out):
                pass
        except ParseError as exc:
            self.skip[side] = 0   # feed() resyncs at the next syscall
            exc.done = out
            raise
        return out

    def _settle(self, side, stream, out) -> bool:
        """Finish the message in progress; True when the stream is at a message start."""
        if self.skip[side]:
            self.skip[side] -= stream.consume(self.skip[side])
            if self.orphan[side]:
                stream.take_span()
            if self.skip[side]:
                return False
        if self.held[side] is not None:
            out.append(stream.stamp(self.held[side]))
            self.held[side] = None
        if self.encrypted:
            stream.consume(len(stream))
            stream.take_span()
            return False
        return bool(len(stream))

    def frame(self, side, stream, out) -> bool:
        """Read one message at a message start; False when more bytes are needed."""
        raise NotImplementedError

    def short_header(self, side, stream, head, out) -> bool:
        """`head` is shorter than a header: False if the rest has not arrived yet; if
        the capture cut it, ``lose`` (True)."""
        if len(stream) <= len(head):
            return False
        return self.lose(side, stream, out)

    def lose(self, side, stream, out) -> bool:
        """The framing of `side` is lost at the read position: drop the rest of this
        syscall (resync at the next), put the messages ``lost_framing(side)`` closes in
        out, timed over the bytes they had and those dropped; True (go on)."""
        span = stream.lose_segment()
        out += [stream.stamp(msg, span) for msg in self.lost_framing(side)]
        return True

    def lost_framing(self, side) -> list:
        """The framing of `side` was lost in uncaptured bytes: the messages this closes
        (they are given the span of the lost bytes). By default, counted as an error."""
        self.errors += 1
        return []

    def take(self, side, stream, total, msg, keep) -> bool:
        """Consume a `total`-byte message read at the stream's position (its rest once
        it arrives): `msg` is held until its last byte, `keep` says the bytes belong to a
        message even without one (a part of a reply); others time no message."""
        got = stream.consume(total)
        self.skip[side] = total - got
        self.orphan[side] = msg is None and not keep
        if msg is not None:
            self.held[side] = msg
        elif not keep:
            stream.take_span()
        return True


class CursorParser(Parser):
    """A parser that reads each side through a ``cursor_class`` over the stream:
    subclasses keep per-side state with ``reset()`` in ``self._st`` and implement
    ``_run(is_request, state, cursor, out)``, which appends completed messages to out.
    On a ParseError the bytes read so far are consumed (so the resync drops the syscall
    holding the bad ones), the side's state is reset, and the messages completed before
    it are kept."""

    cursor_class = Cursor

    def reset(self, side):
        super().reset(side)
        self._st[side].reset()     # the state read from the dropped bytes goes with them

    def parse(self, side, stream):
        st = self._st[side]
        out = []
        c = self.cursor_class(stream)
        try:
            self._run(side == REQ, st, c, out)
        except ParseError as exc:
            c.commit()
            st.reset()
            exc.done = out
            raise
        c.commit()
        return out


@attrs.define
class NoConfig:
    """The settings of a protocol that has none."""


class ProtocolBase:
    """What a protocol plugin registers (see the module docstring): a name, a detector in
    C and its Python mirror, a config class, and a parser per connection."""

    name = "?"
    config_class = NoConfig
    detect_c: tuple = ()           # (package, file) of the kernel detector
    parser_class: type = Parser

    def __init__(self, config=None):
        self.config = config if config is not None else self.config_class()

    @staticmethod
    def detect(data: bytes, lport: int, rport: int, l4: str) -> int:
        """0, REQUEST or RESPONSE for one syscall's first bytes (mirror of detect_c)."""
        raise NotImplementedError

    def parser(self) -> Parser:
        """A fresh parser for one connection, given the config's fields as keyword
        arguments (mysql: ``MySQLParser(max_statements=...)``)."""
        return self.parser_class(**attrs.asdict(self.config, recurse=False))


def register_protocols(*protocols):
    """The ``deeptrace_register_protocols`` hook implementation of a plugin that registers
    `protocols` (ProtocolBase subclasses), in that order::

        deeptrace_register_protocols = register_protocols(RedisProtocol)
    """
    @hookimpl
    def deeptrace_register_protocols(registry):
        for cls in protocols:
            registry.add_protocol(cls)
    return deeptrace_register_protocols


def check_protocols(names, known) -> None:
    """The one check of protocol names (trace probe, spans stage): ValueError naming the
    first of `names` that is not in `known` (the registry's protocols), with those that
    are. Config files are checked when loaded, with file and line (config.py)."""
    for name in names:
        if name not in known:
            raise ValueError(f"protocols: unknown protocol {name!r} "
                             f"(allowed: {', '.join(sorted(known)) or 'none registered'})")
