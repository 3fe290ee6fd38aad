"""The agent in-process with the real trace probe: lifecycle hooks, a failing exporter
isolated from a working one, and records flowing through a processor."""

import json
import os

import attrs
import pytest

from conftest import Script, udp_sender
from deeptrace_core.agent import Agent
from deeptrace_core.config import parse_config
from deeptrace_core.hookspecs import hookimpl
from deeptrace_core.plugins import PluginHost

pytestmark = pytest.mark.bpf


@attrs.define
class NoConfig:
    pass


class FailingExporter:
    name = "failing"
    config_class = NoConfig

    def __init__(self, config, context):
        pass

    def export(self, batch):
        raise IOError("backend down")

    def flush(self):
        pass

    def shutdown(self):
        pass


class CountingProcessor:
    """Passes records on and counts them: a third-party processor in the chain."""
    name = "counting"
    config_class = NoConfig
    seen = 0

    def __init__(self, config, context):
        pass

    def process(self, batch):
        CountingProcessor.seen += len(batch)
        return batch


class Recorder:
    def __init__(self):
        self.calls = []

    @hookimpl
    def deeptrace_register_processors(self, registry):
        registry.add_processor(CountingProcessor)

    @hookimpl
    def deeptrace_register_exporters(self, registry):
        registry.add_exporter(FailingExporter)

    @hookimpl
    def deeptrace_agent_start(self, agent):
        self.calls.append(("start", sorted(agent.attached)))

    @hookimpl
    def deeptrace_agent_stop(self, agent):
        self.calls.append(("stop", list(agent.attached)))


def test_agent_lifecycle_hooks_and_exporter_isolation(bpf_ok, tmp_path):
    host = PluginHost().load_entry_points()
    rec = Recorder()
    host.register(rec, "recorder")
    registry = host.registry()
    child = Script("""
import json, socket
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.sendto(b'keep-me', ('127.0.0.1', 9)); u.sendto(b'drop-me', ('127.0.0.1', 9)); u.close()
print(json.dumps({}), flush=True)
""")
    out = tmp_path / "r.jsonl"
    text = f"""
agent: {{stats_interval: 0.2s}}
probes: {{trace: {{pids: [{child.pid}]}}}}
processors:
  filter/nodrop: {{exclude: {{payload: ["{b'drop-me'!r}"]}}}}
  counting: {{}}
exporters:
  failing: {{}}
  jsonl: {{path: {out}}}
pipelines:
  main: {{probes: [trace], processors: [filter/nodrop, counting], exporters: [failing, jsonl]}}
"""
    config = parse_config(text, "inline.yaml", registry.schemas())
    agent = Agent(config, host, registry)
    nice_before = os.getpriority(os.PRIO_PROCESS, 0)
    agent.start()
    try:
        assert os.getpriority(os.PRIO_PROCESS, 0) == 10   # agent.nice, once attached
        child.go()
        child.finish()
        agent.run(duration=0.6)
    finally:
        agent.shutdown()
    assert os.getpriority(os.PRIO_PROCESS, 0) == nice_before   # given back at shutdown
    assert rec.calls == [("start", ["trace"]), ("stop", [])]
    pipeline = agent.pipelines[0]
    assert pipeline.errors["failing"] >= 1      # reported ...
    lines = [json.loads(l) for l in out.read_text().splitlines()]
    sends = [l for l in lines if l["syscall"] == "sendto"]
    assert len(sends) == 1                      # ... and isolated: jsonl got the batch
    assert {l["syscall"] for l in lines} == {"socket", "sendto", "close"}
    assert CountingProcessor.seen == len(lines) == pipeline.records_out


class MetricsTaker:
    """An exporter that asks for the agent's own metrics, and keeps the last ones."""
    name = "metrics-taker"
    config_class = NoConfig
    takes_agent_metrics = True
    last: list = []

    def __init__(self, config, context):
        pass

    def export(self, batch):
        own = [p for p in batch if getattr(p, "name", "").startswith("deeptrace.agent.")]
        if own:
            MetricsTaker.last = own

    def flush(self):
        pass

    def shutdown(self):
        pass


class TakerPlugin:
    @hookimpl
    def deeptrace_register_exporters(self, registry):
        registry.add_exporter(MetricsTaker)


def test_lost_events_are_exported_as_agent_metrics(bpf_ok):
    """A one-page ring buffer the agent does not drain while a process sends 400
    datagrams: the loss the probe counts is exported, by cause, with the same value."""
    from deeptrace_plugins.exporters.prometheus import render

    host = PluginHost().load_entry_points()
    host.register(TakerPlugin(), "taker")
    registry = host.registry()
    n = 400
    child = udp_sender(n)
    text = f"""
agent: {{stats_interval: 0.2s}}
probes: {{trace: {{pids: [{child.pid}], ringbuf_pages: 1, wakeup_bytes: 1073741824}}}}
exporters: {{metrics-taker: {{}}}}
pipelines: {{main: {{probes: [trace], exporters: [metrics-taker]}}}}
"""
    agent = Agent(parse_config(text, "inline.yaml", registry.schemas()), host, registry)
    agent.start()
    try:
        child.go()
        child.finish()           # every send happens before the agent drains anything
        agent.run(duration=0.5)
    finally:
        agent.shutdown()
    lost = {p.attributes["deeptrace.cause"]: p.value for p in MetricsTaker.last
            if p.name == "deeptrace.agent.events.lost"}
    stat = {(p.attributes["deeptrace.component"], p.attributes["deeptrace.counter"]): p.value
            for p in MetricsTaker.last if p.name == "deeptrace.agent.stat"}
    assert lost["ringbuf_full"] > 0
    assert lost["ringbuf_full"] == stat[("probe.trace", "ringbuf_full")]
    assert lost["ringbuf_full"] + stat[("probe.trace", "events")] == 1 + n + 1
    assert set(lost) >= {"ringbuf_full", "inflight_alloc_failed", "conn_map_full",
                         "read_failed", "decode_failed", "prog_recursion_misses"}
    exposition = render(MetricsTaker.last)
    assert ('deeptrace_agent_events_lost_total{deeptrace_cause="ringbuf_full",'
            f'deeptrace_probe="trace"}} {int(lost["ringbuf_full"])}') in exposition


def test_shutdown_drains_a_full_ring_and_accounts_for_every_record(bpf_ok):
    """SIGTERM with more records in the ring than one poll takes (BATCH_RECORDS): the agent
    stops the probe recording, drains the ring to the end, then takes its final counters.
    Every record the kernel submitted reaches the pipeline, and the counters say so."""
    from deeptrace_plugins.trace.probe import BATCH_RECORDS

    host = PluginHost().load_entry_points()
    host.register(TakerPlugin(), "taker")
    host.register(Recorder(), "recorder")  # registers the counting processor
    registry = host.registry()
    n = 2 * BATCH_RECORDS + 300
    child = udp_sender(n)
    text = f"""
agent: {{stats_interval: 60s}}
probes: {{trace: {{pids: [{child.pid}], wakeup_bytes: 1073741824}}}}
processors: {{counting: {{}}}}
exporters: {{metrics-taker: {{}}}}
pipelines: {{main: {{probes: [trace], processors: [counting], exporters: [metrics-taker]}}}}
"""
    agent = Agent(parse_config(text, "inline.yaml", registry.schemas()), host, registry)
    agent.start()
    CountingProcessor.seen = 0
    try:
        child.go()
        child.finish()           # every send is in the ring; the agent has drained nothing
    finally:
        agent.shutdown()
    stat = {(p.attributes["deeptrace.component"], p.attributes["deeptrace.counter"]): p.value
            for p in MetricsTaker.last if p.name == "deeptrace.agent.stat"}
    assert CountingProcessor.seen == 1 + n + 1
    assert stat[("probe.trace", "events")] == 1 + n + 1
    assert stat[("pipeline.main", "records_in")] == 1 + n + 1
    assert stat[("probe.trace", "ringbuf_full")] == 0
    assert agent.probes["trace"].bpf is None  # and then detached


def test_shutdown_polls_a_metrics_probe_once(bpf_ok):
    """A metrics probe collects on every poll(0): the final drain polls it once (it has
    no batch_limit), the trace probe until a batch comes back short; shut-down is prompt."""
    import time as _time

    host = PluginHost().load_entry_points()
    registry = host.registry()
    text = """
agent: {stats_interval: 60s}
probes: {trace: {pids: [1]}, cpu: {interval: 60s}}
exporters: {jsonl: {path: /dev/null}}
pipelines: {main: {probes: [trace, cpu], exporters: [jsonl]}}
"""
    agent = Agent(parse_config(text, "inline.yaml", registry.schemas()), host, registry)
    agent.start()
    calls = {}
    for cid, probe in agent.probes.items():
        def counted(timeout_ms=None, _poll=probe.poll, _cid=cid):
            calls[_cid] = calls.get(_cid, 0) + 1
            return _poll(timeout_ms)
        probe.poll = counted
    t0 = _time.monotonic()
    agent.shutdown()
    assert _time.monotonic() - t0 < 5
    # the trace probe: quiesce + drain, then detach's drain; the metric probe once, so its
    # final points go out once
    assert calls == {"trace": 2, "cpu": 1}
