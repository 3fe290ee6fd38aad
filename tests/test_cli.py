"""The deeptrace command as a user runs it: the example config end to end, SIGTERM,
bad configs, and the one-line answer without root."""

import base64
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from conftest import EXAMPLE_CONFIG, Script, require_bpf

DEEPTRACE = [sys.executable, "-m", "deeptrace_core.cli"]


def loaded_prog_ids():
    out = subprocess.run(["bpftool", "prog", "show", "-j"], capture_output=True, text=True,
                         check=True).stdout
    return {p["id"] for p in json.loads(out)}


def prog_ids_held_by(pid):
    """BPF programs a process holds: the prog_id of each of its BPF fds (other agents on
    the machine do not count)."""
    ids = set()
    for fd in os.listdir(f"/proc/{pid}/fdinfo"):
        try:
            with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                for line in f:
                    if line.startswith("prog_id:"):
                        ids.add(int(line.split()[1]))
        except OSError:
            pass
    return ids


NAMED = """
import json, socket, sys
def rename(name):
    with open('/proc/self/comm', 'w') as f:
        f.write(name)
"""


@pytest.mark.bpf
def test_example_config_end_to_end_and_sigterm_detaches(tmp_path):
    require_bpf()
    cfg = tmp_path / "agent.yaml"
    # Raw records keep their payload bytes only when the redaction policy says so.
    cfg.write_text(EXAMPLE_CONFIG + "redaction:\n  payloads: keep\n")
    agent = subprocess.Popen([*DEEPTRACE, "--config", str(cfg)], stderr=subprocess.PIPE,
                             text=True, env={**os.environ, "OUT": str(tmp_path)},
                             start_new_session=True)   # as under systemd: its own session
    try:
        line = agent.stderr.readline()
        params = set()   # asyncio: the task_step_impl entry programs attached (by position)
        while "running" not in line:
            assert line, f"agent exited: {agent.wait()}"
            if "asyncio tasks traced in" in line:
                params.add(line.rsplit("(task is parameter ", 1)[1].split()[0])
            line = agent.stderr.readline()
        # every thread of the agent, and its session's autogroup, run at the default
        # niceness (agent.nice: 10)
        for tid in os.listdir(f"/proc/{agent.pid}/task"):
            with open(f"/proc/{agent.pid}/task/{tid}/stat") as f:
                assert int(f.read().rpartition(")")[2].split()[16]) == 10
        with open(f"/proc/{agent.pid}/autogroup") as f:
            assert f.read().split()[-1] == "10"
        attached = prog_ids_held_by(agent.pid)
        # exit of 5 ingress syscalls, enter+exit of 9 others, enter of close/dup2/dup3,
        # the 4 exit bodies they call; Go: sched_process_exec and the 5 uprobe programs
        # (loaded at start-up, so every kernel's verifier checks them); where a process maps
        # a CPython _asyncio, its uprobes: the step's entry (one program per parameter
        # position), its return and Task.__init__. No epoll programs: loop_counter is off.
        assert len(attached) == 36 + (len(params) + 2 if params else 0)
        assert attached <= loaded_prog_ids()

        server = Script(NAMED + """
rename('myserver')
srv = socket.socket(); srv.bind(('127.0.0.1', 0)); srv.listen(1)
print(json.dumps({"port": srv.getsockname()[1]}), flush=True)
s, _ = srv.accept(); got = b''
while len(got) < 1000: got += s.recv(4096)
s.send(b'ok'); s.close()
print(json.dumps({"pid": 0}), flush=True)
""")
        server.go()
        port = server.line()["port"]
        client = Script(NAMED + f"""
rename('myclient')
c = socket.create_connection(('127.0.0.1', {port}))
c.sendall(bytes(range(250)) * 4); c.recv(10); c.close()
print(json.dumps({{}}), flush=True)
""")
        other = Script(NAMED + f"""
rename('notselected')
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.sendto(b'nope', ('127.0.0.1', 9))
print(json.dumps({{}}), flush=True)
""")
        client.go(), other.go()
        client.finish(), server.finish(), other.finish()
        time.sleep(0.5)  # the agent drains its ring buffer every poll_ms (100 ms)
    finally:
        agent.send_signal(signal.SIGTERM)
        err = agent.communicate(timeout=20)[1]
    assert agent.returncode == 0, err
    assert "deeptrace final: probe.trace: events=" in err
    # Programs that sat in a prog array (the tail-called exit bodies) are freed by the
    # kernel's deferred work once the array's last fd closes: allow it a moment.
    deadline = time.monotonic() + 5
    while attached & loaded_prog_ids() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert attached & loaded_prog_ids() == set(), "probes left loaded after SIGTERM"

    records = [json.loads(line) for line in (tmp_path / "records.jsonl").read_text().splitlines()]
    assert {r["comm"] for r in records} == {"myserver", "myclient"}
    fields = {"ts_enter_ns", "ts_exit_ns", "pid", "tid", "comm", "fd", "syscall", "direction",
              "l4", "family", "local_addr", "local_port", "remote_addr", "remote_port", "bytes",
              "tcp_seq_start", "tcp_seq_end", "payload", "conn_id"}
    assert fields <= set(records[0])
    big = next(r for r in records if r["comm"] == "myclient" and r["syscall"] == "sendto")
    assert big["bytes"] == 1000 and big["remote_port"] == port
    assert base64.b64decode(big["payload"]) == (bytes(range(250)) * 4)[:512]
    received = sum(r["bytes"] for r in records
                   if r["comm"] == "myserver" and r["direction"] == "ingress")
    assert received == 1000
    assert not any(r["comm"] == "notselected" for r in records)


def test_without_root_one_clear_line(tmp_path, monkeypatch, capsys):
    from deeptrace_core import cli
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(EXAMPLE_CONFIG)
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert cli.main(["--config", str(cfg)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "root" in err and "Traceback" not in err


BAD = [
    ("probes:\n  trace:\n    payload_byte: 3\npipelines:\n  m: {probes: [trace], exporters: [console]}\n"
     "exporters:\n  console: {}\n",
     ":3: probes.trace.payload_byte: unknown key", "payload_bytes"),
    ("probes:\n  trace:\n    payload_bytes: lots\nexporters:\n  console: {}\npipelines:\n"
     "  m: {probes: [trace], exporters: [console]}\n",
     ":3: probes.trace.payload_bytes: expected an integer", None),
    ("probes:\n  trace: {}\nexporters:\n  jsnl: {}\npipelines:\n  m: {probes: [trace], exporters: [jsnl]}\n",
     ":4: exporters.jsnl: unknown exporter type", "console, jsonl"),
    ("probes:\n  trace: {}\nexporters:\n  console: {}\npipelines:\n  m:\n    probes: [trace]\n"
     "    exporters: [jsonl]\n",
     ":8: pipelines.m.exporters[0]", "console"),
    ("probes:\n  trace: {}\nexporters:\n  console: {}\npipelines:\n  m: {probes: [trace], exporters: [console]}\n"
     "agent:\n  log_level: loud\n",
     ":8: agent.log_level", "debug, info, warning, error"),
    ("probes:\n  trace: {}\nexporters:\n  console: {}\npipelines:\n  m: {probes: [trace], exporters: [console]}\n"
     "agent:\n  nice: 25\n",
     ":8: agent.nice", "<= 19"),
    ("probes:\n  trace:\n    protocol_payload_bytes: {http1: 64}\nexporters:\n  console: {}\n"
     "pipelines:\n  m: {probes: [trace], exporters: [console]}\n",
     ":2: probes.trace", "the protocols listed in `protocols`"),
    ("probes:\n  trace:\n    protocols: [http1]\n    protocol_payload_bytes: {http1: 99999}\n"
     "exporters:\n  console: {}\npipelines:\n  m: {probes: [trace], exporters: [console]}\n",
     ":4: probes.trace.protocol_payload_bytes", "0..8192"),
]


@pytest.mark.parametrize("text,where,allowed", BAD)
def test_bad_config_names_file_line_key_and_allowed(tmp_path, text, where, allowed):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text)
    out = subprocess.run([*DEEPTRACE, "validate", "--config", str(cfg)],
                         capture_output=True, text=True)
    assert out.returncode == 2
    assert f"{cfg}{where}" in out.stderr, out.stderr
    if allowed:
        assert f"allowed: {allowed}" in out.stderr or allowed in out.stderr
    assert "Traceback" not in out.stderr


def test_validate_accepts_shipped_and_example_configs(tmp_path):
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(EXAMPLE_CONFIG)
    out = subprocess.run([*DEEPTRACE, "validate", "--config", str(cfg)], capture_output=True,
                         text=True, env={**os.environ, "OUT": str(tmp_path)})
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr
    repo_cfg = os.path.join(os.path.dirname(__file__), "..", "config", "agent.yaml")
    out = subprocess.run([*DEEPTRACE, "validate", "--config", repo_cfg], capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stderr


def test_missing_env_var_is_a_config_error(tmp_path):
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(EXAMPLE_CONFIG)
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    out = subprocess.run([*DEEPTRACE, "validate", "--config", str(cfg)], capture_output=True,
                         text=True, env=env)
    assert out.returncode == 2 and ":7: exporters.jsonl.path" in out.stderr and "OUT" in out.stderr


@pytest.mark.bpf
def test_doctor_and_render(bpf_ok):
    out = subprocess.run([*DEEPTRACE, "doctor"], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout
    assert "ok   btf fields of trace" in out.stdout
    out = subprocess.run([*DEEPTRACE, "probe", "render", "trace"], capture_output=True, text=True)
    assert out.returncode == 0
    assert "#define OFF_task_struct__files " in out.stdout
    assert "TRACEPOINT_PROBE(syscalls, sys_exit_recvmmsg)" in out.stdout


@pytest.mark.bpf
@pytest.mark.parametrize("when", ["delivering", "detaching"])
def test_second_signal_during_shutdown_detaches_and_exits_at_once(tmp_path, when):
    """Issue 13: the first SIGTERM starts the shut-down, here held up by an OTLP export
    to a receiver that accepts and never answers (timeout 30 s); a second SIGTERM detaches
    the probes and exits at once, without waiting for the exporter. The second comes
    while the exporter delivers (after the final stats), or at once, while the probes
    are still detaching (which is finished, never cut short)."""
    import socket
    require_bpf()
    blackhole = socket.socket()
    blackhole.bind(("127.0.0.1", 0))
    blackhole.listen(8)
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(f"""\
probes:
  trace: {{comms: [nothing-runs-as-this]}}
  host: {{interval: 0.2s}}
exporters:
  otlp:
    protocol: http/protobuf
    endpoint: http://127.0.0.1:{blackhole.getsockname()[1]}
    timeout: 30s
    shutdown_timeout: 30s
    export_interval: 0.2s
pipelines:
  main: {{probes: [trace, host], exporters: [otlp]}}
""")
    agent = subprocess.Popen([*DEEPTRACE, "--config", str(cfg)], stderr=subprocess.PIPE,
                             text=True, start_new_session=True)
    # The reads below block: an agent that hangs fails the test instead of hanging it.
    watchdog = threading.Timer(120, agent.kill)
    watchdog.start()
    try:
        line = agent.stderr.readline()
        params = set()   # asyncio: the task_step_impl entry programs attached (by position)
        while "running" not in line:
            assert line, f"agent exited: {agent.wait()}"
            if "asyncio tasks traced in" in line:
                params.add(line.rsplit("(task is parameter ", 1)[1].split()[0])
            line = agent.stderr.readline()
        attached = prog_ids_held_by(agent.pid)
        assert attached
        blackhole.settimeout(10)
        conn, _ = blackhole.accept()       # an export is in flight, never to be answered
        agent.send_signal(signal.SIGTERM)
        if when == "delivering":
            line = agent.stderr.readline()
            while "deeptrace final:" not in line:   # probes detached, exporters' turn
                assert line, f"agent exited: {agent.wait()}"
                line = agent.stderr.readline()
            time.sleep(0.5)
            assert agent.poll() is None    # the shut-down waits for the exporter
        else:
            time.sleep(0.05)
        t = time.monotonic()
        agent.send_signal(signal.SIGTERM)
        err = agent.communicate(timeout=10)[1]
        took = time.monotonic() - t
    finally:
        watchdog.cancel()
        if agent.poll() is None:
            agent.kill()
            agent.wait()
        blackhole.close()
    assert took < 3, took
    assert agent.returncode == 128 + signal.SIGTERM, err
    assert "second SIGTERM: probes detached; exiting without delivering what is left" in err
    assert "Traceback" not in err and "detaching" not in err and "Bad file" not in err, err
    deadline = time.monotonic() + 5
    while attached & loaded_prog_ids() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert attached & loaded_prog_ids() == set()
    conn.close()
