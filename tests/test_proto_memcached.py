"""memcached protocol plugin: the parser on real bytes (pymemcache and hand-built binary
requests against a real memcached, recorded through a TCP proxy), split, coalesced,
pipelined, with holes and garbage; property tests; the detector in Python and in the
kernel."""

import random
import socket
import struct
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import servers
from deeptrace_core import testing as kit
from deeptrace_core.l7 import REQ, REQUEST, RESP, RESPONSE
from deeptrace_plugins.protocols.memcached.parser import MemcachedParser
from deeptrace_plugins.protocols.memcached.plugin import MemcachedProtocol

CAP = 1024


@pytest.fixture(scope="module")
def server():
    s = servers.memcached()
    yield s
    s.stop()


@pytest.fixture
def rec(server):
    r = kit.Recorder(server.port, bufsize=1 << 20)
    yield r
    r.close()


def run(chunks, cap=None):
    p = MemcachedParser()
    return p, kit.feed(p, chunks, cap=cap)


def test_real_text_commands(rec):
    from pymemcache.client.base import Client
    c = Client(("127.0.0.1", rec.port))
    c.set("a", b"1", noreply=False)
    c.get("a")
    c.get("nope")
    c.delete("nope", noreply=False)
    c.set("b", b"2")                        # pymemcache's default: noreply
    c.get_many(["a", "b", "zz"])
    c.gets("a")
    c.incr("a", 5)
    c.decr("a", 1)
    c.touch("a", 10, noreply=False)
    c.add("a", b"x", noreply=False)
    c.cas("a", b"y", b"999", noreply=False)
    c.append("a", b"z", noreply=False)
    c.gat("a", 100) if hasattr(c, "gat") else c.touch("a", 100, noreply=False)
    c.version()
    c.stats()
    c.flush_all(noreply=False)
    c.incr("missing", 1)
    c.quit()
    chunks = rec.take()
    p, msgs = run(chunks)
    assert p.errors == 0
    got = kit.outcomes(msgs)
    assert got[:15] == [
        ("set", "STORED", False), ("get", "OK", False), ("get", "OK", False),
        ("delete", "NOT_FOUND", False), ("set", None, False), ("get", "OK", False),
        ("gets", "OK", False), ("incr", "OK", False), ("decr", "OK", False),
        ("touch", "TOUCHED", False), ("add", "NOT_STORED", False), ("cas", "EXISTS", False),
        ("append", "STORED", False), got[13], ("version", "VERSION", False)]
    assert got[15:] == [("stats", "OK", False), ("flush_all", "OK", False),
                        ("incr", "NOT_FOUND", False), ("quit", None, False)]
    resp = [m for m in msgs if not m.is_request]
    assert [m.attributes.get("db.response.returned_rows") for m in resp[1:3]] == [1, 0]
    assert resp[4].attributes["db.response.returned_rows"] == 2
    reqs = [m for m in msgs if m.is_request]
    assert reqs[0].attributes == {"db.system": "memcached", "db.operation.name": "set",
                                  "db.query.text": "set a 0 0 1"}
    assert reqs[5].attributes["db.operation.batch.size"] == 3
    assert sum(m.size for m in msgs) == sum(len(d) for _, d in chunks)
    for seed in range(5):
        assert kit.view(run(kit.resplit(chunks, random.Random(seed), most=9))[1]) == kit.view(msgs)
    # Coalesced: all requests in one feed, all replies in one feed.
    assert kit.outcomes(run(kit.coalesce(chunks))[1]) == got


def test_text_errors_and_pipelining():
    reqs = b"".join(b"get k%d\r\n" % i for i in range(50))
    resps = b"".join(b"VALUE k%d 0 1\r\n%d\r\nEND\r\n" % (i, i % 10) for i in range(50))
    p, msgs = run([(REQ, reqs), (RESP, resps)])
    assert kit.outcomes(msgs) == [("get", "OK", False)] * 50 and p.errors == 0
    assert [m.attributes["db.query.text"] for m in msgs[:50]] == [f"get k{i}" for i in range(50)]
    got = kit.outcomes(run([(REQ, b"bogus\r\nversion\r\nset k 0 0 x\r\n"),
                     (RESP, b"ERROR\r\nSERVER_ERROR out of memory\r\n")])[1])
    assert got == [("bogus", "ERROR", True), ("version", "SERVER_ERROR", True)]


def test_real_big_value_with_holes(rec):
    from pymemcache.client.base import Client
    c = Client(("127.0.0.1", rec.port))
    big = random.Random(2).randbytes(500_000)
    c.set("big", big, noreply=False)
    assert c.get("big") == big
    c.set("after", b"x", noreply=False)
    c.get_many(["big", "after"])
    c.get("after")
    c.quit()
    chunks = rec.take()
    p, msgs = run(chunks, cap=CAP)
    assert p.errors == 0
    assert kit.outcomes(msgs) == [("set", "STORED", False), ("get", "OK", False),
                           ("set", "STORED", False), ("get", "OK", False),
                           ("get", "OK", False), ("quit", None, False)]
    resp = [m for m in msgs if not m.is_request]
    assert resp[1].size == len(b"VALUE big 0 500000\r\n\r\nEND\r\n") + len(big)
    # The value ran into the hole; the 5 bytes after it can only be END: complete.
    assert [m.attributes.get("db.response.returned_rows") for m in resp] == [None, 1, None, 1, 1]
    assert [bool(m.attributes.get("deeptrace.incomplete")) for m in resp] == \
        [False, False, False, True, False]    # the second VALUE and END were not captured
    assert sum(m.size for m in msgs) == sum(len(d) for _, d in chunks)


def test_hole_where_a_line_should_be():
    # A reply cut inside a line: kept as incomplete, then the next syscall parses.
    p = MemcachedParser()
    out = p.feed(REQ, b"get a b\r\n", 9, 1, 2)
    data = b"VALUE a 0 3\r\nabc\r\nVALUE b 0 3\r\nxyz\r\nEND\r\n"
    out += p.feed(RESP, data[:22], len(data), 3, 4)
    assert out[-1].attributes.get("deeptrace.incomplete") is True
    out = p.feed(REQ, b"version\r\n", 9, 5, 6) + p.feed(RESP, b"VERSION 1\r\n", 11, 7, 8)
    assert [(m.operation, m.status) for m in out] == [("version", None), ("", "VERSION")]
    # A command line cut by a hole.
    p = MemcachedParser()
    line = b"get " + b" ".join(b"key%d" % i for i in range(300)) + b"\r\n"
    out = p.feed(REQ, line[:CAP], len(line), 1, 2)
    assert [(m.operation, m.attributes.get("deeptrace.incomplete")) for m in out] == \
        [("get", True)]
    assert p.feed(REQ, b"get x\r\n", 7, 3, 4)[0].operation == "get"


def test_garbage_and_truncation():
    p = MemcachedParser()
    assert p.feed(REQ, b"\x16\x03\x01\x00\x10\x01", 6, 1, 2) == [] and p.errors == 1
    out = p.feed(REQ, b"get a\r\n\x00\x01\x02junk", 14, 3, 4)
    assert [m.operation for m in out] == ["get"] and p.errors == 2
    assert len(p.streams[REQ]) == 0
    assert p.feed(RESP, b"\x81\x00", 2, 5, 6) == []     # a binary header still to come
    p = MemcachedParser()
    data = b"set k 0 0 10\r\n0123456789\r\n"
    for i in range(len(data) - 1):
        assert p.feed(REQ, data[i:i + 1], 1, i, i) == []
    out = p.feed(REQ, data[-1:], 1, 99, 99)
    assert [m.operation for m in out] == ["set"] and out[0].size == len(data)
    assert out[0].ts_start == 0 and out[0].ts_end == 99


def test_meta_commands():
    reqs = b"mg foo v\r\nms foo 3 T0\r\nbar\r\nmd foo q\r\nmn\r\n"
    resps = b"VA 3\r\nbar\r\nHD\r\nMN\r\n"
    p, msgs = run([(REQ, reqs), (RESP, resps)])
    assert p.errors == 0
    assert kit.outcomes(msgs) == [("mg", "VA", False), ("ms", "HD", False), ("md", None, False),
                           ("mn", "MN", False)]


# -- binary -----------------------------------------------------------------------------
def breq(opcode, key=b"", extras=b"", value=b"", opaque=0, cas=0):
    body = extras + key + value
    return struct.pack(">BBHBBHIIQ", 0x80, opcode, len(key), len(extras), 0, 0, len(body),
                       opaque, cas) + body


def test_real_binary_with_quiet_commands(rec):
    s = socket.create_connection(("127.0.0.1", rec.port))
    flags = struct.pack(">II", 0, 0)
    reqs = [
        breq(0x01, b"k1", flags, b"v1", opaque=1),         # set
        breq(0x00, b"k1", opaque=2),                       # get: hit
        breq(0x00, b"nope", opaque=3),                     # get: miss
        breq(0x09, b"nope", opaque=4),                     # getq: miss, no response
        breq(0x09, b"k1", opaque=5),                       # getq: hit
        breq(0x0D, b"nope2", opaque=6),                    # getkq: miss
        breq(0x11, b"k2", flags, b"v2", opaque=7),         # setq: success, no response
        breq(0x0A, opaque=8),                              # noop ends the quiet batch
        breq(0x05, b"k1", struct.pack(">QQI", 1, 0, 0), opaque=9),   # incr non-numeric
        breq(0x04, b"k2", opaque=0),                       # delete; opaque 0 ...
        breq(0x04, b"k2", opaque=0),                       # ... reused: not found
        breq(0x10, opaque=10),                             # stat: many responses
        breq(0x0B, opaque=11),                             # version
    ]
    for r in reqs:
        s.sendall(r)
        time.sleep(0.01)
    deadline = time.monotonic() + 5
    got = b""
    while time.monotonic() < deadline and b"1.6" not in got[-64:]:
        got += s.recv(1 << 16)
    s.sendall(breq(0x17, opaque=12))                      # quitq: closes, no response
    s.close()
    chunks = rec.take()
    p, msgs = run(chunks)
    assert p.errors == 0
    assert kit.outcomes(msgs) == [
        ("set", "OK", False), ("get", "OK", False), ("get", "NOT_FOUND", False),
        ("getq", "NOT_FOUND", False), ("getq", "OK", False), ("getkq", "NOT_FOUND", False),
        ("setq", "OK", False), ("noop", "OK", False), ("increment", "DELTA_BADVAL", True),
        ("delete", "OK", False), ("delete", "NOT_FOUND", False), ("stat", "OK", False),
        ("version", "OK", False), ("quitq", None, False)]
    implied = [m for m in msgs if m.attributes.get("deeptrace.implied")]
    assert len(implied) == 3 and all(m.ts_start > 0 for m in implied)
    reqm = [m for m in msgs if m.is_request]
    assert reqm[0].attributes["db.query.text"] == "set k1"
    assert len({m.key for m in reqm}) == len(reqm)
    stat = [m for m in msgs if not m.is_request][-2]
    assert stat.size > 24 * 10                             # all the stat responses
    for seed in range(3):
        assert kit.view(run(kit.resplit(chunks, random.Random(seed), most=9))[1]) == kit.view(msgs)


def test_binary_big_value_with_hole_and_orphan():
    value = b"v" * 100_000
    req = breq(0x01, b"big", struct.pack(">II", 0, 0), value, opaque=7)
    p = MemcachedParser()
    out = p.feed(REQ, req[:CAP], len(req), 1, 2)
    out += p.feed(REQ, breq(0x00, b"big", opaque=8), 27, 3, 4)
    resp = struct.pack(">BBHBBHIIQ", 0x81, 0, 0, 4, 0, 0, 4 + len(value), 8, 1) + \
        b"\0\0\0\0" + value
    setr = struct.pack(">BBHBBHIIQ", 0x81, 1, 0, 0, 0, 0, 0, 7, 1)
    out += p.feed(RESP, setr + resp[:CAP - 24], len(resp) + 24, 5, 6)
    assert kit.outcomes(out) == [("set", "OK", False), ("get", "OK", False)]
    assert out[0].size == len(req) and out[3].size == len(resp)
    # A response whose request was never seen does not pair with anything.
    orphan = p.feed(RESP, struct.pack(">BBHBBHIIQ", 0x81, 0x0A, 0, 0, 0, 0, 0, 99, 0), 24, 7, 8)
    assert orphan[0].key == ("orphan", 99)


# -- properties -------------------------------------------------------------------------
text_cmd = st.one_of(
    st.tuples(st.sampled_from([b"set", b"add", b"append"]), st.binary(max_size=40)).map(
        lambda t: b"%s k 0 0 %d\r\n%s\r\n" % (t[0], len(t[1]), t[1])),
    st.lists(st.from_regex(rb"\A[a-z0-9]{1,10}\Z"), min_size=1, max_size=4).map(
        lambda ks: b"get " + b" ".join(ks) + b"\r\n"),
    st.sampled_from([b"version\r\n", b"delete x noreply\r\n", b"incr n 1\r\n", b"mn\r\n"]))
text_reply = st.one_of(
    st.lists(st.binary(max_size=30), max_size=3).map(
        lambda vs: b"".join(b"VALUE k 0 %d\r\n%s\r\n" % (len(v), v) for v in vs) + b"END\r\n"),
    st.sampled_from([b"STORED\r\n", b"NOT_FOUND\r\n", b"42\r\n", b"VERSION 1.6\r\n",
                     b"SERVER_ERROR oom\r\n", b"STAT a 1\r\nSTAT b 2\r\nEND\r\n", b"HD\r\n"]))
bin_msg = st.tuples(st.sampled_from([0x00, 0x01, 0x09, 0x0A, 0x11]), st.binary(max_size=8),
                    st.binary(max_size=40), st.integers(0, 3)).map(
    lambda t: breq(t[0], t[1], b"\0" * 8 if t[0] in (0x01, 0x11) else b"", t[2], t[3]))


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.lists(st.one_of(text_cmd, bin_msg), min_size=1, max_size=6),
       st.lists(text_reply, max_size=6), st.lists(st.integers(0, 400), max_size=12))
def test_property_any_split_gives_the_same_messages(cmds, replies, cuts):
    reqs, resps = b"".join(cmds), b"".join(replies)
    ref = kit.view(run([(REQ, reqs), (RESP, resps)])[1])
    assert len([m for m in ref if m[0]]) == len(cmds)
    assert len([m for m in ref if not m[0]]) == len(replies)
    chunks = [(REQ, c) for c in kit.split(reqs, cuts)] + \
        [(RESP, c) for c in kit.split(resps, cuts)]
    assert kit.view(run(chunks)[1]) == ref


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(kit.syscalls(st.one_of(st.binary(max_size=64), text_cmd, text_reply, bin_msg,
                              st.sampled_from([b"VALUE k 0 99999\r\n", b"\x80", b"\r\n",
                                               b"set k 0 0 99999999\r\n"]))))
def test_property_random_bytes_never_raise_and_stay_bounded(feeds):
    p = MemcachedParser()
    p.streams[REQ].cap = p.streams[RESP].cap = 4096
    list(kit.feed_each(p, feeds))   # checks the streams' bounds after each feed


def test_pending_table_is_bounded():
    p = MemcachedParser()
    for i in range(10000):
        p.feed(REQ, breq(0x09, b"k", opaque=i), 25, 1, 2)
    assert len(p._pending) <= 4096


def test_binary_response_matching_does_not_scan_pending():
    """A response is matched by opaque in O(1) (issue 13): orphan responses cost the same
    with 4,096 requests pending as with none (was a scan of all of them per response)."""
    def orphan(i):
        return struct.pack(">BBHBBHIIQ", 0x81, 0, 0, 0, 0, 1, 0, 10 ** 6 + i, 0)
    resps = b"".join(orphan(i) for i in range(3000))

    def timed(pending):
        best = float("inf")
        for _ in range(3):
            p = MemcachedParser()
            if pending:
                data = b"".join(breq(0, b"k", opaque=i) for i in range(pending))
                p.feed(REQ, data, len(data), 0, 1)
            t = time.perf_counter()
            msgs = p.feed(RESP, resps, len(resps), 2, 3)
            best = min(best, time.perf_counter() - t)
            assert len(msgs) == 3000 and all(m.key[0] == "orphan" for m in msgs)
        return best
    assert timed(4096) < 4 * timed(0) + 0.02
    # Matching still pairs the oldest request with the opaque, the rest stay pending.
    p = MemcachedParser()
    data = breq(0, b"a", opaque=5) + breq(0, b"b", opaque=6) + breq(0, b"c", opaque=5)
    p.feed(REQ, data, len(data), 0, 1)
    (r,) = p.feed(RESP, struct.pack(">BBHBBHIIQ", 0x81, 0, 0, 0, 0, 1, 0, 5, 0), 24, 2, 3)
    assert r.key == 1 and list(p._pending) == [2, 3] and list(p._by_opaque[5]) == [3]


# -- detector ---------------------------------------------------------------------------
def bresp(opcode, status=0, key=b"", extras=b"", value=b""):
    body = extras + key + value
    return struct.pack(">BBHBBHIIQ", 0x81, opcode, len(key), len(extras), 0, status,
                       len(body), 0, 0) + body


POSITIVE = [
    (b"get foo\r\n", 40000, 80, REQUEST),
    (b"gets a b c\r\n", 1, 2, REQUEST),
    (b"set k 0 0 5\r\nhello\r\n", 1, 2, REQUEST),
    (b"prepend k 0 0 1\r\n", 1, 2, REQUEST),
    (b"incr n 1\r\n", 1, 2, REQUEST),
    (b"delete k\r\n", 40000, 11211, REQUEST),
    (b"version\r\n", 40000, 11211, REQUEST),
    (b"stats\r\n", 11211, 40000, REQUEST),
    (b"flush_all\r\n", 1, 11211, REQUEST),
    (b"mg foo v\r\n", 1, 11211, REQUEST),
    (breq(0x00, b"key"), 1, 2, REQUEST),
    (breq(0x01, b"key", b"\0" * 8, b"value"), 1, 2, REQUEST),
    (breq(0x05, b"n", b"\0" * 20), 1, 2, REQUEST),
    (breq(0x08, extras=b"\0" * 4), 1, 2, REQUEST),
    (breq(0x0A), 1, 2, REQUEST),
    (b"STORED\r\n", 1, 2, RESPONSE),
    (b"VALUE foo 0 5\r\nhello\r\nEND\r\n", 1, 2, RESPONSE),
    (b"END\r\n", 11211, 1, RESPONSE),
    (b"NOT_FOUND\r\n", 11211, 1, RESPONSE),
    (b"VERSION 1.6.18\r\n", 11211, 1, RESPONSE),
    (b"SERVER_ERROR out of memory\r\n", 11211, 1, RESPONSE),
    (b"HD\r\n", 11211, 1, RESPONSE),
    (bresp(0x00, 0, extras=b"\0" * 4, value=b"v"), 11211, 1, RESPONSE),
    (bresp(0x00, 1, value=b"Not found"), 1, 11211, RESPONSE),
]
NEGATIVE = [
    (b"GET / HTTP/1.1\r\n", 1, 11211, 0),
    (b"get  foo\r\n", 1, 2, 0),                  # no key byte after the word
    (b"delete 42\r\n", 1, 11300, 0),             # beanstalkd, not on the memcached port
    (b"version\r\n", 1, 2, 0),
    (b"END\r\n", 1, 2, 0),
    (b"OK\r\n", 1, 2, 0),
    (b"get foo\r\n", 1, 11211, 0, "udp"),
    (breq(0x01, b"key"), 1, 2, 0),               # set without its 8 bytes of extras
    (breq(0x00, b"key")[:23], 1, 2, 0),
    (b"\x80\x2e\x01\x03\x01" + bytes(27), 1, 2, 0),   # SSLv2-style hello
    (bresp(0x00, 0x99), 11211, 1, 0),
    (bresp(0x00, 0), 1, 2, 0),                   # binary replies only on the port
    (b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03", 1, 11211, 0),
    (b"g", 1, 11211, 0),
    (b"", 1, 11211, 0),
]


words = [b"get ", b"set ", b"delete ", b"version\r", b"STORED\r\n", b"VALUE ", b"END\r\n",
         b"HD ", b"k", b" ", b"\r\n", b"\x80", b"\x81", b"\x00", b"mn\r\n", b"flush_al"]
# Found by tests/test_detectors.py, which runs the kit's DetectorSuite on it.
detect_cases = kit.DetectCases(
    MemcachedProtocol, POSITIVE, NEGATIVE, ports=(11211,),
    inputs=st.one_of(st.lists(st.sampled_from(words), max_size=6).map(b"".join), bin_msg,
                     st.builds(lambda o, s, x: bresp(o, s, value=x), st.integers(0, 0x30),
                               st.sampled_from([0, 1, 0x81, 0x99]), st.binary(max_size=8))))


def test_protocol_class():
    proto = MemcachedProtocol(MemcachedProtocol.config_class())
    assert proto.name == "memcached" and isinstance(proto.parser(), MemcachedParser)
