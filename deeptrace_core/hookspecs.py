"""The DeepTrace plugin API: every hook a plugin may implement.

Plugins are modules (or objects) exposed through the ``deeptrace`` entry-point group and
decorated with :data:`hookimpl`. Built-in probes, exporters and processors register the
same way as third-party ones.

Hooks run only at start-up and shut-down. Events never pass through pluggy: the objects a
plugin registers are called directly on the hot path. What a registered class must and
may have, and the context it is built with, is :mod:`deeptrace_core.api`.
"""

import pluggy

PROJECT = "deeptrace"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# -- registration (start-up) --------------------------------------------------------------

@hookspec
def deeptrace_register_probes(registry):
    """Register probe classes: ``registry.add_probe(cls)``.

    The class satisfies :class:`deeptrace_core.api.Probe`: ``name``, ``config_class``,
    ``render(defines)``, ``attach(defines)``, ``poll(timeout_ms)``, ``stats()``,
    ``detach()``; it may have the members of :class:`deeptrace_core.api.ProbeOptions`:
    ``kernel_fields``, ``batch_limit``, ``loss_counters``, ``gc()``, ``quiesce()``. The
    agent builds it as ``cls(config, context)`` with a
    :class:`deeptrace_core.api.Context`. A class that lacks a required member, or has
    one of the wrong kind, is a registration error: the plugin is reported and skipped.

    :param registry: the :class:`deeptrace_core.registry.Registry` being filled.
    """


@hookspec
def deeptrace_register_protocols(registry):
    """Register L7 protocol classes: ``registry.add_protocol(cls)``.

    The class satisfies :class:`deeptrace_core.api.L7Protocol`: ``name``,
    ``config_class``, ``detect_c`` (package, file of its kernel detector),
    ``detect(data, lport, rport, l4) -> 0 | REQUEST | RESPONSE`` and ``parser()`` (a fresh
    :class:`deeptrace_core.l7.Parser` for one connection); it has no optional members.
    The spans stage builds it as ``cls(config_class())``.

    :param registry: the :class:`deeptrace_core.registry.Registry` being filled.
    """


@hookspec
def deeptrace_register_processors(registry):
    """Register processor classes: ``registry.add_processor(cls)``.

    The class satisfies :class:`deeptrace_core.api.Processor`: ``name``,
    ``config_class``, ``process(batch) -> list``; it may have the members of
    :class:`deeptrace_core.api.ProcessorOptions`: ``flush()`` (what it holds, at
    shut-down) and ``stats()``. The agent builds it as ``cls(config, context)`` with a
    :class:`deeptrace_core.api.Context`.

    :param registry: the :class:`deeptrace_core.registry.Registry` being filled.
    """


@hookspec
def deeptrace_register_exporters(registry):
    """Register exporter classes: ``registry.add_exporter(cls)``.

    The class satisfies :class:`deeptrace_core.api.Exporter`: ``name``,
    ``config_class``, ``export(batch)``, ``shutdown()``; it may have the members of
    :class:`deeptrace_core.api.ExporterOptions`: ``takes_agent_metrics``, ``stats()``
    and ``flush()`` (which the agent does not call). The agent builds it as
    ``cls(config, context)`` with a :class:`deeptrace_core.api.Context`. An exporter
    that raises is reported and isolated; the other exporters go on.

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
# These two receive the agent itself (:class:`deeptrace_core.agent.Agent`), not a
# Context: a lifecycle plugin may read its ``attached`` (ids of the attached probes, in
# order), ``config`` (the validated :class:`deeptrace_core.config.AgentConfig`),
# ``registry``, ``probes``, ``processors`` and ``exporters`` (the built components by id),
# ``pipelines`` and ``stats()`` (every component's counters by section).

@hookspec(historic=True)
def deeptrace_agent_start(agent):
    """Called once every probe is attached and the pipelines run.

    Historic: a plugin registered later still receives it.

    :param agent: the running :class:`deeptrace_core.agent.Agent`.
    """


@hookspec
def deeptrace_agent_stop(agent):
    """Called when the agent stops (Ctrl-C, SIGTERM or an error), after probes detach and
    exporters shut down.

    :param agent: the stopping :class:`deeptrace_core.agent.Agent`.
    """
