"""The collector's ingest path on real chdb: group commit (bounded by bytes and by a
maximum delay), acknowledgement only after the write (a failing insert refuses every
request of its group, and exactly the acknowledged spans are stored), the writer
draining on close; the stitcher's in-memory NAT hold across rounds; the DDL for a
ClickHouse cluster (checked by ClickHouse's own parser: no server here to run it), and
its Distributed variant, also run on chdb with a one-shard cluster of its own."""

import os
import random
import subprocess
import sys
import threading
import time

import pytest

from deeptrace_core.collector import schema
from deeptrace_core.collector.config import Stitcher as StitcherConfig
from deeptrace_core.collector.config import parse
from deeptrace_core.collector.receiver import Sink
from deeptrace_core.collector.stitcher import Stitcher
from deeptrace_core.collector.store import ChdbStore
from deeptrace_core.config import ConfigError
from test_collector_stitch import T0, World

REPLICATED = "ReplicatedMergeTree('/clickhouse/tables/{shard}/{database}/{table}', '{replica}')"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    # One embedded ClickHouse per process: the tests share it and count by trace ids.
    s = ChdbStore(str(tmp_path_factory.mktemp("ingest") / "db"), "otel")
    for sql in schema.ddl("otel"):
        s.command(sql)
    yield s
    s.close()


def requests(n_chains, seed, size=20):
    """Serialized agents' requests (three hosts) and their span counts."""
    world = World(n_chains, random.Random(seed), t0=T0 + seed * 10**12)
    reqs = [r.SerializeToString() for r in world.batches(random.Random(seed), size=size)]
    counts = [sum(len(ss.spans) for rs in r.resource_spans for ss in rs.scope_spans)
              for r in world.batches(random.Random(seed), size=size)]
    return reqs, counts, world


def stored(store, world):
    traces = ",".join(f"'{t}'" for t in {s.trace_id for v in world.spans.values() for s in v})
    return store.rows(
        f"SELECT count() AS n FROM otel.otel_traces WHERE TraceId IN ({traces})")[0]["n"]


class Recording:
    """The real store, recording each insert's group and when it started; the first
    insert can be held (so requests pile up behind it) or made to fail."""

    def __init__(self, store, hold=False, fail_first=False):
        self.store, self.groups, self.started = store, [], []
        self.release = threading.Event()
        if not hold:
            self.release.set()
        self.fail_first = fail_first

    def insert_otlp(self, payloads):
        self.started.append(time.monotonic())
        self.groups.append([len(p) for p in payloads])
        if len(self.groups) == 1:
            self.release.wait(30)
            if self.fail_first:
                raise OSError("disk full")
        self.store.insert_otlp(payloads)


def concurrently(sink, reqs):
    """Each request from its own thread (as gRPC workers do): per request, spans
    acknowledged or the error."""
    out = [None] * len(reqs)

    def one(i):
        try:
            out[i] = sink.write(reqs[i])
        except Exception as exc:
            out[i] = exc
    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(reqs))]
    for t in threads:
        t.start()
        time.sleep(0.005)          # in order, so the groups are predictable
    return threads, out


def test_groups_are_bounded_by_bytes_and_written_whole(store):
    reqs, counts, world = requests(60, 1)
    limit = sum(len(r) for r in reqs[1:5])            # about four requests a group
    rec = Recording(store, hold=True)
    sink = Sink(rec, max_batch_bytes=limit, max_delay=0)
    threads, out = concurrently(sink, reqs)
    time.sleep(0.5)
    assert len(rec.groups) == 1                      # the rest wait behind the first
    rec.release.set()
    for t in threads:
        t.join(60)
    assert out == counts                             # every request acknowledged
    sizes = [len(r) for r in reqs]
    assert sum(len(g) for g in rec.groups) == len(reqs)
    # In arrival order, each group as large as the bound allows and never above it.
    flat = [s for g in rec.groups for s in g]
    assert flat == sizes
    for i, g in enumerate(rec.groups[1:], 1):
        assert sum(g) <= limit or len(g) == 1
        if i + 1 < len(rec.groups):
            assert sum(g) + rec.groups[i + 1][0] > limit
    assert max(len(g) for g in rec.groups[1:]) >= 3
    assert stored(store, world) == sum(counts) == sink.counts["spans"]
    assert sink.counts["inserts"] == len(rec.groups)
    sink.close()


def test_a_group_waits_at_most_max_delay_unless_full(store):
    reqs, counts, world = requests(6, 2, size=10)
    rec = Recording(store)
    sink = Sink(rec, max_batch_bytes=1 << 30, max_delay=0.4)
    t0 = time.monotonic()
    assert sink.write(reqs[0]) == counts[0]
    waited = rec.started[0] - t0
    assert 0.4 <= waited < 5, waited               # held for company, then written
    # Full before the delay: written at once.
    rec2 = Recording(store)
    sink2 = Sink(rec2, max_batch_bytes=len(reqs[1]), max_delay=30)
    t0 = time.monotonic()
    assert sink2.write(reqs[1]) == counts[1]
    assert rec2.started[0] - t0 < 10
    sink.close()
    sink2.close()


def test_ack_only_after_the_write_and_a_failed_group_is_refused_whole(store):
    reqs, counts, world = requests(40, 3)
    rec = Recording(store, hold=True, fail_first=True)
    sink = Sink(rec, max_batch_bytes=1 << 30, max_delay=0)
    threads, out = concurrently(sink, reqs[:1])      # the first group: one request
    time.sleep(0.3)
    more, out2 = concurrently(sink, reqs[1:])        # the next group waits behind it
    time.sleep(0.3)
    # Nothing acknowledged while the first insert has not finished.
    assert out == [None] and out2 == [None] * (len(reqs) - 1)
    rec.release.set()
    for t in threads + more:
        t.join(60)
    assert isinstance(out[0], OSError)               # refused: the agent retries it
    assert out2 == counts[1:]
    assert sink.counts["spans"] == sum(counts[1:])
    assert stored(store, world) == sum(counts[1:])   # exactly what was acknowledged
    assert sink.write(reqs[0]) == counts[0]          # the retry
    assert stored(store, world) == sum(counts)
    sink.close()


def test_close_writes_what_waits(store):
    reqs, counts, world = requests(10, 4)
    rec = Recording(store)
    sink = Sink(rec, max_batch_bytes=1 << 30, max_delay=5)
    threads, out = concurrently(sink, reqs)
    time.sleep(0.3)
    assert rec.groups == []                          # waiting for the delay
    sink.close()
    for t in threads:
        t.join(30)
    assert out == counts and stored(store, world) == sum(counts)
    with pytest.raises(RuntimeError):
        sink.write(reqs[0])                          # refused after close, not lost


def test_nat_candidates_are_held_in_memory_until_nat_hold(store):
    world = World(10, random.Random(5), skew_b=0, skew_c=0, nat_every=1,
                  t0=T0 + 77 * 10**12)
    sink = Sink(store)
    cfg = StitcherConfig(window=3600, max_skew=1.0, nat_hold=1.0)
    st = Stitcher(store, cfg, "otel")
    for req in world.batches(random.Random(5)):
        sink.write(req.SerializeToString())
    now = T0 + 77 * 10**12 + 10**9
    st.run_once(now_ns=now)
    assert st.counts["stitched_tcp_seq"] == 20 and st.counts["stitched_tcp_seq_nat"] == 0
    assert len(st.nat_pending) == 10                 # A -> B behind the NAT: held
    time.sleep(1.1)
    # No new rows: this round's query finds nothing; the held candidates decide.
    st.run_once(now_ns=now)
    assert st.counts["stitched_tcp_seq_nat"] == 10 and not st.nat_pending
    st.run_once(now_ns=now)
    assert st.counts["stitched_tcp_seq_nat"] == 10   # nothing twice


def test_cluster_ddl_runs_on_cluster_and_parses(store):
    stmts = schema.ddl("otel", cluster="traces", engine=REPLICATED, ttl_days=3)
    assert len(stmts) == 9
    heads = [s.split("\n")[0] for s in stmts]
    assert heads[0] == "CREATE DATABASE IF NOT EXISTS `otel` ON CLUSTER `traces`"
    for h, name in zip(heads[1:], ("otel_traces", "otel_traces_trace_id_ts",
                                   "otel_traces_trace_id_ts_mv", "deeptrace_stitch_keys",
                                   "deeptrace_stitch_keys_mv", "deeptrace_trace_map",
                                   "deeptrace_parent_map", "otel_traces_stitched")):
        assert f"`otel`.{name} ON CLUSTER `traces`" in h, h
    engines = [line for s in stmts for line in s.split("\n") if "ENGINE" in line]
    assert engines == [f") ENGINE = {REPLICATED}"] * 3 + [
        f") ENGINE = {REPLICATED.replace('MergeTree', 'ReplacingMergeTree')}"] * 2
    assert ") ENGINE = ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/" in engines[3]
    assert "toIntervalDay(3)" in stmts[1] and "toIntervalDay(1)" in stmts[4]
    # ClickHouse's parser takes every statement (a server would run them).
    for sql in stmts:
        ast = store.rows("EXPLAIN AST " + sql)
        assert ast and "CreateQuery" in next(iter(ast[0].values()))
    with pytest.raises(ValueError, match=r"\{table\}"):
        schema.ddl("otel", cluster="traces", engine="ReplicatedMergeTree('/ch/t', '{replica}')")
    # Without a cluster: no ON CLUSTER anywhere.
    assert not any("ON CLUSTER" in s for s in schema.ddl("otel"))


DIST_TABLES = ("otel_traces", "otel_traces_trace_id_ts", "deeptrace_stitch_keys",
               "deeptrace_trace_map", "deeptrace_parent_map")


def test_distributed_ddl_shards_every_table_and_parses(store):
    stmts = schema.ddl("otel", cluster="traces", engine=REPLICATED, distributed=True)
    assert len(stmts) == 1 + 2 * len(DIST_TABLES) + 2 + 1
    assert all(" ON CLUSTER `traces`" in s.split("\n")[0] for s in stmts)
    heads = [s.split("\n")[0] for s in stmts]
    for name in DIST_TABLES:
        # The local table (with table_engine) first, then the Distributed one over it,
        # in the cluster, by the trace id.
        local = heads.index(f"CREATE TABLE IF NOT EXISTS `otel`.{name}_local ON CLUSTER "
                            f"`traces` (")
        dist = heads.index(f"CREATE TABLE IF NOT EXISTS `otel`.{name} ON CLUSTER `traces` "
                           f"AS `otel`.{name}_local")
        assert local < dist
        assert "Replicated" in stmts[local] and "{table}" in stmts[local]
        assert stmts[dist].endswith(f"ENGINE = Distributed('traces', 'otel', '{name}_local', "
                                    "cityHash64(TraceId))")
    # The views sit on the local tables: a view on a Distributed table would see only
    # the inserts made on its own node.
    mvs = [s for s in stmts if "MATERIALIZED VIEW" in s]
    assert len(mvs) == 2
    for mv in mvs:
        assert "FROM `otel`.otel_traces_local" in mv
        assert mv.split("\n")[1] in ("TO `otel`.otel_traces_trace_id_ts_local",
                                     "TO `otel`.deeptrace_stitch_keys_local")
    view = stmts[-1]
    assert "FROM `otel`.otel_traces AS t" in view
    assert "deeptrace_trace_map_local" in view and "deeptrace_parent_map_local" in view
    for sql in stmts:
        ast = store.rows("EXPLAIN AST " + sql)
        assert ast and "CreateQuery" in next(iter(ast[0].values()))
    keyed = schema.ddl("otel", cluster="traces", distributed=True,
                       sharding_key="xxHash64(TraceId)")
    assert sum("Distributed(" in s and s.endswith("xxHash64(TraceId))") for s in keyed) == 5
    with pytest.raises(ValueError, match="storage.cluster"):
        schema.ddl("otel", distributed=True)
    # Without `distributed`: the tables keep their names.
    assert not any("_local" in s or "Distributed" in s
                   for s in schema.ddl("otel", cluster="traces", engine=REPLICATED))


def test_distributed_needs_a_cluster_and_a_trace_id_key():
    with pytest.raises(ConfigError) as e:
        parse("storage:\n  distributed: true\n", "c.yaml")
    assert "c.yaml:2: storage.distributed" in str(e.value) and "storage.cluster" in str(e.value)
    with pytest.raises(ConfigError) as e:
        parse("storage:\n  cluster: traces\n  distributed: true\n  sharding_key: rand()\n",
              "c.yaml")
    assert "c.yaml:4: storage.sharding_key" in str(e.value)
    cfg = parse("storage:\n  distributed: true\n  cluster: traces\n", "c.yaml").storage
    assert cfg.distributed and cfg.sharding_key == "cityHash64(TraceId)"
    assert parse("", "c.yaml").storage.distributed is False


# chdb is ClickHouse without a server: no ON CLUSTER (no Keeper) and no second node, but
# it reads a config with a cluster whose one shard is itself (tcp_port matches). Run in a
# process of its own (chdb's config is read once a process).
ONE_SHARD = """
import os, random, sys
from deeptrace_core.collector import schema
from deeptrace_core.collector.config import Stitcher as StitcherConfig
from deeptrace_core.collector.query import ClickHouseQuery
from deeptrace_core.collector.receiver import Sink
from deeptrace_core.collector.stitcher import Stitcher
from deeptrace_core.collector.store import ChdbStore
from test_collector_stitch import T0, World, stitched_ok
tmp = sys.argv[1]
cfg = os.path.join(tmp, "config.xml")
with open(cfg, "w") as f:
    f.write("<clickhouse><tcp_port>9000</tcp_port><remote_servers><traces><shard><replica>"
            "<host>localhost</host><port>9000</port></replica></shard></traces>"
            "</remote_servers></clickhouse>")
ChdbStore.SETTINGS = {**ChdbStore.SETTINGS, "config-file": cfg}
store = ChdbStore(os.path.join(tmp, "db"), "otel")
store.distributed = True          # as ClickHouseStore with storage.distributed
assert store.rows("SELECT is_local FROM system.clusters WHERE cluster = 'traces'") == [
    {"is_local": 1}]
for sql in schema.ddl("otel", cluster="traces", distributed=True):
    store.command(sql.replace(" ON CLUSTER `traces`", ""))
engines = {r["name"]: r["engine"] for r in store.rows(
    "SELECT name, engine FROM system.tables WHERE database = 'otel'")}
assert engines["otel_traces"] == "Distributed" and engines["otel_traces_local"] == "MergeTree"
rnd = random.Random(7)
world = World(100, rnd, nat_every=5)
sink = Sink(store)
st = Stitcher(store, StitcherConfig(window=3600, nat_hold=0), "otel")
for i, req in enumerate(world.batches(rnd)):
    sink.write(req.SerializeToString())      # through the Distributed otel_traces
    if i % 3 == 2:
        st.run_once(now_ns=T0 + 10**9)
st.run_once(now_ns=T0 + 10**9)
counts = st.stats()
assert counts["stitched_tcp_seq"] == 280 and counts["stitched_tcp_seq_nat"] == 20, counts
assert stitched_ok(store, world) == []
n = lambda t: store.rows(f"SELECT count() AS n FROM otel.{t}")[0]["n"]
assert n("otel_traces_local") == n("deeptrace_stitch_keys_local") == 700
assert n("otel_traces_stitched") == 700 and n("deeptrace_parent_map_local") == 300
q = ClickHouseQuery(store, "otel")
assert len(q.list_traces(limit=1000)) == 100 and q.search(limit=5)["total"] == 100
assert {(e["source"], e["target"], e["calls"]) for e in q.service_map(
    3600 * 10**9, now_ns=T0 + 10**9)} == {("front", "api", 100), ("api", "redis-server", 100),
                                          ("api", "postgres", 100)}
assert len(q.edge_traces("front", "api", 3600 * 10**9, now_ns=T0 + 10**9)) == 10
ta = world.roots[0][0]
assert q.find_trace(ta[:10]) == ta and len(q.load_trace(ta)) == 7
store.close()
print("one-shard run ok")
"""


def test_distributed_tables_run_on_a_one_shard_cluster(tmp_path):
    """The Distributed DDL run for real (less ON CLUSTER), spans inserted through the
    Distributed otel_traces, stitched and read back by every kind of query."""
    here = os.path.dirname(os.path.abspath(__file__))
    path = os.pathsep.join(filter(None, (here, os.environ.get("PYTHONPATH"))))
    proc = subprocess.run([sys.executable, "-c", ONE_SHARD, str(tmp_path)], cwd=here,
                          env={**os.environ, "PYTHONPATH": path}, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and "one-shard run ok" in proc.stdout, proc.stderr[-3000:]


def test_attribute_indexes_are_optional():
    plain = schema.ddl("otel")[1]
    full = schema.ddl("otel", attribute_indexes=True)[1]
    assert "idx_trace_id" in plain and "idx_duration" in plain
    assert "mapKeys" not in plain and "mapValues" not in plain
    for idx in ("idx_res_attr_key", "idx_res_attr_value", "idx_span_attr_key",
                "idx_span_attr_value"):
        assert f"INDEX {idx} " in full


def test_batch_and_receiver_settings_parse_and_are_checked():
    cfg = parse("storage:\n  batch: {max_bytes: 1048576, max_delay: 250ms}\n"
                "  attribute_indexes: true\n  max_memory: 1073741824\n"
                "receivers:\n  otlp: {max_concurrent_requests: 64}\n", "c.yaml")
    assert (cfg.storage.batch.max_bytes, cfg.storage.batch.max_delay) == (1 << 20, 0.25)
    assert cfg.storage.attribute_indexes is True and cfg.storage.max_memory == 1 << 30
    assert cfg.receivers.otlp.max_concurrent_requests == 64
    default = parse("", "c.yaml")
    assert (default.storage.batch.max_bytes, default.storage.batch.max_delay) == (32 << 20, 0.1)
    with pytest.raises(ConfigError) as e:
        parse("storage:\n  batch: {max_delay: 11s}\n", "c.yaml")
    assert "c.yaml:2: storage.batch.max_delay" in str(e.value)
    with pytest.raises(ConfigError) as e:
        parse("receivers:\n  otlp:\n    max_concurrent_requests: 0\n", "c.yaml")
    assert "c.yaml:3: receivers.otlp.max_concurrent_requests" in str(e.value)


def test_the_store_lock_is_handed_over_in_arrival_order():
    """The writer inserting group after group must not take the store back ahead of a
    query that was already waiting (that starved the stitcher under load)."""
    from deeptrace_core.collector.store import FairLock
    lock, order = FairLock(), []
    held = threading.Event()

    def take(name, hold=0.0):
        with lock:
            order.append(name)
            held.set()
            time.sleep(hold)

    first = threading.Thread(target=take, args=("writer", 0.3))
    first.start()
    held.wait(5)
    waiting = threading.Thread(target=take, args=("stitcher",))
    waiting.start()
    time.sleep(0.1)
    # The writer comes back for its next insert right after: it goes after the stitcher.
    first.join()
    again = threading.Thread(target=take, args=("writer again",))
    again.start()
    waiting.join()
    again.join()
    assert order == ["writer", "stitcher", "writer again"]
