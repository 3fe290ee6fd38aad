"""Registers the memory probe (entry point ``memory`` in the ``deeptrace`` group)."""

from deeptrace_core.hookspecs import hookimpl

from .probe import MemoryProbe


@hookimpl
def deeptrace_register_probes(registry):
    registry.add_probe(MemoryProbe)
