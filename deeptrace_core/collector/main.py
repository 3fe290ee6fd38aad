"""``deeptrace collector --config collector.yaml``: storage, receivers, stitcher, API."""

import logging
import signal
import sys
import threading
import time

from . import api, receiver, schema
from .query import ClickHouseQuery
from .stitcher import Stitcher
from .store import open_store

log = logging.getLogger("deeptrace.collector")


class Collector:
    def __init__(self, config):
        self.config = config
        st = config.storage
        self.store = open_store(st)
        for sql in schema.ddl(st.database, st.cluster, st.table_engine, st.ttl / 86400,
                              st.attribute_indexes, st.distributed, st.sharding_key):
            self.store.command(sql)
        self.sink = receiver.Sink(self.store, st.batch.max_bytes, st.batch.max_delay)
        self.stitcher = Stitcher(self.store, config.stitcher, st.database)
        self.query = ClickHouseQuery(self.store, st.database)
        self.reexporter = None
        if config.export.otlp.endpoint:
            from .export import Reexporter
            self.reexporter = Reexporter(self.store, st.database, config.export.otlp)
        self.servers = []
        self.ports = {}
        self.stop_event = threading.Event()
        self._thread = None

    def start(self):
        r = self.config.receivers.otlp
        if r.grpc:
            server, self.ports["grpc"] = receiver.start_grpc(r.grpc, self.sink, r.max_message_bytes,
                                                             r.max_concurrent_requests)
            self.servers.append(("grpc", server))
        if r.http:
            server, self.ports["http"] = receiver.start_http(r.http, self.sink, r.max_message_bytes)
            self.servers.append(("http", server))
        server, self.ports["api"] = api.start(self.config.api.address, self.query, self.stats)
        self.servers.append(("http", server))
        self._thread = threading.Thread(target=self._stitch_loop, name="stitcher", daemon=True)
        self._thread.start()
        if self.reexporter is not None:
            self._export_thread = threading.Thread(target=self._export_loop, name="export",
                                                   daemon=True)
            self._export_thread.start()
        return self

    def _export_loop(self):
        while not self.stop_event.wait(self.config.export.otlp.interval):
            try:
                self.reexporter.run_once()
            except Exception as exc:
                self.reexporter.counts["requests_failed"] += 1
                log.warning("re-export round failed: %r", exc)

    def _stitch_loop(self):
        # A round every `interval` from the start of the last (a long round is not
        # followed by a whole interval of waiting).
        pause = self.config.stitcher.interval
        while not self.stop_event.wait(pause):
            t0 = time.monotonic()
            try:
                self.stitcher.run_once()
            except Exception as exc:           # storage trouble: try again next round
                self.stitcher.counts["round_errors"] += 1
                log.warning("stitcher round failed: %r", exc)
            pause = max(0.05, self.config.stitcher.interval - (time.monotonic() - t0))

    def stats(self) -> dict:
        out = {"receiver": dict(self.sink.counts), "stitcher": self.stitcher.stats()}
        if self.reexporter is not None:
            out["export"] = dict(self.reexporter.counts)
        return out

    def stop(self):
        self.stop_event.set()
        for kind, server in self.servers:
            if kind == "grpc":
                server.stop(grace=5).wait()
            else:
                server.shutdown()
        self.sink.close()           # what the receivers accepted is written first
        if self._thread:
            self._thread.join(10)
        if self.reexporter is not None:
            self._export_thread.join(10)
            self.reexporter.close()
        try:
            self.stitcher.run_once()            # what arrived last is stitched too
        except Exception as exc:
            log.warning("last stitcher round failed: %r", exc)
        self.store.close()


def run(config_path: str) -> int:
    from deeptrace_core.config import ConfigError

    from .config import load
    try:
        config = load(config_path)
    except ConfigError as exc:
        print(f"deeptrace: config error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    done = threading.Event()      # handlers first: a SIGTERM right after start is clean
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    try:
        collector = Collector(config).start()
    except (OSError, ValueError) as exc:
        print(f"deeptrace: collector cannot start: {exc}", file=sys.stderr)
        return 1
    print(f"deeptrace collector: running (otlp grpc :{collector.ports.get('grpc')}, "
          f"http :{collector.ports.get('http')}, api :{collector.ports['api']}, "
          f"storage {config.storage.engine})", file=sys.stderr, flush=True)
    done.wait()
    collector.stop()
    print(f"deeptrace collector final: {collector.stats()}", file=sys.stderr)
    return 0
