"""jsonl exporter: one JSON object per record (payload base64), to a file or stdout."""

import json
import os
import sys

import attrs

from deeptrace_core.hookspecs import hookimpl


@attrs.define
class JsonlConfig:
    path: str = "-"  # "-" is stdout
    append: bool = True


class JsonlExporter:
    name = "jsonl"
    config_class = JsonlConfig

    def __init__(self, config: JsonlConfig, context=None):
        self.config = config
        if config.path == "-":
            self._file = sys.stdout
        else:
            parent = os.path.dirname(config.path)
            if parent:
                os.makedirs(parent, exist_ok=True)
            self._file = open(config.path, "a" if config.append else "w", encoding="utf-8")

    def export(self, batch):
        self._file.write("".join(json.dumps(r.to_dict(), separators=(",", ":")) + "\n"
                                 for r in batch))
        self._file.flush()

    def flush(self):
        self._file.flush()

    def shutdown(self):
        self.flush()
        if self._file is not sys.stdout:
            self._file.close()


@hookimpl
def deeptrace_register_exporters(registry):
    registry.add_exporter(JsonlExporter)
