"""The DeepTrace plugin API: every hook a plugin may implement.

Plugins are modules (or objects) exposed through the ``deeptrace`` entry-point group and
decorated with :data:`hookimpl`. Built-in probes, exporters and processors register the
same way as third-party ones.

Hooks run only at start-up and shut-down. Events never pass through pluggy: the objects a
plugin registers are called directly on the hot path.
"""

import pluggy

PROJECT = "deeptrace"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# -- registration (start-up) --------------------------------------------------------------

@hookspec
def deeptrace_register_probes(registry):
    """Register probe classes: ``registry.add_probe(cls)``.

    A probe class has ``name`` (its config type), ``config_class`` (an attrs class, the
    schema of its config section), ``kernel_fields`` (``"struct.member"`` strings whose BTF
    offsets its BPF C needs) and is built as ``cls(config, context)``. It must provide
    ``render(defines) -> str`` (its final BPF C), ``attach(defines)``, ``poll(timeout_ms)
    -> list`` (the records decoded since the last call), ``stats() -> dict`` (counters by
    cause, lost events included) and ``detach()``. At shut-down the agent calls its
    optional ``quiesce()`` (stop producing records), then ``poll(0)``, again while a poll
    returns ``batch_limit`` records (set it if a poll hands over bounded batches), then
    takes its final counters, so they account for every record exactly.

    :param registry: the :class:`deeptrace_core.registry.Registry` being filled.
    """


@hookspec
def deeptrace_register_protocols(registry):
    """Register L7 protocol classes: ``registry.add_protocol(cls)``.

    A protocol class has ``name``, ``config_class``, ``detect_c`` (package, file of its
    kernel detector), ``detect(data, lport, rport, l4) -> 0 | REQUEST | RESPONSE`` and
    ``parser()`` (a fresh parser for one connection). The full contract is in
    :mod:`deeptrace_plugins.protocols.base`.

    :param registry: the :class:`deeptrace_core.registry.Registry` being filled.
    """


@hookspec
def deeptrace_register_processors(registry):
    """Register processor classes: ``registry.add_processor(cls)``.

    A processor has ``name``, ``config_class``, is built as ``cls(config, context)`` and
    provides ``process(batch: list) -> list``.

    :param registry: the :class:`deeptrace_core.registry.Registry` being filled.
    """


@hookspec
def deeptrace_register_exporters(registry):
    """Register exporter classes: ``registry.add_exporter(cls)``.

    An exporter has ``name``, ``config_class``, is built as ``cls(config, context)`` and
    provides ``export(batch: list)``, ``flush()`` and ``shutdown()``. An exporter that
    raises is reported and isolated; the other exporters go on.

    :param registry: the :class:`deeptrace_core.registry.Registry` being filled.
    """


# -- BPF compilation (start-up) -----------------------------------------------------------

@hookspec
def deeptrace_bpf_cflags(probe_name, config):
    """Contribute C macro definitions to a probe's BPF program before it is compiled.

    :param probe_name: the probe's type name, e.g. ``"trace"``.
    :param config: the probe's validated config object.
    :return: a dict ``{MACRO: value}`` or ``None``. Results of all plugins are merged.
    """


# -- agent lifecycle ----------------------------------------------------------------------

@hookspec(historic=True)
def deeptrace_agent_start(agent):
    """Called once every probe is attached and the pipelines run.

    Historic: a plugin registered later still receives it.

    :param agent: the running :class:`deeptrace_core.agent.Agent`.
    """


@hookspec
def deeptrace_agent_stop(agent):
    """Called when the agent stops (Ctrl-C, SIGTERM or an error), after probes detach.

    :param agent: the stopping :class:`deeptrace_core.agent.Agent`.
    """
