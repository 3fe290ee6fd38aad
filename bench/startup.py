"""Start-up: launch of `python -m deeptrace_core.cli` to the "deeptrace: running" line
(every probe compiled and attached), and the peak RSS by then (VmHWM: BCC's LLVM
compiles in-process, so the compile-time peak is the process's high-water mark).

Two configurations, interleaved: every probe the installed plugins register (the trace
probe with every registered protocol's kernel detector), and the trace probe alone.
"""

import os
import re
import tempfile

from .agent import Agent, all_probes_config, trace_config

TARGET_S = 3.0


def run(repeats=3, trace_only=True, log=print) -> dict:
    out = tempfile.mktemp(prefix="dtb-startup-", suffix=".jsonl")
    all_cfg, probes = all_probes_config(out)
    configs = {"all built-in probes": all_cfg,
               "trace probe only": trace_config(out_path=out, spans=False,
                                                 comms=["dtb-startup"], log_level="info")}
    if not trace_only:
        del configs["trace probe only"]
    res = {name: [] for name in configs}
    errors = {}
    for i in range(repeats):
        names = list(configs) if i % 2 == 0 else list(reversed(configs))
        for name in names:
            agent = Agent(configs[name], "startup")
            try:
                agent.start()
                m = re.search(r"attached .* in ([\d.]+) s", agent.text())
                res[name].append({"startup_s": agent.startup_s,
                                  "attach_s": float(m.group(1)) if m else None,
                                  "peak_rss_kb": agent.hwm_at_start_kb,
                                  "rss_after_start_kb": agent.rss_kb()})
                log(f"  startup: {name}: {agent.startup_s:.2f}s "
                    f"(compile+attach {res[name][-1]['attach_s']}s), "
                    f"peak RSS {agent.hwm_at_start_kb / 1024:.0f} MB")
            except RuntimeError as exc:
                errors[name] = str(exc)[-2000:]
                log(f"  startup: {name}: failed: {str(exc)[:300]}")
            finally:
                agent.stop()
                agent.cleanup()
    try:
        os.unlink(out)
    except OSError:
        pass
    return {"repeats": repeats, "probes": probes, "runs": res, "errors": errors}


def rows(res) -> list:
    out = []
    for name, runs in res["runs"].items():
        if not runs:
            out.append({"group": "start-up", "figure": f"{name}: launch to attached (s)",
                        "baseline": "", "traced": "failed", "delta": "",
                        "target": f"<= {TARGET_S:.0f}" if name.startswith("all") else "",
                        "ok": False, "note": res["errors"].get(name, "")[:120]})
            continue
        times = sorted(r["startup_s"] for r in runs)
        med = times[len(times) // 2]
        gated = name.startswith("all")
        ok = med <= TARGET_S
        attach = sorted(r["attach_s"] for r in runs if r["attach_s"] is not None)
        notes = []
        if gated and not ok:
            notes.append(f"over by {med - TARGET_S:.2f} s ({med / TARGET_S:.1f}x)")
        if attach:
            notes.append(f"compile+attach {attach[len(attach) // 2]:.2f} s, the rest is "
                         "interpreter, imports, config")
        if gated:
            notes.append(f"probes: {', '.join(res['probes'])}")
        out.append({
            "group": "start-up", "figure": f"{name}: launch to attached (s)",
            "baseline": "", "traced": f"{med:.2f} (min {times[0]:.2f}, max {times[-1]:.2f})",
            "delta": "", "target": f"<= {TARGET_S:.0f}" if gated else "",
            "ok": ok if gated else None, "note": "; ".join(notes)})
        peak = max(r["peak_rss_kb"] for r in runs) / 1024
        after = max(r["rss_after_start_kb"] for r in runs) / 1024
        out.append({
            "group": "start-up", "figure": f"{name}: peak RSS while compiling (MB)",
            "baseline": "", "traced": f"{peak:.0f}", "delta": "", "target": "", "ok": None,
            "note": f"RSS once attached {after:.0f} MB"})
    return out
