"""filter processor: keeps or drops records by field values.

    processors:
      filter/no-dns:
        exclude: {remote_port: [53]}
      filter/only-tcp:
        include: {l4: [tcp]}

A record passes when every ``include`` field has one of its listed values and no
``exclude`` field does. Values compare as strings, so ports and names read the same.
"""

import attrs

from deeptrace_core.hookspecs import hookimpl


@attrs.define
class FilterConfig:
    include: dict[str, list[str]] = attrs.field(factory=dict)
    exclude: dict[str, list[str]] = attrs.field(factory=dict)


class FilterProcessor:
    name = "filter"
    config_class = FilterConfig

    def __init__(self, config: FilterConfig, context=None):
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
