"""Registers the cpu probe (entry point ``cpu`` in the ``deeptrace`` group)."""

from deeptrace_core.hookspecs import hookimpl

from .probe import CpuProbe


@hookimpl
def deeptrace_register_probes(registry):
    registry.add_probe(CpuProbe)
