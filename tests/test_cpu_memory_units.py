"""cpu and memory probes without the kernel: the flame graph writer, the OOM event decoder, config parsing and the rendered C's knobs."""

import struct
import xml.etree.ElementTree as ET
from textwrap import dedent

import pytest

from deeptrace_core.config import ConfigError, parse_config
from deeptrace_plugins.cpu import flamegraph
from deeptrace_plugins.cpu.probe import HIST_BOUNDS, NBUCKETS, CpuConfig, CpuProbe
from deeptrace_plugins.exporters.console import ConsoleConfig
from deeptrace_plugins.memory.decoder import OOM_EVENT, OomEvent, decode_oom
from deeptrace_plugins.memory.probe import MemoryConfig, MemoryProbe

FAKE_BTF = {"OFF_task_struct__group_leader": 1328, "OFF_task_struct__comm": 1752}


def test_flamegraph_roundtrip_and_svg():
    stacks = {("app", "main", "work<int>", "hot"): 30, ("app", "main", "idle"): 10,
              ("app", "main", "work<int>", "syscall", "do_sys_[k]"): 5}
    text = flamegraph.folded_text(stacks)
    assert text.splitlines()[0] == "app;main;work<int>;hot 30"
    assert flamegraph.parse_folded(text) == stacks
    svg = flamegraph.svg(stacks, title="t & <test>")
    root = ET.fromstring(svg.encode())           # well-formed, names escaped
    titles = [t.text for t in root.iter("{http://www.w3.org/2000/svg}title")]
    assert "work<int> (35 samples, 77.78%)" in titles
    assert "hot (30 samples, 66.67%)" in titles
    rects = {t.text.split(" (")[0]: float(g.find("{http://www.w3.org/2000/svg}rect").get("width"))
             for g in root.iter("{http://www.w3.org/2000/svg}g")
             for t in g.iter("{http://www.w3.org/2000/svg}title")}
    assert rects["hot"] / rects["all"] == pytest.approx(30 / 45, rel=1e-3)


def test_oom_event_decodes():
    raw = OOM_EVENT.pack(123, 276184, 35200, 6100, 0, 128, 7, 4242, 4243, 4244, 0, -17,
                         b"victim\0", b"trigger\0")
    ev = decode_oom(raw)
    assert isinstance(ev, OomEvent) and ev.kind == "oom"
    assert (ev.victim_pid, ev.victim_comm, ev.trigger_pid, ev.trigger_tid, ev.trigger_comm) == (
        4242, "victim", 4243, 4244, "trigger")
    assert (ev.anon_rss_kb, ev.file_rss_kb, ev.total_vm_kb, ev.oom_score_adj) == (
        35200, 6100, 276184, -17)
    d = ev.to_dict()
    assert d["kind"] == "oom" and d["victim_comm"] == "victim"
    assert ev.line().startswith("oom-kill victim=victim(4242) by=trigger(4243/4244) ")
    with pytest.raises(struct.error):
        decode_oom(raw[:50])


def test_histogram_layout():
    assert len(HIST_BOUNDS) + 1 == NBUCKETS
    assert HIST_BOUNDS[0] == pytest.approx(1024e-9)
    assert all(b == 2 * a for a, b in zip(HIST_BOUNDS, HIST_BOUNDS[1:]))


def test_config_from_yaml():
    text = dedent("""\
        probes:
          cpu: {interval: 5s, profile: true, profile_hz: 99, top_n: 5}
          memory: {interval: 500ms, page_alloc: true}
        exporters:
          console: {}
        pipelines:
          main: {probes: [cpu, memory], exporters: [console]}
        """)
    schemas = {"probes": {"cpu": CpuConfig, "memory": MemoryConfig},
               "exporters": {"console": ConsoleConfig}}
    cfg = parse_config(text, "agent.yaml", schemas, {})
    c, m = cfg.probes["cpu"].config, cfg.probes["memory"].config
    assert (c.interval, c.profile, c.profile_hz, c.top_n) == (5.0, True, 99, 5)
    assert (m.interval, m.page_alloc, m.fault_types) == (0.5, True, True)
    with pytest.raises(ConfigError) as info:
        parse_config(text.replace("profile_hz: 99", "profile_hz: 0"), "agent.yaml", schemas, {})
    assert info.value.key == "probes.cpu.profile_hz"


def test_render_knobs():
    text = CpuProbe(CpuConfig(profile=True, profile_hz=99)).render(FAKE_BTF)
    assert "#define PROFILE 1\n" in text and "#define OFF_task_struct__comm 1752\n" in text
    assert "#define PROFILE 0\n" in CpuProbe(CpuConfig()).render(FAKE_BTF)
    mem = MemoryProbe(MemoryConfig(page_alloc=True, fault_types=False)).render(FAKE_BTF)
    assert "#define PAGE_ALLOC 1\n" in mem and "#define FAULT_TYPES 0\n" in mem
    assert "TRACEPOINT_PROBE(kmem, rss_stat)" in mem


def test_poll_before_attach_is_empty():
    assert CpuProbe(CpuConfig()).poll(0) == [] and MemoryProbe(MemoryConfig()).poll(0) == []
    assert CpuProbe(CpuConfig()).stats() == {} and MemoryProbe(MemoryConfig()).stats() == {}


@pytest.mark.parametrize("field", sorted(set(CpuProbe.kernel_fields) | set(MemoryProbe.kernel_fields)))
def test_kernel_fields_match_pahole(field):
    """The offsets the agent passes as OFF_* macros are pahole's (an independent reader)."""
    import os
    import shutil

    from conftest import CI
    from deeptrace_core.bpf import kernel_defines, macro_name
    from test_btf import pahole

    if not os.access("/sys/kernel/btf/vmlinux", os.R_OK) or shutil.which("pahole") is None:
        if CI:
            pytest.fail("BTF or pahole missing under CI")
        pytest.skip("no readable kernel BTF or no pahole")
    struct_name, _, member = field.partition(".")
    members, _ = pahole(struct_name)
    assert kernel_defines([field])[macro_name(field)] == members[member][0]
