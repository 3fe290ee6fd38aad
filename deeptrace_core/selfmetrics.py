"""The agent's own counters as metrics: lost kernel events by probe and cause (a sum), and
every component's counters as they stand (a gauge: some are sizes, not counts), for the
exporters that declare ``takes_agent_metrics`` (Prometheus, OTLP).

A probe names its loss counters in ``loss_counters``; without that, a counter whose name
says it lost or dropped something (``*_full``, ``*_failed``, ``*_truncated``, ``lost*``,
``*_misses``, ``*dropped*``) is taken as one.
"""

import re
import time

import attrs

from .metrics import GAUGE, SUM, MetricPoint

_LOSSY = re.compile(r"(_full$|_failed$|_truncated$|^lost|_lost|_misses$|dropped)")


def loss_names(probe, counters: dict) -> list:
    """Which of a probe's counters count lost events."""
    declared = getattr(probe, "loss_counters", None)
    if declared is not None:
        return [k for k in declared if k in counters]
    return [k for k in counters if _LOSSY.search(k)]


@attrs.define
class SelfMetrics:
    """The agent's own counters as metric points, cumulative from `start_ns` (the agent
    sets it when its probes start). Components get it in their context."""

    start_ns: int = attrs.Factory(time.time_ns)
    loss_names = staticmethod(loss_names)

    def points(self, stats: dict, probes: dict) -> list:
        """MetricPoints of ``Agent.stats()`` (section -> counters); `probes` by id, to
        tell their loss counters."""
        now = time.time_ns()
        out = []
        for section, counters in stats.items():
            kind, _, cid = section.partition(".")
            numeric = {k: v for k, v in counters.items()
                       if isinstance(v, (int, float)) and not isinstance(v, bool)}
            if kind == "probe" and cid in probes:
                for cause in loss_names(probes[cid], numeric):
                    out.append(MetricPoint(
                        "deeptrace.agent.events.lost", SUM, "{event}", numeric[cause],
                        {"deeptrace.probe": cid, "deeptrace.cause": cause},
                        "kernel events a probe could not hand over, by cause",
                        start_ns=self.start_ns, time_ns=now))
            for name, value in numeric.items():
                out.append(MetricPoint(
                    "deeptrace.agent.stat", GAUGE, "1", value,
                    {"deeptrace.component": section, "deeptrace.counter": name},
                    "the agent's own counters, by component", start_ns=self.start_ns,
                    time_ns=now))
        return out
