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


def test_bpf_cost_and_replay_tools():
    """bench.bpfcost sees the trace probe's enter/exit programs run once per traced call
    (and the excluded driver's calls only in the cheap path); bench.replay turns captured
    nginx records into one span per request."""
    require_bpf()
    from bench import bpfcost, native, replay
    if native.compiler() is None:
        pytest.skip("no C compiler: apt-get install gcc")
    res = bpfcost.run(calls=2000, cases="tcp_rw")
    runs = {name: cnt for name, cnt, _ in res["programs"]}
    assert runs["tracepoint__syscalls__sys_exit_write"] >= 3000   # 2000 timed + warm-up
    assert runs["tracepoint__syscalls__sys_exit_read"] >= 3000
    assert "tracepoint__syscalls__sys_enter_read" not in runs     # ingress: exit only
    assert res["mean_ns"]["enter"] > 0 and res["mean_ns"]["exit"] > 0
    assert res["per_call_ns"] > res["mean_ns"]["exit"] / 2
    records = replay.capture(rate=500, seconds=1)
    assert len(records) >= 2 * 450                 # a request and a response per request
    (spans, cpu), = replay.replay(records, runs=1)
    # Each request is one read and one write; a read of 0 bytes is a connection closing.
    assert spans * 2 == sum(1 for r in records if r.direction != "none" and r.bytes > 0)
    assert cpu > 0


def test_loop_counter_cost_is_measured_and_switched_off_by_config():
    """bench.runtimes' loop-counter figure: the driver's epoll case runs the counter's
    program once per epoll_wait return with `loop_counter: true`, and no such program
    exists with false."""
    require_bpf()
    from bench import bpfcost, native
    if native.compiler() is None:
        pytest.skip("no C compiler: apt-get install gcc")
    on = bpfcost.run(calls=2000, cases="epoll", goroutine=False, loop_counter=True)
    runs = {name: cnt for name, cnt, _ in on["programs"]}
    assert runs["tracepoint__syscalls__sys_exit_epoll_wait"] >= 3000  # 2000 + warm-up
    off = bpfcost.run(calls=2000, cases="epoll", goroutine=False, loop_counter=False)
    assert not [name for name, _, _ in off["programs"] if "epoll" in name]


def test_tracepoint_cost_tool():
    """bench.tpcost times getppid under each condition it names (no timing asserted)."""
    require_bpf()
    from bench import native, tpcost
    if native.compiler() is None:
        pytest.skip("no C compiler: apt-get install gcc")
    res = tpcost.run(rounds=1)
    assert set(res) == set(tpcost.CONDITIONS)
    assert all(ns > 0 for ns in res.values())


def test_saturated_rows_judge_responsiveness_and_the_account():
    """The 'above capacity' rows pass only when stats kept coming, SIGTERM ended the
    agent cleanly in time, and every submitted record was drained."""
    from bench.rate import rows_saturated
    good = {"exit_after_sigterm_s": 1.2, "max_stats_gap_s": 0.8, "exit_code": 0,
            "events": 100, "drained": 98, "decode_failed": 2, "lost": 7,
            "lost_by_cause": {"ringbuf_full": 7}, "stats_reports": 4, "loaded_s": 2.0}
    assert [r["ok"] for r in rows_saturated(good, "g")] == [True, True, True]
    assert "ringbuf_full 7" in rows_saturated(good, "g")[2]["note"]
    for change, row in (({"max_stats_gap_s": 3.0}, 0), ({"max_stats_gap_s": None}, 0),
                        ({"exit_after_sigterm_s": 9.0}, 1), ({"exit_code": -9}, 1),
                        ({"exit_after_sigterm_s": None}, 1), ({"drained": 97}, 2)):
        assert rows_saturated({**good, **change}, "g")[row]["ok"] is False, change
