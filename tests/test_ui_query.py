"""The web UI's SQLite back-end (deeptrace_core.query) without a browser: its in-memory
trace index follows the store as the exporter writes and retention deletes, searches
mean what the pages say, older store files still open, and the UI's HTTP answers
(status codes, headers, paths outside the UI)."""

import contextlib
import json
import sqlite3
import time
import urllib.error
import urllib.request

import pytest

from deeptrace_core import cli, query
from deeptrace_core.ui import server as ui_server
from deeptrace_plugins.exporters.store import StoreConfig, StoreExporter, apply_retention, connect
from test_store import MS, chain, span

NOW = time.time_ns() - 1000 * MS


@pytest.fixture(autouse=True)
def _now():
    """A second ago for each test, not for the collection: windows such as the map's last
    60 s must hold the spans however long the suite ran before this test."""
    global NOW
    NOW = time.time_ns() - 1000 * MS


def write(path, spans):
    ex = StoreExporter(StoreConfig(path=path))
    ex.export(spans)
    ex.shutdown()


@pytest.fixture
def db(tmp_path):
    return str(tmp_path / "traces.db")


def test_index_follows_writes_late_spans_and_retention(db):
    write(db, chain(NOW - 5000 * MS, trace="a" * 32))
    q = query.SqliteQuery(db)
    assert [t["trace_id"] for t in q.search()["traces"]] == ["a" * 32]
    # a new trace, and a late span of the first one that makes it longer and failed
    write(db, [*chain(NOW - 1000 * MS, trace="b" * 32),
               span(NOW - 5000 * MS, NOW - 4000 * MS, "client", "users", "GET late",
                    trace="a" * 32, sid="f" * 16, parent="c" * 16, error=True)])
    q.refresh(force=True)
    got = {t["trace_id"]: t for t in q.search()["traces"]}
    assert list(got) == ["b" * 32, "a" * 32]                       # newest first
    assert (got["a" * 32]["spans"], got["a" * 32]["errors"]) == (6, 2)
    assert got["a" * 32]["duration_ns"] == 1000 * MS
    assert got["a" * 32]["root"]["operation"] == "GET /api"
    assert [t["trace_id"] for t in q.search(text="late")["traces"]] == ["a" * 32]
    # retention deletes the older trace: the index drops it
    with contextlib.closing(connect(db)) as w:
        apply_retention(w, 3.0, 10**6, now_ns=NOW)
    q.refresh(force=True)
    assert [t["trace_id"] for t in q.search()["traces"]] == ["b" * 32]
    assert q.search(text="late")["total"] == 0


def test_search_filters(db):
    write(db, [*chain(NOW - 3000 * MS, trace="a" * 32),
               *[span(NOW - 2000 * MS, NOW - 2000 * MS + 5 * MS, comm="front",
                      op="GET /100%_done", trace="b" * 32, sid="1" * 16)],
               *[span(NOW - 1000 * MS, NOW - 1000 * MS + 7 * MS, comm="front",
                      op="GET /100xxdone", trace="c" * 32, sid="2" * 16)]])
    q = query.SqliteQuery(db)
    ids = lambda **kw: [t["trace_id"] for t in q.search(**kw)["traces"]]  # noqa: E731
    assert ids() == ["c" * 32, "b" * 32, "a" * 32]
    assert ids(text="100%_") == ["b" * 32]                 # % and _ are literal
    assert ids(text="get /USERS") == ["a" * 32]           # case-insensitive
    assert ids(service="users", operation="GET /users") == ["a" * 32]
    assert ids(service="frontend", operation="SELECT * FROM users") == []   # the same span's
    assert ids(errors=True) == ["a" * 32]
    assert ids(min_duration_ns=6 * MS) == ["c" * 32, "a" * 32]
    assert ids(start_ns=NOW - 2500 * MS, end_ns=NOW - 1500 * MS) == ["b" * 32]
    page = q.search(limit=1, offset=1, scatter=True)
    assert [t["trace_id"] for t in page["traces"]] == ["b" * 32] and page["total"] == 3
    assert sorted(p[3] for p in page["scatter"]) == ["a" * 32, "b" * 32, "c" * 32]
    assert q.services() == ["front", "frontend", "users"]
    assert q.operations("users") == ["GET /users", "GET user:1", "SELECT * FROM users"]


def test_map_edges_red_and_missing_profiles(db, tmp_path):
    write(db, chain(NOW - 2000 * MS, trace="a" * 32) + chain(NOW - 1000 * MS, trace="b" * 32))
    q = query.SqliteQuery(db, profiles_dir=str(tmp_path / "none"))
    edges = {(e["source"], e["target"]): e for e in q.service_map(60 * 10**9)}
    # frontend's client span is the parent of users' server span; users' database calls
    # reach no traced server: named by protocol and address
    assert set(edges) == {("frontend", "users"), ("users", "postgresql://127.0.0.1:40000"),
                          ("users", "redis://127.0.0.1:40000")}
    e = edges["users", "redis://127.0.0.1:40000"]
    assert (e["calls"], e["errors"], e["p50_ns"], e["rate"]) == (2, 2, 30 * MS, 2 / 60)
    slow = q.edge_traces("frontend", "users", 60 * 10**9)
    assert sorted(s["trace_id"] for s in slow) == ["a" * 32, "b" * 32]
    assert all(s["duration_ns"] == 70 * MS and s["operation"] == "GET /users" for s in slow)
    red = q.service_red("users", 60 * 10**9, 10 * 10**9)
    assert red["role"] == "server" and red["buckets"] == 6
    (op,) = red["operations"]
    assert op["operation"] == "GET /users" and op["total"] == 2
    assert sum(p["count"] for p in op["points"]) == 2
    prof = q.profile("users")
    assert not prof["available"] and "no CPU profiles" in prof["reason"]


def test_a_version_1_store_opens_and_gains_tid_and_host(db):
    old = "\n".join(line for line in open(
        query.__file__.replace("deeptrace_core/query.py",
                               "plugins/exporters/store.py")).read().split('SCHEMA = """')[1]
        .split('"""')[0].splitlines() if "tid " not in line and "host " not in line)
    old = old.replace("link_source    TEXT,", "link_source    TEXT")
    with contextlib.closing(sqlite3.connect(db)) as c:
        c.executescript(old)
        c.execute("INSERT INTO spans (trace_id, span_id, start_ns, end_ns, duration_ns, service) "
                  "VALUES (?, ?, ?, ?, ?, ?)", ("d" * 32, "d" * 16, NOW, NOW + MS, MS, "old"))
        c.commit()
    q = query.SqliteQuery(db)           # reads a file without the newer columns
    (s,) = q.load_trace("d" * 32)
    assert "tid" not in s and s["service"] == "old"
    q.close()
    write(db, chain(NOW, trace="e" * 32))   # the exporter adds them
    q = query.SqliteQuery(db)
    spans = q.load_trace("e" * 32)
    assert {s["tid"] for s in spans} == {100, 200} and all(s["host"] for s in spans)


def test_ui_http_answers(db, capsys):
    write(db, chain(NOW, trace="a" * 32))
    server, port = ui_server.serve(query.SqliteQuery(db), "127.0.0.1", 0)
    base = f"http://127.0.0.1:{port}"

    def fetch(path):
        try:
            with urllib.request.urlopen(base + path, timeout=10) as r:
                return r.status, dict(r.headers), r.read()
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers), e.read()
    try:
        for page in ("/", "/search?x=1", "/trace/aaaa", "/map", "/service/users"):
            code, headers, body = fetch(page)
            assert code == 200 and body.startswith(b"<!doctype html>")
            assert "script-src 'self'" in headers["Content-Security-Policy"]
        code, _, body = fetch("/api/ui/trace/aaaa")
        assert code == 200 and json.loads(body)["trace_id"] == "a" * 32
        assert [s["offset_ns"] for s in json.loads(body)["spans"]][:2] == [0, 10 * MS]
        assert fetch("/api/ui/trace/ffff")[0] == 404
        assert fetch("/api/ui/trace/%3Cscript%3E")[0] == 404
        assert fetch("/api/ui/search?min_duration=lots")[0] == 400
        assert fetch("/api/ui/nothing")[0] == 404
        assert fetch("/static/../query.py")[0] == 404
        assert fetch("/static/app.js")[1]["Content-Type"].startswith("text/javascript")
        assert fetch("/elsewhere")[0] == 404
    finally:
        server.shutdown()
    assert cli.main(["ui", "--db", db + ".missing", "--port", "0"]) == 1
    assert "no trace store" in capsys.readouterr().err
