"""Registers the host probe (entry point ``host`` in the ``deeptrace`` group)."""

from deeptrace_core.hookspecs import hookimpl

from .probe import HostProbe


@hookimpl
def deeptrace_register_probes(registry):
    registry.add_probe(HostProbe)
