"""The web UI with 100,000 traces (500,000 spans) in the local store: the search and trace
pages render in under a second in a real browser (the issue's goal), measured from the
navigation's start to the page's data-ready mark (HTML, script, API calls, DOM).
Timings of every page go to stdout and to tmp_path/timings.json."""

import json
import time

import pytest

from uibrowser import UiServer, browser, fill_store, load, render_ms, shoot

N = 100_000
GOAL_MS = 1000


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    db = tmp_path_factory.mktemp("big") / "traces.db"
    ids = fill_store(db, N, time.time_ns())
    t = time.monotonic()
    server = UiServer(db)           # builds its trace index before it serves
    server.startup_s = time.monotonic() - t
    yield server, ids
    server.stop()


def test_search_and_trace_pages_render_under_a_second(big, tmp_path):
    server, ids = big
    d = browser()
    timings = {"startup_s": round(server.startup_s, 2)}
    try:
        pages = {
            "landing": "/",
            "search text": "/search?text=order%2F17",
            "search service+operation": "/search?service=back&operation=GET+%2Fitem%2Forder%2F5",
            "search errors": "/search?errors=1",
            "search min duration, page 21": "/search?min_duration=39ms&offset=1000",
            "search time range": "/search?since=15m",
            "trace": f"/trace/{ids[N // 2]}",
            "trace by prefix": f"/trace/{ids[-1][:12]}",
        }
        for name, path in pages.items():
            load(d, server.url + path)
            timings[name] = round(render_ms(d))
        rows = d.find_elements("css selector", "#waterfall .wf-row[data-span-id]")
        assert len(rows) == 5
        load(d, server.url + "/search?text=order%2F17")
        # /order/17 and /order/170../order/179: 11 of the 200 paths
        assert d.find_element("id", "result-summary").text.startswith(f"{N * 11 // 200} traces")
        shoot(d, tmp_path / "search-100k.png")
        for name, path in {"map 15m": "/map", "map 1h": "/map?window=1h",
                           "service 1h": "/service/back?window=1h"}.items():
            load(d, server.url + path, timeout=60)
            timings[name] = round(render_ms(d))
    finally:
        d.quit()
    print(json.dumps(timings, indent=1))
    (tmp_path / "timings.json").write_text(json.dumps(timings, indent=1))
    slow = {k: v for k, v in timings.items()
            if (k.startswith("search") or k.startswith("trace") or k == "landing") and v >= GOAL_MS}
    assert not slow, f"over {GOAL_MS} ms: {slow} (all: {timings})"
