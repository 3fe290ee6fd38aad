"""The L4 `tls` span of a connection whose plaintext is not read (no tls probe here, as
for a program without SSL_* symbols): the trace probe detects the hellos in the kernel
and sends at most `protocol_max_records` records of each connection; the spans stage
gives one span per end with the server name, version and cipher, linked by tcp_seq."""

import os
import subprocess
import sys
import time
import types

import pytest

import deeptrace_plugins.protocols.stage as stage_mod
from conftest import require_bpf, start_probe
from deeptrace_core.plugins import PluginHost
from deeptrace_core.testing import Server, free_port
from deeptrace_plugins.protocols.stage import SpansConfig, SpanStage

pytestmark = pytest.mark.bpf
HERE = os.path.dirname(__file__)
PEERS = os.path.join(HERE, "tls_peers.py")
CLIENT = """
import json, socket, ssl, sys
ctx = ssl.create_default_context(); ctx.check_hostname = False; ctx.verify_mode = ssl.CERT_NONE
for i in range(2):
    with socket.create_connection(('127.0.0.1', int(sys.argv[1]))) as raw:
        with ctx.wrap_socket(raw, server_hostname='api.example.test') as s:
            s.sendall(b'GET /ok HTTP/1.1\\r\\nHost: api.example.test\\r\\n'
                      b'Connection: close\\r\\n\\r\\n')
            while s.recv(65536):
                pass
print(json.dumps({"ok": True}), flush=True)
"""


def test_handshake_spans_with_server_name_and_version(tmp_path, monkeypatch):
    require_bpf()
    crt, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout",
                    key, "-out", crt, "-days", "2", "-subj", "/CN=localhost"],
                   check=True, capture_output=True)
    registry = PluginHost().load_entry_points().registry()
    context = types.SimpleNamespace(registry=registry)
    port = free_port()
    probe = start_probe(context=context, ports=[port], protocols=["http1", "tls"],
                        protocol_max_records={"tls": 4}, payload_bytes=2048)
    monkeypatch.setattr(stage_mod, "TLS_WAIT", 0.5)
    stage = SpanStage(SpansConfig(), context)
    spans, records = [], []
    try:
        srv = Server([sys.executable, PEERS, "threaded", str(port), str(crt), str(key)], port,
                     timeout=120)  # slow machines: an emulated guest took over 30 s
        try:
            out = subprocess.run([sys.executable, "-c", CLIENT, str(port)], capture_output=True,
                                 text=True, timeout=60)
            assert out.returncode == 0, out.stderr
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and len(spans) < 4:
                recs = probe.poll(20)
                records += recs
                spans += stage.process(recs)
            time.sleep(0.6)
            spans += stage.process(probe.poll(20))
        finally:
            srv.stop()
    finally:
        probe.detach()
    spans = [s for s in spans if port in (s.local_port, s.remote_port)]
    got = sorted((s.protocol, s.role, s.operation, s.status) for s in spans)
    assert got == [("tls", "client", "handshake api.example.test", "TLSv1.3")] * 2 + \
        [("tls", "server", "handshake api.example.test", "TLSv1.3")] * 2
    for s in spans:
        assert s.attributes["tls.client.server_name"] == "api.example.test"
        assert s.attributes["tls.protocol.version"] == "1.3"
        assert s.attributes["tls.cipher"].startswith("TLS_")
        assert s.request_seq is not None
    # Both ends of each handshake agree on the ClientHello's position: linked by tcp_seq.
    assert sorted((s.local_port, s.request_seq[0]) for s in spans if s.role == "client") == \
        sorted((s.remote_port, s.request_seq[0]) for s in spans if s.role == "server")
    # The kernel sent each end's hellos (a record's header and body may come in two
    # reads), at most 4 records, and none of the ciphertext after them.
    per_conn = {}
    for r in records:
        if r.direction != "none":
            per_conn[(r.pid, r.conn_id)] = per_conn.get((r.pid, r.conn_id), 0) + 1
    assert len(per_conn) == 4 and max(per_conn.values()) <= 4, per_conn
    assert not any(r.payload.startswith(b"\x17\x03\x03") and r.bytes > 100 for r in records)
    assert all(r.protocol == "tls" for r in records if r.direction != "none")
    # Besides them, each client connection's connect() (before any byte tells a protocol:
    # an event loop's new connection is attributed by its time).
    ctl = [r for r in records if r.direction == "none" and r.syscall != "close"]
    assert sorted((r.syscall, r.remote_port) for r in ctl) == [("connect", port)] * 2, ctl
