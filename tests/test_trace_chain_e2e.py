"""Distributed traces end to end, across "hosts": a load client, service A (HTTP,
thread-per-request), service B (HTTP, thread-per-request) which calls Redis and
PostgreSQL, each in its own network namespace with its own address (bench/topology.py).
The real agent (in this process: it never traces itself, and every service is its own
process) runs trace -> [spans, traces] -> jsonl; each request must come out as exactly
one trace, span by span:

    load client  GET /a/<id>   client  root (no traceparent) | id = the header's parent id
    A            GET /a/<id>   server  <- load client span    tcp_seq | traceparent
    A            GET /b/<id>   client  <- A server span       thread
    B            GET /b/<id>   server  <- A client span       tcp_seq
    B            GET dt:<id>   client  <- B server span       thread   (Redis)
    B            SET dt:<id>   client  <- B server span       thread   (Redis)
    B            SELECT ...    client  <- B server span       thread   (PostgreSQL)
    redis-server GET / SET     server  <- B's Redis client spans   tcp_seq
    postgres     SELECT        server  <- B's PostgreSQL client span tcp_seq

The load client is traced too (the agent selects by port, and it talks to A's port), so
the root of each trace is its span. Ground truth (which request caused which call, and
the addresses of every socket used) comes from the services' own logs.
"""

import json
import os
import sys
import threading
import time
import types

import pytest

from conftest import require_bpf

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from bench.topology import COMMS, KINDS, PARENT, Topology, classify  # noqa: E402

pytestmark = pytest.mark.bpf
REQUESTS, CLIENTS = 6, 3

SOURCE = {"a_client": "thread", "b_server": "tcp_seq", "redis_get_client": "thread",
          "redis_set_client": "thread", "pg_client": "thread", "redis_get_server": "tcp_seq",
          "redis_set_server": "tcp_seq", "pg_server": "tcp_seq"}


@pytest.fixture(scope="module")
def chain():
    require_bpf()
    from deeptrace_core.agent import Agent
    from deeptrace_core.config import parse_config
    from deeptrace_core.plugins import PluginHost

    with Topology(pool=4) as topo:
        out = os.path.join(topo.workdir, "spans.jsonl")
        host = PluginHost().load_entry_points()
        registry = host.registry()
        config = parse_config(topo.agent_yaml(out, wait=0.5, stats_interval=60),
                              "chain.yaml", registry.schemas())
        agent = Agent(config, host, registry)
        agent.start()
        runner = threading.Thread(target=agent.run, daemon=True)
        try:
            runner.start()
            tags = {False: topo.run_load(REQUESTS, CLIENTS)["tag"],
                    True: topo.run_load(REQUESTS, CLIENTS, traceparent=True)["tag"]}
            time.sleep(0.3)
        finally:
            agent.stop()
            runner.join(10)
            stats = agent.stats()
            agent.shutdown()  # drains the probe, flushes the linker, closes the file
        with open(out) as f:
            spans = [json.loads(line) for line in f if line.strip()]
        yield types.SimpleNamespace(topo=topo, spans=spans, truth=topo.ground_truth(),
                                    tags=tags, stats=stats)


def _addr(span, side):
    a = span[f"{side}_addr"]
    return f"{a[7:] if a.startswith('::ffff:') else a}:{span[f'{side}_port']}"


def _requests(chain, traceparent):
    tag = chain.tags[traceparent]
    load = [r for r in chain.truth["load"] if r["id"].startswith(f"{tag}n")]
    assert len(load) == REQUESTS and all(r.get("status") == 200 for r in load), load
    return load


def _spans_of(chain, rid):
    got = {}
    for s in chain.spans:
        r, kind = classify(s)
        if r == rid:
            assert kind is not None, f"{rid}: a span of no known kind: {s}"
            assert kind not in got, f"{rid}: two {kind} spans:\n{got[kind]}\n{s}"
            got[kind] = s
    return got


@pytest.mark.parametrize("traceparent", [False, True], ids=["no-header", "traceparent"])
def test_every_request_is_one_trace_span_by_span(chain, traceparent):
    topo = chain.topo
    a_log = {r["id"]: r for r in chain.truth["a"]}
    b_log = {r["id"]: r for r in chain.truth["b"]}
    addr = topo.addr
    for req in _requests(chain, traceparent):
        rid = req["id"]
        a, b = a_log[rid], b_log[rid]
        (a_call,) = a["calls"]
        r_get, r_set, pg_call = b["calls"]
        s = _spans_of(chain, rid)
        assert sorted(s) == sorted(KINDS), f"{rid}: spans {sorted(s)}"

        # one trace, nothing else in it
        trace_ids = {x["trace_id"] for x in s.values()}
        assert len(trace_ids) == 1, f"{rid}: several traces {trace_ids}"
        trace_id = trace_ids.pop()
        others = [x for x in chain.spans if x["trace_id"] == trace_id
                  and x["span_id"] not in {y["span_id"] for y in s.values()}]
        assert not others, f"{rid}: foreign spans in its trace: {others}"

        # the root, and every parent exactly the right span, by the right means
        root = s["load"]
        assert root["parent_span_id"] is None
        if traceparent:
            _, tp_trace, tp_parent, _ = req["traceparent"].split("-")
            assert trace_id == tp_trace
            assert root["span_id"] == tp_parent  # the client propagates its own id
            assert s["a_server"]["parent_span_id"] == tp_parent
            assert s["a_server"]["link_source"] == "traceparent"
        else:
            assert root["link_source"] is None
            assert s["a_server"]["parent_span_id"] == root["span_id"]
            assert s["a_server"]["link_source"] == "tcp_seq"
        for kind, source in SOURCE.items():
            parent = s[PARENT[kind]]
            assert s[kind]["parent_span_id"] == parent["span_id"], \
                f"{rid}: {kind}'s parent is not {PARENT[kind]}"
            assert s[kind]["link_source"] == source, f"{rid}: {kind}"

        # kinds, operations, attributes
        http = {"load": ("client", f"/a/{rid}"), "a_server": ("server", f"/a/{rid}"),
                "a_client": ("client", f"/b/{rid}"), "b_server": ("server", f"/b/{rid}")}
        for kind, (role, path) in http.items():
            x = s[kind]
            assert (x["protocol"], x["role"], x["operation"], x["status"], x["error"]) == \
                ("http1", role, f"GET {path}", "200", False), f"{rid}: {kind}"
            assert x["attributes"]["url.path"] == path
            assert x["attributes"]["http.request.method"] == "GET"
        if traceparent:
            for kind in ("load", "a_server"):
                assert s[kind]["attributes"]["http.request.header.traceparent"] == \
                    req["traceparent"]
        for kind in ("redis_get_client", "redis_get_server", "redis_set_client",
                     "redis_set_server"):
            x, op = s[kind], kind.split("_")[1].upper()
            assert (x["protocol"], x["role"], x["operation"], x["error"]) == \
                ("redis", kind.rsplit("_", 1)[1], op, False), f"{rid}: {kind}"
            assert x["attributes"]["db.system"] == "redis"
            assert x["attributes"]["db.query.text"].split()[:2] == [op, f"dt:{rid}"]
        for kind in ("pg_client", "pg_server"):
            x = s[kind]
            assert (x["protocol"], x["role"], x["operation"], x["error"]) == \
                ("postgresql", kind.split("_")[1], "SELECT", False), f"{rid}: {kind}"
            assert x["attributes"]["db.system"] == "postgresql"
            assert x["attributes"]["db.query.text"] == pg_call["sql"]

        # addresses: the right namespaces, and exactly the sockets the services used
        ends = {  # kind: (local, remote) as "ip:port"
            "load": (req["local"], req["remote"]),
            "a_server": (a["local"], a["peer"]),
            "a_client": (a_call["local"], a_call["remote"]),
            "b_server": (b["local"], b["peer"]),
            "redis_get_client": (r_get["local"], r_get["remote"]),
            "redis_set_client": (r_set["local"], r_set["remote"]),
            "pg_client": (pg_call["local"], pg_call["remote"]),
            "redis_get_server": (r_get["remote"], r_get["local"]),
            "redis_set_server": (r_set["remote"], r_set["local"]),
            "pg_server": (pg_call["remote"], pg_call["local"]),
        }
        hosts = {"load": ("client", "a"), "a_server": ("a", "client"), "a_client": ("a", "b"),
                 "b_server": ("b", "a")}
        hosts.update({k: ("b", "db") for k in ("redis_get_client", "redis_set_client",
                                                "pg_client")})
        hosts.update({k: ("db", "b") for k in ("redis_get_server", "redis_set_server",
                                                "pg_server")})
        for kind, (local, remote) in ends.items():
            x = s[kind]
            assert (_addr(x, "local"), _addr(x, "remote")) == (local, remote), \
                f"{rid}: {kind}"
            lh, rh = hosts[kind]
            assert local.split(":")[0] == addr[lh] and remote.split(":")[0] == addr[rh]
            assert (x["l4"], x["family"]) == ("tcp", "ipv4")
        assert _addr(s["a_server"], "local") == f"{addr['a']}:{topo.ports['a']}"
        assert _addr(s["b_server"], "local") == f"{addr['b']}:{topo.ports['b']}"
        assert _addr(s["redis_get_server"], "local") == f"{addr['db']}:{topo.ports['redis']}"
        assert _addr(s["pg_server"], "local") == f"{addr['db']}:{topo.ports['postgres']}"

        # processes and threads
        assert s["load"]["comm"] == COMMS["load"]
        for kind in ("a_server", "a_client"):
            assert (s[kind]["pid"], s[kind]["tid"], s[kind]["comm"]) == \
                (topo.pids["a"], a["tid"], COMMS["a"]), f"{rid}: {kind}"
        for kind in ("b_server", "redis_get_client", "redis_set_client", "pg_client"):
            assert (s[kind]["pid"], s[kind]["tid"], s[kind]["comm"]) == \
                (topo.pids["b"], b["tid"], COMMS["b"]), f"{rid}: {kind}"
        for kind in ("redis_get_server", "redis_set_server"):
            assert s[kind]["pid"] == topo.pids["redis"]
            assert s[kind]["comm"].startswith("redis-server")
        assert s["pg_server"]["comm"] == "postgres"
        assert s["pg_server"]["pid"] != topo.pids["postgres"]  # a backend, not postmaster

        # time: every child inside its parent
        for kind in SOURCE:
            c, p = s[kind], s[PARENT[kind]]
            assert p["start_ns"] - 1_000_000 <= c["start_ns"] <= c["end_ns"] <= \
                p["end_ns"] + 1_000_000, f"{rid}: {kind} outside {PARENT[kind]}"


def test_nothing_lost_and_nothing_else_traced(chain):
    probe = chain.stats["probe.trace"]
    lost = {k: v for k, v in probe.items()
            if k in ("ringbuf_full", "inflight_alloc_failed", "conn_map_full", "read_failed",
                     "decode_failed") and v}
    assert not lost, lost
    # every span is one of the requests' (no set-up traffic, nothing from elsewhere)
    unknown = [s for s in chain.spans if classify(s)[1] is None]
    assert not unknown, unknown
    mine = [s for s in chain.spans
            if classify(s)[0].startswith((chain.tags[False], chain.tags[True]))]
    assert len(mine) == 2 * REQUESTS * len(KINDS)
