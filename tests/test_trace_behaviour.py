"""Trace probe behaviour beyond single calls: connection ids, filters, self-exclusion,
payload caps, mmsg message splitting, and exact loss accounting, on the real kernel."""

import os
import socket
import sys
import time
import types

import pytest

from conftest import Script, start_probe, udp_sender
from deeptrace_core.plugins import PluginHost

pytestmark = pytest.mark.bpf


def closed(pid, n=1):
    return lambda recs: sum(1 for r in recs if r.pid == pid and r.syscall == "close") >= n


def test_fd_reuse_gets_new_connection_id(tracer):
    child = Script("""
import json, os, socket
srv = socket.socket(); srv.bind(('127.0.0.1', 0)); srv.listen(8)
fds = []
for i in range(2):                       # close, then the same fd number is reused
    c = socket.create_connection(srv.getsockname()); c.send(b'x%d' % i)
    fds.append(c.fileno()); c.close()
a = socket.create_connection(srv.getsockname())
b = socket.create_connection(srv.getsockname())
a.send(b'via-a')
os.dup2(b.fileno(), a.fileno())          # a's fd now names b's socket; no close() is seen
os.write(a.fileno(), b'via-dup')
print(json.dumps({"fds": fds, "a": a.fileno(), "b_port": b.getsockname()[1]}), flush=True)
""")
    tracer.probe.add_pids([child.pid])
    child.go()
    rep = child.finish()
    tracer.wait_for(closed(child.pid, 2))
    mine = tracer.of(child.pid)
    sends = [r for r in mine if r.syscall == "sendto" and r.payload in (b"x0", b"x1")]
    assert [r.fd for r in sends] == rep["fds"] and rep["fds"][0] == rep["fds"][1]
    assert sends[0].conn_id != sends[1].conn_id
    connects = [r for r in mine if r.syscall == "connect"]
    assert [c.conn_id for c in connects[:2]] == [s.conn_id for s in sends]
    via_a = next(r for r in mine if r.payload == b"via-a")
    via_dup = next(r for r in mine if r.payload == b"via-dup")
    assert via_a.fd == via_dup.fd == rep["a"]
    assert via_dup.local_port == rep["b_port"]       # the socket the fd names now
    assert via_dup.conn_id != via_a.conn_id


def test_close_by_an_unselected_thread_forgets_the_connection(bpf_ok):
    """The probe caches each fd's socket; a close() by a thread the filter does not select
    must still drop it, or the fd's next socket would inherit the old connection."""
    child = Script("""
import ctypes, json, socket, threading
libc = ctypes.CDLL(None)
def name(n): libc.prctl(15, n.encode(), 0, 0, 0)   # PR_SET_NAME: this thread's comm
name('dt-selmain')
srv = socket.socket(); srv.bind(('127.0.0.1', 0)); srv.listen(8)
a = socket.create_connection(srv.getsockname()); a.send(b'first')
fd = a.fileno()
def closer():
    name('dt-other'); a.close()
t = threading.Thread(target=closer); t.start(); t.join()
b = socket.create_connection(srv.getsockname()); b.send(b'second')
print(json.dumps({"fd": fd, "b_fd": b.fileno(), "b_port": b.getsockname()[1]}), flush=True)
""")
    probe = start_probe(comms=["dt-selmain"])
    try:
        child.go()
        rep = child.finish()
        deadline, recs = time.monotonic() + 5, []
        while time.monotonic() < deadline and len(recs) < 2:
            recs += [r for r in probe.poll(20) if r.pid == child.pid and
                     r.payload in (b"first", b"second")]
    finally:
        probe.detach()
    assert rep["b_fd"] == rep["fd"]                 # the same fd number, a new socket
    first, second = sorted(recs, key=lambda r: r.ts_exit_ns)
    assert not any(r.syscall == "close" for r in recs)  # the closing thread is not traced
    assert second.local_port == rep["b_port"]
    assert second.conn_id != first.conn_id


def _both_ends(probe, payload, timeout=5.0):
    """(egress, ingress) records carrying `payload`: the two ends of one transfer."""
    deadline, recs = time.monotonic() + timeout, []
    while time.monotonic() < deadline and len(recs) < 2:
        recs += [r for r in probe.poll(20) if r.payload == payload]
    return (next(r for r in recs if r.direction == "egress"),
            next(r for r in recs if r.direction == "ingress"))


def test_socket_opened_before_agent_started(bpf_ok):
    child = Script("""
import json, socket, sys
srv = socket.socket(socket.AF_INET6); srv.bind(('::1', 0)); srv.listen(1)
c = socket.create_connection(srv.getsockname()[:2]); s, _ = srv.accept()
print(json.dumps({"local": list(c.getsockname()[:2]), "peer": list(c.getpeername()[:2]),
                  "fd": c.fileno(), "sfd": s.fileno()}), flush=True)
sys.stdin.readline()                  # the probe attaches now, after the connection exists
c.send(b'after-attach'); s.recv(100)
print(json.dumps({}), flush=True)
""")
    child.go()
    rep = child.line()
    probe = start_probe(pids=[child.pid])
    try:
        child.go()
        child.finish()
        send, recv = _both_ends(probe, b"after-attach")
    finally:
        probe.detach()
    assert send.fd == rep["fd"] and recv.fd == rep["sfd"]
    assert [send.local_addr, send.local_port] == rep["local"]
    assert [send.remote_addr, send.remote_port] == rep["peer"]
    assert [recv.local_addr, recv.local_port] == rep["peer"]
    assert [recv.remote_addr, recv.remote_port] == rep["local"]
    assert send.family == "ipv6" and send.l4 == "tcp"
    assert (send.tcp_seq_start, send.tcp_seq_end) == (recv.tcp_seq_start, recv.tcp_seq_end)
    assert send.conn_id and recv.conn_id and send.conn_id != recv.conn_id


def test_read_that_consumes_the_fin_keeps_stream_positions(bpf_ok):
    """A read that also takes the peer's FIN moves copied_seq one past the data; the
    probe takes it back out, also on a connection whose addresses it already keeps (the
    socket state is then read only for this check): both ends' ranges stay equal."""
    child = Script("""
import json, socket, time
srv = socket.socket(); srv.bind(('127.0.0.1', 0)); srv.listen(1)
c = socket.create_connection(srv.getsockname()); s, _ = srv.accept()
c.send(b'a'); s.recv(1)            # first record: the connection's addresses are kept
c.send(b'hello-fin'); c.close()    # the FIN lands behind the data
time.sleep(0.3)
got = s.recv(100)                  # data and FIN in one read
print(json.dumps({"got": got.decode()}), flush=True)
""")
    probe = start_probe(pids=[child.pid])
    try:
        child.go()
        assert child.finish() == {"got": "hello-fin"}
        send, recv = _both_ends(probe, b"hello-fin")
    finally:
        probe.detach()
    assert recv.tcp_seq_end - recv.tcp_seq_start == 9
    assert (send.tcp_seq_start, send.tcp_seq_end) == (recv.tcp_seq_start, recv.tcp_seq_end)


def test_protocol_payload_bytes_caps_each_protocol_once_detected(bpf_ok):
    """probes.trace.protocol_payload_bytes: HTTP/1 calls keep 64 bytes once the connection
    is detected as HTTP/1 (the detecting call keeps payload_bytes), Redis calls keep
    payload_bytes; sendmmsg messages follow the same cap."""
    child = Script("""
import json, socket, sys
sys.path.insert(0, %r)
from peers import sendmmsg
def pair():
    srv = socket.socket(); srv.bind(('127.0.0.1', 0)); srv.listen(1)
    c = socket.create_connection(srv.getsockname()); s, _ = srv.accept()
    return c, s
http, redis = pair(), pair()
req = b'GET /' + b'a' * 200 + b' HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n'
cmd = b'*3\\r\\n$3\\r\\nSET\\r\\n$1\\r\\nk\\r\\n$200\\r\\n' + b'v' * 200 + b'\\r\\n'
for c, s, data in ((*http, req), (*redis, cmd)):
    for _ in range(2):
        c.sendall(data); got = b''
        while len(got) < len(data): got += s.recv(4096)
assert sendmmsg(http[0], [[req], [req]]) == [len(req)] * 2   # two messages, capped alone
got = b''
while len(got) < 2 * len(req): got += http[1].recv(4096)
print(json.dumps({"req": len(req), "cmd": len(cmd)}), flush=True)
""" % os.path.dirname(__file__))
    context = types.SimpleNamespace(registry=PluginHost().load_entry_points().registry())
    probe = start_probe(context, pids=[child.pid], protocols=["http1", "redis"],
                        protocol_payload_bytes={"http1": 64})
    try:
        child.go()
        rep = child.finish()
        deadline, recs = time.monotonic() + 5, []
        while time.monotonic() < deadline and len(recs) < 6:
            recs += [r for r in probe.poll(20) if r.pid == child.pid and r.direction == "egress"]
    finally:
        probe.detach()
    http = [(len(r.payload), r.bytes, r.truncated) for r in recs if r.protocol == "http1"]
    redis = [(len(r.payload), r.bytes, r.truncated) for r in recs if r.protocol == "redis"]
    assert http == [(rep["req"], rep["req"], False)] + [(64, rep["req"], True)] * 3
    assert redis == [(rep["cmd"], rep["cmd"], False)] * 2


def test_tcp_socket_reconnected_after_af_unspec_reports_its_new_peer(bpf_ok):
    """connect(AF_UNSPEC) disconnects a TCP socket, which may then connect elsewhere: the
    addresses the probe keeps per connection must not outlive the old peer."""
    child = Script("""
import ctypes, json, socket
libc = ctypes.CDLL(None, use_errno=True)
a = socket.socket(); a.bind(('127.0.0.1', 0)); a.listen(1)
b = socket.socket(); b.bind(('127.0.0.1', 0)); b.listen(1)
c = socket.socket()
c.connect(a.getsockname()); sa, _ = a.accept(); c.send(b'to-a'); sa.recv(10)
unspec = (ctypes.c_ubyte * 16)()                  # struct sockaddr, sa_family = AF_UNSPEC
assert libc.connect(c.fileno(), unspec, 16) == 0, ctypes.get_errno()
c.connect(b.getsockname()); sb, _ = b.accept(); c.send(b'to-b'); sb.recv(10)
print(json.dumps({"a": a.getsockname()[1], "b": b.getsockname()[1]}), flush=True)
""")
    probe = start_probe(pids=[child.pid])
    try:
        child.go()
        rep = child.finish()
        deadline, sent = time.monotonic() + 5, {}
        while time.monotonic() < deadline and len(sent) < 2:
            sent.update({r.payload: r for r in probe.poll(20)
                         if r.payload in (b"to-a", b"to-b") and r.direction == "egress"})
    finally:
        probe.detach()
    assert sent[b"to-a"].remote_port == rep["a"]
    assert sent[b"to-b"].remote_port == rep["b"]


def test_the_largest_payload_cap_loads_and_keeps_every_byte(bpf_ok):
    """payload_bytes and protocol_payload_bytes go up to MAX_PAYLOAD (8192: the per-CPU
    scratch record, twice the cap, must fit a per-CPU map value); both load, and a call
    keeps exactly that many bytes."""
    from deeptrace_plugins.trace.probe import MAX_PAYLOAD, TraceConfig
    with pytest.raises(ValueError):
        TraceConfig(payload_bytes=MAX_PAYLOAD + 1)
    child = Script(f"""
import json, socket
srv = socket.socket(); srv.bind(('127.0.0.1', 0)); srv.listen(1)
c = socket.create_connection(srv.getsockname()); s, _ = srv.accept()
for n in ({MAX_PAYLOAD}, {MAX_PAYLOAD} + 808):
    c.sendall(b'z' * n); got = 0
    while got < n: got += len(s.recv(65536))
print(json.dumps({{}}), flush=True)
""")
    probe = start_probe(pids=[child.pid], payload_bytes=MAX_PAYLOAD)
    try:
        child.go()
        child.finish()
        deadline, sent = time.monotonic() + 5, []
        while time.monotonic() < deadline and len(sent) < 2:
            sent += [r for r in probe.poll(20) if r.pid == child.pid and
                     r.direction == "egress" and r.syscall == "sendto"]
    finally:
        probe.detach()
    assert [(len(r.payload), r.bytes, r.truncated) for r in sent] == [
        (MAX_PAYLOAD, MAX_PAYLOAD, False), (MAX_PAYLOAD, MAX_PAYLOAD + 808, True)]
    context = types.SimpleNamespace(registry=PluginHost().load_entry_points().registry())
    start_probe(context, ports=[1], protocols=["http2"],
                protocol_payload_bytes={"http2": MAX_PAYLOAD}).detach()


TRAFFIC = """
import json, socket
srv = socket.socket(); srv.bind(('127.0.0.1', PORT)); srv.listen(1)
c = socket.create_connection(srv.getsockname()); s, _ = srv.accept()
c.send(b'TAG'); s.recv(100); c.close(); s.close(); srv.close()
print(json.dumps({}), flush=True)
"""


def test_pid_filter_selects_only_listed_processes(tracer):
    picked = Script(TRAFFIC.replace("PORT", "0").replace("TAG", "picked"))
    other = Script(TRAFFIC.replace("PORT", "0").replace("TAG", "other"))
    tracer.probe.add_pids([picked.pid])
    other.go(), picked.go()
    other.finish(), picked.finish()
    tracer.wait_for(closed(picked.pid, 3))
    assert any(r.payload == b"picked" for r in tracer.of(picked.pid))
    assert tracer.of(other.pid) == []
    assert not any(r.payload == b"other" for r in tracer.records)


STEPS = """
import ctypes, json, socket, sys
libc = ctypes.CDLL(None)
srv = socket.socket(); srv.bind(('127.0.0.1', 0)); srv.listen(1)
c = socket.create_connection(srv.getsockname()); s, _ = srv.accept()
for step in STEPS:
    if step.startswith('name:'):
        libc.prctl(15, step[5:].encode(), 0, 0, 0)   # PR_SET_NAME: this thread's comm
    else:
        c.send(step.encode())
    print(json.dumps({}), flush=True)
    sys.stdin.readline()
"""


def _sent(probe, pid, tags, timeout=3.0):
    """(tag, comm) of pid's egress records until the tags showed up (or timeout)."""
    deadline, seen = time.monotonic() + timeout, []
    while time.monotonic() < deadline:
        seen += [r for r in probe.poll(20) if r.pid == pid and r.direction == "egress"]
        if set(tags) <= {r.payload.decode() for r in seen}:
            time.sleep(0.2)   # and anything that should not be there
            seen += [r for r in probe.poll(0) if r.pid == pid and r.direction == "egress"]
            break
    return [(r.payload.decode(), r.comm) for r in seen]


def test_filter_verdict_follows_renames_and_pid_filter_changes(bpf_ok):
    """The kernel caches each thread's filter verdict; a new name (prctl, exec) and a
    changed pid filter must both take effect at the thread's next call."""
    steps = ["name:dt-ren-a", "one", "name:dt-ren-b", "two", "name:dt-ren-a", "three"]
    child = Script(STEPS.replace("STEPS", repr(steps)))
    probe = start_probe(comms=["dt-ren-a"])
    try:
        for _ in steps:
            child.go()
            child.line()
        child.go()
        assert _sent(probe, child.pid, ["one", "three"]) == [("one", "dt-ren-a"),
                                                             ("three", "dt-ren-a")]
    finally:
        probe.detach()
        child.proc.wait(5)

    steps = ["p1", "p2", "p3"]
    child = Script(STEPS.replace("STEPS", repr(steps)))
    probe = start_probe(pids=[os.getpid()])   # a pid filter, at first without the child
    try:
        child.go()
        child.line()                          # p1 sent: not selected, verdict cached
        probe.add_pids([child.pid])
        child.go()
        child.line()                          # p2 sent: selected now
        probe.remove_pids([child.pid])
        child.go()
        child.line()                          # p3 sent: not selected again
        child.go()
        assert _sent(probe, child.pid, ["p2"]) == [("p2", os.path.basename(sys.executable)[:15])]
    finally:
        probe.detach()
        child.proc.wait(5)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_port_filter_and_self_exclusion(bpf_ok):
    """No pid filter here: everything on the port is traced, except this process (the agent)."""
    port = _free_port()
    probe = start_probe(ports=[port])
    try:
        kept = Script(TRAFFIC.replace("PORT", str(port)).replace("TAG", "on-port"))
        dropped = Script(TRAFFIC.replace("PORT", "0").replace("TAG", "off-port"))
        kept.go(), dropped.go()
        kept.finish(), dropped.finish()
        # The agent's own traffic on the traced port must never show up.
        srv = socket.socket()
        srv.bind(("127.0.0.1", _free_port()))
        srv.listen(1)
        own_c = socket.create_connection(srv.getsockname())
        own_s, _ = srv.accept()
        own_c.send(b"self-traffic")
        own_s.recv(100)
        for s in (own_c, own_s, srv):
            s.close()
        deadline, recs = time.monotonic() + 5, []
        while time.monotonic() < deadline and not any(r.payload == b"on-port" for r in recs):
            recs += probe.poll(20)
        time.sleep(0.2)
        recs += probe.poll(20)
    finally:
        probe.detach()
    assert any(r.payload == b"on-port" and r.pid == kept.pid for r in recs)
    assert all(port in (r.local_port, r.remote_port) for r in recs)
    assert not any(r.payload in (b"off-port", b"self-traffic") for r in recs)
    assert not any(r.pid == os.getpid() for r in recs)


def test_payload_cap_and_one_record_per_mmsg_message(tracer):
    child = Script("""
import json, os, socket, sys
sys.path.insert(0, %r)
from peers import sendmmsg, recvmmsg
srv = socket.socket(); srv.bind(('127.0.0.1', 0)); srv.listen(1)
c = socket.create_connection(srv.getsockname()); s, _ = srv.accept()
big = bytes(range(256)) * 12                         # 3072 bytes, over the 1024 cap
os.write(c.fileno(), big); got = b''
while len(got) < len(big): got += s.recv(65536)
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind(('127.0.0.1', 0))
v = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); v.bind(('127.0.0.1', 0))
sent = sendmmsg(v, [[b'one'], [b'two', b'-2'], [b'three']], u.getsockname())
msgs = recvmmsg(u, 3, [64])
print(json.dumps({"sent": sent, "msgs": [m.hex() for m in msgs], "u": u.getsockname()[1],
                  "v": v.getsockname()[1]}), flush=True)
""" % os.path.dirname(__file__))
    tracer.probe.add_pids([child.pid])
    child.go()
    rep = child.finish()
    tracer.wait_for(lambda recs: sum(1 for r in recs if r.pid == child.pid
                                     and r.syscall == "recvmmsg") >= 3)
    mine = tracer.of(child.pid)
    big = bytes(range(256)) * 12
    w = next(r for r in mine if r.syscall == "write")
    assert w.bytes == 3072 and w.payload == big[:1024] and w.truncated
    assert w.tcp_seq_end - w.tcp_seq_start == 3072
    out = [r for r in mine if r.syscall == "sendmmsg"]
    assert [(r.msg_index, r.payload, r.bytes) for r in out] == [
        (0, b"one", 3), (1, b"two-2", 5), (2, b"three", 5)]
    assert all(r.remote_port == rep["u"] and r.local_port == rep["v"] for r in out)
    inc = [r for r in mine if r.syscall == "recvmmsg"]
    assert [(r.msg_index, r.payload) for r in inc] == [(0, b"one"), (1, b"two-2"), (2, b"three")]
    assert all(r.remote_port == rep["v"] and r.local_port == rep["u"] for r in inc)


def test_lost_events_are_counted_exactly(bpf_ok):
    """A 4 KiB ring buffer and no draining: every record is either delivered or counted."""
    n = 400
    child = udp_sender(n)
    probe = start_probe(pids=[child.pid], ringbuf_pages=1, wakeup_bytes=1 << 30)
    try:
        child.go()
        child.finish()
        recs = []
        for _ in range(5):
            recs += probe.poll(20)
        stats = probe.stats()
    finally:
        probe.detach()
    traced_calls = 1 + n + 1  # socket, the sends, close
    assert stats["ringbuf_full"] > 0
    assert stats["events"] == len(recs)
    assert stats["events"] + stats["ringbuf_full"] == traced_calls
    assert stats["decode_failed"] == 0


def test_gc_forgets_connections_of_exited_processes(tracer):
    child = Script("""
import json, os, socket
srv = socket.socket(); srv.bind(('127.0.0.1', 0)); srv.listen(1)
c = socket.create_connection(srv.getsockname()); c.send(b'then-exit-without-close')
print(json.dumps({}), flush=True)
os._exit(0)                           # the kernel closes the fds; no close() is traced
""")
    tracer.probe.add_pids([child.pid])
    child.go()
    child.finish()
    tracer.wait_for(lambda recs: any(r.payload == b"then-exit-without-close" for r in recs))
    conns = tracer.probe.bpf[b"conns"]
    assert any(k.tgid == child.pid for k in conns.keys())
    tracer.probe.gc()
    assert not any(k.tgid == child.pid for k in conns.keys())


def test_mmsg_messages_past_the_limit_are_counted_and_tcp_positions_chain(bpf_ok):
    """Each message is its own tail call; the 9th and 10th of one call are not recorded but
    counted, and a TCP sendmmsg's messages cover consecutive stream positions."""
    child = Script("""
import json, os, socket, sys
sys.path.insert(0, %r)
from peers import sendmmsg
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind(('127.0.0.1', 0))
v = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
n_udp = sendmmsg(v, [[b'm%%d' %% i] for i in range(10)], u.getsockname())
srv = socket.socket(); srv.bind(('127.0.0.1', 0)); srv.listen(1)
c = socket.create_connection(srv.getsockname()); s, _ = srv.accept()
n_tcp = sendmmsg(c, [[b'aa'], [b'bbb'], [b'cccc']], None)
print(json.dumps({"udp": n_udp, "tcp": n_tcp}), flush=True)
""" % os.path.dirname(__file__))
    probe = start_probe(pids=[child.pid])
    try:
        child.go()
        rep = child.finish()
        deadline, recs = time.monotonic() + 5, []
        while time.monotonic() < deadline and len(recs) < 11:
            recs += [r for r in probe.poll(20) if r.syscall == "sendmmsg"]
        stats = probe.stats()
    finally:
        probe.detach()
    assert rep == {"udp": [2] * 10, "tcp": [2, 3, 4]}   # bytes sent per message
    udp = [r for r in recs if r.l4 == "udp"]
    assert [(r.msg_index, r.payload) for r in udp] == [(i, b"m%d" % i) for i in range(8)]
    assert stats["mmsg_truncated"] == 1
    tcp = [r for r in recs if r.l4 == "tcp"]
    assert [(r.msg_index, r.payload) for r in tcp] == [(0, b"aa"), (1, b"bbb"), (2, b"cccc")]
    assert all(a.tcp_seq_end == b.tcp_seq_start for a, b in zip(tcp, tcp[1:]))
    assert [r.tcp_seq_end - r.tcp_seq_start for r in tcp] == [2, 3, 4]


def test_ingress_calls_take_arguments_at_exit_peek_flags_and_times(bpf_ok):
    """Ingress calls have no enter program: fd, buffer, flags and address come from the
    registers at exit. MSG_PEEK (recvfrom's flags in r10, recvmsg's in dx) must still mark
    the record and leave its stream position at the data's first byte; a recvfrom on an
    unconnected UDP socket still names its sender (r8). An ingress record's enter time is
    its exit time (its bytes count from there); an egress record keeps its own enter time,
    and a read that blocked 300 ms is stamped when it returned, not when it was called."""
    child = Script("""
import json, socket, time, threading
srv = socket.socket(); srv.bind(('127.0.0.1', 0)); srv.listen(1)
c = socket.create_connection(srv.getsockname()); s, _ = srv.accept()
c.send(b'peek-me')
time.sleep(0.2)
a = s.recv(100, socket.MSG_PEEK)                 # recvfrom, flags in r10
b = s.recvmsg(100, 0, socket.MSG_PEEK)[0]        # recvmsg, flags in dx
d = s.recv(100)                                  # consumes
t0 = time.time_ns()
threading.Timer(0.3, lambda: c.send(b'late')).start()
e = s.recv(100)                                  # blocks 300 ms
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind(('127.0.0.1', 0))
v = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); v.bind(('127.0.0.1', 0))
v.sendto(b'udp-from', u.getsockname())
f, who = u.recvfrom(100)
print(json.dumps({"got": [x.decode() for x in (a, b, d, e, f)], "t0": t0,
                  "sender": list(who)}), flush=True)
""")
    probe = start_probe(pids=[child.pid])
    try:
        child.go()
        rep = child.finish()
        recs = []
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and sum(r.payload == b"udp-from" for r in recs) < 2:
            recs += [r for r in probe.poll(20) if r.pid == child.pid]
    finally:
        probe.detach()
    assert rep["got"] == ["peek-me"] * 3 + ["late", "udp-from"]
    ins = [r for r in recs if r.direction == "ingress" and r.l4 == "tcp"]
    assert [(r.syscall, r.payload, r.peek) for r in ins] == [
        ("recvfrom", b"peek-me", True), ("recvmsg", b"peek-me", True),
        ("recvfrom", b"peek-me", False), ("recvfrom", b"late", False)]
    sent = {r.payload: r for r in recs if r.direction == "egress" and r.l4 == "tcp"}
    for r in ins[:3]:  # peeks and the consuming read cover the same stream bytes
        assert (r.tcp_seq_start, r.tcp_seq_end) == (sent[b"peek-me"].tcp_seq_start,
                                                    sent[b"peek-me"].tcp_seq_end)
    for r in ins:
        assert r.ts_enter_ns == r.ts_exit_ns
    late = ins[3]
    assert late.ts_exit_ns - rep["t0"] >= 250_000_000  # stamped at return, after the wait
    assert late.ts_exit_ns >= sent[b"late"].ts_exit_ns
    assert all(r.ts_enter_ns < r.ts_exit_ns for r in sent.values())
    udp = next(r for r in recs if r.direction == "ingress" and r.l4 == "udp")
    assert (udp.syscall, udp.payload) == ("recvfrom", b"udp-from")
    assert [udp.remote_addr, udp.remote_port] == rep["sender"]


def test_reads_that_return_eagain_leave_no_record(bpf_ok):
    """A non-blocking read with nothing to read (EAGAIN: an event loop draining its
    sockets) is not a record; the same socket's next read, with data, is, exactly once."""
    child = Script("""
import json, socket, time
srv = socket.socket(); srv.bind(('127.0.0.1', 0)); srv.listen(1)
c = socket.create_connection(srv.getsockname()); s, _ = srv.accept()
s.setblocking(False)
misses = 0
for call in (lambda: s.recv(100), lambda: s.recvmsg(100), lambda: s.recv_into(bytearray(9))):
    try:
        call()
    except BlockingIOError:
        misses += 1
c.send(b'now-data')
time.sleep(0.2)
got = s.recv(100)
c.close(); s.close()
print(json.dumps({"misses": misses, "got": got.decode()}), flush=True)
""")
    probe = start_probe(pids=[child.pid])
    try:
        child.go()
        assert child.finish() == {"misses": 3, "got": "now-data"}
        recs = []
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and sum(r.syscall == "close" for r in recs) < 2:
            recs += [r for r in probe.poll(20) if r.pid == child.pid]
    finally:
        probe.detach()
    ingress = [(r.syscall, r.bytes, r.payload) for r in recs if r.direction == "ingress"]
    assert ingress == [("recvfrom", 8, b"now-data")]


def test_a_poll_decodes_at_most_a_batch_and_the_next_takes_the_rest(bpf_ok):
    """However full the ring (16 MB by default), one poll decodes at most BATCH_RECORDS
    records, so a round's memory stays bounded; the following polls hand over the rest,
    each record once."""
    from deeptrace_plugins.trace.probe import BATCH_RECORDS
    n = BATCH_RECORDS + 500
    child = udp_sender(n)
    probe = start_probe(pids=[child.pid])
    try:
        child.go()
        child.finish()
        time.sleep(0.2)
        sizes, recs = [], []
        while len(recs) < n + 2:
            got = probe.poll(100)
            assert got, f"only {len(recs)} of {n + 2} records came"
            sizes.append(len(got))
            recs += got
        assert probe.poll(50) == []
    finally:
        probe.detach()
    assert sizes[0] == BATCH_RECORDS and max(sizes) <= BATCH_RECORDS
    assert [r.syscall for r in recs] == ["socket"] + ["sendto"] * n + ["close"]
