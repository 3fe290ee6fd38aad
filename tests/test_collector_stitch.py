"""The collector's stitcher on real ClickHouse (chdb): spans of three "hosts" as their
agents' OTLP exporter encodes them, delivered shuffled, late, with clock skew, behind a
NAT, across the 32-bit sequence wrap and with coincidental sequence collisions. Every
stitch is checked against the truth; a wrong one fails the test."""

import random

import pytest

from deeptrace_core.collector import schema
from deeptrace_core.collector.config import Stitcher as StitcherConfig
from deeptrace_core.collector.query import ClickHouseQuery
from deeptrace_core.collector.receiver import Sink
from deeptrace_core.collector.stitcher import Stitcher
from deeptrace_core.collector.store import ChdbStore
from deeptrace_core.span import Span, new_id
from deeptrace_plugins.exporters.otlp import Converter
from deeptrace_plugins.exporters.red import ServiceNamer

T0 = 1_800_000_000 * 10**9
MS = 10**6


@pytest.fixture
def store(tmp_path):
    s = ChdbStore(str(tmp_path / "db"), "otel")
    for sql in schema.ddl("otel"):
        s.command(sql)
    yield s
    s.close()


def span(role, comm, trace, start, dur, local, peer, seq, resp, op, protocol="http1", parent=None):
    return Span(start_ns=start, end_ns=start + dur, protocol=protocol, role=role, pid=100,
                tid=100, comm=comm, cmdline=comm, l4="tcp", family="ipv4",
                local_addr=local[0], local_port=local[1], remote_addr=peer[0],
                remote_port=peer[1], conn_id=1, operation=op, status="200", error=False,
                request_size=10, response_size=10,
                request_seq=None if seq is None else (seq, (seq + 10) % 2**32),
                response_seq=None if resp is None else (resp, (resp + 10) % 2**32),
                trace_id=trace, parent_span_id=parent)


class World:
    """N requests front(A) -> api(B) -> redis + postgres (C), as three agents see them."""

    def __init__(self, n, rnd, skew_b=500 * MS, skew_c=-500 * MS, nat_every=0, wrap_every=0,
                 t0=T0):
        self.spans = {"A": [], "B": [], "C": []}
        self.truth = {}            # server span id -> expected parent (client span id)
        self.roots = []            # (trace id of A, expected span count)
        for i in range(n):
            t = t0 + i * 5 * MS
            ta, tb, tc1, tc2 = (new_id(16) for _ in range(4))
            seq = rnd.getrandbits(32)
            if wrap_every and i % wrap_every == 0:
                seq = 2**32 - 4          # the request's bytes cross the wrap
            resp = rnd.getrandbits(32)
            a_port, b_port1, b_port2 = 40000 + i % 20000, 41000 + i % 20000, 42000 + i % 20000
            sa = span("server", "front", ta, t, 20 * MS, ("10.0.1.1", 80), ("10.0.0.9", 50000 + i % 10000),
                      rnd.getrandbits(32), rnd.getrandbits(32), "GET /order")
            ca = span("client", "front", ta, t + 1 * MS, 15 * MS, ("10.0.1.1", a_port),
                      ("10.0.2.1", 8080), seq, resp, f"GET /item/{i}", parent=sa.span_id)
            # B sees A's client port, or a NAT's address and port where one rewrites them.
            client_seen = ("10.0.1.1", a_port)
            if nat_every and i % nat_every == 0:
                client_seen = ("192.168.7.7", 61000 + i % 4000)
            sb = span("server", "api", tb, t + 2 * MS + skew_b, 12 * MS, ("10.0.2.1", 8080),
                      client_seen, seq, resp, f"GET /item/{i}")
            s1, r1, s2, r2 = (rnd.getrandbits(32) for _ in range(4))
            cb1 = span("client", "api", tb, t + 3 * MS + skew_b, 2 * MS, ("10.0.2.1", b_port1),
                       ("10.0.3.1", 6379), s1, r1, "GET", protocol="redis", parent=sb.span_id)
            cb2 = span("client", "api", tb, t + 6 * MS + skew_b, 3 * MS, ("10.0.2.1", b_port2),
                       ("10.0.3.1", 5432), s2, r2, "SELECT", protocol="postgresql",
                       parent=sb.span_id)
            sc1 = span("server", "redis-server", tc1, t + 3 * MS + skew_c, 1 * MS,
                       ("10.0.3.1", 6379), ("10.0.2.1", b_port1), s1, r1, "GET", protocol="redis")
            sc2 = span("server", "postgres", tc2, t + 6 * MS + skew_c, 2 * MS,
                       ("10.0.3.1", 5432), ("10.0.2.1", b_port2), s2, r2, "SELECT",
                       protocol="postgresql")
            self.spans["A"] += [sa, ca]
            self.spans["B"] += [sb, cb1, cb2]
            self.spans["C"] += [sc1, sc2]
            self.truth.update({sb.span_id: ca.span_id, sc1.span_id: cb1.span_id,
                               sc2.span_id: cb2.span_id})
            self.roots.append((ta, 7))

    def batches(self, rnd, size=50):
        """The agents' export requests, in a shuffled order."""
        out = []
        for host, spans in self.spans.items():
            conv = Converter(ServiceNamer(), resource={"host.name": f"host-{host}"})
            for i in range(0, len(spans), size):
                out.append(conv.traces_request(spans[i:i + size]))
        rnd.shuffle(out)
        return out


def stitched_ok(store, world):
    q = ClickHouseQuery(store, "otel")
    wrong = []
    for ta, count in world.roots:
        spans = q.load_trace(ta)
        parents = {s["span_id"]: s["parent_span_id"] for s in spans}
        if len(spans) != count:
            wrong.append((ta, len(spans)))
            continue
        for server, client in world.truth.items():
            if server in parents and parents[server] != client:
                wrong.append((ta, server, parents[server], client))
    return wrong


def test_three_hosts_shuffled_late_and_skewed(store):
    rnd = random.Random(7)
    world = World(300, rnd, wrap_every=25)
    sink = Sink(store)
    stitcher = Stitcher(store, StitcherConfig(window=3600), "otel")
    batches = world.batches(rnd)
    # Rounds run while batches are still arriving: many spans come after their partner
    # was already seen (late), and server ends often before client ends.
    for i, req in enumerate(batches):
        sink.write(req.SerializeToString())
        if i % 4 == 3:
            stitcher.run_once(now_ns=T0 + 10**9)
    stitcher.run_once(now_ns=T0 + 10**9)
    assert stitched_ok(store, world) == []
    st = stitcher.stats()
    assert st["stitched_tcp_seq"] == 900 and st.get("stitched_tcp_seq_nat", 0) == 0
    assert sink.counts["spans"] == 300 * 7
    # Listing finds each request once, as one whole trace.
    q = ClickHouseQuery(store, "otel")
    listed = q.list_traces(limit=1000)
    assert len(listed) == 300 and {t["spans"] for t in listed} == {7}
    assert {t["root"]["service"] for t in listed} == {"front"}
    # Restart-safe: a new stitcher changes nothing and stitches nothing twice.
    again = Stitcher(store, StitcherConfig(window=3600), "otel")
    assert again.run_once(now_ns=T0 + 10**9) == 0 and stitched_ok(store, world) == []


def test_nat_and_collisions_never_stitch_wrongly(store):
    rnd = random.Random(11)
    world = World(120, rnd, skew_b=400 * MS, skew_c=-450 * MS, nat_every=3)
    # Coincidences: other connections whose requests share a real request's sequence
    # numbers (mirrored addresses elsewhere), and a second NAT'd server span that fits
    # a real client as well as its own does (ambiguous: must not be stitched).
    extra = []
    for k, (server, client) in enumerate(list(world.truth.items())[:30]):
        c = next(s for s in world.spans["A"] + world.spans["B"] if s.span_id == client)
        extra.append(span("server", "decoy", new_id(16), c.start_ns + MS, MS, ("10.0.5.5", 9000 + k),
                          ("10.0.6.6", 30000 + k), c.request_seq[0], c.response_seq[0], c.operation,
                          protocol=c.protocol))
    world.spans["C"] += extra
    sink = Sink(store)
    stitcher = Stitcher(store, StitcherConfig(window=3600, max_skew=1.0, nat_hold=0), "otel")
    for req in world.batches(rnd):
        sink.write(req.SerializeToString())
    stitcher.run_once(now_ns=T0 + 10**9)
    q = ClickHouseQuery(store, "otel")
    # No decoy is ever stitched, and no server gets a parent other than its own client.
    decoys = {s.span_id for s in extra}
    for ta, _ in world.roots:
        for s in q.load_trace(ta):
            assert s["span_id"] not in decoys
            if s["span_id"] in world.truth:
                assert s["parent_span_id"] == world.truth[s["span_id"]]
    st = stitcher.stats()
    nat_pairs = len(range(0, 120, 3))
    # Mirrored pairs all stitch even with a decoy sharing their numbers; a NAT'd pair
    # with a decoy fitting as well is left alone and counted.
    assert st["stitched_tcp_seq"] == 120 * 3 - nat_pairs
    assert st.get("ambiguous_nat", 0) >= 1
    assert st["stitched_tcp_seq_nat"] + st["ambiguous_nat"] >= nat_pairs
    assert st["stitched_tcp_seq_nat"] >= nat_pairs - st["ambiguous_nat"]


def test_nat_needs_timing_within_the_skew(store):
    rnd = random.Random(5)
    world = World(10, rnd, skew_b=3000 * MS, skew_c=0, nat_every=1)   # 3 s > max_skew
    sink = Sink(store)
    for req in world.batches(rnd):
        sink.write(req.SerializeToString())
    stitcher = Stitcher(store, StitcherConfig(window=3600, max_skew=1.0, nat_hold=0), "otel")
    stitcher.run_once(now_ns=T0 + 10**9)
    assert stitcher.stats().get("stitched_tcp_seq_nat", 0) == 0
    assert stitcher.stats()["stitched_tcp_seq"] == 20        # B -> C still mirror
