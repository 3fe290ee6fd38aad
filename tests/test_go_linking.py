"""Exact traces through goroutines: the trace probe's goroutine on Go records, the
http.Client hand-off (writeLoop write -> the roundTrip caller), spawn edges, and the
linker's ``goroutine`` rule.

Real programs: bench/go_a.go built here with Debian's Go, run twice: as A (GET /a/<id>
calls B's /b/<id> and /c/<id> with an http.Client, one after the other or from two
goroutines) and as B (answers at once). Each logs, per request, the goroutine id its
runtime gives (runtime.Stack) for the handler and for each call, and the OS thread at the
handler's start and end; with --migrate the handler sleeps until the runtime moved it to
another thread, so its response is written from another thread than its request was read.
The real trace probe records both; the spans stage and the linker run on its records.

Then the ``goroutine`` rule on synthetic spans.
"""

import json
import re
import os
import sys
import threading
import time
import urllib.request

import pytest

from conftest import require_bpf, start_probe
from test_traces_linker import MS, run as run_linker, span as make_span
import test_traces_linker

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from bench.topology import GO_A, build_go  # noqa: E402
from deeptrace_core.testing import free_port  # noqa: E402

REQUESTS, CLIENTS = 24, 6


def _start(exe, *args):
    import subprocess
    p = subprocess.Popen([exe, *args], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    line = p.stdout.readline()
    if not line.startswith(b"READY"):
        p.kill()
        raise RuntimeError(f"{exe} did not start: {p.stderr.read()[-2000:]!r}")
    return p


def _records(records, pid):
    return [r for r in records if r.pid == pid]


@pytest.fixture(scope="module", params=["seq", "fanout"])
def go_run(request, tmp_path_factory):
    """A and B, traced, and REQUESTS requests from CLIENTS threads (keep-alive each)."""
    require_bpf()
    from deeptrace_core.plugins import PluginHost
    from deeptrace_plugins.processors.traces import TraceLinker, TracesConfig
    from deeptrace_plugins.protocols.stage import SpansConfig, SpanStage

    variant = request.param
    work = tmp_path_factory.mktemp(f"go-{variant}")
    exe = build_go(GO_A, str(work))
    pa, pb = free_port(), free_port()
    probe = start_probe(ports=[pa, pb])
    procs = []
    try:
        b = _start(exe, "--listen", f"127.0.0.1:{pb}", "--log", str(work / "b.jsonl"))
        procs.append(b)
        a = _start(exe, "--listen", f"127.0.0.1:{pa}", "--b", f"127.0.0.1:{pb}",
                   "--log", str(work / "a.jsonl"), "--variant", variant, "--migrate")
        procs.append(a)
        records = []
        deadline = time.monotonic() + 20
        # Both were exec'd after the probe attached: found through go_events.
        while not {a.pid, b.pid} <= set(probe.go.procs) and time.monotonic() < deadline:
            records += probe.poll(10)
        assert {a.pid, b.pid} <= set(probe.go.procs), probe.stats()
        ids = [f"r{i:03d}x" for i in range(REQUESTS)]

        def client(mine):
            import http.client
            conn = http.client.HTTPConnection("127.0.0.1", pa, timeout=30)
            for rid in mine:
                conn.request("GET", f"/a/{rid}")
                resp = conn.getresponse()
                assert resp.status == 200, resp.read()
                resp.read()
            conn.close()

        threads = [threading.Thread(target=client, args=(ids[i::CLIENTS],))
                   for i in range(CLIENTS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        end = time.monotonic() + 1.0
        while time.monotonic() < end:
            records += probe.poll(20)
        stats = probe.stats()
    finally:
        for p in procs:
            p.kill()
            p.wait()
        probe.detach()
    with open(work / "a.jsonl") as f:
        truth = {r["id"]: r for r in map(json.loads, f)}
    # The spans stage and the linker on the records, as the agent runs them.
    registry = PluginHost().load_entry_points().registry()
    stage = SpanStage(SpansConfig(protocols=["http1"]),
                      type("Ctx", (), {"registry": registry})())
    linker = TraceLinker(TracesConfig(wait=0.05))
    spans = linker.process(stage.process(records))
    deadline = time.monotonic() + 3
    while linker.held and time.monotonic() < deadline:
        time.sleep(0.05)
        spans += linker.process([])
    spans += linker.flush()
    yield dict(variant=variant, a=a.pid, b=b.pid, records=records, truth=truth, ids=ids,
               stats=stats, spans=spans, linker=linker)


def _server_calls(run):
    """rid -> (the request's read record, the response's write record) on A's server
    side: the read carrying GET /a/<rid>, then the next write on that connection. (The
    server's background read may have taken the request's first byte: net/http reads one
    byte from another goroutine while a handler runs, to notice a client going away.)"""
    out = {}
    recs = _records(run["records"], run["a"])
    for i, r in enumerate(recs):
        m = re.match(rb"(?:G?ET )?/a/(\w+) HTTP", r.payload)
        if r.direction == "ingress" and m:
            rid = m.group(1).decode()
            resp = next(x for x in recs[i + 1:] if x.conn_id == r.conn_id and
                        x.direction == "egress")
            out[rid] = (r, resp)
    return out


@pytest.mark.bpf
def test_every_request_is_logged_and_recorded(go_run):
    assert sorted(go_run["truth"]) == sorted(go_run["ids"])
    assert sorted(_server_calls(go_run)) == sorted(go_run["ids"])
    s = go_run["stats"]
    assert s["go_processes"] >= 2 and s["go_binaries_traced"] == 1
    assert s["go_binaries_untraced"] == 0 and s["go_goid_read_failed"] == 0
    assert s["ringbuf_full"] == 0 and s["go_events_full"] == 0


@pytest.mark.bpf
def test_goid_is_the_handlers_across_thread_migration(go_run):
    """The request's read and the response's write carry the goroutine the runtime says
    served the request, also when the two calls were made on different OS threads."""
    truth, migrated = go_run["truth"], 0
    for rid, (read, write) in _server_calls(go_run).items():
        g = truth[rid]["goid"]
        assert read.goid == write.goid == g, (rid, read.goid, write.goid, g)
        if read.tid != write.tid:
            migrated += 1
    # The handler slept until the runtime put it on another thread (--migrate).
    moved = sum(1 for r in truth.values() if r["tid"] != r["tid_end"])
    assert moved >= REQUESTS // 2 and migrated >= REQUESTS // 2, (moved, migrated)


@pytest.mark.bpf
def test_goids_differ_per_goroutine(go_run):
    """A connection is served by one goroutine (net/http: one per connection), so the six
    keep-alive connections have six goroutines, and requests on one connection share it."""
    by_conn = {}
    for rid, (read, _) in _server_calls(go_run).items():
        by_conn.setdefault(read.conn_id, set()).add(read.goid)
    assert len(by_conn) == CLIENTS
    assert all(len(g) == 1 for g in by_conn.values())
    assert len(set().union(*by_conn.values())) == CLIENTS


@pytest.mark.bpf
def test_write_loop_write_is_the_callers(go_run):
    """http.Client writes a request from the connection's writeLoop goroutine: the record
    carries the goroutine that called Do (the handler, or its fan-out goroutine), whose
    spawn edge leads back to the handler."""
    truth = go_run["truth"]
    writes = {r.payload.split(b" ")[1].decode(): r for r in _records(go_run["records"], go_run["a"])
              if r.direction == "egress" and r.payload.startswith((b"GET /b/", b"GET /c/"))}
    assert len(writes) == 2 * REQUESTS
    for rid, rec in truth.items():
        for call in rec["calls"]:
            w = writes[call["op"].split(" ")[1]]
            assert w.goid == call["goid"], (rid, call, w.goid)
            if go_run["variant"] == "fanout":
                assert call["goid"] != rec["goid"] and w.go_parents[0] == rec["goid"]
            else:
                assert call["goid"] == rec["goid"]
    s = go_run["stats"]
    assert s["go_roundtrips"] >= 2 * REQUESTS and s["go_handoffs"] >= 2 * REQUESTS
    if go_run["variant"] == "fanout":
        assert s["go_spawns"] >= 2 * REQUESTS


@pytest.mark.bpf
def test_client_spans_are_linked_to_their_server_span_by_goroutine(go_run):
    spans = [s for s in go_run["spans"] if s.pid in (go_run["a"], go_run["b"])]
    by = {}
    for s in spans:
        path = s.attributes.get("url.path", "")
        by.setdefault((s.pid, s.role, path), []).append(s)
    a, b = go_run["a"], go_run["b"]
    for rid in go_run["ids"]:
        [srv] = by[(a, "server", f"/a/{rid}")]
        assert srv.attributes["deeptrace.goid"] == go_run["truth"][rid]["goid"]
        for kind in ("b", "c"):
            [cli] = by[(a, "client", f"/{kind}/{rid}")]
            [back] = by[(b, "server", f"/{kind}/{rid}")]
            assert cli.parent_span_id == srv.span_id and cli.link_source == "goroutine"
            assert back.parent_span_id == cli.span_id and back.link_source == "tcp_seq"
            assert back.trace_id == cli.trace_id == srv.trace_id
    assert go_run["linker"].counts["links_goroutine"] == 2 * REQUESTS


@pytest.mark.bpf
def test_binary_without_dwarf_is_reported_once_and_falls_back_to_threads(tmp_path, caplog):
    """-ldflags=-w: no DWARF, so no offset of runtime.g.goid: said once (log, counter),
    its records carry goid 0 and are linked by thread as before."""
    require_bpf()
    import logging
    caplog.set_level(logging.WARNING, logger="deeptrace.trace")
    exe = build_go(GO_A, str(tmp_path), "dt-go-nodwarf", "-ldflags=-w")
    port = free_port()
    probe = start_probe(ports=[port])
    p = None
    try:
        p = _start(exe, "--listen", f"127.0.0.1:{port}", "--log", str(tmp_path / "b.jsonl"))
        records = []
        for _ in range(2):
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/b/x1", timeout=10) as r:
                assert r.status == 200
            records += probe.poll(50)
        probe.go.rescan(probe.bpf, [p.pid])   # looked at again: still reported once
        end = time.monotonic() + 0.5
        while time.monotonic() < end:
            records += probe.poll(20)
        stats = probe.stats()
    finally:
        if p is not None:
            p.kill()
            p.wait()
        probe.detach()
    mine = _records(records, p.pid)
    # Data only: after the second answer the server may already have read the client's
    # close (a 0-byte read) when the poll ends, or not yet.
    assert [r.direction for r in mine if r.direction != "none" and r.bytes > 0] == \
        ["ingress", "egress"] * 2
    assert {r.goid for r in mine} == {0}
    assert "no DWARF" in probe.go.problems[exe]
    assert stats["go_binaries_untraced"] == 1 and p.pid not in probe.go.procs
    reports = [r for r in caplog.records if exe in r.getMessage()]
    assert len(reports) == 1 and "linked by thread" in reports[0].getMessage()


# -- the rule on synthetic spans ------------------------------------------------------------
A, B = ("10.0.0.1", 8001), ("10.0.0.2", 8002)


def _go(role, tid, start, end, goid, parents=(), port=0, seq=None, op="op", shared=False):
    attrs = {"deeptrace.goid": goid}
    if shared:
        attrs["deeptrace.goroutine_concurrent"] = True
    if parents:
        attrs["deeptrace.go_parents"] = list(parents)
    here, there = (A, ("10.0.0.9", 5000 + port)) if role == "server" else \
        (("10.0.0.1", 40000 + port), B)
    return make_span(role, 1, tid, start, end, here, there, seq=seq, op=op, **attrs)


def _base():
    test_traces_linker.BASE = time.time_ns() - 500 * MS


def test_rule_keys_on_the_goroutine_not_the_thread():
    """Two requests served at once on one OS thread by two goroutines: each call goes to
    its goroutine's request, where the thread rule would have no way to tell."""
    _base()
    s1 = _go("server", 7, 0, 100, goid=11, port=1)
    s2 = _go("server", 7, 5, 90, goid=12, port=2)
    c1 = _go("client", 7, 10, 80, goid=11, port=3)   # inside both intervals
    c2 = _go("client", 8, 20, 60, goid=12, port=4)   # another thread, goroutine 12
    out, linker = run_linker([s1, s2, c1, c2])
    assert c1.parent_span_id == s1.span_id and c2.parent_span_id == s2.span_id
    assert c1.link_source == c2.link_source == "goroutine"
    assert c1.trace_id == s1.trace_id != s2.trace_id == c2.trace_id
    assert linker.counts["links_goroutine"] == 2 and not linker.counts["links_thread"]


def test_rule_follows_spawn_edges_to_the_nearest_served_ancestor():
    _base()
    srv = _go("server", 1, 0, 100, goid=20, port=1)
    # fan-out goroutines 31, 32 (children of 20), and 41 spawned by 31: ancestors first
    # without a server span (31), then the handler.
    f1 = _go("client", 2, 10, 50, goid=31, parents=(20, 1), port=2)
    f2 = _go("client", 3, 12, 55, goid=32, parents=(20, 1), port=3)
    f3 = _go("client", 4, 15, 40, goid=41, parents=(31, 20, 1), port=4)
    out, linker = run_linker([srv, f1, f2, f3])
    assert {f.parent_span_id for f in (f1, f2, f3)} == {srv.span_id}
    assert {f.link_source for f in (f1, f2, f3)} == {"goroutine"}
    assert len({x.trace_id for x in out}) == 1


def test_rule_needs_the_interval_and_skips_shared_goroutines():
    _base()
    srv = _go("server", 1, 0, 50, goid=20, port=1)
    late = _go("client", 1, 60, 70, goid=20, port=2)     # after the request answered
    # Goroutine 90 read requests it served at once (a multiplexing reader: the stage marks
    # its spans): not used.
    m1 = _go("server", 2, 100, 200, goid=90, port=3, op="GET /x", shared=True)
    m2 = _go("server", 2, 110, 190, goid=90, port=4, op="GET /y", shared=True)
    mc = _go("client", 2, 120, 150, goid=91, parents=(90,), port=5, op="GET /y")
    out, linker = run_linker([srv, late, m1, m2, mc], statistical=False)
    assert late.parent_span_id is None and late.link_source is None
    assert mc.link_source != "goroutine"
    assert linker.counts["goroutine_shared"] == 1


def test_client_arriving_after_its_server_span_is_still_linked():
    _base()
    srv = _go("server", 1, 0, 100, goid=20, port=1)
    cli = _go("client", 2, 10, 50, goid=33, parents=(20,), port=2)
    # The process made calls before (a server whose call came late, from the other ring:
    # the linker keeps released servers only of processes known to make calls).
    earlier = _go("client", 3, -90, -80, goid=40, port=3)
    linker = test_traces_linker.TraceLinker(test_traces_linker.TracesConfig(wait=0.05))
    out = linker.process([earlier, srv])
    time.sleep(0.1)
    out += linker.process([])       # the server is released (no parent of its own)
    out += linker.process([cli])
    assert cli.parent_span_id == srv.span_id and cli.link_source == "goroutine"
    assert cli.trace_id == srv.trace_id


def test_thread_rule_unchanged_for_spans_without_goroutine():
    _base()
    srv = make_span("server", 1, 7, 0, 100, A, ("10.0.0.9", 5001))
    cli = make_span("client", 1, 7, 10, 50, ("10.0.0.1", 40001), B)
    out, linker = run_linker([srv, cli])
    assert cli.parent_span_id == srv.span_id and cli.link_source == "thread"
    assert not linker.counts["links_goroutine"]


@pytest.mark.bpf
def test_goid_is_right_when_a_new_goroutine_reuses_a_g(tmp_path):
    """Threads cache g -> goid; runtime.newproc1's entry invalidates that cache (a reused
    g gets a new goid there). tests/go_respawn.go: 40 goroutines one after the other on one
    P, so each reuses the g of the one before; each writes its runtime.Stack goroutine id,
    and every record must carry exactly that id (and the main goroutine's writes its own)."""
    require_bpf()
    import socket
    import subprocess
    n = 40
    exe = build_go(os.path.join(REPO, "tests", "go_respawn.go"), str(tmp_path), "dt-respawn")
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    p = subprocess.Popen([exe, "127.0.0.1:%d" % srv.getsockname()[1], str(n)],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    conn, _ = srv.accept()
    probe = start_probe(pids=[p.pid])
    records, got = [], b""
    try:
        assert p.stdout.readline().strip() == "READY"
        deadline = time.monotonic() + 20
        while p.pid not in probe.go.procs and time.monotonic() < deadline:
            records += probe.poll(10)
        assert p.pid in probe.go.procs, probe.stats()
        records = []
        p.stdin.write("go\n")
        p.stdin.flush()
        conn.settimeout(10)
        while not got.endswith(b"main=1;") or got.count(b";") < 2 * n:
            chunk = conn.recv(65536)
            if not chunk:
                break
            got += chunk
        assert p.stdout.readline().strip() == "DONE"
        end = time.monotonic() + 1.0
        while time.monotonic() < end:
            records += probe.poll(20)
        stats = probe.stats()
    finally:
        p.kill()
        p.wait()
        conn.close()
        srv.close()
        probe.detach()
    writes = [r for r in records if r.pid == p.pid and r.direction == "egress"]
    told = [(m.group(1), int(m.group(2)))
            for r in writes for m in re.finditer(rb"(goid|main)=(\d+);", r.payload)]
    assert len(told) == 2 * n, (len(told), stats)
    assert len(writes) == 2 * n, [w.payload for w in writes]  # one write per message
    assert [w.goid for w in writes] == [goid for _, goid in told]
    spawned = [goid for kind, goid in told if kind == b"goid"]
    assert len(set(spawned)) == n and {g for k, g in told if k == b"main"} == {1}
