"""The plugin contract: what a probe, a processor, an exporter and an L7 protocol class
must have, what each may have, and the :class:`Context` a component is built with.

Every kind has two protocols: the required members (``Probe``, ``Processor``,
``Exporter``, ``L7Protocol``; runtime-checkable, so ``isinstance(obj, Probe)`` works) and
the optional ones the core looks for (``ProbeOptions``, ``ProcessorOptions``,
``ExporterOptions``). The registry checks each component class against both when a plugin
adds it (:mod:`deeptrace_core.registry`): a required member missing or of the wrong kind,
or an optional one of the wrong kind, is a registration error and the plugin is skipped.
An optional member set to ``None`` counts as absent.

Probes, processors and exporters are built by the agent as ``cls(config, context)``:
``config`` is an instance of ``config_class`` (the component's YAML section, validated),
``context`` a :class:`Context`. Their ``__init__`` may raise ``ValueError`` for a check
its config class cannot make alone; the agent reports it as a config error at the
component's section. Components are inert until a pipeline lists them: only those are
built. Everything they do after that is plain method calls: events never pass through
pluggy.

The L7 kit a protocol's parser builds on (``Stream``, ``Parser``, ``Message``,
``REQUEST``, ``RESPONSE``) is :mod:`deeptrace_core.l7`.
"""

from __future__ import annotations

import logging
import typing
from collections.abc import Collection
from typing import Any, Protocol, runtime_checkable

import attrs

from .config import AgentSettings
from .selfmetrics import SelfMetrics

if typing.TYPE_CHECKING:
    from .registry import Registry


@attrs.frozen
class Context:
    """What the core hands a component it builds (``cls(config, context)``).

    Attributes:
      ``kind``            ``"probe"``, ``"processor"`` or ``"exporter"``.
      ``id``              the component's id in the config (``trace``, ``filter/nodrop``).
      ``registry``        the :class:`deeptrace_core.registry.Registry` of every component
                          class the plugins registered (the trace probe and the spans stage
                          look up L7 protocol classes in ``registry.protocols``).
      ``logger``          a :class:`logging.Logger` named ``deeptrace.<kind>.<id>``.
      ``agent_settings``  the config's ``agent`` section
                          (:class:`deeptrace_core.config.AgentSettings`).
      ``self_metrics``    the agent's own counters as metric points
                          (:class:`deeptrace_core.selfmetrics.SelfMetrics`): their start
                          time, which probe counters are losses, and the points an exporter
                          declaring ``takes_agent_metrics`` receives.
    """

    kind: str
    id: str
    registry: Registry
    logger: logging.Logger
    agent_settings: AgentSettings
    self_metrics: SelfMetrics

    @classmethod
    def for_component(cls, kind: str, cid: str, registry: Registry,
                      agent_settings: AgentSettings | None = None,
                      self_metrics: SelfMetrics | None = None) -> Context:
        """The context of component `cid` of `kind`. Outside a running agent
        (``deeptrace probe render``, tests) the ``agent`` section's defaults stand in, and
        counters start now."""
        return cls(kind, cid, registry, logging.getLogger(f"deeptrace.{kind}.{cid}"),
                   AgentSettings() if agent_settings is None else agent_settings,
                   SelfMetrics() if self_metrics is None else self_metrics)


# -- probes -------------------------------------------------------------------------------

@runtime_checkable
class Probe(Protocol):
    """A source of records: kernel events through BPF, or metrics it collects.

    Data members (class attributes):
      ``name``          its type name in the config (``probes: {<name>: ...}`` or
                        ``<name>/<id>``); a non-empty string without ``/``.
      ``config_class``  an attrs class: the schema of its config section.

    Optional members: :class:`ProbeOptions`.
    """

    name: str
    config_class: type

    def render(self, defines: dict) -> str:
        """Its final BPF C, with ``defines`` (macro name -> value: the BTF offsets of its
        ``kernel_fields`` and every ``deeptrace_bpf_cflags`` result) written in; ``""``
        for a probe without BPF. The agent compiles every probe's text in one clang run
        before ``attach``, and ``deeptrace probe render`` prints it."""

    def attach(self, defines: dict) -> None:
        """Load its program (the text ``render(defines)`` returns) and attach it, or start
        collecting. Raising fails the start-up: the agent detaches the probes already
        attached and stops."""

    def poll(self, timeout_ms: int) -> list:
        """The records produced since the last call, waiting at most ``timeout_ms`` for
        the first (0: do not wait). Called in a loop, one round over all probes about
        every 100 ms; a probe that collects metrics returns at once when it has nothing.
        The records go to every pipeline that lists the probe."""

    def stats(self) -> dict:
        """Its counters (name -> number): events, and losses by cause. Printed every
        ``agent.stats_interval`` and exported as the agent's own metrics; read once more
        at shut-down after the final drain, so they account for every record."""

    def detach(self) -> None:
        """Stop and release everything it holds (programs, maps, threads). Called once,
        at shut-down or when another probe fails to attach."""


class ProbeOptions(Protocol):
    """Members a probe may have; the agent does without each when it is absent.

    Data members (class attributes):
      ``kernel_fields``  ``"struct.member"`` names whose BTF offsets its C reads; the
                         agent passes them to ``render``/``attach`` as
                         ``OFF_<struct>__<member>`` macros. Absent: none.
      ``batch_limit``    the most records one ``poll`` returns, for a probe that hands
                         over bounded batches: at shut-down the agent polls it again while
                         a poll returns this many. Absent or 0: one ``poll(0)`` drains it.
      ``loss_counters``  which ``stats()`` counters count lost events; each becomes
                         ``deeptrace.agent.events.lost{probe, cause}``. Absent: the
                         counters named ``*_full``, ``*_failed``, ``*_truncated``,
                         ``lost*``, ``*_lost``, ``*_misses`` or ``*dropped*``.
    """

    kernel_fields: Collection[str]
    batch_limit: int
    loss_counters: Collection[str]

    def gc(self) -> None:
        """Called every ``agent.stats_interval``, after the stats report: prune state of
        processes and connections that are gone."""

    def quiesce(self) -> None:
        """Called at shut-down before the final drain: stop producing records. The agent
        then polls what is left and only then reads ``stats()``, so the final account is
        exact (records drained = records submitted)."""


# -- processors ---------------------------------------------------------------------------

@runtime_checkable
class Processor(Protocol):
    """A step of a pipeline between its probes and its exporters (filter, spans, traces).

    Data members (class attributes):
      ``name``          its type name in the config; a non-empty string without ``/``.
      ``config_class``  an attrs class: the schema of its config section.

    Optional members: :class:`ProcessorOptions`.
    """

    name: str
    config_class: type

    def process(self, batch: list) -> list:
        """The records to pass on, from a batch that came down the pipeline (it may hold
        records back and return them later). Also called with an empty batch on every
        poll round, about every 100 ms, so held records are released on time. Raising is
        counted (the pipeline's ``<id>_errors``) and the batch goes no further."""


class ProcessorOptions(Protocol):
    """Members a processor may have."""

    def flush(self) -> list | None:
        """At shut-down, after the probes' last records: what it still holds. The records
        go on through the rest of the pipeline."""

    def stats(self) -> dict:
        """Its counters, printed every ``agent.stats_interval`` and exported as the
        agent's own metrics."""


# -- exporters ----------------------------------------------------------------------------

@runtime_checkable
class Exporter(Protocol):
    """Where a pipeline's records leave the agent (console, jsonl, store, prometheus, otlp).

    Data members (class attributes):
      ``name``          its type name in the config; a non-empty string without ``/``.
      ``config_class``  an attrs class: the schema of its config section.

    Optional members: :class:`ExporterOptions`.
    """

    name: str
    config_class: type

    def export(self, batch: list) -> None:
        """Take a batch of records (syscall records, spans, metric points) that came out of
        a pipeline's processors. On the hot path: queue slow work for a thread of its own.
        Raising is counted (the pipeline's ``<id>_errors``) and isolated: the other
        exporters still get the batch."""

    def shutdown(self) -> None:
        """At shut-down, after the last batch and the final counters: deliver or write
        what it still holds, then release its threads, sockets and files. Called once."""


class ExporterOptions(Protocol):
    """Members an exporter may have.

    Data members (class attributes):
      ``takes_agent_metrics``  true: ``export`` also receives the agent's own counters as
                               metric points (``deeptrace.agent.events.lost`` and
                               ``deeptrace.agent.stat``) every ``agent.stats_interval`` and
                               at shut-down. Absent: false.
    """

    takes_agent_metrics: bool

    def stats(self) -> dict:
        """Its counters, printed every ``agent.stats_interval`` and exported as the
        agent's own metrics."""

    def flush(self) -> Any:
        """Deliver what it buffers now and wait for that (OpenTelemetry's
        ``force_flush``), for code that needs the data out before going on (tests, a tool
        embedding the exporter). The agent does not call it: ``shutdown()`` delivers what
        is left, within the exporter's own deadline."""


# -- L7 protocols -------------------------------------------------------------------------

@runtime_checkable
class L7Protocol(Protocol):
    """An application protocol the trace probe detects in the kernel and the spans stage
    parses into messages and spans (``registry.add_protocol(cls)``). Built by the spans
    stage as ``cls(config)``: ``config`` is ``config_class`` filled from the YAML's
    ``processors.spans.protocol_config.<name>`` (defaults when absent).
    :class:`deeptrace_core.l7.ProtocolBase` provides everything but ``name``,
    ``detect_c``, ``detect`` and a ``parser_class`` (built with the config's fields).

    Data members (class attributes):
      ``name``          the name the trace probe's and the spans stage's ``protocols``
                        lists use; a non-empty string without ``/``.
      ``config_class``  an attrs class (may be empty).
      ``detect_c``      ``(package, file)``: the kernel detector, package data read with
                        :mod:`importlib.resources`. The file defines
                        ``static __always_inline int detect_<name>(const u8 *p, u32 n,
                        u16 lport, u16 rport, u8 l4)``: ``p`` points at the payload (32
                        readable bytes, ``n`` of them valid), ports in host order, ``l4``
                        1 for TCP and 2 for UDP; it reads ``p`` only at constant offsets
                        below 32 after checking ``n`` (the verifier must prove every
                        access) and answers like ``detect``.

    It has no optional members. Its parser's kit is :mod:`deeptrace_core.l7`.
    """

    name: str
    config_class: type
    detect_c: tuple[str, str]

    def detect(self, data: bytes, lport: int, rport: int, l4: str) -> int:
        """The Python mirror of the kernel detector, on the first bytes of one call's
        data (``l4`` is ``"tcp"`` or ``"udp"``): 0 (not this protocol), ``REQUEST`` (1:
        the sender is the client) or ``RESPONSE`` (2: the sender is the server). A static
        method: the stage calls it on a connection the kernel did not classify."""

    def parser(self) -> Any:
        """A fresh :class:`deeptrace_core.l7.Parser` for one connection. The stage calls
        on it only ``set_l4``, ``feed``, ``reset`` (after the parser raised) and
        ``span_error`` (the protocol's own rule for an error span), and reads ``errors``."""


# -- the contracts by registry table ------------------------------------------------------

@attrs.frozen
class Contract:
    kind: str                 # the singular, as messages and contexts name it
    required: type            # the protocol of required members
    options: type | None      # the protocol of optional members


CONTRACTS = {
    "probes": Contract("probe", Probe, ProbeOptions),
    "protocols": Contract("protocol", L7Protocol, None),
    "processors": Contract("processor", Processor, ProcessorOptions),
    "exporters": Contract("exporter", Exporter, ExporterOptions),
}


def members(proto) -> dict:
    """The members a protocol class declares, in order: name -> type hint for data
    members, ``"method"`` for methods."""
    hints = typing.get_type_hints(proto)
    out = {n: hints[n] for n in proto.__dict__.get("__annotations__", {})}
    out.update({n: "method" for n, v in vars(proto).items()
                if not n.startswith("_") and callable(v)})
    return out


def optional_members() -> dict:
    """Every optional member, by registry table: what the core may look for."""
    return {table: set(members(c.options)) if c.options else set()
            for table, c in CONTRACTS.items()}
