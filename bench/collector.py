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
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


def _rss_kb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def _pct(values, q):
    v = sorted(values)
    return round(v[min(len(v) - 1, int(len(v) * q))], 1) if v else None


def ingest(seconds=20.0, rate=60_000, senders=2, log=print, root=REPO, label="",
           extra_config=""):
    """The collector (from the tree at `root`) as its own process, offered `rate` spans/s
    by `senders` processes for `seconds`."""
    from .otlp_load import send
    work = tempfile.mkdtemp(prefix="dt-bench-collector-")
    cfg = os.path.join(work, "collector.yaml")
    with open(cfg, "w") as f:
        f.write(f"""receivers:\n  otlp: {{grpc: "127.0.0.1:0", http: ""}}\n"""
                f"""api: {{address: "127.0.0.1:0"}}\nstorage: {{path: "{work}/db"}}\n"""
                + ("" if "stitcher:" in extra_config else "stitcher: {interval: 1s}\n")
                + extra_config)
    proc = subprocess.Popen([sys.executable, "-m", "deeptrace_core.cli", "collector",
                             "--config", cfg], stderr=subprocess.PIPE, text=True, cwd=root)
    try:
        line = proc.stderr.readline()
        if "running" not in line:
            raise RuntimeError(f"collector did not start: {line}{proc.stderr.read()[-2000:]}")
        grpc_port = int(line.split("otlp grpc :")[1].split(",")[0])
        api_port = int(line.split("api :")[1].split(",")[0])
        idle_kb = _rss_kb(proc.pid)
        q = multiprocessing.Queue()
        procs = [multiprocessing.Process(target=send, args=(grpc_port, i, rate / senders,
                                                            seconds, q)) for i in range(senders)]
        load0 = os.getloadavg()[0]
        for p in procs:
            p.start()
        peak_kb = idle_kb
        results = []
        while len(results) < senders:
            peak_kb = max(peak_kb, _rss_kb(proc.pid))
            try:
                results.append(q.get(timeout=0.2))
            except Exception:
                if not any(p.is_alive() for p in procs) and q.empty():
                    raise RuntimeError("a sender died") from None
        for p in procs:
            p.join()
        elapsed = max(r["seconds"] for r in results)
        acked = sum(r["acked_spans"] for r in results)
        lat = [x for r in results for x in r["latencies_ms"]]
        # Stitching catches up with the last spans: wait for its rounds to find nothing new.
        stats, last = None, -1
        for _ in range(60):
            time.sleep(2)
            with urllib.request.urlopen(f"http://127.0.0.1:{api_port}/api/stats",
                                        timeout=120) as r:
                stats = json.loads(r.read())
            done = stats["stitcher"].get("stitched_tcp_seq", 0)
            if done == last:
                break
            last = done
            peak_kb = max(peak_kb, _rss_kb(proc.pid))
        expected_pairs = sum(r["acked_spans"] for r in results) * 3 // 7
        out = {"label": label, "offered_spans_per_s": rate, "senders": senders,
               "seconds": round(elapsed, 2),
               "offered_spans": sum(r["offered_spans"] for r in results),
               "spans_acknowledged": acked, "spans_per_s": round(acked / elapsed),
               "spans_refused": sum(r["refused_spans"] for r in results),
               "sender_behind": sum(r["behind"] for r in results),
               "ack_p50_ms": _pct(lat, 0.5), "ack_p99_ms": _pct(lat, 0.99),
               "spans_stored": stats["receiver"]["spans"],
               "stitch_delay_p50_ms": stats["stitcher"].get("stitch_delay_p50_ms"),
               "stitch_delay_p99_ms": stats["stitcher"].get("stitch_delay_p99_ms"),
               "stitched": stats["stitcher"].get("stitched_tcp_seq", 0),
               "pairs_sent": expected_pairs,
               "rss_idle_mb": round(idle_kb / 1024, 1), "rss_peak_mb": round(peak_kb / 1024, 1),
               "load_avg_1m": [round(load0, 2), round(os.getloadavg()[0], 2)],
               "collector_stats": stats}
        log(f"collector{' ' + label if label else ''}: {acked:,} spans acknowledged in "
            f"{elapsed:.1f}s ({out['spans_per_s']:,}/s offered {rate:,}/s), ack p99 "
            f"{out['ack_p99_ms']} ms, stitched {out['stitched']:,}/{expected_pairs:,}, "
            f"delay p99 {out['stitch_delay_p99_ms']} ms, RSS peak {out['rss_peak_mb']} MB, "
            f"load {out['load_avg_1m']}")
        return out
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(work, ignore_errors=True)


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


def run(seconds=20.0, rate=60_000, senders=2, log=print, compare_root=None):
    res = {"ingest": ingest(seconds, rate, senders, log=log), "agent_stitch_keys": agent_cost(),
           "machine": {"kernel": platform.release(), "cpus": os.cpu_count()}}
    if compare_root:
        res["ingest_compare"] = ingest(seconds, rate, senders, log=log, root=compare_root,
                                       label=f"({compare_root})")
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
    ap.add_argument("--rate", type=int, default=60_000, help="offered spans/s (all senders)")
    ap.add_argument("--senders", type=int, default=2, help="sender processes")
    ap.add_argument("--compare-root", default=None,
                    help="also run the collector of this source tree (e.g. an older "
                         "checkout), same load, one after the other")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "collector.json"))
    args = ap.parse_args(argv)
    res = run(args.seconds, args.rate, args.senders, compare_root=args.compare_root)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=2)
    for r in rows(res):
        print(f"{r['figure']}: {r['baseline']} {r['traced']} ({r['delta']}) target {r['target']}")


if __name__ == "__main__":
    main()
