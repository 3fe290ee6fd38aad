"""The filter processor: field names are checked at config load (issue 13: a typo in
`include` silently dropped every record)."""

import pytest

from deeptrace_core.agent import Agent
from deeptrace_core.config import ConfigError, parse_config
from deeptrace_core.plugins import PluginHost
from deeptrace_core.span import Span
from deeptrace_plugins.processors.filter import FilterConfig, FilterProcessor, record_fields

T0 = 1_700_000_000_000_000_000


def span(port=53, l4="udp"):
    return Span(T0, T0 + 1000, "dns", "client", 1, 1, "dig", "dig", l4, "ipv4",
                "127.0.0.1", 5000, "127.0.0.1", port, 1, "A example.com", "0", False, 10, 20)


def test_known_fields_filter_as_before():
    keep = FilterProcessor(FilterConfig(include={"l4": ["tcp"]}, exclude={"remote_port": [53]}))
    kept = keep.process([span(80, "tcp"), span(53, "tcp"), span(80, "udp")])
    assert [(s.remote_port, s.l4) for s in kept] == [(80, "tcp")]
    assert {"remote_port", "l4", "comm", "payload", "name", "kind", "duration_ns",
            "victim_comm", "srtt_us"} <= record_fields()


@pytest.mark.parametrize("which", ["include", "exclude"])
def test_unknown_field_is_an_error_listing_the_allowed(which):
    with pytest.raises(ValueError) as e:
        FilterProcessor(FilterConfig(**{which: {"remote_prot": ["53"], "l4": ["tcp"]}}))
    msg = str(e.value)
    assert msg.startswith(f"{which}: no record has the field 'remote_prot' (allowed: ")
    assert "remote_port" in msg and "l4" not in msg.split("(allowed")[0]


def test_the_agent_reports_it_as_a_config_error_at_the_section():
    host = PluginHost().load_entry_points()
    registry = host.registry()
    text = """\
probes: {trace: {}}
processors:
  filter/typo:
    include: {protcol: [http1]}
exporters: {console: {}}
pipelines:
  main: {probes: [trace], processors: [filter/typo], exporters: [console]}
"""
    config = parse_config(text, "agent.yaml", registry.schemas())
    with pytest.raises(ConfigError) as e:
        Agent(config, host, registry)
    err = e.value
    assert (err.file, err.line, err.key) == ("agent.yaml", 3, "processors.filter/typo")
    assert "no record has the field 'protcol'" in err.message and "protocol" in err.message
