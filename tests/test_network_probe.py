"""Network probe on the real kernel: TCP connection records with exact bytes both ways,
owners, retransmits under packet loss (nftables in our own network namespaces), resets
of a refused connection, per-process TCP/UDP bytes, and the top-N aggregation."""

import json
import os
import re
import shutil
import subprocess
import sys
import time

import pytest

from conftest import CI, Script, require_bpf

pytestmark = pytest.mark.bpf


class Net:
    """An attached NetworkProbe and every record it has returned so far."""

    def __init__(self, probe):
        self.probe = probe
        self.records = []

    def drain(self):
        # poll(1) within the interval: records only (poll(0) would collect every time).
        self.records += [r for r in self.probe.poll(1) if r.kind == "tcp_connection"]

    def wait_for(self, pred, timeout=10.0):
        deadline = time.monotonic() + timeout
        while True:
            self.drain()
            found = [r for r in self.records if pred(r)]
            if found or time.monotonic() > deadline:
                return found
            time.sleep(0.02)

    def points(self):
        return self.probe.collect()


def value(points, name, **attrs):
    """The value of the one point `name` whose attributes include `attrs` (0 if none)."""
    found = [p for p in points if p.name == name
             and all(p.attributes.get(k.replace("_", ".")) == v for k, v in attrs.items())]
    assert len(found) <= 1, found
    return found[0].value if found else 0


@pytest.fixture(scope="module")
def net():
    require_bpf()
    from deeptrace_core.bpf import kernel_defines
    from deeptrace_plugins.network.probe import NetworkConfig, NetworkProbe

    probe = NetworkProbe(NetworkConfig(interval=3600, top_n=100000))
    probe.attach(kernel_defines(probe.kernel_fields))
    yield Net(probe)
    probe.detach()


SERVER = """
import json, socket
FAMILY, HOST = socket.AF_INET, '127.0.0.1'
srv = socket.socket(FAMILY); srv.bind((HOST, 0)); srv.listen(1)
print(json.dumps({"port": srv.getsockname()[1]}), flush=True)
s, _ = srv.accept()
got = 0
while got < RX:
    got += len(s.recv(65536))
s.sendall(b'S' * TX)
CLOSE_MODE
print(json.dumps({"got": got, "local": s.getsockname()[1]}), flush=True)
s.close(); srv.close()
"""
CLIENT = """
import json, socket, sys
FAMILY, HOST = socket.AF_INET, '127.0.0.1'
port = int(sys.stdin.readline())
c = socket.create_connection((HOST, port))
c.sendall(b'C' * TX)
got = 0
while got < RX:
    got += len(c.recv(65536))
CLOSE_MODE
print(json.dumps({"got": got, "local": c.getsockname()[1]}), flush=True)
c.close()
"""


def _script(text, **subst):
    for k, v in subst.items():
        text = text.replace(k, str(v))
    return Script(text)


def _run_pair(server_close, client_close, up=100000, down=50000, ipv6=False):
    """A server and a client process; the client sends `up` bytes, the server `down`."""
    fam = {"FAMILY, HOST = socket.AF_INET, '127.0.0.1'":
           "FAMILY, HOST = socket.AF_INET6, '::1'"} if ipv6 else {}
    server = _script(SERVER, RX=up, TX=down, CLOSE_MODE=server_close, **fam)
    client = _script(CLIENT, RX=down, TX=up, CLOSE_MODE=client_close, **fam)
    server.go()
    port = server.line()["port"]
    client.go()
    client.proc.stdin.write(f"{port}\n")
    client.proc.stdin.flush()
    crep, srep = client.finish(), server.finish()
    assert crep["got"] == down and srep["got"] == up
    return server, client, port, crep["local"]


def test_connection_record_has_exact_bytes_owner_and_duration(net):
    before = net.points()
    t0 = time.time_ns()
    # The client closes first (active close: FIN_WAIT1 -> FIN_WAIT2 -> CLOSE); the server
    # waits for the client's FIN, then closes (passive: CLOSE_WAIT -> LAST_ACK -> CLOSE).
    server, client, port, cport = _run_pair(
        server_close="s.recv(1)  # the client's FIN", client_close="")
    t1 = time.time_ns()
    recs = net.wait_for(lambda r: port in (r.local_port, r.remote_port)
                        and r.pid == server.pid)
    cl = [r for r in net.records if r.local_port == cport and r.remote_port == port]
    sv = [r for r in net.records if r.local_port == port and r.remote_port == cport]
    assert len(cl) == 1 and len(sv) == 1, (cl, sv, recs)
    cl, sv = cl[0], sv[0]
    # Exact data bytes: tcp_sock.bytes_acked/bytes_received less SYN and FIN.
    assert (cl.bytes_sent, cl.bytes_received) == (100000, 50000)
    assert (sv.bytes_sent, sv.bytes_received) == (50000, 100000)
    assert (cl.pid, cl.owner) == (client.pid, "connect")
    assert (sv.pid, sv.owner) == (server.pid, "io")      # accepted: its first recv
    assert cl.comm == sv.comm and cl.comm.startswith("python")
    assert cl.family == sv.family == "ipv4"
    assert cl.local_addr == cl.remote_addr == "127.0.0.1"
    assert cl.last_state == "FIN_WAIT2" and sv.last_state == "LAST_ACK"
    for r in (cl, sv):
        # Born and closed inside the window in which the two processes ran.
        assert t0 <= r.start_ns < r.ts_ns <= t1 + 50_000_000
        assert r.duration_ns == r.ts_ns - r.start_ns > 0
        assert 0 < r.srtt_us < 1_000_000        # loopback: measured, well under a second
        assert r.retransmits == r.total_retrans == 0
        assert r.resets_sent == r.resets_received == 0
        d = r.to_dict()
        assert d["kind"] == "tcp_connection" and d["bytes_sent"] == r.bytes_sent
        assert f"tx={r.bytes_sent} rx={r.bytes_received}" in r.line()

    after = net.points()
    for proc, (tx, rx) in ((client, (100000, 50000)), (server, (50000, 100000))):
        pid = proc.pid
        # sendall/recv loops: the per-process byte counts of socket calls are exact too.
        assert value(after, "process.network.io", process_pid=pid, network_transport="tcp",
                     network_io_direction="transmit") == tx
        assert value(after, "process.network.io", process_pid=pid, network_transport="tcp",
                     network_io_direction="receive") == rx
        assert value(after, "deeptrace.tcp.connections", process_pid=pid) == 1
        assert value(after, "deeptrace.tcp.connection.io", process_pid=pid,
                     network_io_direction="transmit") == tx
        assert value(after, "deeptrace.tcp.connection.io", process_pid=pid,
                     network_io_direction="receive") == rx
        assert value(after, "deeptrace.tcp.retransmits", process_pid=pid) == 0

    def hist(points, name):
        return next(p for p in points if p.name == name)
    for name in ("deeptrace.tcp.srtt", "deeptrace.tcp.connection.duration"):
        h0, h1 = hist(before, name), hist(after, name)
        assert h1.count - h0.count >= 2 and sum(h1.counts) == h1.count
        assert len(h1.counts) == len(h1.bounds) + 1


def test_server_closes_first_over_ipv6_with_half_close(net):
    # The server shuts down its side first (FIN_WAIT1 -> FIN_WAIT2 -> TIME_WAIT/CLOSE); the
    # client reads to EOF, then closes (CLOSE_WAIT -> LAST_ACK -> CLOSE).
    server, client, port, cport = _run_pair(
        server_close="s.shutdown(socket.SHUT_WR); s.recv(1)",
        client_close="assert c.recv(1) == b''", up=12345, down=70001, ipv6=True)
    net.wait_for(lambda r: r.local_port == cport and r.remote_port == port)
    net.wait_for(lambda r: r.local_port == port and r.remote_port == cport)
    cl = next(r for r in net.records if r.local_port == cport and r.remote_port == port)
    sv = next(r for r in net.records if r.local_port == port and r.remote_port == cport)
    assert (cl.bytes_sent, cl.bytes_received, cl.pid) == (12345, 70001, client.pid)
    assert (sv.bytes_sent, sv.bytes_received, sv.pid) == (70001, 12345, server.pid)
    assert cl.family == "ipv6" and cl.local_addr == cl.remote_addr == "::1"
    assert cl.last_state == "LAST_ACK" and sv.last_state == "FIN_WAIT2"


def test_refused_connection_reports_a_reset(net):
    before = net.points()
    child = Script("""
import json, socket
s = socket.socket(); s.bind(('127.0.0.1', 0)); port = s.getsockname()[1]; s.close()
c = socket.socket()
try:
    c.connect(('127.0.0.1', port)); refused = False
except ConnectionRefusedError:
    refused = True
print(json.dumps({"port": port, "refused": refused, "local": c.getsockname()[1]}), flush=True)
""")
    child.go()
    rep = child.finish()
    assert rep["refused"]
    found = net.wait_for(lambda r: r.pid == child.pid and r.remote_port == rep["port"])
    assert len(found) == 1
    r = found[0]
    assert (r.last_state, r.resets_received, r.resets_sent) == ("SYN_SENT", 1, 0)
    assert (r.bytes_sent, r.bytes_received, r.srtt_us) == (0, 0, 0)
    assert r.owner == "connect" and r.local_port == rep["local"]
    after = net.points()
    assert value(after, "deeptrace.tcp.resets", process_pid=child.pid,
                 network_io_direction="receive") == 1
    assert value(after, "deeptrace.tcp.resets", process_pid=child.pid,
                 network_io_direction="transmit") == 0
    # The RST came from no socket (nothing listens): the kernel's reply counts as "unknown",
    # on kernels whose tracepoint fires for it (Linux >= 6.10; the kernel job runs 6.1).
    sent = [value(p, "deeptrace.tcp.resets", process_pid="unknown",
                  network_io_direction="transmit") for p in (before, after)]
    kernel = tuple(map(int, re.match(r"(\d+)\.(\d+)", os.uname().release).groups()))
    assert net.probe.socketless_resets == (kernel >= (6, 10))
    if net.probe.socketless_resets:
        assert sent[1] - sent[0] >= 1
        assert net.probe.stats()["reset_without_socket"] >= 1


def test_udp_bytes_per_process(net):
    child = Script("""
import json, socket
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind(('127.0.0.1', 0))
v = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sizes = [1, 100, 1000, 1400, 9000]
for n in sizes:
    v.sendto(b'u' * n, u.getsockname())
u.recv(100, socket.MSG_PEEK)                 # a peek is not a receive
got = sum(len(u.recv(65536)) for _ in sizes)
print(json.dumps({"sent": sum(sizes), "got": got}), flush=True)
""")
    child.go()
    rep = child.finish()
    assert rep["sent"] == rep["got"] == 11501
    pts = net.points()
    assert value(pts, "process.network.io", process_pid=child.pid, network_transport="udp",
                 network_io_direction="transmit") == 11501
    assert value(pts, "process.network.io", process_pid=child.pid, network_transport="udp",
                 network_io_direction="receive") == 11501
    assert value(pts, "process.network.io", process_pid=child.pid, network_transport="tcp",
                 network_io_direction="transmit") == 0


def test_top_n_folds_the_rest_into_other(net):
    child = Script("""
import json, socket
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind(('127.0.0.1', 0))
for _ in range(100):
    u.sendto(b'x' * 60000, u.getsockname()); u.recv(65536)
print(json.dumps({}), flush=True)
""")
    child.go()
    child.finish()
    full = net.points()
    old = net.probe.config.top_n
    net.probe.config.top_n = 1
    try:
        top1 = net.points()
    finally:
        net.probe.config.top_n = old
    io = [p for p in top1 if p.name == "process.network.io"]
    pids = {p.attributes["process.pid"] for p in io} - {"other", "unknown"}
    assert len(pids) == 1                        # the busiest one (6 MB each way: the child)
    assert {p.attributes["process.executable.name"] for p in io
            if p.attributes["process.pid"] == "other"} <= {"other"}
    # Nothing is lost by folding, per transport and direction.
    for t in ("tcp", "udp"):
        for d in ("transmit", "receive"):
            def total(points):
                return sum(p.value for p in points if p.name == "process.network.io"
                           and p.attributes["network.transport"] == t
                           and p.attributes["network.io.direction"] == d)
            assert total(top1) >= total(full)    # >=: traffic between the two reads


# -- packet loss in our own namespaces ----------------------------------------------

def _sh(*cmd, ns=None, check=True):
    if ns:
        cmd = ("ip", "netns", "exec", ns, *cmd)
    return subprocess.run(cmd, capture_output=True, text=True, check=check)


@pytest.fixture
def netns_pair():
    """Namespaces A (10.200.0.1/30) and B (10.200.0.2/30) joined by a veth pair; every
    address, rule and packet stays inside them. Removed (with their nft tables) after."""
    if not shutil.which("nft") or not shutil.which("ip"):
        if CI:
            pytest.fail("nft and ip (iproute2) are needed")
        pytest.skip("nft or ip missing")
    tag = f"dt{os.getpid() % 100000}"
    a, b = f"{tag}a", f"{tag}b"
    try:
        _sh("ip", "netns", "add", a)
        _sh("ip", "netns", "add", b)
        _sh("ip", "link", "add", f"{tag}va", "netns", a, "type", "veth",
            "peer", "name", f"{tag}vb", "netns", b)
        for ns, dev, addr in ((a, f"{tag}va", "10.200.0.1/30"), (b, f"{tag}vb", "10.200.0.2/30")):
            _sh("ip", "addr", "add", addr, "dev", dev, ns=ns)
            _sh("ip", "link", "set", dev, "up", ns=ns)
            _sh("ip", "link", "set", "lo", "up", ns=ns)
        yield a, b
    finally:
        for ns in (a, b):
            _sh("nft", "delete", "table", "inet", "deeptrace_test", ns=ns, check=False)
            _sh("ip", "netns", "del", ns, check=False)


def test_dropped_packets_are_counted_as_retransmits(net, netns_pair):
    a, b = netns_pair
    port = 5201
    # In B: drop every third data segment towards the server (never SYN/FIN-only
    # segments: their retransmission waits a whole second).
    rules = f"""
table inet deeptrace_test {{
    chain input {{
        type filter hook input priority 0; policy accept;
        tcp dport {port} ip length > 200 numgen inc mod 3 == 0 counter drop
    }}
}}"""
    subprocess.run(["ip", "netns", "exec", b, "nft", "-f", "-"], input=rules, text=True,
                   check=True, capture_output=True)
    size = 300000
    server = subprocess.Popen(
        ["ip", "netns", "exec", b, sys.executable, "-c", f"""
import json, socket
srv = socket.socket(); srv.bind(('10.200.0.2', {port})); srv.listen(1)
print('ready', flush=True)
s, _ = srv.accept(); got = 0
while got < {size}:
    got += len(s.recv(65536))
s.sendall(b'ok'); s.recv(1); s.close()
print(json.dumps({{"got": got}}), flush=True)
"""], stdout=subprocess.PIPE, text=True)
    client = None
    try:
        assert server.stdout.readline().strip() == "ready"
        client = subprocess.Popen(
            ["ip", "netns", "exec", a, sys.executable, "-c", f"""
import json, socket
c = socket.create_connection(('10.200.0.2', {port}))
c.sendall(b'D' * {size}); assert c.recv(2) == b'ok'
print(json.dumps({{"local": c.getsockname()[1]}}), flush=True)
c.close()
"""], stdout=subprocess.PIPE, text=True)
        crep = json.loads(client.stdout.readline())
        srep = json.loads(server.stdout.readline())
        assert client.wait(20) == 0 and server.wait(20) == 0
    finally:
        for p in (client, server):
            if p and p.poll() is None:
                p.kill()
                p.wait()
    assert srep["got"] == size
    out = _sh("nft", "list", "chain", "inet", "deeptrace_test", "input", ns=b).stdout
    dropped = int(re.search(r"counter packets (\d+)", out)[1])
    assert dropped >= 1

    cl = net.wait_for(lambda r: r.local_port == crep["local"] and r.remote_port == port)
    sv = net.wait_for(lambda r: r.local_port == port and r.remote_port == crep["local"])
    assert len(cl) == 1 and len(sv) == 1
    cl, sv = cl[0], sv[0]
    assert cl.pid == client.pid and sv.pid == server.pid   # `ip netns exec` execs python
    assert cl.local_addr == "10.200.0.1" and cl.remote_addr == "10.200.0.2"
    # Every dropped segment had to be sent again for all bytes to arrive; the kernel's own
    # count is in segments (a GSO packet nft dropped may be several), ours in skbs sent.
    assert cl.retransmits >= 1 and cl.total_retrans >= dropped
    assert sv.retransmits == sv.total_retrans == 0      # nothing from B was dropped
    # Retransmitted bytes are counted once: the data bytes stay exact.
    assert (cl.bytes_sent, sv.bytes_received) == (size, size)
    assert (cl.bytes_received, sv.bytes_sent) == (2, 2)
    pts = net.points()
    assert value(pts, "deeptrace.tcp.retransmits", process_pid=client.pid) == cl.retransmits
    assert value(pts, "deeptrace.tcp.retransmits", process_pid=server.pid) == 0


def test_kernel_fields_match_pahole():
    """Every tcp_sock/sock member the probe reads is where pahole (BTF) says it is."""
    from deeptrace_core import btf
    from deeptrace_plugins.network.probe import KERNEL_FIELDS, SOCK_DONE_BIT

    if not os.path.exists("/sys/kernel/btf/vmlinux") or not shutil.which("pahole"):
        if CI:
            pytest.fail("BTF and pahole are needed")
        pytest.skip("no BTF or pahole")
    offsets = btf.kernel_offsets(KERNEL_FIELDS)
    for field in KERNEL_FIELDS:
        struct_name, _, member = field.partition(".")
        text = subprocess.run(["pahole", "-C", struct_name, "/sys/kernel/btf/vmlinux"],
                              capture_output=True, text=True).stdout
        m = re.search(rf"\b{re.escape(member)};\s*/\*\s*(\d+)\s+(\d+)", text)
        assert m, f"pahole shows no {field}"
        assert (offsets[field].offset, offsets[field].size) == (int(m[1]), int(m[2])), field
    if shutil.which("bpftool"):
        dump = subprocess.run(["bpftool", "btf", "dump", "file", "/sys/kernel/btf/vmlinux"],
                              capture_output=True, text=True).stdout
        assert re.search(rf"'SOCK_DONE' val={SOCK_DONE_BIT}\b", dump)


def test_kprobe_fallback_compiles_and_passes_this_verifier():
    """Kernels before 6.3 count bytes per process with kprobes on inet(6)_sendmsg/recvmsg
    (IO_KPROBES). This kernel has the tracepoints and no kprobes, so the kernel job runs
    that path for real (Debian's 6.1); here its C is compiled and every kprobe program
    loaded, which runs this kernel's verifier on it (attaching needs kprobes)."""
    require_bpf()
    from bcc import BPF

    from deeptrace_core.bpf import kernel_defines
    from deeptrace_plugins.network.probe import IO_KPROBES, NetworkConfig, NetworkProbe

    probe = NetworkProbe(NetworkConfig())
    probe.io_source = "kprobes"
    text = probe.render(kernel_defines(probe.kernel_fields))
    assert "#define IO_KPROBES 1" in text and "#define SOCK_IO_TP 0" in text
    b = BPF(text=text.encode())
    try:
        names = {f for _, enter, ret in IO_KPROBES for f in (enter, ret)}
        assert names == {"io_send_enter", "io_send_exit", "io_recv_enter", "io_recv_exit"}
        for fn in sorted(names):
            assert b.load_func(fn.encode(), BPF.KPROBE).fd >= 0
    finally:
        b.cleanup()
