"""Registers the disk probe (entry point ``disk`` in the ``deeptrace`` group)."""

from deeptrace_core.hookspecs import hookimpl

from .probe import DiskProbe


@hookimpl
def deeptrace_register_probes(registry):
    registry.add_probe(DiskProbe)
