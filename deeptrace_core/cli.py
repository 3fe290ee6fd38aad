"""deeptrace: zero-code observability agent on eBPF.

  deeptrace --config FILE             run until Ctrl-C/SIGTERM (also: deeptrace run ...)
  deeptrace validate --config FILE    check a config without running anything
  deeptrace plugins                   list plugins with their distribution and version
  deeptrace doctor                    check root, BTF, tracefs, BCC, headers, tracepoints,
                                      and the kernel's BPF features
  deeptrace plugin new protocol NAME  write a new protocol plugin distribution (tests pass)
  deeptrace probe render NAME         print the final BPF C of a probe
  deeptrace traces [show ID]          recent traces from the local store, or one as a tree
  deeptrace ui [--db PATH] [--port P] the web UI on the local store (127.0.0.1)
  deeptrace collector --config FILE   receive agents' spans over OTLP, store them in
                                      ClickHouse and stitch traces across hosts
"""

import argparse
import logging
import os
import signal
import sys
import time

from . import __version__, doctor, scaffold, traces_cli
from .ui import server as ui_server
from .api import Context
from .bpf import BPFUnavailable, check_privileges
from .config import ConfigError, load_config
from .plugins import PluginHost

log = logging.getLogger("deeptrace")


def _parser():
    p = argparse.ArgumentParser(prog="deeptrace", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"deeptrace {__version__}")
    p.add_argument("-c", "--config", help="agent config (YAML); runs the agent")
    p.add_argument("--duration", type=float, help="stop after this many seconds")
    sub = p.add_subparsers(dest="command")
    r = sub.add_parser("run", help="run the agent")
    r.add_argument("-c", "--config", required=True)
    r.add_argument("--duration", type=float, help="stop after this many seconds")
    v = sub.add_parser("validate", help="check a config file")
    v.add_argument("-c", "--config", required=True)
    sub.add_parser("plugins", help="list plugins")
    traces_cli.add_parser(sub)
    ui_server.add_parser(sub)
    scaffold.add_parser(sub)
    sub.add_parser("doctor", help="check this machine")
    co = sub.add_parser("collector", help="run the cross-host collector")
    co.add_argument("-c", "--config", required=True, help="collector config (YAML)")
    pr = sub.add_parser("probe", help="probe tools")
    prs = pr.add_subparsers(dest="probe_command", required=True)
    rr = prs.add_parser("render", help="print a probe's final BPF C")
    rr.add_argument("name")
    rr.add_argument("-c", "--config", help="take the probe's settings from this config")
    return p


def _load(path):
    """Config and plugins, with blocking from the config honoured before plugins load."""
    host = PluginHost().load_entry_points()
    registry = host.registry()
    config = load_config(path, registry.schemas())
    if config.agent.block_plugins:
        host = PluginHost(blocked=config.agent.block_plugins).load_entry_points()
        registry = host.registry()
        config = load_config(path, registry.schemas())
    return host, registry, config


def cmd_run(args) -> int:
    try:
        check_privileges()
    except BPFUnavailable as exc:
        print(f"deeptrace: {exc}", file=sys.stderr)
        return 1
    host, registry, config = _load(args.config)
    logging.getLogger().setLevel(config.agent.log_level.upper())
    from .agent import Agent
    agent = Agent(config, host, registry)

    # The first Ctrl-C/SIGTERM stops the agent, which then drains and delivers what it
    # holds (up to the exporters' deadlines). A second one, while it does, aborts that: the
    # probes are detached at once and the process exits, nothing more delivered.
    aborting = []

    def on_signal(signum, frame):
        if not agent.stop_event.is_set():
            agent.stop()
            return
        for sig in (signal.SIGTERM, signal.SIGINT):  # a third must not cut the detach short
            signal.signal(sig, signal.SIG_IGN)
        aborting.append(signum)
        agent.abort_requested = True
        if agent.detaching is None:  # else shutdown() stops once that probe is detached
            raise _Abort(signum)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        try:
            agent.start()
            print(f"deeptrace: running ({', '.join(agent.attached)} attached); "
                  "Ctrl-C or SIGTERM stops", file=sys.stderr, flush=True)
            agent.run(duration=args.duration)
        finally:
            if not aborting:
                agent.shutdown()  # detaches every probe, also on errors
    except _Abort:
        pass
    if aborting:
        agent.detach(deadline=time.monotonic(), drained=set(agent.attached))  # no draining
        print(f"deeptrace: second {signal.Signals(aborting[0]).name}: probes detached; "
              "exiting without delivering what is left", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(128 + aborting[0])  # exporters' threads are not waited for
    return 0


class _Abort(BaseException):
    """Raised by the second stop signal: unwinds the shut-down (no `except Exception`
    in it catches this), so only the detaching remains."""

    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum


def cmd_validate(args) -> int:
    _, _, config = _load(args.config)
    print(f"{args.config}: ok ({len(config.pipelines)} pipeline(s): "
          f"{', '.join(config.pipelines)})")
    return 0


def cmd_plugins(args) -> int:
    host = PluginHost().load_entry_points()
    registry = host.registry()
    provided = {}
    for kind, name, entry in registry.entries():
        provided.setdefault(entry.plugin, []).append(f"{kind[:-1]}:{name}")
    print(f"{'plugin':<16} {'distribution':<28} {'version':<10} {'status':<8} provides")
    for info in sorted(host.infos.values(), key=lambda i: i.name):
        what = ", ".join(provided.get(info.name, [])) or info.error
        print(f"{info.name:<16} {info.dist:<28} {info.version:<10} {info.status:<8} {what}")
    return 0


def cmd_doctor(args) -> int:
    host = PluginHost().load_entry_points()
    return doctor.run(host.registry())


def cmd_probe_render(args) -> int:
    if args.config:
        host, registry, config = _load(args.config)
        comps = [c for c in config.probes.values() if c.type == args.name]
        cid, cfg = (comps[0].name, comps[0].config) if comps else (args.name, None)
        settings = config.agent
    else:
        host = PluginHost().load_entry_points()
        registry, cid, cfg, settings = host.registry(), args.name, None, None
    entry = registry.probes.get(args.name)
    if entry is None:
        print(f"deeptrace: no probe named {args.name!r} (known: "
              f"{', '.join(sorted(registry.probes)) or 'none'})", file=sys.stderr)
        return 2
    from . import bpf
    cfg = cfg if cfg is not None else entry.cls.config_class()
    # The probe looks up protocol plugins (the trace probe's detectors) in the registry.
    probe = entry.cls(cfg, Context.for_component("probe", cid, registry, settings))
    fields = getattr(entry.cls, "kernel_fields", None) or ()
    defines = {**bpf.kernel_defines(fields), **host.bpf_defines(args.name, cfg)}
    print(probe.render(defines))
    return 0


def cmd_collector(args) -> int:
    from .collector.main import run   # chdb and pyarrow load only for the collector
    return run(args.config)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="deeptrace: %(levelname)s %(name)s: %(message)s")
    args = _parser().parse_args(argv)
    handlers = {"run": cmd_run, "validate": cmd_validate, "plugins": cmd_plugins,
                "doctor": cmd_doctor, "probe": cmd_probe_render, "traces": traces_cli.run,
                "plugin": scaffold.run, "collector": cmd_collector, "ui": ui_server.run}
    command = args.command or ("run" if args.config else None)
    if command is None:
        _parser().print_help()
        return 2
    try:
        return handlers[command](args)
    except ConfigError as exc:
        print(f"deeptrace: config error: {exc}", file=sys.stderr)
        return 2
    except BPFUnavailable as exc:
        print(f"deeptrace: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
