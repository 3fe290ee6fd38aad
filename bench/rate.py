"""nginx at fixed request rates (bench/loadgen.c: open loop, HTTP/1 keep-alive), with and
without the agent.

* fixed 10,000 requests/s: latency and nginx CPU without and with the agent (A B B A), and
  with it the agent's CPU (% of one core), RSS, spans produced vs requests answered, and
  lost events;
* lossless: one agent, rates stepped up until the agent loses something (a loss counter
  moves or fewer spans than answered requests), one bisection step between the last good
  and the first bad rate, then twice the highest lossless rate; the highest rate the
  generator and nginx reach without the agent is measured in the same run, so a ceiling
  of the machine is not mistaken for the agent's.
"""

import json
import mmap
import os
import resource
import signal
import subprocess
import tempfile
import time

from deeptrace_plugins.trace.probe import TraceConfig

from . import native
from .agent import LOSS_KEYS, Agent, Sampler, lost, spans_made, trace_config

FIXED_RATE = 10_000
CONNS = 64
TARGET_CPU_PCT = 25.0
TARGET_RSS_MB = 200.0
TARGET_LOSSLESS = 30_000
MAX_STATS_GAP_S = 2.0   # saturated, the agent still reports (stats_interval 0.5 s)
MAX_STOP_S = 5.0        # saturated, SIGTERM to exit (detach, drain, final report)
CEILING_ASK = 100_000  # more than the generator and nginx can do here: their ceiling
STEPS = (5_000, 10_000, 15_000, 20_000, 25_000, 30_000, 40_000, 50_000, 60_000)


def loadgen(port, rate, seconds, conns=CONNS, during=None) -> dict:
    """Run the generator; `during()` is called every 0.25 s while it runs."""
    binary = native.build("loadgen")
    r0, t0 = resource.getrusage(resource.RUSAGE_CHILDREN), time.monotonic()
    p = subprocess.Popen([binary, str(port), str(int(rate)), str(seconds), str(conns)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while p.poll() is None:
        if during:
            during()
        time.sleep(0.25)
    out, err = p.communicate()
    if p.returncode != 0:
        raise RuntimeError(f"loadgen failed ({p.returncode}): {err}")
    res = json.loads(out)
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)  # the generator is the only child reaped
    res["generator_cpu_pct"] = 100 * (r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime) / (
        time.monotonic() - t0)
    return res


def _agent(servers, out) -> Agent:
    cfg = trace_config(out_path=out, comms=[servers.comm("nginx")],
                       ports=[servers.ports["nginx"]], protocols=["http1"],
                       stats_interval="500ms")
    return Agent(cfg, "rate")


class _Traced:
    """An agent for a phase: start, measured windows, stop."""

    def __init__(self, servers):
        self.out = tempfile.mktemp(prefix="dtb-rate-", suffix=".jsonl")
        self.agent = _agent(servers, self.out).start()
        self.prev = self.agent.settle(quiet_s=0.5)

    def window(self, port, rate, seconds, server_cpu=None) -> dict:
        sampler = Sampler(self.agent.pid).start()
        cpu0, t0 = (server_cpu(), time.monotonic()) if server_cpu else (0, 0)
        res = loadgen(port, rate, seconds, during=sampler.sample)
        if server_cpu:
            res["nginx_cpu_pct"] = 100 * (server_cpu() - cpu0) / (time.monotonic() - t0)
        usage = sampler.stop()
        cur = self.agent.settle(quiet_s=0.5)
        res.update(spans=spans_made(cur) - spans_made(self.prev),
                   records=(cur.get("pipeline.main", {}).get("records_in", 0)
                            - self.prev.get("pipeline.main", {}).get("records_in", 0)),
                   agent_cpu_s=usage["cpu_s"],
                   lost=lost(cur) - lost(self.prev),
                   lost_by_cause={k: cur.get("probe.trace", {}).get(k, 0)
                                  - self.prev.get("probe.trace", {}).get(k, 0)
                                  for k in LOSS_KEYS},
                   agent_cpu_pct=usage["cpu_pct"], agent_rss_max_kb=usage["rss_max_kb"],
                   agent_rss_end_kb=usage["rss_end_kb"])
        res["lossless"] = res["lost"] == 0 and res["spans"] >= res["completed"]
        res["settle_s"], res["settled"] = cur.get("_settle_s"), cur.get("_settled")
        self.prev = cur
        return res

    def stop_saturated(self, port, seconds) -> dict:
        """Above capacity: the generator asks CEILING_ASK for `seconds`; half-way the
        agent gets SIGTERM. Is it still responsive (periodic stats kept coming; how long
        from SIGTERM to exit), and is its final account exact (every record the kernel
        submitted was drained, the rest counted lost by cause)?"""
        agent = self.agent
        marks = []  # (time, stats reports so far) while loaded, before SIGTERM
        state = {"t0": time.monotonic(), "sigterm": None, "exit": None}

        def during():
            now = time.monotonic()
            if state["sigterm"] is None:
                marks.append((now, agent.text().count("deeptrace stats: pipeline.")))
                if now - state["t0"] >= seconds / 2:
                    state["sigterm"] = now
                    agent.proc.send_signal(signal.SIGTERM)
            elif state["exit"] is None and agent.proc.poll() is not None:
                state["exit"] = now

        loadgen(port, CEILING_ASK, seconds, during=during)
        final = agent.stop()  # waits for the exit if the load ended first
        if state["exit"] is None:
            state["exit"] = time.monotonic()
        gaps, last_t, last_n = [], marks[0][0] if marks else 0, marks[0][1] if marks else 0
        for t, n in marks[1:]:
            if n > last_n:
                gaps.append(t - last_t)
                last_t, last_n = t, n
        if marks:
            gaps.append(marks[-1][0] - last_t)  # the wait for a report still to come
        trace, pipe = final.get("probe.trace", {}), final.get("pipeline.main", {})
        return {"loaded_s": (state["sigterm"] or state["exit"]) - state["t0"],
                "stats_reports": (marks[-1][1] - marks[0][1]) if marks else 0,
                "max_stats_gap_s": max(gaps) if gaps else None,
                "exit_after_sigterm_s": state["exit"] - state["sigterm"]
                if state["sigterm"] else None,
                "exit_code": agent.proc.returncode,
                "events": trace.get("events", 0), "drained": pipe.get("records_in", 0),
                "decode_failed": trace.get("decode_failed", 0), "lost": lost(final),
                "lost_by_cause": {k: trace.get(k, 0) for k in LOSS_KEYS if trace.get(k)}}

    def close(self) -> dict:
        final = self.agent.stop()
        info = {"startup_s": self.agent.startup_s,
                "hwm_at_start_kb": self.agent.hwm_at_start_kb, "final": final}
        self.agent.cleanup()
        try:
            os.unlink(self.out)
        except OSError:
            pass
        return info


def _nginx_window(servers, rate, seconds) -> dict:
    cpu0, t0 = servers.cpu_seconds("nginx"), time.monotonic()
    res = loadgen(servers.ports["nginx"], rate, seconds)
    res["nginx_cpu_pct"] = 100 * (servers.cpu_seconds("nginx") - cpu0) / (time.monotonic() - t0)
    return res


def run_fixed(servers, seconds=8, rounds=2, log=print) -> dict:
    port = servers.ports["nginx"]
    base, traced, agents = [], [], []
    for r in range(rounds):
        order = ("baseline", "traced") if r % 2 == 0 else ("traced", "baseline")
        for cond in order:
            if cond == "baseline":
                res = _nginx_window(servers, FIXED_RATE, seconds)
                base.append(res)
            else:
                t = _Traced(servers)
                try:
                    res = t.window(port, FIXED_RATE, seconds,
                                   server_cpu=lambda: servers.cpu_seconds("nginx"))
                finally:
                    agents.append(t.close())
                traced.append(res)
            log(f"  rate: {FIXED_RATE}/s {cond:8} achieved {res['rate']:.0f}/s "
                f"p50 {res['p50_us']} us p99 {res['p99_us']} us"
                + (f", spans {res['spans']}/{res['completed']}, lost {res['lost']}, "
                   f"agent cpu {res['agent_cpu_pct']:.1f}% rss "
                   f"{res['agent_rss_max_kb'] / 1024:.0f} MB" if cond == "traced" else ""))
    return {"rate": FIXED_RATE, "seconds": seconds, "connections": CONNS, "rounds": rounds,
            "baseline": base, "traced": traced, "agents": agents}


def run_lossless(servers, seconds=4, steps=STEPS, bisect=True, log=print) -> dict:
    port = servers.ports["nginx"]
    # The machine's ceiling without the agent: ask for more than any step.
    ceiling = _nginx_window(servers, CEILING_ASK, seconds)
    log(f"  lossless: ceiling without the agent {ceiling['rate']:.0f}/s")
    tried = []
    t = _Traced(servers)
    try:
        def step(rate):
            res = t.window(port, rate, seconds)
            res["target_rate"] = rate
            tried.append(res)
            log(f"  lossless: {rate}/s achieved {res['rate']:.0f}/s spans "
                f"{res['spans']}/{res['completed']} lost {res['lost']} "
                f"agent cpu {res['agent_cpu_pct']:.0f}%")
            return res

        best, first_bad, saturated = None, None, False
        for rate in steps:
            res = step(rate)
            if not res["lossless"]:
                first_bad = rate
                break
            if res["rate"] < 0.95 * rate:  # the generator/nginx cannot go this fast here
                saturated = True
                break
            best = rate
        if bisect and best is not None and first_bad is not None and first_bad - best > 2_000:
            mid = (best + first_bad) // 2 // 500 * 500
            res = step(mid)
            if res["lossless"] and res["rate"] >= 0.95 * mid:
                best = mid
            else:
                first_bad = mid
        double = step(2 * best) if best else None
        ceiling_traced = step(CEILING_ASK)
        stopping = t.stop_saturated(port, max(4, seconds))
        log(f"  lossless: SIGTERM while saturated: exit after "
            f"{stopping['exit_after_sigterm_s']:.2f} s (code {stopping['exit_code']}), "
            f"stats every <= {stopping['max_stats_gap_s']:.2f} s while loaded, events "
            f"{stopping['events']} = drained {stopping['drained']}, lost {stopping['lost']}")
    finally:
        agent = t.close()
    best_achieved = max((r["rate"] for r in tried if r["lossless"]
                         and r["target_rate"] <= (best or 0)), default=0.0)
    return {"seconds": seconds, "connections": CONNS, "steps": list(steps),
            "ceiling_without_agent": ceiling, "ceiling_with_agent": ceiling_traced,
            "highest_lossless_target": best, "highest_lossless_achieved": best_achieved,
            "first_lossy_target": first_bad, "saturated": saturated,
            "at_double": double, "tried": tried, "agent": agent, "stop_saturated": stopping,
            "ring_bytes": TraceConfig().ringbuf_pages * mmap.PAGESIZE}


def _mean(vals):
    vals = list(vals)
    return sum(vals) / len(vals) if vals else float("nan")


def rows_fixed(res) -> list:
    b, t = res["baseline"], res["traced"]
    g = f"nginx at a fixed {res['rate']:,} requests/s (open loop)"
    spans = sum(x["spans"] for x in t)
    done = sum(x["completed"] for x in t)
    lost_n = sum(x["lost"] for x in t)
    cpu = _mean(x["agent_cpu_pct"] for x in t)
    rss = max(x["agent_rss_max_kb"] for x in t) / 1024
    records = sum(x["records"] for x in t)
    cpu_s = sum(x["agent_cpu_s"] for x in t)
    out = [
        {"group": g, "figure": "achieved requests/s",
         "baseline": f"{_mean(x['rate'] for x in b):.0f}",
         "traced": f"{_mean(x['rate'] for x in t):.0f}", "delta": "", "target": "",
         "ok": None, "note": ""},
        {"group": g, "figure": "latency p50 / p99 (us)",
         "baseline": f"{_mean(x['p50_us'] for x in b):.0f} / {_mean(x['p99_us'] for x in b):.0f}",
         "traced": f"{_mean(x['p50_us'] for x in t):.0f} / {_mean(x['p99_us'] for x in t):.0f}",
         "delta": "", "target": "", "ok": None, "note": ""},
        {"group": g, "figure": "nginx CPU (% of a core)",
         "baseline": f"{_mean(x['nginx_cpu_pct'] for x in b):.1f}",
         "traced": f"{_mean(x['nginx_cpu_pct'] for x in t):.1f}", "delta": "", "target": "",
         "ok": None, "note": ""},
        {"group": g, "figure": "spans / requests answered", "baseline": "",
         "traced": f"{spans} / {done}", "delta": f"{100 * spans / done:.2f}%" if done else "",
         "target": "100%", "ok": spans >= done,
         "note": "" if spans >= done else f"{done - spans} requests without a span"},
        {"group": g, "figure": "lost events", "baseline": "", "traced": f"{lost_n}",
         "delta": "", "target": "0", "ok": lost_n == 0,
         "note": "" if lost_n == 0 else f"{lost_n} lost"},
        {"group": g, "figure": "agent CPU (% of one core)", "baseline": "",
         "traced": f"{cpu:.1f}", "delta": "", "target": f"<= {TARGET_CPU_PCT:.0f}",
         "ok": cpu <= TARGET_CPU_PCT,
         "note": "" if cpu <= TARGET_CPU_PCT else
         f"over by {cpu - TARGET_CPU_PCT:.1f} points ({cpu / TARGET_CPU_PCT:.1f}x)"},
        {"group": g, "figure": "agent CPU per request (us)", "baseline": "",
         "traced": f"{1e6 * cpu_s / done:.1f}" if done else "", "delta": "", "target": "",
         "ok": None,
         "note": (f"{records / done:.2f} records per request, "
                  f"{1e6 * cpu_s / records:.1f} us per record (drain, decode, spans, jsonl)"
                  if done and records else "")},
        {"group": g, "figure": "agent RSS, max while loaded (MB)", "baseline": "",
         "traced": f"{rss:.0f}", "delta": "", "target": f"<= {TARGET_RSS_MB:.0f}",
         "ok": rss <= TARGET_RSS_MB,
         "note": "" if rss <= TARGET_RSS_MB else f"over by {rss - TARGET_RSS_MB:.0f} MB"},
    ]
    return out


def rows_lossless(res) -> list:
    g = "highest lossless rate (nginx, HTTP/1 keep-alive)"
    best = res["highest_lossless_target"] or 0
    ceil_b, ceil_t = res["ceiling_without_agent"], res["ceiling_with_agent"]
    ok = best >= TARGET_LOSSLESS
    note = ""
    if not ok:
        note = f"short by {TARGET_LOSSLESS - best:,}/s"
        if res["saturated"] or ceil_b["rate"] < TARGET_LOSSLESS:
            note += (f"; the generator + nginx reach only {ceil_b['rate']:,.0f}/s on this "
                     "machine without the agent")
    out = [
        {"group": g, "figure": "max rate, generator + nginx (req/s)",
         "baseline": f"{ceil_b['rate']:.0f}", "traced": f"{ceil_t['rate']:.0f}",
         "delta": f"{100 * ceil_t['rate'] / ceil_b['rate']:.1f}%" if ceil_b["rate"] else "",
         "target": "", "ok": None,
         "note": f"traced: spans {ceil_t['spans']}/{ceil_t['completed']}, lost {ceil_t['lost']}"},
        {"group": g, "figure": "highest lossless rate (req/s)", "baseline": "",
         "traced": f"{best:,} (achieved {res['highest_lossless_achieved']:.0f})",
         "delta": "", "target": f">= {TARGET_LOSSLESS:,}", "ok": ok, "note": note},
    ]
    d = res["at_double"]
    if d:
        miss = d["completed"] - d["spans"]
        out.append({
            "group": g, "figure": f"loss at twice that ({2 * best:,}/s asked)", "baseline": "",
            "traced": f"lost {d['lost']}, {max(miss, 0)} requests without span",
            "delta": (f"{100 * max(miss, 0) / d['completed']:.1f}% of requests"
                      if d["completed"] else ""),
            "target": "", "ok": None,
            "note": f"achieved {d['rate']:.0f}/s, agent cpu {d['agent_cpu_pct']:.0f}%"})
    out += rows_saturated(res["stop_saturated"], g)
    return out


def rows_saturated(st, g) -> list:
    """Above capacity the agent stays responsive and its account is exact."""
    exit_s, gap = st["exit_after_sigterm_s"], st["max_stats_gap_s"]
    exact = st["events"] == st["drained"] + st["decode_failed"]
    causes = ", ".join(f"{k} {n}" for k, n in st["lost_by_cause"].items()) or "none"
    return [
        {"group": g, "figure": "saturated: periodic stats (every 0.5 s), longest gap",
         "baseline": "", "traced": f"{gap:.2f} s" if gap is not None else "none",
         "delta": "", "target": f"<= {MAX_STATS_GAP_S:.0f} s",
         "ok": gap is not None and gap <= MAX_STATS_GAP_S,
         "note": f"{st['stats_reports']} reports in {st['loaded_s']:.1f} s of load"},
        {"group": g, "figure": "saturated: SIGTERM to exit", "baseline": "",
         "traced": f"{exit_s:.2f} s (exit code {st['exit_code']})" if exit_s is not None
         else "no SIGTERM sent", "delta": "", "target": f"<= {MAX_STOP_S:.0f} s",
         "ok": exit_s is not None and exit_s <= MAX_STOP_S and st["exit_code"] == 0,
         "note": ""},
        {"group": g, "figure": "saturated: records submitted = drained", "baseline": "",
         "traced": f"{st['events']} = {st['drained']} drained"
                   + (f" + {st['decode_failed']} undecodable" if st["decode_failed"] else ""),
         "delta": "", "target": "exact", "ok": exact,
         "note": f"what the ring could not take, counted by cause: {causes}"},
    ]
