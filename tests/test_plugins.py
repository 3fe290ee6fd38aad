"""The plugin framework as an API: discovery through entry points, isolation of broken
plugins, blocking, validation at registration, and every hook documented and exercised."""

import inspect
import json
import os
import subprocess
import sys

import attrs
import pytest

from deeptrace_core import hookspecs
from deeptrace_core.hookspecs import hookimpl
from deeptrace_core.plugins import PluginHost

DEEPTRACE = [sys.executable, "-m", "deeptrace_core.cli"]
BUILTIN = {"trace", "console", "jsonl", "store", "filter", "spans", "traces", "http1", "http2",
           "mysql", "postgresql", "mongodb", "dns", "memcached"}


def make_dist(site, dist, modname, code, ep_name):
    """A real installed distribution (dist-info + module) exposing a deeptrace entry point."""
    info = site / f"{dist.replace('-', '_')}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[deeptrace]\n{ep_name} = {modname}\n")
    (site / f"{modname}.py").write_text(code)


def run_cli(args, site=None, **env):
    e = {**os.environ, **env}
    if site:
        e["PYTHONPATH"] = str(site)
    return subprocess.run([*DEEPTRACE, *args], capture_output=True, text=True, env=e)


def test_builtins_register_through_entry_points():
    host = PluginHost().load_entry_points()
    assert BUILTIN <= {n for n, i in host.infos.items() if i.status == "loaded"}
    assert all(host.infos[n].dist == "deeptrace" for n in BUILTIN)
    reg = host.registry()
    assert "trace" in reg.probes and set(reg.exporters) >= {"console", "jsonl"}
    assert set(reg.processors) >= {"filter", "spans", "traces"}
    assert set(reg.protocols) >= {"http1", "http2", "mysql", "postgresql", "mongodb", "dns",
                                  "memcached"}


def test_broken_third_party_plugin_is_reported_and_skipped(tmp_path):
    make_dist(tmp_path, "deeptrace-broken", "broken_plugin_mod",
              "raise RuntimeError('boom at import')\n", "broken")
    out = run_cli(["plugins"], site=tmp_path)
    assert out.returncode == 0, out.stderr
    line = next(l for l in out.stdout.splitlines() if l.startswith("broken"))
    assert "deeptrace-broken" in line and "failed" in line and "boom at import" in line
    assert "plugin broken (deeptrace-broken 0.1) skipped" in out.stderr
    assert any(l.startswith("trace ") and "loaded" in l for l in out.stdout.splitlines())
    # The agent goes on: a config still validates with the built-ins.
    cfg = tmp_path / "a.yaml"
    cfg.write_text("probes: {trace: {}}\nexporters: {console: {}}\n"
                   "pipelines: {m: {probes: [trace], exporters: [console]}}\n")
    assert run_cli(["validate", "--config", str(cfg)], site=tmp_path).returncode == 0


def test_third_party_exporter_is_found_and_usable(tmp_path):
    make_dist(tmp_path, "deeptrace-plugin-count", "count_plugin_mod", """
import attrs
from deeptrace_core.hookspecs import hookimpl

@attrs.define
class CountConfig:
    every: int = 1

class CountExporter:
    name = "count"
    config_class = CountConfig
    def __init__(self, config, context): pass
    def export(self, batch): pass
    def flush(self): pass
    def shutdown(self): pass

@hookimpl
def deeptrace_register_exporters(registry):
    registry.add_exporter(CountExporter)
""", "count")
    out = run_cli(["plugins"], site=tmp_path)
    assert "exporter:count" in out.stdout and "deeptrace-plugin-count" in out.stdout
    cfg = tmp_path / "a.yaml"
    cfg.write_text("probes: {trace: {}}\nexporters: {count: {every: x}}\n"
                   "pipelines: {m: {probes: [trace], exporters: [count]}}\n")
    bad = run_cli(["validate", "--config", str(cfg)], site=tmp_path)
    assert bad.returncode == 2 and "exporters.count.every: expected an integer" in bad.stderr


def test_blocking_by_env_and_by_config(tmp_path):
    out = run_cli(["plugins"], DEEPTRACE_BLOCK_PLUGINS="jsonl")
    assert any(l.startswith("jsonl") and "blocked" in l for l in out.stdout.splitlines())
    cfg = tmp_path / "a.yaml"
    cfg.write_text("agent: {block_plugins: [jsonl]}\nprobes: {trace: {}}\n"
                   "exporters: {jsonl: {}}\npipelines: {m: {probes: [trace], exporters: [jsonl]}}\n")
    out = run_cli(["validate", "--config", str(cfg)])
    assert out.returncode == 2
    err = out.stderr.strip().splitlines()[-1]
    assert "exporters.jsonl: unknown exporter type 'jsonl' (allowed: console" in err
    assert "jsonl," not in err.split("allowed:")[1]


class BadArgs:
    @hookimpl
    def deeptrace_register_probes(self, registry, surprise):
        pass


class TypoHook:
    @hookimpl
    def deeptrace_register_probe(self, registry):
        pass


class HalfProbe:
    name = "half"

    @attrs.define
    class config_class:
        x: int = 1

    def render(self, defines):
        return ""


class RegistersBadProbe:
    @hookimpl
    def deeptrace_register_exporters(self, registry):
        registry.add_exporter(type("Ok", (), {
            "name": "okexp", "config_class": HalfProbe.config_class,
            "export": lambda s, b: None, "flush": lambda s: None, "shutdown": lambda s: None}))

    @hookimpl
    def deeptrace_register_probes(self, registry):
        registry.add_probe(HalfProbe)


@pytest.mark.parametrize("plugin,needle", [
    (BadArgs(), "surprise"), (TypoHook(), "deeptrace_register_probe")])
def test_invalid_hook_implementations_fail_at_load(plugin, needle):
    host = PluginHost().load_entry_points()
    assert host.register(plugin, "bad") is False
    assert host.infos["bad"].status == "failed" and needle in host.infos["bad"].error
    assert "trace" in host.registry().probes  # the rest still works


def test_invalid_registration_drops_that_plugin_only():
    host = PluginHost().load_entry_points()
    assert host.register(RegistersBadProbe(), "halfbaked")
    reg = host.registry()
    assert "half" not in reg.probes and "okexp" not in reg.exporters
    info = host.infos["halfbaked"]
    assert info.status == "failed" and "probe 'half' (plugin 'halfbaked') lacks attach, poll, " \
        "stats, detach (required by deeptrace_core.api.Probe)" in info.error
    assert "trace" in reg.probes and "console" in reg.exporters


def test_every_hook_is_documented_with_its_parameters():
    specs = [getattr(hookspecs, n) for n in dir(hookspecs) if n.startswith("deeptrace_")]
    assert len(specs) >= 7
    for spec in specs:
        doc = inspect.getdoc(spec)
        assert doc, f"{spec.__name__} has no docstring"
        for param in inspect.signature(spec).parameters:
            assert f":param {param}:" in doc, f"{spec.__name__} does not document {param}"


def test_every_hook_is_implemented_by_a_test_plugin():
    """Meta-test: for each hook, some test defines a plugin implementing it."""
    here = os.path.dirname(__file__)
    text = "".join(open(os.path.join(here, f)).read() for f in os.listdir(here)
                   if f.endswith(".py"))
    for name in (n for n in dir(hookspecs) if n.startswith("deeptrace_")):
        assert f"def {name}(" in text, f"no test implements {name}"


@attrs.define
class EchoConfig:
    port: int = 7


class EchoProtocol:
    name = "echo"
    config_class = EchoConfig
    detect_c = ("echo_plugin", "detect.bpf.c")

    def __init__(self, config=None):
        self.config = config

    @staticmethod
    def detect(data, lport=0, rport=0, l4="tcp"):
        return 1 if data.startswith(b"ECHO ") else 0

    def parser(self):
        return None  # registration never calls it


class ProtocolPlugin:
    @hookimpl
    def deeptrace_register_protocols(self, registry):
        registry.add_protocol(EchoProtocol)


class NoDetectPlugin:
    @hookimpl
    def deeptrace_register_protocols(self, registry):
        registry.add_protocol(type("Nodetect", (), {"name": "nodetect",
                                                    "config_class": EchoConfig}))


def test_protocol_registration_is_validated():
    host = PluginHost().load_entry_points()
    host.register(ProtocolPlugin(), "echo")
    host.register(NoDetectPlugin(), "nodetect")
    reg = host.registry()
    assert reg.protocols["echo"].cls is EchoProtocol and reg.protocols["echo"].plugin == "echo"
    assert "nodetect" not in reg.protocols
    assert ("protocol 'nodetect' (plugin 'nodetect') lacks detect_c, detect, parser "
            "(required by deeptrace_core.api.L7Protocol)") in host.infos["nodetect"].error


class CflagsPlugin:
    @hookimpl
    def deeptrace_bpf_cflags(self, probe_name, config):
        return {"DEEPTRACE_TEST_MACRO": 42} if probe_name == "trace" else None


def test_bpf_cflags_hook_reaches_the_rendered_program():
    host = PluginHost().load_entry_points()
    host.register(CflagsPlugin(), "cflags")
    entry = host.registry().probes["trace"]
    cfg = entry.cls.config_class()
    defines = host.bpf_defines("trace", cfg)
    assert defines == {"DEEPTRACE_TEST_MACRO": 42}
    assert "#define DEEPTRACE_TEST_MACRO 42\n" in entry.cls(cfg).render(defines)
