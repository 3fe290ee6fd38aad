"""The agent's user-space cost per span, without the kernel or load around it:

    python -m bench.replay [--rate 5000] [--seconds 3] [--runs 5]

Captures nginx's records under the load generator with the real trace probe (HTTP/1
detected in the kernel), then feeds them, in batches of 256, through the spans stage and
the jsonl exporter (to /dev/null) `runs` times, and prints the process CPU time per span
(min and all runs). CPU time, not wall time: the shared VM's steal does not count, but
its speed still drifts by up to 50% over minutes, so compare two versions by alternating
them (A B A B ...), not by runs made at different times.
"""

import argparse
import os
import threading
import time
import types

from .http import Servers
from .rate import loadgen


def capture(rate, seconds) -> list:
    from deeptrace_core.bpf import kernel_defines
    from deeptrace_core.plugins import PluginHost
    from deeptrace_plugins.trace.probe import TraceConfig, TraceProbe

    registry = PluginHost().load_entry_points().registry()
    servers = Servers(python=False)
    try:
        probe = TraceProbe(TraceConfig(comms=[servers.comm("nginx")],
                                       ports=[servers.ports["nginx"]], protocols=["http1"]),
                           types.SimpleNamespace(registry=registry))
        probe.attach(kernel_defines(probe.kernel_fields))
        records, stop = [], threading.Event()

        def drain():
            while not stop.is_set():
                records.extend(probe.poll(50))

        t = threading.Thread(target=drain)
        t.start()
        try:
            loadgen(servers.ports["nginx"], rate, seconds)
            time.sleep(0.5)
        finally:
            stop.set()
            t.join()
            records.extend(probe.poll(0))   # what is left in the ring
            probe.detach()
        return records
    finally:
        servers.stop()


def replay(records, runs=5) -> list:
    from deeptrace_core.plugins import PluginHost
    from deeptrace_plugins.exporters.jsonl import JsonlConfig, JsonlExporter
    from deeptrace_plugins.protocols.stage import SpansConfig, SpanStage

    registry = PluginHost().load_entry_points().registry()
    out = []
    for _ in range(runs + 1):   # the first run warms up
        stage = SpanStage(SpansConfig(), types.SimpleNamespace(registry=registry))
        exporter = JsonlExporter(JsonlConfig(path=os.devnull))
        spans = 0
        t0 = time.process_time()
        for i in range(0, len(records), 256):
            batch = stage.process(records[i:i + 256])
            spans += len(batch)
            if batch:
                exporter.export(batch)
        out.append((spans, time.process_time() - t0))
        exporter.shutdown()
    return out[1:]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.replay", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rate", type=int, default=5000)
    p.add_argument("--seconds", type=int, default=3)
    p.add_argument("--runs", type=int, default=5)
    args = p.parse_args(argv)
    records = capture(args.rate, args.seconds)
    runs = replay(records, args.runs)
    per = sorted(cpu / spans * 1e6 for spans, cpu in runs if spans)
    print(f"records {len(records)}, spans {runs[0][0]}: "
          f"{per[0]:.2f} us of CPU per span (runs: {', '.join(f'{x:.2f}' for x in per)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
