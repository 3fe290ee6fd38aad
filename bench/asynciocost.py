"""What the asyncio task uprobes cost the traced service (run as root):

    python -m bench.asynciocost [--requests 3000] [--clients 8] [--rounds 2] [--python PATH]

An asyncio streams front (bench/asyncio_peers.py: GET /a/<id> -> gather of two calls to
thread-per-request back-ends) is driven by `clients` keep-alive connections from this
process, under three conditions alternated per round (none, off, on / on, off, none):
no probe; the trace probe without its asyncio uprobes (``asyncio: false``); the trace
probe with them. Per condition: the front's own CPU time per request (from /proc: user +
system, which is where a uprobe's trap is paid) and the wall time per request. The probe
runs in this process and is drained by a thread; the records are counted, not processed.
"""

import argparse
import json
import os
import subprocess
import sys
import threading
import time
import http.client

HERE = os.path.dirname(os.path.abspath(__file__))
PEERS = os.path.join(HERE, "asyncio_peers.py")


def _cpu(pid) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_peer(python, *args):
    """(process, its ready line) of one asyncio_peers.py peer under `python`."""
    p = subprocess.Popen([python, "-P", PEERS, *map(str, args)], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    return p, json.loads(p.stdout.readline())


def stop_peers(procs):
    """Close the peers' stdin (they serve until then) and wait for them."""
    for p in procs:
        if p.poll() is None:
            p.stdin.close()
            p.wait(10)


def _drive(port, n, clients, tag):
    def worker(k):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        for i in range(k, n, clients):
            conn.request("GET", f"/a/{tag}{i}")
            r = conn.getresponse()
            r.read()
            assert r.status == 200
        conn.close()
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def _probe(asyncio_on, pids):
    from deeptrace_core.bpf import kernel_defines
    from deeptrace_plugins.trace.probe import TraceConfig, TraceProbe
    probe = TraceProbe(TraceConfig(pids=pids, asyncio=asyncio_on))
    probe.attach(kernel_defines(probe.kernel_fields))
    return probe


def run(requests=3000, clients=8, rounds=2, python=None, log=print) -> dict:
    python = python or sys.executable
    procs = []

    def start(*args):
        p, info = start_peer(python, *args)
        procs.append(p)
        return p, info

    out = {"none": [], "off": [], "on": []}
    try:
        back, binfo = start("backends")
        front, finfo = start("front", *binfo["ports"])
        _drive(finfo["port"], 200, clients, "warm")   # connections opened, code warm
        for r in range(rounds):
            order = ("none", "off", "on") if r % 2 == 0 else ("on", "off", "none")
            for cond in order:
                probe = None if cond == "none" else _probe(cond == "on", [front.pid, back.pid])
                stop, counted = threading.Event(), [0]

                def drain():
                    while not stop.is_set():
                        counted[0] += len(probe.poll(50))
                drainer = threading.Thread(target=drain) if probe else None
                if drainer:
                    drainer.start()
                try:
                    c0, t0 = _cpu(front.pid), time.monotonic()
                    _drive(finfo["port"], requests, clients, f"{cond}{r}x")
                    c1, t1 = _cpu(front.pid), time.monotonic()
                finally:
                    if drainer:
                        stop.set()
                        drainer.join()
                    stats = probe.stats() if probe else {}
                    if probe:
                        probe.detach()
                res = {"front_cpu_us_per_request": round((c1 - c0) / requests * 1e6, 1),
                       "wall_us_per_request": round((t1 - t0) / requests * 1e6, 1),
                       "records": counted[0], "ringbuf_full": stats.get("ringbuf_full", 0),
                       "task_edges": stats.get("asyncio_task_edges", 0)}
                out[cond].append(res)
                log(f"round {r + 1} {cond:4}: {res}")
    finally:
        stop_peers(procs)
    med = {c: sorted(x["front_cpu_us_per_request"] for x in v)[len(v) // 2]
           for c, v in out.items() if v}
    return {"requests": requests, "clients": clients, "rounds": rounds, "python": python,
            "runs": out, "front_cpu_us_per_request_median": med,
            "uprobes_added_us_per_request": round(med["on"] - med["off"], 1),
            "load_average": os.getloadavg()}


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.asynciocost", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=3000)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--python")
    p.add_argument("--out", default=os.path.join(HERE, "results", "asynciocost.json"))
    args = p.parse_args(argv)
    res = run(args.requests, args.clients, args.rounds, args.python)
    print(json.dumps({k: res[k] for k in ("front_cpu_us_per_request_median",
                                          "uprobes_added_us_per_request", "load_average")}))
    with open(args.out, "w") as f:
        json.dump(res, f, indent=2)
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
