"""Finds plugins through the ``deeptrace`` entry-point group and isolates broken ones.

Environment:
  DEEPTRACE_BLOCK_PLUGINS  comma-separated plugin names not to load (adds to the config's
                           ``agent.block_plugins``).
  DEEPTRACE_TRACE_HOOKS    set to 1 to print every hook call (debugging plugins).
"""

import logging
import os
import sys
from importlib.metadata import entry_points

import attrs
import pluggy

from . import hookspecs
from .registry import Registry

log = logging.getLogger("deeptrace.plugins")
GROUP = hookspecs.PROJECT

REGISTER_HOOKS = (
    "deeptrace_register_probes",
    "deeptrace_register_protocols",
    "deeptrace_register_processors",
    "deeptrace_register_exporters",
)


@attrs.define
class PluginInfo:
    name: str
    dist: str
    version: str
    status: str  # loaded | blocked | failed
    error: str = ""


class PluginHost:
    """The pluggy manager plus a record of what loaded, what was blocked and what failed."""

    def __init__(self, blocked=()):
        env = os.environ.get("DEEPTRACE_BLOCK_PLUGINS", "")
        self.blocked = set(blocked) | {b.strip() for b in env.split(",") if b.strip()}
        self.pm = pluggy.PluginManager(GROUP)
        self.pm.add_hookspecs(hookspecs)
        self.infos: dict[str, PluginInfo] = {}
        if os.environ.get("DEEPTRACE_TRACE_HOOKS") == "1":
            self.pm.trace.root.setwriter(sys.stderr.write)
            self.pm.enable_tracing()

    def load_entry_points(self):
        seen = {}  # each name/version read parses the distribution's METADATA: once per dist
        for ep in sorted(entry_points(group=GROUP), key=lambda e: e.name):
            key = str(getattr(ep.dist, "_path", id(ep.dist)))
            if key not in seen:
                seen[key] = (ep.dist.name, ep.dist.version) if ep.dist else ("?", "?")
            dist, version = seen[key]
            if ep.name in self.blocked:
                self.infos[ep.name] = PluginInfo(ep.name, dist, version, "blocked")
                continue
            try:
                plugin = ep.load()
            except Exception as exc:  # a broken plugin must not take the agent down
                self._failed(ep.name, dist, version, f"import failed: {exc!r}")
                continue
            self.register(plugin, ep.name, dist, version)
        return self

    def register(self, plugin, name, dist="-", version="-"):
        """Register one plugin object; a plugin that fails validation is reported and skipped."""
        if name in self.blocked:
            self.infos[name] = PluginInfo(name, dist, version, "blocked")
            return False
        try:
            self.pm.register(plugin, name=name)
            _check_hooks(plugin)
        except Exception as exc:
            if self.pm.is_registered(plugin):
                self.pm.unregister(plugin)
            self._failed(name, dist, version, f"invalid: {exc}")
            return False
        self.infos[name] = PluginInfo(name, dist, version, "loaded")
        return True

    def _failed(self, name, dist, version, error):
        self.infos[name] = PluginInfo(name, dist, version, "failed", error)
        log.warning("plugin %s (%s %s) skipped: %s", name, dist, version, error)

    def registry(self) -> Registry:
        """Ask every plugin to register its components; one that raises is dropped whole."""
        reg = Registry()
        for hook in REGISTER_HOOKS:
            for impl in getattr(self.pm.hook, hook).get_hookimpls():
                reg.current_plugin = impl.plugin_name
                try:
                    impl.function(registry=reg)
                except Exception as exc:
                    self._drop(reg, impl.plugin_name, f"{hook} failed: {exc}")
        return reg

    def _drop(self, reg, name, error):
        for kind in ("probes", "protocols", "processors", "exporters"):
            table = getattr(reg, kind)
            for key in [k for k, e in table.items() if e.plugin == name]:
                del table[key]
        info = self.infos.get(name)
        dist, version = (info.dist, info.version) if info else ("-", "-")
        plugin = self.pm.get_plugin(name)
        if plugin is not None:
            self.pm.unregister(plugin)
        self._failed(name, dist, version, error)

    def bpf_defines(self, probe_name, config) -> dict:
        defines = {}
        for result in self.pm.hook.deeptrace_bpf_cflags(probe_name=probe_name, config=config):
            if result:
                defines.update(result)
        return defines


def _check_hooks(plugin):
    """Every ``deeptrace_*`` attribute must be a known hook: typos fail at load time."""
    known = {n for n in dir(hookspecs) if n.startswith("deeptrace_")}
    for attr in dir(plugin):
        if attr.startswith("deeptrace_") and callable(getattr(plugin, attr)) and attr not in known:
            raise pluggy.PluginValidationError(plugin, f"unknown hook {attr!r}")
