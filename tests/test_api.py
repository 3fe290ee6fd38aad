"""The typed plugin contract (deeptrace_core.api) as plugins meet it: registration checks
against it, optional members are optional in a running agent, components get a real
Context, the hooks trace shows the register hooks, and the contract is written down
completely (every member documented, every optional member the core reads listed)."""

import inspect
import io
import logging
import pathlib
import re

import attrs
import pytest

from deeptrace_core import api, hookspecs
from deeptrace_core.agent import Agent
from deeptrace_core.config import AgentSettings, parse_config
from deeptrace_core.hookspecs import hookimpl
from deeptrace_core.plugins import PluginHost
from deeptrace_core.registry import RegistrationError, Registry
from deeptrace_core.selfmetrics import SelfMetrics
from test_plugins import make_dist, run_cli

CORE = pathlib.Path(api.__file__).parent


@attrs.define
class Empty:
    pass


# -- components with the required members only --------------------------------------------

class BareProbe:
    """A probe without BPF that hands over three records on its first poll."""
    name = "bare"
    config_class = Empty

    def __init__(self, config, context):
        self.left = 3
        self.detached = False

    def render(self, defines):
        return ""

    def attach(self, defines):
        pass

    def poll(self, timeout_ms):
        batch, self.left = [f"record-{i}" for i in range(self.left)], 0
        return batch

    def stats(self):
        return {"events": 3 - self.left}

    def detach(self):
        self.detached = True


class BareProcessor:
    name = "bare-proc"
    config_class = Empty

    def __init__(self, config, context):
        pass

    def process(self, batch):
        return batch


class BareExporter:
    name = "bare-exp"
    config_class = Empty
    got: list = []
    shut = False

    def __init__(self, config, context):
        BareExporter.got, BareExporter.shut = [], False

    def export(self, batch):
        BareExporter.got += batch

    def shutdown(self):
        BareExporter.shut = True


class BareProtocol:
    name = "bare-l7"
    config_class = Empty
    detect_c = ("bare_l7", "detect.bpf.c")

    @staticmethod
    def detect(data, lport, rport, l4):
        return 0

    def parser(self):
        return None


class ContextRecorder:
    """An exporter that keeps the context it was built with and the agent metrics it got."""
    name = "recorder"
    config_class = Empty
    takes_agent_metrics = True
    seen: list = []

    def __init__(self, config, context):
        self.context = context
        self.points = []
        ContextRecorder.seen.append(self)

    def export(self, batch):
        self.points += [p for p in batch if getattr(p, "name", "").startswith("deeptrace.")]

    def shutdown(self):
        pass


class BarePlugin:
    @hookimpl
    def deeptrace_register_probes(self, registry):
        registry.add_probe(BareProbe)

    @hookimpl
    def deeptrace_register_protocols(self, registry):
        registry.add_protocol(BareProtocol)

    @hookimpl
    def deeptrace_register_processors(self, registry):
        registry.add_processor(BareProcessor)

    @hookimpl
    def deeptrace_register_exporters(self, registry):
        registry.add_exporter(BareExporter)
        registry.add_exporter(ContextRecorder)


BARE = {"probes": BareProbe, "protocols": BareProtocol, "processors": BareProcessor,
        "exporters": BareExporter}


def without(cls, member):
    """A copy of `cls` lacking `member`."""
    body = {k: v for k, v in vars(cls).items() if k != member and not k.startswith("__")}
    return type(f"{cls.__name__}Without", (), body)


def with_(cls, **members):
    return type(f"{cls.__name__}With", (cls,), members)


def add(table, cls):
    reg = Registry(current_plugin="thirdparty")
    getattr(reg, f"add_{table[:-1]}")(cls)
    return reg


# -- registration against the contract ----------------------------------------------------

@pytest.mark.parametrize("table, member", [
    (table, member) for table, c in api.CONTRACTS.items()
    for member in api.members(c.required) if member not in ("name", "config_class")])
def test_a_missing_required_member_is_a_clear_registration_error(table, member):
    cls = without(BARE[table], member)
    with pytest.raises(RegistrationError) as err:
        add(table, cls)
    kind = api.CONTRACTS[table].kind
    name = BARE[table].name
    assert (f"{kind} {name!r} (plugin 'thirdparty') lacks {member} (required by "
            f"deeptrace_core.api.{api.CONTRACTS[table].required.__name__})") == str(err.value)


def test_name_config_class_and_classes_only():
    with pytest.raises(RegistrationError, match="probe .* has no valid 'name'"):
        add("probes", with_(BareProbe, name="a/b"))
    with pytest.raises(RegistrationError, match="exporter 'bare-exp' .*config_class must be"):
        add("exporters", with_(BareExporter, config_class=dict))
    with pytest.raises(RegistrationError, match="register the class, not an instance"):
        add("processors", BareProcessor(Empty(), None))


@pytest.mark.parametrize("table, members, problem", [
    ("probes", {"render": "text"}, "render (a method)"),
    ("protocols", {"detect_c": "bare_l7/detect.bpf.c"}, "detect_c (must be tuple[str, str])"),
    ("protocols", {"detect_c": ("bare_l7",)}, "detect_c (must be tuple[str, str])"),
    ("probes", {"kernel_fields": "task_struct.comm"}, "kernel_fields (must be Collection[str])"),
    ("probes", {"kernel_fields": ("task_struct.comm", 4)}, "kernel_fields (must be"),
    ("probes", {"quiesce": True}, "quiesce (a method)"),
    ("probes", {"batch_limit": "4096"}, "batch_limit (must be int)"),
    ("exporters", {"takes_agent_metrics": "yes"}, "takes_agent_metrics (must be bool)"),
    ("processors", {"flush": []}, "flush (a method)"),
])
def test_a_member_of_the_wrong_kind_is_a_registration_error(table, members, problem):
    with pytest.raises(RegistrationError, match=re.escape(problem)):
        add(table, with_(BARE[table], **members))


def test_optional_members_may_be_absent_or_none():
    for table, cls in BARE.items():
        assert cls.name in getattr(add(table, cls), table)
    full = with_(BareProbe, kernel_fields=("task_struct.comm",), batch_limit=10,
                 loss_counters=["lost"], gc=lambda self: None, quiesce=lambda self: None)
    assert "bare" in add("probes", full).probes
    assert "bare" in add("probes", with_(BareProbe, gc=None, loss_counters=None)).probes


def test_registered_components_satisfy_the_runtime_protocols():
    """The built-ins and the bare ones: isinstance against the runtime-checkable
    protocols holds for every registered class the registry accepted."""
    host = PluginHost().load_entry_points()
    host.register(BarePlugin(), "bare")
    reg = host.registry()
    for table, name, entry in reg.entries():
        assert isinstance(entry.cls, api.CONTRACTS[table].required), (table, name)
    assert not isinstance(without(BareProbe, "poll"), api.Probe)


def test_a_plugin_registering_an_incomplete_component_is_skipped_by_name():
    class Half:
        @hookimpl
        def deeptrace_register_processors(self, registry):
            registry.add_processor(BareProcessor)

        @hookimpl
        def deeptrace_register_exporters(self, registry):
            registry.add_exporter(without(BareExporter, "shutdown"))

    host = PluginHost().load_entry_points()
    host.register(Half(), "half")
    reg = host.registry()
    assert "bare-proc" not in reg.processors           # dropped whole
    info = host.infos["half"]
    assert info.status == "failed"
    assert "exporter 'bare-exp' (plugin 'half') lacks shutdown" in info.error
    assert "console" in reg.exporters                   # the others go on


# -- a running agent: optional members are optional, components get a Context ------------

def test_bare_components_run_in_the_agent_and_get_a_real_context():
    host = PluginHost().load_entry_points()
    host.register(BarePlugin(), "bare")
    registry = host.registry()
    ContextRecorder.seen = []
    text = """
agent: {stats_interval: 0.05s, nice: 0}
probes: {bare: {}}
processors: {bare-proc: {}}
exporters: {bare-exp: {}, recorder/mine: {}}
pipelines: {main: {probes: [bare], processors: [bare-proc], exporters: [bare-exp, recorder/mine]}}
"""
    config = parse_config(text, "inline.yaml", registry.schemas())
    stats = io.StringIO()
    agent = Agent(config, host, registry, stats_stream=stats)
    agent.start()
    try:
        agent.run(duration=0.3)       # stats reports and the gc round, without gc()
    finally:
        agent.shutdown()              # no quiesce, no batch_limit, no flush, no stats()
    assert BareExporter.got == ["record-0", "record-1", "record-2"] and BareExporter.shut
    assert agent.probes["bare"].detached
    assert "deeptrace final: probe.bare: events=3" in stats.getvalue()

    [rec] = ContextRecorder.seen
    ctx = rec.context
    assert type(ctx) is api.Context
    assert (ctx.kind, ctx.id) == ("exporter", "recorder/mine")
    assert ctx.registry is registry and ctx.registry.probes["bare"].cls is BareProbe
    assert isinstance(ctx.logger, logging.Logger)
    assert ctx.logger.name == "deeptrace.exporter.recorder/mine"
    assert ctx.agent_settings is config.agent and ctx.agent_settings.stats_interval == 0.05
    assert ctx.self_metrics is agent.self_metrics
    # The agent metrics it takes start when the probes started, as its context says.
    lost_or_stat = [p for p in rec.points if p.name == "deeptrace.agent.stat"]
    assert lost_or_stat and {p.start_ns for p in lost_or_stat} == {ctx.self_metrics.start_ns}
    assert ("probe.bare", "events", 3) in {
        (p.attributes["deeptrace.component"], p.attributes["deeptrace.counter"], p.value)
        for p in lost_or_stat}


def test_context_outside_an_agent_has_the_defaults():
    reg = Registry()
    ctx = api.Context.for_component("probe", "trace/x", reg)
    assert ctx.registry is reg and ctx.logger.name == "deeptrace.probe.trace/x"
    assert ctx.agent_settings == AgentSettings()
    assert isinstance(ctx.self_metrics, SelfMetrics) and ctx.self_metrics.start_ns > 0
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        ctx.registry = None


def test_probe_render_builds_the_probe_with_a_context(tmp_path):
    """`deeptrace probe render` builds the probe as the agent does, with a Context."""
    make_dist(tmp_path, "deeptrace-plugin-ctx", "ctx_plugin_mod", """
import attrs
from deeptrace_core.hookspecs import hookimpl

@attrs.define
class C:
    pass

class CtxProbe:
    name = "ctxprobe"
    config_class = C
    def __init__(self, config, context):
        self.context = context
    def render(self, defines):
        c = self.context
        return (f"// {type(c).__module__}.{type(c).__name__} {c.kind} {c.id} "
                f"{c.logger.name} {'ctxprobe' in c.registry.probes} {c.agent_settings.nice}")
    def attach(self, defines): pass
    def poll(self, timeout_ms): return []
    def stats(self): return {}
    def detach(self): pass

@hookimpl
def deeptrace_register_probes(registry):
    registry.add_probe(CtxProbe)
""", "ctx")
    out = run_cli(["probe", "render", "ctxprobe"], site=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ("// deeptrace_core.api.Context probe ctxprobe "
                                  "deeptrace.probe.ctxprobe True 10")


# -- DEEPTRACE_TRACE_HOOKS ----------------------------------------------------------------

class Raises:
    @hookimpl
    def deeptrace_register_processors(self, registry):
        registry.add_processor(with_(BareProcessor, name="raises-proc"))

    @hookimpl
    def deeptrace_register_exporters(self, registry):
        raise RuntimeError("exporter backend missing")


def test_hooks_trace_shows_the_register_hooks_and_keeps_isolation(monkeypatch, capsys):
    monkeypatch.setenv("DEEPTRACE_TRACE_HOOKS", "1")
    host = PluginHost().load_entry_points()
    host.register(Raises(), "raises")
    host.register(BarePlugin(), "bare")
    reg = host.registry()
    err = capsys.readouterr().err
    for hook in ("deeptrace_register_probes", "deeptrace_register_protocols",
                 "deeptrace_register_processors", "deeptrace_register_exporters"):
        assert f"{hook} [hook]" in err, hook
    # One traced call per plugin, which the registry argument names.
    assert re.search(r"deeptrace_register_probes \[hook\]\n\s+registry: <Registry "
                     r"plugin='trace' ", err)
    assert "registry: <Registry plugin='raises' " in err
    # A plugin whose register hook raises is still dropped whole, the rest goes on.
    assert host.infos["raises"].status == "failed"
    assert "deeptrace_register_exporters failed: exporter backend missing" in \
        host.infos["raises"].error
    assert "raises-proc" not in reg.processors and reg.processors["bare-proc"].plugin == "bare"
    assert "bare-exp" in reg.exporters and "console" in reg.exporters


def test_hooks_trace_from_the_command_line():
    out = run_cli(["plugins"], DEEPTRACE_TRACE_HOOKS="1")
    assert out.returncode == 0, out.stderr
    assert "deeptrace_register_exporters [hook]" in out.stderr
    assert "registry: <Registry plugin='jsonl' " in out.stderr


# -- the contract written down ------------------------------------------------------------

def test_every_member_of_the_contract_is_documented():
    protos = [c.required for c in api.CONTRACTS.values()]
    protos += [c.options for c in api.CONTRACTS.values() if c.options]
    for proto in protos:
        doc = inspect.getdoc(proto)
        for name, kind in api.members(proto).items():
            if kind == "method":
                assert inspect.getdoc(getattr(proto, name)), f"{proto.__name__}.{name}"
            else:
                assert f"``{name}``" in doc, f"{proto.__name__} does not document {name}"
        if proto in (api.Probe, api.Processor, api.Exporter):
            options = api.CONTRACTS[f"{proto.__name__.lower()}s"].options
            assert f":class:`{options.__name__}`" in doc
    for field in attrs.fields(api.Context):
        assert f"``{field.name}``" in inspect.getdoc(api.Context), field.name


def test_register_hooks_name_the_contract_exactly():
    """Each register hook's docstring points at its protocol classes in
    deeptrace_core.api and names every member, required and optional."""
    hooks = {"probes": hookspecs.deeptrace_register_probes,
             "protocols": hookspecs.deeptrace_register_protocols,
             "processors": hookspecs.deeptrace_register_processors,
             "exporters": hookspecs.deeptrace_register_exporters}
    for table, hook in hooks.items():
        doc = inspect.getdoc(hook)
        contract = api.CONTRACTS[table]
        for proto in filter(None, (contract.required, contract.options)):
            assert f":class:`deeptrace_core.api.{proto.__name__}`" in doc, (table, proto)
            for name in api.members(proto):
                assert f"``{name}" in doc, (table, name)
        if table != "protocols":
            assert ":class:`deeptrace_core.api.Context`" in doc
    text = inspect.getsource(hookspecs)
    assert "deeptrace_plugins" not in text
    for ref in re.findall(r"deeptrace_core\.api\.(\w+)", text):
        assert hasattr(api, ref), ref


# Reads by name (getattr/hasattr) in the core of things that are not components.
NOT_COMPONENTS = {
    ("config.py", "_validators"), ("config.py", "_original_options"),   # attrs validators
    ("config.py", "options"),
    ("plugins.py", "_path"),                  # an entry point's distribution
    ("traces_cli.py", "traces_command"),      # argparse
    ("traces_cli.py", "isatty"),              # a stream
    ("traces_cli.py", "collector"),           # argparse
    ("redaction.py", "kind"), ("redaction.py", "payload"),   # records, not components
    ("redaction.py", "attributes"),
}
_READ = re.compile(r"\b(?:getattr|hasattr)\(\s*[^,()]+,\s*[\"'](\w+)[\"']")


def test_every_optional_member_the_core_reads_is_in_the_contract():
    """The core reads a component's optional members with getattr/hasattr: each name it
    reads must be a member of the contract (so documented in deeptrace_core.api)."""
    listed = set()
    for c in api.CONTRACTS.values():
        listed |= set(api.members(c.required))
        listed |= set(api.members(c.options)) if c.options else set()
    reads = set()
    for path in CORE.glob("*.py"):
        if path.name != "api.py":
            reads |= {(path.name, n) for n in _READ.findall(path.read_text())}
    unknown = {r for r in reads if r[1] not in listed} - NOT_COMPONENTS
    assert not unknown, f"read by the core but not in deeptrace_core.api: {sorted(unknown)}"
    optional = set().union(*api.optional_members().values())
    assert optional <= {n for _, n in reads}, \
        "an optional member the core never reads: drop it from the contract"


# Members optional in every contract that has them: reading one as `x.name` fails on a
# component without it.
DIRECT_READ_DEBT: set = set()


def test_the_core_reads_optional_only_members_defensively():
    required = set().union(*(api.members(c.required) for c in api.CONTRACTS.values()))
    only_optional = set().union(*api.optional_members().values()) - required - {"flush"}
    direct = set()
    for path in CORE.glob("*.py"):
        if path.name == "api.py":
            continue
        for line in path.read_text().splitlines():
            code = _READ.sub("", line.split("#")[0])
            direct |= {(path.name, n) for n in re.findall(r"\.(\w+)\b", code)
                       if n in only_optional}
    assert direct == DIRECT_READ_DEBT
