"""A small microservice topology in network namespaces, for end-to-end tracing tests and
the accuracy benchmark.

Each "host" is its own network namespace with its own address on a bridge that lives in
a dedicated namespace; nothing is attached to the root namespace, so all traffic stays
inside the namespaces this module creates (and deletes)::

    <p>-net     bridge br0 and the host ends of the veth pairs
    <p>-client  10.77.0.10   load client (N threads, one keep-alive connection each)
    <p>-a       10.77.0.11   service A: GET /a/<id> -> B GET /b/<id>
    <p>-b       10.77.0.12   service B: GET /b/<id> -> Redis GET+SET dt:<id>, PostgreSQL SELECT
    <p>-db      10.77.0.13   redis-server, PostgreSQL (a private cluster)

``<p>`` is ``<prefix><owner pid>`` (``dt-12345``), so parallel runs never collide; at
start-up, namespaces, processes and work directories of the same prefix whose owner pid
is gone (a crashed run) are deleted. Ports are chosen at random per run, so an agent
filtering on them sees only its own run's traffic.

Services (each a separate process started with ``ip netns exec``, named with prctl so
their ``comm`` says what they are: dt-svc-a, dt-svc-a-aio, dt-svc-b, dt-load):

* B: thread-per-request (ThreadingHTTPServer, HTTP/1.1 keep-alive). A pool of
  (Redis, PostgreSQL) connection pairs opened at start-up is shared by its threads.
* A: thread-per-request; each thread keeps one keep-alive connection to B.
* A (``front="node-seq|node-all|node-pool|node-timer"``): a Node.js ``http`` server
  (``bench/node_a.js``) that calls B twice per request, GET /b/<id> and GET /c/<id> (B
  answers /c at once), over a keep-alive ``http.Agent``: sequential awaits, Promise.all,
  Promise.all through a full pool (``maxSockets`` = ``a_pool``), a setTimeout before
  Promise.all, or Promise.all without keep-alive (node-fresh: every call connects).
* A (``front="go|go-fanout"``): a Go ``net/http`` server (``bench/go_a.go``, built with
  Debian's ``/usr/bin/go`` at run time) that calls B twice per request with one
  keep-alive ``http.Client``, GET /b/<id> then GET /c/<id> from the handler's goroutine,
  or (go-fanout) both at once from two goroutines joined by a ``sync.WaitGroup``.
* A (``front="asyncio"``, or ``asyncio_a=True``): one asyncio event loop, minimal
  HTTP/1.1 over streams with keep-alive, calling B twice per request (GET /b/<id>, GET
  /c/<id>) with ``asyncio.gather``; ``asyncio-seq``: the same with two sequential awaits;
  ``asyncio-aiohttp``: an aiohttp server calling B with an aiohttp ClientSession and
  gather; ``asyncio-uvloop``: the streams + gather front on uvloop's loop (libuv's
  epoll and reads, the C ``_asyncio`` Tasks). Calls to B go over a small pool
  (``a_pool``) of keep-alive connections shared by all requests, opened on demand. ``python=PATH`` runs A under another interpreter
  (e.g. pyenv's 3.12). (Connections whose server side sits in a blocking read are opened after the
  agent starts: a read that entered before the probe attached is never seen, so the
  first request on such a connection would be missing on the server side.)
* the load client: threads each with its own keep-alive connection, unique request ids,
  optionally a W3C traceparent header per request; bounded in count and time.

Ground truth comes only from the services' own logs (JSON lines, one per request: the
id from the URL, the thread, and each outgoing call with the addresses of the socket it
used), never from anything an agent reads.

    python -m bench.topology up [--asyncio]     build it, print where things are, wait for Ctrl-C
    python -m bench.topology serve-a|serve-a-async|serve-b|load ...   (used internally)
"""

import argparse
import asyncio
import ctypes
import glob
import http.client
import json
import os
import pwd
import queue
import random
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUBNET = "10.77.0"
HOSTS = {"client": 10, "a": 11, "b": 12, "db": 13}
ROLES = ("net", "client", "a", "b", "db")
COMMS = {"a": "dt-svc-a", "a-aio": "dt-svc-a-aio", "a-node": "dt-svc-a-node",
         "a-go": "dt-svc-a-go",
         "b": "dt-svc-b", "load": "dt-load"}
FRONTS = ("threads", "asyncio", "asyncio-seq", "asyncio-aiohttp", "asyncio-uvloop",
          "node-seq", "node-all",
          "node-pool", "node-timer", "node-fresh", "go", "go-fanout")
NODE_JS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "node_a.js")
GO_A = os.path.join(os.path.dirname(os.path.abspath(__file__)), "go_a.go")
GO = "/usr/bin/go"
# Go's build cache, kept between runs (a rebuild of go_a.go then takes ~1 s).
GO_CACHE = os.path.join(tempfile.gettempdir(), "deeptrace-gocache")
# Request ids: q<6 hex: run tag>n<6 digits> (load) or ...t<6 digits> (trickle after it).
ID_RE = re.compile(r"(q[0-9a-f]{6}[nt]\d{6})")
_instances = 0


# -- helpers ----------------------------------------------------------------------------
def set_comm(name: str):
    """Name this process (and the threads it starts later) for the kernel: comm."""
    try:
        ctypes.CDLL(None).prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME
    except Exception:
        pass


def die_with_parent():
    """preexec_fn: SIGTERM this child when the process that started it dies (a crashed
    bench must not leave servers or an attached agent behind)."""
    try:
        ctypes.CDLL(None).prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def _run(*argv, check=True):
    p = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if check and p.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({p.returncode}): {p.stderr.strip()}")
    return p.stdout


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def _hostport(text: str):
    host, _, port = text.rpartition(":")
    return host, int(port)


def _addr(sockname) -> str:
    return f"{sockname[0]}:{sockname[1]}"


def _pg_bin(tool):
    base = "/usr/lib/postgresql"
    version = sorted(os.listdir(base), key=lambda v: [int(x) for x in v.split(".")])[-1]
    return os.path.join(base, version, "bin", tool)


def netns_list() -> list:
    out = _run("ip", "netns", "list", check=False)
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _ns_pids(name) -> list:
    out = _run("ip", "netns", "pids", name, check=False)
    return [int(x) for x in out.split() if x.isdigit()]


def _kill_ns(name):
    """SIGKILL what still runs in a namespace of ours, then delete the namespace."""
    for _ in range(3):
        pids = _ns_pids(name)
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)
    _run("ip", "netns", "del", name, check=False)


def cleanup_leftovers(prefix="dt-") -> list:
    """Delete namespaces (and what runs in them) and work directories of earlier runs
    with this prefix whose owner process is gone. Returns the namespaces deleted."""
    rx = re.compile(rf"^{re.escape(prefix)}(\d+)(?:_\d+)?-({'|'.join(ROLES)})$")
    gone = []
    names = netns_list()
    # Processes first (servers in the host namespaces), the bridge namespace last.
    for name in sorted(names, key=lambda n: n.endswith("-net")):
        m = rx.match(name)
        if m and not _alive(int(m.group(1))):
            _kill_ns(name)
            gone.append(name)
    wrx = re.compile(rf"^{re.escape(prefix)}topo-(\d+)-")
    for d in glob.glob(os.path.join(tempfile.gettempdir(), f"{prefix}topo-*")):
        m = wrx.match(os.path.basename(d))
        if m and not _alive(int(m.group(1))) and not os.path.exists(os.path.join(d, "KEEP")):
            shutil.rmtree(d, ignore_errors=True)
    return gone


def build_go(src: str, out_dir: str, name: str = COMMS["a-go"], *flags) -> str:
    """Build one Go file with the standard library only (no modules, no network); the
    executable is named `name`, which is then its processes' comm; `flags` go to `go
    build` (e.g. -ldflags=-w)."""
    out = os.path.join(out_dir, name)
    env = {**os.environ, "GO111MODULE": "off", "GOCACHE": GO_CACHE, "CGO_ENABLED": "0",
           "GOPATH": os.path.join(out_dir, "gopath"), "GOFLAGS": ""}
    p = subprocess.run([GO, "build", *flags, "-o", out, src], env=env, cwd=out_dir,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"go build {src} failed: {p.stdout[-2000:]}")
    return out


# -- the topology -----------------------------------------------------------------------
class Topology:
    """Build with ``up()`` (or ``with Topology() as t``), tear down with ``down()``."""

    def __init__(self, prefix="dt-", asyncio_a=False, pool=16, a_pool=4, keep=False,
                 base_port=None, front=None, python=None, node=None):
        global _instances
        _instances += 1
        self.prefix = prefix
        self.owner = os.getpid()
        tag = f"{prefix}{self.owner}" + (f"_{_instances}" if _instances > 1 else "")
        self.ns = {r: f"{tag}-{r}" for r in ROLES}
        self.addr = {h: f"{SUBNET}.{n}" for h, n in HOSTS.items()}
        # Below the ephemeral range (32768-), so no other socket on the machine has them.
        base = base_port or random.randrange(20000, 32000, 10)
        self.ports = {"a": base, "b": base + 1, "redis": base + 2, "postgres": base + 3}
        self.front = front or ("asyncio" if asyncio_a else "threads")
        if self.front not in FRONTS:
            raise ValueError(f"front {self.front!r}: one of {', '.join(FRONTS)}")
        self.asyncio_a = self.front.startswith("asyncio")
        self.python = python or sys.executable   # A's interpreter (asyncio fronts)
        self.node = node or "node"                # A's Node.js (node fronts)
        self.pool, self.a_pool, self.keep = pool, a_pool, keep
        self.procs = {}
        self.workdir = None
        self.logs = {}
        self._up = False

    # where each thing is, for assertions and analysis
    @property
    def comm_a(self):
        if self.front.startswith("node-"):
            return COMMS["a-node"]
        if self.front.startswith("go"):
            return COMMS["a-go"]
        return COMMS["a-aio"] if self.asyncio_a else COMMS["a"]

    def endpoint(self, svc):
        host = {"a": "a", "b": "b", "redis": "db", "postgres": "db"}[svc]
        return self.addr[host], self.ports[svc]

    @property
    def pids(self) -> dict:
        return {name: p.pid for name, p in self.procs.items()}

    def __enter__(self):
        self.up()
        return self

    def __exit__(self, *exc):
        self.down()

    # -- build ----------------------------------------------------------------------
    def up(self):
        try:
            cleanup_leftovers(self.prefix)
            self.workdir = tempfile.mkdtemp(prefix=f"{self.prefix}topo-{self.owner}-")
            os.chmod(self.workdir, 0o755)  # postgres (its own user) lives below it
            self.logs = {k: os.path.join(self.workdir, f"{k}.jsonl") for k in ("a", "b", "load")}
            self._up = True
            self._network()
            self._redis()
            self._postgres()
            self._service("b", ["serve-b", "--listen", _addr(self.endpoint("b")),
                                "--redis", _addr(self.endpoint("redis")),
                                "--pg", _addr(self.endpoint("postgres")),
                                "--pool", str(self.pool), "--log", self.logs["b"]])
            where = ["--listen", _addr(self.endpoint("a")), "--b", _addr(self.endpoint("b")),
                     "--log", self.logs["a"]]
            if self.front.startswith("node-"):
                self._service("a", where + ["--variant", self.front[5:],
                                            "--pool", str(self.a_pool)],
                              cmd=[self.node, NODE_JS])
            elif self.front.startswith("go"):
                exe = build_go(GO_A, self.workdir)
                self._service("a", where + ["--variant", "fanout" if self.front == "go-fanout"
                                            else "seq"], cmd=[exe])
            elif self.asyncio_a:
                variant = {"asyncio": "gather"}.get(self.front, self.front[8:])
                self._service("a", ["serve-a-async", "--pool", str(self.a_pool),
                                    "--variant", variant, *where],
                              cmd=[self.python, "-m", "bench.topology"])
            else:
                self._service("a", ["serve-a", *where])
        except BaseException:
            self.down()
            raise
        return self

    def _ip(self, ns, *args):
        _run("ip", "-n", ns, *args)

    def _network(self):
        net = self.ns["net"]
        for role in ROLES:
            _run("ip", "netns", "add", self.ns[role])
        self._ip(net, "link", "add", "br0", "type", "bridge")
        self._ip(net, "link", "set", "br0", "up")
        for host, n in HOSTS.items():
            ns, veth = self.ns[host], f"v-{host}"
            self._ip(net, "link", "add", veth, "type", "veth", "peer", "name", "eth0",
                     "netns", ns)
            self._ip(net, "link", "set", veth, "master", "br0")
            self._ip(net, "link", "set", veth, "up")
            self._ip(ns, "addr", "add", f"{SUBNET}.{n}/24", "dev", "eth0")
            self._ip(ns, "link", "set", "eth0", "up")
            self._ip(ns, "link", "set", "lo", "up")

    def _spawn(self, name, host, argv, stdout=subprocess.DEVNULL):
        err = open(os.path.join(self.workdir, f"{name}.stderr"), "wb")
        env = {**os.environ, "PYTHONPATH": REPO, "PYTHONUNBUFFERED": "1"}
        try:
            p = subprocess.Popen(["ip", "netns", "exec", self.ns[host], *argv],
                                 stdin=subprocess.DEVNULL, stdout=stdout, stderr=err,
                                 cwd=REPO, env=env, start_new_session=True,
                                 preexec_fn=die_with_parent)
        finally:
            err.close()
        self.procs[name] = p
        return p

    def _stderr(self, name):
        try:
            with open(os.path.join(self.workdir, f"{name}.stderr"), errors="replace") as f:
                return f.read()[-2000:]
        except OSError:
            return ""

    def _wait(self, name, ready, timeout=30.0):
        p = self.procs[name]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if p.poll() is not None:
                raise RuntimeError(f"{name} exited with {p.returncode}: {self._stderr(name)}")
            try:
                if ready():
                    return
            except Exception:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"{name} not ready within {timeout}s: {self._stderr(name)}")

    def _redis(self):
        d = os.path.join(self.workdir, "redis")
        os.mkdir(d)
        self.redis_sock = os.path.join(d, "redis.sock")
        self._spawn("redis", "db", [
            "redis-server", "--port", str(self.ports["redis"]), "--bind", self.addr["db"],
            "--save", "", "--appendonly", "no", "--dir", d, "--protected-mode", "no",
            "--unixsocket", self.redis_sock, "--unixsocketperm", "700",
            "--logfile", os.path.join(d, "redis.log")])

        def ping():
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(1)
                s.connect(self.redis_sock)
                s.sendall(b"PING\r\n")
                return s.recv(64).startswith(b"+PONG")
        self._wait("redis", ping)

    def _postgres(self):
        d = os.path.join(self.workdir, "pg")
        os.mkdir(d)
        pw = pwd.getpwnam("postgres")
        os.chown(d, pw.pw_uid, pw.pw_gid)
        subprocess.run([_pg_bin("initdb"), "-D", d, "-A", "trust", "-U", "postgres"],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       user="postgres", cwd="/")
        with open(os.path.join(d, "pg_hba.conf"), "a") as f:
            f.write(f"host all all {SUBNET}.0/24 trust\n")
        self.pg_dir = d
        self._spawn("postgres", "db", [
            "setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups", "--",
            _pg_bin("postgres"), "-D", d, "-p", str(self.ports["postgres"]), "-k", d,
            "-c", f"listen_addresses={self.addr['db']}", "-c", "fsync=off",
            "-c", "max_connections=200", "-c", "synchronous_commit=off"])
        import psycopg

        def setup():
            with psycopg.connect(host=d, port=self.ports["postgres"], user="postgres",
                                 dbname="postgres", autocommit=True, connect_timeout=2) as c:
                c.execute("CREATE TABLE IF NOT EXISTS dt_kv (k text PRIMARY KEY, v text)")
                c.execute("INSERT INTO dt_kv VALUES ('seed', 'x') ON CONFLICT DO NOTHING")
            return True
        self._wait("postgres", setup, timeout=60)

    def _service(self, name, argv, cmd=None):
        cmd = cmd or [sys.executable, "-m", "bench.topology"]
        p = self._spawn(name, name, [*cmd, *argv], stdout=subprocess.PIPE)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            r, _, _ = select.select([p.stdout], [], [], 0.2)
            if r:
                line = p.stdout.readline()
                if line.startswith(b"READY"):
                    return
                if not line:
                    break
            if p.poll() is not None:
                break
        raise RuntimeError(f"service {name} did not start: {self._stderr(name)}")

    # -- load -----------------------------------------------------------------------
    def new_tag(self) -> str:
        return "q" + os.urandom(3).hex()

    def run_load(self, requests, clients, traceparent=False, timeout=120.0, trickle=0.0,
                 tag=None):
        """Send `requests` GET /a/<id> from `clients` threads (bounded by `timeout`
        seconds), then `trickle` seconds of 10 requests/s on one connection; returns the
        client's summary (tag, sent, errors, seconds)."""
        tag = tag or self.new_tag()
        argv = [sys.executable, "-m", "bench.topology", "load",
                "--a", _addr(self.endpoint("a")), "--requests", str(requests),
                "--clients", str(clients), "--timeout", str(timeout), "--tag", tag,
                "--trickle", str(trickle), "--log", self.logs["load"]]
        if traceparent:
            argv.append("--traceparent")
        p = self._spawn("load", "client", argv, stdout=subprocess.PIPE)
        try:
            out, _ = p.communicate(timeout=timeout + trickle + 60)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
            raise
        if p.returncode != 0:
            raise RuntimeError(f"load client failed ({p.returncode}): {self._stderr('load')}")
        lines = [x for x in out.decode().splitlines() if x.startswith("{")]
        return json.loads(lines[-1])

    def ground_truth(self) -> dict:
        """{"load": [...], "a": [...], "b": [...]}: every record the services logged."""
        out = {}
        for k, path in self.logs.items():
            recs = []
            if os.path.exists(path):
                with open(path) as f:
                    for line in f:
                        try:
                            recs.append(json.loads(line))
                        except ValueError:
                            pass  # a line cut by a kill
            out[k] = recs
        return out

    def agent_yaml(self, spans_path, wait=1.0, payload_bytes=512, ringbuf_pages=1024,
                   stats_interval=5.0, extra_processors="", kernel_l7=True, event_loop=True,
                   goroutine=True, asyncio_task=True):
        """The agent config: trace probe on this run's ports with the three protocols,
        spans -> traces, jsonl exporter. kernel_l7=False: the probe sends every call on
        these ports and the stage detects the protocols; only then does it send
        socket/connect/accept records, which carry an event loop's connect() times."""
        ports = ", ".join(str(p) for p in self.ports.values())
        kernel = "    protocols: [http1, redis, postgresql]\n" if kernel_l7 else ""
        loop = ("" if event_loop else "    event_loop: false\n") + \
            ("" if asyncio_task else "    asyncio_task: false\n")
        go = "" if goroutine else "    go: false\n"
        aio = "" if asyncio_task else "    asyncio: false\n"
        return f"""\
agent:
  stats_interval: {stats_interval}s
probes:
  trace:
    ports: [{ports}]
{kernel}{go}{aio}    payload_bytes: {payload_bytes}
    ringbuf_pages: {ringbuf_pages}
processors:
  spans:
    protocols: [http1, redis, postgresql]
  traces:
    wait: {wait}s
{loop}{extra_processors}exporters:
  jsonl:
    path: {spans_path}
    append: false
pipelines:
  main:
    probes: [trace]
    processors: [spans, traces]
    exporters: [jsonl]
"""

    # -- tear down ------------------------------------------------------------------
    def down(self):
        if not self._up:
            return
        self._up = False
        order = ["load", "a", "b", "redis", "postgres"]
        for name in order:
            p = self.procs.get(name)
            if p is not None and p.poll() is None:
                try:  # postgres: SIGINT is the fast shutdown (SIGTERM waits for clients)
                    p.send_signal(signal.SIGINT if name == "postgres" else signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for name in order:
            p = self.procs.get(name)
            if p is None:
                continue
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            if p.stdout:
                p.stdout.close()
        self.procs.clear()
        for role in ROLES[1:] + ROLES[:1]:  # hosts first, the bridge namespace last
            if self.ns[role] in netns_list():
                _kill_ns(self.ns[role])
        if self.workdir and not self.keep:
            shutil.rmtree(self.workdir, ignore_errors=True)
        elif self.workdir:  # keep logs and outputs, not the servers' data
            for d in ("pg", "redis"):
                shutil.rmtree(os.path.join(self.workdir, d), ignore_errors=True)
            open(os.path.join(self.workdir, "KEEP"), "w").close()


# -- span classification (shared by the e2e test and the accuracy benchmark) ------------
KINDS = ("load", "a_server", "a_client", "b_server", "redis_get_client", "redis_set_client",
         "pg_client", "redis_get_server", "redis_set_server", "pg_server")
# The Node fronts' second call: A's GET /c/<id> to B, and B's server side of it.
NODE_KINDS = ("a_client_c", "c_server")
ALL_KINDS = KINDS + NODE_KINDS
# kind -> the kind of its expected parent (None: the root of the request's trace)
PARENT = {"load": None, "a_server": "load", "a_client": "a_server", "b_server": "a_client",
          "a_client_c": "a_server", "c_server": "a_client_c",
          "redis_get_client": "b_server", "redis_set_client": "b_server",
          "pg_client": "b_server", "redis_get_server": "redis_get_client",
          "redis_set_server": "redis_set_client", "pg_server": "pg_client"}


def span_text(span: dict) -> str:
    a = span.get("attributes") or {}
    return " ".join(str(a.get(k, "")) for k in ("url.path", "db.query.text"))


def classify(span: dict):
    """(request id, kind) of a span of the topology (a dict from Span.to_dict()), or
    (None, None) when it carries no request id (connection set-up, other traffic)."""
    m = ID_RE.search(span_text(span))
    if not m:
        return None, None
    rid = m.group(1)
    proto, role = span.get("protocol"), span.get("role")
    path = (span.get("attributes") or {}).get("url.path", "")
    op = (span.get("operation") or "").upper()
    kind = None
    if proto == "http1":
        if path.startswith("/a/"):
            kind = "load" if role == "client" else "a_server"
        elif path.startswith("/b/"):
            kind = "a_client" if role == "client" else "b_server"
        elif path.startswith("/c/"):
            kind = "a_client_c" if role == "client" else "c_server"
    elif proto == "redis" and op in ("GET", "SET"):
        kind = f"redis_{op.lower()}_{role}"
    elif proto == "postgresql":
        kind = f"pg_{role}"
    return rid, kind


# -- the services -----------------------------------------------------------------------
class GroundTruth:
    """One JSON line per request, flushed as written (a killed service loses nothing)."""

    def __init__(self, path):
        self.f = open(path, "a", buffering=1, encoding="utf-8")
        self.lock = threading.Lock()

    def write(self, rec):
        line = json.dumps(rec, separators=(",", ":")) + "\n"
        with self.lock:
            self.f.write(line)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"        # keep-alive
    disable_nagle_algorithm = True

    def reply(self, code, body: bytes):
        head = (f"HTTP/1.1 {code} {http.client.responses.get(code, 'X')}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n")
        self.wfile.write(head.encode() + body)  # one write per response

    def log_message(self, *args):
        pass


def _http_server(listen, handler):
    ThreadingHTTPServer.request_queue_size = 256
    ThreadingHTTPServer.daemon_threads = True
    host, port = _hostport(listen)
    return ThreadingHTTPServer((host, port), handler)


class Resp:
    """A minimal Redis client: one connection, RESP2 commands, no set-up traffic."""

    def __init__(self, host, port):
        self.sock = socket.create_connection((host, port), timeout=30)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.f = self.sock.makefile("rb")
        self.local, self.remote = _addr(self.sock.getsockname()), _addr(self.sock.getpeername())

    def command(self, *args):
        parts = [b"*%d\r\n" % len(args)]
        for a in args:
            b = a.encode() if isinstance(a, str) else a
            parts.append(b"$%d\r\n%s\r\n" % (len(b), b))
        self.sock.sendall(b"".join(parts))
        return self._read()

    def _read(self):
        line = self.f.readline()
        t, rest = line[:1], line[1:-2]
        if t == b"+":
            return rest.decode()
        if t == b"-":
            raise RuntimeError(rest.decode())
        if t == b":":
            return int(rest)
        if t == b"$":
            n = int(rest)
            return None if n < 0 else self.f.read(n + 2)[:-2]
        if t == b"*":
            return [self._read() for _ in range(int(rest))]
        raise RuntimeError(f"bad reply {line!r}")


def serve_b(args):
    import psycopg
    set_comm(COMMS["b"])
    rhost, rport = _hostport(args.redis)
    phost, pport = _hostport(args.pg)
    pool = queue.Queue()
    for _ in range(args.pool):
        pg = psycopg.connect(host=phost, port=pport, user="postgres", dbname="postgres",
                             autocommit=True, sslmode="disable", gssencmode="disable",
                             connect_timeout=10)
        s = socket.socket(fileno=os.dup(pg.pgconn.socket))
        pg_local, pg_remote = _addr(s.getsockname()), _addr(s.getpeername())
        s.close()
        pool.put((Resp(rhost, rport), pg, pg_local, pg_remote))
    gt = GroundTruth(args.log)
    pid = os.getpid()

    class B(_Handler):
        def do_GET(self):
            m = re.fullmatch(r"/c/([A-Za-z0-9_-]+)", self.path)
            if m:  # the Node fronts' second back-end call: answered at once
                t0 = time.time_ns()
                gt.write({"svc": "c", "id": m.group(1), "pid": pid,
                          "tid": threading.get_native_id(), "peer": _addr(self.client_address),
                          "local": _addr(self.connection.getsockname()), "t0": t0,
                          "t1": time.time_ns(), "calls": []})
                return self.reply(200, b'{"c":true}')
            m = re.fullmatch(r"/b/([A-Za-z0-9_-]+)", self.path)
            if not m:
                return self.reply(404, b'{"error":"not found"}')
            rid, t0 = m.group(1), time.time_ns()
            key, calls = f"dt:{rid}", []
            r, pg, pg_local, pg_remote = pool.get()
            try:
                old = r.command("GET", key)
                calls.append({"proto": "redis", "op": "GET", "key": key,
                              "local": r.local, "remote": r.remote})
                r.command("SET", key, f"seen-{t0}")
                calls.append({"proto": "redis", "op": "SET", "key": key,
                              "local": r.local, "remote": r.remote})
                sql = f"SELECT v FROM dt_kv WHERE k = '{rid}'"
                rows = pg.execute(sql).fetchall()
                calls.append({"proto": "postgresql", "op": "SELECT", "sql": sql,
                              "local": pg_local, "remote": pg_remote})
            finally:
                pool.put((r, pg, pg_local, pg_remote))
            body = json.dumps({"id": rid, "seen": old is not None, "rows": len(rows)}).encode()
            gt.write({"svc": "b", "id": rid, "pid": pid, "tid": threading.get_native_id(),
                      "peer": _addr(self.client_address),
                      "local": _addr(self.connection.getsockname()),
                      "t0": t0, "t1": time.time_ns(), "calls": calls})
            self.reply(200, body)

    srv = _http_server(args.listen, B)
    print("READY", flush=True)
    srv.serve_forever()


def serve_a(args):
    set_comm(COMMS["a"])
    bhost, bport = _hostport(args.b)
    gt = GroundTruth(args.log)
    pid = os.getpid()
    local = threading.local()

    class A(_Handler):
        def handle(self):
            try:
                super().handle()
            finally:
                conn = getattr(local, "conn", None)
                if conn is not None:
                    conn.close()
                    local.conn = None

        def do_GET(self):
            m = re.fullmatch(r"/a/([A-Za-z0-9_-]+)", self.path)
            if not m:
                return self.reply(404, b'{"error":"not found"}')
            rid, t0 = m.group(1), time.time_ns()
            conn = getattr(local, "conn", None)
            if conn is None:  # one keep-alive connection to B per thread
                conn = local.conn = http.client.HTTPConnection(bhost, bport, timeout=30)
            call = {"proto": "http1", "op": f"GET /b/{rid}"}
            try:
                conn.request("GET", f"/b/{rid}")
                call["local"], call["remote"] = _addr(conn.sock.getsockname()), args.b
                resp = conn.getresponse()
                data = resp.read()
                call["status"] = resp.status
            except (OSError, http.client.HTTPException) as exc:
                conn.close()
                local.conn = None
                call["error"], data = repr(exc), b"{}"
            gt.write({"svc": "a", "id": rid, "pid": pid, "tid": threading.get_native_id(),
                      "peer": _addr(self.client_address),
                      "local": _addr(self.connection.getsockname()),
                      "t0": t0, "t1": time.time_ns(), "calls": [call]})
            self.reply(200 if "status" in call else 502, data)

    srv = _http_server(args.listen, A)
    print("READY", flush=True)
    srv.serve_forever()


def serve_a_async(args):
    set_comm(COMMS["a-aio"])
    if args.variant == "uvloop":
        import uvloop
        uvloop.run(_serve_a_async(args))
    else:
        asyncio.run(_serve_a_aiohttp(args) if args.variant == "aiohttp" else _serve_a_async(args))


async def _read_http(reader):
    """(first line, headers, body) of one HTTP/1.1 message; None at end of stream."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
    n = int(headers.get("content-length", "0") or 0)
    body = await reader.readexactly(n) if n else b""
    return lines[0], headers, body


async def _serve_a_async(args):
    bhost, bport = _hostport(args.b)
    gt = GroundTruth(args.log)
    pid, tid = os.getpid(), threading.get_native_id()
    pool: asyncio.Queue = asyncio.Queue()

    async def connect():
        r, w = await asyncio.open_connection(bhost, bport)
        w.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return r, w

    opened = [0]

    async def call_b(rid, path="b"):
        call = {"proto": "http1", "op": f"GET /{path}/{rid}"}
        # A small pool of keep-alive connections to B shared by all requests, opened on
        # demand (up to --pool), then reused.
        if pool.empty() and opened[0] < args.pool:
            opened[0] += 1
            r, w = await connect()
        else:
            r, w = await pool.get()
        try:
            w.write(f"GET /{path}/{rid} HTTP/1.1\r\nHost: {args.b}\r\n\r\n".encode())
            call["local"], call["remote"] = _addr(w.get_extra_info("sockname")), args.b
            await w.drain()
            msg = await _read_http(r)
            if msg is None:
                raise ConnectionError("B closed the connection")
            call["status"] = int(msg[0].split(" ", 2)[1])
            pool.put_nowait((r, w))
            return call, msg[2]
        except (OSError, ValueError, asyncio.IncompleteReadError) as exc:
            w.close()
            pool.put_nowait(await connect())
            call["error"] = repr(exc)
            return call, b"{}"

    async def handle(reader, writer):
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peer, me = writer.get_extra_info("peername"), writer.get_extra_info("sockname")
        try:
            while True:
                msg = await _read_http(reader)
                if msg is None:
                    break
                line, headers, _ = msg
                parts = line.split(" ")
                m = re.fullmatch(r"/a/([A-Za-z0-9_-]+)", parts[1] if len(parts) > 1 else "")
                if not m:
                    body, code = b'{"error":"not found"}', 404
                else:
                    rid, t0 = m.group(1), time.time_ns()
                    if args.variant == "seq":     # two direct awaits, one after the other
                        done = [await call_b(rid, "b"), await call_b(rid, "c")]
                    else:                         # both at once: two tasks
                        done = await asyncio.gather(call_b(rid, "b"), call_b(rid, "c"))
                    calls, body = [c for c, _ in done], done[0][1]
                    code = 200 if all("status" in c for c in calls) else 502
                    gt.write({"svc": "a", "id": rid, "pid": pid, "tid": tid,
                              "peer": _addr(peer), "local": _addr(me), "t0": t0,
                              "t1": time.time_ns(), "calls": calls})
                writer.write((f"HTTP/1.1 {code} {http.client.responses.get(code, 'X')}\r\n"
                              f"Content-Type: application/json\r\n"
                              f"Content-Length: {len(body)}\r\n\r\n").encode() + body)
                await writer.drain()
                if headers.get("connection", "").lower() == "close":
                    break
        except ConnectionError:
            pass
        finally:
            writer.close()

    host, port = _hostport(args.listen)
    server = await asyncio.start_server(handle, host, port, backlog=256)
    print("READY", flush=True)
    async with server:
        await server.serve_forever()


async def _serve_a_aiohttp(args):
    """A on aiohttp: its server, and a ClientSession (a pool of `--pool` keep-alive
    connections) calling B's /b and /c with gather."""
    import contextvars

    from aiohttp import ClientSession, TCPConnector, web
    bhost, bport = _hostport(args.b)
    gt = GroundTruth(args.log)
    pid, tid = os.getpid(), threading.get_native_id()
    used = contextvars.ContextVar("used")   # the call's record: where its socket was

    class Connector(TCPConnector):
        # aiohttp releases a small response's connection before the caller sees it: the
        # socket a call used is noted when the pool hands it out, in the call's context.
        async def connect(self, req, traces, timeout):
            conn = await super().connect(req, traces, timeout)
            used.get()["local"] = _addr(conn.transport.get_extra_info("sockname"))
            return conn

    session = ClientSession(connector=Connector(limit=args.pool, keepalive_timeout=60))

    async def call_b(rid, path):
        call = {"proto": "http1", "op": f"GET /{path}/{rid}", "remote": args.b}
        used.set(call)
        try:
            async with session.get(f"http://{bhost}:{bport}/{path}/{rid}") as resp:
                body = await resp.read()
                call["status"] = resp.status
                return call, body
        except Exception as exc:  # noqa: BLE001 (the request is answered 502, logged)
            call["error"] = repr(exc)
            return call, b"{}"

    async def handle(request):
        rid, t0 = request.match_info["rid"], time.time_ns()
        done = await asyncio.gather(call_b(rid, "b"), call_b(rid, "c"))
        calls = [c for c, _ in done]
        tr = request.transport
        gt.write({"svc": "a", "id": rid, "pid": pid, "tid": tid,
                  "peer": _addr(tr.get_extra_info("peername")),
                  "local": _addr(tr.get_extra_info("sockname")), "t0": t0,
                  "t1": time.time_ns(), "calls": calls})
        ok = all("status" in c for c in calls)
        return web.Response(body=done[0][1], status=200 if ok else 502,
                            content_type="application/json")

    app = web.Application()
    app.router.add_get("/a/{rid}", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    host, port = _hostport(args.listen)
    await web.TCPSite(runner, host, port, backlog=256).start()
    print("READY", flush=True)
    await asyncio.Event().wait()


def load(args):
    set_comm(COMMS["load"])
    host, port = _hostport(args.a)
    gt = GroundTruth(args.log)
    lock = threading.Lock()
    state = {"next": 0, "errors": 0}
    t_start = time.monotonic()
    deadline = t_start + args.timeout

    def one(conn, rid):
        headers, tp = {}, None
        if args.traceparent:
            tp = f"00-{os.urandom(16).hex()}-{os.urandom(8).hex()}-01"
            headers["traceparent"] = tp
        rec = {"svc": "load", "id": rid, "tid": threading.get_native_id(), "traceparent": tp,
               "t0": time.time_ns()}
        if conn is None:
            conn = http.client.HTTPConnection(host, port, timeout=30)
        try:
            conn.request("GET", f"/a/{rid}", headers=headers)
            rec["local"], rec["remote"] = _addr(conn.sock.getsockname()), args.a
            resp = conn.getresponse()
            resp.read()
            rec["status"] = resp.status
        except (OSError, http.client.HTTPException) as exc:
            rec["error"] = repr(exc)
            conn.close()
            conn = None
            with lock:
                state["errors"] += 1
        rec["t1"] = time.time_ns()
        gt.write(rec)
        return conn

    def worker():
        conn = None  # one keep-alive connection per client thread
        while True:
            with lock:
                if state["next"] >= args.requests or time.monotonic() > deadline:
                    break
                i = state["next"]
                state["next"] += 1
            conn = one(conn, f"{args.tag}n{i:06d}")
        if conn is not None:
            conn.close()

    threads = [threading.Thread(target=worker) for _ in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.monotonic() - t_start
    conn, j = None, 0
    end = time.monotonic() + args.trickle
    while time.monotonic() < end:  # keeps an agent's pipeline moving after the load
        conn = one(conn, f"{args.tag}t{j:06d}")
        j += 1
        time.sleep(0.1)
    if conn is not None:
        conn.close()
    print(json.dumps({"tag": args.tag, "sent": state["next"], "errors": state["errors"],
                      "seconds": round(seconds, 3), "trickle": j}), flush=True)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.topology", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    u = sub.add_parser("up", help="build the topology and wait for Ctrl-C")
    u.add_argument("--asyncio", action="store_true")
    u.add_argument("--front", choices=FRONTS)
    u.add_argument("--prefix", default="dt-")
    c = sub.add_parser("cleanup", help="delete leftovers of crashed runs")
    c.add_argument("--prefix", default="dt-")
    b = sub.add_parser("serve-b")
    b.add_argument("--listen", required=True)
    b.add_argument("--redis", required=True)
    b.add_argument("--pg", required=True)
    b.add_argument("--pool", type=int, default=16)
    b.add_argument("--log", required=True)
    for name in ("serve-a", "serve-a-async"):
        a = sub.add_parser(name)
        a.add_argument("--listen", required=True)
        a.add_argument("--b", required=True)
        a.add_argument("--log", required=True)
        a.add_argument("--pool", type=int, default=4)
        a.add_argument("--variant", choices=("gather", "seq", "aiohttp", "uvloop"),
                       default="gather")
    ld = sub.add_parser("load")
    ld.add_argument("--a", required=True)
    ld.add_argument("--requests", type=int, default=100)
    ld.add_argument("--clients", type=int, default=4)
    ld.add_argument("--timeout", type=float, default=120)
    ld.add_argument("--tag", required=True)
    ld.add_argument("--traceparent", action="store_true")
    ld.add_argument("--trickle", type=float, default=0.0)
    ld.add_argument("--log", required=True)
    args = p.parse_args(argv)
    if args.cmd == "serve-b":
        serve_b(args)
    elif args.cmd == "serve-a":
        serve_a(args)
    elif args.cmd == "serve-a-async":
        serve_a_async(args)
    elif args.cmd == "load":
        load(args)
    elif args.cmd == "cleanup":
        print("deleted:", " ".join(cleanup_leftovers(args.prefix)) or "nothing")
    elif args.cmd == "up":
        signal.signal(signal.SIGTERM, _interrupt)
        with Topology(prefix=args.prefix, asyncio_a=args.asyncio, front=args.front) as t:
            print(json.dumps({"namespaces": t.ns, "addresses": t.addr, "ports": t.ports,
                              "pids": t.pids, "workdir": t.workdir}, indent=2), flush=True)
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                pass


if __name__ == "__main__":
    _main()
