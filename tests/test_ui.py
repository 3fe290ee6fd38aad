"""The web UI in a real browser (Debian's headless Chromium, driven by Selenium) on a store
the real agent filled: `deeptrace --config` (trace probe -> spans -> traces -> store)
traces a chain front (HTTP) -> back (HTTP) -> redis-server, seven requests, one slow, one
failing, one whose URL path and Redis key carry markup. `deeptrace ui --db` serves it.
Screenshots of every page land in the test's tmp_path (DEEPTRACE_UI_DOCS=1 also copies
the trace page and the map to docs/ for the README)."""

import contextlib
import http.client
import json
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

import servers
from conftest import require_bpf
from deeptrace_core.traces_cli import fmt_duration, tree_order
from uibrowser import UiServer, browser, copy_to_docs, load, shoot

XSS_PATH = "<script>window.__xss=1</script><img/src=x/onerror=window.__xss=2>"
PATHS = ["/order/1", "/order/2", "/order/3", "/order/slow", "/order/fail", "/order/4",
         "/order/" + XSS_PATH]
RENAME = """
import json, sys, time, http.client, http.server, socketserver
with open('/proc/self/comm', 'w') as f:
    f.write(sys.argv[1])
"""
BACK = RENAME + """
import redis
# No CLIENT SETINFO at connect (an error on Debian 12's Redis): only the requests' calls.
r = redis.Redis(port=int(sys.argv[2]), protocol=2, lib_name=None, lib_version=None)
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = 'HTTP/1.1'
    def do_GET(self):
        rest = self.path.split('/item/', 1)[1]
        if 'slow' in rest:
            time.sleep(0.2)
        r.get('k:' + rest)               # the Redis key carries the URL's text
        code = 500 if 'fail' in rest else 200
        body = b'back ok' if code == 200 else b'back failed'
        self.send_response(code)
        self.send_header('Content-Length', str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
srv = http.server.ThreadingHTTPServer(('127.0.0.1', int(sys.argv[3])), H)
print(json.dumps({'port': srv.server_address[1]}), flush=True)
srv.serve_forever()
"""
FRONT = RENAME + """
back = int(sys.argv[2])
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = 'HTTP/1.1'
    def do_GET(self):
        c = http.client.HTTPConnection('127.0.0.1', back, timeout=10)
        c.request('GET', '/item' + self.path)
        resp = c.getresponse()
        body = resp.read()
        c.close()
        self.send_response(resp.status)
        self.send_header('Content-Length', str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
srv = http.server.ThreadingHTTPServer(('127.0.0.1', int(sys.argv[3])), H)
print(json.dumps({'port': srv.server_address[1]}), flush=True)
srv.serve_forever()
"""


def _service(code, *args):
    proc = subprocess.Popen([sys.executable, "-c", code, *map(str, args)],
                            stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"service {args[0]} exited: {proc.wait()}")
    return proc, json.loads(line)["port"]


def _stop(proc):
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """The store the real agent wrote while the chain served PATHS, in order."""
    require_bpf()
    tmp = tmp_path_factory.mktemp("ui-store")
    db = tmp / "traces.db"
    cfg = tmp / "agent.yaml"
    # Ports chosen first: other redis-servers on this machine are not this test's.
    front_port, back_port, redis_port = (servers.free_port() for _ in range(3))
    cfg.write_text(f"""
probes:
  trace:
    comms: [front, back, redis-server]
    ports: [{front_port}, {back_port}, {redis_port}]
processors:
  spans: {{}}
  traces: {{wait: 0.5s}}
exporters:
  store: {{path: {db}}}
pipelines:
  main: {{probes: [trace], processors: [spans, traces], exporters: [store]}}
""")
    agent = subprocess.Popen([sys.executable, "-m", "deeptrace_core.cli", "--config", str(cfg)],
                             stderr=subprocess.PIPE, text=True, start_new_session=True)
    procs = []
    try:
        line = agent.stderr.readline()
        while "running" not in line:
            assert line, f"agent exited: {agent.wait()}"
            line = agent.stderr.readline()
        # Started after the agent: every connection's first bytes are seen.
        redis = servers.Server("redis", ["redis-server", "--port", str(redis_port), "--bind",
                                         "127.0.0.1", "--save", "", "--appendonly", "no",
                                         "--dir", str(tmp)], redis_port)
        procs.append(redis)
        back, _ = _service(BACK, "back", redis.port, back_port)
        front, _ = _service(FRONT, "front", back_port, front_port)
        procs += [back, front]
        statuses = []
        for path in PATHS:
            c = http.client.HTTPConnection("127.0.0.1", front_port, timeout=10)
            c.request("GET", path)
            resp = c.getresponse()
            resp.read()
            statuses.append(resp.status)
            c.close()
            time.sleep(0.05)
        assert statuses == [500 if "fail" in p else 200 for p in PATHS]
        time.sleep(1.5)               # the linker's wait, then the store's writer
    finally:
        for p in procs:
            p.stop() if hasattr(p, "stop") else _stop(p)
        agent.send_signal(signal.SIGTERM)
        err = agent.communicate(timeout=60)[1]
    assert agent.returncode == 0, err
    return db


def rows(db, sql, *args):
    with contextlib.closing(sqlite3.connect(db)) as conn:
        conn.row_factory = sqlite3.Row
        return [dict(r) for r in conn.execute(sql, args)]


def trace_of(db, path):
    """The trace id of the request for `path` (its front server span's)."""
    (r,) = rows(db, "SELECT trace_id FROM spans WHERE service = 'front' AND role = 'server' "
                    "AND operation = ?", "GET " + path)
    return r["trace_id"]


@pytest.fixture(scope="module")
def ui(store, tmp_path_factory):
    profiles = tmp_path_factory.mktemp("profiles")
    # What the cpu probe's profiler writes (probes.cpu.profile): folded stacks, the
    # process name first. One of back's, one of another process.
    (profiles / "cpu-20260101T000000.000Z.folded").write_text(
        "back;_start;main;serve_forever;handle_request 7\nback;_start;main;poll 3\n"
        "elsewhere;main;spin 11\n")
    server = UiServer(store, "--profiles", str(profiles))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def driver():
    d = browser()
    yield d
    d.quit()


def css(d, selector):
    return d.find_elements("css selector", selector)


def test_the_store_holds_the_chain(store):
    """What the pages below are checked against: every request one trace of five spans
    (front server, front client, back server, back's Redis client, redis-server)."""
    for path in PATHS:
        spans = rows(store, "SELECT service, role FROM spans WHERE trace_id = ? "
                            "ORDER BY start_ns", trace_of(store, path))
        assert [(s["service"], s["role"]) for s in spans][:3] == [
            ("front", "server"), ("front", "client"), ("back", "server")], path
        assert ("redis-server", "server") in {(s["service"], s["role"]) for s in spans}


def test_landing_page_lists_recent_traces_as_links(ui, driver, store, tmp_path):
    load(driver, ui.url + "/")
    shoot(driver, tmp_path / "landing.png")
    expect = [r["trace_id"] for r in rows(
        store, "SELECT trace_id, MIN(start_ns) s FROM spans GROUP BY trace_id ORDER BY s DESC")]
    got = [tr.get_attribute("data-trace-id") for tr in css(driver, "#results tbody tr")]
    assert got == expect
    links = [a.get_attribute("href") for a in css(driver, "#results tbody tr td:nth-child(2) a")]
    assert links == [f"{ui.url}/trace/{t}" for t in expect]
    first = css(driver, "#results tbody tr")[0].text
    assert "front" in first and "GET /order/" in first
    # each duration bar's text is the trace's duration
    d0 = rows(store, "SELECT MAX(end_ns) - MIN(start_ns) d FROM spans WHERE trace_id = ?",
              expect[0])[0]["d"]
    assert css(driver, "#results tbody tr .dur-text")[0].text == fmt_duration(d0)
    assert len(css(driver, "svg.scatter circle")) == len(expect)
    # following a link opens that trace's page
    css(driver, "#results tbody tr td:nth-child(2) a")[0].click()
    load(driver, driver.current_url)
    assert driver.current_url == f"{ui.url}/trace/{expect[0]}"


def waterfall(driver):
    return [(r.get_attribute("data-span-id"), r.find_element("css selector", ".dur").text)
            for r in css(driver, "#waterfall .wf-row[data-span-id]")]


def test_trace_page_waterfall_pairs_and_span_panel(ui, driver, store, tmp_path):
    tid = trace_of(store, "/order/2")
    load(driver, f"{ui.url}/trace/{tid}")
    spans = rows(store, "SELECT * FROM spans WHERE trace_id = ?", tid)
    # in the CLI tree's order (depth first, siblings by start), each with its duration
    expect = [(s["span_id"], fmt_duration(s["end_ns"] - s["start_ns"]))
              for _, s, _ in tree_order(spans)]
    assert waterfall(driver) == expect
    by_id = {s["span_id"]: s for s in spans}
    labels = [(by_id[i]["service"], by_id[i]["role"]) for i, _ in expect]
    assert labels[:3] == [("front", "server"), ("front", "client"), ("back", "server")]
    texts = [r.text for r in css(driver, "#waterfall .wf-row[data-span-id]")]
    assert "front" in texts[0] and "GET /order/2" in texts[0]
    assert "back" in texts[2] and "GET /item/order/2" in texts[2]
    # client/server pairs joined: the server ends of front->back and back->redis
    paired = {r.get_attribute("data-span-id") for r in css(driver, ".wf-row.pair-server")}
    assert paired == {s["span_id"] for s in spans if s["role"] == "server" and s["parent_span_id"]
                      and by_id.get(s["parent_span_id"], {}).get("role") == "client"}
    assert {by_id[i]["service"] for i in paired} == {"back", "redis-server"}
    for i in paired:
        row = driver.find_element("css selector", f'.wf-row[data-span-id="{i}"]')
        assert row.find_elements("css selector", ".join") and row.find_elements("css selector", ".ghost")
    # the span panel: every field, how it was linked, where it ran
    back_server = next(s for s in spans if s["service"] == "back" and s["role"] == "server")
    driver.find_element("css selector", f'.span-btn[data-span-id="{back_server["span_id"]}"]').click()
    fields = {tr.get_attribute("data-key"): tr.find_element("css selector", "td").text
              for tr in css(driver, "#span-fields tr")}
    assert fields["link_source"] == back_server["link_source"] == "tcp_seq"
    assert fields["process"] == f"back [pid {back_server['pid']}]"
    assert fields["thread"] == f"tid {back_server['tid']}" and fields["host"] == back_server["host"]
    assert fields["parent"].startswith(back_server["parent_span_id"])
    attrs = {tr.get_attribute("data-key"): tr.find_element("css selector", "td").text
             for tr in css(driver, "#span-attributes tr")}
    assert attrs == {k: (v if isinstance(v, str) else json.dumps(v, separators=(",", ":")))
                     for k, v in json.loads(back_server["attributes"]).items()}
    assert driver.switch_to.active_element.text.startswith("back")   # focus moved to the panel
    shoot(driver, tmp_path / "trace.png")
    copy_to_docs(tmp_path / "trace.png", "ui-trace.png")
    # collapsing front's client span hides its subtree (keyboard: Enter on the toggle)
    front_client = next(s for s in spans if s["service"] == "front" and s["role"] == "client")
    toggle = driver.find_element("css selector",
                                 f'.wf-row[data-span-id="{front_client["span_id"]}"] .toggle')
    toggle.send_keys("\n")
    visible = [r.get_attribute("data-span-id") for r in css(driver, ".wf-row[data-span-id]")
               if r.is_displayed()]
    assert visible == [expect[0][0], expect[1][0]]
    assert toggle.get_attribute("aria-expanded") == "false"
    toggle.click()
    assert len([r for r in css(driver, ".wf-row[data-span-id]") if r.is_displayed()]) == len(expect)


def test_error_trace_is_marked(ui, driver, store):
    tid = trace_of(store, "/order/fail")
    load(driver, f"{ui.url}/trace/{tid}")
    bad = {r["span_id"] for r in rows(store, "SELECT span_id FROM spans WHERE trace_id = ? "
                                             "AND error = 1", tid)}
    assert bad  # front and back answered 500
    marked = {r.get_attribute("data-span-id") for r in css(driver, ".wf-row.has-error")}
    assert marked == bad
    for i in bad:
        row = driver.find_element("css selector", f'.wf-row[data-span-id="{i}"]')
        assert row.find_element("css selector", ".err-mark").text == "error"
        assert "err" in row.find_element("css selector", ".bar").get_attribute("class")


def listed(driver):
    return [tr.get_attribute("data-trace-id") for tr in css(driver, "#results tbody tr")]


def test_filters_narrow_the_results(ui, driver, store, tmp_path):
    every = {trace_of(store, p) for p in PATHS}
    load(driver, ui.url + "/search")
    assert set(listed(driver)) >= every
    # the form, as a user fills it in: free text over the operation
    box = driver.find_element("id", "f-text")
    box.send_keys("slow")
    box.submit()
    # The submit navigates: wait for the new URL, or the old page may be read again.
    from selenium.webdriver.support.ui import WebDriverWait
    WebDriverWait(driver, 20).until(lambda d: "text=slow" in d.current_url)
    load(driver, driver.current_url)
    assert listed(driver) == [trace_of(store, "/order/slow")]
    assert "text=slow" in driver.current_url
    shoot(driver, tmp_path / "search.png")
    cases = {
        "errors=1": [trace_of(store, "/order/fail")],
        "min_duration=150ms": [trace_of(store, "/order/slow")],
        "service=back&operation=GET+%2Fitem%2Forder%2F3": [trace_of(store, "/order/3")],
        "service=redis-server": None,   # every request reached Redis
        "text=nothing-is-called-this": [],
        "since=15m": None,
    }
    for q, want in cases.items():
        load(driver, f"{ui.url}/search?{q}")
        got = listed(driver)
        if want is None:
            assert set(got) >= every, q
        else:
            assert got == want, q
            assert driver.find_element("id", "result-summary").text.startswith(
                f"{len(want)} trace"), q
    load(driver, f"{ui.url}/search?to=2000-01-01T00:00")
    assert listed(driver) == []
    # the form shows the filters it was loaded with
    load(driver, f"{ui.url}/search?service=back&errors=1")
    assert driver.find_element("id", "f-service").get_attribute("value") == "back"
    assert driver.find_element("id", "f-errors").is_selected()


def test_service_map_three_services_two_edges(ui, driver, store, tmp_path):
    load(driver, ui.url + "/map?window=1h")
    nodes = {n.get_attribute("data-node") for n in css(driver, "#map [data-node]")}
    assert nodes == {"front", "back", "redis-server"}
    table = {tr.get_attribute("data-edge"): [td.text for td in tr.find_elements("css selector", "td")]
             for tr in css(driver, "#edges tbody tr")}
    assert set(table) == {"front→back", "back→redis-server"}
    # calls counted from the store: client spans whose server end is the callee's
    for edge, (src, dst) in {"front→back": ("front", "back"),
                             "back→redis-server": ("back", "redis-server")}.items():
        (n,) = rows(store, "SELECT COUNT(*) n FROM spans c WHERE c.service = ? AND c.role = 'client' "
                           "AND EXISTS (SELECT 1 FROM spans s WHERE s.parent_span_id = c.span_id "
                           "AND s.service = ?)", src, dst)
        cells = table[edge]
        assert cells[3] == str(n["n"]) and int(cells[3]) >= len(PATHS)
        assert float(cells[2]) == pytest.approx(n["n"] / 3600, abs=0.0006)     # requests/s
    assert table["front→back"][4] == f"{100 / len(PATHS):.1f}%"     # one of seven failed
    assert table["back→redis-server"][4] == "0.0%"     # GETs of keys that are not there
    labels = [e.get_attribute("aria-label") for e in css(driver, "#map .edge")]
    assert any(lb.startswith("front to back: ") and "requests per second" in lb for lb in labels)
    shoot(driver, tmp_path / "map.png")
    copy_to_docs(tmp_path / "map.png", "ui-map.png")
    # an edge's slowest traces: the slow request first
    from selenium.webdriver.support.ui import WebDriverWait
    driver.find_element("css selector", '#map .edge[data-edge="front→back"] text').click()
    WebDriverWait(driver, 10).until(lambda d: "front → back" in d.find_element("id", "edge-traces").text)
    first = css(driver, "#edge-traces li a")[0]
    assert first.get_attribute("href").endswith("/trace/" + trace_of(store, "/order/slow"))
    assert len(css(driver, "#edge-traces li")) == len(PATHS)
    # from the keyboard too: Enter on the focused edge
    driver.find_element("css selector", '#map .edge[data-edge="back→redis-server"]').send_keys("\n")
    WebDriverWait(driver, 10).until(lambda d: "back → redis-server" in d.find_element("id", "edge-traces").text)
    assert len(css(driver, "#edge-traces li")) == len(PATHS)


def test_service_page_red_charts_and_flame_graph(ui, driver, store, tmp_path):
    load(driver, ui.url + "/service/back?window=1h")
    ops = {s.get_attribute("data-operation") for s in css(driver, "section.op-red")}
    want = {r["operation"] for r in rows(store, "SELECT DISTINCT operation FROM spans WHERE "
                                                "service = 'back' AND role = 'server'")}
    assert "GET /item/order/slow" in ops and ops <= want | {"(other)"}
    section = driver.find_element("css selector", 'section.op-red[data-operation="GET /item/order/slow"]')
    charts = section.find_elements("css selector", "figure.mini")
    assert [c.find_element("css selector", "figcaption").text.split("\n")[0] for c in charts][:2] == \
        ["Requests/s", "Errors/s"]
    assert "Duration" in charts[2].text
    # one request of 0.2 s and more: the duration chart's top is at least that
    assert section.find_elements("css selector", "polyline.series") and \
        charts[2].find_element("css selector", "svg").get_attribute("aria-label").startswith("Duration: at most 2")
    frames = [f.get_attribute("title") for f in css(driver, "#flame .frame")]
    assert any(f.startswith("handle_request: 7 samples") for f in frames)
    assert any(f.startswith("back: 10 samples") for f in frames)
    assert not any("spin" in f or "elsewhere" in f for f in frames)
    shoot(driver, tmp_path / "service.png")
    load(driver, ui.url + "/service/front?window=1h")
    assert driver.find_element("css selector", "#flame").text.startswith("CPU flame graph\nNo flame graph:")


def test_payloads_are_never_rendered_as_html(ui, driver, store, tmp_path):
    tid = trace_of(store, "/order/" + XSS_PATH)
    load(driver, f"{ui.url}/trace/{tid}")
    page = driver.find_element("id", "main").text
    assert f"GET /order/{XSS_PATH}" in page                    # shown as text, whole
    redis = rows(store, "SELECT span_id, attributes FROM spans WHERE trace_id = ? "
                        "AND service = 'redis-server'", tid)
    assert any("<script>" in json.loads(r["attributes"]).get("db.query.text", "") for r in redis)
    driver.find_element("css selector", f'.span-btn[data-span-id="{redis[0]["span_id"]}"]').click()
    assert "k:order/<script>window.__xss=1</script>" in driver.find_element("id", "span-panel").text
    load(driver, f"{ui.url}/search?text=%3Cscript%3E")
    assert listed(driver) == [tid]
    assert XSS_PATH in driver.find_element("id", "results").text
    for _ in range(2):
        assert driver.execute_script("return window.__xss") is None
        assert not css(driver, "main script, main img")
        assert [s.get_attribute("src") for s in css(driver, "script")] == [ui.url + "/static/app.js"]
        load(driver, f"{ui.url}/trace/{tid}")
    shoot(driver, tmp_path / "markup.png")
    # a trace id that is markup: a 404 said as text
    driver.get(f"{ui.url}/trace/%3Cscript%3Ewindow.__xss=3%3C%2Fscript%3E")
    from uibrowser import wait_ready
    assert wait_ready(driver) == "error"
    assert "not a trace id" in driver.find_element("id", "main").text
    assert driver.execute_script("return window.__xss") is None


def test_keyboard_and_labels(ui, driver):
    load(driver, ui.url + "/")
    for el in css(driver, "form input, form select"):
        i = el.get_attribute("id")
        assert i and css(driver, f'label[for="{i}"]'), el.get_attribute("name")
    for b in css(driver, "button"):
        assert b.text.strip() or b.get_attribute("aria-label")
    # the first Tab reaches the skip link, then the navigation, then the form
    order = []
    from selenium.webdriver.common.action_chains import ActionChains
    for _ in range(5):
        ActionChains(driver).send_keys("\t").perform()
        a = driver.switch_to.active_element
        order.append(a.get_attribute("id") or a.text)
    assert order == ["Skip to content", "DeepTrace", "Search", "Service map", "f-service"]
