"""The bench report: the machine, one table, and a JSON file with every raw figure.

A row is {group, figure, baseline, traced, delta, target, ok, note}: display strings
(baseline: without the agent; traced: with it; delta: difference or ratio), `ok` True
(target met), False (missed: the note says by how much) or None (no target: context).
"""

import json
import os
import platform
import re
import shutil
import subprocess
import time

COLUMNS = (("figure", "figure"), ("baseline", "without agent"), ("traced", "with agent"),
           ("delta", "delta / ratio"), ("target", "target"), ("result", "result"))


def _first_line(cmd) -> str:
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
        text = (p.stdout or p.stderr).strip()
        return text.splitlines()[0] if text else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def machine() -> dict:
    """CPU model, cores, kernel, memory, OS, load, and the tools' versions."""
    info = {"hostname": platform.node(), "kernel": platform.release(),
            "arch": platform.machine(), "cores": os.cpu_count(),
            "python": platform.python_version()}
    try:
        with open("/proc/cpuinfo") as f:
            m = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.M)
            info["cpu"] = m.group(1).strip() if m else ""
    except OSError:
        pass
    try:
        with open("/proc/meminfo") as f:
            m = re.search(r"^MemTotal:\s+(\d+) kB", f.read(), re.M)
            info["memory_gb"] = round(int(m.group(1)) / 1024 / 1024, 1)
    except (OSError, AttributeError):
        pass
    try:
        with open("/etc/os-release") as f:
            m = re.search(r'^PRETTY_NAME="?([^"\n]+)', f.read(), re.M)
            info["os"] = m.group(1) if m else ""
    except OSError:
        pass
    try:
        with open("/sys/devices/system/clocksource/clocksource0/current_clocksource") as f:
            info["clocksource"] = f.read().strip()
    except OSError:
        pass
    info["virtualization"] = _first_line(["systemd-detect-virt"]) or "unknown"
    info["loadavg_start"] = list(os.getloadavg())
    try:
        import bcc
        info["bcc"] = getattr(bcc, "__version__", "") or _dpkg("python3-bpfcc")
    except Exception:
        info["bcc"] = _dpkg("python3-bpfcc")
    info["nginx"] = _first_line(["nginx", "-v"])
    info["wrk"] = _first_line(["wrk", "-v"])
    info["gcc"] = _first_line(["gcc", "--version"])
    return info


def _dpkg(pkg) -> str:
    if not shutil.which("dpkg-query"):
        return ""
    return _first_line(["dpkg-query", "-W", "-f=${Version}", pkg])


def describe(m: dict) -> str:
    text = (f"{m.get('cpu', '?')}, {m.get('cores')} cores ({m.get('virtualization')}), "
            f"{m.get('memory_gb')} GB RAM, {m.get('os', '')}, kernel {m.get('kernel')}, "
            f"Python {m.get('python')}, BCC {m.get('bcc')}, {m.get('nginx')}")
    load, end = m.get("loadavg_start"), m.get("loadavg_end")
    if load:
        text += f"; load average {load[0]:.1f} at start"
        if end:
            text += f", {end[0]:.1f} at end"
    return text


def _result(ok) -> str:
    return {True: "pass", False: "MISS", None: ""}[ok]


def table(rows: list, width_cap=52) -> str:
    """One plain-text table; rows grouped under their group's title; notes under misses
    and context rows, indented."""
    cells = [[r["figure"], r["baseline"], r["traced"], r["delta"], r["target"],
              _result(r["ok"])] for r in rows]
    widths = [min(width_cap, max([len(h)] + [len(str(c[i])) for c in cells]))
              for i, (_, h) in enumerate(COLUMNS)]

    def line(vals):
        return "  ".join(str(v)[:w].ljust(w) for v, w in zip(vals, widths)).rstrip()

    out = [line([h for _, h in COLUMNS]), line(["-" * w for w in widths])]
    group = None
    for r, c in zip(rows, cells):
        if r["group"] != group:
            group = r["group"]
            out.append(f"[{group}]")
        out.append(line(c))
        if r.get("note"):
            out.append(" " * 4 + "note: " + r["note"])
    return "\n".join(out)


def misses(rows: list) -> list:
    return [f"{r['group']}: {r['figure']}: {r['traced']} vs target {r['target']}"
            + (f" ({r['note']})" if r.get("note") else "") for r in rows if r["ok"] is False]


def write(path: str, machine_info: dict, sections: dict, rows: list, meta: dict) -> dict:
    doc = {"generated": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": machine_info,
           **meta, "rows": rows, "misses": misses(rows), "sections": sections}
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1, default=_jsonable)
        f.write("\n")
    os.replace(tmp, path)
    return doc


def _jsonable(o):
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, (set, tuple)):
        return list(o)
    return str(o)


def render(machine_info: dict, rows: list, meta: dict) -> str:
    head = [f"DeepTrace bench ({'quick' if meta.get('quick') else 'full'}), "
            f"{meta.get('duration_s', 0):.0f} s, {meta.get('generated', '')}",
            "machine: " + describe(machine_info), ""]
    missed = [r for r in rows if r["ok"] is False]
    tail = ["", f"targets missed: {len(missed)} of {sum(r['ok'] is not None for r in rows)}"
            if missed else "all targets met"]
    by_group: dict = {}
    for r in missed:
        by_group.setdefault(r["group"], []).append(r)
    for group, rs in by_group.items():
        if len(rs) > 3:  # the per-syscall rows: one line
            tail.append(f"  - {group}: {len(rs)} rows miss: "
                        + ", ".join(f"{r['figure']} {r['delta']}" for r in rs))
        else:
            tail += [f"  - {group}: {r['figure']}: {r['traced']} vs {r['target']}"
                     + (f" ({r['note']})" if r.get("note") else "") for r in rs]
    return "\n".join(head) + table(rows) + "\n" + "\n".join(tail)
