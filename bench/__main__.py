"""DeepTrace performance suite (run as root): `make bench`, or

    python -m bench [--quick] [--out bench/results/bench.json] [--only NAME,...]

Sections (NAME), each measured with and without the agent in the same run, interleaved:

  startup    launch to all probes attached; peak RSS while compiling
  syscalls   per-syscall added latency (C driver, 100,000 calls each), traced and excluded
  http       nginx and a Python HTTP server under wrk at fixed connection counts
  rate       nginx at a fixed 10,000 requests/s: agent CPU, RSS, spans vs requests, loss
  lossless   the highest lossless request rate (stepping up), the loss at twice that, and
             above capacity: stats still reported, SIGTERM to exit, an exact account
  hostile    the default config under attack (issue 13's table, over real sockets to real
             servers) beside ordinary traffic at 1,000 requests/s, against an ordinary-only
             run: RSS growth, CPU per hostile record, ordinary spans, escapes, secrets
  collector  `deeptrace collector` on chdb offered 60,000 spans/s of agents' OTLP requests
             (unique spans): sustained spans/s written, ack p99, CPU per span, stitch
             delay p50/p99, its RSS peak; the agent's OTLP conversion per span with and
             without the stitch keys, side by side
  runtimes   the execution unit's cost: BPF time per traced data syscall with the loop
             counter and the goroutine read vs today's programs (C and Go drivers), an
             epoll_wait return with the counter off and on, and agent CPU per request on
             an asyncio front with its task uprobes vs the same front thread-per-request
  tls        added time per SSL_write/SSL_read (untraced, empty uprobes, the tls probe)
             and nginx over HTTPS under wrk with and without the agent

Three tools for the optimisation work itself (not part of the table): `python -m
bench.bpfcost` (BPF run time per program from the kernel's bpf_stats while the syscall
driver runs), `python -m bench.tpcost` (what a syscall tracepoint costs before any work
of ours), `python -m bench.replay` (user-space CPU per span on captured records) and
`python -m bench.asynciocost` (an asyncio service's CPU per request with and without the
trace probe's asyncio uprobes).

Prints one table (without agent, with agent, delta/ratio, target, pass/MISS, and a note
saying by how much a missed target is missed) and writes every raw figure and the
machine's description to the JSON file. The full run takes about 18 minutes on the
project's 2-core VM (the runtimes section alone ~6); --quick (about 3 minutes) is a smoke run with fewer calls,
shorter windows and one round, whose figures are not for publishing.
"""

import argparse
import os
import sys
import time
import traceback

from . import report

HERE = os.path.dirname(os.path.abspath(__file__))
SECTIONS = ("startup", "syscalls", "http", "rate", "lossless", "hostile", "collector",
            "runtimes", "tls")

FULL = {"startup": {"repeats": 3},
        "syscalls": {"n_calls": 100_000, "rounds": 4},
        "http": {"conns": (16, 128), "seconds": 5, "rounds": 2},
        "rate": {"seconds": 8, "rounds": 2},
        # 8 s: the ring (16 MB) holds ~1 s at 30,000/s, which a short window would count
        # as capacity.
        "lossless": {"seconds": 8},
        "hostile": {"seconds": 40, "scale": 1.0},
        "collector": {"seconds": 30.0},
        "runtimes": {"calls": 100_000, "bpf_calls": 100_000, "rounds": 3, "requests": 3000},
        "tls": {"rounds": 5, "calls": 20000, "https_seconds": 5, "https_rounds": 2}}
QUICK = {"startup": {"repeats": 1, "trace_only": False},
         "syscalls": {"n_calls": 10_000, "rounds": 1},
         "http": {"conns": (16,), "seconds": 2, "rounds": 1},
         "rate": {"seconds": 2, "rounds": 1},
         "lossless": {"seconds": 2, "steps": (5_000, 10_000, 20_000), "bisect": False},
         "hostile": {"seconds": 12, "scale": 0.25},
         "collector": {"seconds": 5.0},
         "runtimes": {"calls": 20_000, "bpf_calls": 5_000, "rounds": 1, "requests": 500},
         "tls": {"rounds": 1, "calls": 5000, "https_seconds": 2, "https_rounds": 1}}


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def run_section(name, params):
    """(raw results, table rows) of one section."""
    if name == "startup":
        from . import startup
        res = startup.run(log=log, **params)
        return res, startup.rows(res)
    if name == "syscalls":
        from . import syscalls
        res = syscalls.run(log=log, **params)
        return res, syscalls.rows(res)
    if name == "http":
        from . import http
        res = http.run(log=log, **params)
        return res, http.rows(res)
    if name in ("rate", "lossless"):
        from . import rate
        from .http import Servers
        servers = Servers(python=False)
        try:
            if name == "rate":
                res = rate.run_fixed(servers, log=log, **params)
                return res, rate.rows_fixed(res)
            res = rate.run_lossless(servers, log=log, **params)
            return res, rate.rows_lossless(res)
        finally:
            servers.stop()
    if name == "hostile":
        from . import hostile
        res = hostile.run(log=log, **params)
        return res, hostile.rows(res)
    if name == "collector":
        from . import collector
        res = collector.run(log=log, **params)
        return res, collector.rows(res)
    if name == "runtimes":
        from . import runtimes
        res = runtimes.run(log=log, **params)
        return res, runtimes.rows(res)
    if name == "tls":
        from . import tls
        res = tls.section(log=log, **params)
        return res, tls.section_rows(res)
    raise ValueError(name)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run (about 2 minutes)")
    p.add_argument("--out", default=None,
                   help="JSON output (default bench/results/bench.json, "
                        "bench/results/bench-quick.json with --quick)")
    p.add_argument("--only", default="", help=f"comma-separated subset of {','.join(SECTIONS)}")
    args = p.parse_args(argv)
    only = [s for s in args.only.split(",") if s] or list(SECTIONS)
    unknown = [s for s in only if s not in SECTIONS]
    if unknown:
        p.error(f"unknown section(s) {', '.join(unknown)} (known: {', '.join(SECTIONS)})")
    if os.geteuid() != 0:
        print("bench: needs root (it loads BPF programs)", file=sys.stderr)
        return 1
    out = args.out or os.path.join(
        HERE, "results", "bench-quick.json" if args.quick else "bench.json")
    params = QUICK if args.quick else FULL

    t_start = time.monotonic()
    machine = report.machine()
    log("bench: " + report.describe(machine))
    sections, rows, timings = {}, [], {}
    meta = {"quick": args.quick, "sections_run": only, "parameters": {s: params[s] for s in only}}
    for name in only:
        t0 = time.monotonic()
        log(f"bench: {name} ...")
        try:
            res, section_rows = run_section(name, params[name])
            res["loadavg_after"] = list(os.getloadavg())
        except Exception as exc:
            log(f"bench: {name} failed:\n{traceback.format_exc()}")
            res = {"error": repr(exc), "traceback": traceback.format_exc()}
            section_rows = [{"group": name, "figure": "section failed", "baseline": "",
                             "traced": "", "delta": "", "target": "", "ok": False,
                             "note": repr(exc)[:200]}]
        timings[name] = time.monotonic() - t0
        log(f"bench: {name} done in {timings[name]:.0f} s")
        sections[name] = res
        rows += section_rows
        machine["loadavg_end"] = list(os.getloadavg())
        meta.update(duration_s=time.monotonic() - t_start, section_seconds=timings)
        report.write(out, machine, sections, rows, meta)  # partial results survive a crash
    meta.update(duration_s=time.monotonic() - t_start,
                generated=time.strftime("%Y-%m-%d %H:%M:%S"))
    report.write(out, machine, sections, rows, meta)
    print(report.render(machine, rows, meta))
    print(f"\nJSON: {os.path.relpath(out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
