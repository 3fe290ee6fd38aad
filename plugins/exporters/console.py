"""console exporter: one readable line per record, for people."""

import sys

import attrs

from deeptrace_core.hookspecs import hookimpl


@attrs.define
class ConsoleConfig:
    stream: str = attrs.field(default="stdout", validator=attrs.validators.in_(["stdout", "stderr"]))


class ConsoleExporter:
    name = "console"
    config_class = ConsoleConfig

    def __init__(self, config: ConsoleConfig, context=None):
        self.config = config

    def _out(self):
        # Looked up per batch so a test's or a user's redirection of sys.stdout is honoured.
        return sys.stdout if self.config.stream == "stdout" else sys.stderr

    def export(self, batch):
        out = self._out()
        out.write("".join(r.line() + "\n" for r in batch))
        out.flush()

    def flush(self):
        self._out().flush()

    def shutdown(self):
        self.flush()


@hookimpl
def deeptrace_register_exporters(registry):
    registry.add_exporter(ConsoleExporter)
