"""The fuzz targets of `python -m bench.fuzz`, replayed by tests/test_fuzz_corpus.py.

A parser target's input (what the fuzzer mutates and what a corpus file holds) is bytes:

    flags (1 byte), then records, each: head (1 byte), length (2 bytes, big-endian),
    hole (3 bytes, big-endian, only if head bit 6 is set), then `length` bytes of data

    flags bits 0-1  how the records reach the parser: 0 or 3 one call per record;
                    1 whole: consecutive records of one side joined into one call;
                    2 cut again into calls of 1 to 144 bytes (sizes from PIECES drawn
                    by a PRNG seeded with the input's CRC-32)
    flags bit 2     the connection is UDP (else TCP; only DNS tells them apart)
    head bit 7      the record is the server's bytes (responses), else the client's
    head bit 6      the call moved `hole` bytes beyond its data (the capture cut it)

A record running past the end of the input takes what is left. Calls are fed through
the API the spans stage uses (``protocol(config).parser()``, ``set_l4``, ``feed``,
``span_error``). The ``detect`` target's input is lport (2 bytes), rport (2 bytes), a
byte whose bit 0 says UDP, then the payload: every registered protocol's ``detect``
(the stage's Python detectors) is asked about it.

A target raises on what the stage would count as a parser crash (any exception out of
the API) and on broken contracts: a stream or table past its documented bound, a message
the stage cannot use (an unhashable key, a non-scalar attribute).
"""

import random
import time
import zlib

REQ, RESP = "req", "resp"          # as deeptrace_core.l7 (not imported here: see make())
MODES = ("records", "whole", "recut", "records")
# Seconds an input may take: 50 ms per 4 KB; quadratic work shows up as far more.
TIME_PER_4K = 0.05
# Sizes of the calls an input is cut into again: one-byte calls and cuts inside headers
# often, yet few enough calls that an input costs little more than its bytes.
PIECES = (1, 1, 2, 3, 5, 8, 13, 21, 34, 55, 89, 144)


class ContractError(AssertionError):
    """A parser broke a documented bound or gave the stage something it cannot use."""


def encode(calls, mode=0, udp=False) -> bytes:
    """The input for calls [(side, data, nbytes)] (nbytes >= len(data))."""
    out = bytearray([mode & 3 | (4 if udp else 0)])
    for side, data, nbytes in calls:
        data = data[:0xFFFF]               # longer: the rest as if the capture cut it
        hole = nbytes - len(data)
        out.append((0x80 if side == RESP else 0) | (0x40 if hole else 0))
        out += len(data).to_bytes(2, "big")
        if hole:
            out += min(hole, 0xFFFFFF).to_bytes(3, "big")
        out += data
    return bytes(out)


def decode(data: bytes):
    """(calls [(side, data, nbytes)], udp) of an input."""
    if not data:
        return [], False
    flags, i, recs = data[0], 1, []
    while i < len(data):
        head = data[i]
        n = int.from_bytes(data[i + 1:i + 3], "big")
        i += 3
        hole = 0
        if head & 0x40:
            hole = int.from_bytes(data[i:i + 3], "big")
            i += 3
        chunk = data[i:i + n]
        i += n
        recs.append((RESP if head & 0x80 else REQ, chunk, len(chunk) + hole))
    mode = flags & 3
    if mode == 1:
        recs = _whole(recs)
    elif mode == 2:
        recs = _recut(recs, random.Random(zlib.crc32(data)))
    return recs, bool(flags & 4)


def _whole(recs):
    out = []
    for side, chunk, nbytes in recs:
        prev = out[-1] if out else None
        if prev and prev[0] == side and prev[2] == len(prev[1]):   # joins only without a hole
            out[-1] = (side, prev[1] + chunk, prev[2] + nbytes)
        else:
            out.append((side, chunk, nbytes))
    return out


def _recut(recs, rnd):
    out = []
    for side, chunk, nbytes in recs:
        i = 0
        while i < len(chunk):
            k = rnd.choice(PIECES)
            out.append((side, chunk[i:i + k], len(chunk[i:i + k])))
            i += k
        hole = nbytes - len(chunk)
        if hole and out and out[-1][0] == side and len(chunk):
            s, c, n = out[-1]
            out[-1] = (s, c, n + hole)        # the hole ends the call that ends the data
        elif hole or not chunk:
            out.append((side, b"", hole))
    return out


def time_limit(data: bytes) -> float:
    return TIME_PER_4K * max(1.0, len(data) / 4096)


# -- the bounds each parser documents ---------------------------------------------------

def _check(ok, what):
    if not ok:
        raise ContractError(what)


def _bounds_http1(p):
    from deeptrace_plugins.protocols.http1 import parser as m
    _check(len(p.pending) <= m.MAX_PENDING, f"http1: {len(p.pending)} pending")


def _bounds_http2(p):
    from deeptrace_plugins.protocols.http2 import parser as m
    _check(len(p.h2streams) <= m.MAX_STREAMS, f"http2: {len(p.h2streams)} open streams")
    _check(p.header_bytes == sum(s.hbytes for s in p.h2streams.values()),
           "http2: header byte budget out of step with the streams")
    _check(p.header_bytes <= m.MAX_HEADER_BYTES, f"http2: {p.header_bytes} header bytes")
    _check(len(p.closed_set) <= m.MAX_CLOSED, f"http2: {len(p.closed_set)} closed ids")
    for blk in p.block.values():
        _check(blk is None or len(blk.frag) <= m.MAX_BLOCK, "http2: header block too big")
    for dec in p.decoders.values():
        _check(dec.header_table.maxsize <= m.MAX_TABLE, "http2: HPACK table too big")


def _bounds_redis(p):
    from deeptrace_redis import parser as m
    _check(len(p.sub_expect) <= 1024, "redis: subscription confirmations")
    for subs in p.subs.values():
        _check(len(subs) <= m.MAX_SUBS, f"redis: {len(subs)} channels")
    for st in p._st.values():
        _check(len(st.stack) <= m.MAX_DEPTH, "redis: nesting")
        _check(len(st.elems) <= m.MAX_ARGS + 1, f"redis: {len(st.elems)} elements kept")


def _bounds_memcached(p):
    from deeptrace_plugins.protocols.memcached import parser as m
    _check(len(p._pending) <= m.MAX_PENDING, f"memcached: {len(p._pending)} pending")
    _check(sum(len(q) for q in p._by_opaque.values()) == len(p._pending),
           "memcached: opaque index out of step with the pending requests")
    for st in p._st.values():
        _check(len(st.implied) <= m.MAX_PENDING, "memcached: implied responses")


def _bounds_sql(p, m):
    _check(len(p.statements) <= p.max_statements, f"{p.protocol}: {len(p.statements)} statements")
    _check(len(p.pending) <= m.PENDING_MAX, f"{p.protocol}: {len(p.pending)} pending")


def _bounds_mysql(p):
    from deeptrace_plugins.protocols.mysql import parser as m
    _bounds_sql(p, m)


def _bounds_postgresql(p):
    from deeptrace_plugins.protocols.postgresql import parser as m
    _bounds_sql(p, m)
    _check(len(p.portals) <= 65, f"postgresql: {len(p.portals)} portals")
    _check(p.group is None or len(p.group.texts) <= m.GROUP_TEXTS_MAX, "postgresql: group texts")


BOUNDS = {"http1": _bounds_http1, "http2": _bounds_http2, "redis": _bounds_redis,
          "memcached": _bounds_memcached, "mysql": _bounds_mysql,
          "postgresql": _bounds_postgresql}

# target -> (registered protocol, its config as the YAML would give it). The SQL parsers
# get a small statement cap so the fuzzer reaches their eviction.
PARSER_TARGETS = {
    "http1": ("http1", {}), "http2": ("http2", {}), "redis": ("redis", {}),
    "memcached_text": ("memcached", {}), "memcached_binary": ("memcached", {}),
    "mongodb": ("mongodb", {}), "mysql": ("mysql", {"max_statements": 8}),
    "postgresql": ("postgresql", {"max_statements": 8}), "dns": ("dns", {}),
    "tls": ("tls", {}),
}
TARGETS = (*PARSER_TARGETS, "detect")
# Modules whose code the fuzzer instruments for coverage: the parsers. Instrumenting the
# L7 kit and the libraries too (hpack, dnspython) found no more here and halved the
# inputs per second; what they raise still counts as a crash.
COVERED = ["deeptrace_plugins.protocols", "deeptrace_redis"]


def registry():
    from deeptrace_core.plugins import PluginHost
    return PluginHost().load_entry_points().registry()


class ParserTarget:
    def __init__(self, name, reg=None):
        proto_name, config = PARSER_TARGETS[name]
        cls = (reg or registry()).protocols[proto_name].cls
        self.name, self.protocol = name, cls(cls.config_class(**config))
        self.bounds = BOUNDS.get(proto_name)
        from deeptrace_core.l7 import Message
        self.message_class = Message

    def __call__(self, data: bytes) -> int:
        """Feed one input; returns the messages it gave. Raises what the stage would
        count as a crash, or ContractError."""
        calls, udp = decode(data)
        parser = self.protocol.parser()
        parser.set_l4("udp" if udp else "tcp")
        seq = {REQ: 1000, RESP: 5000}
        n = 0
        for i, (side, chunk, nbytes) in enumerate(calls):
            msgs = parser.feed(side, chunk, nbytes, i * 10, i * 10 + 1,
                               None if udp else seq[side])
            seq[side] += nbytes
            for stream in parser.streams.values():
                if len(stream) > max(stream.cap, nbytes) or stream.captured() > len(stream):
                    raise ContractError(f"stream holds {len(stream)} bytes (cap {stream.cap})")
            for msg in msgs:
                self._message(parser, msg)
            n += len(msgs)
        if self.bounds:
            self.bounds(parser)
        return n

    def _message(self, parser, msg):
        # (messages formatted only on failure: this runs for every message)
        if not isinstance(msg, self.message_class):
            raise ContractError(f"not a Message: {msg!r}")
        hash(msg.key)                     # the stage keys its pending requests by it
        if not (isinstance(msg.operation, str) and msg.size >= 0
                and (msg.status is None or isinstance(msg.status, str))):
            raise ContractError(f"bad message {msg!r}")
        for k, v in msg.attributes.items():   # what the exporters can encode
            if not (isinstance(k, str) and isinstance(v, (str, int, float, bool))):
                raise ContractError(f"attribute {k!r}: {v!r}")
        if not msg.is_request:
            for role in ("client", "server"):
                parser.span_error(msg.status, role, msg.protocol or parser.protocol)


class DetectTarget:
    name = "detect"

    def __init__(self, reg=None):
        reg = reg or registry()
        self.detectors = [(n, e.cls.detect) for n, e in sorted(reg.protocols.items())]

    def __call__(self, data: bytes) -> int:
        lport = int.from_bytes(data[0:2], "big")
        rport = int.from_bytes(data[2:4], "big")
        l4 = "udp" if data[4:5] and data[4] & 1 else "tcp"
        payload, found = data[5:], 0
        for name, detect in self.detectors:
            r = detect(payload, lport, rport, l4)
            _check(r in (0, 1, 2), f"{name}.detect gave {r!r}")
            found += bool(r)
        return found


def make(name, reg=None):
    return DetectTarget(reg) if name == "detect" else ParserTarget(name, reg)


def replay(target, data: bytes, slack: float = 1.0) -> float:
    """Run one input three times; its best time, or ContractError if even that is over
    `slack` times its time limit (one slow run on a shared machine proves nothing)."""
    best = None
    for _ in range(3):
        t0 = time.perf_counter()
        target(data)
        took = time.perf_counter() - t0
        best = took if best is None else min(best, took)
    if best > time_limit(data) * slack:
        raise ContractError(f"{len(data)}-byte input took {best * 1000:.0f} ms "
                            f"(limit {time_limit(data) * slack * 1000:.0f} ms)")
    return best
