"""The testing kit for protocol plugins: feed bytes through a parser and look at what
comes out, record what a real client and server say to each other, and check that a
plugin's kernel detector (its ``detect.bpf.c``) answers as its Python ``detect`` does.

Without root a plugin's parser is tested on bytes (``feed``, ``pairs``, ``view``);
with root and BCC its detector is compiled into a small XDP program and run with
BPF_PROG_TEST_RUN (``Detector``), and ``DetectorSuite`` runs the same checks on every
protocol that hands it a ``DetectCases`` table through a ``detect_cases`` fixture::

    @pytest.fixture(scope="module")
    def detect_cases():
        return DetectCases(PingProtocol, positive=[(b"PING 1\\n", 1, 2, REQUEST)],
                           negative=[(b"PONG", 1, 2, 0)], ports=(7777,))

    class TestDetector(DetectorSuite):
        pass

BPF checks skip (with the reason) where BPF cannot load, except under CI=true, where
they fail: CI must run them.
"""

import ctypes
import importlib.resources
import os
import select
import socket
import struct
import subprocess
import threading
import time

import attrs

from .l7 import REQ, REQUEST, RESP, RESPONSE

# -- feeding a parser ------------------------------------------------------------------


def feed(parser, items, cap=None, tick=10, span=1) -> list:
    """Feed syscalls to `parser` in order; returns the messages it completed.

    items: (side, data) or (side, data, nbytes): nbytes moved of which `data` was
    captured, further cut to `cap` bytes as the probe cuts each syscall. The i-th syscall
    runs from i * tick to i * tick + span. Every stream must stay within its cap after
    each feed: a parser may never hold more than it was given room for."""
    out = []
    for i, item in enumerate(items):
        side, data = item[0], item[1]
        nbytes = item[2] if len(item) > 2 else len(data)
        out += parser.feed(side, data[:cap] if cap else data, nbytes, i * tick, i * tick + span)
        for stream in parser.streams.values():
            assert len(stream) <= max(stream.cap, nbytes), (len(stream), stream.cap)
    return out


def feed_split(parser, items, cuts, tick=10, span=1) -> list:
    """Like ``feed``, with each syscall's bytes cut at `cuts` (see ``split``) into
    syscalls of the same timing: a parser must give the same messages."""
    out = []
    for i, (side, data) in enumerate(items):
        for part in split(data, cuts):
            out += parser.feed(side, part, len(part), i * tick, i * tick + span)
    return out


def feed_each(parser, feeds):
    """Feed (side, data, bytes moved beyond data) syscalls (see ``syscalls``) one at a
    time, yielding the messages of each; every stream stays within its cap throughout."""
    for i, (side, data, extra) in enumerate(feeds):
        msgs = parser.feed(side, data, len(data) + extra, i, i)
        for stream in parser.streams.values():
            assert len(stream) <= max(stream.cap, len(data) + extra), (len(stream), stream.cap)
        yield msgs


def put(parser, side, data, ts_start=0, ts_end=0) -> list:
    """One syscall captured whole."""
    return parser.feed(side, data, len(data), ts_start, ts_end)


def pairs(msgs, complete=True) -> list:
    """(request, response or None) in request order, paired as the spans stage pairs
    them: by ``key`` when a message has one, else first in, first out; a request that
    expects no response gets None. A response without its request always fails; with
    `complete`, so does a request left without its response."""
    out, fifo, keyed = [], [], {}
    for m in msgs:
        if m.is_request:
            out.append([m, None])
            if m.expects_response and m.key is None:
                fifo.append(out[-1])
            elif m.expects_response:
                keyed[m.key] = out[-1]
            continue
        if m.key is not None:
            assert m.key in keyed, f"a response without its request: {m}"
            keyed.pop(m.key)[1] = m
        else:
            assert fifo, f"a response without a request: {m}"
            fifo.pop(0)[1] = m
    if complete:
        left = [q.operation for q, _ in fifo + list(keyed.values())]
        assert not left, f"requests left without a response: {left}"
    return [tuple(x) for x in out]


def outcomes(msgs) -> list:
    """(operation, status, error) of each request, in request order."""
    return [(q.operation, r.status if r else None, r.error if r else False)
            for q, r in pairs(msgs)]


VIEW = ("is_request", "key", "operation", "status", "error", "expects_response", "size",
        "protocol", "attributes")


def view(msgs, fields=VIEW) -> list:
    """What two parses of the same bytes must agree on, one tuple per message
    (attributes as sorted items); add "ts_start", "ts_end" where timing must match too."""
    def one(m):
        return tuple(sorted(m.attributes.items()) if f == "attributes" else getattr(m, f)
                     for f in fields)
    return [one(m) for m in msgs]


def side_bytes(items, side) -> bytes:
    return b"".join(item[1] for item in items if item[0] == side)


def coalesce(items) -> list:
    """Every request byte in one syscall, then every response byte in another."""
    return [(REQ, side_bytes(items, REQ)), (RESP, side_bytes(items, RESP))]


def split(data, cuts) -> list:
    """`data` cut at the points `cuts` (taken modulo its length + 1); no empty pieces."""
    pts = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0] + pts, pts + [len(data)]) if b > a]


def resplit(items, rnd, most=7) -> list:
    """The same syscalls' bytes cut again into pieces of 1 to `most` bytes."""
    out = []
    for side, data in items:
        i = 0
        while i < len(data):
            k = rnd.randint(1, most)
            out.append((side, data[i:i + k]))
            i += k
    return out


# -- hypothesis strategies -------------------------------------------------------------


def mutants(data):
    """`data` with one of its first 40 bytes changed, then cut to 1..64 bytes."""
    from hypothesis import strategies as st
    return st.tuples(st.integers(0, min(len(data), 40) - 1), st.integers(0, 255),
                     st.integers(1, 64)).map(
        lambda t: (data[:t[0]] + bytes([t[1]]) + data[t[0] + 1:])[:t[2]])


def prefixes(samples):
    """Any prefix of one of `samples`."""
    from hypothesis import strategies as st
    return st.sampled_from(samples).flatmap(
        lambda d: st.integers(0, len(d)).map(lambda i: d[:i]))


def suffixes(samples):
    """Any suffix of one of `samples`: a stream joined in the middle."""
    from hypothesis import strategies as st
    return st.sampled_from(samples).flatmap(
        lambda d: st.integers(0, len(d)).map(lambda i: d[i:]))


def syscalls(payloads, extra=3000, max_size=20):
    """Lists of (side, data, bytes moved beyond data): syscalls a parser must survive."""
    from hypothesis import strategies as st
    return st.lists(st.tuples(st.sampled_from([REQ, RESP]), payloads, st.integers(0, extra)),
                    max_size=max_size)


# -- real peers ------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def recv_exact(sock, n) -> bytes:
    """n bytes from `sock`; EOFError when the peer closes first."""
    data = b""
    while len(data) < n:
        more = sock.recv(n - len(data))
        if not more:
            raise EOFError
        data += more
    return data


def messages(sock, head_size, body_size):
    """(head, body) of each length-prefixed message `sock` receives, until the peer
    closes (as a stand-in server reads requests): `head_size` bytes, then
    `body_size(head)` bytes."""
    while True:
        try:
            head = recv_exact(sock, head_size)
            body = recv_exact(sock, body_size(head))
        except EOFError:
            return
        yield head, body


def wait_port(port, proc, timeout=30.0, what="server"):
    """Until something listens on 127.0.0.1:port; RuntimeError if `proc` exits first or
    the timeout passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on {port} within {timeout}s")


def stop_process(proc, timeout=10.0):
    """SIGTERM `proc` if it still runs and wait for it to exit; SIGKILL once `timeout`
    seconds have passed."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Server:
    """A server process listening on 127.0.0.1:port, stopped on exit of the with block."""

    def __init__(self, argv, port, timeout=30.0, what=None, **popen):
        self.port = port
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, **popen)
        try:
            wait_port(port, self.proc, timeout, what or argv[0])
        except RuntimeError:
            self.stop()
            raise

    @property
    def pid(self):
        return self.proc.pid

    def stop(self):
        stop_process(self.proc)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


class Recorder:
    """A TCP proxy in front of a server that records what each side sent, one item per
    recv(), as the probe records one payload per syscall: ``conns[i]`` holds connection
    i's (side, bytes) in time order, ``take()`` everything since the last take.

    target: a port on 127.0.0.1, or (host, port)."""

    def __init__(self, target, bufsize=65536):
        self.target = ("127.0.0.1", target) if isinstance(target, int) else tuple(target)
        self.bufsize = bufsize
        self.conns = []
        self._new = []
        self._lock = threading.Lock()
        self._threads = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.target)
            log = []
            self.conns.append(log)
            t = threading.Thread(target=self._pump, args=(client, server, log), daemon=True)
            t.start()
            self._threads.append(t)

    def _pump(self, client, server, log):
        # One thread per connection: what it records is in the order it was relayed.
        peer = {client: (server, REQ), server: (client, RESP)}
        with client, server:
            while True:
                for sock in select.select([client, server], [], [], 5)[0]:
                    try:
                        data = sock.recv(self.bufsize)
                    except OSError:
                        data = b""
                    if not data:
                        return
                    dst, side = peer[sock]
                    with self._lock:    # recorded before the peer can see it
                        log.append((side, data))
                        self._new.append((side, data))
                    dst.sendall(data)

    def take(self, settle=0.1) -> list:
        """What every connection said since the last take, once `settle` seconds have
        let the last bytes through."""
        time.sleep(settle)
        with self._lock:
            out, self._new = self._new, []
        return out

    def close(self):
        """Stop accepting, and wait for open connections to end."""
        self._listener.close()
        for t in self._threads:
            t.join(5)


# -- the kernel detector ---------------------------------------------------------------

HEADER = struct.Struct("<HHBxH")  # lport, rport, l4, pad, payload length: 8 bytes
SCRATCH = 64                       # payload bytes the harness hands the detector

_WRAPPER = r"""
BPF_PERCPU_ARRAY(detect_scratch, struct { u8 b[%(scratch)d]; }, 1);

int run_detect(struct xdp_md *ctx) {
    void *data = (void *)(long)ctx->data;
    void *end = (void *)(long)ctx->data_end;
    if (data + 8 > end)
        return 0;
    u16 lport = *(u16 *)data, rport = *(u16 *)(data + 2);
    u8 l4 = *(u8 *)(data + 4);
    u32 len = *(u16 *)(data + 6);
    u32 zero = 0;
    u8 *buf = (u8 *)detect_scratch.lookup(&zero);
    if (!buf)
        return 0;
    // The packet is padded to 8 + SCRATCH bytes, so this read stays inside it.
    if (bpf_probe_read_kernel(buf, %(scratch)d, (void *)((u64)data + 8)))
        return 0;
    u32 n = len < %(scratch)d ? len : %(scratch)d;
    return %(fn)s(buf, n, lport, rport, l4);
}
"""


class _TestRunAttr(ctypes.Structure):  # union bpf_attr, BPF_PROG_TEST_RUN part
    _fields_ = [("prog_fd", ctypes.c_uint32), ("retval", ctypes.c_uint32),
                ("data_size_in", ctypes.c_uint32), ("data_size_out", ctypes.c_uint32),
                ("data_in", ctypes.c_uint64), ("data_out", ctypes.c_uint64),
                ("repeat", ctypes.c_uint32), ("duration", ctypes.c_uint32),
                ("ctx_size_in", ctypes.c_uint32), ("ctx_size_out", ctypes.c_uint32),
                ("ctx_in", ctypes.c_uint64), ("ctx_out", ctypes.c_uint64),
                ("flags", ctypes.c_uint32), ("cpu", ctypes.c_uint32),
                ("batch_size", ctypes.c_uint32), ("pad", ctypes.c_uint32)]


_SYS_BPF, _BPF_PROG_TEST_RUN = 321, 10   # x86-64


def bpf_unavailable_reason():
    if os.geteuid() != 0:
        return "not running as root"
    if not os.path.exists("/sys/kernel/btf/vmlinux"):
        return "no /sys/kernel/btf/vmlinux"
    if not os.path.isdir("/sys/kernel/tracing/events"):
        return "tracefs not mounted at /sys/kernel/tracing (run scripts/setup.sh)"
    try:
        import bcc  # noqa: F401
    except Exception as exc:
        return f"cannot import bcc: {exc} (run scripts/setup.sh)"
    return None


def require_bpf():
    """Skip the calling test where BPF cannot load; under CI=true fail instead."""
    import pytest
    reason = bpf_unavailable_reason()
    if reason:
        if os.environ.get("CI") == "true":
            pytest.fail(f"BPF tests cannot run under CI: {reason}")
        pytest.skip(f"BPF cannot load here: {reason}")


class Detector:
    """A compiled detector: ``Detector(name, c_source)(data, lport, rport, l4) -> 0/1/2``
    with l4 1 for TCP, 2 for UDP. Compiling checks the C builds and passes the verifier."""

    def __init__(self, name: str, c_source: str):
        from bcc import BPF
        text = c_source + _WRAPPER % {"scratch": SCRATCH, "fn": f"detect_{name}"}
        self.bpf = BPF(text=text.encode())
        self.fn = self.bpf.load_func(b"run_detect", BPF.XDP)
        self._libc = ctypes.CDLL(None, use_errno=True)

    def __call__(self, data: bytes, lport: int = 0, rport: int = 0, l4: int = 1) -> int:
        pkt = HEADER.pack(lport, rport, l4, len(data)) + data
        pkt += bytes(max(0, 8 + SCRATCH - len(pkt)))
        buf = ctypes.create_string_buffer(pkt, len(pkt))
        out = ctypes.create_string_buffer(len(pkt) + 256)
        attr = _TestRunAttr(prog_fd=self.fn.fd, data_in=ctypes.addressof(buf),
                            data_size_in=len(pkt), data_out=ctypes.addressof(out),
                            data_size_out=len(out), repeat=1)
        if self._libc.syscall(_SYS_BPF, _BPF_PROG_TEST_RUN, ctypes.byref(attr),
                              ctypes.sizeof(attr)):
            raise OSError(ctypes.get_errno(), "BPF_PROG_TEST_RUN")
        return attr.retval

    def close(self):
        self.bpf.cleanup()


_compiled = {}


def kernel_detector(protocol_cls) -> Detector:
    """The protocol's detect.bpf.c compiled and loaded, once per process (a compile
    costs seconds); skips the test where BPF cannot load."""
    require_bpf()
    key = (protocol_cls.name, protocol_cls.detect_c)
    if key not in _compiled:
        pkg, name = protocol_cls.detect_c
        src = importlib.resources.files(pkg).joinpath(name).read_text()
        _compiled[key] = Detector(protocol_cls.name, src)
    return _compiled[key]


L4 = {"tcp": 1, "udp": 2}


def assert_kernel_matches(detector, detect, inputs):
    """inputs: (data, lport, rport, l4 as "tcp"/"udp" or 1/2); for each, the kernel
    detector gives what the Python mirror gives on the bytes the kernel sees."""
    for data, lport, rport, l4 in inputs:
        name = l4 if isinstance(l4, str) else {1: "tcp", 2: "udp"}[l4]
        data = data[:SCRATCH]
        want = detect(data, lport, rport, name)
        assert detector(data, lport, rport, L4[name]) == want, (data, lport, rport, name, want)


@attrs.define
class DetectCases:
    """What a protocol's detector must say.

    positive: rows (data, lport, rport, REQUEST or RESPONSE[, "udp"]); l4 is "tcp"
    unless given. negative: rows (data, lport, rport, 0[, "udp"]). ports: the
    protocol's well-known ports, drawn with others for random inputs. inputs: an extra
    hypothesis strategy of payloads shaped like the protocol, for the random test."""

    protocol: type
    positive: list
    negative: list
    ports: tuple = ()
    inputs: object = None

    def rows(self):
        """(data, lport, rport, l4, want) of every row."""
        for c in self.positive + self.negative:
            yield c[0], c[1], c[2], (c[4] if len(c) > 4 else "tcp"), c[3]

    def samples(self):
        return [c[0] for c in self.positive]


class DetectorSuite:
    """The checks every protocol detector passes; a test module subclasses it and
    provides a ``detect_cases`` fixture (a DetectCases, or one per parameter)."""

    def test_table_python(self, detect_cases):
        detect = detect_cases.protocol.detect
        assert detect_cases.positive and detect_cases.negative
        assert {c[3] for c in detect_cases.positive} <= {REQUEST, RESPONSE}
        assert {c[3] for c in detect_cases.negative} == {0}
        for data, lport, rport, l4, want in detect_cases.rows():
            assert detect(data, lport, rport, l4) == want, (data, lport, rport, l4)

    def test_table_kernel(self, detect_cases):
        """On the bytes the kernel sees, both say what the table says."""
        kernel = kernel_detector(detect_cases.protocol)
        detect = detect_cases.protocol.detect
        for data, lport, rport, l4, want in detect_cases.rows():
            data = data[:SCRATCH]
            assert detect(data, lport, rport, l4) == want, (data, lport, rport, l4)
            assert kernel(data, lport, rport, L4[l4]) == want, (data, lport, rport, l4)
        # and each row over the other transport, where the table says nothing
        assert_kernel_matches(kernel, detect, [
            (data, lport, rport, "udp" if l4 == "tcp" else "tcp")
            for data, lport, rport, l4, _ in detect_cases.rows()])

    def test_prefixes_kernel(self, detect_cases):
        """Every cut of every positive row, over TCP and UDP: the kernel's n-checks."""
        kernel = kernel_detector(detect_cases.protocol)
        assert_kernel_matches(kernel, detect_cases.protocol.detect, [
            (data[:n], lport, rport, l4) for data, lport, rport, *_ in detect_cases.positive
            for n in range(min(len(data), SCRATCH) + 1) for l4 in ("tcp", "udp")])

    def test_python_never_raises(self, detect_cases):
        from hypothesis import given, settings
        from hypothesis import strategies as st

        @settings(max_examples=300, deadline=None)
        @given(st.one_of(st.binary(max_size=80), prefixes(detect_cases.samples())),
               st.sampled_from(["tcp", "udp"]))
        def check(data, l4):
            assert detect_cases.protocol.detect(data, 1, 2, l4) in (0, REQUEST, RESPONSE)
        check()

    def test_random_kernel(self, detect_cases):
        """Random inputs near the protocol's shapes: the kernel matches Python."""
        from hypothesis import given, settings
        from hypothesis import strategies as st
        kernel = kernel_detector(detect_cases.protocol)
        payloads = [st.binary(max_size=SCRATCH),
                    st.sampled_from(detect_cases.samples()).flatmap(mutants)]
        if detect_cases.inputs is not None:
            payloads.append(detect_cases.inputs)
        ports = st.sampled_from([*detect_cases.ports, 5555, 80])

        # One input per example: hypothesis's first example is the simplest one, so a
        # single example of many inputs would check little more than b"".
        @settings(max_examples=300, deadline=None)
        @given(st.one_of(payloads), ports, ports, st.sampled_from(["tcp", "udp"]))
        def check(data, lport, rport, l4):
            assert_kernel_matches(kernel, detect_cases.protocol.detect,
                                  [(data, lport, rport, l4)])
        check()

    def test_protocol_contract(self, detect_cases):
        cls = detect_cases.protocol
        proto = cls(cls.config_class())
        p = proto.parser()
        assert p is not proto.parser() and p.protocol == cls.name
        assert p.feed(REQ, b"", 0, 0, 0) == []
        pkg, name = cls.detect_c
        assert f"detect_{cls.name}(" in importlib.resources.files(pkg).joinpath(name).read_text()
