"""Smoke test of the benchmark suite (bench/): its smallest piece end to end.

The per-syscall latency driver (C, compiled with gcc) times write and read 2000 times
each, without the agent and with it (selected by the filter, and excluded by it), and the
report writer turns that into the table and the JSON file.
"""

import json
import os
import sys

import pytest

from conftest import require_bpf

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # `bench` is a top-level package of the repository, not installed
    sys.path.insert(0, REPO)

pytestmark = pytest.mark.bpf


def test_syscall_latency_and_report(tmp_path):
    require_bpf()
    from bench import native, report, syscalls
    if native.compiler() is None:
        pytest.skip("no C compiler: apt-get install gcc")

    res = syscalls.run(n_calls=2000, rounds=1, cases=["tcp_rw"], log=lambda m: None)
    assert set(res["syscalls"]) == {"tcp.write", "tcp.read"}
    for name, r in res["syscalls"].items():
        for cond in ("baseline", "traced", "excluded"):
            assert r[cond]["n"] == 2000, (name, cond)
            assert 0 < r[cond]["median_ns"] <= r[cond]["p99_ns"], (name, cond)
    # The agent saw the selected driver's calls: 2000 timed + 1000 warm-up of each.
    (agent,) = res["agent"]
    assert agent["events"] >= 2 * 3000, agent
    assert agent["records_drained"] >= 2 * 3000 - agent["lost"], agent

    rows = syscalls.rows(res)
    assert [r["figure"] for r in rows][:4] == [
        "tcp.write traced", "tcp.write filter excludes", "tcp.read traced",
        "tcp.read filter excludes"]
    assert all(r["ok"] in (True, False) for r in rows if r["figure"].endswith("traced"))

    out = tmp_path / "bench.json"
    machine = report.machine()
    doc = report.write(str(out), machine, {"syscalls": res}, rows, {"quick": True})
    loaded = json.loads(out.read_text())
    assert loaded["machine"]["cores"] >= 1 and loaded["machine"]["kernel"]
    assert loaded["sections"]["syscalls"]["syscalls"]["tcp.write"]["baseline"]["n"] == 2000
    assert loaded["misses"] == doc["misses"]
    text = report.render(machine, rows, {"quick": True, "duration_s": 1})
    assert "tcp.write traced" in text and "with agent" in text
