"""A pipeline: a batch of records through processors, redaction, then every exporter.

Plain method calls only; a component that raises is counted and isolated, never fatal.
"""

import logging

from .redaction import DEFAULT as DEFAULT_REDACTOR

log = logging.getLogger("deeptrace.pipeline")

EXPORT_SLICE = 1024   # records handed to an exporter per call (see Pipeline._run)


class Pipeline:
    def __init__(self, name, processors, exporters, redactor=None):
        self.name = name
        # No exporter sees a record before redaction (deeptrace_core/redaction.py).
        self.redactor = redactor if redactor is not None else DEFAULT_REDACTOR
        self.processors = processors  # [(id, processor)]
        self.exporters = exporters    # [(id, exporter)]
        self.errors = {cid: 0 for cid, _ in processors + exporters}
        self.errors["redaction"] = 0
        self.records_in = 0
        self.records_out = 0

    def consume(self, batch, tick=False):
        """Run a batch through. `tick`: an empty round, so processors that hold records
        (the trace linker, the spans stage's timeouts) can release them on time."""
        if not batch and not tick:
            return
        self.records_in += len(batch)
        self._run(batch, self.processors, tick)

    def drain(self):
        """At shutdown: what processors still hold (flush()) goes on down the pipeline."""
        for i, (cid, proc) in enumerate(self.processors):
            flush = getattr(proc, "flush", None)
            if not callable(flush):
                continue
            try:
                batch = flush() or []
            except Exception as exc:
                self._failed(cid, exc)
                continue
            self._run(batch, self.processors[i + 1:], tick=False)

    def _run(self, batch, processors, tick):
        for cid, proc in processors:
            try:
                batch = proc.process(batch)
            except Exception as exc:
                self._failed(cid, exc)
                return  # the batch cannot be trusted past a failed processor
            if not batch and not tick:
                return
        if not batch:
            return
        try:
            batch = self.redactor.batch(batch)
        except Exception as exc:
            self._failed("redaction", exc)
            return  # never export what could not be redacted
        self.records_out += len(batch)
        # In slices: an exporter's transient copies (JSON lines joined, an OTLP request,
        # rows) stay bounded when a processor releases a backlog at once (the linker
        # after a burst: 16,000 spans, 35 MB of JSON lines in one join; bench.hostile).
        for i in range(0, len(batch), EXPORT_SLICE):
            part = batch[i:i + EXPORT_SLICE] if len(batch) > EXPORT_SLICE else batch
            for cid, exp in self.exporters:
                try:
                    exp.export(part)
                except Exception as exc:
                    self._failed(cid, exc)

    def _failed(self, cid, exc):
        self.errors[cid] += 1
        n = self.errors[cid]
        if n & (n - 1) == 0:  # log the 1st, 2nd, 4th, 8th ... failure, not every one
            log.error("pipeline %s: %s failed (%d so far): %r", self.name, cid, n, exc)

    def stats(self) -> dict:
        return {"records_in": self.records_in, "records_out": self.records_out,
                **{f"{cid}_errors": n for cid, n in self.errors.items()}}
