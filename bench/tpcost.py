"""What a syscall tracepoint costs before any work of ours: `python -m bench.tpcost`.

Times getppid() (bench/tploop.c, the fastest of 20 runs of 20,000 calls) with nothing
attached, with an empty BPF program on another syscall's tracepoint (the slow syscall path
every task takes once any syscall tracepoint is on), and with empty programs on
getppid's own enter, exit, or both. Conditions alternate over `--rounds`; the minimum of
each is printed, as ns per call and as added to the bare call. This is the floor under
the trace probe's per-call figures, and why ingress calls have no enter program.
"""

import argparse
import subprocess

from . import native

EMPTY = "TRACEPOINT_PROBE(syscalls, sys_%s_%s) { return 0; }\n"
CONDITIONS = {
    "nothing attached": (),
    "another syscall's enter": (("enter", "getpid"),),
    "getppid enter": (("enter", "getppid"),),
    "getppid exit": (("exit", "getppid"),),
    "getppid enter + exit": (("enter", "getppid"), ("exit", "getppid")),
}


def run(rounds=5) -> dict:
    from bcc import BPF

    loop = native.build("tploop")
    got = {name: [] for name in CONDITIONS}
    for _ in range(rounds):
        for name, points in CONDITIONS.items():
            b = BPF(text="".join(EMPTY % p for p in points).encode()) if points else None
            try:
                got[name].append(float(subprocess.run([loop], capture_output=True, text=True,
                                                      check=True).stdout))
            finally:
                if b is not None:
                    b.cleanup()
    return {name: min(v) for name, v in got.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.tpcost", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5)
    res = run(p.parse_args(argv).rounds)
    bare = res["nothing attached"]
    for name, ns in res.items():
        print(f"{name:26} {ns:7.1f} ns per call  {ns - bare:+7.1f} ns")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
