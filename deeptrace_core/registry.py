"""What plugins register: component classes by kind and type name, checked on arrival
against the contracts of :mod:`deeptrace_core.api`."""

import collections.abc
import types
import typing

import attrs

from .api import CONTRACTS, members


class RegistrationError(Exception):
    """A plugin registered something that does not satisfy the plugin API."""


@attrs.define
class Entry:
    cls: type
    plugin: str  # the registering plugin's name


@attrs.define(repr=False)
class Registry:
    probes: dict = attrs.Factory(dict)
    protocols: dict = attrs.Factory(dict)
    processors: dict = attrs.Factory(dict)
    exporters: dict = attrs.Factory(dict)
    current_plugin: str = "?"

    def add_probe(self, cls):
        """Add a probe class (:class:`deeptrace_core.api.Probe`)."""
        self._add("probes", cls)

    def add_protocol(self, cls):
        """Add an L7 protocol class (:class:`deeptrace_core.api.L7Protocol`)."""
        self._add("protocols", cls)

    def add_processor(self, cls):
        """Add a processor class (:class:`deeptrace_core.api.Processor`)."""
        self._add("processors", cls)

    def add_exporter(self, cls):
        """Add an exporter class (:class:`deeptrace_core.api.Exporter`)."""
        self._add("exporters", cls)

    def _add(self, table_name, cls):
        contract = CONTRACTS[table_name]
        name = getattr(cls, "name", None)
        label = f"{contract.kind} {name!r}" if isinstance(name, str) else f"{contract.kind} {cls!r}"
        where = f"{label} (plugin {self.current_plugin!r})"
        if not isinstance(cls, type):
            raise RegistrationError(f"{where}: register the class, not an instance")
        if not isinstance(name, str) or not name or "/" in name:
            raise RegistrationError(f"{where} has no valid 'name' (a non-empty string "
                                    "without '/')")
        config_class = getattr(cls, "config_class", None)
        if config_class is None or not attrs.has(config_class):
            raise RegistrationError(f"{where}: config_class must be an attrs class")
        required = members(contract.required)
        missing = [m for m in required if not hasattr(cls, m)]
        if missing:
            raise RegistrationError(
                f"{where} lacks {', '.join(missing)} (required by "
                f"deeptrace_core.api.{contract.required.__name__})")
        optional = members(contract.options) if contract.options else {}
        # An optional member set to None is absent, as the core reads it.
        present = {**required, **{m: w for m, w in optional.items()
                                  if getattr(cls, m, None) is not None}}
        wrong = [f"{m} ({_want(want)})" for m, want in present.items()
                 if m not in ("name", "config_class") and hasattr(cls, m)
                 and not _conforms(getattr(cls, m), want)]
        if wrong:
            raise RegistrationError(f"{where}: wrong kind of member: {', '.join(wrong)} "
                                    "(see deeptrace_core.api)")
        table = getattr(self, table_name)
        if name in table:
            raise RegistrationError(
                f"{label} is already registered by plugin {table[name].plugin!r}")
        table[name] = Entry(cls, self.current_plugin)

    def entries(self):
        """(table, name, entry) of everything registered."""
        for table_name in CONTRACTS:
            for name, entry in getattr(self, table_name).items():
                yield table_name, name, entry

    def drop_plugin(self, plugin):
        """Forget every component `plugin` registered."""
        for table_name, name, entry in list(self.entries()):
            if entry.plugin == plugin:
                del getattr(self, table_name)[name]

    def schemas(self):
        """Config classes by section and type name, as the config loader wants them."""
        return {kind: {n: e.cls.config_class for n, e in getattr(self, kind).items()}
                for kind in ("probes", "protocols", "processors", "exporters")}

    def __repr__(self):
        # Short: DEEPTRACE_TRACE_HOOKS prints it for every register hook call.
        sizes = " ".join(f"{t}={len(getattr(self, t))}" for t in CONTRACTS)
        return f"<Registry plugin={self.current_plugin!r} {sizes}>"


def _conforms(value, want) -> bool:
    """Whether a member's value is of the kind its contract declares."""
    if want == "method":
        return callable(value)
    origin, args = typing.get_origin(want), typing.get_args(want)
    if origin in (typing.Union, types.UnionType):
        return any(_conforms(value, a) for a in args)
    if origin is tuple:
        if not isinstance(value, tuple):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_conforms(v, args[0]) for v in value)
        return len(value) == len(args) and all(map(_conforms, value, args))
    if origin is not None and issubclass(origin, collections.abc.Collection):
        if not isinstance(value, origin) or isinstance(value, (str, bytes)):
            return False  # a string is a collection of strings, never the one meant
        return not args or all(_conforms(v, args[0]) for v in value)
    if want is typing.Any:
        return True
    return isinstance(value, want)


def _want(want) -> str:
    if want == "method":
        return "a method"
    text = want.__name__ if isinstance(want, type) else str(want)
    return "must be " + text.replace("collections.abc.", "").replace("typing.", "")
