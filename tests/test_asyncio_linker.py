"""The traces processor's ``asyncio_task`` rule on synthetic spans and task edges (the
real probe and real asyncio servers are in test_asyncio_linking.py)."""

import time
import types

import test_traces_linker

from deeptrace_core.span import Span
from deeptrace_plugins.processors import traces
from deeptrace_plugins.processors.traces import TraceLinker, TracesConfig
from deeptrace_plugins.trace.decoder import SocketRecord, TaskEdge

MS = 1_000_000
SRV = ("10.0.0.1", 8000)
LOOP = {"deeptrace.thread_concurrent": True}
H1, H2, C1, C2, G1 = 0x7F0000001000, 0x7F0000002000, 0x7F0000003000, 0x7F0000004000, \
    0x7F0000005000
BASE = 0


def at(ms):
    return BASE + int(ms * MS)


def server(n, start, end, task, pid=1):
    s = Span(start_ns=at(start), end_ns=at(end), protocol="http1", role="server", pid=pid,
             tid=1, comm="a", cmdline="", l4="tcp", family="ipv4", local_addr=SRV[0],
             local_port=SRV[1], remote_addr="10.0.0.9", remote_port=1000 + n, conn_id=n,
             operation="GET /a", status="200", error=False, request_size=1, response_size=1,
             request_seq=(n, n + 1), response_seq=None,
             attributes={"url.path": f"/a/r{n}", **LOOP})
    if task:
        s.attributes["deeptrace.asyncio_task"] = task
    return s


def client(n, start, end, task, path, pid=1):
    c = Span(start_ns=at(start), end_ns=at(end), protocol="http1", role="client", pid=pid,
             tid=1, comm="a", cmdline="", l4="tcp", family="ipv4", local_addr="10.0.0.1",
             local_port=2000 + n, remote_addr="10.0.0.5", remote_port=80, conn_id=100 + n,
             operation="GET /b", status="200", error=False, request_size=1, response_size=1,
             request_seq=(n, n + 1), response_seq=None,
             attributes={"url.path": path, **LOOP})
    if task:
        c.attributes["deeptrace.asyncio_task"] = task
    return c


def edge(ms, child, parent, pid=1):
    return TaskEdge(at(ms), pid, 1, child, parent)


def run(items, **cfg):
    """Edges first (they reach the linker before the calls they explain), then spans by
    end time, as the pipeline delivers them; then drain."""
    return test_traces_linker.run([i for i in items if i.kind == "span"],
                                  before=[i for i in items if i.kind == "asyncio_task"],
                                  **cfg)


def fresh():
    global BASE
    BASE = time.time_ns() - 200 * MS


def test_interleaved_requests_are_linked_by_task_lineage_not_order():
    """Two requests on one loop thread; their calls are written iterations later, after
    the other request's read (so the thread's order points the wrong way), and the URL
    ids are swapped (so the text scorer would too). The tasks decide: C1 (created by H1)
    and its own child G1 are S1's; C2 (created by H2) is S2's."""
    fresh()
    s1, s2 = server(1, 0, 40, H1), server(2, 2, 42, H2)
    c1 = client(1, 5, 20, C1, "/b/r2")     # written after S2's read at 2
    c2 = client(2, 6, 21, C2, "/b/r1")
    g1 = client(3, 22, 30, G1, "/b/r2")    # a task C1 created
    items = [edge(1, C1, H1), edge(3, C2, H2), edge(21, G1, C1), s1, s2, c1, c2, g1]
    out, linker = run(items)
    assert c1.parent_span_id == g1.parent_span_id == s1.span_id
    assert c2.parent_span_id == s2.span_id
    assert {c.link_source for c in (c1, c2, g1)} == {"asyncio_task"}
    assert c1.trace_id == g1.trace_id == s1.trace_id != s2.trace_id
    assert linker.stats()["links_asyncio_task"] == 3
    assert not [x for x in out if x.kind != "span"]      # edges are consumed, not exported


def test_a_direct_await_is_the_handler_task_itself():
    fresh()
    s1 = server(1, 0, 20, H1)
    c = client(1, 5, 10, H1, "/b/x")
    run([edge(-50, H1, 0), s1, c])
    assert (c.parent_span_id, c.link_source) == (s1.span_id, "asyncio_task")


def test_reused_task_address_takes_the_creation_before_the_call():
    """CPython reuses a freed task's memory for the next task: address C1 belongs to a
    child of H1 first, then of H2."""
    fresh()
    s1, s2 = server(1, 0, 15, H1), server(2, 16, 40, H2)
    a = client(1, 5, 10, C1, "/b/x")
    b = client(2, 25, 30, C1, "/b/y")
    run([edge(2, C1, H1), edge(20, C1, H2), s1, s2, a, b])
    assert a.parent_span_id == s1.span_id and b.parent_span_id == s2.span_id


def test_keep_alive_handler_task_picks_the_request_open_at_the_write():
    """One handler task answers a connection's requests one after another; a call made
    just after the next request was read belongs to that one (no slack at the edges)."""
    fresh()
    s1, s2 = server(1, 0, 10, H1), server(2, 10.05, 20, H1)
    c = client(1, 10.1, 15, C1, "/b/x")
    run([edge(10.08, C1, H1), s1, s2, c])
    assert c.parent_span_id == s2.span_id and c.link_source == "asyncio_task"


def test_undecidable_calls_fall_back_with_a_reason():
    fresh()
    # Two requests of one task open at once (pipelined, answered in order): ambiguous.
    s1, s2 = server(1, 0, 30, H1), server(2, 0, 31, H1)
    amb = client(1, 5, 10, C1, "/b/r1")
    # A task whose lineage reaches no server's task (created outside any task).
    s3 = server(3, 0, 50, H2)
    lost = client(2, 12, 20, C2, "/b/r3")
    _, linker = run([edge(2, C1, H1), edge(3, C2, 0), s1, s2, s3, amb, lost])
    assert amb.attributes["deeptrace.asyncio_deferred"] == "ambiguous"
    assert lost.attributes["deeptrace.asyncio_deferred"] == "no_server_task"
    assert amb.link_source != "asyncio_task" and lost.link_source != "asyncio_task"
    assert lost.parent_span_id == s3.span_id     # the fallback's text match (/b/r3)
    st = linker.stats()
    assert st["asyncio_task_deferred_ambiguous"] == 1
    assert st["asyncio_task_deferred_no_server_task"] == 1
    assert "links_asyncio_task" not in st


def test_other_processes_tasks_never_match():
    """Task addresses are per process: the same address in another pid is another task."""
    fresh()
    s1 = server(1, 0, 20, H1, pid=1)
    c = client(1, 5, 10, C1, "/b/x", pid=2)
    run([edge(2, C1, H1, pid=2), s1, c])
    assert c.link_source != "asyncio_task"


def test_rule_can_be_turned_off():
    fresh()
    s1 = server(1, 0, 20, H1)
    c = client(1, 5, 10, C1, "/b/x")
    _, linker = run([edge(2, C1, H1), s1, c], asyncio_task=False)
    assert c.link_source != "asyncio_task" and "asyncio_task_edges" not in linker.stats()


def test_edges_are_bounded_and_age_out(monkeypatch):
    fresh()
    monkeypatch.setattr(traces, "TASK_EDGES", 3)
    linker = TraceLinker(TracesConfig(wait=0.05, recall=1.05))
    linker.process([edge(i, C1 + i, H1) for i in range(5)])
    assert linker.task_edge_count == 3 and linker.counts["asyncio_task_edges_dropped"] == 2
    linker._prune(at(0.5) + int(1.05e9))  # edge 0 is now older than the recall window
    assert linker.task_edge_count == 2 and (1, C1) not in linker.task_parents
    linker._prune(at(0) + int(10e9))
    assert linker.task_edge_count == 0 and not linker.task_parents


def test_stage_puts_the_writes_task_and_loop_iterations_on_spans():
    """The spans stage: the task of a span's own write (a client's request, a server's
    response), never of its reads; the loop iteration at the request and at the
    response; task edges pass through to the linker."""
    from deeptrace_core.plugins import PluginHost
    from deeptrace_plugins.protocols.stage import SpansConfig, SpanStage
    registry = PluginHost().load_entry_points().registry()
    stage = SpanStage(SpansConfig(protocols=["http1"]), types.SimpleNamespace(registry=registry))

    t0 = time.time_ns()

    def rec(direction, payload, t, loop_iter, task, lport, rport):
        t += t0
        return SocketRecord(t, t + 10, 7, 7, "a", 5, "write" if direction == "egress"
                            else "read", direction, "tcp", "ipv4", "127.0.0.1", lport,
                            "127.0.0.1", rport, len(payload), None, None, payload, lport,
                            loop_iter=loop_iter, asyncio_task=task)

    req, resp = b"GET /a/1 HTTP/1.1\r\nHost: x\r\n\r\n", b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
    e = TaskEdge(50, 7, 7, C1, H1)
    # Server side: request read outside any task, answered by task H1.
    out = stage.process([rec("ingress", req, 100, 3, 0, 80, 5000), e,
                         rec("egress", resp, 200, 5, H1, 80, 5000)])
    assert out[0] is e
    srv = out[1]
    assert srv.attributes["deeptrace.asyncio_task"] == H1
    assert (srv.attributes["deeptrace.loop_iter"],
            srv.attributes["deeptrace.response_loop_iter"]) == (3, 5)
    # Client side: request written by C1, response read in a task too: C1 stays.
    out = stage.process([rec("egress", req, 300, 6, C1, 6000, 80),
                         rec("ingress", resp, 400, 8, H2, 6000, 80)])
    assert out[0].attributes["deeptrace.asyncio_task"] == C1
    # A thread that never waited in epoll and no task: no attributes at all.
    out = stage.process([rec("egress", req, 500, 0, 0, 6001, 80),
                         rec("ingress", resp, 600, 0, 0, 6001, 80)])
    assert not any(k in out[0].attributes for k in (
        "deeptrace.asyncio_task", "deeptrace.loop_iter", "deeptrace.response_loop_iter"))
