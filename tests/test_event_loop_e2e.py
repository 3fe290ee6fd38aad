"""The event-loop rule end to end: a real Node.js ``http`` server as service A (one
thread serving every request, bench/node_a.js) calls B twice per request with
Promise.all over a keep-alive agent; B (thread-per-request) calls Redis and PostgreSQL;
each in its own network namespace (bench/topology.py). The real agent runs
trace -> [spans, traces] -> jsonl, once with protocols detected in the stage and once in
the kernel (the default config); either way the probe sends connect() records: A's first
calls on its new connections are written after the loop has read other requests, and
only the connect time says whose they are.

Every call A makes must be linked to the request that made it, by the order of the
loop's calls (``event_loop``), and B's side stays exact (``tcp_seq``, ``thread``).
Ground truth comes from the services' own logs.
"""

import json
import os
import shutil
import sys
import threading
import time
import types

import pytest

from conftest import CI, require_bpf

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from bench.topology import COMMS, PARENT, Topology, classify  # noqa: E402

pytestmark = pytest.mark.bpf
REQUESTS, CLIENTS = 48, 8
NODE_KINDS = ("load", "a_server", "a_client", "a_client_c", "b_server", "c_server",
              "redis_get_client", "redis_set_client", "pg_client", "redis_get_server",
              "redis_set_server", "pg_server")
SOURCE = {"a_server": "tcp_seq", "a_client": "event_loop", "a_client_c": "event_loop",
          "b_server": "tcp_seq", "c_server": "tcp_seq", "redis_get_client": "thread",
          "redis_set_client": "thread", "pg_client": "thread",
          "redis_get_server": "tcp_seq", "redis_set_server": "tcp_seq",
          "pg_server": "tcp_seq"}


@pytest.fixture(scope="module", params=[False, True], ids=["stage-l7", "kernel-l7"])
def node_chain(request):
    require_bpf()
    if shutil.which("node") is None:
        msg = "node (Node.js) is not installed"
        if CI:
            pytest.fail(msg)
        pytest.skip(msg)
    from deeptrace_core.agent import Agent
    from deeptrace_core.config import parse_config
    from deeptrace_core.plugins import PluginHost

    with Topology(front="node-all", pool=4) as topo:
        out = os.path.join(topo.workdir, "spans.jsonl")
        host = PluginHost().load_entry_points()
        registry = host.registry()
        config = parse_config(topo.agent_yaml(out, wait=0.5, stats_interval=60,
                                              kernel_l7=request.param),
                              "node.yaml", registry.schemas())
        agent = Agent(config, host, registry)
        agent.start()
        runner = threading.Thread(target=agent.run, daemon=True)
        try:
            runner.start()
            tag = topo.run_load(REQUESTS, CLIENTS)["tag"]
            time.sleep(0.3)
        finally:
            agent.stop()
            runner.join(10)
            stats = agent.stats()
            agent.shutdown()  # drains the probe, flushes the linker, closes the file
        with open(out) as f:
            spans = [json.loads(line) for line in f if line.strip()]
        yield types.SimpleNamespace(topo=topo, spans=spans, truth=topo.ground_truth(),
                                    tag=tag, stats=stats)


def _by_request(chain):
    got = {}
    for s in chain.spans:
        rid, kind = classify(s)
        if rid is None or not rid.startswith(chain.tag):
            continue
        assert kind is not None, s
        assert kind not in got.setdefault(rid, {}), f"{rid}: two {kind} spans"
        got[rid][kind] = s
    return got


def _local(span):
    a = span["local_addr"]
    return f"{a[7:] if a.startswith('::ffff:') else a}:{span['local_port']}"


def test_every_call_of_the_node_loop_is_linked_to_its_request(node_chain):
    lost = {k: v for k, v in node_chain.stats["probe.trace"].items()
            if k in ("ringbuf_full", "inflight_alloc_failed", "conn_map_full",
                     "read_failed", "decode_failed") and v}
    assert not lost, lost
    a_log = {r["id"]: r for r in node_chain.truth["a"]}
    load = [r for r in node_chain.truth["load"] if r["id"].startswith(f"{node_chain.tag}n")]
    assert len(load) == REQUESTS and all(r.get("status") == 200 for r in load)
    spans = _by_request(node_chain)
    pid_a = node_chain.topo.pids["a"]
    for req in load:
        rid = req["id"]
        s = spans.get(rid, {})
        assert sorted(s) == sorted(NODE_KINDS), f"{rid}: spans {sorted(s)}"
        assert len({x["trace_id"] for x in s.values()}) == 1, f"{rid}: several traces"
        for kind, source in SOURCE.items():
            assert s[kind]["parent_span_id"] == s[PARENT[kind]]["span_id"], \
                f"{rid}: {kind}'s parent is not {PARENT[kind]} ({s[kind]['link_source']})"
            assert s[kind]["link_source"] == source, f"{rid}: {kind}"
        # A's calls are the Node loop's, on the sockets A's own log names
        calls = {c["op"]: c["local"] for c in a_log[rid]["calls"]}
        for kind, path in (("a_client", f"/b/{rid}"), ("a_client_c", f"/c/{rid}")):
            x = s[kind]
            assert (x["pid"], x["comm"]) == (pid_a, COMMS["a-node"])
            assert x["tid"] == s["a_server"]["tid"] == pid_a  # the loop: Node's main thread
            assert x["attributes"].get("deeptrace.thread_concurrent") is True
            assert _local(x) == calls[f"GET {path}"]


def test_new_connections_are_attributed_by_their_connect_time(node_chain):
    """The agent pool opened connections while requests were interleaved on the loop:
    the first call on each carries the connect time, which lies inside its request and
    before the call; later calls on the connection carry none."""
    spans = _by_request(node_chain)
    first = {}
    for s in spans.values():
        for kind in ("a_client", "a_client_c"):
            x = s[kind]
            first.setdefault(_local(x), []).append(x)
    fresh = [x for x in (min(v, key=lambda y: y["start_ns"]) for v in first.values())]
    assert len(first) >= 2, "the pool opened fewer than 2 connections"
    for x in fresh:
        t = x["attributes"].get("deeptrace.connect_ns")
        assert t is not None, f"first call on {_local(x)} has no connect time"
        parent = next(s["a_server"] for s in spans.values()
                      if s["a_server"]["span_id"] == x["parent_span_id"])
        assert parent["start_ns"] <= t <= x["start_ns"]
    with_connect = sum("deeptrace.connect_ns" in x["attributes"]
                       for v in first.values() for x in v)
    assert with_connect == len(first)
    # the loop thread was learned from the stage's mark (taken before the final flush)
    assert node_chain.stats["processor.traces"]["event_loop_threads"] >= 1
