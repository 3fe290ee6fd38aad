"""The collector's costs (run as root or not): ``python -m bench.collector [--seconds 20]``.

* **ingest**: `deeptrace collector` as its own process (chdb), fed over OTLP/gRPC by
  sender processes replaying agents' real export requests (spans of a three-host
  request chain, 512 per request, as plugins/exporters/otlp.py encodes them) as fast as
  the collector acknowledges them; spans/s acknowledged over the window (every
  acknowledged span is written: the collector answers after the write) and the spans
  in ClickHouse afterwards;
* **stitch delay**: the stitcher's own measure, from a pair's last end arriving to its
  decision (p99 over the run);
* **collector RSS**: peak resident memory of the collector process under that load;
* **agent cost**: what the stitch keys add per span to the agent's OTLP encoding
  (attributes added to a span message, timed over 100,000 spans).

Machine figures vary 2-4x between sessions: compare only figures of one run.
"""

import argparse
import json
import multiprocessing
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


def _requests(n_batches, seed):
    """Agents' export requests (serialized) of a three-host chain, 512 spans each."""
    sys.path.insert(0, os.path.join(REPO, "tests"))
    from test_collector_stitch import World

    from deeptrace_plugins.exporters.otlp import Converter
    from deeptrace_plugins.exporters.red import ServiceNamer
    rnd = random.Random(seed)
    out = []
    while len(out) < n_batches:
        world = World(512 // 7 * 4, rnd, skew_b=0, skew_c=0)
        for host, spans in world.spans.items():
            conv = Converter(ServiceNamer(), resource={"host.name": f"host-{host}"})
            for i in range(0, len(spans), 512):
                out.append(conv.traces_request(spans[i:i + 512]).SerializeToString())
    return out[:n_batches]


def _sender(port, payloads, seconds, result, window=32):
    import grpc
    ch = grpc.insecure_channel(f"127.0.0.1:{port}")
    call = ch.unary_unary("/opentelemetry.proto.collector.trace.v1.TraceService/Export",
                          request_serializer=lambda b: b, response_deserializer=lambda b: b)
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
    counts = [trace_service_pb2.ExportTraceServiceRequest.FromString(p) for p in payloads]
    counts = [sum(len(ss.spans) for rs in r.resource_spans for ss in rs.scope_spans) for r in counts]
    # Many agents send at once, each one request at a time (as the agents' exporter does):
    # `window` requests in flight per sender process stand for that many agents.
    sent, i, inflight = 0, 0, []
    end = time.monotonic() + seconds
    while time.monotonic() < end or inflight:
        while time.monotonic() < end and len(inflight) < window:
            inflight.append((call.future(payloads[i % len(payloads)], timeout=60),
                             counts[i % len(payloads)]))
            i += 1
        fut, n = inflight.pop(0)
        fut.result()
        sent += n
    result.put(sent)


def _rss_kb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def ingest(seconds=20.0, senders=2, log=print):
    work = tempfile.mkdtemp(prefix="dt-bench-collector-")
    cfg = os.path.join(work, "collector.yaml")
    with open(cfg, "w") as f:
        f.write(f"""receivers:\n  otlp: {{grpc: "127.0.0.1:0", http: ""}}\n"""
                f"""api: {{address: "127.0.0.1:0"}}\nstorage: {{path: "{work}/db"}}\n"""
                "stitcher: {interval: 1s, window: 1h}\n")
    proc = subprocess.Popen([sys.executable, "-m", "deeptrace_core.cli", "collector",
                             "--config", cfg], stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        line = proc.stderr.readline()
        if "running" not in line:
            raise RuntimeError(f"collector did not start: {line}{proc.stderr.read()[-2000:]}")
        grpc_port = int(line.split("otlp grpc :")[1].split(",")[0])
        api_port = int(line.split("api :")[1].split(",")[0])
        payloads = _requests(64, 1)
        idle_kb = _rss_kb(proc.pid)
        q = multiprocessing.Queue()
        procs = [multiprocessing.Process(target=_sender, args=(grpc_port, payloads[i::senders],
                                                               seconds, q)) for i in range(senders)]
        t0 = time.monotonic()
        for p in procs:
            p.start()
        peak_kb = idle_kb
        while any(p.is_alive() for p in procs):
            peak_kb = max(peak_kb, _rss_kb(proc.pid))
            time.sleep(0.2)
        elapsed = time.monotonic() - t0
        sent = sum(q.get() for _ in procs)
        time.sleep(3)         # a last stitcher round
        with urllib.request.urlopen(f"http://127.0.0.1:{api_port}/api/stats", timeout=60) as r:
            stats = json.loads(r.read())
        log(f"collector: {sent} spans acknowledged in {elapsed:.1f}s")
        return {"spans_acknowledged": sent, "seconds": round(elapsed, 2),
                "spans_per_s": round(sent / elapsed), "senders": senders,
                "spans_stored": stats["receiver"]["spans"],
                "stitch_delay_p99_ms": stats["stitcher"].get("stitch_delay_p99_ms"),
                "stitched": stats["stitcher"].get("stitched_tcp_seq", 0),
                "rss_idle_mb": round(idle_kb / 1024, 1), "rss_peak_mb": round(peak_kb / 1024, 1),
                "collector_stats": stats}
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


def agent_cost(n=100_000):
    """µs per span that the stitch keys add to the agent's OTLP encoding."""
    from opentelemetry.proto.trace.v1 import trace_pb2

    from deeptrace_plugins.exporters.otlp import add_attributes
    keys = {"network.local.address": "10.0.1.1", "network.local.port": 40000,
            "deeptrace.request.seq_start": 123456789, "deeptrace.request.seq_end": 123456889,
            "deeptrace.response.seq_start": 987654321, "deeptrace.response.seq_end": 987654521}
    spans = [trace_pb2.Span() for _ in range(n)]
    t0 = time.perf_counter()
    for p in spans:
        add_attributes(p.attributes, keys)
    encode = time.perf_counter() - t0
    size = spans[0].ByteSize()
    return {"us_per_span": round(encode / n * 1e6, 3), "bytes_per_span": size}


def run(seconds=20.0, log=print):
    res = {"ingest": ingest(seconds, log=log), "agent_stitch_keys": agent_cost(),
           "machine": {"kernel": platform.release(), "cpus": os.cpu_count()}}
    return res


def rows(res):
    ing, cost = res["ingest"], res["agent_stitch_keys"]
    g = (f"collector (chdb; {ing['senders']} sender processes x 32 agents' requests in "
         f"flight, 512 spans each)")
    delay = ing["stitch_delay_p99_ms"]
    return [
        {"group": g, "figure": "ingest, spans/s acknowledged (= written)", "baseline": "",
         "traced": f"{ing['spans_per_s']:,}", "delta": f"{ing['spans_stored']:,} stored",
         "target": ">= 50,000", "ok": ing["spans_per_s"] >= 50_000,
         "note": "" if ing["spans_per_s"] >= 50_000 else
         f"short by {50_000 - ing['spans_per_s']:,}/s: each insert costs 0.1-0.5 s here"},
        {"group": g, "figure": "stitch delay p99 (ms, arrival to stitched)", "baseline": "",
         "traced": str(delay), "delta": f"{ing['stitched']:,} stitched", "target": "<= 5000",
         "ok": delay is not None and delay <= 5000, "note": ""},
        {"group": g, "figure": "collector RSS idle / peak (MB)",
         "baseline": f"{ing['rss_idle_mb']:.0f}", "traced": f"{ing['rss_peak_mb']:.0f}",
         "delta": f"+{ing['rss_peak_mb'] - ing['rss_idle_mb']:.0f}", "target": "report",
         "ok": None, "note": ""},
        {"group": g, "figure": "agent: stitch keys per span (us to encode, bytes)",
         "baseline": "", "traced": f"{cost['us_per_span']:.2f}",
         "delta": f"{cost['bytes_per_span']} B", "target": "report", "ok": None, "note": ""},
    ]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "collector.json"))
    args = ap.parse_args(argv)
    res = run(args.seconds)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=2)
    for r in rows(res):
        print(f"{r['figure']}: {r['baseline']} {r['traced']} ({r['delta']}) target {r['target']}")


if __name__ == "__main__":
    main()
