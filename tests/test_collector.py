"""The collector end to end, without the kernel: real OTLP exporters (the agents' own,
over gRPC and HTTP) -> the collector's receivers -> chdb -> stitcher -> JSON API ->
`deeptrace traces --collector URL`. Also: a refused write is retried by the agent and
nothing is lost; config errors name file, line and key; config/collector.yaml runs."""

import json
import os
import random
import subprocess
import sys
import time
import urllib.request

import pytest

from deeptrace_core import cli
from deeptrace_core.collector.config import parse
from deeptrace_core.collector.main import Collector
from deeptrace_core.config import ConfigError
from deeptrace_plugins.exporters.otlp import OtlpConfig, OtlpExporter
from test_collector_stitch import World

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def collector_config(tmp_path, **stitcher):
    text = f"""
receivers:
  otlp: {{grpc: "127.0.0.1:0", http: "127.0.0.1:0"}}
api: {{address: "127.0.0.1:0"}}
storage: {{path: "{tmp_path}/data"}}
stitcher: {{interval: 200ms, window: 1h, nat_hold: 0s}}
"""
    return parse(text, "collector.yaml")


@pytest.fixture
def collector(tmp_path):
    c = Collector(collector_config(tmp_path)).start()
    yield c
    c.stop()


def get(c, path):
    with urllib.request.urlopen(f"http://127.0.0.1:{c.ports['api']}{path}", timeout=30) as r:
        return json.loads(r.read())


def wait(pred, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(0.2)
    return pred()


def test_agents_to_collector_to_cli(collector, capsys):
    rnd = random.Random(3)
    world = World(40, rnd)
    # Three agents: A over gRPC, B and C over HTTP/protobuf, each with its host.name.
    exporters = []
    for host, proto in (("A", "grpc"), ("B", "http/protobuf"), ("C", "http/protobuf")):
        port = collector.ports["grpc" if proto == "grpc" else "http"]
        endpoint = f"127.0.0.1:{port}" if proto == "grpc" else f"http://127.0.0.1:{port}"
        exp = OtlpExporter(OtlpConfig(protocol=proto, endpoint=endpoint, red_metrics=False,
                                      resource={"host.name": f"host-{host}"}))
        exp.export(world.spans[host])
        exporters.append(exp)
    for exp in exporters:
        assert exp.flush(20)
        st = exp.stats()
        assert (st["sent_spans"], st["failed_spans"], st["dropped_spans"]) == \
            (len(world.spans[{0: "A", 1: "B", 2: "C"}[exporters.index(exp)]]), 0, 0)
        exp.shutdown()
    assert wait(lambda: get(collector, "/api/stats")["stitcher"].get("stitched_tcp_seq", 0)
                >= 120) 
    traces = get(collector, "/api/traces?limit=100")
    assert len(traces) == 40 and {t["spans"] for t in traces} == {7}
    one = get(collector, f"/api/traces/{traces[0]['trace_id'][:12]}")
    spans = {s["span_id"]: s for s in one["spans"]}
    for server, client in world.truth.items():
        if server in spans:
            assert spans[server]["parent_span_id"] == client
            assert spans[server]["link_source"] == "tcp_seq"
    assert {s["host"] for s in one["spans"]} == {"host-A", "host-B", "host-C"}
    assert get(collector, "/api/services") == ["api", "front", "postgres", "redis-server"]
    edges = {(e["source"], e["target"]): e for e in get(collector, f"/api/map?since_ns={10**19}")}
    assert set(edges) == {("front", "api"), ("api", "redis-server"), ("api", "postgres")}
    assert edges["front", "api"]["calls"] == 40 and edges["api", "postgres"]["errors"] == 0

    url = f"http://127.0.0.1:{collector.ports['api']}"
    assert cli.main(["traces", "--collector", url, "--limit", "5"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 6 and "front GET /order" in out[1] and "    7  " in out[1]
    assert cli.main(["traces", "show", traces[0]["trace_id"], "--collector", url]) == 0
    tree = capsys.readouterr().out
    for name in ("front", "api", "redis-server", "postgres"):
        assert name in tree
    assert cli.main(["traces", "show", "ffff0000", "--collector", url]) == 1
    assert "no trace ffff0000" in capsys.readouterr().err


def test_a_refused_write_is_retried_and_nothing_is_lost(collector):
    calls = {"n": 0}
    real = collector.sink.store.insert_otlp

    def flaky(payloads):
        calls["n"] += 1
        if calls["n"] <= 2:
            raise OSError("disk full")
        return real(payloads)

    collector.sink.store.insert_otlp = flaky
    world = World(5, random.Random(1))
    exp = OtlpExporter(OtlpConfig(endpoint=f"127.0.0.1:{collector.ports['grpc']}",
                                  red_metrics=False, retry_initial_backoff=0.05, max_retries=5))
    exp.export(world.spans["A"])
    assert exp.flush(20)
    st = exp.stats()
    exp.shutdown()
    assert (st["sent_spans"], st["failed_spans"], st["dropped_spans"]) == (10, 0, 0)
    assert collector.sink.counts["failed_requests"] >= 1
    assert collector.sink.counts["spans"] == 10


def test_collector_config_errors_and_the_shipped_file(tmp_path):
    with pytest.raises(ConfigError) as e:
        parse("storage:\n  engine: sqlite\n", "collector.yaml")
    assert str(e.value).startswith("collector.yaml:2: storage.engine:") and "chdb" in str(e.value)
    with pytest.raises(ConfigError) as e:
        parse("stitcher:\n  window: .inf\n", "collector.yaml")
    assert "collector.yaml:2: stitcher.window" in str(e.value)
    with pytest.raises(ConfigError) as e:
        parse("api:\n  adress: x\n", "collector.yaml")
    assert "unknown key 'adress'" in str(e.value)
    # The shipped file reads its addresses and folder from the environment.
    env = {"DEEPTRACE_OTLP_GRPC": "127.0.0.1:0", "DEEPTRACE_OTLP_HTTP": "127.0.0.1:0",
           "DEEPTRACE_API": "127.0.0.1:0", "DEEPTRACE_DATA": str(tmp_path / "d")}
    with open(os.path.join(ROOT, "config", "collector.yaml")) as f:
        cfg = parse(f.read(), "config/collector.yaml", env)
    assert cfg.storage.path == str(tmp_path / "d") and cfg.api.address == "127.0.0.1:0"
    assert parse(open(os.path.join(ROOT, "config", "collector.yaml")).read(),
                 "c.yaml", {}).api.address.startswith("127.0.0.1:")
    # `deeptrace collector` runs it and stops on SIGTERM.
    proc = subprocess.Popen([sys.executable, "-m", "deeptrace_core.cli", "collector", "--config",
                             os.path.join(ROOT, "config", "collector.yaml")],
                            env={**os.environ, **env}, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        line = proc.stderr.readline()
        assert "deeptrace collector: running" in line, line
    finally:
        proc.terminate()
        err = proc.communicate(timeout=60)[1]
    assert proc.returncode == 0 and "deeptrace collector final:" in err


def test_stitched_traces_are_re_exported_downstream(tmp_path):
    """export.otlp: once settled, spans go to a downstream OTLP backend with their
    canonical trace ids and stitched parents, each once."""
    from test_otlp_exporter import GrpcReceiver
    down = GrpcReceiver().start()
    up_cfg = collector_config(tmp_path)
    up_cfg.export.otlp.endpoint = down.endpoint
    up_cfg.export.otlp.settle = 1.0
    up_cfg.export.otlp.interval = 0.3
    up = Collector(up_cfg).start()
    try:
        world = World(20, random.Random(9), t0=time.time_ns() + 10**9)   # C: 0.5 s early
        for host in "ABC":
            exp = OtlpExporter(OtlpConfig(endpoint=f"127.0.0.1:{up.ports['grpc']}",
                                          red_metrics=False))
            exp.export(world.spans[host])
            assert exp.flush(20)
            exp.shutdown()
        assert wait(lambda: len(down.spans()) >= 140, timeout=40), len(down.spans())
        time.sleep(1)                                 # nothing is sent twice
        spans = [s for _, s in down.spans()]
        assert len(spans) == 140
        traces = {}
        for s in spans:
            traces.setdefault(s.trace_id.hex(), []).append(s)
        assert len(traces) == 20 and {len(v) for v in traces.values()} == {7}
        parents = {s.span_id.hex(): s.parent_span_id.hex() for s in spans}
        for server, client in world.truth.items():
            assert parents[server] == client
        assert up.stats()["export"]["spans_sent"] == 140
    finally:
        up.stop()
        down.stop()
