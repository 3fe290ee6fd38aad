"""asyncio tasks and loop iterations on the trace probe's records, and the linker's
``asyncio_task`` rule, on real BPF and real CPython asyncio servers.

A front (bench/asyncio_peers.py, an asyncio streams server run by each pyenv Python
present: 3.11 and 3.12) answers GET /a/<id> by calling two thread-per-request back-ends,
GET /b/<id> and GET /c/<id>, with ``asyncio.gather`` over pooled keep-alive connections.
The probe's uprobes on the front's ``_asyncio`` say which Task made each call and which
Task created which; the records go through the spans stage and the traces processor in
process, and every back-end call must be linked to the request whose id it carries.
"""

import glob
import json
import os
import subprocess
import sys
import threading
import time
import types
import http.client

import pytest

from conftest import CI, require_bpf, start_probe

HERE = os.path.dirname(os.path.abspath(__file__))
PEERS = os.path.join(os.path.dirname(HERE), "bench", "asyncio_peers.py")
pytestmark = pytest.mark.bpf
REQUESTS, CLIENTS = 60, 6
TASK = "deeptrace.asyncio_task"


def _pythons():
    """The pyenv interpreters with an _asyncio that keeps its symbols (3.11, 3.12), and
    UVLOOP: the front on uvloop's loop, run by this interpreter (the venv has uvloop)."""
    out = []
    for minor in ("3.11", "3.12"):
        found = sorted(glob.glob(f"/root/.pyenv/versions/{minor}.*/bin/python{minor}"))
        out.append(pytest.param(found[-1] if found else None, id=f"py{minor}"))
    return out + [pytest.param(UVLOOP, id="uvloop")]


UVLOOP = "uvloop"


def _need(python):
    if python is None:
        msg = "this pyenv Python is not installed"
        if CI:
            pytest.fail(msg)
        pytest.skip(msg)


class _Proc:
    def __init__(self, python, *args):
        self.proc = subprocess.Popen([python, "-P", PEERS, *map(str, args)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        self.pid = self.proc.pid
        self.info = json.loads(self.proc.stdout.readline())

    def stop(self):
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _drive(port, ids):
    """CLIENTS keep-alive connections sending GET /a/<id>, concurrently."""
    errors = []

    def worker(part):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
        try:
            for rid in part:
                conn.request("GET", f"/a/{rid}")
                resp = conn.getresponse()
                body = resp.read()
                if resp.status != 200 or rid.encode() not in body:
                    errors.append((rid, resp.status, body[:80]))
        finally:
            conn.close()

    threads = [threading.Thread(target=worker, args=(ids[i::CLIENTS],)) for i in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]


@pytest.fixture(scope="module")
def run(request):
    """One traced run per Python: records, spans, linker."""
    require_bpf()
    cache = {}

    def get(python):
        if python in cache:
            return cache[python]
        from deeptrace_core.plugins import PluginHost
        from deeptrace_plugins.processors.traces import TraceLinker, TracesConfig
        from deeptrace_plugins.protocols.stage import SpansConfig, SpanStage
        back = _Proc(sys.executable, "backends")
        front = _Proc(sys.executable, "front-uvloop", *back.info["ports"]) if python == UVLOOP \
            else _Proc(python, "front", *back.info["ports"])
        probe = start_probe(pids=[front.pid, back.pid], loop_counter=True)
        records = []
        try:
            assert probe.stats()["asyncio_files_attached"] >= 1
            tag = os.urandom(3).hex()
            ids = [f"r{tag}x{i:04d}" for i in range(REQUESTS)]
            _drive(front.info["port"], ids)
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                got = probe.poll(50)
                records += got
                if not got and records:
                    break
            stats = probe.stats()
        finally:
            front.stop()
            back.stop()
            probe.detach()
        registry = PluginHost().load_entry_points().registry()
        stage = SpanStage(SpansConfig(protocols=["http1"]),
                          types.SimpleNamespace(registry=registry))
        linker = TraceLinker(TracesConfig(wait=0.0))
        out = linker.process(stage.process(records))
        out += linker.flush()
        cache[python] = types.SimpleNamespace(
            records=records, spans=[s for s in out if s.kind == "span"], ids=ids,
            front=front, back=back, stats=stats, linker=linker, tag=tag)
        return cache[python]

    return get


def _path(rec):
    head = rec.payload.split(b"\r\n", 1)[0].split(b" ")
    return head[1].decode() if len(head) > 1 and head[0] == b"GET" else None


@pytest.mark.parametrize("python", _pythons())
def test_records_carry_the_task_that_made_them(run, python):
    _need(python)
    r = run(python)
    assert r.stats["ringbuf_full"] == 0 and r.stats["asyncio_task_depth_exceeded"] == 0
    mine = [x for x in r.records if x.kind == "socket" and x.pid == r.front.pid]
    edges = {(e.child, e.ts_ns): e.parent for e in r.records
             if e.kind == "asyncio_task" and e.pid == r.front.pid}
    # The back-end (threads, no asyncio) never has a task.
    assert all(x.asyncio_task == 0 for x in r.records
               if x.kind == "socket" and x.pid == r.back.pid)
    # Reads run in the selector's callbacks, outside any task.
    reads = [x for x in mine if x.direction == "ingress" and x.bytes > 0]
    assert reads and all(x.asyncio_task == 0 for x in reads)
    writes = {}
    for x in mine:
        if x.direction == "egress" and _path(x):
            writes[_path(x)] = x
    responses = {}   # request id -> the front's response write
    for x in mine:
        if x.direction == "egress" and x.payload.startswith(b"HTTP/1.1 200"):
            rid = x.payload.split(b'"/b/', 1)[1].split(b'"', 1)[0].decode()
            responses[rid] = x
    assert set(responses) == set(r.ids) and len(writes) == 2 * REQUESTS
    for rid in r.ids:
        b, c, resp = writes[f"/b/{rid}"], writes[f"/c/{rid}"], responses[rid]
        handler = resp.asyncio_task
        # Each gather child is its own task, neither the handler's ...
        assert len({b.asyncio_task, c.asyncio_task, handler}) == 3 and 0 not in (
            b.asyncio_task, c.asyncio_task, handler)
        # ... and both were created by the handler, before their write: the lineage edge.
        for w in (b, c):
            created = [(ts, p) for (child, ts), p in edges.items()
                       if child == w.asyncio_task and ts <= w.ts_enter_ns]
            assert created and max(created)[1] == handler, (rid, w.asyncio_task)
    # Tasks created inside tasks: the 2 gather children of each request, no more. The
    # handlers (one per client connection) are created in the loop's callbacks: roots.
    assert sum(1 for p in edges.values() if p) == 2 * REQUESTS
    handlers = {x.asyncio_task for x in responses.values()}
    assert len(handlers) == CLIENTS
    assert all(any(child == h and not p for (child, _), p in edges.items()) for h in handlers)


@pytest.mark.parametrize("python", _pythons())
def test_every_call_is_linked_to_its_request_by_task(run, python):
    _need(python)
    r = run(python)
    spans = [s for s in r.spans if s.pid == r.front.pid]
    servers = {s.attributes["url.path"].rsplit("/", 1)[1]: s for s in spans
               if s.role == "server"}
    clients = [s for s in spans if s.role == "client"]
    assert set(servers) == set(r.ids) and len(clients) == 2 * REQUESTS
    by_task = 0
    for s in clients:
        rid = s.attributes["url.path"].rsplit("/", 1)[1]
        assert s.parent_span_id == servers[rid].span_id, (s.attributes, s.link_source)
        assert s.trace_id == servers[rid].trace_id
        assert s.attributes[TASK] != servers[rid].attributes[TASK]
        # Until the stage has seen a second request read before the first was answered,
        # the loop looks thread-per-request and the thread rule links (rightly: one
        # request was open); from then on, the task rule.
        if s.attributes.get("deeptrace.thread_concurrent"):
            assert s.link_source == "asyncio_task"
            by_task += 1
        else:
            assert s.link_source == "thread"
    assert by_task >= REQUESTS and r.linker.counts["links_asyncio_task"] == by_task
    assert not any(k.startswith("asyncio_task_deferred") for k in r.linker.counts)
    # The loop's iterations move between a request's read and its answer.
    for s in servers.values():
        assert s.attributes["deeptrace.response_loop_iter"] > s.attributes["deeptrace.loop_iter"] > 0


@pytest.mark.parametrize("python", _pythons()[:1])
@pytest.mark.parametrize("counter", [True, False], ids=["counter", "no-counter"])
def test_loop_iter_counts_epoll_returns_exactly(python, counter):
    """And with `loop_counter: false`, no program on epoll returns: loop_iter stays 0."""
    _need(python)
    require_bpf()
    n = 37
    peer = _Proc(python, "loop", n)
    probe = start_probe(pids=[peer.pid], loop_counter=counter)
    epoll = {tp for tp in probe.bpf.tracepoint_fds if b"epoll" in tp}
    assert (b"syscalls:sys_exit_epoll_wait" in epoll) == counter, epoll
    try:
        peer.proc.stdin.write("go\n")
        peer.proc.stdin.flush()
        assert json.loads(peer.proc.stdout.readline())["done"]
        recs, deadline = [], time.monotonic() + 5
        while time.monotonic() < deadline and len(
                [x for x in recs if x.kind == "socket" and x.syscall == "sendto"]) < 2:
            recs += probe.poll(50)
    finally:
        peer.stop()
        probe.detach()
    before, after = [x for x in recs if x.kind == "socket" and x.syscall == "sendto"]
    assert (before.payload, after.payload) == (b"before", b"after")
    if counter:
        assert after.loop_iter - before.loop_iter == n
    else:
        assert before.loop_iter == after.loop_iter == 0
    assert before.asyncio_task == after.asyncio_task == 0


_SLOT_PEER = r"""
import json, os, select, socket, sys, threading
slots, residue, port = map(int, sys.argv[1:4])
parked = []                     # (tid, its queue of work)
def thread():
    me = threading.get_native_id()
    if me % slots != residue:
        return
    box, ready = [], threading.Event()
    parked.append((me, box, ready))
    while True:
        ready.wait()
        ready.clear()
        job = box.pop()
        if job is None:
            return
        job()
        done.set()
done = threading.Event()
while len(parked) < 3:          # threads until three have the chosen low bits
    t = threading.Thread(target=thread)
    t.start()
    t.join(0.01)
print(json.dumps([tid for tid, _, _ in parked]), flush=True)
sys.stdin.readline()
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
def polls(n):
    def job():
        ep = select.epoll()
        for _ in range(n):
            ep.poll(0)
        ep.close()
    return job
def send(name):
    return lambda: s.sendto(name, ("127.0.0.1", port))
# A, B, C wait 5, 7 and 3 times: C takes A's way. Then each sends its name.
for (tid, box, ready), job in zip(parked * 2, [polls(5), polls(7), polls(3),
                                               send(b"A"), send(b"B"), send(b"C")]):
    done.clear()
    box.append(job)
    ready.set()
    done.wait()
for tid, box, ready in parked:
    box.append(None)
    ready.set()
print("done", flush=True)
"""


def _tid_residues(slots):
    """The low bits of every live thread's id on the host."""
    out = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            out.update(int(t) % slots for t in os.listdir(f"/proc/{pid}/task"))
        except OSError:
            pass
    return out


def test_a_third_thread_on_a_loop_slot_takes_the_older_way_and_is_counted():
    """loop_slots: 1024; three threads of one process whose ids have the same low 10 bits
    (made until found, with low bits no other live thread has) wait 5, 7 and 3 times:
    the third takes the first one's way (loop_slots_taken 1), so the first's record has
    loop_iter 0 and the others theirs exactly."""
    require_bpf()
    import socket
    slots = 1024
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind(("127.0.0.1", 0))
    residue = next(r for r in range(slots) if r not in _tid_residues(slots))
    peer = subprocess.Popen([sys.executable, "-c", _SLOT_PEER, str(slots), str(residue),
                             str(sink.getsockname()[1])],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    probe = None
    try:
        tids = json.loads(peer.stdout.readline())
        assert len({t % slots for t in tids}) == 1, tids
        probe = start_probe(pids=[peer.pid], loop_counter=True, loop_slots=slots)
        peer.stdin.write("go\n")
        peer.stdin.flush()
        assert peer.stdout.readline().strip() == "done"
        recs, deadline = [], time.monotonic() + 5
        while time.monotonic() < deadline and len(
                [x for x in recs if x.kind == "socket" and x.syscall == "sendto"]) < 3:
            recs += probe.poll(50)
        stats = probe.stats()
    finally:
        peer.kill()
        peer.wait()
        sink.close()
        if probe is not None:
            probe.detach()
    sent = {x.payload: (x.tid, x.loop_iter) for x in recs
            if x.kind == "socket" and x.syscall == "sendto"}
    assert sent == {b"A": (tids[0], 0), b"B": (tids[1], 7), b"C": (tids[2], 3)}, sent
    assert stats["loop_slots_taken"] == 1, stats
