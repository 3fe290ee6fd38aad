"""What the tls probe adds to each SSL_write and SSL_read: `python -m bench.tls`.

bench/tlsloop.c times SSL_write and SSL_read of `--size` bytes over a TCP loopback
connection (client and server in one thread, OpenSSL's own socket BIO, so rule 1 of
tls.bpf.c maps every call) in three conditions, alternating over `--rounds`: nothing
attached; empty programs on the same uprobes and uretprobes (what the kernel's uprobe
mechanism costs before any work of ours); the tls probe attached and drained. Printed:
the median over rounds of each condition's median per call, and what each adds to the bare
call.
"""

import argparse
import os
import statistics
import subprocess
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.tls", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--calls", type=int, default=20000)
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
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
