"""The web UI served by the collector over ClickHouse (chdb), in a real browser: three
agents' OtlpExporters send a front -> api -> (redis-server, postgres) world, the
stitcher joins the hosts, and the collector's API server answers the same pages as
`deeptrace ui` does over the local store."""

import json
import random
import time
import urllib.request

import pytest

from deeptrace_core.traces_cli import fmt_duration, tree_order
from test_collector import collector_config, wait
from test_collector_stitch import World
from uibrowser import browser, load, shoot

pytest.importorskip("chdb")
N = 12


@pytest.fixture(scope="module")
def collector(tmp_path_factory):
    from deeptrace_core.collector.main import Collector
    from deeptrace_plugins.exporters.otlp import OtlpConfig, OtlpExporter
    c = Collector(collector_config(tmp_path_factory.mktemp("collector"))).start()
    world = World(N, random.Random(5), t0=time.time_ns() - 60 * 10**9)
    for host in "ABC":
        exp = OtlpExporter(OtlpConfig(endpoint=f"127.0.0.1:{c.ports['grpc']}", red_metrics=False,
                                      resource={"host.name": f"host-{host}"}))
        exp.export(world.spans[host])
        assert exp.flush(20)
        exp.shutdown()
    assert wait(lambda: get(c, "/api/stats")["stitcher"].get("stitched_tcp_seq", 0) >= 3 * N)
    c.url = f"http://127.0.0.1:{c.ports['api']}"
    yield c
    c.stop()


def get(c, path):
    with urllib.request.urlopen(f"http://127.0.0.1:{c.ports['api']}{path}", timeout=30) as r:
        return json.loads(r.read())


@pytest.fixture(scope="module")
def driver():
    d = browser()
    yield d
    d.quit()


def css(d, selector):
    return d.find_elements("css selector", selector)


def listed(driver):
    return [tr.get_attribute("data-trace-id") for tr in css(driver, "#results tbody tr")]


def test_search_page_over_clickhouse(collector, driver, tmp_path):
    load(driver, collector.url + "/")
    shoot(driver, tmp_path / "landing.png")
    api = get(collector, "/api/traces?limit=100")      # the collector's own list
    assert listed(driver) == [t["trace_id"] for t in api] and len(api) == N
    assert {tr.find_elements("css selector", "td")[3].text
            for tr in css(driver, "#results tbody tr")} == {"7"}       # stitched: 7 spans
    assert all(tr.text.split("\n")[0] for tr in css(driver, "#results tbody tr"))
    assert "front GET /order" in css(driver, "#results tbody tr")[0].text
    load(driver, collector.url + "/search?text=item%2F3")
    (one,) = listed(driver)
    assert any(s["operation"] == "GET /item/3" for s in get(collector, f"/api/traces/{one}")["spans"])
    load(driver, collector.url + "/search?service=postgres")
    assert len(listed(driver)) == N
    load(driver, collector.url + "/search?errors=1")
    assert listed(driver) == []
    longest = max(t["duration_ns"] for t in api)   # 20 ms, and the hosts' clock skew
    load(driver, collector.url + f"/search?min_duration={longest // 1000 + 1}us")
    assert listed(driver) == []
    load(driver, collector.url + f"/search?min_duration={longest // 1000}us")
    assert len(listed(driver)) >= 1


def test_trace_page_over_clickhouse(collector, driver, tmp_path):
    tid = get(collector, "/api/traces?limit=1")[0]["trace_id"]
    load(driver, collector.url + "/")
    css(driver, "#results tbody tr td:nth-child(2) a")[0].click()
    load(driver, driver.current_url)
    assert driver.current_url == f"{collector.url}/trace/{tid}"
    spans = get(collector, f"/api/traces/{tid}")["spans"]
    expect = [(s["span_id"], fmt_duration(s["duration_ns"])) for _, s, _ in tree_order(spans)]
    got = [(r.get_attribute("data-span-id"), r.find_element("css selector", ".dur").text)
           for r in css(driver, "#waterfall .wf-row[data-span-id]")]
    assert got == expect and len(got) == 7
    by_id = {s["span_id"]: s for s in spans}
    assert [by_id[i]["service"] for i, _ in got][:3] == ["front", "front", "api"]
    paired = {r.get_attribute("data-span-id") for r in css(driver, ".wf-row.pair-server")}
    assert {by_id[i]["service"] for i in paired} == {"api", "redis-server", "postgres"}
    api_server = next(s for s in spans if s["service"] == "api" and s["role"] == "server")
    driver.find_element("css selector", f'.span-btn[data-span-id="{api_server["span_id"]}"]').click()
    fields = {tr.get_attribute("data-key"): tr.find_element("css selector", "td").text
              for tr in css(driver, "#span-fields tr")}
    assert fields["link_source"] == "tcp_seq" and fields["host"] == "host-B"
    assert fields["thread"] == "not recorded"           # OTLP spans carry no thread id
    resource = {tr.get_attribute("data-key") for tr in css(driver, "#span-resource tr")}
    assert "host.name" in resource
    shoot(driver, tmp_path / "trace.png")


def test_map_and_service_pages_over_clickhouse(collector, driver, tmp_path):
    load(driver, collector.url + "/map?window=1h")
    edges = {tr.get_attribute("data-edge"): [td.text for td in tr.find_elements("css selector", "td")]
             for tr in css(driver, "#edges tbody tr")}
    assert set(edges) == {"front→api", "api→redis-server", "api→postgres"}
    assert all(cells[3] == str(N) for cells in edges.values())
    shoot(driver, tmp_path / "map.png")
    load(driver, collector.url + "/service/api?window=1h")
    ops = {s.get_attribute("data-operation") for s in css(driver, "section.op-red")}
    assert len(ops) == 9 and "(other)" in ops      # 8 busiest of 12 operations, the rest
    assert "the collector stores spans only" in driver.find_element("id", "flame").text
