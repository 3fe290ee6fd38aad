"""Finds plugins through the ``deeptrace`` entry-point group and isolates broken ones.
The only module that talks to pluggy: the rest of the core calls hooks through
:class:`PluginHost`.

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
    """The pluggy manager, one method per hook the core calls, and a record of what
    loaded, what was blocked and what failed."""

    def __init__(self, blocked=()):
        env = os.environ.get("DEEPTRACE_BLOCK_PLUGINS", "")
        self.blocked = set(blocked) | {b.strip() for b in env.split(",") if b.strip()}
        self._pm = pluggy.PluginManager(GROUP)
        self._pm.add_hookspecs(hookspecs)
        self.infos: dict[str, PluginInfo] = {}
        if os.environ.get("DEEPTRACE_TRACE_HOOKS") == "1":
            self._pm.trace.root.setwriter(sys.stderr.write)
            self._pm.enable_tracing()

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
            self._pm.register(plugin, name=name)
            _check_hooks(plugin)
        except Exception as exc:
            if self._pm.is_registered(plugin):
                self._pm.unregister(plugin)
            self._failed(name, dist, version, f"invalid: {exc}")
            return False
        self.infos[name] = PluginInfo(name, dist, version, "loaded")
        return True

    def _failed(self, name, dist, version, error):
        self.infos[name] = PluginInfo(name, dist, version, "failed", error)
        log.warning("plugin %s (%s %s) skipped: %s", name, dist, version, error)

    def registry(self) -> Registry:
        """Ask every plugin to register its components; one that raises is dropped whole.
        Each plugin's hook is called alone (a subset caller), through pluggy, so
        DEEPTRACE_TRACE_HOOKS shows it and one failure does not stop the others."""
        reg = Registry()
        for hook in REGISTER_HOOKS:
            impls = getattr(self._pm.hook, hook).get_hookimpls()
            for impl in impls:
                alone = self._pm.subset_hook_caller(
                    hook, [i.plugin for i in impls if i is not impl])
                reg.current_plugin = impl.plugin_name
                try:
                    alone(registry=reg)
                except Exception as exc:
                    self._drop(reg, impl.plugin_name, f"{hook} failed: {exc}")
        return reg

    def _drop(self, reg, name, error):
        reg.drop_plugin(name)
        info = self.infos.get(name)
        dist, version = (info.dist, info.version) if info else ("-", "-")
        plugin = self._pm.get_plugin(name)
        if plugin is not None:
            self._pm.unregister(plugin)
        self._failed(name, dist, version, error)

    def bpf_defines(self, probe_name, config) -> dict:
        """Every plugin's ``deeptrace_bpf_cflags`` for one probe, merged."""
        defines = {}
        for result in self._pm.hook.deeptrace_bpf_cflags(probe_name=probe_name, config=config):
            if result:
                defines.update(result)
        return defines

    def agent_started(self, agent):
        """``deeptrace_agent_start``: historic, so a plugin registered later gets it too."""
        self._pm.hook.deeptrace_agent_start.call_historic(kwargs={"agent": agent})

    def agent_stopped(self, agent):
        """``deeptrace_agent_stop``."""
        self._pm.hook.deeptrace_agent_stop(agent=agent)


def _check_hooks(plugin):
    """Every ``deeptrace_*`` attribute must be a known hook: typos fail at load time."""
    known = {n for n in dir(hookspecs) if n.startswith("deeptrace_")}
    for attr in dir(plugin):
        if attr.startswith("deeptrace_") and callable(getattr(plugin, attr)) and attr not in known:
            raise pluggy.PluginValidationError(plugin, f"unknown hook {attr!r}")
