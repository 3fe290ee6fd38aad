"""What plugins register: component classes by kind and type name, checked on arrival."""

import attrs

KINDS = ("probes", "protocols", "processors", "exporters")

# Methods each kind of component must offer; checked when it is registered, not at run time.
REQUIRED_METHODS = {
    "probes": ("render", "attach", "poll", "stats", "detach"),
    "protocols": ("detect",),
    "processors": ("process",),
    "exporters": ("export", "flush", "shutdown"),
}


class RegistrationError(Exception):
    """A plugin registered something that does not satisfy the plugin API."""


@attrs.define
class Entry:
    cls: type
    plugin: str  # the registering plugin's name


@attrs.define
class Registry:
    probes: dict = attrs.Factory(dict)
    protocols: dict = attrs.Factory(dict)
    processors: dict = attrs.Factory(dict)
    exporters: dict = attrs.Factory(dict)
    current_plugin: str = "?"

    def add_probe(self, cls):
        self._add("probes", cls)

    def add_protocol(self, cls):
        self._add("protocols", cls)

    def add_processor(self, cls):
        self._add("processors", cls)

    def add_exporter(self, cls):
        self._add("exporters", cls)

    def _add(self, kind, cls):
        name = getattr(cls, "name", None)
        if not isinstance(name, str) or not name or "/" in name:
            raise RegistrationError(f"{kind[:-1]} {cls!r} has no valid 'name'")
        config_class = getattr(cls, "config_class", None)
        if config_class is None or not attrs.has(config_class):
            raise RegistrationError(f"{kind[:-1]} {name!r}: config_class must be an attrs class")
        missing = [m for m in REQUIRED_METHODS[kind] if not callable(getattr(cls, m, None))]
        if missing:
            raise RegistrationError(f"{kind[:-1]} {name!r} lacks {', '.join(missing)}")
        table = getattr(self, kind)
        if name in table:
            raise RegistrationError(
                f"{kind[:-1]} {name!r} is already registered by plugin {table[name].plugin!r}")
        table[name] = Entry(cls, self.current_plugin)

    def schemas(self):
        """Config classes by section and type name, as the config loader wants them."""
        return {kind: {n: e.cls.config_class for n, e in getattr(self, kind).items()}
                for kind in ("probes", "processors", "exporters")}
