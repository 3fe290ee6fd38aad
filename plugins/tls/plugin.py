"""Registers the tls probe (entry point ``tls`` in the ``deeptrace`` group)."""

from deeptrace_core.hookspecs import hookimpl

from .probe import TlsProbe


@hookimpl
def deeptrace_register_probes(registry):
    registry.add_probe(TlsProbe)
