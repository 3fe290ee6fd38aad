"""One interval rule for the five metric probes (deeptrace_core.metricprobe): points once
the interval has passed, and at every ``poll(0)``, so a shut-down gets the final points of
cpu, memory, disk, network and host however little of their interval had passed."""

import json
import time

import pytest

from conftest import block_device_file, require_bpf, synced_write
from deeptrace_core.metricprobe import Interval

# A metric each probe reports whatever the machine did (disk: given the I/O below).
EXPECTED = {"cpu": "process.cpu.time", "memory": "deeptrace.memory.page_faults",
            "disk": "deeptrace.disk.io.latency", "network": "process.network.io",
            "host": "system.cpu.time"}


def test_interval_rule():
    iv = Interval(3600)
    assert not iv.due(0)                        # not started (not attached): never
    iv.start()
    assert not iv.due(100) and not iv.due(None)  # the interval has not passed
    assert iv.due(0) and iv.due(0)              # the final drain: every time
    iv.start(at_once=True)
    assert iv.due(100) and not iv.due(100)      # due at once, then a new interval
    iv.stop()
    assert not iv.due(0)
    short = Interval(0.05)
    short.start()
    time.sleep(0.06)
    assert short.due(100) and not short.due(100)


def block_io():
    """Block requests of this process: a synced write on a real block device."""
    with block_device_file("shutdown") as (path, _):
        synced_write(path, 256 * 1024)


def socket_io():
    """UDP over loopback from a child process (the agent's own bytes are never counted)."""
    import subprocess
    import sys
    subprocess.run([sys.executable, "-c", (
        "import socket\n"
        "u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind(('127.0.0.1', 0))\n"
        "for _ in range(20):\n"
        "    u.sendto(b'x' * 1000, u.getsockname()); u.recv(2000)\n")], check=True)


def metric_names(batch) -> set:
    return {r.name for r in batch if r.kind == "metric"}


def test_final_points_from_all_five_through_the_agents_shutdown(tmp_path):
    """The agent's shut-down (quiesce, poll(0), detach) with every metric probe an hour
    from its next interval: each one's poll(0) hands over its points, and they reach the
    exporter."""
    require_bpf()
    from deeptrace_core.agent import Agent
    from deeptrace_core.config import parse_config
    from deeptrace_core.plugins import PluginHost

    host = PluginHost().load_entry_points()
    registry = host.registry()
    out = tmp_path / "m.jsonl"
    probes = ", ".join(f"{name}: {{interval: 3600s}}" for name in EXPECTED)
    text = f"""
agent: {{stats_interval: 60s}}
probes: {{{probes}}}
exporters: {{jsonl: {{path: {out}}}}}
pipelines: {{main: {{probes: [{", ".join(EXPECTED)}], exporters: [jsonl]}}}}
"""
    agent = Agent(parse_config(text, "inline.yaml", registry.schemas()), host, registry)
    agent.start()
    try:
        assert set(agent.attached) == set(EXPECTED)
        agent.poll_once()              # host's first points (at attach) go out here
        block_io()
        socket_io()
        final = {cid: set() for cid in EXPECTED}
        for cid, probe in agent.probes.items():
            def recorded(timeout_ms=None, _poll=probe.poll, _cid=cid):
                batch = _poll(timeout_ms)
                if timeout_ms == 0:
                    final[_cid] |= metric_names(batch)
                else:                  # the loop's polls: the interval has not passed
                    assert not metric_names(batch), (_cid, timeout_ms)
                return batch
            probe.poll = recorded
        agent.poll_once()
    finally:
        agent.shutdown()
    missing = {cid: name for cid, name in EXPECTED.items() if name not in final[cid]}
    assert not missing, f"no final points at shut-down from {missing}"
    exported = {json.loads(line).get("name") for line in out.read_text().splitlines()}
    assert set(EXPECTED.values()) <= exported


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_poll_zero_collects_before_the_interval(name):
    """Each probe alone: within its interval poll(t > 0) gives no points, poll(0) does,
    and once detached poll(0) gives nothing."""
    import importlib

    from deeptrace_core.bpf import kernel_defines

    if name != "host":
        require_bpf()
    module = importlib.import_module(f"deeptrace_plugins.{name}.probe")
    cls = getattr(module, f"{name.capitalize()}Probe")
    probe = cls(cls.config_class(interval=3600))
    probe.attach(kernel_defines(probe.kernel_fields))
    try:
        if name == "host":
            assert metric_names(probe.poll(100))   # its baseline, at attach
        if name == "disk":
            block_io()
        if name == "network":
            socket_io()
        time.sleep(0.05)   # this process switches out (cpu) and is seen by the probes
        assert not metric_names(probe.poll(100))
        assert EXPECTED[name] in metric_names(probe.poll(0))
        assert EXPECTED[name] in metric_names(probe.poll(0))   # every poll(0) collects
    finally:
        probe.detach()
    assert probe.poll(0) == []
