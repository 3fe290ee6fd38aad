"""Registers the network probe (entry point ``network`` in the ``deeptrace`` group)."""

from deeptrace_core.hookspecs import hookimpl

from .probe import NetworkProbe


@hookimpl
def deeptrace_register_probes(registry):
    registry.add_probe(NetworkProbe)
