"""The tls probe inside the agent, as config/agent.yaml runs it: compiled together with
the trace probe (kernel protocol detection on, TLS handshakes included), its records
through the spans and traces stages, spans out as JSON lines. A Python HTTPS client and
server: both ends' spans, the server's linked to the client's by tcp_seq, no span from
the ciphertext, and no L4 tls span for connections whose plaintext was read."""

import json
import os
import subprocess
import sys
import threading
import time

import pytest

from conftest import require_bpf
from deeptrace_core.agent import Agent
from deeptrace_core.config import parse_config
from deeptrace_core.plugins import PluginHost
from deeptrace_core.testing import Server, free_port

pytestmark = pytest.mark.bpf
PEERS = os.path.join(os.path.dirname(__file__), "tls_peers.py")


def test_agent_links_https_spans_across_processes(tmp_path):
    require_bpf()
    crt, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout",
                    key, "-out", crt, "-days", "2", "-subj", "/CN=localhost"],
                   check=True, capture_output=True)
    port = free_port()
    out = tmp_path / "spans.jsonl"
    host = PluginHost().load_entry_points()
    registry = host.registry()
    text = f"""
agent: {{stats_interval: 0.5s}}
probes:
  trace:
    ports: [{port}]
    protocols: [http1, http2, redis, mysql, postgresql, mongodb, dns, memcached, tls]
    protocol_payload_bytes: {{http2: 8192, tls: 2048}}
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
    agent = Agent(parse_config(text, "inline.yaml", registry.schemas()), host, registry)
    agent.start()
    # The agent polls all along, as it runs for real: processes that map libssl after it
    # started are found then (here, maybe no process on the machine had it mapped before).
    loop = threading.Thread(target=agent.run)
    loop.start()
    try:
        srv = Server([sys.executable, PEERS, "threaded", str(port), str(crt), str(key)], port,
                     timeout=120)  # slow machines: an emulated guest took over 30 s
        try:
            time.sleep(1.0)   # the rescan delay (README: TLS), for the client's libssl too
            res = subprocess.run([sys.executable, PEERS, "client", str(port), "/ok", "/missing"],
                                 capture_output=True, text=True, timeout=60)
            assert res.returncode == 0, res.stderr
            assert json.loads(res.stdout) == [200, 404]
            time.sleep(1.5)
        finally:
            srv.stop()
    finally:
        agent.stop()
        loop.join()
        stats = agent.probes["tls"].stats()
        agent.shutdown()
    spans = [json.loads(line) for line in out.read_text().splitlines()]
    spans = [s for s in spans if s.get("protocol") and port in (s["local_port"], s["remote_port"])]
    # The handshakes were detected in the kernel too, but their connections' plaintext
    # was read: no L4 tls span for them, only the HTTP ones.
    got = sorted((s["role"], s["operation"], s["status"]) for s in spans)
    assert got == [("client", "GET /missing", "404"), ("client", "GET /ok", "200"),
                   ("server", "GET /missing", "404"), ("server", "GET /ok", "200")]
    assert all(s["attributes"].get("deeptrace.tls") for s in spans)
    by_id = {s["span_id"]: s for s in spans}
    for server in (s for s in spans if s["role"] == "server"):
        parent = by_id[server["parent_span_id"]]
        assert server["link_source"] == "tcp_seq"
        assert (parent["role"], parent["operation"]) == ("client", server["operation"])
        assert parent["trace_id"] == server["trace_id"]
    assert stats["files_attached"] >= 1 and stats["mapped_nested"] >= 4
    assert agent.processors["spans"].counts["tls"]["handshakes_decrypted"] == 4
