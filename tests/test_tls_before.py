"""Processes, and a TLS connection, that existed before the tls probe started: the
server and client started and the connection's handshake and first request happened
before the probe attached; the next requests on the same keep-alive connection give
spans (the nested socket call maps the SSL* it never saw set up).

A call already in progress when the probe attaches is not seen (its uretprobe is set at
entry): the server, blocked in SSL_read on the idle connection, misses the request that
read returns, and sees the one after it."""

import json
import os
import subprocess
import sys
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
PEERS = os.path.join(os.path.dirname(__file__), "tls_peers.py")
CLIENT = """
import http.client, json, ssl, sys
ctx = ssl.create_default_context(); ctx.check_hostname = False; ctx.verify_mode = ssl.CERT_NONE
c = http.client.HTTPSConnection('127.0.0.1', int(sys.argv[1]), context=ctx)
for i, path in enumerate(('/ok', '/missing', '/again')):
    c.request('GET', path); r = c.getresponse(); r.read()
    print(json.dumps(r.status), flush=True)
    if i == 0:
        sys.stdin.readline()   # the probe attaches after the first request
"""


def test_connection_established_before_the_probe(tmp_path):
    require_bpf()
    crt, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout",
                    key, "-out", crt, "-days", "2", "-subj", "/CN=localhost"],
                   check=True, capture_output=True)
    port = free_port()
    srv = Server([sys.executable, PEERS, "threaded", str(port), str(crt), str(key)], port,
                     timeout=120)  # slow machines: an emulated guest took over 30 s
    client = subprocess.Popen([sys.executable, "-c", CLIENT, str(port)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    trace = probe = None
    try:
        assert json.loads(client.stdout.readline()) == 200   # before the probe
        registry = PluginHost().load_entry_points().registry()
        context = types.SimpleNamespace(registry=registry)
        trace = start_probe(context=context, ports=[port], payload_bytes=64)
        probe = TlsProbe(TlsConfig())
        probe.attach(kernel_defines(probe.kernel_fields))
        client.stdin.write("go\n")
        client.stdin.flush()
        assert json.loads(client.stdout.readline()) == 404
        assert json.loads(client.stdout.readline()) == 200
        stage = SpanStage(SpansConfig(), context)
        spans, cipher = [], []
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and len(spans) < 3:
            recs = trace.poll(10)
            cipher += [r for r in recs if r.direction != "none"]
            spans += stage.process(recs + [r for r in probe.poll(10)
                                           if port in (r.local_port, r.remote_port)])
        stats = probe.stats()
    finally:
        client.stdin.close()
        stop_process(client)
        srv.stop()
        for p in (probe, trace):
            if p is not None:
                p.detach()
    spans = [s for s in spans if port in (s.local_port, s.remote_port)]
    assert sorted((s.role, s.operation, s.status, s.pid) for s in spans) == sorted([
        ("client", "GET /missing", "404", client.pid), ("client", "GET /again", "200", client.pid),
        ("server", "GET /again", "200", srv.pid)])
    client_span = [s for s in spans if s.role == "client" and s.status == "200"][0]
    server_span = [s for s in spans if s.role == "server"][0]
    assert client_span.request_seq[0] == server_span.request_seq[0]
    assert client_span.request_seq[0] in [r.tcp_seq_start for r in cipher
                                          if r.pid == client.pid and r.direction == "egress"]
    assert stats["mapped_nested"] >= 2
