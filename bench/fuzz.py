"""Fuzzing job (`make fuzz`): every protocol parser and the Python detectors under atheris
(libFuzzer, coverage-guided), a million inputs each by default.

    python -m bench.fuzz [--inputs N] [--only http1,redis,...] [--seconds-cap S]
                         [--jobs J] [--reseed] [--out bench/results/fuzz.json]

Targets and the input format: bench/fuzz_targets.py. Each target runs in its own process
(libFuzzer ends the process when done), J at a time (default: one per core), seeded with
the conversations the protocol tests feed their parsers (bench/fuzz_seeds.py, recorded
once into build/fuzz/seeds; --reseed records them again) plus the crash corpus. The
corpus the fuzzer grows is kept in build/fuzz/<target>/corpus for the next run.

A crash is an exception out of the parser API, a broken bound or message contract, or an
input slower than its time limit (50 ms per 4 KB, best of three). Instrumented code is
several times slower, unevenly, so time is judged afterwards: each worker keeps the
SLOWEST inputs for their size and the job times them again uninstrumented. Each new kind
of crash is saved as tests/fuzz_corpus/<target>/<sha1 prefix>.bin (the input itself),
which tests/test_fuzz_corpus.py replays in the normal test run. libFuzzer's own
artifacts (a crash in C code, a hang past -timeout, out of memory) are copied there too,
and the target is restarted for the inputs it has left.

Prints a table per target (inputs, inputs/s, coverage edges and features as libFuzzer
counts them in the instrumented parser code, crashes, the slowest input's time and its
share of its limit) and writes bench/results/fuzz.json with the machine's description,
after each target (a long run's figures so far survive an interruption). Exit status 1
if anything crashed.
"""

import argparse
import functools
import glob
import hashlib
import heapq
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
import traceback

from bench import fuzz_targets as ft

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
WORK = os.path.join(REPO, "build", "fuzz")
CORPUS = os.path.join(REPO, "tests", "fuzz_corpus")
MAX_LEN = 4096          # bytes per input: a few syscalls' captures (1 KB each by default)
HANG = 20               # seconds one input may run before libFuzzer calls it a hang
MAX_SAVED = 20          # crash files one run may add per target (one per kind of crash)
RESTARTS = 3
SLOWEST = 50            # inputs kept per target, slowest for their size, to time again


def log(msg):
    print(msg, file=sys.stderr, flush=True)


# -- the worker: one target under atheris ------------------------------------------------

class Worker:
    def __init__(self, name, target, runs, stats_path):
        self.name, self.target, self.runs = name, target, runs
        self.stats_path = stats_path
        self.n = self.crashing = 0
        self.slowest = []        # min-heap of (time / time limit, saved input)
        self.slow_dir = os.path.join(WORK, name, "slowest")
        os.makedirs(self.slow_dir, exist_ok=True)
        self.kinds = {}          # signature -> saved file
        self.t0 = time.monotonic()
        self.next_write = 0.0

    def one(self, data):
        self.n += 1
        t0 = time.perf_counter()
        try:
            self.target(data)
        except Exception as exc:  # noqa: BLE001 - every exception is a finding
            self.crashing += 1
            self._save(data, exc)
        else:
            # Instrumented code runs ~10x slower, unevenly: time is judged afterwards,
            # uninstrumented, on the inputs slowest for their size (Job.check_slowest).
            ratio = (time.perf_counter() - t0) / ft.time_limit(data)
            if len(self.slowest) < SLOWEST or ratio > self.slowest[0][0]:
                self._keep_slow(ratio, data)
        if self.n >= self.runs or time.monotonic() >= self.next_write:
            self.write()

    def _keep_slow(self, ratio, data):
        path = os.path.join(self.slow_dir, hashlib.sha1(data).hexdigest()[:12] + ".bin")
        if any(p == path for _, p in self.slowest):
            return
        with open(path, "wb") as f:
            f.write(data)
        if len(self.slowest) < SLOWEST:
            heapq.heappush(self.slowest, (ratio, path))
        else:
            _, old = heapq.heapreplace(self.slowest, (ratio, path))
            os.remove(old)

    def _save(self, data, exc):
        sig = signature(exc)
        if sig in self.kinds or len(self.kinds) >= MAX_SAVED:
            return
        path = save_crash(self.name, data)
        self.kinds[sig] = {"file": os.path.relpath(path, REPO), "signature": sig,
                           "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
        log(f"fuzz {self.name}: CRASH {sig} -> {os.path.relpath(path, REPO)}\n"
            + "".join(traceback.format_exception(exc)[-6:]))
        self.write()

    def write(self):
        self.next_write = time.monotonic() + 2.0
        stats = {"runs": self.n, "crashing_inputs": self.crashing,
                 "seconds": time.monotonic() - self.t0, "crashes": list(self.kinds.values())}
        tmp = self.stats_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(stats, f)
        os.replace(tmp, self.stats_path)


def signature(exc) -> str:
    """A crash's kind: its type and the innermost frame of our code (or its message
    without numbers, for contract errors)."""
    if isinstance(exc, ft.ContractError):
        return "ContractError: " + re.sub(r"\d+", "N", str(exc).split(":")[0] + ":"
                                          + str(exc).split(":", 1)[-1][:40])
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if "/work/" in f.filename and "/.venv/" not in f.filename]
    f = (ours or frames or [None])[-1]
    where = f"{os.path.relpath(f.filename, REPO)}:{f.lineno}" if f else "?"
    return f"{type(exc).__name__} at {where}"


def save_crash(target, data) -> str:
    d = os.path.join(CORPUS, target)
    os.makedirs(d, exist_ok=True)
    path = os.path.join(d, hashlib.sha1(data).hexdigest()[:12] + ".bin")
    if not os.path.exists(path):
        with open(path, "wb") as f:
            f.write(data)
    return path


def run_worker(args):
    import atheris
    name = args.worker
    with atheris.instrument_imports(include=ft.COVERED):
        reg = ft.registry()          # imports the plugins: their code is instrumented
        target = ft.make(name, reg)
    worker = Worker(name, target, args.inputs, args.stats)
    work = os.path.join(WORK, name)
    argv = [sys.argv[0], f"-runs={args.inputs}", f"-max_len={MAX_LEN}", f"-timeout={HANG}",
            "-rss_limit_mb=4096", "-print_final_stats=1", f"-artifact_prefix={work}/"]
    if args.seconds_cap:
        argv.append(f"-max_total_time={int(args.seconds_cap)}")
    dirs = [os.path.join(work, "corpus"), os.path.join(WORK, "seeds", name),
            os.path.join(CORPUS, name)]
    for d in dirs:
        os.makedirs(d, exist_ok=True)
    atheris.Setup(argv + dirs, worker.one)
    atheris.Fuzz()       # never returns: libFuzzer exits once the runs are done


# -- the job ------------------------------------------------------------------------------

def seeds(reseed):
    out = os.path.join(WORK, "seeds")
    if os.path.isdir(out) and not reseed:
        return
    shutil.rmtree(out, ignore_errors=True)
    log("fuzz: recording seed conversations from the protocol tests (~1 minute)")
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    py = sys.executable
    tests = sorted(glob.glob(os.path.join(REPO, "tests", "test_proto_*.py")) +
                   glob.glob(os.path.join(REPO, "tests", "test_tls_units.py")))  # tls parser
    subprocess.run([py, "-m", "bench.fuzz_seeds", out, "-k", "not kernel", *tests],
                   cwd=REPO, env=env, stdout=subprocess.DEVNULL, check=False)
    subprocess.run([py, "-m", "bench.fuzz_seeds", out, "-k", "not kernel", "tests"],
                   cwd=os.path.join(REPO, "plugins", "protocols", "redis"), env=env,
                   stdout=subprocess.DEVNULL, check=False)


class Job:
    """One target's worker process, restarted after a hard crash for the runs left."""

    def __init__(self, name, inputs, seconds_cap):
        self.name, self.inputs, self.cap = name, inputs, seconds_cap
        self.work = os.path.join(WORK, name)
        os.makedirs(self.work, exist_ok=True)
        self.done = {"runs": 0, "crashing_inputs": 0, "seconds": 0.0, "crashes": [],
                     "artifacts": [], "restarts": 0, "max_ms": 0.0, "max_of_limit": 0.0}
        shutil.rmtree(os.path.join(self.work, "slowest"), ignore_errors=True)
        self.cov = self.ft_count = None
        self.proc = None
        self.started = None

    def start(self):
        left = self.inputs - self.done["runs"]
        cap = self.cap - self.done["seconds"] if self.cap else None
        self.stats = os.path.join(self.work, "stats.json")
        if os.path.exists(self.stats):
            os.remove(self.stats)
        cmd = [sys.executable, "-m", "bench.fuzz", "--worker", self.name, "--inputs", str(left),
               "--stats", self.stats]
        if cap:
            cmd += ["--seconds-cap", str(max(1, int(cap)))]
        self.log_path = os.path.join(self.work, "fuzz.log")
        self.started = time.monotonic()
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL,
                                     stderr=open(self.log_path, "w"))

    def finished(self) -> bool:
        """True once the target is done (False: still running, or restarted)."""
        if self.proc.poll() is None:
            return False
        stats = {}
        if os.path.exists(self.stats):
            with open(self.stats) as f:
                stats = json.load(f)
        with open(self.log_path, errors="replace") as f:
            text = f.read()
        executed = re.search(r"stat::number_of_executed_units: (\d+)", text)
        # libFuzzer's count when it ended normally (the worker's own is up to 2 s old)
        self.done["runs"] += int(executed.group(1)) if executed else stats.get("runs", 0)
        self.done["crashing_inputs"] += stats.get("crashing_inputs", 0)
        self.done["seconds"] += time.monotonic() - self.started
        self.done["crashes"] += stats.get("crashes", [])
        cov = re.findall(r"cov: (\d+) ft: (\d+)", text)
        if cov:
            self.cov, self.ft_count = int(cov[-1][0]), int(cov[-1][1])
        if executed is None:       # libFuzzer stopped on a crash of its own: keep it
            self._artifacts(text)
            if self.done["restarts"] < RESTARTS and self.done["runs"] < self.inputs:
                self.done["restarts"] += 1
                log(f"fuzz {self.name}: worker died (exit {self.proc.returncode}), restarting")
                self.start()
                return False
        return True

    def check_slowest(self, reg):
        """Time again, uninstrumented, the inputs slowest for their size: one over its
        limit (best of three) is a crash."""
        target = ft.make(self.name, reg)
        for path in sorted(glob.glob(os.path.join(self.work, "slowest", "*.bin"))):
            with open(path, "rb") as f:
                data = f.read()
            try:
                took = ft.replay(target, data)
            except Exception as exc:  # noqa: BLE001 - too slow (or fails only here)
                saved = save_crash(self.name, data)
                self.done["crashes"].append({"file": os.path.relpath(saved, REPO),
                                             "signature": signature(exc),
                                             "error": f"{type(exc).__name__}: {exc}"})
                log(f"fuzz {self.name}: SLOW {exc} -> {os.path.relpath(saved, REPO)}")
                continue
            self.done["max_ms"] = max(self.done["max_ms"], round(took * 1000, 2))
            self.done["max_of_limit"] = max(self.done["max_of_limit"],
                                            round(took / ft.time_limit(data), 3))

    def _artifacts(self, text):
        found = glob.glob(os.path.join(self.work, "crash-*")) + \
            glob.glob(os.path.join(self.work, "timeout-*")) + \
            glob.glob(os.path.join(self.work, "oom-*"))
        for art in found:
            with open(art, "rb") as f:
                path = save_crash(self.name, f.read())
            kind = os.path.basename(art).split("-")[0]
            self.done["artifacts"].append({"file": os.path.relpath(path, REPO), "kind": kind})
            os.remove(art)
        if not found:
            self.done["artifacts"].append({"file": None, "kind": "died",
                                           "log_tail": text[-2000:]})

    def row(self) -> dict:
        d = self.done
        return {"target": self.name, "inputs": d["runs"], "seconds": round(d["seconds"], 1),
                "inputs_per_s": round(d["runs"] / d["seconds"]) if d["seconds"] else 0,
                "coverage_edges": self.cov, "coverage_features": self.ft_count,
                "crashing_inputs": d["crashing_inputs"],
                "crash_kinds": len(d["crashes"]) + len(d["artifacts"]),
                "max_ms": d["max_ms"], "max_of_time_limit": d["max_of_limit"],
                "crashes": d["crashes"], "artifacts": d["artifacts"],
                "restarts": d["restarts"]}


def table(rows) -> str:
    head = ("target", "inputs", "seconds", "inputs/s", "cov edges", "features", "crashes",
            "kinds", "slowest ms", "of limit")
    lines = [[r["target"], f"{r['inputs']:,}", f"{r['seconds']:.0f}", f"{r['inputs_per_s']:,}",
              str(r["coverage_edges"]), str(r["coverage_features"]),
              f"{r['crashing_inputs']:,}", str(r["crash_kinds"]), f"{r['max_ms']:.1f}",
              f"{r['max_of_time_limit']:.0%}"] for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *lines)]
    fmt = "  ".join(f"{{:<{w}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
    return "\n".join(fmt.format(*x) for x in [head, *lines])


@functools.cache
def machine() -> dict:
    from bench import report
    return report.machine()


def write(args, names, jobs, t0) -> list:
    """Write the results file (the targets done so far); returns its rows."""
    rows = [j.row() for j in jobs]
    result = {"generated": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": machine(),
              "parameters": {"inputs": args.inputs, "seconds_cap": args.seconds_cap,
                             "jobs": args.jobs, "max_len": MAX_LEN, "targets": names},
              "duration_s": round(time.monotonic() - t0, 1), "rows": rows}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.fuzz", description=__doc__.split("\n")[0])
    ap.add_argument("--inputs", type=int, default=1_000_000, help="inputs per target")
    ap.add_argument("--only", default="", help="comma-separated targets: " + ",".join(ft.TARGETS))
    ap.add_argument("--seconds-cap", type=float, default=0,
                    help="stop each target after this many seconds (0: no cap)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--reseed", action="store_true", help="record the seed corpora again")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "fuzz.json"))
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--stats", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return run_worker(args)
    names = [n for n in args.only.split(",") if n] or list(ft.TARGETS)
    unknown = [n for n in names if n not in ft.TARGETS]
    if unknown:
        ap.error(f"unknown target {unknown[0]!r} (allowed: {', '.join(ft.TARGETS)})")
    if importlib.util.find_spec("atheris") is None:   # the workers need it: say so first
        ap.error("atheris is not installed: run scripts/setup.sh (or pip install atheris)")
    t0 = time.monotonic()
    seeds(args.reseed)
    reg = ft.registry()
    todo, running, jobs = list(names), [], []
    while todo or running:
        while todo and len(running) < args.jobs:
            job = Job(todo.pop(0), args.inputs, args.seconds_cap)
            log(f"fuzz {job.name}: {args.inputs:,} inputs")
            job.start()
            running.append(job)
            jobs.append(job)
        time.sleep(0.5)
        for job in [j for j in running if j.finished()]:
            running.remove(job)
            job.check_slowest(reg)
            r = job.row()
            log(f"fuzz {job.name}: {r['inputs']:,} inputs in {r['seconds']:.0f} s, "
                f"{r['crash_kinds']} kinds of crash")
            write(args, names, [j for j in jobs if j not in running], t0)  # so far
    rows = write(args, names, jobs, t0)
    print(table(rows))
    log(f"fuzz: wrote {os.path.relpath(args.out)} ({time.monotonic() - t0:.0f} s)")
    return 1 if any(r["crash_kinds"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
