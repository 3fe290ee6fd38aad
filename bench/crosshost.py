"""Traces across hosts (run as root): the namespace topology of ``bench.topology`` as four
"hosts" (load client, A, B, database), each with its own agent confined to its network
namespace (``probes.trace.netns``) and exporting over OTLP to one collector, which
stitches the hosts' halves of each request. Scored against the services' own logs
with ``bench.accuracy.analyze``, on the collector's stitched traces.

    python -m bench.crosshost [--requests 2000] [--clients 16] [--front threads|asyncio]

Prints the figures and writes ``bench/results/crosshost-<front>.json``: whole traces
stitched across hosts, parent links, spans lost (agents' kernel losses and exporter
drops), whether each agent saw only its own host, the stitcher's counters and its delay.
"""

import argparse
import json
import os
import platform
import tempfile
import time

from bench.accuracy import REPORTED_LOSS, AgentProcess, analyze
from bench.agent import parse_counters
from bench.topology import Topology

HERE = os.path.dirname(os.path.abspath(__file__))
HOSTS = ("client", "a", "b", "db")


def agent_yaml(topo, role, otlp_port, wait=2.0):
    ports = ", ".join(str(p) for p in topo.ports.values())
    return f"""\
agent:
  stats_interval: 5s
probes:
  trace:
    netns: [{topo.ns[role]}]
    ports: [{ports}]
    protocols: [http1, redis, postgresql]
    payload_bytes: 512
    ringbuf_pages: 1024
processors:
  spans:
    protocols: [http1, redis, postgresql]
  traces:
    wait: {wait}s
exporters:
  otlp:
    endpoint: 127.0.0.1:{otlp_port}
    resource: {{host.name: {role}}}
    queue_size: 200000
    red_metrics: false
pipelines:
  main:
    probes: [trace]
    processors: [spans, traces]
    exporters: [otlp]
"""


def collector_yaml(path):
    return f"""\
receivers:
  otlp: {{grpc: "127.0.0.1:0", http: ""}}
api: {{address: "127.0.0.1:0"}}
storage: {{path: "{path}"}}
stitcher: {{interval: 1s, window: 1h}}
"""


def stitched_spans(collector) -> list:
    """Every span as the collector stitched it, in the shape bench.accuracy scores."""
    rows = collector.store.rows("""
SELECT TraceId AS trace_id, SpanId AS span_id, ParentSpanId AS parent_span_id,
       SpanAttributes['deeptrace.protocol'] AS protocol, lower(SpanKind) AS role,
       SpanName AS operation, SpanAttributes AS attributes,
       ResourceAttributes['host.name'] AS host,
       SpanAttributes['network.local.address'] AS local_addr,
       toUInt16OrZero(SpanAttributes['network.local.port']) AS local_port,
       SpanAttributes['network.peer.address'] AS remote_addr,
       toUInt16OrZero(SpanAttributes['network.peer.port']) AS remote_port,
       SpanAttributes['deeptrace.link_source'] AS link_source, SpanId IN
         (SELECT SpanId FROM otel.deeptrace_parent_map) AS stitched
FROM otel.otel_traces_stitched""")
    for r in rows:
        r["parent_span_id"] = r["parent_span_id"] or None
        r["link_source"] = "collector" if r.pop("stitched") else (r["link_source"] or None)
    return rows


def own_host_only(spans, topo) -> dict:
    """Spans whose agent (host.name) is not the host the span's local address belongs to."""
    addr_host = {topo.addr[h]: h for h in HOSTS}
    wrong = {}
    for s in spans:
        local = s["local_addr"][7:] if s["local_addr"].startswith("::ffff:") else s["local_addr"]
        if local in addr_host and addr_host[local] != s["host"]:
            wrong[s["host"]] = wrong.get(s["host"], 0) + 1
    return wrong


def run(requests=2000, clients=16, front="threads", out=None, quiet=False, wait=2.0):
    from deeptrace_core.collector.config import parse
    from deeptrace_core.collector.main import Collector

    t_begin = time.monotonic()
    topo = Topology(front=front, pool=clients, a_pool=4)
    data = tempfile.mkdtemp(prefix="dt-collector-")
    collector = Collector(parse(collector_yaml(os.path.join(data, "db")), "collector.yaml")).start()
    agents = {}
    try:
        topo.up()
        for role in HOSTS:
            cfg = os.path.join(topo.workdir, f"agent-{role}.yaml")
            with open(cfg, "w") as f:
                f.write(agent_yaml(topo, role, collector.ports["grpc"], wait))
            agents[role] = AgentProcess(cfg, os.path.join(topo.workdir, f"agent-{role}.stderr"))
        for a in agents.values():
            a.wait_running()
        time.sleep(0.5)
        summary = topo.run_load(requests, clients, timeout=300, trickle=wait + 1.5)
        time.sleep(0.5)
        cpu, stats = {}, {}
        for role, a in agents.items():
            cpu[role] = round(a.stop(), 2)
            stats[role] = parse_counters(a.text(), "final")
        agents = {}
        # The stitcher runs every second; give it the time a last round needs.
        t_stop = time.monotonic()
        before = -1
        while time.monotonic() - t_stop < 30:
            time.sleep(2.5)
            n = collector.stitcher.counts.get("stitched_tcp_seq", 0)
            if n == before:
                break
            before = n
        spans = stitched_spans(collector)
        truth = topo.ground_truth()
        tag = summary["tag"]
        main_ids = {r["id"] for r in truth["load"] if r["id"].startswith(f"{tag}n")}
        result = analyze(spans, truth, main_ids)
        lost = {role: {k: st.get("probe.trace", {}).get(k, 0) for k in REPORTED_LOSS}
                for role, st in stats.items()}
        dropped = {role: {k: st.get("exporter.otlp", {}).get(k, 0)
                          for k in ("dropped_spans", "failed_spans")}
                   for role, st in stats.items()}
        result.update({
            "config": {"requests": requests, "clients": clients, "front": front,
                       "hosts": list(HOSTS), "linker_wait_s": wait},
            "load": summary,
            "agents_lost": lost,
            "agents_dropped": dropped,
            "spans_lost": sum(sum(v.values()) for v in lost.values())
            + sum(sum(v.values()) for v in dropped.values()),
            "collector": collector.stats(),
            "spans_not_of_own_host": own_host_only(spans, topo),
            "agent_cpu_seconds": cpu,
            "machine": {"kernel": platform.release(), "cpus": os.cpu_count()},
            "bench_seconds": round(time.monotonic() - t_begin, 1),
        })
    finally:
        for a in agents.values():
            a.stop(10)
        topo.down()
        collector.stop()
    out = out or os.path.join(HERE, "results", f"crosshost-{front}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=2, default=str)
    if not quiet:
        print(f"cross-host ({front}, {requests} requests, {clients} clients, 4 hosts): "
              f"whole traces {result['whole_trace_accuracy']:.2%}, parent links "
              f"{result['parent_link_accuracy']:.2%}, spans lost {result['spans_lost']}, "
              f"foreign spans {result['spans_not_of_own_host'] or 0}, stitch delay p99 "
              f"{result['collector']['stitcher'].get('stitch_delay_p99_ms')} ms -> {out}")
    return result


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--front", choices=("threads", "asyncio"), default="threads")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    run(args.requests, args.clients, args.front, args.out)


if __name__ == "__main__":
    main()
