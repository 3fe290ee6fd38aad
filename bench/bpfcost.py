"""BPF run time per program while bench/syscalls.c drives traced (or excluded) calls:

    python -m bench.bpfcost [--excluded] [--protocols http1] [--calls 20000]
                            [--go] [--no-goroutine] [--compare-go [--rounds 3]]

The kernel's own accounting (sysctl kernel.bpf_stats_enabled=1; run_time_ns / run_cnt of
each program, as `bpftool prog show` reports them) before and after the driver, so the
figure is the probes' cost alone, without the tracepoint machinery or the agent. Tail-called
programs count in the program that called them. Prints per program and the mean of the
enter and exit programs over the driver's data syscalls, and their sum per call (ingress
calls have no enter program): the figures in the commit messages of the kernel-side
optimisations.

``--go`` drives the calls from a Go program instead (bench/go_syscalls.go: Write and
ReadFull on a loopback connection between two of its goroutines; its reads often return
EAGAIN first, cheap exits that lower its mean); ``--no-goroutine`` runs the probe with
``go: false`` (the Go code compiled out: today's programs); ``--compare-go`` runs the four
combinations of (C driver, Go driver) x (goroutines off, on), interleaved for `--rounds`,
and prints the median per data call of each: what reading the goroutine adds.
"""

import argparse
import json
import os
import subprocess
import tempfile

from . import native
from .agent import Agent, trace_config
from .syscalls import OTHER_COMM, TRACED_COMM

# The data syscalls (the last word of their programs' names).
DATA_CALLS = {"read", "write", "readv", "writev", "sendto", "recvfrom", "sendmsg", "recvmsg",
              "sendmmsg", "recvmmsg"}


def _progs() -> dict:
    out = subprocess.run(["bpftool", "prog", "show", "-j"], capture_output=True, text=True,
                         check=True).stdout
    return {p["id"]: (p.get("name", ""), p.get("run_time_ns", 0), p.get("run_cnt", 0))
            for p in json.loads(out)}


def go_driver() -> str:
    """bench/go_syscalls.go built as TRACED_COMM (a Go program's comm is its file name)."""
    from .topology import build_go
    out_dir = tempfile.mkdtemp(prefix="dtb-bpfcost-go-")
    return build_go(os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                 "go_syscalls.go"), out_dir, TRACED_COMM)


def run(calls=20_000, excluded=False, protocols=(), cases="tcp_rw,tcp_vec,tcp_msg",
        go=None, goroutine=True, loop_counter=False) -> dict:
    """go: the path of go_driver()'s program, to drive the calls from Go; cases "epoll":
    the loop counter's program alone (per_call_ns is then its run time per epoll return)."""
    subprocess.run(["sysctl", "-q", "kernel.bpf_stats_enabled=1"], check=True)
    out = tempfile.mktemp(prefix="dtb-bpfcost-", suffix=".jsonl")
    agent = Agent(trace_config(out_path=out, comms=[TRACED_COMM], spans=False, drop_all=True,
                               protocols=protocols, go=goroutine,
                               loop_counter=loop_counter), "bpfcost").start()
    driver_dir = tempfile.mkdtemp(prefix="dtb-bpfcost-")
    try:
        before = _progs()
        if go:
            subprocess.run([go, str(calls)], check=True)
        else:
            subprocess.run([native.build("syscalls"), OTHER_COMM if excluded else TRACED_COMM,
                            driver_dir, str(calls), cases], check=True)
        after = _progs()
    finally:
        final = agent.stop()
        agent.cleanup()
        subprocess.run(["sysctl", "-q", "kernel.bpf_stats_enabled=0"])
        subprocess.run(["rm", "-rf", driver_dir])
        try:
            os.unlink(out)
        except OSError:
            pass
    rows, mean = [], {"enter": [0, 0], "exit": [0, 0]}
    per_call = [0, 0]  # ns of every enter and exit program of the data calls, exits run
    loop_ns = 0        # the loop counter's programs (epoll returns), ns
    for pid, (name, ns, cnt) in after.items():
        if pid not in before:
            continue
        d_ns, d_cnt = ns - before[pid][1], cnt - before[pid][2]
        if d_cnt <= 0:
            continue
        rows.append((name, d_cnt, d_ns / d_cnt))
        if "_epoll_" in name:
            loop_ns += d_ns
            continue
        for kind in mean:
            if (f"sys_{kind}_" in name and name.rsplit("_", 1)[-1] in DATA_CALLS
                    and d_cnt >= calls // 2):
                mean[kind][0] += d_ns
                mean[kind][1] += d_cnt
                per_call[0] += d_ns
                per_call[1] += d_cnt if kind == "exit" else 0
    return {"programs": sorted(rows, key=lambda r: -r[1] * r[2]),
            "mean_ns": {k: v[0] / v[1] if v[1] else None for k, v in mean.items()},
            # Ingress calls have no enter program: this is the figure to compare.
            "per_call_ns": per_call[0] / per_call[1] if per_call[1] else None,
            # The loop counter's run time over the same data calls (a Go program's reads
            # wait in its netpoller: about one epoll return per blocking read).
            "loop_ns_per_call": loop_ns / per_call[1] if per_call[1] else None,
            # Go binaries the agent found and traced (the Go driver's goroutine read needs
            # it found; go_processes counts live ones: the driver may be gone by the end).
            "go_binaries_traced": int(final.get("probe.trace", {}).get("go_binaries_traced", 0))}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.bpfcost", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calls", type=int, default=20_000)
    p.add_argument("--excluded", action="store_true",
                   help="the driver is a process the filter does not select")
    p.add_argument("--protocols", default="", help="comma-separated L7 protocols to detect")
    p.add_argument("--go", action="store_true", help="drive the calls from a Go program")
    p.add_argument("--no-goroutine", action="store_true", help="the probe with go: false")
    p.add_argument("--compare-go", action="store_true",
                   help="C and Go drivers, goroutines off and on, interleaved")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    protocols = [x for x in args.protocols.split(",") if x]
    if args.compare_go:
        return compare_go(args.calls, args.rounds, protocols)
    res = run(args.calls, args.excluded, protocols, go=go_driver() if args.go else None,
              goroutine=not args.no_goroutine)
    for name, cnt, avg in res["programs"]:
        print(f"{name:40} runs {cnt:9d}  mean {avg:7.0f} ns")
    m = res["mean_ns"]
    print("mean per program run: " + ", ".join(f"{k} {v:.0f} ns" for k, v in m.items() if v))
    print(f"per data call (enter + exit): {res['per_call_ns']:.0f} ns")
    return 0


def compare_go(calls, rounds, protocols) -> int:
    import statistics
    go = go_driver()
    combos = [(d, g) for d in ("C", "Go") for g in (False, True)]
    got = {c: [] for c in combos}
    for _ in range(rounds):
        for driver, goroutine in combos:
            res = run(calls, protocols=protocols, go=go if driver == "Go" else None,
                      goroutine=goroutine)
            if res["per_call_ns"] is not None:   # None: no program ran for half the calls
                got[(driver, goroutine)].append(res["per_call_ns"])
    print(f"per data call (enter + exit), median of {rounds} rounds of {calls} calls:")
    for driver in ("C", "Go"):
        if not got[(driver, False)] or not got[(driver, True)]:
            print(f"  {driver:2} driver: no complete round")
            continue
        off = statistics.median(got[(driver, False)])
        on = statistics.median(got[(driver, True)])
        print(f"  {driver:2} driver: goroutines off {off:6.0f} ns, on {on:6.0f} ns, "
              f"added {on - off:+5.0f} ns   (rounds off {[round(x) for x in got[(driver, False)]]}, "
              f"on {[round(x) for x in got[(driver, True)]]})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
