"""Hostile traffic (issue 13): the agent on the default config while attacks are played
over real sockets to real servers, beside ordinary traffic at 1,000 requests/s.

Servers: nginx, redis-server, memcached, PostgreSQL (tests/servers.py) and, from
tests/l7_peers.py, the gRPC service, the DNS server (127.0.0.53:53) and the MongoDB
stand-in. Ordinary traffic: HTTP/1 keep-alive GETs to nginx from a child process at a
fixed rate, each with a unique query `/ord/<run>?id=<id>`, so every request can be looked
up among the spans (server end: nginx; client end: the generator); the path is constant,
as an ordinary service's operations are (distinct paths are row 4's attack).

The agent runs `config/agent.yaml` as shipped, plus what the measurement needs:
`agent.stats_interval` 1 s (counters to read), the console captured from the agent's
stdout, the store in a temp dir, Prometheus on a free port, a `jsonl` exporter (spans
counted per request) and the shipped `otlp` exporter (OTLP/HTTP to a local sink that
keeps every request body) in both pipelines; the sink's process name in
`probes.trace.exclude_comms` (its traffic carries every exported span: tracing it would
feed the export back in), `probes.trace.ports` set to the servers' ports and no `tls`
probe (it has no filter), so other processes on a shared machine do not blur the
figures, and `agent.nice` 0 (at the default 10, other jobs on a busy machine starve the
agent: see bench_config). OTLP's queue (2,048) drops what
it cannot send in time, counted: its marker check covers what it sent.

Two runs, each with its own agent: ordinary only, then ordinary + the attacks one after
the other (one function per row of the issue's table that can be played over sockets).
Per run: agent RSS at idle (attached, settled, no traffic) and its peak (VmHWM reset at
idle, plus 0.25 s samples), agent CPU, records drained, lost events, ordinary requests
with a span at both ends, escape bytes on the console and in the log, and which secret
markers (each a unique `S3CRET-<row>-<hex>`) turn up in any exporter's output.

    python -m bench.hostile [--quick]      one hostile section alone (prints JSON rows)
"""

import contextlib
import json
import os
import re
import secrets
import socket
import sqlite3
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

import yaml

from .agent import LOSS_KEYS, REPO, Agent, Sampler, proc_status_kb

TESTS = os.path.join(REPO, "tests")
SINK_COMM = "dtb-otlp-sink"       # the OTLP sink's process name, excluded from tracing
ORDINARY_RATE = 1_000
TARGET_RSS_GROWTH_MB = 50.0
TARGET_CPU_RATIO = 3.0
PIPE = "pipeline.traces"          # config/agent.yaml's span pipeline
# Bytes a terminal acts on: C0 controls but \t and \n, DEL, and C1 controls (UTF-8 C2 80-9F).
_ESCAPE_BYTES = re.compile(rb"[\x00-\x08\x0b-\x1f\x7f]|\xc2[\x80-\x9f]")


# -- markers ------------------------------------------------------------------------------

class Markers:
    """Unique secret markers, each remembered with the table row and what carries it."""

    def __init__(self):
        self.used = {}

    def new(self, row, what, carrier=None) -> str:
        """`carrier`: text of the same request that is no secret (a path, a command), so
        the check can tell "redacted" from "never traced"."""
        m = f"S3CRET-{row}-{secrets.token_hex(6)}"
        self.used[m] = {"row": row, "what": what, "carrier": carrier}
        return m


# -- servers ------------------------------------------------------------------------------

def _tests_path():
    if TESTS not in sys.path:
        sys.path.insert(0, TESTS)


class Peer:
    """A tests/l7_peers.py server in its own process."""

    def __init__(self, kind):
        self.proc = subprocess.Popen([sys.executable, os.path.join(TESTS, "l7_peers.py"), kind],
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     text=True, cwd=TESTS)
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"l7_peers.py {kind} exited: {self.proc.wait()}")
        self.port = json.loads(line)["port"]

    def stop(self):
        self.proc.kill()
        self.proc.wait()


class Targets:
    """Every server the attacks and the ordinary traffic go to."""

    def __init__(self, mongo=True):
        _tests_path()
        import servers
        self._stop = []
        try:
            for name, make in (("nginx", servers.nginx), ("redis", servers.redis),
                               ("memcached", servers.memcached),
                               ("postgres", servers.postgres)):
                s = make()
                self._stop.append(s)
                setattr(self, name, s.port)
            self.dns = self.mongo = None
            for kind in ("grpc", "dns") + (("mongo",) if mongo else ()):
                try:
                    p = Peer(kind)
                except RuntimeError:
                    if kind == "grpc":
                        raise
                    continue   # DNS needs 127.0.0.53:53 free; its rows are then skipped
                self._stop.append(p)
                setattr(self, kind, p.port)
        except Exception:
            self.stop()
            raise
        self.dns_host = "127.0.0.53"

    @property
    def ports(self) -> list:
        """The servers' ports: the agent traces only these, so other processes on a
        shared machine do not blur the figures (DNS is recognised on port 53)."""
        return [p for p in (self.nginx, self.redis, self.memcached, self.postgres,
                            self.grpc, self.dns, self.mongo) if p]

    def stop(self):
        for s in reversed(self._stop):
            with contextlib.suppress(Exception):
                s.stop()
        self._stop = []


# -- the OTLP sink -----------------------------------------------------------------------

def sink_main(out_path):
    """OTLP/HTTP receiver: appends every request body (protobuf, uncompressed) to a file.
    Its name is set first, so its threads (named after it) are excluded from tracing."""
    import http.server
    with open("/proc/self/comm", "w") as f:
        f.write(SINK_COMM)
    lock = threading.Lock()
    out = open(out_path, "ab")

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            with lock:
                out.write(struct.pack("<I", len(body)) + body)
                out.flush()
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *a):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    print(json.dumps({"port": server.server_address[1]}), flush=True)
    server.serve_forever()


class Sink:
    def __init__(self):
        self.path = tempfile.mktemp(prefix="dtb-otlp-", suffix=".bin")
        open(self.path, "wb").close()
        self.proc = subprocess.Popen([sys.executable, "-m", "bench.hostile", "sink", self.path],
                                     stdout=subprocess.PIPE, text=True, cwd=REPO)
        self.port = json.loads(self.proc.stdout.readline())["port"]

    def take(self) -> bytes:
        """Everything received so far; the file starts again empty."""
        with open(self.path, "rb") as f:
            data = f.read()
        open(self.path, "wb").close()
        return data

    def stop(self):
        self.proc.kill()
        self.proc.wait()
        with contextlib.suppress(OSError):
            os.unlink(self.path)


# -- the agent ------------------------------------------------------------------------------

def bench_config(out_dir, sink_port, prom_port, ports=(), nice=0) -> str:
    """config/agent.yaml plus the bench's exporters (see the module docstring)."""
    with open(os.path.join(REPO, "config", "agent.yaml")) as f:
        cfg = yaml.safe_load(f)
    cfg["agent"]["stats_interval"] = "1s"
    # At the default nice 10 a loaded machine (other jobs on this shared VM) starves the
    # agent: it drained ~1,200 records/s at ~8% of a core while 4,000/s came in, and the
    # figures were the scheduler's. The bench measures the agent's own work.
    cfg["agent"]["nice"] = nice
    trace = cfg["probes"]["trace"]
    trace["exclude_comms"] = list(trace.get("exclude_comms", [])) + [SINK_COMM]
    if ports:
        trace["ports"] = sorted(set(ports))
    # The tls probe (OpenSSL/Go uprobes) has no process or port filter: on a shared
    # machine it records other jobs' TLS traffic (800,000 records in one 40 s run), and
    # no attack here uses TLS.
    if "tls" in cfg["probes"]:
        del cfg["probes"]["tls"]
        for pl in cfg["pipelines"].values():
            pl["probes"] = [p for p in pl["probes"] if p != "tls"]
    ex = cfg["exporters"]
    ex["console"]["stream"] = "stdout"
    ex["store"]["path"] = os.path.join(out_dir, "traces.db")
    ex["prometheus"]["address"] = f"127.0.0.1:{prom_port}"
    ex["otlp"] = {"protocol": "http/protobuf", "endpoint": f"http://127.0.0.1:{sink_port}"}
    ex["jsonl"] = {"path": os.path.join(out_dir, "spans.jsonl"), "append": False}
    for name, pl in cfg["pipelines"].items():
        pl["exporters"] = list(pl["exporters"]) + ["otlp"] + (["jsonl"] if name == "traces" else [])
    return json.dumps(cfg, indent=1)   # JSON is YAML


class HostileAgent(Agent):
    """The agent on bench_config(), its console (stdout) kept in a file."""

    def __init__(self, sink_port, ports=()):
        from deeptrace_core.testing import free_port
        self.prom_port = free_port()
        out_dir = tempfile.mkdtemp(prefix="dtb-hostile-out-")
        os.chmod(out_dir, 0o700)
        super().__init__(bench_config(out_dir, sink_port, self.prom_port, ports), "hostile",
                         stdout_path=os.path.join(out_dir, "console.out"))
        self.out_dir = out_dir
        self.jsonl_path = os.path.join(out_dir, "spans.jsonl")
        self.db_path = os.path.join(out_dir, "traces.db")

    @staticmethod
    def backlog(c: dict) -> int:
        """Records the trace probe submitted that the pipeline has not taken yet (its
        records_in also counts the tls probe's records, whose `events` are uprobe hits,
        not records: a floor, then)."""
        t = c.get("probe.trace", {})
        return t.get("events", 0) - t.get("decode_failed", 0) - c.get(PIPE, {}).get("records_in", 0)

    def caught_up_counters(self, slack=0, timeout=60.0) -> dict:
        """The first periodic counters after this call with at most `slack` records not
        yet drained (the agent may lag behind a burst; under steady traffic a report
        always finds some in the ring). `_caught_up` says whether that came in time."""
        deadline = time.monotonic() + timeout
        cur = {}
        while time.monotonic() < deadline:
            cur = self.fresh_counters(timeout=5.0)
            if cur is not None and cur.get(PIPE) and self.backlog(cur) <= slack:
                cur["_caught_up"] = True
                return cur
        cur = cur or self.counters()
        cur["_caught_up"] = False
        return cur

    def scrape(self) -> tuple:
        """(the Prometheus page, None) or (b"", the error): a busy agent may not answer."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.prom_port}/metrics",
                                        timeout=30) as r:
                return r.read(), None
        except OSError as exc:
            return b"", repr(exc)

    def bpf_map_rss_kb(self) -> int:
        """RSS of the BPF map mappings (the ring buffer, mapped twice, becomes resident
        as records pass through it: growth that is a fixed cost, not traffic's state)."""
        total, in_map = 0, False
        try:
            with open(f"/proc/{self.pid}/smaps") as f:
                for line in f:
                    if line[0] in "0123456789abcdef" and "-" in line.split(" ", 1)[0]:
                        in_map = "bpf" in line
                    elif in_map and line.startswith("Rss:"):
                        total += int(line.split()[1])
        except OSError:
            pass
        return total

    def reset_hwm(self):
        # "5" resets the peak RSS (VmHWM) to the current RSS (proc(5), clear_refs).
        with open(f"/proc/{self.pid}/clear_refs", "w") as f:
            f.write("5")

    def cleanup(self, keep=False):
        super().cleanup(keep)
        if not keep:
            import shutil
            shutil.rmtree(self.out_dir, ignore_errors=True)


def _records(c) -> int:
    """The trace probe's records drained (submitted, less undecodable, less backlog)."""
    t = c.get("probe.trace", {})
    return min(t.get("events", 0) - t.get("decode_failed", 0), c.get(PIPE, {}).get("records_in", 0))


def _lost(c) -> int:
    t = c.get("probe.trace", {})
    return sum(int(t.get(k, 0)) for k in LOSS_KEYS)


# -- ordinary traffic ---------------------------------------------------------------------

def ordinary_main(port, rate, run, threads=4):
    """HTTP/1 keep-alive GETs to nginx at `rate`/s (open loop: request i is due at
    start + i/rate) until a line arrives on stdin; prints {sent, answered, failed, late}."""
    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.readline(), stop.set()), daemon=True).start()
    t0 = time.monotonic() + 0.05
    results = [dict(sent=0, answered=0, failed=[], late=0, reconnects=0) for _ in range(threads)]

    def connect():
        s = socket.create_connection(("127.0.0.1", port))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.settimeout(10)
        return s

    def worker(k):
        res, s, buf = results[k], connect(), b""
        i = k
        while not stop.is_set():
            due = t0 + i / rate
            wait = due - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            elif wait < -0.001:
                res["late"] += 1
            req = (f"GET /ord/{run}?id={i} HTTP/1.1\r\nHost: bench\r\n"
                   f"User-Agent: dtb-ordinary\r\nX-Request-Id: ord-{run}-{i}\r\n\r\n").encode()
            res["sent"] += 1
            try:
                s.sendall(req)
                while True:
                    end = buf.find(b"\r\n\r\n")
                    if end >= 0:
                        head = buf[:end].decode("latin-1").lower()
                        m = re.search(r"content-length:\s*(\d+)", head)
                        total = end + 4 + (int(m.group(1)) if m else 0)
                        if len(buf) >= total:
                            break
                    chunk = s.recv(65536)
                    if not chunk:
                        raise ConnectionError("closed")
                    buf += chunk
                ok = head.startswith("http/1.1 200")
                buf = buf[total:]
                if ok:
                    res["answered"] += 1
                else:
                    res["failed"].append(i)
                if "connection: close" in head:
                    s.close()
                    s, buf = connect(), b""
                    res["reconnects"] += 1
            except OSError:
                res["failed"].append(i)
                s.close()
                s, buf = connect(), b""
                res["reconnects"] += 1
            i += threads
        s.close()

    ts = [threading.Thread(target=worker, args=(k,)) for k in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    elapsed = time.monotonic() - t0
    out = {k: sum(r[k] for r in results) for k in ("sent", "answered", "late", "reconnects")}
    out["failed"] = sorted(i for r in results for i in r["failed"])
    out["ids_sent"] = sorted(i for k, r in enumerate(results) for i in range(k, k + threads * r["sent"], threads))
    out.update(elapsed_s=elapsed, rate=out["answered"] / elapsed if elapsed > 0 else 0.0)
    print(json.dumps(out), flush=True)


class Ordinary:
    """The ordinary traffic generator, a child process, from start() to finish()."""

    def __init__(self, port, rate=ORDINARY_RATE):
        self.run = secrets.token_hex(4)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.hostile", "ordinary", str(port), str(rate), self.run],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO)

    def finish(self) -> dict:
        out, _ = self.proc.communicate("stop\n", timeout=60)
        if self.proc.returncode != 0:
            raise RuntimeError(f"ordinary traffic generator failed ({self.proc.returncode})")
        res = json.loads(out)
        res["run"] = self.run
        return res


# -- attacks ------------------------------------------------------------------------------
# Each takes (targets, markers, scale) and returns what it did. `scale` shrinks the sizes
# (the test and --quick); the full sizes are the issue's.

def _conn(port, host="127.0.0.1", nodelay=True):
    s = socket.create_connection((host, port), timeout=10)
    if nodelay:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def _drain_until(s, done, limit=1 << 24, timeout=10.0) -> bytes:
    """Read until done(data) or EOF/timeout; what was read."""
    s.settimeout(timeout)
    data = b""
    try:
        while not done(data) and len(data) < limit:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    except OSError:
        pass
    return data


def _send_chunks(s, parts, chunk=1000) -> int:
    """Send `parts` (bytes each) in writes of about `chunk` bytes, never splitting a part:
    each write is one record, captured whole (payload_bytes 1024; 8192 for HTTP/2)."""
    buf, sent = b"", 0
    for p in parts:
        if buf and len(buf) + len(p) > chunk:
            s.sendall(buf)
            sent += 1
            buf = b""
        buf += p
    if buf:
        s.sendall(buf)
        sent += 1
    return sent


def _h2_frame(ftype, flags, stream, payload=b"") -> bytes:
    return struct.pack("!I", len(payload))[1:] + bytes([ftype, flags]) + \
        struct.pack("!I", stream) + payload


H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
HEADERS, DATA, SETTINGS = 1, 0, 4
END_STREAM, END_HEADERS, ACK = 0x1, 0x4, 0x1


def _h2_request(port, headers, body=None) -> bytes:
    """One request on a fresh connection, raw frames (any bytes in any header); the
    server's answer (whatever it is)."""
    import hpack
    s = _conn(port)
    try:
        block = hpack.Encoder().encode(headers, huffman=False)
        out = H2_PREFACE + _h2_frame(SETTINGS, 0, 0)
        out += _h2_frame(HEADERS, END_HEADERS | (0 if body is not None else END_STREAM), 1, block)
        if body is not None:
            out += _h2_frame(DATA, END_STREAM, 1, body)
        s.sendall(out)
        return _drain_until(s, lambda d: b"grpc-status" in d or len(d) > 200, timeout=3)
    finally:
        s.close()


def _grpc_headers(path, authority="bench", extra=()):
    return [(":method", "POST"), (":scheme", "http"), (":path", path),
            (":authority", authority), ("content-type", "application/grpc"),
            ("te", "trailers"), *extra]


def attack_http2_hpack_bomb(t, m, scale=1.0):
    """Row 1: one connection opens 4,095 streams, each HEADERS frame naming one ~3.8 KB
    dynamic-table entry 16 times (~61 KB decoded per ~30 wire bytes), none ended."""
    import hpack
    n = max(64, int(4095 * scale))
    enc = hpack.Encoder()
    big = ("x-big", "b" * 3800)
    first = enc.encode(_grpc_headers("/helloworld.Greeter/SayHello", extra=[big]),
                       huffman=False)
    # Every later block references table entries only, so one encoding serves all.
    again = enc.encode(_grpc_headers("/helloworld.Greeter/SayHello") + [big] * 16,
                       huffman=False)
    frames = [H2_PREFACE + _h2_frame(SETTINGS, 0, 0), _h2_frame(HEADERS, END_HEADERS, 1, first)]
    frames += [_h2_frame(HEADERS, END_HEADERS, 2 * k + 1, again) for k in range(1, n)]
    s = _conn(t.grpc)
    writes, err = 0, None
    try:
        writes = _send_chunks(s, frames, chunk=8000)  # the HTTP/2 capture is 8192 bytes
    except OSError as exc:
        err = repr(exc)
    _drain_until(s, lambda d: False, timeout=1)
    s.close()
    return {"streams": n, "wire_bytes": sum(map(len, frames)), "writes": writes,
            "decoded_header_bytes": n * 16 * 3805, "send_error": err}


def attack_http1_one_byte(t, m, scale=1.0):
    """Row 2 (HTTP/1): an unfinished head to nginx, then one-byte writes (4 header lines
    of up to 6,000 bytes: nginx's limit is 8 KB a line), then the end of the head."""
    n = max(200, int(16_000 * scale))
    s = _conn(t.nginx)
    s.sendall(b"GET /one-byte HTTP/1.1\r\nHost: bench\r\nX-Pad0: ")
    line, writes = 0, 1
    for i in range(n):
        if i and i % 6000 == 0:
            line += 1
            s.sendall(f"\r\nX-Pad{line}: ".encode())
            writes += 1
        s.sendall(b"a")
        writes += 1
    s.sendall(b"\r\n\r\n")
    resp = _drain_until(s, lambda d: b"\r\n\r\n" in d and d.endswith(b"\n"), timeout=5)
    s.close()
    return {"one_byte_writes": n, "writes": writes + 1, "status": resp[:12].decode("latin-1")}


def attack_redis_one_byte(t, m, scale=1.0):
    """Row 2 (Redis): an unfinished SET whose value arrives one byte per write."""
    n = max(200, int(16_000 * scale))
    s = _conn(t.redis)
    s.sendall(b"*3\r\n$3\r\nSET\r\n$8\r\nonebytek\r\n$%d\r\n" % n)
    for _ in range(n):
        s.sendall(b"v")
    s.sendall(b"\r\n")
    resp = _drain_until(s, lambda d: d.endswith(b"\r\n"), timeout=5)
    s.close()
    return {"one_byte_writes": n, "reply": resp[:20].decode("latin-1")}


def _mc_bin(opcode, key: bytes, opaque) -> bytes:
    return struct.pack("!BBHBBHIIQ", 0x80, opcode, len(key), 0, 0, 0, len(key), opaque, 0) + key


def attack_memcached_pending(t, m, scale=1.0):
    """Row 3: memcached binary, 4,000 quiet GETs that miss (never answered: they stay
    pending), then 4,000 GETs (each answered), then a NOOP."""
    n = max(100, int(4000 * scale))
    GET, GETQ, NOOP = 0x00, 0x09, 0x0A
    reqs = [_mc_bin(GETQ, b"missq-%d" % i, i) for i in range(n)]
    reqs += [_mc_bin(GET, b"miss-%d" % i, n + i) for i in range(n)]
    reqs.append(_mc_bin(NOOP, b"", 2 * n))
    s = _conn(t.memcached)
    got = {}

    def reader():  # the answers flow while the requests go out
        got["data"] = _drain_until(s, lambda d: d[-24:][:2] == b"\x81\x0a", timeout=20)

    th = threading.Thread(target=reader)
    th.start()
    writes = _send_chunks(s, reqs)
    th.join(30)
    s.close()
    return {"quiet_misses": n, "answered_gets": n, "writes": writes,
            "response_bytes": len(got.get("data", b""))}


def attack_rest_paths(t, m, scale=1.0, rate=5_000):
    """Row 4: 20,000 distinct REST paths with ids to nginx, pipelined 10 a write on keep-
    alive connections, paced at `rate`/s (state growth is the point, not a flood: the
    highest lossless rate is the lossless section's)."""
    n = max(500, int(20_000 * scale))
    conns = -(-n // 900)   # nginx closes a connection after 1,000 requests
    socks = [_conn(t.nginx) for _ in range(conns)]
    readers = []
    counts = [0] * conns

    def reader(k, s, expect):
        tail, seen, mark = b"", 0, b"HTTP/1.1 "
        s.settimeout(20)
        try:
            while seen < expect:
                chunk = s.recv(65536)
                if not chunk:
                    break
                # The tail is shorter than the mark: no status line is counted twice.
                data = tail + chunk
                seen += data.count(mark)
                tail = data[-(len(mark) - 1):]
        except OSError:
            pass
        counts[k] = seen

    per = [len(range(k, n, conns)) for k in range(conns)]
    for k, s in enumerate(socks):
        th = threading.Thread(target=reader, args=(k, s, per[k]))
        th.start()
        readers.append(th)
    t0 = time.monotonic()
    batch = 10
    for start in range(0, n, batch):
        due = t0 + start / rate
        wait = due - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        groups = {}
        for i in range(start, min(n, start + batch)):
            groups.setdefault(i % conns, []).append(
                f"GET /api/v1/users/{100000 + i}/orders/{7 * i + 3} HTTP/1.1\r\n"
                f"Host: bench\r\n\r\n".encode())
        for k, reqs in groups.items():
            socks[k].sendall(b"".join(reqs))
    for th in readers:
        th.join(30)
    for s in socks:
        s.close()
    return {"paths": n, "answered": sum(counts), "seconds": time.monotonic() - t0}


ESCAPES = "\x1b]0;OWNED\x07\x1b[2J"


def attack_escapes(t, m, scale=1.0):
    """Row 5: terminal escapes and a forged log line in Redis keys, an HTTP/2 path (to
    the gRPC server), an HTTP/1 path and a DNS name."""
    s = _conn(t.redis)
    key = ESCAPES + "key\nFAKE LOG LINE"
    for cmd in (["SET", key, ESCAPES], ["GET", key], ["DEL", key]):
        parts = [c.encode() for c in cmd]
        s.sendall(b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p)
                                                     for p in parts))
        _drain_until(s, lambda d: d.endswith(b"\r\n"), timeout=5)
    s.close()
    _h2_request(t.grpc, _grpc_headers("/\x1b[2J\nFAKE LOG LINE\x1b]0;OWNED\x07"),
                body=b"\x00\x00\x00\x00\x00")
    s = _conn(t.nginx)
    s.sendall(b"GET /\x1b[2J\x1b]0;OWNED\x07 HTTP/1.1\r\nHost: b\x1bench\r\n\r\n")
    _drain_until(s, lambda d: b"\r\n\r\n" in d, timeout=3)
    s.close()
    if t.dns is None:
        return {"redis_commands": 3, "http2_requests": 1, "http1_requests": 1}
    import dns.message
    import dns.name
    q = dns.message.make_query(dns.name.Name([b"\x1b[2J\x07", b"example", b""]), "A")
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.settimeout(3)
    u.sendto(q.to_wire(), (t.dns_host, t.dns))
    with contextlib.suppress(OSError):
        u.recvfrom(4096)
    u.close()
    return {"redis_commands": 3, "http2_requests": 1, "http1_requests": 1, "dns_queries": 1}


def attack_secrets(t, m, scale=1.0):
    """Row 7: every secret form of the table, each carrying its own marker."""
    sent = []
    # HTTP/1 to nginx: query values, percent-encoded names, ;jsessionid=, userinfo in Host;
    # each request on a path of its own (its carrier).
    params = ["code", "refresh_token", "id_token", "client_secret", "X-Amz-Signature",
              "X-Amz-Credential", "X-Amz-Security-Token", "key", "api%5Fkey"]
    reqs = []
    for k, p in enumerate(params):
        c = f"/s7q{k}"
        reqs.append((c, f"{c}?state=ok&{p}={m.new(7, 'http1 query ' + p, c)}&x=1", "bench", ""))
    reqs.append(("/s7j", f"/s7j;jsessionid={m.new(7, 'http1 ;jsessionid=', '/s7j')}/page",
                 "bench", ""))
    reqs.append(("/s7h", "/s7h", f"user:{m.new(7, 'http1 Host userinfo', '/s7h')}@bench", ""))
    reqs.append(("/s7a", "/s7a", "bench",
                 f"Authorization: Bearer {m.new(7, 'http1 Authorization', '/s7a')}\r\n"))
    s = _conn(t.nginx)
    for _, path, host, extra in reqs:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n".encode())
        resp = _drain_until(s, lambda d: b"\r\n\r\n" in d, timeout=3)
        sent.append(path)
        if b"close" in resp.lower() or not resp:
            s.close()
            s = _conn(t.nginx)
    s.close()
    # HTTP/2 (gRPC server): a query value and userinfo in :authority.
    c = "SecretHello"
    _h2_request(t.grpc, _grpc_headers(
        f"/helloworld.Greeter/{c}?code={m.new(7, 'http2 query code', c)}",
        authority=f"user:{m.new(7, 'http2 :authority userinfo', c)}@bench"),
        body=b"\x00\x00\x00\x00\x00")
    # PostgreSQL: password forms (some are MySQL's: they error, the text was still sent).
    import psycopg
    statements = [   # (what, statement, carrier)
        ("PASSWORD E'...'", "ALTER ROLE dtb_x1 PASSWORD E'{}'", "dtb_x1"),
        ("PASSWORD $$...$$", "ALTER ROLE dtb_x2 PASSWORD $${}$$", "dtb_x2"),
        ("PASSWORD /* c */ '...'", "ALTER ROLE dtb_x3 PASSWORD /* c */ '{}'", "dtb_x3"),
        ("PASSWORD '...'", "ALTER ROLE dtb_x4 PASSWORD '{}'", "dtb_x4"),
        ("MASTER_PASSWORD", "CHANGE MASTER TO MASTER_HOST='h', MASTER_PASSWORD='{}'",
         "MASTER_HOST"),
        ("SOURCE_PASSWORD", "CHANGE REPLICATION SOURCE TO SOURCE_PASSWORD='{}'",
         "REPLICATION SOURCE"),
    ]
    with psycopg.connect(host="127.0.0.1", port=t.postgres, user="postgres",
                         dbname="postgres", autocommit=True) as conn:
        for what, sql, c in statements:
            try:
                conn.execute(sql.format(m.new(7, "postgresql " + what, c)).encode(),
                             prepare=False)
            except psycopg.Error:
                pass
    # Redis: SENTINEL SET ... auth-pass (an error on a plain server; the command was sent).
    s = _conn(t.redis)
    parts = [b"SENTINEL", b"SET", b"m", b"auth-pass",
             m.new(7, "redis SENTINEL auth-pass", "SENTINEL").encode()]
    s.sendall(b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts))
    _drain_until(s, lambda d: d.endswith(b"\r\n"), timeout=3)
    s.close()
    # A client whose command line carries a password (process.command_line).
    subprocess.run(["redis-cli", "-p", str(t.redis), "-a",
                    m.new(7, "redis-cli -a command line", "redis-cli"), "PING"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=10)
    return {"http1_requests": len(sent), "http2_requests": 1, "sql_statements": len(statements),
            "redis_commands": 1, "processes": 1}


def attack_dns_retransmit(t, m, scale=1.0):
    """Row 12: DNS queries sent twice with the same id (a retransmission), and some three
    times, each answered every time."""
    if t.dns is None:
        return {"skipped": "no DNS peer (127.0.0.53:53 taken)"}
    import dns.message
    n = max(20, int(500 * scale))
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.settimeout(2)
    answers = sent = 0
    for i in range(n):
        wire = dns.message.make_query(f"known.r{i}.example.", "A").to_wire()
        copies = 3 if i % 10 == 0 else 2
        for _ in range(copies):
            u.sendto(wire, (t.dns_host, t.dns))
            sent += 1
        for _ in range(copies):
            try:
                u.recvfrom(4096)
                answers += 1
            except OSError:
                break
    u.close()
    return {"queries": n, "datagrams": sent, "answers": answers}


def _pg_msg(kind: bytes, body: bytes) -> bytes:
    return kind + struct.pack("!I", len(body) + 4) + body


def attack_pg_parse_without_sync(t, m, scale=1.0):
    """Row 13: PostgreSQL extended protocol, 20,000 Parse messages without a Sync, then
    one Sync."""
    n = max(200, int(20_000 * scale))
    s = _conn(t.postgres)
    body = struct.pack("!I", 196608) + b"user\0postgres\0database\0postgres\0\0"
    s.sendall(struct.pack("!I", len(body) + 4) + body)
    _drain_until(s, lambda d: b"Z\x00\x00\x00\x05I" in d, timeout=10)
    got = {}

    def reader():
        got["data"] = _drain_until(s, lambda d: d.endswith(b"Z\x00\x00\x00\x05I"), timeout=30)

    th = threading.Thread(target=reader)
    th.start()
    parses = [_pg_msg(b"P", b"\0SELECT %d\0\0\0" % i) for i in range(n)]
    writes = _send_chunks(s, parses)
    s.sendall(_pg_msg(b"S", b""))
    th.join(40)
    s.close()
    data = got.get("data", b"")
    return {"parses": n, "writes": writes, "parse_complete": data.count(b"1\x00\x00\x00\x04")}


def _mongo_msg(request_id, opcode, body) -> bytes:
    return struct.pack("<iiii", 16 + len(body), request_id, 0, opcode) + body


def attack_mongo_nested_compressed(t, m, scale=1.0):
    """Row 14: OP_COMPRESSED (noop compressor) wrapping another OP_COMPRESSED, after a
    hello on the same connection (the kernel detects MongoDB on OP_MSG); and an HTTP/1
    Host header whose port has 4,300 digits (to nginx)."""
    if t.mongo is None:
        return {"skipped": "no MongoDB peer"}
    import bson
    n = max(5, int(50 * scale))
    hello = struct.pack("<I", 0) + b"\x00" + bson.encode({"hello": 1, "$db": "admin"})
    inner_msg = struct.pack("<I", 0) + b"\x00" + bson.encode({"ping": 1, "$db": "admin"})
    inner = struct.pack("<iiB", 2013, len(inner_msg), 0) + inner_msg
    outer = struct.pack("<iiB", 2012, len(inner) + 16, 0) + \
        struct.pack("<iiii", 16 + len(inner), 7, 0, 2012) + inner
    for i in range(n):
        s = _conn(t.mongo)
        s.sendall(_mongo_msg(2 * i + 1, 2013, hello))
        _drain_until(s, lambda d: len(d) >= 16 and len(d) >= struct.unpack_from("<i", d)[0],
                     timeout=3)
        with contextlib.suppress(OSError):
            s.sendall(_mongo_msg(2 * i + 2, 2012, outer))
            _drain_until(s, lambda d: False, timeout=0.2)  # the stand-in drops the connection
        s.close()
    s = _conn(t.nginx)
    s.sendall(b"GET /long-port HTTP/1.1\r\nHost: bench:" + b"9" * 4300 + b"\r\n\r\n")
    _drain_until(s, lambda d: b"\r\n\r\n" in d, timeout=3)
    s.close()
    return {"connections": n, "nested_compressed": n, "http1_long_port": 1}


# The table's rows that are played over sockets, in play order; the others are not
# traffic (6: config values, 8: the Prometheus endpoint, 9: file modes, 10: OTLP
# redirects, 11: the wall clock, 15: setup.sh, 16: config/signals).
ATTACKS = (("1 http2 hpack bomb / open streams", attack_http2_hpack_bomb),
           ("2 http1 one-byte writes", attack_http1_one_byte),
           ("2 redis one-byte writes", attack_redis_one_byte),
           ("3 memcached binary pending", attack_memcached_pending),
           ("4 distinct REST paths", attack_rest_paths),
           ("5 escapes in keys and paths", attack_escapes),
           ("7 secrets", attack_secrets),
           ("12 dns retransmissions", attack_dns_retransmit),
           ("13 postgresql parse without sync", attack_pg_parse_without_sync),
           ("14 mongodb nested OP_COMPRESSED, long Host port", attack_mongo_nested_compressed))
NOT_PLAYED = {"6": "config values (durations), not traffic",
              "8": "the Prometheus endpoint's own limits (tests/test_prometheus_exporter.py)",
              "9": "file modes of jsonl/store (tests)", "10": "OTLP redirects (tests)",
              "11": "wall-clock steps", "15": "scripts/setup.sh", "16": "config and signals"}


# -- checks on the outputs ----------------------------------------------------------------

def _store_text(path) -> bytes:
    if not os.path.exists(path):
        return b""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        rows = conn.execute("SELECT * FROM spans").fetchall()
    finally:
        conn.close()
    return "\n".join("\t".join("" if v is None else str(v) for v in r) for r in rows).encode(
        "utf-8", "surrogateescape")


def find_markers(outputs: dict, markers: Markers) -> dict:
    """{marker: [outputs it appears in]} for every marker found anywhere."""
    found = {}
    for mk in markers.used:
        b = mk.encode()
        where = [name for name, data in outputs.items() if b in data]
        if where:
            found[mk] = where
    return found


def escape_bytes(data: bytes) -> dict:
    hits = _ESCAPE_BYTES.findall(data)
    return {"count": len(hits), "kinds": sorted({h.hex() for h in hits})[:20]}


def ordinary_spans(jsonl_path, run) -> dict:
    """{id: {"server": n, "client": n}} of the spans answering `/ord/<run>?id=<id>` (200)."""
    import orjson
    path = f"/ord/{run}"
    out = {}
    if not os.path.exists(jsonl_path):
        return out
    with open(jsonl_path, "rb") as f:
        for line in f:
            if path.encode() not in line:
                continue
            try:
                d = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            attrs = d.get("attributes") or {}
            query = attrs.get("url.query", "")
            if attrs.get("url.path") != path or not query.startswith("id=") or \
                    str(d.get("status")) != "200":
                continue
            try:
                i = int(query[3:])
            except ValueError:
                continue
            ends = out.setdefault(i, {"server": 0, "client": 0})
            ends[d.get("role")] = ends.get(d.get("role"), 0) + 1
    return out


# -- one run ------------------------------------------------------------------------------

def run_once(targets, sink, hostile, seconds, scale, log=print, segment_timeout=15.0) -> dict:
    """One agent, ordinary traffic for at least `seconds`, and (hostile) every attack.
    After each attack the agent gets up to `segment_timeout` to drain it (its CPU and
    records per attack); 0: no wait (the test, which needs only the totals)."""
    settled = 100   # records in flight still counted as drained
    markers = Markers()
    sink.take()
    agent = HostileAgent(sink.port, targets.ports).start()
    res = {"hostile": hostile, "startup_s": agent.startup_s,
           "loadavg_start": list(os.getloadavg())}
    try:
        # Idle: attached, the start-up's records drained, no traffic of ours for 2 s.
        log(f"  hostile: agent up in {agent.startup_s:.1f} s, settling")
        agent.caught_up_counters(slack=settled)
        time.sleep(1.0)
        idle0 = agent.caught_up_counters(slack=settled)
        cpu_i0, t_i0 = agent.cpu_seconds(), time.monotonic()
        time.sleep(2.0)
        idle_cpu_rate = (agent.cpu_seconds() - cpu_i0) / (time.monotonic() - t_i0)
        rss_idle_kb, bpf_idle_kb = agent.rss_kb(), agent.bpf_map_rss_kb()
        agent.reset_hwm()
        c0 = agent.caught_up_counters(slack=settled)
        sampler = Sampler(agent.pid).start()
        stop_sampling = threading.Event()

        def sample():
            while not stop_sampling.wait(0.25):
                sampler.sample()

        th = threading.Thread(target=sample, daemon=True)
        th.start()
        cpu0, t0 = agent.cpu_seconds(), time.monotonic()
        ordinary = Ordinary(targets.nginx)
        segments = []
        if hostile:
            time.sleep(1.0)
            prev = {"t": time.monotonic(), "cpu": agent.cpu_seconds(), "c": agent.counters()}
            for name, fn in ATTACKS:
                ta = time.monotonic()
                try:
                    info = fn(targets, markers, scale)
                except Exception as exc:  # an attack that cannot be played is reported
                    info = {"error": repr(exc)}
                played_s = time.monotonic() - ta
                # Ordinary traffic goes on: up to ~1 s of it may still be in the ring. A
                # starved agent (a busy machine) may take longer: the window
                # then ends anyway and the next one carries the rest.
                cur_c = (agent.caught_up_counters(slack=4 * ORDINARY_RATE,
                                                  timeout=segment_timeout)
                         if segment_timeout else agent.counters())
                cur = {"t": time.monotonic(), "cpu": agent.cpu_seconds(), "c": cur_c}
                seg = {"attack": name, "info": info, "played_s": played_s,
                       "caught_up": cur_c.get("_caught_up"),
                       "wall_s": cur["t"] - prev["t"], "cpu_s": cur["cpu"] - prev["cpu"],
                       "records": _records(cur_c) - _records(prev["c"]),
                       "lost": _lost(cur_c) - _lost(prev["c"]),
                       "rss_kb": agent.rss_kb()}
                segments.append(seg)
                log(f"  hostile: {name}: {seg['records']} records, {seg['cpu_s']:.2f} s agent "
                    f"CPU in {seg['wall_s']:.1f} s, rss {seg['rss_kb'] / 1024:.0f} MB"
                    + (f", {info['error']}" if "error" in info else ""))
                prev = cur
        rest = seconds - (time.monotonic() - t0)
        if rest > 0:
            time.sleep(rest)
        gen = ordinary.finish()
        t_load = time.monotonic()
        log(f"  hostile: ordinary traffic done ({gen['answered']} answered), draining")
        # Drained, and the linker's wait (2 s) over for the last spans.
        agent.caught_up_counters(slack=settled)
        time.sleep(3.0)
        c1 = agent.caught_up_counters(slack=settled)
        cpu1, t1 = agent.cpu_seconds(), time.monotonic()
        stop_sampling.set()
        th.join()
        usage = sampler.stop()
        hwm_kb = proc_status_kb(agent.pid, "VmHWM")
        bpf_end_kb = agent.bpf_map_rss_kb()
        alive = agent.proc.poll() is None
        prom, scrape_error = agent.scrape() if alive else (b"", "agent not running")
        log("  hostile: stopping the agent")
        final = agent.stop()
        res.update(exit_code=agent.proc.returncode, alive_at_end=alive,
                   prometheus_scrape_error=scrape_error,
                   loadavg_end=list(os.getloadavg()))
        # What each exporter wrote; the store and OTLP are complete only after the exit.
        console = open(agent.stdout_path, "rb").read()
        log_text = open(agent.stderr_path, "rb").read()
        outputs = {"console": console, "jsonl": open(agent.jsonl_path, "rb").read()
                   if os.path.exists(agent.jsonl_path) else b"",
                   "store": _store_text(agent.db_path), "otlp": sink.take(),
                   "prometheus": prom, "log": log_text}
        found = find_markers(outputs, markers)
        # Each secret's request was traced and exported (its carrier is in the spans).
        carriers_missing = sorted({v["what"] for v in markers.used.values()
                                   if v["carrier"] and v["carrier"].encode() not in outputs["jsonl"]})
        spans_by_id = ordinary_spans(agent.jsonl_path, ordinary.run)
        answered = sorted(set(gen["ids_sent"]) - set(gen["failed"]))
        server_ok = sum(1 for i in answered if spans_by_id.get(i, {}).get("server") == 1)
        client_ok = sum(1 for i in answered if spans_by_id.get(i, {}).get("client") == 1)
        missing = [i for i in answered if spans_by_id.get(i, {}).get("server") != 1
                   or spans_by_id.get(i, {}).get("client") != 1]
        spans_stats = final.get("processor.spans", {})
        res.update(
            seconds_loaded=t_load - t0, seconds_measured=t1 - t0,
            idle_cpu_rate=idle_cpu_rate, rss_idle_kb=rss_idle_kb,
            bpf_map_rss_idle_kb=bpf_idle_kb, bpf_map_rss_end_kb=bpf_end_kb,
            rss_peak_kb=max(hwm_kb, usage["rss_max_kb"]), rss_end_kb=usage["rss_end_kb"],
            agent_cpu_s=cpu1 - cpu0, records=_records(c1) - _records(c0),
            records_idle=_records(c0) - _records(idle0),
            lost=_lost(c1) - _lost(c0), lost_total=_lost(final),
            lost_by_cause={k: final.get("probe.trace", {}).get(k, 0) for k in LOSS_KEYS
                           if final.get("probe.trace", {}).get(k)},
            ordinary=gen, ordinary_answered=len(answered), ordinary_server_spans=server_ok,
            ordinary_client_spans=client_ok, ordinary_missing=missing[:50],
            ordinary_missing_count=len(missing),
            escapes_console=escape_bytes(console), escapes_log=escape_bytes(log_text),
            output_bytes={k: len(v) for k, v in outputs.items()},
            markers=markers.used, markers_found=found, carriers_missing=carriers_missing,
            segments=segments,
            parser={k: v for k, v in spans_stats.items()
                    if not k.endswith((".spans", ".connections"))},
            exporters={k: v for k, v in final.items() if k.startswith("exporter.")},
            not_played=NOT_PLAYED if hostile else {})
    finally:
        if agent.proc.poll() is None:
            agent.stop()
        agent.cleanup()
    return res


def _exit_on_sigterm(*_):
    raise SystemExit(143)   # so the finally clauses stop the agent and the servers


def run(seconds=30, scale=1.0, log=print) -> dict:
    import signal
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
    targets = Targets()
    sink = Sink()
    try:
        base = run_once(targets, sink, False, seconds, scale, log)
        log(f"  hostile: ordinary only: {base['records']} records, {base['agent_cpu_s']:.1f} s "
            f"agent CPU, rss +{(base['rss_peak_kb'] - base['rss_idle_kb']) / 1024:.0f} MB")
        hostile = run_once(targets, sink, True, seconds, scale, log)
        log(f"  hostile: ordinary + hostile: {hostile['records']} records, "
            f"{hostile['agent_cpu_s']:.1f} s agent CPU, rss "
            f"+{(hostile['rss_peak_kb'] - hostile['rss_idle_kb']) / 1024:.0f} MB")
    finally:
        sink.stop()
        targets.stop()
    res = {"ordinary_rate": ORDINARY_RATE, "seconds": seconds, "scale": scale,
           "ordinary_only": base, "with_hostile": hostile}
    res["cpu"] = cpu_split(base, hostile)
    return res


def cpu_split(base, hostile) -> dict:
    """Agent CPU per ordinary record (ordinary-only run) and per hostile record (the
    hostile run, less its ordinary share at the ordinary run's cost per request), both
    net of the agent's idle CPU (metric probes, timers)."""
    def net(r):
        return r["agent_cpu_s"] - r["idle_cpu_rate"] * r["seconds_measured"]

    per_req_cpu = net(base) / max(1, base["ordinary_answered"])
    per_req_rec = base["records"] / max(1, base["ordinary_answered"])
    per_ord_record = net(base) / max(1, base["records"])
    ord_records_h = per_req_rec * hostile["ordinary_answered"]
    hostile_records = hostile["records"] - ord_records_h
    hostile_cpu = net(hostile) - per_req_cpu * hostile["ordinary_answered"]
    per_hostile = hostile_cpu / hostile_records if hostile_records > 0 else float("nan")
    out = {"per_ordinary_record_us": 1e6 * per_ord_record,
           "per_hostile_record_us": 1e6 * per_hostile,
           "ratio": per_hostile / per_ord_record if per_ord_record > 0 else float("nan"),
           "hostile_records": hostile_records, "hostile_cpu_s": hostile_cpu,
           "per_attack": []}
    # Per attack: its window's CPU less the ordinary traffic's share (rate x window).
    rate = base["ordinary_answered"] / max(1e-9, base["seconds_loaded"])
    for seg in hostile["segments"]:
        ord_req = rate * seg["wall_s"]
        recs = seg["records"] - per_req_rec * ord_req
        cpu = seg["cpu_s"] - hostile["idle_cpu_rate"] * seg["wall_s"] - per_req_cpu * ord_req
        out["per_attack"].append({
            "attack": seg["attack"], "records": recs, "cpu_s": cpu,
            "per_record_us": 1e6 * cpu / recs if recs > 0 else float("nan"),
            "ratio": (cpu / recs) / per_ord_record if recs > 0 and per_ord_record > 0
            else float("nan")})
    return out


# -- report rows --------------------------------------------------------------------------

def rows(res) -> list:
    g = (f"hostile traffic (default config + exporters; ordinary {res['ordinary_rate']:,}/s to "
         f"nginx): left column the ordinary-only run, right ordinary + attacks")
    b, h, cpu = res["ordinary_only"], res["with_hostile"], res["cpu"]
    out = []

    def growth(r):
        return (r["rss_peak_kb"] - r["rss_idle_kb"]) / 1024

    gb, gh = growth(b), growth(h)
    out.append({"group": g, "figure": "agent RSS growth above idle, peak (MB)",
                "baseline": f"{gb:.1f}", "traced": f"{gh:.1f}",
                "delta": f"idle {b['rss_idle_kb'] / 1024:.0f} / {h['rss_idle_kb'] / 1024:.0f} MB",
                "target": f"< {TARGET_RSS_GROWTH_MB:.0f}", "ok": gh < TARGET_RSS_GROWTH_MB,
                "note": (f"BPF maps (ring buffer) resident at idle already: "
                         f"{h['bpf_map_rss_idle_kb'] / 1024:.0f} MB, "
                         f"+{(h['bpf_map_rss_end_kb'] - h['bpf_map_rss_idle_kb']) / 1024:.0f} MB "
                         f"by the end"
                         + ("" if gh < TARGET_RSS_GROWTH_MB else
                            f"; over by {gh - TARGET_RSS_GROWTH_MB:.0f} MB"))})
    ok = cpu["ratio"] <= TARGET_CPU_RATIO
    out.append({"group": g, "figure": "agent CPU per record (us): ordinary / hostile",
                "baseline": f"{cpu['per_ordinary_record_us']:.1f}",
                "traced": f"{cpu['per_hostile_record_us']:.1f}",
                "delta": f"{cpu['ratio']:.2f}x", "target": f"<= {TARGET_CPU_RATIO:.0f}x",
                "ok": ok,
                "note": (f"{cpu['hostile_records']:.0f} hostile records, "
                         f"{cpu['hostile_cpu_s']:.1f} s CPU (the hostile run's, less its "
                         f"ordinary requests at the ordinary run's cost)"
                         + ("" if ok else f"; over by {cpu['ratio'] - TARGET_CPU_RATIO:.1f}x"))})
    for name, r in (("ordinary only", b), ("with hostile", h)):
        n = r["ordinary_answered"]
        ok = r["ordinary_missing_count"] == 0 and n > 0 and r["lost"] == 0
        out.append({"group": g, "figure": f"ordinary requests with both spans ({name})",
                    "baseline": "", "traced": f"{min(r['ordinary_server_spans'], r['ordinary_client_spans'])} / {n}",
                    "delta": f"{100 * (n - r['ordinary_missing_count']) / n:.2f}%" if n else "",
                    "target": "100%, 0 lost", "ok": ok,
                    "note": f"server {r['ordinary_server_spans']}, client "
                            f"{r['ordinary_client_spans']}, lost events {r['lost']}, "
                            f"{r['ordinary']['rate']:.0f} req/s achieved"
                            + ("" if ok else f"; {r['ordinary_missing_count']} without")})
    esc = h["escapes_console"]["count"] + b["escapes_console"]["count"]
    out.append({"group": g, "figure": "escape bytes on the console (log)",
                "baseline": f"{b['escapes_console']['count']} ({b['escapes_log']['count']})",
                "traced": f"{h['escapes_console']['count']} ({h['escapes_log']['count']})",
                "delta": "", "target": "0", "ok": esc == 0,
                "note": f"console {h['output_bytes']['console']:,} bytes"
                        + ("" if esc == 0 else f"; kinds {h['escapes_console']['kinds']}")})
    found = h["markers_found"]
    by_out = {}
    for mk, where in found.items():
        for w in where:
            by_out[w] = by_out.get(w, 0) + 1
    out.append({"group": g, "figure": "secret markers found in any output",
                "baseline": "", "traced": f"{len(found)} of {len(h['markers'])}",
                "delta": ", ".join(f"{k} {v}" for k, v in sorted(by_out.items())),
                "target": "0", "ok": not found,
                "note": "" if not found else "leaked: " + "; ".join(sorted(
                    {h["markers"][mk]["what"] for mk in found}))})
    alive = h["alive_at_end"] and h["exit_code"] == 0 and b["alive_at_end"]
    crashes = {k: v for k, v in h["parser"].items() if k.endswith("parser_crashes")}
    out.append({"group": g, "figure": "agent alive, exit code; parser crashes",
                "baseline": f"{b['exit_code']}", "traced": f"{h['exit_code']}",
                "delta": ", ".join(f"{k} {v}" for k, v in crashes.items()) or "0 crashes",
                "target": "alive, 0", "ok": alive and not crashes,
                "note": "bounds that bit: " + ", ".join(
                    f"{k} {v}" for k, v in sorted(h["parser"].items())
                    if not k.endswith("parser_crashes")) if h["parser"] else ""})
    out.append({"group": g, "figure": "agent behind the traffic: drain after it ended (s)",
                "baseline": f"{b['seconds_measured'] - b['seconds_loaded']:.1f}",
                "traced": f"{h['seconds_measured'] - h['seconds_loaded']:.1f}", "delta": "",
                "target": "", "ok": None,
                "note": f"load average {b['loadavg_start'][0]:.1f} / {h['loadavg_start'][0]:.1f} "
                        f"at the runs' start (the agent at nice 0 here)"})
    # Per attack (cpu["per_attack"], in the JSON): windows of ~1 s between stats reports,
    # less an estimate of the ordinary share, are too noisy for the table.
    return out


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "sink":
        return sink_main(argv[1])
    if argv and argv[0] == "ordinary":
        return ordinary_main(int(argv[1]), float(argv[2]), argv[3])
    quick = "--quick" in argv
    res = run(seconds=10 if quick else 30, scale=0.25 if quick else 1.0,
              log=lambda s: print(s, file=sys.stderr, flush=True))
    from . import report
    print(report.table(rows(res)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
