"""What the metric probes (cpu, memory, disk, network, host) share: their config's common
fields, the one rule for when they emit points, and the BPF side of their life cycle.

The interval rule: a metric probe's ``poll`` returns points once ``interval`` seconds
have passed since it last did, and at every ``poll(0)``. The agent's loop never polls
with 0; its shut-down does (quiesce, ``poll(0)``, detach), so every metric probe gives
its final points, however little of its interval had passed.
"""

from __future__ import annotations

import ctypes
import time

import attrs
from attrs import validators as v

from . import bpf


MAX_RING_PAGES = 1 << 18      # 1 GiB of 4 KB pages: more is a typo, not a ring


def power_of_two(inst, attribute, value):
    """A ring buffer's size in pages: a power of two, at most MAX_RING_PAGES."""
    if value <= 0 or value & (value - 1) or value > MAX_RING_PAGES:
        raise ValueError(f"{attribute.name} must be a power of two up to {MAX_RING_PAGES}, "
                         f"got {value}")


@attrs.define
class IntervalConfig:
    """The fields every metric probe's config has."""

    interval: float = attrs.field(default=10.0, validator=v.gt(0), metadata={"unit": "seconds"})


@attrs.define
class ProcessConfig(IntervalConfig):
    """... and those of a probe with per-process series in kernel maps."""

    top_n: int = attrs.field(default=20, validator=[v.ge(1), v.le(100_000)])  # processes labelled
    max_processes: int = attrs.field(default=16384,                          # map entries
                                     validator=[v.ge(64), v.le(1 << 22)])


@attrs.define
class Interval:
    """When a metric probe emits: see the module's docstring."""

    seconds: float
    next_due: float | None = None      # monotonic; None: not started (not attached)

    def start(self, at_once: bool = False):
        self.next_due = time.monotonic() + (0 if at_once else self.seconds)

    def stop(self):
        self.next_due = None

    def due(self, timeout_ms) -> bool:
        """True (and the next interval starts) when points are due at this poll."""
        if self.next_due is None:
            return False
        now = time.monotonic()
        if timeout_ms != 0 and now < self.next_due:
            return False
        self.next_due = now + self.seconds
        return True


class BpfMetricProbe:
    """Base of the BPF metric probes: C from ``source`` (a ``.bpf.c`` beside the probe)
    with the probe's ``defines()``, counters named by ``stat_names``, ring buffers whose
    records :meth:`open_ring` decodes into ``records``. A subclass's ``attach`` calls
    :meth:`load` first; its ``poll`` asks :meth:`due`."""

    source: tuple = ()
    stat_names: tuple = ()

    def __init__(self, config, context=None):
        self.config = config
        self.context = context
        self.bpf = None
        self.start_ns = 0
        self.interval = Interval(config.interval)
        self.records: list = []
        self.decode_errors = 0
        self._rings = False

    def defines(self) -> dict:
        return {}

    def render(self, defines: dict) -> str:
        return bpf.render(bpf.read_source(*self.source), {**defines, **self.defines()})

    def load(self, defines: dict):
        self.bpf = bpf.load(self.render(defines))
        self.start_ns = time.time_ns()
        self.interval.start()

    def open_ring(self, name: bytes, decode):
        """Decode ring buffer `name`'s records into ``records``; a malformed one is
        counted in ``decode_errors``, never fatal."""
        def on_record(ctx, data, size):
            try:
                self.records.append(decode(ctypes.string_at(data, size)))
            except Exception:
                self.decode_errors += 1
        self.bpf[name].open_ring_buffer(on_record)
        self._rings = True

    def take_records(self) -> list:
        """The ring buffers' records so far (without waiting)."""
        if self.bpf is not None and self._rings:
            self.bpf.ring_buffer_consume()
        out, self.records = self.records, []
        return out

    def due(self, timeout_ms) -> bool:
        return self.bpf is not None and self.interval.due(timeout_ms)

    def counters(self) -> dict:
        """The kernel's counters (``stat_names``), summed over CPUs."""
        return bpf.counters(self.bpf, self.stat_names)

    def detach(self):
        if self.bpf is None:
            return
        try:
            if self._rings:
                self.bpf.ring_buffer_consume()
        finally:
            self.bpf.cleanup()
            self.bpf = None
            self.interval.stop()
