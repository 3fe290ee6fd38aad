"""Registers the trace probe (entry point ``trace`` in the ``deeptrace`` group)."""

from deeptrace_core.hookspecs import hookimpl

from .probe import TraceProbe


@hookimpl
def deeptrace_register_probes(registry):
    registry.add_probe(TraceProbe)
