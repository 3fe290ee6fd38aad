"""TLS end to end: real servers and clients over OpenSSL, the real tls probe (uprobes)
with the real trace probe beside it (the ciphertext calls), and the spans stage.

Each test asserts the spans on both ends (operation, status, role, the TLS mark), that
each TLS span's request starts at the TCP position of the ciphertext syscall under it
(so it links by tcp_seq like a plaintext span), and that the ciphertext itself was never
parsed. Servers and clients run as subprocesses: the test process is never traced.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import types

import pytest

from conftest import require_bpf, start_probe
from deeptrace_core.bpf import kernel_defines
from deeptrace_core.plugins import PluginHost
from deeptrace_core.testing import Server, free_port, stop_process
from deeptrace_plugins.protocols.stage import SpansConfig, SpanStage
from deeptrace_plugins.tls.probe import TlsConfig, TlsProbe

pytestmark = pytest.mark.bpf
HERE = os.path.dirname(__file__)
PEERS = os.path.join(HERE, "tls_peers.py")


class TLS:
    def __init__(self, trace, tls, context):
        self.trace, self.tls, self.context = trace, tls, context

    def run(self, port, clients, expect, timeout=20.0):
        """Trace `port`, run each argv of `clients` in turn, and return (spans, socket
        records of the ciphertext, TLS records) once expect(spans) holds."""
        self.trace.poll(0)
        self.tls.poll(0)
        self.trace.add_ports([port])
        stage = SpanStage(SpansConfig(), self.context)
        spans, cipher, plain = [], [], []
        self.outputs = []

        def drain():
            recs = [r for r in self.trace.poll(10) if r.kind == "socket"]  # not task edges
            tls = [r for r in self.tls.poll(10) if port in (r.local_port, r.remote_port)]
            cipher.extend(r for r in recs if r.direction != "none")
            plain.extend(tls)
            spans.extend(stage.process(recs + tls))

        try:
            for argv in clients:
                out = subprocess.run(argv, capture_output=True, text=True, timeout=60,
                                     cwd=HERE)
                assert out.returncode == 0, out.stderr
                self.outputs.append(out.stdout)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                drain()
                if expect(spans):
                    break
            time.sleep(0.3)  # anything that should not be there has had time to arrive
            drain()
        finally:
            self.trace.remove_ports([port])
        self.stage = stage
        return [s for s in spans if port in (s.local_port, s.remote_port)], cipher, plain


@pytest.fixture(scope="module")
def tls():
    require_bpf()
    registry = PluginHost().load_entry_points().registry()
    context = types.SimpleNamespace(registry=registry)
    trace = start_probe(context=context, ports=[1], payload_bytes=64)
    probe = TlsProbe(TlsConfig(payload_bytes=4096))
    try:
        probe.attach(kernel_defines(probe.kernel_fields))
        yield TLS(trace, probe, context)
    finally:
        probe.detach()
        trace.detach()


@pytest.fixture(scope="module")
def cert():
    d = tempfile.mkdtemp(prefix="dt-tls-")
    crt, key = os.path.join(d, "cert.pem"), os.path.join(d, "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout",
                    key, "-out", crt, "-days", "2", "-subj", "/CN=localhost"],
                   check=True, capture_output=True)
    os.chmod(key, 0o644)  # servers that drop privileges read it too
    yield types.SimpleNamespace(dir=d, crt=crt, key=key)
    shutil.rmtree(d, ignore_errors=True)


def by_role(spans, role):
    return [s for s in spans if s.role == role]


def both_ends(n):
    return lambda s: len(by_role(s, "client")) >= n and len(by_role(s, "server")) >= n


def ops(spans, role):
    return [(s.protocol, s.operation, s.status, s.error) for s in by_role(spans, role)]


def python_client(port, *paths):
    return [sys.executable, PEERS, "client", str(port), *paths]


def check_linked(spans, cipher, exact=True):
    """Every TLS span carries the TCP position of its request's ciphertext, inside the
    ciphertext call that moved it (the client's write, the server's read, same
    connection), and both ends agree, so they link by tcp_seq. `exact`: socket BIOs, where
    the request's record starts that call. (A memory BIO's socket read may begin with the
    end of the handshake: the record then starts inside it.)"""
    for s in spans:
        assert s.attributes.get("deeptrace.tls") is True
        assert s.request_seq is not None, s
        direction = "egress" if s.role == "client" else "ingress"
        under = [(r.tcp_seq_start, r.tcp_seq_end) for r in cipher
                 if r.pid == s.pid and r.local_port == s.local_port
                 and r.remote_port == s.remote_port and r.direction == direction]
        seq = s.request_seq[0]
        if exact:
            assert seq in [a for a, _ in under], (s, under)
        else:
            assert any(a <= seq < b for a, b in under), (s, under)
    clients = {(s.local_port, s.request_seq[0]) for s in by_role(spans, "client")}
    servers = {(s.remote_port, s.request_seq[0]) for s in by_role(spans, "server")}
    assert clients == servers


def check_no_ciphertext_parsed(spans, stage):
    # Only the plaintext made spans: one per request and end, none from the ciphertext,
    # whose connections only the handshake parser looked at (their handshake spans were
    # dropped: the plaintext was read).
    assert all(s.attributes.get("deeptrace.tls") for s in spans)
    c = stage.counts["tls"]
    assert c["handshakes_decrypted"] + c["ciphertext_connections"] >= 2
    assert c["handshakes_unread"] == 0


HTTP_EXPECTED = [("http1", "GET /ok", "200", False), ("http1", "GET /missing", "404", True)]


def test_python_ssl_server_and_urllib_client(tls, cert):
    port = free_port()
    srv = Server([sys.executable, PEERS, "threaded", str(port), cert.crt, cert.key], port,
                 timeout=120)  # slow machines: an emulated guest took over 30 s
    try:
        before = tls.tls.stats()["mapped_nested"]
        spans, cipher, _ = tls.run(port, [python_client(port, "/ok", "/missing")],
                                   both_ends(2))
    finally:
        srv.stop()
    assert json.loads(tls.outputs[0]) == [200, 404]
    assert ops(spans, "client") == HTTP_EXPECTED
    assert ops(spans, "server") == [(p, o, st, False) for p, o, st, _ in HTTP_EXPECTED]
    assert {s.pid for s in by_role(spans, "server")} == {srv.pid}
    check_linked(spans, cipher)
    check_no_ciphertext_parsed(spans, tls.stage)
    assert tls.tls.stats()["mapped_nested"] > before   # socket BIOs: the nested call


def nginx_ssl(cert):
    port = free_port()
    d = tempfile.mkdtemp(prefix="dt-nginx-tls-")
    conf = os.path.join(d, "nginx.conf")
    with open(conf, "w") as f:
        f.write(f"""
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log;
events {{ worker_connections 256; }}
http {{
  access_log off;
  client_body_temp_path {d}/body; proxy_temp_path {d}/proxy;
  fastcgi_temp_path {d}/fcgi; uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;
  server {{
    listen 127.0.0.1:{port} ssl;
    ssl_certificate {cert.crt};
    ssl_certificate_key {cert.key};
    location / {{ return 200 "hello from nginx\\n"; }}
    location /missing {{ return 404 "no\\n"; }}
  }}
}}
""")
    return Server(["nginx", "-c", conf, "-p", d, "-g", "daemon off;"], port)


def test_nginx_ssl_and_curl(tls, cert):
    srv = nginx_ssl(cert)
    port = srv.port
    try:
        curl = ["curl", "-sk", "-o", "/dev/null", "-w", "%{http_code}\n"]
        spans, cipher, _ = tls.run(port, [curl + [f"https://127.0.0.1:{port}/ok"],
                                          curl + [f"https://127.0.0.1:{port}/missing"]],
                                   both_ends(2))
    finally:
        srv.stop()
    assert [o.strip() for o in tls.outputs] == ["200", "404"]
    assert ops(spans, "client") == HTTP_EXPECTED
    assert ops(spans, "server") == [(p, o, st, False) for p, o, st, _ in HTTP_EXPECTED]
    assert {s.comm for s in by_role(spans, "client")} == {"curl"}
    assert all(s.comm.startswith("nginx") for s in by_role(spans, "server"))
    check_linked(spans, cipher)
    check_no_ciphertext_parsed(spans, tls.stage)


def test_python_asyncio_server(tls, cert):
    """asyncio's SSLProtocol uses memory BIOs: the server's connection is learnt from its
    first neighbouring socket read and write, and each call's range from the BIOs'
    counters."""
    port = free_port()
    srv = Server([sys.executable, PEERS, "asyncio", str(port), cert.crt, cert.key], port,
                 timeout=120)  # slow machines: an emulated guest took over 30 s
    try:
        before = tls.tls.stats()
        spans, cipher, plain = tls.run(port, [python_client(port, "/ok", "/missing")],
                                       both_ends(2))
        after = tls.tls.stats()
    finally:
        srv.stop()
    assert json.loads(tls.outputs[0]) == [200, 404]
    assert ops(spans, "client") == HTTP_EXPECTED
    assert ops(spans, "server") == [(p, o, st, False) for p, o, st, _ in HTTP_EXPECTED]
    check_linked(spans, cipher, exact=False)
    # Both directions of the server by the memory BIO rule, each with its exact range.
    assert after["mapped_neighbour"] - before["mapped_neighbour"] >= 4
    server_plain = [r for r in plain if r.pid == srv.pid and r.direction != "none"]
    assert len(server_plain) >= 4
    assert all(r.tcp_seq_start is not None for r in server_plain)


NODE_SERVER = """
const https = require('https'), fs = require('fs');
const s = https.createServer({key: fs.readFileSync(process.argv[3]),
                              cert: fs.readFileSync(process.argv[4])}, (req, res) => {
  if (req.url.startsWith('/missing')) { res.writeHead(404); res.end('no\\n'); }
  else { res.writeHead(200, {'content-type': 'text/plain'}); res.end('hello node\\n'); }
});
s.listen(+process.argv[2], '127.0.0.1');
"""
NODE_CLIENT = """
const https = require('https');
function get(path) {
  return new Promise((ok, ko) => https.get({host: '127.0.0.1', port: +process.argv[2], path,
      rejectUnauthorized: false, agent: false}, r => {
    r.on('data', () => {}); r.on('end', () => ok(r.statusCode));
  }).on('error', ko));
}
(async () => { const out = [];
  for (const p of process.argv.slice(3)) out.push(await get(p));
  console.log(JSON.stringify(out)); })();
"""


def test_node_https_server_and_client(tls, cert):
    """Node carries OpenSSL inside its executable (attached as a file of its own) and
    uses memory BIOs on both ends."""
    port = free_port()
    d = tempfile.mkdtemp(prefix="dt-node-")
    for name, code in (("server.js", NODE_SERVER), ("client.js", NODE_CLIENT)):
        with open(os.path.join(d, name), "w") as f:
            f.write(code)
    srv = Server(["node", os.path.join(d, "server.js"), str(port), cert.key, cert.crt], port,
                 timeout=120)
    try:
        before = tls.tls.stats()["mapped_neighbour"]
        spans, cipher, plain = tls.run(
            port, [["node", os.path.join(d, "client.js"), str(port), "/ok", "/missing"]],
            both_ends(2))
        after = tls.tls.stats()["mapped_neighbour"]
    finally:
        srv.stop()
        shutil.rmtree(d, ignore_errors=True)
    assert json.loads(tls.outputs[0]) == [200, 404]
    assert any(p.endswith("/node") for p in tls.tls.attached_paths())
    assert ops(spans, "client") == HTTP_EXPECTED
    assert ops(spans, "server") == [(p, o, st, False) for p, o, st, _ in HTTP_EXPECTED]
    assert all(s.comm == "node" for s in spans)
    check_linked(spans, cipher, exact=False)
    # Both processes, both directions, by the memory BIO rule, each with its range.
    data = [r for r in plain if r.direction != "none"]
    assert after - before >= len(data) >= 8
    assert all(r.tcp_seq_start is not None for r in data)
    check_no_ciphertext_parsed(spans, tls.stage)


def test_redis_tls_and_redis_cli(tls, cert):
    port = free_port()
    d = tempfile.mkdtemp(prefix="dt-redis-tls-")
    srv = Server(["redis-server", "--port", "0", "--tls-port", str(port), "--bind",
                  "127.0.0.1", "--tls-cert-file", cert.crt, "--tls-key-file", cert.key,
                  "--tls-auth-clients", "no", "--save", "", "--appendonly", "no",
                  "--dir", d], port)
    cli = ["redis-cli", "--tls", "--insecure", "-p", str(port)]
    try:
        spans, cipher, _ = tls.run(port, [cli + ["SET", "k", "v"], cli + ["GET", "k"],
                                          cli + ["NOSUCHCMD"]], both_ends(3))
    finally:
        srv.stop()
        shutil.rmtree(d, ignore_errors=True)
    assert [o.strip() for o in tls.outputs][:2] == ["OK", "v"]
    for role in ("client", "server"):
        got = [(s.protocol, s.operation, s.error) for s in by_role(spans, role)
               if not s.operation.startswith(("COMMAND", "HELLO"))]
        assert got == [("redis", "SET", False), ("redis", "GET", False),
                       ("redis", "NOSUCHCMD", True)], role
    assert all(s.comm.startswith("redis-server") for s in by_role(spans, "server"))
    check_linked(spans, cipher)
    check_no_ciphertext_parsed(spans, tls.stage)


LATE_CLIENT = """
import json, sys, time
port, delay = int(sys.argv[1]), float(sys.argv[2])
time.sleep(delay)
assert 'ssl' not in sys.modules and '_ssl' not in sys.modules
import ssl, urllib.request   # the late load: libssl is mapped only now
time.sleep(delay)            # the agent's rescan delay (README: TLS)
ctx = ssl.create_default_context(); ctx.check_hostname = False; ctx.verify_mode = ssl.CERT_NONE
with urllib.request.urlopen(f'https://127.0.0.1:{port}/ok', context=ctx, timeout=10) as r:
    r.read()
    print(json.dumps([r.status]), flush=True)
"""


def test_process_that_loads_libssl_after_the_agent_started(tls, cert, tmp_path):
    """A process maps a libssl file (a copy: a new inode, not attached at start-up) after
    the probe started: the loader's trigger makes the probe attach to it in time."""
    lib = tmp_path / "libssl.so.3"
    shutil.copy("/lib/x86_64-linux-gnu/libssl.so.3", lib)
    assert str(lib) not in tls.tls.attached_paths()
    port = free_port()
    srv = Server([sys.executable, PEERS, "threaded", str(port), cert.crt, cert.key], port,
                 timeout=120)  # slow machines: an emulated guest took over 30 s
    env = {**os.environ, "LD_LIBRARY_PATH": str(tmp_path)}
    try:
        client = subprocess.Popen([sys.executable, "-c", LATE_CLIENT, str(port), "1.0"],
                                  env=env, stdout=subprocess.PIPE, text=True)
        try:
            spans, cipher, _ = tls.run(port, [], lambda s: len(by_role(s, "client")) >= 1
                                       and client.poll() is not None, timeout=30)
            assert client.wait(30) == 0
            assert json.loads(client.stdout.read()) == [200]
        finally:
            stop_process(client)
    finally:
        srv.stop()
    assert str(lib) in tls.tls.attached_paths()
    clients = by_role(spans, "client")
    assert [(s.operation, s.status) for s in clients] == [("GET /ok", "200")]
    assert clients[0].pid == client.pid
    assert [(s.operation, s.status) for s in by_role(spans, "server")] == [("GET /ok", "200")]
    check_linked(spans, cipher)
