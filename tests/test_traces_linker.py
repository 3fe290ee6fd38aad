"""The trace linker on synthetic spans: every link source, release as whole trees, and
bounds. (The real three-service chain is in test_trace_chain_e2e.py.)"""

import time

from deeptrace_core.span import Span
from deeptrace_plugins.processors.traces import TraceLinker, TracesConfig

MS = 1_000_000


def span(role, pid, tid, start, end, local, remote, seq=None, op="op", **attrs):
    t0 = BASE
    return Span(start_ns=t0 + start * MS, end_ns=t0 + end * MS, protocol="http1", role=role,
                pid=pid, tid=tid, comm=f"p{pid}", cmdline="", l4="tcp", family="ipv4",
                local_addr=local[0], local_port=local[1], remote_addr=remote[0],
                remote_port=remote[1], conn_id=pid * 100 + tid, operation=op, status="200",
                error=False, request_size=10, response_size=10,
                request_seq=(seq, seq + 10) if seq is not None else None, attributes=attrs)


BASE = 0


def run(spans, **cfg):
    """Feed spans in the order the stage emits them (by end time), then drain."""
    global BASE
    linker = TraceLinker(TracesConfig(**{"wait": 0.05, **cfg}))
    out = []
    for s in sorted(spans, key=lambda s: s.end_ns):
        out += linker.process([s])
    deadline = time.monotonic() + 2
    while linker.held and time.monotonic() < deadline:
        time.sleep(0.02)
        out += linker.process([])
    return out, linker


def chain(headers=None):
    global BASE
    BASE = time.time_ns() - 200 * MS
    A, B, C = ("10.0.0.1", 8001), ("10.0.0.2", 8002), ("10.0.0.9", 5555)
    h = headers or {}
    return {
        "curl": span("client", 9, 9, 0, 101, C, A, seq=100, op="GET /a", **h),
        "a_srv": span("server", 1, 11, 1, 100, A, C, seq=100, op="GET /a", **h),
        "a_cli": span("client", 1, 11, 10, 60, ("10.0.0.1", 40001), B, seq=7000, op="GET /b"),
        "b_srv": span("server", 2, 21, 12, 58, B, ("10.0.0.1", 40001), seq=7000, op="GET /b"),
        "redis": span("client", 2, 21, 20, 25, ("10.0.0.2", 40100), ("10.0.0.3", 6379),
                      seq=1, op="GET"),
        "pg": span("client", 2, 21, 30, 40, ("10.0.0.2", 40200), ("10.0.0.4", 5432),
                   seq=1, op="SELECT"),
    }


def test_chain_is_one_trace_with_correct_parents_and_sources():
    s = chain()
    out, linker = run(list(s.values()))
    assert len(out) == 6 and not linker.held
    assert len({x.trace_id for x in out}) == 1
    parent = {k: v.parent_span_id for k, v in s.items()}
    assert parent["curl"] is None
    assert parent["a_srv"] == s["curl"].span_id and s["a_srv"].link_source == "tcp_seq"
    assert parent["a_cli"] == s["a_srv"].span_id and s["a_cli"].link_source == "thread"
    assert parent["b_srv"] == s["a_cli"].span_id and s["b_srv"].link_source == "tcp_seq"
    assert parent["redis"] == parent["pg"] == s["b_srv"].span_id
    assert s["redis"].link_source == s["pg"].link_source == "thread"


def test_traceparent_is_adopted():
    tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    s = chain({"http.request.header.traceparent": tp})
    out, _ = run(list(s.values()))
    assert {x.trace_id for x in out} == {"4bf92f3577b34da6a3ce929d0e0e4736"}
    # curl sent it: its span id is the header's parent-id, and the server's parent is curl.
    assert s["curl"].span_id == "00f067aa0ba902b7"
    assert s["a_srv"].parent_span_id == "00f067aa0ba902b7"
    assert s["a_srv"].link_source == "traceparent"
    assert s["b_srv"].parent_span_id == s["a_cli"].span_id


def test_x_request_id_names_the_trace_of_a_root():
    s = chain({"http.request.header.x-request-id": "req-42"})
    del s["curl"]
    out, _ = run(list(s.values()))
    assert len({x.trace_id for x in out}) == 1
    assert s["a_srv"].link_source == "x-request-id"


def test_statistical_fallback_picks_the_request_with_the_same_id():
    """asyncio-like: one thread serves two overlapping requests; each calls downstream with
    the id of its own request. No thread link exists; text similarity decides."""
    global BASE
    BASE = time.time_ns() - 200 * MS
    A, C = ("10.0.0.1", 8001), ("10.0.0.9", 5555)
    s1 = span("server", 1, 11, 0, 100, A, C, seq=1, op="GET /order", **{"url.path": "/order/777"})
    s2 = span("server", 1, 11, 5, 100, A, ("10.0.0.9", 5556), seq=1, op="GET /order",
              **{"url.path": "/order/31337"})
    c1 = span("client", 1, 12, 20, 30, ("10.0.0.1", 1), ("10.0.0.5", 80), seq=9,
              op="GET /stock", **{"url.path": "/stock/31337"})
    out, linker = run([s1, s2, c1])
    assert c1.parent_span_id == s2.span_id and c1.link_source == "statistical"
    assert 0.5 < c1.attributes["deeptrace.link_confidence"] <= 1.0


def test_unlinked_span_is_its_own_trace_and_memory_is_bounded():
    s = chain()
    out, linker = run([s["redis"]])
    assert out[0].trace_id and out[0].parent_span_id is None
    linker = TraceLinker(TracesConfig(wait=60, max_spans=10))
    for i in range(50):
        linker.process([chain()["redis"]])
    assert len(linker.held) <= 10


def test_event_loop_threads_use_the_statistical_fallback():
    """asyncio: one thread, overlapping requests (the stage marks such threads). The
    thread rule would give C1 to whichever server span arrives first (S2); the fallback
    matches the ids in the URLs."""
    global BASE
    BASE = time.time_ns() - 200 * MS
    A = ("10.0.0.1", 8001)
    mark = {"deeptrace.thread_concurrent": True}
    s1 = span("server", 1, 1, 0, 100, A, ("10.0.0.9", 1), seq=1, op="GET /a",
              **{"url.path": "/a/x1", **mark})
    s2 = span("server", 1, 1, 5, 50, A, ("10.0.0.9", 2), seq=1, op="GET /a",
              **{"url.path": "/a/x2", **mark})
    c1 = span("client", 1, 1, 10, 40, ("10.0.0.1", 3), ("10.0.0.5", 80), seq=5, op="GET /b",
              **{"url.path": "/b/x1", **mark})
    c2 = span("client", 1, 1, 12, 45, ("10.0.0.1", 4), ("10.0.0.5", 80), seq=6, op="GET /b",
              **{"url.path": "/b/x2", **mark})
    run([s1, s2, c1, c2])
    assert c1.parent_span_id == s1.span_id and c2.parent_span_id == s2.span_id
    assert c1.link_source == c2.link_source == "statistical"
    assert c1.trace_id == s1.trace_id and c2.trace_id == s2.trace_id


def test_statistical_parent_may_already_be_released():
    """A server span with traceparent leaves at once; a thread-pool call still finds it."""
    global BASE
    BASE = time.time_ns() - 200 * MS
    tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    s = span("server", 1, 11, 0, 100, ("10.0.0.1", 8001), ("10.0.0.9", 1), seq=1,
             op="GET /a", **{"url.path": "/a/x1", "http.request.header.traceparent": tp})
    c = span("client", 1, 12, 10, 40, ("10.0.0.1", 3), ("10.0.0.5", 80), seq=5, op="GET /b",
             **{"url.path": "/b/x1"})
    linker = TraceLinker(TracesConfig(wait=0.05))
    out = linker.process([s])  # released at once (traceparent)
    out += linker.process([c])
    deadline = time.monotonic() + 2
    while linker.held and time.monotonic() < deadline:
        time.sleep(0.02)
        out += linker.process([])
    assert c.parent_span_id == s.span_id and c.trace_id == "4bf92f3577b34da6a3ce929d0e0e4736"


def test_learned_tables_stay_bounded_with_an_operation_per_request():
    """REST paths with ids make a new operation per request. Thread-linked requests
    teach the statistical fallback; scoring them must add nothing, and what is learned
    stays within max_learned, the least recently learned going first (counted)."""
    global BASE
    BASE = time.time_ns() - 200 * MS
    linker = TraceLinker(TracesConfig(max_learned=100))
    A, B = ("10.0.0.1", 8001), ("10.0.0.2", 8002)
    for i in range(2000):
        srv = span("server", 1, 11, 1, 100, A, ("10.0.0.9", 5555), op=f"GET /users/{i}")
        cli = span("client", 1, 11, 10, 60, ("10.0.0.1", 40001), B, op=f"GET /orders/{i}")
        linker._score(linker_held(srv), linker_held(cli))   # scoring learns nothing
        linker._learn(srv, cli)
    assert len(linker.learned_pairs) == 100 and len(linker.learned_ops) == 100
    assert linker.stats()["learned_evicted"] == 2 * (2000 - 100)
    # the newest are kept: a pair learned last scores as learned
    assert ("GET /users/1999", "GET /orders/1999") in linker.learned_pairs
    assert ("GET /users/0", "GET /orders/0") not in linker.learned_pairs


def linker_held(s):
    from deeptrace_plugins.processors.traces import _Held
    return _Held(s, time.monotonic())
