"""What the tls probe adds to each SSL_write and SSL_read: `python -m bench.tls`
(`--https`: also nginx over HTTPS under wrk, with and without the agent, run_https()).

bench/tlsloop.c times SSL_write and SSL_read of `--size` bytes over a TCP loopback
connection (client and server in one thread, OpenSSL's own socket BIO, so rule 1 of
tls.bpf.c maps every call) in three conditions, alternating over `--rounds`: nothing
attached; empty programs on the same uprobes and uretprobes (what the kernel's uprobe
mechanism costs before any work of ours); the tls probe attached and drained. Printed:
the median over rounds of each condition's median per call, and what each adds to the bare
call.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading

from . import native

HERE = os.path.dirname(os.path.abspath(__file__))
LIBSSL = b"/lib/x86_64-linux-gnu/libssl.so.3"


class EmptyProbes:
    """Programs that return at once on SSL_write/SSL_read entry and return."""

    def __init__(self):
        from bcc import BPF
        self.b = BPF(text=b"int empty(void *ctx) { return 0; }")
        for sym in (b"SSL_write", b"SSL_read"):
            self.b.attach_uprobe(name=LIBSSL, sym=sym, fn_name=b"empty")
            self.b.attach_uretprobe(name=LIBSSL, sym=sym, fn_name=b"empty")

    def close(self):
        self.b.cleanup()


def build() -> str:
    out = os.path.join(tempfile.mkdtemp(prefix="dtb-tls-"), "dtb_tlsloop")
    cc = native.compiler()
    if cc is None:
        raise RuntimeError("no C compiler found: apt-get install gcc")
    subprocess.run([cc, "-O2", "-Wall", "-o", out, os.path.join(HERE, "tlsloop.c"),
                    "-lssl", "-lcrypto"], check=True)
    return out


def cert(d) -> tuple:
    crt, key = os.path.join(d, "cert.pem"), os.path.join(d, "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key,
                    "-out", crt, "-days", "1", "-subj", "/CN=localhost"], check=True,
                   capture_output=True)
    return crt, key


def one(loop, crt, key, size, calls, probe=None) -> tuple:
    """(write ns, read ns, records the probe drained)."""
    records = [0]
    stop = threading.Event()

    def drain():
        while not stop.is_set():
            records[0] += len(probe.poll(50))

    t = threading.Thread(target=drain) if probe else None
    if t:
        t.start()
    try:
        out = subprocess.run([loop, crt, key, str(size), str(calls)], capture_output=True,
                             text=True, check=True).stdout.split()
    finally:
        stop.set()
        if t:
            t.join()
            records[0] += len(probe.poll(0))
    return float(out[0]), float(out[1]), records[0]


def run(rounds=5, size=64, calls=20000) -> dict:
    from deeptrace_core.bpf import kernel_defines
    from deeptrace_plugins.tls.probe import TlsConfig, TlsProbe

    loop = build()
    d = tempfile.mkdtemp(prefix="dtb-tls-")
    crt, key = cert(d)
    probe = TlsProbe(TlsConfig())
    probe.attach(kernel_defines(probe.kernel_fields))
    probe.detach()  # compiled once here so that BCC's compile is not in the first round
    got = {"untraced": [], "empty uprobes": [], "traced": []}
    drained = 0
    for _ in range(rounds):
        got["untraced"].append(one(loop, crt, key, size, calls))
        empty = EmptyProbes()
        try:
            got["empty uprobes"].append(one(loop, crt, key, size, calls))
        finally:
            empty.close()
        probe = TlsProbe(TlsConfig())
        probe.attach(kernel_defines(probe.kernel_fields))
        try:
            w, r, n = one(loop, crt, key, size, calls, probe)
            stats = probe.stats()
        finally:
            probe.detach()
        got["traced"].append((w, r, n))
        drained += n
    med = {k: (statistics.median(x[0] for x in v), statistics.median(x[1] for x in v))
           for k, v in got.items()}
    return {"size": size, "calls": calls, "rounds": rounds, "median_ns": med,
            "records_drained": drained, "last_round_stats": stats}


def _https_config(out_path, port) -> str:
    """The agent as config/agent.yaml runs it for one HTTPS server: the trace probe on its
    port (TLS handshakes detected in the kernel, 4 records sent) beside the tls probe,
    spans out as JSON lines."""
    return f"""agent: {{stats_interval: 500ms, log_level: warning}}
probes:
  trace: {{ports: [{port}], comms: [nginx], protocols: [http1, tls],
          protocol_max_records: {{tls: 4}}}}
  tls: {{}}
processors:
  spans: {{}}
exporters:
  jsonl: {{path: {json.dumps(out_path)}, append: false}}
pipelines:
  main: {{probes: [trace, tls], processors: [spans], exporters: [jsonl]}}
"""


def _wrk_https(port, conns, seconds) -> dict:
    from .http import parse_wrk
    p = subprocess.run(["wrk", f"-t{min(2, conns)}", f"-c{conns}", f"-d{seconds}s", "--latency",
                        f"https://127.0.0.1:{port}/"], capture_output=True, text=True,
                       timeout=seconds + 60)
    if p.returncode != 0:
        raise RuntimeError(f"wrk failed ({p.returncode}): {p.stderr}")
    return parse_wrk(p.stdout)


def run_https(conns=16, seconds=5, rounds=2, log=print) -> dict:
    """nginx (one worker, `return 200`, ssl) under `wrk https://` (keep-alive: one
    handshake per connection), baseline and agent phases alternating A B B A. wrk uses
    the same libssl as nginx, and the tls probe hooks every process that maps it: under
    the agent, wrk's own SSL calls are traced too (the client spans), as any client on
    the machine would be."""
    from .agent import Agent, Sampler, spans_made
    tests = os.path.join(os.path.dirname(HERE), "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)
    import servers

    d = tempfile.mkdtemp(prefix="dtb-https-")
    nginx = servers.nginx(ssl=cert(d))
    port = nginx.port
    per = {"baseline": [], "traced": []}
    agents = []
    try:
        _wrk_https(port, 4, 1)   # warm up

        def baseline():
            res = _wrk_https(port, conns, seconds)
            per["baseline"].append(res)
            log(f"  tls: nginx https c={conns} baseline {res['rps']:.0f} req/s "
                f"p99 {res.get('p99_ms', float('nan')):.2f} ms")

        def traced():
            out = os.path.join(d, "spans.jsonl")
            agent = Agent(_https_config(out, port), "https").start()
            try:
                prev = agent.settle(quiet_s=0.5)
                sampler = Sampler(agent.pid).start()
                res = _wrk_https(port, conns, seconds)
                usage = sampler.stop()
                cur = agent.settle(quiet_s=0.5)
                tls_now, tls_then = cur.get("probe.tls", {}), prev.get("probe.tls", {})
                res.update(spans=spans_made(cur) - spans_made(prev),
                           tls_events=tls_now.get("events", 0) - tls_then.get("events", 0),
                           tls_lost=sum(tls_now.get(k, 0) - tls_then.get(k, 0)
                                        for k in ("ringbuf_full", "unmapped_read",
                                                  "unmapped_write")),
                           agent_cpu_pct=usage["cpu_pct"])
                per["traced"].append(res)
                log(f"  tls: nginx https c={conns} traced   {res['rps']:.0f} req/s "
                    f"p99 {res.get('p99_ms', float('nan')):.2f} ms, spans {res['spans']}"
                    f"/{res['requests']} requests, tls lost {res['tls_lost']}")
            finally:
                agents.append({"startup_s": agent.startup_s, "final": agent.stop()})
                agent.cleanup()

        for r in range(rounds):
            for phase in ((baseline, traced) if r % 2 == 0 else (traced, baseline)):
                phase()
    finally:
        nginx.stop()
        shutil.rmtree(d, ignore_errors=True)
    agg = {c: {k: statistics.mean(x[k] for x in v) for k in ("rps", "p50_ms", "p99_ms")}
           for c, v in per.items()}
    t = per["traced"]
    agg["traced"].update(requests=sum(x["requests"] for x in t),
                         spans=sum(x["spans"] for x in t),
                         tls_lost=sum(x["tls_lost"] for x in t),
                         agent_cpu_pct=statistics.mean(x["agent_cpu_pct"] for x in t),
                         errors=sum(x["errors"] + x["non_2xx"] for x in t))
    agg["baseline"]["errors"] = sum(x["errors"] + x["non_2xx"] for x in per["baseline"])
    return {"connections": conns, "seconds": seconds, "rounds": rounds, "runs": per,
            "agents": agents, "baseline": agg["baseline"], "traced": agg["traced"],
            "rps_ratio": agg["traced"]["rps"] / agg["baseline"]["rps"]}


def rows(res) -> list:
    """Table rows of run_https()'s result, as bench/http.py's rows."""
    b, t, c = res["baseline"], res["traced"], res["connections"]
    group = "HTTPS under wrk (closed loop, agent with the tls probe)"
    return [
        {"group": group, "figure": f"nginx https c={c} requests/s",
         "baseline": f"{b['rps']:.0f}", "traced": f"{t['rps']:.0f}",
         "delta": f"{100 * res['rps_ratio']:.1f}%", "target": "", "ok": None,
         "note": (f"spans {t['spans']} / requests {t['requests']} (wrk's calls are traced "
                  f"too: client and server spans), tls lost {t['tls_lost']}, "
                  f"agent cpu {t['agent_cpu_pct']:.0f}%, errors {t['errors']}")},
        {"group": group, "figure": f"nginx https c={c} p50 / p99 (ms)",
         "baseline": f"{b['p50_ms']:.2f} / {b['p99_ms']:.2f}",
         "traced": f"{t['p50_ms']:.2f} / {t['p99_ms']:.2f}",
         "delta": f"{100 * t['p50_ms'] / b['p50_ms']:.0f}% / "
                  f"{100 * t['p99_ms'] / b['p99_ms']:.0f}%",
         "target": "", "ok": None, "note": ""},
    ]


def section(rounds=5, calls=20000, https_seconds=5, https_rounds=2, log=print) -> dict:
    """`make bench`'s tls section: the per-call cost and nginx over HTTPS."""
    per_call = run(rounds, 64, calls)
    log("tls: per-call cost measured; nginx over HTTPS next")
    return {"per_call": per_call, "https": run_https(16, https_seconds, https_rounds, log=log)}


def section_rows(res) -> list:
    med = res["per_call"]["median_ns"]
    uw, ur = med["untraced"]
    group = "SSL_write / SSL_read of 64 bytes (median per call, interleaved rounds)"
    out = []
    for name, (w, r) in med.items():
        if name == "untraced":
            continue
        out.append({"group": group, "figure": f"added per call, {name} (us): write / read",
                    "baseline": f"{uw / 1000:.1f} / {ur / 1000:.1f}",
                    "traced": f"{w / 1000:.1f} / {r / 1000:.1f}",
                    "delta": f"+{(w - uw) / 1000:.1f} / +{(r - ur) / 1000:.1f}",
                    "target": "report", "ok": None, "note": ""})
    return out + rows(res["https"])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.tls", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--calls", type=int, default=20000)
    p.add_argument("--https", action="store_true",
                   help="also nginx over HTTPS under wrk, with and without the agent")
    p.add_argument("--https-seconds", type=int, default=5)
    p.add_argument("--https-connections", type=int, default=16)
    a = p.parse_args(argv)
    res = run(a.rounds, a.size, a.calls)
    med = res["median_ns"]
    uw, ur = med["untraced"]
    print(f"{a.size}-byte calls, {a.calls} per round, median of {a.rounds} rounds (ns per call)")
    print(f"{'':14} {'SSL_write':>9} {'added':>8} {'SSL_read':>9} {'added':>8}")
    for name, (w, r) in med.items():
        print(f"{name:14} {w:9.0f} {w - uw:+8.0f} {r:9.0f} {r - ur:+8.0f}")
    st = res["last_round_stats"]
    print(f"records drained {res['records_drained']}; last round: mapped_nested "
          f"{st['mapped_nested']}, ringbuf_full {st['ringbuf_full']}, "
          f"unmapped {st['unmapped_read'] + st['unmapped_write']}")
    if a.https:
        for row in rows(run_https(a.https_connections, a.https_seconds, a.rounds)):
            print(f"{row['figure']:28} {row['baseline']:>15} {row['traced']:>15} "
                  f"{row['delta']:>12}  {row['note']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
