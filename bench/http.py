"""HTTP servers under wrk at fixed connection counts, with and without the agent.

nginx (Debian, one worker, `return 200`, from tests/servers.py) and a Python
ThreadingHTTPServer (bench/pyhttp.py: tests/l7_peers.py's server with TCP_NODELAY),
each under `wrk -t2 -cN -dS --latency` (closed loop: as fast as they answer). The
agent selects exactly the two servers (`comms` of the servers and `ports` of their
listening sockets: wrk's own sockets are not traced), detects HTTP/1 in the kernel (`protocols: [http1]`), builds spans and
writes them as JSON lines to a temp file.

Rounds alternate the order of the baseline phase and the agent phase (A B B A); spans
and losses per run come from the agent's periodic counters once it has caught up.
"""

import json
import os
import re
import subprocess
import sys
import tempfile
import time

from deeptrace_core.testing import stop_process

from .agent import Agent, Sampler, children_cpu_seconds, lost, spans_made, trace_config

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.join(os.path.dirname(HERE), "tests")
RPS_RATIO_TARGET = 0.95
P99_RATIO_TARGET = 1.10
_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text.strip())
    if not m:
        raise ValueError(f"not a wrk duration: {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def parse_wrk(text: str) -> dict:
    """requests, seconds, rps, p50/p75/p90/p99 (ms), socket errors, non-2xx, from
    `wrk --latency` output."""
    out = {"errors": 0, "non_2xx": 0}
    m = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m)", text)
    if not m:
        raise ValueError(f"wrk output without a request count:\n{text}")
    out["requests"] = int(m.group(1))
    out["seconds"] = _ms(m.group(2) + m.group(3)) / 1e3
    out["rps"] = float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))
    for pct, val in re.findall(r"^\s+(50|75|90|99)%\s+(\S+)\s*$", text, re.M):
        out[f"p{pct}_ms"] = _ms(val)
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    if m:
        out["errors"] = sum(map(int, m.groups()))
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    if m:
        out["non_2xx"] = int(m.group(1))
    return out


def wrk(port, conns, seconds, threads=2) -> dict:
    cmd = ["wrk", f"-t{min(threads, conns)}", f"-c{conns}", f"-d{seconds}s", "--latency",
           f"http://127.0.0.1:{port}/"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60)
    if p.returncode != 0:
        raise RuntimeError(f"wrk failed ({p.returncode}): {p.stderr}")
    return parse_wrk(p.stdout)


class Servers:
    """nginx and (unless python=False) the Python HTTP server, on free 127.0.0.1 ports."""

    def __init__(self, python=True):
        if TESTS not in sys.path:
            sys.path.insert(0, TESTS)
        import servers
        self.nginx = servers.nginx()
        self.ports = {"nginx": self.nginx.port}
        self.pids = {"nginx": self.nginx.pid}
        self.py = None
        if python:
            self.py = subprocess.Popen([sys.executable, "-m", "bench.pyhttp"],
                                       stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                       text=True, cwd=os.path.dirname(HERE))
            port = json.loads(self.py.stdout.readline())["port"]
            servers.wait_port(port, self.py, what="python http server")
            self.ports["python"] = port
            self.pids["python"] = self.py.pid

    def comm(self, name) -> str:
        with open(f"/proc/{self.pids[name]}/comm") as f:
            return f.read().strip()

    def cpu_seconds(self, name) -> float:
        return children_cpu_seconds(self.pids[name])

    def stop(self):
        self.nginx.stop()
        if self.py is not None:
            stop_process(self.py)


def agent_for(servers, out_path) -> Agent:
    cfg = trace_config(out_path=out_path, comms=sorted({servers.comm(n) for n in servers.ports}),
                       ports=sorted(servers.ports.values()), protocols=["http1"],
                       stats_interval="500ms")
    return Agent(cfg, "http")


def run(conns=(16, 128), seconds=5, rounds=2, log=print) -> dict:
    servers = Servers()
    runs = [(name, c) for name in ("nginx", "python") for c in conns]
    per = {(name, c): {"baseline": [], "traced": []} for name, c in runs}
    agents = []
    try:
        for name in servers.ports:  # warm up: first connections, page cache, JIT-less paths
            wrk(servers.ports[name], 4, 1)

        def baseline_phase():
            for name, c in runs:
                cpu0, t0 = servers.cpu_seconds(name), time.monotonic()
                res = wrk(servers.ports[name], c, seconds)
                res["server_cpu_pct"] = 100 * (servers.cpu_seconds(name) - cpu0) / (
                    time.monotonic() - t0)
                per[(name, c)]["baseline"].append(res)
                log(f"  http: {name} c={c} baseline {res['rps']:.0f} req/s "
                    f"p99 {res.get('p99_ms', float('nan')):.2f} ms")

        def agent_phase():
            out = tempfile.mktemp(prefix="dtb-http-", suffix=".jsonl")
            agent = agent_for(servers, out).start()
            try:
                prev = agent.settle(quiet_s=0.5)
                for name, c in runs:
                    sampler = Sampler(agent.pid).start()
                    cpu0, t0 = servers.cpu_seconds(name), time.monotonic()
                    res = wrk(servers.ports[name], c, seconds)
                    res["server_cpu_pct"] = 100 * (servers.cpu_seconds(name) - cpu0) / (
                        time.monotonic() - t0)
                    usage = sampler.stop()
                    cur = agent.settle(quiet_s=0.5)
                    res.update(spans=spans_made(cur) - spans_made(prev),
                               lost=lost(cur) - lost(prev),
                               agent_cpu_pct=usage["cpu_pct"],
                               agent_rss_kb=usage["rss_max_kb"],
                               settle_s=cur.get("_settle_s"), settled=cur.get("_settled"))
                    prev = cur
                    per[(name, c)]["traced"].append(res)
                    log(f"  http: {name} c={c} traced   {res['rps']:.0f} req/s "
                        f"p99 {res.get('p99_ms', float('nan')):.2f} ms, "
                        f"spans {res['spans']}/{res['requests']}, lost {res['lost']}")
            finally:
                final = agent.stop()
                agents.append({"startup_s": agent.startup_s, "final": final})
                agent.cleanup()
                try:
                    os.unlink(out)
                except OSError:
                    pass

        for r in range(rounds):
            phases = (baseline_phase, agent_phase) if r % 2 == 0 else (agent_phase, baseline_phase)
            for phase in phases:
                phase()
    finally:
        servers.stop()

    def mean(vals):
        vals = [v for v in vals if v is not None]
        return sum(vals) / len(vals) if vals else float("nan")

    results = []
    for (name, c), d in per.items():
        agg = {"server": name, "connections": c, "runs": d}
        for cond in ("baseline", "traced"):
            agg[cond] = {k: mean([x.get(k) for x in d[cond]])
                         for k in ("rps", "p50_ms", "p90_ms", "p99_ms", "server_cpu_pct")}
        agg["traced"].update(
            requests=sum(x["requests"] for x in d["traced"]),
            spans=sum(x["spans"] for x in d["traced"]),
            lost=sum(x["lost"] for x in d["traced"]),
            agent_cpu_pct=mean([x["agent_cpu_pct"] for x in d["traced"]]),
            errors=sum(x["errors"] + x["non_2xx"] for x in d["traced"]))
        agg["baseline"]["errors"] = sum(x["errors"] + x["non_2xx"] for x in d["baseline"])
        agg["rps_ratio"] = agg["traced"]["rps"] / agg["baseline"]["rps"]
        agg["p50_ratio"] = agg["traced"]["p50_ms"] / agg["baseline"]["p50_ms"]
        agg["p99_ratio"] = agg["traced"]["p99_ms"] / agg["baseline"]["p99_ms"]
        results.append(agg)
    return {"seconds": seconds, "rounds": rounds, "connections": list(conns),
            "wrk_threads": 2, "nginx_workers": 1, "agents": agents, "results": results}


def rows(res) -> list:
    out = []
    for r in res["results"]:
        b, t = r["baseline"], r["traced"]
        name, c = r["server"], r["connections"]
        gated = name == "nginx"
        ok = r["rps_ratio"] >= RPS_RATIO_TARGET
        out.append({
            "group": "HTTP under wrk (closed loop)", "figure": f"{name} c={c} requests/s",
            "baseline": f"{b['rps']:.0f}", "traced": f"{t['rps']:.0f}",
            "delta": f"{100 * r['rps_ratio']:.1f}%",
            "target": f">= {100 * RPS_RATIO_TARGET:.0f}%" if gated else "",
            "ok": ok if gated else None,
            "note": (f"spans {t['spans']} / requests {t['requests']}, lost {t['lost']}, "
                     f"agent cpu {t['agent_cpu_pct']:.0f}%"
                     + ("" if ok or not gated else
                        f"; short by {100 * (RPS_RATIO_TARGET - r['rps_ratio']):.1f} points"))})
        ok = r["p99_ratio"] <= P99_RATIO_TARGET
        out.append({
            "group": "HTTP under wrk (closed loop)", "figure": f"{name} c={c} p50 / p99 (ms)",
            "baseline": f"{b['p50_ms']:.2f} / {b['p99_ms']:.2f}",
            "traced": f"{t['p50_ms']:.2f} / {t['p99_ms']:.2f}",
            "delta": f"{100 * r['p50_ratio']:.0f}% / {100 * r['p99_ratio']:.0f}%",
            "target": f"p99 <= {100 * P99_RATIO_TARGET:.0f}%" if gated else "",
            "ok": ok if gated else None,
            "note": "" if ok or not gated else
            f"p99 over by {100 * (r['p99_ratio'] - P99_RATIO_TARGET):.0f} points"})
    return out
