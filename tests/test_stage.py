"""The spans stage and the Stream it gives parsers, on synthetic records (no kernel):
pairing by key and FIFO, roles, timing, holes, bounds, timeouts and closes."""

import time
import types

import attrs
import pytest

from deeptrace_core.l7 import (REQ, REQUEST, RESP, RESPONSE, Message, ParseError, Parser,
                                ProtocolBase, Stream)
from deeptrace_core.registry import Registry
from deeptrace_plugins.protocols.stage import SpanStage, SpansConfig
from deeptrace_plugins.trace.decoder import SocketRecord


class LineParser(Parser):
    """Toy protocol: 'ASK <id> <word>\\n' -> 'ANS <id> <status>\\n'; id '-' means FIFO.
    Its own error rule: a 'denied' answer is an error for the client only."""
    protocol = "toy"

    def __init__(self, max_words=100):
        super().__init__()
        self.max_words = max_words
        self.resets = []

    def reset(self, side):
        self.resets.append(side)
        super().reset(side)

    def span_error(self, status, role, protocol):
        return status == "denied" and role == "client"

    def parse(self, side, stream):
        data = stream.peek()
        end = data.find(b"\n")
        if end < 0:
            if len(data) > 100:
                raise ParseError("line too long")
            stream.need(len(data) + 1)  # a hole before the newline: ParseError
            return []
        parts = data[:end].decode("latin-1").split(" ", 2)
        if len(parts) != 3 or parts[0] not in ("ASK", "ANS", "TELL"):
            raise ParseError(parts[0])
        word, mid, rest = parts
        if rest == "crash":
            raise RuntimeError("a parser bug")
        stream.consume(end + 1)
        key = None if mid == "-" else mid
        if word == "ANS":
            return [stream.stamp(Message(False, key=key, status=rest, error=rest == "bad"))]
        return [stream.stamp(Message(True, key=key, operation=rest,
                                     expects_response=word == "ASK"))]


@attrs.define
class ToyConfig:
    max_words: int = attrs.field(default=100, validator=attrs.validators.ge(1))


class Toy(ProtocolBase):
    name = "toy"
    config_class = ToyConfig
    detect_c = ("tests", "toy.bpf.c")     # never compiled here
    parser_class = LineParser

    @staticmethod
    def detect(data, lport, rport, l4):
        return REQUEST if data.startswith((b"ASK", b"TELL")) else \
            RESPONSE if data.startswith(b"ANS") else 0

    def parser(self):
        return LineParser(max_words=self.config.max_words)


class Other(Toy):
    name = "other"
    config_class = attrs.make_class("OtherConfig", [])

    @staticmethod
    def detect(data, lport, rport, l4):
        return 0


def registry():
    reg = Registry()
    reg.current_plugin = "toy"
    reg.add_protocol(Toy)
    reg.add_protocol(Other)
    return reg


def stage(**cfg):
    return SpanStage(SpansConfig(**cfg), types.SimpleNamespace(registry=registry()))


T0 = time.time_ns()


@pytest.fixture(autouse=True)
def _now():
    """Records are stamped 'now' per test: requests older than 60 s would time out."""
    global T0
    T0 = time.time_ns()


def rec(payload, direction="egress", t=0, nbytes=None, conn=1, pid=100, syscall=None,
        seq=None, protocol=None, role=None, tid=None):
    return SocketRecord(
        ts_enter_ns=T0 + t, ts_exit_ns=T0 + t + 10, pid=pid, tid=tid or pid, comm="app",
        fd=5, syscall=syscall or ("write" if direction == "egress" else "read"),
        direction=direction, l4="tcp", family="ipv4", local_addr="127.0.0.1",
        local_port=4000, remote_addr="127.0.0.1", remote_port=5000,
        bytes=len(payload) if nbytes is None else nbytes, tcp_seq_start=seq,
        tcp_seq_end=None if seq is None else seq + (nbytes or len(payload)),
        payload=payload, conn_id=conn, protocol=protocol, role=role)


def test_client_fifo_pipelining_and_timing():
    st = stage()
    spans = st.process([rec(b"ASK - one\nASK - two\n", t=0, seq=100),
                        rec(b"ANS - ok\n", "ingress", t=1000, seq=900),
                        rec(b"ANS - bad\n", "ingress", t=2000, seq=909)])
    assert [(s.operation, s.status, s.error, s.role) for s in spans] == [
        ("one", "ok", False, "client"), ("two", "bad", True, "client")]
    assert spans[0].start_ns == T0 and spans[0].end_ns == T0 + 1010
    assert spans[0].request_seq == (100, 110) and spans[1].request_seq == (110, 120)
    assert spans[1].response_seq == (909, 919)
    assert spans[0].request_size == 10 and spans[1].response_size == 10


def test_server_role_keyed_pairing_and_read_exit_as_start():
    st = stage()
    spans = st.process([rec(b"ASK a x\nASK b y\n", "ingress", t=0, tid=7),
                        rec(b"ANS b fine\n", "egress", t=500),
                        rec(b"ANS a slow\n", "egress", t=900)])
    assert [(s.operation, s.status, s.role) for s in spans] == [("y", "fine", "server"),
                                                               ("x", "slow", "server")]
    assert spans[0].start_ns == T0 + 10  # the read's exit, not its (blocking) entry
    assert spans[0].tid == 7


def test_kernel_detected_protocol_and_role_are_trusted():
    st = stage()
    # In Python this egress ASK would make us the client; the kernel saw more and says server.
    st.process([rec(b"ASK - q\n", "egress", protocol="toy", role="server")])
    assert st.conns[(100, 1)].role == "server"
    st.process([rec(b"ASK - q\n", "egress", conn=2)])
    assert st.conns[(100, 2)].role == "client"
    assert st.counts["toy"]["connections"] == 2


def test_no_response_requests_hole_skipping_and_parse_errors():
    st = stage()
    spans = st.process([rec(b"TELL - fire-and-forget\n"),
                        rec(b"ASK - big\n" + b"x" * 20, nbytes=5000),  # hole: 4970 uncaptured
                        rec(b"garbage!!\n"),
                        rec(b"ASK - after\n"),
                        rec(b"ANS - ok\n", "ingress", t=50)])
    assert [s.operation for s in spans] == ["fire-and-forget", "big"]
    assert st.counts["toy"]["parse_errors"] >= 1


def test_unmatched_response_is_counted():
    st = stage()
    st.process([rec(b"ASK - x\n"), rec(b"ANS - a\n", "ingress"), rec(b"ANS - b\n", "ingress")])
    assert st.counts["toy"]["unmatched_responses"] == 1


def test_close_and_timeout_flush_pending_requests():
    st = stage(request_timeout=0.000001)
    spans = st.process([rec(b"ASK - lost\n", conn=1)])
    assert [s.attributes.get("deeptrace.no_response") for s in spans] == ["timeout"]
    st = stage()
    spans = st.process([rec(b"ASK - cut\n", conn=2),
                        rec(b"", "none", syscall="close", conn=2, t=99)])
    assert [(s.operation, s.error, s.status) for s in spans] == [
        ("cut", True, "connection closed")]
    assert (100, 2) not in st.conns


def test_connections_and_pending_are_bounded():
    st = stage(max_connections=3, max_pending=2)
    for c in range(10):
        st.process([rec(b"ASK - a\nASK - b\nASK - c\n", conn=c)])
    assert len(st.conns) == 3
    assert all(len(c.fifo) <= 2 for c in st.conns.values())
    assert st.counts["toy"]["pending_dropped"] == 10
    assert st.counts["toy"]["connections_evicted"] == 7


def test_unknown_traffic_is_left_alone():
    st = stage()
    for i in range(6):
        assert st.process([rec(b"\x16\x03\x01 tls-ish", t=i)]) == []
    assert st.conns[(100, 1)].proto is False


def test_unknown_protocol_name_is_rejected():
    with pytest.raises(ValueError, match="unknown protocol 'nope' .allowed: other, toy"):
        stage(protocols=["nope"])
    with pytest.raises(ValueError, match="unknown protocol 'nope'"):
        stage(protocol_config={"nope": {}})


def test_protocol_config_reaches_the_parser():
    st = stage(protocol_config={"toy": ToyConfig(max_words=3)})
    assert st.protocols["toy"].parser().max_words == 3
    assert stage(protocol_config={"toy": {"max_words": 4}}).protocols["toy"].parser().max_words == 4
    assert stage().protocols["toy"].parser().max_words == 100      # defaults otherwise
    assert isinstance(stage().protocols["other"].config, Other.config_class)
    with pytest.raises(ValueError, match="protocol_config.toy: unknown key 'words' .allowed: max_words"):
        stage(protocol_config={"toy": {"words": 4}})
    with pytest.raises(ValueError, match="'toy' is not enabled .allowed: .* other"):
        stage(protocols=["other"], protocol_config={"toy": {}})


def test_the_protocols_own_error_rule_decides_span_errors():
    st = stage()
    client = st.process([rec(b"ASK - a\n"), rec(b"ANS - denied\n", "ingress", t=100),
                         rec(b"ASK - b\n", t=200), rec(b"ANS - fine\n", "ingress", t=300)])
    server = st.process([rec(b"ASK - a\n", "ingress", conn=2),
                         rec(b"ANS - denied\n", "egress", t=100, conn=2)])
    assert [(s.role, s.status, s.error) for s in client + server] == [
        ("client", "denied", True), ("client", "fine", False), ("server", "denied", False)]


def test_a_parser_crash_resets_that_side_of_the_parser():
    st = stage()
    st.process([rec(b"ASK - crash\n")])
    parser = st.conns[(100, 1)].parser
    assert parser.resets == [REQ] and len(parser.streams[REQ]) == 0
    assert st.counts["toy"]["parser_crashes"] == 1
    spans = st.process([rec(b"ASK - q\n", t=10), rec(b"ANS - ok\n", "ingress", t=20)])
    assert [(s.operation, s.status) for s in spans] == [("q", "ok")]


def test_the_stage_tells_the_parser_its_transport():
    st = stage()
    st.process([rec(b"ASK - q\n")])
    assert st.conns[(100, 1)].parser.l4 == "tcp"
    udp = rec(b"ASK - q\n", conn=3)
    udp.l4 = "udp"
    st.process([udp])
    assert next(c for k, c in st.conns.items() if k[1] == 3).parser.l4 == "udp"


def test_stream_holes_and_need():
    s = Stream(cap=1000)
    s.append(b"abcdef", 10, 1, 2, seq=0)       # 4 bytes after 'abcdef' were not captured
    s.append(b"XYZ", 3, 3, 4, seq=10)
    assert s.peek() == b"abcdef" and len(s) == 13
    assert s.need(4) == b"abcd"
    with pytest.raises(ParseError):
        s.need(8)                               # would reach into the hole
    assert s.consume(10) == 10                  # ... but stepping over it is fine
    assert s.take_span() == (1, 2, 0, 10, 10)
    assert s.peek() == b"XYZ" and s.need(3) == b"XYZ" and s.need(4) is None
    s.consume(3)
    assert s.take_span() == (3, 4, 10, 13, 3) and len(s) == 0


def test_stream_segment_operations():
    s = Stream(cap=1000)
    s.append(b"abcdef", 10, 1, 2, seq=0)       # 4 uncaptured bytes end the first syscall
    s.append(b"XYZ", 3, 3, 4, seq=10)
    s.consume(2)
    assert not s.at_segment_start()
    assert s.segment_data() == (b"cdef", True) and s.segment_left() == 8
    s.take_span()
    assert s.skip_hole() == 8 and s.at_segment_start() and s.segment_data() == (b"XYZ", False)
    assert s.skip_segment() == 3 and len(s) == 0 and s.segment_data() == (b"", False)
    assert s.skip_hole() == 0 and s.segment_left() == 0
    # skip_hole without a hole takes everything; with one later, through its syscall
    s.append(b"ab", 2, 5, 6, seq=20)
    s.append(b"cd", 9, 7, 8, seq=22)
    s.append(b"ef", 2, 9, 10, seq=31)
    assert s.skip_hole() == 11 and s.peek() == b"ef"


def test_stream_lose_segment_spans_what_was_taken_and_dropped():
    s = Stream(cap=1000)
    s.append(b"abcdef", 10, 1, 2, seq=100)
    s.append(b"XYZ", 3, 3, 4, seq=110)
    s.consume(2)                                # part of a message, then its framing is lost
    assert s.lose_segment() == (1, 2, 100, 110, 10)
    assert s.peek() == b"XYZ" and s.take_span() == (0, 0, None, None, 0)
    s.consume(1)
    s.take_span()                               # nothing pending: the span starts here
    assert s.lose_segment() == (3, 4, 111, 113, 2) and len(s) == 0


def test_stream_is_capped():
    s = Stream(cap=100)
    for i in range(50):
        s.append(b"x" * 30, 30, i, i)
    assert len(s) <= 100


def test_threads_serving_overlapping_requests_are_marked_concurrent():
    st = stage()
    spans = st.process([
        rec(b"ASK - one\n", "ingress", conn=1, t=0, tid=5),
        rec(b"ASK - two\n", "ingress", conn=2, t=10, tid=5),   # same thread, first not answered
        rec(b"ANS - ok\n", "egress", conn=1, t=20, tid=5),
        rec(b"ANS - ok\n", "egress", conn=2, t=30, tid=5),
        rec(b"ASK - three\n", "ingress", conn=3, t=40, tid=6),
        rec(b"ANS - ok\n", "egress", conn=3, t=50, tid=6)])
    marks = [(s.operation, s.tid, s.attributes.get("deeptrace.thread_concurrent")) for s in spans]
    assert marks == [("one", 5, True), ("two", 5, True), ("three", 6, None)]
    assert not st.open_server


def test_retransmitted_and_dropped_requests_give_back_their_thread():
    """A retransmitted request (same key) replaces the one it repeats, and a request
    dropped past max_pending leaves: neither may leave the thread counted as serving, or
    every later span on it would be marked concurrent (and lose thread linking)."""
    st = stage(max_pending=2)
    spans = st.process([
        rec(b"ASK a x\n", "ingress", conn=1, t=0, tid=5),
        rec(b"ASK a x\n", "ingress", conn=1, t=10, tid=5),    # retransmitted
        rec(b"ANS a ok\n", "egress", conn=1, t=20, tid=5),
        rec(b"ASK b y\nASK c z\nASK d w\n", "ingress", conn=2, t=30, tid=6),  # b dropped
        rec(b"ANS c ok\nANS d ok\n", "egress", conn=2, t=40, tid=6),
        rec(b"ASK e v\n", "ingress", conn=3, t=50, tid=5),
        rec(b"ANS e ok\n", "egress", conn=3, t=60, tid=5)])
    assert [(s.operation, s.attributes.get("deeptrace.thread_concurrent")) for s in spans] \
        == [("x", None), ("z", True), ("w", True), ("v", None)]
    assert not st.open_server
    assert st.stats()["toy.requests_replaced"] == 1 and st.stats()["toy.pending_dropped"] == 1


def test_a_wall_clock_step_does_not_time_requests_out(monkeypatch):
    """Records carry CLOCK_MONOTONIC plus an offset fixed at start (deeptrace_core.clock);
    an NTP step of the wall clock (+120 s here) must not make a request that just arrived
    look 2 minutes old."""
    st = stage(request_timeout=60)
    now = time.time_ns()
    monkeypatch.setattr(time, "time_ns", lambda: now + 120 * 10**9)
    spans = st.process([rec(b"ASK - waiting\n", conn=1)])
    st._next_expiry = 0.0
    spans += st.process([])
    assert spans == [] and len(st.conns[(100, 1)].fifo) == 1
    # ... while a request really older than request_timeout still times out
    st = stage(request_timeout=60)
    spans = st.process([rec(b"ASK - old\n", conn=1, t=-61 * 10**9)])
    assert [s.attributes.get("deeptrace.no_response") for s in spans] == ["timeout"]


def test_client_calls_made_while_the_process_serves_nothing_are_marked():
    """A call its process made while serving no request has no parent on this host: the
    stage marks it, so the linker holds it for a poll round, not `wait` (issue 13: held
    spans were most of the agent's memory under a burst from a local client)."""
    st = stage()
    spans = st.process([
        rec(b"ASK - alone\n", conn=1, t=0, tid=5),                   # no request served
        rec(b"ANS - ok\n", "ingress", conn=1, t=10, tid=5),
        rec(b"ASK a x\n", "ingress", conn=2, t=20, tid=5, role="server"),
        rec(b"ASK - inner\n", conn=1, t=30, tid=6),                  # while x is open
        rec(b"ANS - ok\n", "ingress", conn=1, t=40, tid=6),
        rec(b"ANS a ok\n", "egress", conn=2, t=50, tid=5, role="server"),
        rec(b"ASK - after\n", conn=1, t=60, tid=6),                  # x answered
        rec(b"ANS - ok\n", "ingress", conn=1, t=70, tid=6)])
    marks = [(s.operation, s.role, s.attributes.get("deeptrace.no_server_open"))
             for s in spans]
    assert marks == [("alone", "client", True), ("inner", "client", None),
                     ("x", "server", None), ("after", "client", True)]
    assert not st.open_server and not st.open_server_pid
