"""The agent: builds components from a validated config, attaches probes, runs the loop."""

import logging
import os
import sys
import threading
import time

from . import bpf, bpfgroup, compilermem
from .api import Context
from .config import ConfigError
from .pipeline import Pipeline
from .redaction import Redactor
from .selfmetrics import SelfMetrics

log = logging.getLogger("deeptrace.agent")
POLL_MS = 100  # one round over all probes
DRAIN_S = 10.0  # at shut-down, the longest the probes' remaining records are drained for


def set_nice(nice: int, autogroup: int | None = None) -> tuple:
    """Give every thread of this process `nice` (Linux niceness is per thread; threads
    started later inherit it from the one that starts them), and, when the agent leads its
    own session (systemd, setsid), its autogroup `autogroup` (default: `nice`): with
    sched_autogroup the scheduler first shares the CPU between sessions, so thread
    niceness alone would not yield to another. Returns the values before, to restore."""
    before = (os.getpriority(os.PRIO_PROCESS, 0), None)
    for tid in os.listdir("/proc/self/task"):
        try:
            os.setpriority(os.PRIO_PROCESS, int(tid), nice)
        except OSError as exc:  # a thread that just ended
            log.debug("nice %d for thread %s: %s", nice, tid, exc)
    if os.getsid(0) == os.getpid():
        try:
            with open("/proc/self/autogroup") as f:   # "/autogroup-N nice K"
                before = (before[0], int(f.read().rsplit(None, 1)[-1]))
            with open("/proc/self/autogroup", "w") as f:
                f.write(str(nice if autogroup is None else autogroup))
        except (OSError, ValueError) as exc:  # no autogroup support in this kernel
            log.debug("autogroup nice %d: %s", nice, exc)
    return before


class Agent:
    def __init__(self, config, host, registry, stats_stream=None):
        self.config = config
        self.host = host
        self.registry = registry
        self.stats_stream = stats_stream or sys.stderr
        self.stop_event = threading.Event()
        self._nice_before = None   # (thread nice, autogroup nice) before start() set them
        self.self_metrics = SelfMetrics()
        used = {kind: set() for kind in ("probes", "processors", "exporters")}
        for pl in config.pipelines.values():
            used["probes"].update(pl.probes)
            used["processors"].update(pl.processors)
            used["exporters"].update(pl.exporters)
        # Components are inert until a pipeline lists them: build only those.
        self.probes = {cid: self._build("probes", cid) for cid in sorted(used["probes"])}
        self.processors = processors = {cid: self._build("processors", cid)
                                        for cid in sorted(used["processors"])}
        self.exporters = {cid: self._build("exporters", cid) for cid in sorted(used["exporters"])}
        redactor = Redactor(config.redaction)
        self.pipelines = [
            Pipeline(name, [(c, processors[c]) for c in pl.processors],
                     [(c, self.exporters[c]) for c in pl.exporters], redactor)
            for name, pl in config.pipelines.items()]
        self.routes = {cid: [p for p, pl in zip(self.pipelines, config.pipelines.values())
                             if cid in pl.probes] for cid in self.probes}
        self.attached = []
        # A second stop signal (cli.py) aborts the shut-down: it sets abort_requested, and
        # unwinds at once unless a probe is detaching (detaching names it): cutting BCC's
        # detach short would leave it half done, so then shutdown() ends after detaching.
        self.abort_requested = False
        self.detaching = None

    def _build(self, kind, cid):
        comp = getattr(self.config, kind)[cid]
        entry = getattr(self.registry, kind)[comp.type]
        context = Context.for_component(kind[:-1], cid, self.registry, self.config.agent,
                                        self.self_metrics)
        try:
            return entry.cls(comp.config, context)
        except ValueError as exc:  # cross-checks a config class cannot do alone
            raise ConfigError(self.config.path, comp.line, f"{kind}.{cid}", str(exc)) from exc

    # -- lifecycle ------------------------------------------------------------------------
    def start(self):
        t0 = time.monotonic()
        self.self_metrics.start_ns = time.time_ns()
        # libbcc is not thread-safe (compiling two programs at once corrupts its heap), so
        # compiles cannot overlap: instead one clang run takes every probe's C (each run
        # has a fixed cost); a probe whose text is not in the shared module (no BPF, or
        # the group failed) compiles alone when it attaches.
        defines = {cid: self.defines(cid) for cid in self.probes}
        if self.config.agent.compile_together:
            texts = []
            for cid, probe in self.probes.items():
                try:
                    texts.append((cid, probe.render(defines[cid])))
                except Exception:  # attach() below reports it, for this probe alone
                    pass
            bpfgroup.preload(texts)
        try:
            for cid, probe in self.probes.items():
                probe.attach(defines[cid])
                self.attached.append(cid)
        except Exception:
            self.detach()
            raise
        finally:
            bpfgroup.discard()
            compilermem.release()   # the compiler is done: ~100 MB back to the system
        self.startup_seconds = time.monotonic() - t0
        log.info("attached %s in %.2f s", ", ".join(self.attached), self.startup_seconds)
        self._nice_before = set_nice(self.config.agent.nice)
        self.host.agent_started(self)

    def defines(self, cid) -> dict:
        comp = self.config.probes[cid]
        probe = self.probes[cid]
        return {**bpf.kernel_defines(getattr(probe, "kernel_fields", None) or ()),
                **self.host.bpf_defines(comp.type, comp.config)}

    def run(self, duration=None):
        """Poll probes and feed pipelines until stop() (signal) or `duration` seconds."""
        interval = self.config.agent.stats_interval
        deadline = time.monotonic() + duration if duration else None
        next_stats = time.monotonic() + interval
        while not self.stop_event.is_set():
            self.poll_once()
            now = time.monotonic()
            if now >= next_stats:
                self.report_stats()
                for probe in self.probes.values():
                    gc = getattr(probe, "gc", None)
                    if gc:
                        gc()
                next_stats = now + interval
            if deadline and now >= deadline:
                break

    def poll_once(self, timeout_ms=None):
        """One round over the probes. A probe's poll may block up to its share of the
        round; probes that never block (metric collectors) return at once, so the round
        sleeps out the rest rather than spin."""
        budget = POLL_MS if timeout_ms is None else timeout_ms
        per_probe = max(1, budget // max(1, len(self.probes)))
        t0 = time.monotonic()
        busy = False
        for cid, probe in self.probes.items():
            batch = probe.poll(per_probe)
            if batch:
                busy = True
                for pl in self.routes[cid]:
                    pl.consume(batch)
        for pl in self.pipelines:
            pl.consume([], tick=True)
        idle = budget / 1000 - (time.monotonic() - t0)
        if not busy and idle > 0.005 and timeout_ms is None:
            self.stop_event.wait(idle)

    def stop(self):
        self.stop_event.set()

    def drain(self, cid, deadline):
        """What probe `cid` still holds, through its pipelines: poll(0), and again while a
        probe that hands over bounded batches (`batch_limit`) returns a full one, until the
        deadline. (poll(0) of a metrics probe collects every time: it is polled once.)"""
        probe = self.probes[cid]
        limit = getattr(probe, "batch_limit", 0)
        while True:
            batch = probe.poll(0)
            for pl in self.routes[cid]:
                pl.consume(batch)
            if not limit or len(batch) < limit:
                return
            if time.monotonic() > deadline:
                log.warning("draining %s: stopped after %.0f s with records left", cid, DRAIN_S)
                return

    def detach(self, deadline=None, drained=()):
        """Detach every attached probe; what they still held goes through the pipelines
        (until `deadline`, by default DRAIN_S from now), except for the probes in `drained`
        (a metric probe's poll(0) collects final points: a second drain would repeat them)."""
        if deadline is None:
            deadline = time.monotonic() + DRAIN_S
        for cid in list(self.attached):
            probe = self.probes[cid]
            try:
                if cid not in drained and not self.abort_requested:
                    self.drain(cid, deadline)
            except Exception as exc:
                log.error("draining %s failed: %r", cid, exc)
            finally:
                self.detaching = cid
                try:
                    probe.detach()
                except Exception as exc:
                    log.error("detaching %s failed: %r", cid, exc)
                self.attached.remove(cid)
                self.detaching = None

    def shutdown(self):
        if self._nice_before:  # finish promptly even on a saturated host
            set_nice(*self._nice_before)
        # Stop the probes producing, drain them, then read their counters: the final
        # account then covers every record the kernel handed over (drained = submitted).
        deadline = time.monotonic() + DRAIN_S
        for cid in list(self.attached):
            try:
                quiesce = getattr(self.probes[cid], "quiesce", None)
                if callable(quiesce):
                    quiesce()
                self.drain(cid, deadline)
            except Exception as exc:
                log.error("draining %s failed: %r", cid, exc)
        final_stats = {cid: p.stats() for cid, p in self.probes.items() if cid in self.attached}
        # One drain budget for the whole shut-down. A metric probe (no batch_limit) is not
        # drained again: its poll(0) collects, so its final points would go out twice; a
        # record probe is, for what a program mid-run submitted as it quiesced.
        self.detach(deadline, drained={cid for cid in self.attached
                                       if not getattr(self.probes[cid], "batch_limit", 0)})
        if self.abort_requested:  # a second signal came while a probe detached
            return
        for pl in self.pipelines:
            pl.drain()
        self.report_stats(final_stats, final=True)
        # shutdown() delivers what an exporter still holds, within its own deadline; the
        # optional flush() would wait without one on an unreachable collector: not called.
        for cid, exp in self.exporters.items():
            try:
                exp.shutdown()
            except Exception as exc:
                log.error("exporter %s shutdown failed: %r", cid, exc)
        try:
            self.host.agent_stopped(self)
        except Exception as exc:
            log.error("agent_stop hook failed: %r", exc)

    # -- counters -------------------------------------------------------------------------
    def stats(self) -> dict:
        out = {f"probe.{cid}": p.stats() for cid, p in self.probes.items()}
        for kind, comps in (("processor", self.processors), ("exporter", self.exporters)):
            out.update({f"{kind}.{cid}": c.stats() for cid, c in comps.items()
                        if callable(getattr(c, "stats", None))})
        out.update({f"pipeline.{p.name}": p.stats() for p in self.pipelines})
        return out

    def report_stats(self, probe_stats=None, final=False):
        stats = self.stats()
        if probe_stats is not None:
            stats.update({f"probe.{cid}": s for cid, s in probe_stats.items()})
        label = "final" if final else "stats"
        for section, counters in stats.items():
            if counters:
                text = " ".join(f"{k}={v}" for k, v in counters.items())
                print(f"deeptrace {label}: {section}: {text}", file=self.stats_stream, flush=True)
        self.export_own_metrics(stats)

    def export_own_metrics(self, stats):
        """The same counters as metrics, to the exporters that want them."""
        takers = [(cid, e) for cid, e in self.exporters.items()
                  if getattr(e, "takes_agent_metrics", False)]
        if not takers:
            return
        points = self.self_metrics.points(stats, self.probes)
        for cid, exp in takers:
            try:
                exp.export(points)
            except Exception as exc:  # reported, never fatal
                log.error("exporter %s failed on the agent's metrics: %r", cid, exc)
