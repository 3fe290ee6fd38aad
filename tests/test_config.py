"""Tests for deeptrace_core.config: every error names file, line, key and choices."""

import pickle
from textwrap import dedent, indent
from typing import Literal, Optional

import attrs
import pytest
from attrs import validators as v

from conftest import EXAMPLE_CONFIG
from deeptrace_core.config import (
    AgentConfig, AgentSettings, Component, ConfigError, PipelineConfig, build, load_config,
    parse_config,
)


@attrs.define
class Retry:
    attempts: int = 3
    backoff: float = attrs.field(default=0.1, metadata={"unit": "seconds"})


@attrs.define
class TraceConfig:
    comms: list[str] = attrs.Factory(list)
    pids: list[int] = attrs.Factory(list)
    payload_bytes: int = attrs.field(default=1024, validator=v.ge(1))
    mode: Literal["full", "sampled"] = "full"
    ratio: float = 1.0
    enabled: bool = True
    labels: dict[str, str] = attrs.Factory(dict)
    limit: Optional[int] = None
    timeout: float = attrs.field(default=5.0, metadata={"unit": "seconds"})
    retry: Retry = attrs.Factory(Retry)
    internal: int = attrs.field(default=0, init=False)


@attrs.define
class FileExporterConfig:
    path: str = "-"
    format: str = attrs.field(default="json", validator=v.in_(["json", "text"]))


@attrs.define
class FilterConfig:
    pattern: str                       # required: no default
    # String annotations, as with `from __future__ import annotations`.
    ports: "list[int] | None" = None


SCHEMAS = {
    "probes": {"trace": TraceConfig},
    "processors": {"filter": FilterConfig},
    "exporters": {"jsonl": FileExporterConfig, "console": FileExporterConfig},
}

PIPELINE = """\
pipelines:
  main:
    probes: [trace]
    exporters: [console]
"""


def parse(text, env=None):
    return parse_config(dedent(text), "agent.yaml", SCHEMAS, env or {})


def error(text, env=None) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse(text, env)
    return info.value


def check(err, line, key, message, allowed=None, expected_str=None):
    assert (err.file, err.line, err.key, err.message, err.allowed) == (
        "agent.yaml", line, key, message, allowed)
    if expected_str is not None:
        assert str(err) == expected_str


def probe(body, env=None):
    """Parse a config whose only interesting part is the trace probe's body."""
    text = "probes:\n  trace:\n" + indent(dedent(body), "    ")
    cfg = parse(text + "exporters:\n  console:\n" + PIPELINE, env)
    return cfg.probes["trace"].config


# --- accepted configs -------------------------------------------------------

def test_example_is_accepted_from_file(tmp_path):
    f = tmp_path / "agent.yaml"
    f.write_text(EXAMPLE_CONFIG)
    cfg = load_config(str(f), SCHEMAS, env={"OUT": "/var/out"})
    assert isinstance(cfg, AgentConfig)
    assert cfg.path == str(f)
    assert cfg.agent == AgentSettings()
    trace = cfg.probes["trace"]
    assert trace == Component("probes", "trace", "trace", TraceConfig(
        comms=["myserver", "myclient"], payload_bytes=512), 2)
    assert cfg.exporters["jsonl"].config.path == "/var/out/records.jsonl"
    assert cfg.processors == {}
    assert cfg.pipelines == {"main": PipelineConfig("main", ["trace"], [], ["jsonl"])}


def test_env_defaults_to_os_environ(monkeypatch):
    monkeypatch.setenv("OUT", "/tmp/x")
    cfg = parse_config(EXAMPLE_CONFIG, "agent.yaml", SCHEMAS)
    assert cfg.exporters["jsonl"].config.path == "/tmp/x/records.jsonl"


def test_file_errors_carry_the_file_name(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text(EXAMPLE_CONFIG.replace("probes:\n  trace", "probes:\n  trase"))
    with pytest.raises(ConfigError) as info:
        load_config(str(f), SCHEMAS, env={"OUT": "x"})
    assert str(info.value) == f"{f}:2: probes.trase: unknown probe type 'trase' (allowed: trace)"
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(str(tmp_path / "missing.yaml"), SCHEMAS)


def test_type_name_ids_and_empty_bodies():
    cfg = parse("""\
        probes:
          trace:
        processors:
          filter/errors:
            pattern: ERR
            ports: [80, 443]
        exporters:
          jsonl/errors:
            path: errors.jsonl
          jsonl: {}
          console:
        pipelines:
          errors:
            probes: [trace]
            processors: [filter/errors]
            exporters: [jsonl/errors, console]
        """)
    assert cfg.probes["trace"].config == TraceConfig()
    errors = cfg.exporters["jsonl/errors"]
    assert (errors.kind, errors.type, errors.name, errors.line) == ("exporters", "jsonl", "jsonl/errors", 8)
    assert errors.config == FileExporterConfig(path="errors.jsonl")
    assert cfg.exporters["jsonl"].config == FileExporterConfig()
    assert cfg.processors["filter/errors"].config == FilterConfig("ERR", [80, 443])
    assert cfg.pipelines["errors"] == PipelineConfig(
        "errors", ["trace"], ["filter/errors"], ["jsonl/errors", "console"])


def test_typed_values():
    cfg = probe("""\
        comms: [a, "0123", yes]
        pids: [1, 0x10]
        mode: sampled
        ratio: 2
        enabled: false
        labels: {team: core, n: 5}
        limit: 7
        retry: {attempts: 5}
        """)
    assert cfg.comms == ["a", "0123", "yes"]   # strings stay as written
    assert cfg.pids == [1, 16]
    assert cfg.mode == "sampled"
    assert cfg.ratio == 2.0 and isinstance(cfg.ratio, float)
    assert cfg.enabled is False
    assert cfg.labels == {"team": "core", "n": "5"}
    assert cfg.limit == 7
    assert cfg.retry == Retry(attempts=5)


@pytest.mark.parametrize("text, seconds", [
    ("500ms", 0.5), ("10s", 10.0), ("2m", 120.0), ("1.5h", 5400.0), ("3", 3.0), ("0.25", 0.25),
])
def test_durations(text, seconds):
    cfg = probe(f"timeout: {text}\nretry: {{backoff: {text}}}\n")
    assert cfg.timeout == pytest.approx(seconds) and isinstance(cfg.timeout, float)
    assert cfg.retry.backoff == pytest.approx(seconds)


def test_bad_duration():
    err = error("probes:\n  trace:\n    timeout: soon\n")
    check(err, 3, "probes.trace.timeout", "expected a duration like 500ms, 10s or 2m, got 'soon'")


@pytest.mark.parametrize("text", [
    ".inf", "-.inf", ".nan", "1.0e+300", "99999999999999999999d",
    "999999999999999999999999", "3153600001", "36501d", "-1",
    "9" * 400,
])
def test_duration_out_of_range_is_a_config_error(text):
    """Issue 13: non-finite or absurd durations overflowed later, in the stage, the linker
    and the store's retention; they are config errors naming the allowed range."""
    err = error(f"probes:\n  trace:\n    retry:\n      backoff: {text}\n")
    check(err, 4, "probes.trace.retry.backoff", f"duration {text!r} is out of range",
          ["0 to 36500d (100 years)"],
          f"agent.yaml:4: probes.trace.retry.backoff: duration {text!r} is out of range "
          "(allowed: 0 to 36500d (100 years))")


def test_duration_range_edges_are_accepted():
    assert probe("timeout: 36500d\n").timeout == 100 * 365 * 86400.0
    assert probe("timeout: 0\n").timeout == 0.0


@pytest.mark.parametrize("field, text, message, allowed", [
    ("payload_bytes", "9223372036854775808", "integer '9223372036854775808' is out of range",
     ["-9223372036854775808 to 9223372036854775807"]),
    ("limit", "-9223372036854775809", "integer '-9223372036854775809' is out of range",
     ["-9223372036854775808 to 9223372036854775807"]),
    ("ratio", ".inf", "number '.inf' is out of range", ["a finite number"]),
    ("ratio", ".nan", "number '.nan' is out of range", ["a finite number"]),
    ("ratio", "9" * 400, f"number {'9' * 400!r} is out of range", ["a finite number"]),
])
def test_counts_and_numbers_are_ranged(field, text, message, allowed):
    err = error(f"probes:\n  trace:\n    {field}: {text}\n")
    check(err, 3, f"probes.trace.{field}", message, allowed)
    assert probe(f"limit: {2 ** 63 - 1}\n").limit == 2 ** 63 - 1


def test_agent_section():
    cfg = parse("agent:\n  block_plugins: [cpu]\n  stats_interval: 1m\n  log_level: debug\n"
                "probes: {trace: }\nexporters: {console: }\n" + PIPELINE)
    assert cfg.agent == AgentSettings(block_plugins=["cpu"], stats_interval=60.0, log_level="debug")


def test_agent_section_errors():
    check(error("agent:\n  log_level: loud\n"), 2, "agent.log_level",
          "'log_level' must be in ('debug', 'info', 'warning', 'error') (got 'loud')",
          ["debug", "info", "warning", "error"])
    check(error("agent:\n  stats_interval: 0s\n"), 2, "agent.stats_interval",
          "'stats_interval' must be > 0: 0.0")


# --- environment expansion ---------------------------------------------------

def test_env_default_and_multiple_refs():
    cfg = parse(dedent("""\
        probes: {trace: }
        exporters:
          console:
            path: ${env:DIR:-/tmp}/${env:NAME}-${env:NAME}.jsonl
        """) + PIPELINE, env={"NAME": "x"})
    assert cfg.exporters["console"].config.path == "/tmp/x-x.jsonl"


def test_env_in_typed_fields():
    cfg = probe("payload_bytes: ${env:N}\nenabled: ${env:ON}\npids: ['${env:PID:-42}']\nlimit: ${env:L:-}\n",
                env={"N": "512", "ON": "false"})
    assert (cfg.payload_bytes, cfg.enabled, cfg.pids, cfg.limit) == (512, False, [42], None)


def test_missing_env_var():
    err = error(EXAMPLE_CONFIG)
    check(err, 7, "exporters.jsonl.path", "environment variable OUT is not set",
          expected_str="agent.yaml:7: exporters.jsonl.path: environment variable OUT is not set")


def test_env_value_of_wrong_type():
    check(error("probes:\n  trace:\n    payload_bytes: ${env:N}\n", env={"N": "lots"}),
          3, "probes.trace.payload_bytes", "expected an integer, got 'lots'")


# --- errors ------------------------------------------------------------------

def test_unknown_top_level_key():
    err = error("probes: {}\nexporter:\n  jsonl:\n")
    check(err, 2, "exporter", "unknown top-level key",
          ["agent", "exporters", "pipelines", "probes", "processors", "redaction"],
          "agent.yaml:2: exporter: unknown top-level key "
          "(allowed: agent, exporters, pipelines, probes, processors, redaction)")


def test_unknown_component_type():
    err = error("exporters:\n  console:\n  jsonll/errors:\n    path: x\n")
    check(err, 3, "exporters.jsonll/errors", "unknown exporter type 'jsonll'", ["console", "jsonl"],
          "agent.yaml:3: exporters.jsonll/errors: unknown exporter type 'jsonll' (allowed: console, jsonl)")


def test_empty_component_name():
    check(error("exporters:\n  jsonl/:\n"), 2, "exporters.jsonl/",
          "empty name after '/' (use type or type/name)")


def test_unknown_component_key():
    err = error("exporters:\n  jsonl:\n    pth: x\n")
    check(err, 3, "exporters.jsonl.pth", "unknown key 'pth'", ["format", "path"],
          "agent.yaml:3: exporters.jsonl.pth: unknown key 'pth' (allowed: format, path)")


def test_init_false_fields_are_not_settable():
    err = error("probes:\n  trace:\n    internal: 1\n")
    assert err.key == "probes.trace.internal" and "internal" not in err.allowed
    assert err.allowed == sorted(f.name for f in attrs.fields(TraceConfig) if f.init)


def test_nested_unknown_key():
    check(error("probes:\n  trace:\n    retry:\n      attempts: 1\n      tries: 2\n"),
          5, "probes.trace.retry.tries", "unknown key 'tries'", ["attempts", "backoff"])


@pytest.mark.parametrize("line, message", [
    ("payload_bytes: abc", "expected an integer, got 'abc'"),
    ("payload_bytes: 1.5", "expected an integer, got '1.5'"),
    ("payload_bytes: true", "expected an integer, got 'true'"),
    ("payload_bytes:", "expected an integer, got null"),
    ("payload_bytes: [1]", "expected an integer, got a list"),
    ("ratio: fast", "expected a number, got 'fast'"),
    ("ratio: false", "expected a number, got 'false'"),
    ("enabled: 1", "expected a boolean, got '1'"),
    ("comms: myserver", "expected a list, got 'myserver'"),
    ("comms: {a: 1}", "expected a list, got a mapping"),
    ("labels: [a]", "expected a mapping, got a list"),
    ("retry: 3", "expected a mapping, got '3'"),
])
def test_wrong_types(line, message):
    key = "probes.trace." + line.split(":")[0]
    err = error(f"probes:\n  trace:\n    {line}\n")
    check(err, 3, key, message, expected_str=f"agent.yaml:3: {key}: {message}")


def test_wrong_list_item_type():
    err = error("probes:\n  trace:\n    pids:\n      - 1\n      - 2\n      - three\n")
    check(err, 6, "probes.trace.pids[2]", "expected an integer, got 'three'",
          expected_str="agent.yaml:6: probes.trace.pids[2]: expected an integer, got 'three'")


def test_wrong_dict_value_type():
    check(error("probes:\n  trace:\n    labels:\n      team: [a]\n"), 4,
          "probes.trace.labels.team", "expected a string, got a list")


def test_literal_violation():
    err = error("probes:\n  trace:\n    mode: fast\n")
    check(err, 3, "probes.trace.mode", "unsupported value 'fast'", ["full", "sampled"],
          "agent.yaml:3: probes.trace.mode: unsupported value 'fast' (allowed: full, sampled)")


def test_in_validator_violation():
    err = error("exporters:\n  jsonl:\n    path: out\n    format: xml\n")
    msg = "'format' must be in ['json', 'text'] (got 'xml')"
    check(err, 4, "exporters.jsonl.format", msg, ["json", "text"],
          f"agent.yaml:4: exporters.jsonl.format: {msg} (allowed: json, text)")


def test_validator_violation():
    err = error("probes:\n  trace:\n    comms: [a]\n    payload_bytes: 0\n")
    check(err, 4, "probes.trace.payload_bytes", "'payload_bytes' must be >= 1: 0",
          expected_str="agent.yaml:4: probes.trace.payload_bytes: 'payload_bytes' must be >= 1: 0")


def test_missing_required_field():
    err = error("processors:\n  filter:\n    ports: [1]\n")
    check(err, 2, "processors.filter.pattern", "required key is missing",
          expected_str="agent.yaml:2: processors.filter.pattern: required key is missing")
    check(error("processors:\n  filter:\n"), 2, "processors.filter.pattern", "required key is missing")


def test_string_annotations_are_resolved():
    check(error("processors:\n  filter:\n    pattern: x\n    ports: [80, http]\n"), 4,
          "processors.filter.ports[1]", "expected an integer, got 'http'")


def test_dangling_pipeline_reference():
    err = error(EXAMPLE_CONFIG.replace("exporters: [jsonl]", "exporters: [jsonl/errors]"), env={"OUT": "o"})
    check(err, 11, "pipelines.main.exporters[0]", "exporter 'jsonl/errors' is not declared in exporters",
          ["jsonl"], "agent.yaml:11: pipelines.main.exporters[0]: exporter 'jsonl/errors' is not "
          "declared in exporters (allowed: jsonl)")


def test_pipeline_errors():
    base = "probes: {trace: }\nexporters: {console: }\npipelines:\n  main:\n"
    check(error(base + "    probes: [trace]\n"), 4, "pipelines.main.exporters", "required key is missing")
    check(error(base + "    probes: []\n    exporters: [console]\n"), 5, "pipelines.main.probes",
          "a pipeline needs at least one probe")
    check(error(base + "    probes: [trace]\n    exporters: [console]\n    processors: [filter]\n"), 7,
          "pipelines.main.processors[0]", "processor 'filter' is not declared in processors")
    check(error(base + "    probes: [trace]\n    exporters: [console, console]\n"), 6,
          "pipelines.main.exporters[1]", "exporter 'console' is listed twice")
    check(error(base + "    probes: [trace]\n    exporter: [console]\n"), 6, "pipelines.main.exporter",
          "unknown key 'exporter'", ["exporters", "probes", "processors"])


def test_no_pipelines():
    err = error("probes:\n  trace:\n")
    check(err, None, "pipelines", "no pipelines: nothing would run",
          expected_str="agent.yaml: pipelines: no pipelines: nothing would run")
    check(error("probes:\n  trace:\npipelines:\n"), 3, "pipelines", "no pipelines: nothing would run")
    check(error(""), None, "pipelines", "no pipelines: nothing would run")


def test_duplicate_keys():
    err = error("exporters:\n  jsonl:\n    path: a\n    format: json\n    path: b\n")
    check(err, 5, "exporters.jsonl.path", "duplicate key (first defined on line 3)",
          expected_str="agent.yaml:5: exporters.jsonl.path: duplicate key (first defined on line 3)")
    check(error("probes: {}\nprobes: {}\n"), 2, "probes", "duplicate key (first defined on line 1)")


def test_yaml_syntax_error():
    err = error("probes:\n  trace:\n    comms: [a, b\nexporters:\n")
    assert (err.file, err.key, err.allowed) == ("agent.yaml", "", None)
    assert err.line == 4 and err.message.startswith("invalid YAML: ")
    assert str(err) == f"agent.yaml:4: {err.message}"
    check(error("a: b: c\n"), 1, "", "invalid YAML: mapping values are not allowed here",
          expected_str="agent.yaml:1: invalid YAML: mapping values are not allowed here")


def test_top_level_must_be_a_mapping():
    check(error("- probes\n"), 1, "", "expected a mapping of sections, got a list")


def test_first_error_wins():
    # Sections are checked in file order (pipelines last: they refer to the others).
    err = error("probes:\n  trace:\n    pids: [x]\n    bogus: 1\nfoo: 1\n")
    assert (err.line, err.key) == (3, "probes.trace.pids[0]")
    err = error("pipelines:\n  main:\n    probes: [nope]\nprobes:\n  trace:\n    bogus: 1\n")
    assert (err.line, err.key) == (6, "probes.trace.bogus")


def test_build_is_reusable():
    import yaml
    node = yaml.compose("attempts: 4\nbackoff: 250ms\n", Loader=yaml.SafeLoader)
    assert build(Retry, node, "retry", "x.yaml", {}) == Retry(4, 0.25)
    assert build(Retry, None, "retry", "x.yaml", {}) == Retry()


def test_config_error_str_and_pickle():
    assert str(ConfigError("f.yaml", None, "", "boom")) == "f.yaml: boom"
    err = ConfigError("f.yaml", 3, "a.b", "bad", ["x", "y"])
    assert str(err) == "f.yaml:3: a.b: bad (allowed: x, y)"
    copy = pickle.loads(pickle.dumps(err))
    assert (copy.line, copy.key, copy.allowed, str(copy)) == (3, "a.b", ["x", "y"], str(err))


# -- protocols: names checked against the registry, each protocol's own settings ---------
def l7_registry():
    from deeptrace_core.registry import Registry
    from deeptrace_plugins.protocols.http1 import plugin as http1
    from deeptrace_plugins.protocols.mysql import plugin as mysql
    reg = Registry()
    for module in (http1, mysql):
        module.deeptrace_register_protocols(reg)
    return reg


def l7_schemas(reg):
    from deeptrace_plugins.protocols.stage import SpansConfig
    from deeptrace_plugins.trace.probe import TraceConfig as RealTraceConfig
    return {"probes": {"trace": RealTraceConfig}, "processors": {"spans": SpansConfig},
            "exporters": {"console": FileExporterConfig},
            "protocols": {n: e.cls.config_class for n, e in reg.protocols.items()}}


def l7_parse(body, schemas=None):
    text = dedent(body) + dedent("""\
        pipelines:
          main: {probes: [trace], processors: [spans], exporters: [console]}
        exporters: {console: {}}
        """)
    return parse_config(text, "agent.yaml", schemas or l7_schemas(l7_registry()), {})


def l7_error(body) -> ConfigError:
    with pytest.raises(ConfigError) as e:
        l7_parse(body)
    return e.value


def test_protocol_config_from_yaml_reaches_the_parser():
    import time
    import types

    from deeptrace_plugins.protocols.sql import StatementsConfig
    from deeptrace_plugins.protocols.stage import SpanStage
    from deeptrace_plugins.trace.decoder import SocketRecord
    reg = l7_registry()
    cfg = l7_parse("""\
        probes: {trace: {protocols: [mysql]}}
        processors:
          spans:
            protocols: [mysql, http1]
            protocol_config:
              mysql: {max_statements: 2}
              http1:
        """)
    spans_config = cfg.processors["spans"].config
    assert spans_config.protocol_config == {"mysql": StatementsConfig(max_statements=2),
                                            "http1": reg.protocols["http1"].cls.config_class()}
    stage = SpanStage(spans_config, types.SimpleNamespace(registry=reg))

    def rec(payload, direction, t):
        t += now    # recent: older requests would time out
        return SocketRecord(
            ts_enter_ns=t, ts_exit_ns=t + 1, pid=1, tid=1, comm="c", fd=3, syscall="x",
            direction=direction, l4="tcp", family="ipv4", local_addr="127.0.0.1",
            local_port=40000, remote_addr="127.0.0.1", remote_port=3306, bytes=len(payload),
            payload=payload, conn_id=1, protocol="mysql", role="client", tcp_seq_start=None,
            tcp_seq_end=None)

    def pkt(seq, payload):
        return len(payload).to_bytes(3, "little") + bytes([seq]) + payload

    now = time.time_ns()

    records = []
    for sid in (1, 2, 3):   # COM_STMT_PREPARE, then a prepare-OK without columns/params
        records += [rec(pkt(0, b"\x16SELECT %d" % sid), "egress", 10 * sid),
                    rec(pkt(1, b"\x00" + sid.to_bytes(4, "little") + bytes(6)), "ingress",
                        10 * sid + 5)]
    assert len(stage.process(records)) == 3
    parser = stage.conns[(1, 1)].parser
    assert dict(parser.statements) == {2: "SELECT 2", 3: "SELECT 3"}   # only 2 kept


def test_bad_protocol_config_key_names_file_line_and_allowed_keys():
    err = l7_error("""\
        processors:
          spans:
            protocol_config:
              mysql:
                max_statement: 2
        """)
    assert (err.file, err.line, err.key, err.allowed) == (
        "agent.yaml", 5, "processors.spans.protocol_config.mysql.max_statement",
        ["max_statements"])
    assert str(err).startswith("agent.yaml:5: processors.spans.protocol_config.mysql."
                               "max_statement: unknown key 'max_statement'")
    err = l7_error("""\
        processors:
          spans:
            protocol_config:
              mysql: {max_statements: 0}
        """)
    assert (err.line, err.key) == (4, "processors.spans.protocol_config.mysql.max_statements")
    assert "must be >= 1" in err.message


def test_unknown_protocols_are_config_errors_with_the_registered_names():
    for body, line, key in (
            ("processors:\n  spans:\n    protocols: [http1, redis]\n", 3,
             "processors.spans.protocols[1]"),
            ("probes:\n  trace:\n    protocols:\n      - mysql\n      - nope\n", 5,
             "probes.trace.protocols[1]"),
            ("processors:\n  spans:\n    protocol_config:\n      pg: {}\n", 4,
             "processors.spans.protocol_config.pg")):
        err = l7_error(body)
        assert (err.line, err.key, err.allowed) == (line, key, ["http1", "mysql"])
        assert err.message.startswith("unknown protocol")


def test_protocol_config_of_a_protocol_not_enabled_is_an_error():
    err = l7_error("""\
        processors:
          spans:
            protocols: [http1]
            protocol_config:
              mysql: {max_statements: 5}
        """)
    assert (err.line, err.key) == (5, "processors.spans.protocol_config")
    assert "'mysql' is not enabled" in err.message and "http1" in err.message
    err = l7_error("""\
        processors:
          spans:
            protocol_config: [mysql]
        """)
    assert (err.line, err.message) == (3, "expected a mapping of protocol names, got a list")


def test_registered_names_are_left_to_the_component_without_a_registry_schema():
    schemas = l7_schemas(l7_registry())
    del schemas["protocols"]
    cfg = l7_parse("probes: {trace: {}}\nprocessors:\n  spans:\n    protocols: [nope]\n"
                   "    protocol_config: {nope: {x: 1}}\n", schemas)
    assert cfg.processors["spans"].config.protocol_config == {"nope": {"x": 1}}


@pytest.mark.parametrize("text", ["9" * 400, "99999999999999999999d", "36501d"])
def test_traces_cli_durations_are_ranged_too(text):
    import argparse

    from deeptrace_core.traces_cli import parse_duration
    with pytest.raises(argparse.ArgumentTypeError, match="out of range"):
        parse_duration(text)
    assert parse_duration("36500d") == 100 * 365 * 86_400 * 10 ** 9


def test_every_count_of_every_plugin_has_an_upper_bound():
    """Issue 13, row 16: a count in the config sizes memory (maps, queues, tables); a value
    like 10**15 must be a config error naming the key, not an allocation that fails later
    or never ends."""
    from deeptrace_core.plugins import PluginHost
    schemas = PluginHost().load_entry_points().registry().schemas()
    checked = []
    for kind, classes in schemas.items():
        for name, cls in classes.items():
            attrs.resolve_types(cls)
            for a in (a for a in attrs.fields(cls) if a.type is int):
                body = f"{kind}:\n  {name}:\n    {a.name}: {10 ** 15}\n"
                if kind == "protocols":     # a protocol's own settings
                    body = ("processors:\n  spans:\n    protocol_config:\n"
                            f"      {name}:\n        {a.name}: {10 ** 15}\n")
                with pytest.raises(ConfigError) as e:
                    parse_config(body + "pipelines:\n  p: {probes: [x], exporters: [y]}\n",
                                 "agent.yaml", schemas, {})
                assert e.value.key.endswith(a.name) and e.value.line is not None, str(e.value)
                checked.append(f"{kind}.{name}.{a.name}")
    assert "processors.spans.max_pending" in checked and "probes.trace.max_connections" in checked
    assert "protocols.mysql.max_statements" in checked and len(checked) >= 20, checked
