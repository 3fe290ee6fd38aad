"""The agent's own counters as metrics: lost kernel events by probe and cause (a sum), and
every component's counters as they stand (a gauge: some are sizes, not counts), for the
exporters that declare ``takes_agent_metrics`` (Prometheus, OTLP).

A probe names its loss counters in ``loss_counters``; without that, a counter whose name
says it lost or dropped something (``*_full``, ``*_failed``, ``*_truncated``, ``lost*``,
``*_misses``, ``*dropped*``) is taken as one.
"""

import re
import time

from .metrics import GAUGE, SUM, MetricPoint

_LOSSY = re.compile(r"(_full$|_failed$|_truncated$|^lost|_lost|_misses$|dropped)")


def loss_names(probe, counters: dict) -> list:
    declared = getattr(probe, "loss_counters", None)
    if declared is not None:
        return [k for k in declared if k in counters]
    return [k for k in counters if _LOSSY.search(k)]


def points(stats: dict, probes: dict, start_ns: int) -> list:
    """MetricPoints of ``Agent.stats()`` (section -> counters)."""
    now = time.time_ns()
    out = []
    for section, counters in stats.items():
        kind, _, cid = section.partition(".")
        numeric = {k: v for k, v in counters.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if kind == "probe" and cid in probes:
            lost = loss_names(probes[cid], numeric)
            for cause in lost:
                out.append(MetricPoint(
                    "deeptrace.agent.events.lost", SUM, "{event}", numeric[cause],
                    {"deeptrace.probe": cid, "deeptrace.cause": cause},
                    "kernel events a probe could not hand over, by cause",
                    start_ns=start_ns, time_ns=now))
        for name, value in numeric.items():
            out.append(MetricPoint(
                "deeptrace.agent.stat", GAUGE, "1", value,
                {"deeptrace.component": section, "deeptrace.counter": name},
                "the agent's own counters, by component", start_ns=start_ns, time_ns=now))
    return out
