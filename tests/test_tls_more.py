"""More TLS end to end (issue 14's remaining cases), with tests/test_tls.py's harness:
real servers and clients as subprocesses, the real tls and trace probes, both ends'
spans asserted and each span's request placed on the ciphertext under it.

PostgreSQL with sslmode=require (psycopg's own libssl, loaded late); gRPC over TLS
(HTTP/2, Debian's grpcio on the system OpenSSL); mTLS; redaction of decrypted headers
through a Pipeline; and a front(HTTPS) -> back(HTTPS) -> Redis(TLS) chain through the
agent, whose linker must give one whole trace per request.
"""

import json
import os
import pathlib
import pwd
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import types

import pytest

import servers
from conftest import require_bpf
from deeptrace_core.pipeline import Pipeline
from deeptrace_core.testing import Server, free_port, stop_process
from deeptrace_plugins.exporters.jsonl import JsonlConfig, JsonlExporter
from test_tls import (PEERS, both_ends, by_role, check_linked, check_no_ciphertext_parsed,
                      ops, python_client)
from test_tls import tls  # noqa: F401,F811 (the probes, as a fixture of this module too)

pytestmark = pytest.mark.bpf
SYSTEM_PYTHON = "/usr/bin/python3"   # Debian's grpcio (scripts/setup.sh: python3-grpcio)


def _openssl(*args):
    subprocess.run(["openssl", *args], check=True, capture_output=True)


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    """A server certificate for localhost/127.0.0.1 (gRPC checks the name), and a CA
    with a client certificate it signed (mTLS)."""
    d = tmp_path_factory.mktemp("certs")
    p = {n: str(d / n) for n in ("crt", "key", "ca", "ca_key", "client", "client_key", "csr")}
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", p["key"], "-out",
             p["crt"], "-days", "2", "-subj", "/CN=localhost",
             "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", p["ca_key"], "-out",
             p["ca"], "-days", "2", "-subj", "/CN=dt-test-ca")
    _openssl("req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", p["client_key"],
             "-out", p["csr"], "-subj", "/CN=dt-client")
    _openssl("x509", "-req", "-in", p["csr"], "-CA", p["ca"], "-CAkey", p["ca_key"],
             "-CAcreateserial", "-out", p["client"], "-days", "2")
    for f in p.values():
        os.chmod(f, 0o644)
    return types.SimpleNamespace(**p)


def run_late_client(tls, port, argv, n, timeout=30):
    """A client that loads its libssl late and waits for the probe's rescan (README: TLS)
    runs while the probe is polled, as the agent polls it."""
    client = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              cwd=os.path.dirname(__file__))
    try:
        spans, cipher, plain = tls.run(port, [], lambda s: both_ends(n)(s)
                                       and client.poll() is not None, timeout=timeout)
        out, err = client.communicate(timeout=30)
        assert client.returncode == 0, err
    finally:
        stop_process(client)
    return spans, cipher, plain, out


PG_CLIENT = """
import json, sys, time
import psycopg          # maps psycopg_binary's own libssl
time.sleep(1.0)         # the probe's rescan delay (README: TLS)
with psycopg.connect(host='127.0.0.1', port=int(sys.argv[1]), user='postgres',
                     dbname='postgres', sslmode='require', autocommit=True) as c:
    out = [c.pgconn.ssl_in_use, c.execute('SELECT 41 + 1').fetchone()[0]]
    try:
        c.execute('SELECT * FROM no_such_table')
    except psycopg.errors.UndefinedTable:
        out.append('42P01')
print(json.dumps(out), flush=True)
"""


def test_postgresql_sslmode_require_from_psycopg(tls, certs):
    # Not under pytest's tmp_path, whose parents the postgres user cannot enter.
    d = pathlib.Path(tempfile.mkdtemp(prefix="dt-pgssl-"))
    shutil.copy(certs.crt, d / "server.crt")
    shutil.copy(certs.key, d / "server.key")
    os.chmod(d / "server.key", 0o600)   # postgres refuses a key others can read
    pw = pwd.getpwnam("postgres")
    for f in (d, d / "server.crt", d / "server.key"):
        os.chown(f, pw.pw_uid, pw.pw_gid)
    try:
        srv = servers.postgres("ssl=on", f"ssl_cert_file={d}/server.crt",
                               f"ssl_key_file={d}/server.key")
        try:
            spans, cipher, plain, out = run_late_client(
                tls, srv.port, [sys.executable, "-c", PG_CLIENT, str(srv.port)], 2)
        finally:
            srv.stop()
    finally:
        shutil.rmtree(d, ignore_errors=True)
    assert json.loads(out) == [True, 42, "42P01"]
    # The client's plaintext came through psycopg's own libssl, not the system's.
    assert any("psycopg_binary" in p for p in tls.tls.attached_paths())
    for role in ("client", "server"):
        mine = by_role(spans, role)
        assert mine and all(s.protocol == "postgresql" for s in mine), role
        texts = [s.attributes.get("db.query.text", "") for s in mine]
        assert sum("SELECT 41 + 1" in t for t in texts) == 1, (role, texts)
        errors = [(s.status, s.attributes.get("db.query.text")) for s in mine if s.error]
        assert errors == [("42P01", "SELECT * FROM no_such_table")], role
    assert all(s.comm.startswith("postgres") for s in by_role(spans, "server"))
    assert {s.pid for s in by_role(spans, "client")} != {s.pid for s in by_role(spans, "server")}
    check_linked(spans, cipher)
    # The connection began in plaintext (SSLRequest, answered 'S'), so the stage parsed it
    # as PostgreSQL until TLS began; its ciphertext then made no span: all are the tls
    # probe's.
    ssl_request = (8).to_bytes(4, "big") + (80877103).to_bytes(4, "big")
    assert any(r.payload.startswith(ssl_request) for r in cipher if r.direction == "egress")
    assert all(s.attributes.get("deeptrace.tls") for s in spans)


@pytest.mark.skipif(not os.path.exists(SYSTEM_PYTHON), reason="no system python3")
def test_grpc_over_tls_server_and_client(tls, certs):
    if subprocess.run([SYSTEM_PYTHON, "-c", "import grpc"], capture_output=True).returncode:
        pytest.fail("Debian's python3-grpcio is missing: run scripts/setup.sh")
    port = free_port()
    srv = Server([SYSTEM_PYTHON, PEERS, "grpc-server", str(port), certs.crt, certs.key], port,
                 timeout=120)
    try:
        spans, cipher, plain = tls.run(
            port, [[SYSTEM_PYTHON, PEERS, "grpc-client", str(port), certs.crt]], both_ends(3))
    finally:
        srv.stop()
    assert json.loads(tls.outputs[0]) == ["hello first", "NOT_FOUND", "bye"]
    want = [("grpc", "helloworld.Greeter/SayHello", "0", False),
            ("grpc", "helloworld.Greeter/SayHello", "5", True),
            ("grpc", "helloworld.Greeter/SayBye", "0", False)]
    for role in ("client", "server"):
        assert ops(spans, role) == want, role
        assert len({s.conn_id for s in by_role(spans, role)}) == 1   # one HTTP/2 connection
    assert {s.pid for s in by_role(spans, "server")} == {srv.pid}
    assert all(s.attributes.get("deeptrace.tls") for s in spans)
    # Every plaintext record was placed on its connection's TCP stream.
    data = [r for r in plain if r.direction != "none"]
    assert data and all(r.tcp_seq_start is not None for r in data)
    check_linked(spans, cipher, exact=False)
    check_no_ciphertext_parsed(spans, tls.stage)


def test_mtls_client_certificate_required(tls, certs):
    port = free_port()
    srv = Server([sys.executable, PEERS, "mtls", str(port), certs.crt, certs.key, certs.ca],
                 port, timeout=120)
    try:
        spans, cipher, _ = tls.run(
            port, [[sys.executable, PEERS, "mtls-client", str(port), certs.client,
                    certs.client_key, "/ok", "/missing"]], both_ends(2))
    finally:
        srv.stop()
    # The server refused the connection without a certificate and verified the other two.
    assert json.loads(tls.outputs[0]) == [True, [200, "dt-client"], [404, "dt-client"]]
    want = [("http1", "GET /ok", "200", False), ("http1", "GET /missing", "404", True)]
    # TLS 1.3: the client finishes its handshake before the server checks its (missing)
    # certificate, so it may send its request; the server's alert then ends it (an error
    # span on the client). The server read no request on that connection.
    refused = [("http1", "GET /ok", "connection closed", True)]
    assert ops(spans, "client") in (want, refused + want)
    assert ops(spans, "server") == [(p, o, st, False) for p, o, st, _ in want]
    answered = [s for s in spans if s.status != "connection closed"]
    check_linked(answered, cipher)


BEARER, CODE = "S3CRET-bearer-7f3a", "S3CRET-code-91bc"


def test_redaction_applies_to_decrypted_headers(tls, certs, tmp_path):
    port = free_port()
    srv = Server([sys.executable, PEERS, "threaded", str(port), certs.crt, certs.key], port,
                 timeout=120)
    try:
        spans, cipher, plain = tls.run(
            port, [[sys.executable, PEERS, "header-client", str(port),
                    f"/login?state=7&code={CODE}", f"Authorization: Bearer {BEARER}"]],
            both_ends(1))
    finally:
        srv.stop()
    assert json.loads(tls.outputs[0]) == [200]
    # The secrets were decrypted: they are in the plaintext records of both ends.
    for pid_role in ("client", "server"):
        pids = {s.pid for s in by_role(spans, pid_role)}
        assert any(BEARER.encode() in r.payload and CODE.encode() in r.payload
                   for r in plain if r.pid in pids), pid_role
    out = tmp_path / "spans.jsonl"
    jsonl = JsonlExporter(JsonlConfig(path=str(out)))
    pipe = Pipeline("t", [], [("jsonl", jsonl)])   # the default Redactor
    pipe.consume(spans)
    jsonl.shutdown()
    text = out.read_text()
    assert BEARER not in text and CODE not in text and "S3CRET" not in text
    written = [json.loads(line) for line in text.splitlines()]
    assert sorted(s["role"] for s in written) == ["client", "server"]
    for s in written:
        a = s["attributes"]
        assert a["deeptrace.tls"] is True
        assert a["http.request.header.authorization"] == "[REDACTED]"
        assert a["url.query"] == "state=7&code=REDACTED"
        assert s["operation"] == "GET /login" and s["status"] == "200"


# -- front(HTTPS) -> back(HTTPS) -> Redis(TLS), through the agent ----------------------------
CHAIN_REQUESTS = 4


def _chain_kind(s, ports):
    """Which hop a span is, or None."""
    lp, rp, role = s["local_port"], s["remote_port"], s["role"]
    if s["protocol"] == "redis":
        return f"redis_{role}"
    if s["protocol"] != "http1":
        return None
    if role == "server":
        return {ports["front"]: "front_server", ports["back"]: "back_server"}.get(lp)
    return {ports["front"]: "load", ports["back"]: "front_client"}.get(rp)


PARENTS = {  # kind: (parent kind, link source)
    "front_server": ("load", "tcp_seq"),
    "front_client": ("front_server", "thread"),
    "back_server": ("front_client", "tcp_seq"),
    "redis_client": ("back_server", "thread"),
    "redis_server": ("redis_client", "tcp_seq"),
}


def test_chain_front_back_redis_over_tls_gives_whole_traces(certs, tmp_path):
    require_bpf()
    from deeptrace_core.agent import Agent
    from deeptrace_core.config import parse_config
    from deeptrace_core.plugins import PluginHost

    ports = {"front": free_port(), "back": free_port(), "redis": free_port()}
    out = tmp_path / "spans.jsonl"
    host = PluginHost().load_entry_points()
    registry = host.registry()
    text = f"""
agent: {{stats_interval: 60s}}
probes:
  trace:
    ports: [{ports['front']}, {ports['back']}, {ports['redis']}]
    protocols: [http1, http2, redis, tls]
    protocol_max_records: {{tls: 4}}
  tls: {{}}
processors:
  spans: {{}}
  traces: {{wait: 0.5s}}
exporters:
  jsonl: {{path: {out}}}
pipelines:
  main: {{probes: [trace, tls], processors: [spans, traces], exporters: [jsonl]}}
"""
    agent = Agent(parse_config(text, "chain.yaml", registry.schemas()), host, registry)
    agent.start()
    loop = threading.Thread(target=agent.run)
    loop.start()
    d = tmp_path / "redis"
    d.mkdir()
    procs = []
    try:
        procs.append(Server(["redis-server", "--port", "0", "--tls-port", str(ports["redis"]),
                             "--bind", "127.0.0.1", "--tls-cert-file", certs.crt,
                             "--tls-key-file", certs.key, "--tls-auth-clients", "no",
                             "--save", "", "--appendonly", "no", "--dir", str(d)],
                            ports["redis"]))
        procs.append(Server([sys.executable, PEERS, "back", str(ports["back"]), certs.crt,
                             certs.key, str(ports["redis"])], ports["back"], timeout=120))
        procs.append(Server([sys.executable, PEERS, "front", str(ports["front"]), certs.crt,
                             certs.key, str(ports["back"])], ports["front"], timeout=120))
        time.sleep(1.0)   # the rescan delay (README: TLS), for late-loaded libssl files
        ids = [f"r{i}x{os.getpid()}" for i in range(CHAIN_REQUESTS)]
        res = subprocess.run(python_client(ports["front"], *(f"/a/{i}" for i in ids)),
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        assert json.loads(res.stdout) == [200] * CHAIN_REQUESTS
        time.sleep(2.0)   # the linker's wait, and the spans stage's
    finally:
        for p in reversed(procs):
            p.stop()
        agent.stop()
        loop.join()
        agent.shutdown()
    spans = [json.loads(line) for line in out.read_text().splitlines()]
    spans = [s for s in spans if s.get("protocol") and _chain_kind(s, ports)]
    assert all(s["attributes"].get("deeptrace.tls") for s in spans)

    def request_id(s):
        if s["protocol"] == "redis":
            return s["attributes"]["db.query.text"].split()[1].removeprefix("dt:")
        return s["operation"].rsplit("/", 1)[1]

    assert {request_id(s) for s in spans} == set(ids)
    for rid in ids:
        mine = [s for s in spans if request_id(s) == rid]
        kinds = {}
        for s in mine:
            k = _chain_kind(s, ports)
            assert k not in kinds, f"{rid}: two {k} spans"
            kinds[k] = s
        assert sorted(kinds) == sorted(["load", *PARENTS]), (rid, sorted(kinds))
        assert len({s["trace_id"] for s in mine}) == 1, rid
        trace_id = mine[0]["trace_id"]
        assert [s for s in spans if s["trace_id"] == trace_id] == mine   # nothing foreign
        assert kinds["load"]["parent_span_id"] is None
        for kind, (parent, source) in PARENTS.items():
            assert kinds[kind]["parent_span_id"] == kinds[parent]["span_id"], (rid, kind)
            assert kinds[kind]["link_source"] == source, json.dumps([rid, kind, [
                [kinds[x][k] for k in ("pid", "tid", "start_ns", "end_ns")]
                + [kinds[x]["attributes"].get("deeptrace.thread_concurrent")]
                for x in (kind, parent)]])
        assert kinds["redis_server"]["operation"] == "GET"
        assert kinds["back_server"]["operation"] == f"GET /b/{rid}"
