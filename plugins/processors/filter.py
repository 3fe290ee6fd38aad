"""filter processor: keeps or drops records by field values.

    processors:
      filter/no-dns:
        exclude: {remote_port: [53]}
      filter/only-tcp:
        include: {l4: [tcp]}

A record passes when every ``include`` field has one of its listed values and no
``exclude`` field does. Values compare as strings, so ports and names read the same.
Field names are checked when the agent starts: one no record has (a typo, which in
``include`` would drop everything) is a config error listing the fields records have.
"""

import attrs

from deeptrace_core.hookspecs import hookimpl


def record_fields() -> frozenset:
    """The field names of the records that flow through pipelines: spans, metric points,
    socket records, TCP connections, OOM kills (their attrs fields and properties)."""
    from deeptrace_core.metrics import MetricPoint
    from deeptrace_core.span import Span
    from deeptrace_plugins.memory.decoder import OomEvent
    from deeptrace_plugins.network.decoder import TcpConnection
    from deeptrace_plugins.trace.decoder import SocketRecord

    names = {"kind"}
    for cls in (Span, MetricPoint, SocketRecord, TcpConnection, OomEvent):
        names.update(a.name for a in attrs.fields(cls))
        names.update(n for n, v in vars(cls).items()
                     if isinstance(v, property) and not n.startswith("_"))
    return frozenset(names)


@attrs.define
class FilterConfig:
    include: dict[str, list[str]] = attrs.field(factory=dict)
    exclude: dict[str, list[str]] = attrs.field(factory=dict)


class FilterProcessor:
    name = "filter"
    config_class = FilterConfig

    def __init__(self, config: FilterConfig, context=None):
        known = record_fields()
        for which, fields in (("include", config.include), ("exclude", config.exclude)):
            unknown = sorted(set(fields) - known)
            if unknown:
                raise ValueError(f"{which}: no record has the field "
                                 f"{', '.join(map(repr, unknown))} "
                                 f"(allowed: {', '.join(sorted(known))})")
        self.include = [(k, frozenset(map(str, vs))) for k, vs in config.include.items()]
        self.exclude = [(k, frozenset(map(str, vs))) for k, vs in config.exclude.items()]

    def _keep(self, rec) -> bool:
        for field, values in self.include:
            if str(getattr(rec, field, None)) not in values:
                return False
        for field, values in self.exclude:
            if str(getattr(rec, field, None)) in values:
                return False
        return True

    def process(self, batch):
        return [r for r in batch if self._keep(r)]


@hookimpl
def deeptrace_register_processors(registry):
    registry.add_processor(FilterProcessor)
