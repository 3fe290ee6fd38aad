"""HTTP/2 + gRPC plugin: parser on real bytes (a grpcio client and server through a
recording proxy), on hand-built frames (hpack.Encoder), with holes, a missed connection
start, property tests, and the detectors (Python and in-kernel)."""

import time
from concurrent import futures

import grpc
import hpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deeptrace_core import testing as kit
from deeptrace_core.l7 import REQ, REQUEST, RESP, RESPONSE
from deeptrace_plugins.protocols.http1.plugin import Http1Protocol
from deeptrace_plugins.protocols.http2 import parser as h2
from deeptrace_plugins.protocols.http2.plugin import Http2Protocol

PREFACE = h2.PREFACE
MISSED = h2.PLACEHOLDER_MISSED
LOST = h2.PLACEHOLDER_LOST


# -- helpers -------------------------------------------------------------------------------

def feed(records, cap=None):
    p = Http2Protocol().parser()
    return p, kit.feed(p, records, cap=cap)


def put(p, side, data, ts=0):
    return kit.put(p, side, data, ts, ts)


def summary(msgs):
    return kit.view(msgs, ("is_request", "key", "operation", "status", "error", "size",
                           "protocol", "attributes"))


def by_key(msgs):
    """{key: (request operation, response status)} as the stage pairs them."""
    reqs = {m.key: m for m in msgs if m.is_request}
    return {m.key: (reqs[m.key].operation if m.key in reqs else None, m.status)
            for m in msgs if not m.is_request}


def frame(ftype, flags, sid, payload=b""):
    return (len(payload).to_bytes(3, "big") + bytes([ftype, flags]) + sid.to_bytes(4, "big")
            + payload)


def settings_frame(**params):
    ids = {"header_table_size": 1, "enable_push": 2, "max_concurrent_streams": 3,
           "initial_window_size": 4, "max_frame_size": 5}
    return frame(h2.SETTINGS, 0, 0, b"".join(ids[k].to_bytes(2, "big") + v.to_bytes(4, "big")
                                             for k, v in params.items()))


# -- real bytes: grpcio client and server --------------------------------------------------

SVC = "helloworld.Greeter"


def _say(req, ctx):
    return b"hello " + req


def _fail(req, ctx):
    ctx.abort(grpc.StatusCode.NOT_FOUND, "no such greeting")


def _slow(req, ctx):
    time.sleep(0.5)
    return b"late"


def _stream(req, ctx):
    for i in range(3):
        yield b"part %d" % i


@pytest.fixture(scope="module")
def grpc_capture():
    """One channel (one connection): assorted calls, then 20 concurrent ones.
    Returns (records, calls) with calls[i] = (operation, grpc status) of stream 2i+1."""
    server = grpc.server(futures.ThreadPoolExecutor(24))
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SVC, {
        "SayHello": grpc.unary_unary_rpc_method_handler(_say),
        "Fail": grpc.unary_unary_rpc_method_handler(_fail),
        "Slow": grpc.unary_unary_rpc_method_handler(_slow),
        "Stream": grpc.unary_stream_rpc_method_handler(_stream)})])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    rec = kit.Recorder(port)
    channel = grpc.insecure_channel(f"127.0.0.1:{rec.port}",
                                    options=[("grpc.enable_http_proxy", 0)])
    method = {m: channel.unary_unary(f"/{SVC}/{m}") for m in ("SayHello", "Fail", "Nope", "Slow")}
    calls = []

    def call(name, arg=b"x", **kw):
        try:
            method[name](arg, timeout=5, **kw)
            code = grpc.StatusCode.OK
        except grpc.RpcError as exc:
            code = exc.code()
        calls.append((f"{SVC}/{name}", str(code.value[0])))

    call("SayHello", b"x" * 3000)          # a body bigger than the 1024-byte capture
    call("Fail")
    call("Nope")                           # unimplemented: a trailers-only response
    assert len(list(channel.unary_stream(f"/{SVC}/Stream")(b"s", timeout=5))) == 3
    calls.append((f"{SVC}/Stream", "0"))
    slow = method["Slow"].future(b"c")
    time.sleep(0.1)
    slow.cancel()                          # the client resets the stream
    calls.append((f"{SVC}/Slow", "1"))
    names = ["SayHello" if i % 2 else "Fail" for i in range(20)]
    pending = [method[n].future(b"n%d" % i, timeout=5) for i, n in enumerate(names)]
    for n, f in zip(names, pending):
        assert (f.exception() is None) == (n == "SayHello")
    calls += [(f"{SVC}/{n}", "0" if n == "SayHello" else "5") for n in names]
    time.sleep(0.6)                        # the cancelled Slow call finishes server-side
    channel.close()
    rec.close()
    server.stop(0)
    assert len(rec.conns) == 1
    return rec.conns[0], calls


def expected(calls):
    return {2 * i + 1: c for i, c in enumerate(calls)}


def test_grpc_real_calls(grpc_capture):
    records, calls = grpc_capture
    p, msgs = feed(records)
    assert p.errors == 0 and p.hpack_failures == 0 and not p.missed_start
    assert by_key(msgs) == expected(calls)
    assert len(msgs) == 2 * len(calls)
    assert all(m.protocol == "grpc" for m in msgs)
    first = next(m for m in msgs if m.is_request)
    assert first.attributes["rpc.system"] == "grpc"
    assert first.attributes["rpc.service"] == SVC
    assert first.attributes["rpc.method"] == "SayHello"
    assert first.attributes["http.request.body.size"] == 3005
    assert first.attributes["server.address"] == "127.0.0.1"
    resp = {m.key: m for m in msgs if not m.is_request}
    assert resp[1].attributes["rpc.grpc.status_code"] == 0 and not resp[1].error
    assert resp[3].error and resp[3].status == "5"
    assert resp[7].attributes["http.response.body.size"] == 3 * 11   # 3 streamed messages
    assert resp[9].attributes.get("deeptrace.incomplete")            # cancelled by the client
    # Bytes of each stream add up: request sizes are at least their DATA.
    assert first.size > 3005 + 9


def test_grpc_20_concurrent_calls_pair_by_stream(grpc_capture):
    records, calls = grpc_capture
    msgs = feed(records)[1]
    want = expected(calls)
    concurrent = {k: v for k, v in by_key(msgs).items() if k >= 11}
    assert len(concurrent) == 20
    assert concurrent == {k: v for k, v in want.items() if k >= 11}
    assert {v for v in concurrent.values()} == {(f"{SVC}/SayHello", "0"), (f"{SVC}/Fail", "5")}


def test_grpc_coalesced_and_byte_split(grpc_capture):
    records, _ = grpc_capture
    want = summary(feed(records)[1])
    merged = []
    for side, data in records:     # consecutive records of one side in one feed
        if merged and merged[-1][0] == side:
            merged[-1] = (side, merged[-1][1] + data)
        else:
            merged.append((side, data))
    assert summary(feed(merged)[1]) == want
    tiny = [(s, d[i:i + 7]) for s, d in records for i in range(0, len(d), 7)]
    assert summary(feed(tiny)[1]) == want


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(st.data())
def test_grpc_random_splits_same_messages(grpc_capture, data):
    records, _ = grpc_capture
    want = summary(feed(records)[1])
    split = []
    for side, blob in records:
        cuts = sorted(set(data.draw(st.lists(st.integers(1, max(1, len(blob) - 1)),
                                             max_size=3))))
        split += [(side, blob[a:b]) for a, b in zip([0] + cuts, cuts + [len(blob)]) if a < b]
    assert summary(feed(split)[1]) == want


def _no_misparse(msgs, want):
    """Every decoded operation and status is the true one of its stream."""
    for m in msgs:
        op, status = want[m.key]
        if m.is_request:
            assert m.operation in (op, MISSED, LOST), m
        elif m.status is not None:
            assert m.status == status, m


def test_grpc_capture_holes(grpc_capture):
    """The probe keeps 1024 (or fewer) bytes per syscall: frames cut by the capture lose
    their HPACK content, never their framing, and nothing is misparsed."""
    records, calls = grpc_capture
    want = expected(calls)
    for cap in (1024, 200, 64, 9):
        p, msgs = feed(records, cap=cap)
        _no_misparse(msgs, want)
        assert all(m.key in want for m in msgs)
    p, msgs = feed(records, cap=1024)
    first = msgs[0]                                    # its 3000-byte DATA was skipped
    assert (first.key, first.operation) == (1, want[1][0])
    assert first.attributes["http.request.body.size"] == 3005


def first_request_headers(records):
    """Index of the record holding the client's first HEADERS frame."""
    for i, (side, data) in enumerate(records):
        pos = len(PREFACE) if data.startswith(PREFACE) else 0
        while side == REQ and pos + 9 <= len(data):
            if data[pos + 3] == h2.HEADERS:
                return i
            pos += 9 + int.from_bytes(data[pos:pos + 3], "big")
    raise AssertionError("no HEADERS")


@pytest.mark.parametrize("start", range(1, 12))
def test_grpc_missed_connection_start(grpc_capture, start):
    """The agent attached mid-connection: records[start:] only."""
    records, calls = grpc_capture
    want = expected(calls)
    # The proxy may record the server's first SETTINGS before the client's preface:
    # a missed start means at least the preface was missed.
    preface = next(i for i, (side, data) in enumerate(records)
                   if side == REQ and data.startswith(b"PRI * HTTP/2.0"))
    p, msgs = feed(records[max(start, preface + 1):])
    assert p.missed_start
    assert all(m.attributes["deeptrace.http2.missed_start"] is True for m in msgs)
    _no_misparse(msgs, want)
    pairs = by_key(msgs)
    assert all(pairs.get(k) is not None for k in range(11, 50, 2))  # 20 concurrent calls
    if start > first_request_headers(records):   # its new table entries were missed
        assert p.hpack_failures > 0
        assert any(m.operation == MISSED for m in msgs)


def test_grpc_missed_start_mid_frame(grpc_capture):
    """Starting inside a frame: bytes are dropped until a plausible frame header."""
    records, calls = grpc_capture
    big = next(i for i, (s, d) in enumerate(records) if s == REQ and len(d) > 3000)
    cut = [(records[big][0], records[big][1][100:])] + records[big + 1:]
    p, msgs = feed(cut)
    assert p.missed_start and p.errors >= 1
    _no_misparse(msgs, expected(calls))
    assert len(by_key(msgs)) >= 20


# -- hand-built frames ---------------------------------------------------------------------

def plain_exchange():
    """A browser-like HTTP/2 connection: GET (padded+priority), POST split in
    CONTINUATION with a body, a 100-continue interim, trailers; interleaved streams."""
    ce, se = hpack.Encoder(), hpack.Encoder()
    get = ce.encode([(":method", "GET"), (":scheme", "https"), (":authority", "example.com"),
                     (":path", "/index.html?lang=en"), ("user-agent", "browser/1"),
                     ("cookie", "session=secret")])
    post = ce.encode([(":method", "POST"), (":scheme", "https"), (":authority", "example.com"),
                      (":path", "/api/items"), ("content-type", "application/json"),
                      ("authorization", "Bearer hunter2")])
    req = [PREFACE + settings_frame(header_table_size=4096, enable_push=0),
           frame(h2.HEADERS, 0x1 | 0x4 | 0x8 | 0x20, 1,
                 bytes([3]) + b"\x00\x00\x00\x00\x10" + get + b"\x00" * 3),
           frame(h2.HEADERS, 0, 3, post[:10]) + frame(h2.CONTINUATION, 0x4, 3, post[10:]),
           frame(h2.DATA, 0, 3, b'{"a":') + frame(h2.WINDOW_UPDATE, 0, 0, b"\x00\x01\x00\x00"),
           frame(h2.DATA, 0x1, 3, b'1}')]
    resp = [settings_frame(max_concurrent_streams=100) + frame(h2.SETTINGS, 0x1, 0),
            frame(h2.HEADERS, 0x4, 3, se.encode([(":status", "100")])),
            frame(h2.HEADERS, 0x4, 1, se.encode([(":status", "200"),
                                                 ("content-type", "text/html"),
                                                 ("set-cookie", "id=secret2")])),
            frame(h2.DATA, 0, 1, b"<html>") + frame(h2.HEADERS, 0x4, 3, se.encode(
                [(":status", "503"), ("content-type", "application/json")])),
            frame(h2.DATA, 0x8, 3, b"\x02err\x00\x00") + frame(h2.DATA, 0, 1, b"</html>"),
            frame(0x10, 0, 0, b"\x00\x00\x00\x01u=1") +                   # unknown type
            frame(h2.HEADERS, 0x5, 1, se.encode([("x-trailer", "t")])),
            frame(h2.DATA, 0x1, 3, b"")]
    return [(REQ, req[0]), (RESP, resp[0]), (REQ, req[1]), (REQ, req[2]), (REQ, req[3]),
            (RESP, resp[1]), (REQ, req[4]), (RESP, resp[2]), (RESP, resp[3]),
            (RESP, resp[4]), (RESP, resp[5]), (RESP, resp[6])]


def test_plain_http2_exchange():
    records = plain_exchange()
    p, msgs = feed(records)
    assert p.errors == 0 and p.hpack_failures == 0 and not p.missed_start
    assert by_key(msgs) == {1: ("GET /index.html", "200"), 3: ("POST /api/items", "503")}
    get = next(m for m in msgs if m.key == 1 and m.is_request)
    assert get.attributes["http.request.method"] == "GET"
    assert get.attributes["url.query"] == "lang=en"
    assert get.attributes["url.scheme"] == "https"
    assert get.attributes["server.address"] == "example.com"
    assert get.attributes["user_agent.original"] == "browser/1"
    assert get.attributes["http.request.header.cookie"] == "[REDACTED]"
    assert get.protocol is None and get.size == len(records[2][1])
    resp = {m.key: m for m in msgs if not m.is_request}
    assert resp[1].attributes["http.response.body.size"] == 13
    assert resp[1].attributes["http.response.header.set-cookie"] == "[REDACTED]"
    assert resp[3].error and not resp[1].error
    assert "secret" not in repr(msgs) and "hunter2" not in repr(msgs)
    # Every byte of a stream's frames is counted in its message.
    post = next(m for m in msgs if m.key == 3 and m.is_request)
    assert post.size == len(records[3][1]) + 9 + 5 + 9 + 2


def test_plain_http2_split_anywhere():
    records = plain_exchange()
    want = summary(feed(records)[1])
    for i, (side, data) in enumerate(records):
        for cut in range(1, len(data)):
            split = records[:i] + [(side, data[:cut]), (side, data[cut:])] + records[i + 1:]
            assert summary(feed(split)[1]) == want, (i, cut)


def test_header_table_size_setting_honoured():
    """The server allows a 100 kB table; the client's encoder then resizes to it."""
    big = 100_000
    enc = hpack.Encoder()
    enc.header_table_size = big                       # emits a size update in the block
    block = enc.encode([(":method", "GET"), (":path", "/t"), (":scheme", "http"),
                        (":authority", "h")])
    req = frame(h2.HEADERS, 0x5, 1, block)
    honoured = [(REQ, PREFACE + settings_frame()), (RESP, settings_frame(header_table_size=big)),
                (REQ, req)]
    p, msgs = feed(honoured)
    assert [m.operation for m in msgs] == ["GET /t"] and p.hpack_failures == 0
    refused = [(REQ, PREFACE + settings_frame()), (RESP, settings_frame()), (REQ, req)]
    p, msgs = feed(refused)
    assert [m.operation for m in msgs] == [LOST] and p.hpack_failures == 1


def test_server_reset_and_client_cancel():
    ce, se = hpack.Encoder(), hpack.Encoder()
    hdr = lambda path, ct: ce.encode([(":method", "POST"), (":scheme", "http"),  # noqa: E731
                                      (":path", path), (":authority", "h"),
                                      ("content-type", ct)])
    records = [(REQ, PREFACE + settings_frame()), (RESP, settings_frame()),
               (REQ, frame(h2.HEADERS, 0x5, 1, hdr("/upload", "text/plain"))),
               (RESP, frame(h2.RST_STREAM, 0, 1, (7).to_bytes(4, "big"))),    # REFUSED
               (REQ, frame(h2.HEADERS, 0x4, 3, hdr("/pkg.Svc/Watch", "application/grpc"))),
               (RESP, frame(h2.HEADERS, 0x4, 3, se.encode([(":status", "200")]))),
               (REQ, frame(h2.RST_STREAM, 0, 3, (8).to_bytes(4, "big"))),     # CANCEL
               (REQ, frame(h2.DATA, 0x1, 3, b"late")),                         # ignored
               (REQ, frame(h2.HEADERS, 0x4, 5, hdr("/pkg.Svc/Get", "application/grpc"))),
               (RESP, frame(h2.RST_STREAM, 0, 5, (0).to_bytes(4, "big")))]
    p, msgs = feed(records)
    assert by_key(msgs) == {1: ("POST /upload", None), 3: ("pkg.Svc/Watch", "1"),
                            5: ("pkg.Svc/Get", "13")}
    resp = {m.key: m for m in msgs if not m.is_request}
    assert resp[1].error and resp[1].attributes["deeptrace.http2.rst_stream"] == "REFUSED_STREAM"
    assert resp[3].error and resp[3].protocol == "grpc" and resp[3].ts_end == 61
    req5 = next(m for m in msgs if m.key == 5 and m.is_request)
    assert req5.attributes["deeptrace.incomplete"]      # reset before its END_STREAM
    assert len(msgs) == 6 and p.errors == 0


def test_grpc_trailers_only_and_http_error_mapping():
    ce, se = hpack.Encoder(), hpack.Encoder()
    req = lambda sid: frame(h2.HEADERS, 0x5, sid, ce.encode(  # noqa: E731
        [(":method", "POST"), (":scheme", "http"), (":path", "/a.B/C"), (":authority", "h"),
         ("content-type", "application/grpc")]))
    records = [(REQ, PREFACE + settings_frame()), (RESP, settings_frame()),
               (REQ, req(1) + req(3)),
               (RESP, frame(h2.HEADERS, 0x5, 1, se.encode(
                   [(":status", "200"), ("content-type", "application/grpc"),
                    ("grpc-status", "14"), ("grpc-message", "unavailable")]))),
               (RESP, frame(h2.HEADERS, 0x5, 3, se.encode(
                   [(":status", "404"), ("content-type", "text/html")])))]
    p, msgs = feed(records)
    assert by_key(msgs) == {1: ("a.B/C", "14"), 3: ("a.B/C", "12")}
    assert all(m.error for m in msgs if not m.is_request)


def test_big_data_frame_in_hole_then_more_frames():
    ce = hpack.Encoder()
    hdr = ce.encode([(":method", "PUT"), (":scheme", "http"), (":path", "/blob"),
                     (":authority", "h")])
    p = Http2Protocol().parser()
    put(p, REQ, PREFACE + settings_frame())
    put(p, RESP, settings_frame(max_frame_size=32768))  # lets the client send 30 kB frames
    put(p, REQ, frame(h2.HEADERS, 0x4, 1, hdr))
    one = frame(h2.DATA, 0x1, 1, b"d" * 30000)
    msgs = p.feed(REQ, one[:1024], len(one), 5, 6)              # payload skipped over the hole
    msgs += put(p, REQ, frame(h2.HEADERS, 0x5, 3, ce.encode(
        [(":method", "GET"), (":scheme", "http"), (":path", "/next"), (":authority", "h")])))
    assert [m.operation for m in msgs] == ["PUT /blob", "GET /next"] and p.errors == 0
    assert msgs[0].attributes["http.request.body.size"] == 30000
    assert msgs[0].size == 9 + len(hdr) + len(one)
    # A frame header inside the hole cannot be found: that syscall's rest is dropped.
    p = Http2Protocol().parser()
    put(p, REQ, PREFACE + settings_frame())
    put(p, REQ, frame(h2.HEADERS, 0x4, 1, hdr))
    two = frame(h2.DATA, 0, 1, b"d" * 16000) + frame(h2.DATA, 0x1, 1, b"e" * 16000)
    assert p.feed(REQ, two[:1024], len(two), 5, 6) == [] and p.errors == 1


def test_headers_cut_by_capture_then_no_misparse():
    """A HEADERS frame cut by the capture: its stream gets a placeholder; later blocks
    that reference table entries it may have added fail; static-only ones decode."""
    ce = hpack.Encoder()
    long_hdr = [(":method", "GET"), (":scheme", "http"), (":path", "/first"),
                (":authority", "h"), ("x-pad", "p" * 2000)]
    first = frame(h2.HEADERS, 0x5, 1, ce.encode(long_hdr))
    again = frame(h2.HEADERS, 0x5, 3, ce.encode(long_hdr[:3] + long_hdr[3:4]))  # indexed
    plain = hpack.Encoder()
    plain.header_table_size = 0                    # emits literals only, plus a size update
    fresh = frame(h2.HEADERS, 0x5, 5, plain.encode([(":method", "GET"), (":scheme", "http"),
                                                     (":path", "/third"), (":authority", "h")]))
    p = Http2Protocol().parser()
    msgs = put(p, REQ, PREFACE + settings_frame())
    msgs += p.feed(REQ, first[:1024], len(first), 1, 1)
    msgs += put(p, REQ, again) + put(p, REQ, fresh)
    assert [(m.key, m.operation) for m in msgs] == [(1, LOST), (3, LOST), (5, "GET /third")]
    assert p.hpack_failures == 2 and not p.missed_start and p.errors == 0


def test_streams_and_closed_ids_bounded():
    ce = hpack.Encoder()
    p = Http2Protocol().parser()
    put(p, REQ, PREFACE + settings_frame())
    hdr = ce.encode([(":method", "POST"), (":scheme", "http"), (":path", "/x"),
                     (":authority", "h")])
    for sid in range(1, 2 * (h2.MAX_STREAMS + 500), 2):      # opened, never ended
        put(p, REQ, frame(h2.HEADERS, 0x4, sid, hdr))
    assert len(p.h2streams) == h2.MAX_STREAMS
    assert len(p.closed) == len(p.closed_set) == 500
    for _ in range(50):
        put(p, REQ, frame(h2.HEADERS, 0x4, 1, b"\xbe" * 16000))  # huge blocks, never ended
        assert len(p.streams[REQ]) <= p.stream_cap
        assert p.block[REQ] is None or len(p.block[REQ].frag) <= h2.MAX_BLOCK


def held_header_bytes(p):
    return sum(len(k) + len(v) for st in p.h2streams.values() for half in (st.req, st.resp)
               for k, v in (half.headers or {}).items())


def test_hpack_amplified_headers_are_budgeted_per_connection():
    """One 4 KB table entry, then ~20-byte header blocks naming it 16 times on 4,095
    streams (issue 13: +328 MB): what open streams hold stays within a per-connection
    budget, the blocks past it are counted, and streams still pair by id."""
    ce = hpack.Encoder()
    p = Http2Protocol().parser()
    put(p, REQ, PREFACE + settings_frame())
    first = ce.encode([(":method", "GET"), (":scheme", "http"), (":path", "/"),
                       ("x-big", "v" * 3900)])
    put(p, REQ, frame(h2.HEADERS, 0x4, 1, first))
    amplified = b"\x82\x86\x84" + b"\xbe" * 16   # GET http / + 16 x entry 62 (x-big)
    sids = range(3, 2 * 4096, 2)
    put(p, REQ, b"".join(frame(h2.HEADERS, 0x4, sid, amplified) for sid in sids))
    assert held_header_bytes(p) <= 2 << 20          # was 4,095 x 64 KB: 256 MB
    assert len(p.h2streams) <= 1024 and p.errors > 0
    assert p.header_bytes == held_header_bytes(p)
    # Streams that end give their bytes back: the budget serves new ones again.
    resp = hpack.Encoder().encode([(":status", "200")])
    sid = max(p.h2streams)
    msgs = put(p, RESP, frame(h2.HEADERS, 0x5, sid, resp))
    assert [(m.key, m.is_request) for m in msgs] == [(sid, True), (sid, False)]
    assert p.header_bytes == held_header_bytes(p)


def test_http1_and_garbage_are_not_http2():
    p = Http2Protocol().parser()
    msgs = put(p, REQ, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    msgs += put(p, RESP, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    msgs += put(p, REQ, b"\xff" * 100)
    assert msgs == [] and p.errors == 3


# -- property tests ------------------------------------------------------------------------

@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.booleans(),
       st.lists(st.tuples(st.sampled_from([REQ, RESP]), st.binary(max_size=200),
                          st.integers(0, 50000)), max_size=12))
def test_random_bytes_never_raise(preface, records):
    p = Http2Protocol().parser()
    if preface:
        put(p, REQ, PREFACE)
    for side, data, extra in records:
        p.feed(side, data, len(data) + extra, 0, 0)
        assert len(p.streams[side]) <= p.stream_cap
        assert len(p.h2streams) <= h2.MAX_STREAMS


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from([REQ, RESP]), st.sampled_from(range(10)),
                          st.integers(0, 255), st.sampled_from([0, 1, 2, 3, 5]),
                          st.binary(max_size=40)), max_size=20))
def test_random_frames_never_raise(frames):
    """Well-framed but arbitrary frames: HPACK garbage, bad flags, stray CONTINUATIONs."""
    p = Http2Protocol().parser()
    put(p, REQ, PREFACE)
    for side, ftype, flags, sid, payload in frames:
        for m in put(p, side, frame(ftype, flags, sid, payload)):
            assert m.key == sid


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_plain_random_splits_same_messages(data):
    records = plain_exchange()
    want = summary(feed(records)[1])
    split = []
    for side, blob in records:
        cuts = sorted(set(data.draw(st.lists(st.integers(1, len(blob) - 1), max_size=6))))
        split += [(side, blob[a:b]) for a, b in zip([0] + cuts, cuts + [len(blob)])]
    assert summary(feed(split)[1]) == want


NAMES = ["content-type", "x-request-id", "accept", "x-other"]
VALUES = ["a", "bb", "text/plain", "application/json", "0123456789" * 3, ""]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.lists(st.tuples(st.sampled_from(NAMES), st.sampled_from(VALUES)),
                         max_size=5), min_size=1, max_size=15),
       st.integers(0, 15), st.sampled_from([0, 64, 256, 1024, 4096]), st.booleans())
def test_hpack_missed_start_never_misparses(blocks, start, table, preface):
    """Header blocks from a real encoder, the first `start` of them unseen: every block we
    decode is exactly what was sent, whatever table entries the unseen ones added."""
    enc = hpack.Encoder()
    enc.header_table_size = table
    sent = []
    for i, hdrs in enumerate(blocks):
        base = [(":method", "GET"), (":scheme", "http"), (":path", f"/p{i}"),
                (":authority", "h")]
        sent.append(frame(h2.HEADERS, 0x5, 2 * i + 1, enc.encode(base + hdrs)))
    p = Http2Protocol().parser()
    msgs = put(p, REQ, PREFACE + settings_frame()) if preface and not start else []
    for f in sent[start:]:
        msgs += put(p, REQ, f)
    assert [m.key for m in msgs] == [2 * i + 1 for i in range(start, len(blocks))]
    for m in msgs:
        i = (m.key - 1) // 2
        if m.operation == MISSED:
            continue
        assert m.operation == f"GET /p{i}"
        want = {}
        for k, v in blocks[i]:
            want[k] = f"{want[k]}, {v}" if k in want else v
        got = {k.rsplit(".", 1)[1]: v for k, v in m.attributes.items()
               if k.startswith("http.request.header.")}
        assert got == {k: v for k, v in want.items() if k in ("content-type", "accept",
                                                              "x-request-id")}
    if start < len(blocks):
        assert p.missed_start == (start > 0 or not preface)


# -- detectors -----------------------------------------------------------------------------

def _headers(flags, first, sid=1, length=20):
    pre = (b"\x03" if flags & 0x8 else b"") + (b"\x00\x00\x00\x00\x10" if flags & 0x20 else b"")
    return frame(h2.HEADERS, flags, sid, (pre + bytes([first]) + b"\x00" * length)[:length])


POSITIVE = [(PREFACE, REQUEST), (PREFACE + settings_frame(enable_push=0), REQUEST),
            (settings_frame(max_concurrent_streams=100, initial_window_size=65535), RESPONSE),
            (frame(h2.SETTINGS, 0, 0), RESPONSE),
            (_headers(0x4, 0x88), RESPONSE), (_headers(0x5, 0x8d), RESPONSE),
            (_headers(0x24, 0x83, length=30), REQUEST), (_headers(0x2c, 0x82, length=30), REQUEST),
            (_headers(0x0c, 0x88, sid=7), RESPONSE)]
NEGATIVE = [b"", PREFACE[:23], b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n",
            frame(h2.SETTINGS, 0x1, 0),                          # an ACK: either side
            frame(h2.SETTINGS, 0, 1, b"\x00\x03\x00\x00\x00\x64"),
            frame(h2.SETTINGS, 0, 0, b"\x00\x03\x00\x00\x00"),
            frame(h2.SETTINGS, 0, 0, b"\x00\x00\x00\x00\x00\x64"),
            frame(h2.SETTINGS, 0, 0, b"\x00\x03\x00\x00\x00\x64" * 17),
            _headers(0x4, 0x88, sid=2), _headers(0x4, 0x84), _headers(0x44, 0x88),
            _headers(0x4, 0x88)[:9], frame(h2.HEADERS, 0x4, 1),
            b"\x00\x00\x08\x06\x00\x00\x00\x00\x00" + b"\x00" * 8,       # PING
            b"\x00\x00\x04\x08\x00\x00\x00\x00\x00\x00\x01\x00\x00",   # WINDOW_UPDATE
            b"\x80" + b"\x00" * 31, b"\x00\x00\x12\x04\x00\x80\x00\x00\x00" + b"\x00" * 18,
            b"GET / HTTP/1.1\r\n", b"HTTP/1.1 200 OK\r\n", b"*1\r\n$4\r\nPING\r\n",
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
            b"\x4a\x00\x00\x00\x0a\x38\x2e\x30\x2e\x33\x32\x00"]  # MySQL greeting


# Found by tests/test_detectors.py, which runs the kit's DetectorSuite on it.
detect_cases = kit.DetectCases(
    Http2Protocol, [(d, 5000, 443, want) for d, want in POSITIVE],
    [(d, 5000, 443, 0) for d in NEGATIVE] + [(d, 5000, 443, 0, "udp") for d, _ in POSITIVE],
    ports=(443,),
    inputs=st.builds(lambda ln, t, f, s, rest: ln.to_bytes(3, "big") + bytes([t, f]) +
                     s.to_bytes(4, "big") + rest,
                     st.integers(0, 20000), st.sampled_from([1, 4, 0, 6]), st.integers(0, 255),
                     st.integers(0, 2 ** 32 - 1), st.binary(max_size=24)))


def test_detectors_do_not_overlap(grpc_capture):
    records, _ = grpc_capture
    # The proxy may record the server's SETTINGS before the client's preface.
    first_req = next(data for side, data in records if side == "req")
    assert Http2Protocol.detect(first_req, 1, 2, "tcp") == REQUEST
    first_resp = next(data for side, data in records if side == "resp")
    assert Http2Protocol.detect(first_resp, 1, 2, "tcp") == RESPONSE
    for _, data in records:
        assert Http1Protocol.detect(data, 1, 2, "tcp") == 0
    for data in (b"GET / HTTP/1.1\r\n", b"HTTP/1.1 200 OK\r\n", b"POST /x HTTP/1.1\r\n"):
        assert Http2Protocol.detect(data, 1, 2, "tcp") == 0


def test_kernel_detector_matches_python_on_real_bytes(grpc_capture):
    kit.assert_kernel_matches(kit.kernel_detector(Http2Protocol), Http2Protocol.detect,
                              [(d[:40], 1234, 443, l4) for _, d in grpc_capture[0]
                               for l4 in ("tcp", "udp")])
