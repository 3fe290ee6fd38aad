"""Web UI test support: Debian's headless Chromium driven by Selenium through Debian's
chromedriver (nothing is downloaded at run time), the UI served by `deeptrace ui` as a
user starts it, and a synthetic store of many traces for the timing test."""

import json
import os
import random
import shutil
import subprocess
import sys

import pytest

CI = os.environ.get("CI") == "true"
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


def browser():
    """A headless Chromium session; skipped (failed under CI=true) without one."""
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.path.exists(p)]
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        missing.append("selenium (pip install -e .[test])")
    if missing:
        why = f"no browser for the UI tests: {', '.join(missing)} (scripts/setup.sh installs them)"
        if CI:
            pytest.fail(why)
        pytest.skip(why)
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,1000", "--no-first-run", "--disable-extensions",
                "--disable-background-networking"):
        opts.add_argument(arg)
    # Service(path): Selenium Manager is not consulted, so it never downloads a driver.
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)


class UiServer:
    """`deeptrace ui --db PATH --port 0` in a subprocess; .url once it is serving."""

    def __init__(self, db, *extra):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "deeptrace_core.cli", "ui", "--db", str(db), "--port", "0",
             *extra], stderr=subprocess.PIPE, text=True)
        line = self.proc.stderr.readline()
        if "serving" not in line:
            self.proc.kill()
            raise RuntimeError(f"deeptrace ui did not start: {line}{self.proc.stderr.read()}")
        self.url = line.split("serving ", 1)[1].split()[0].rstrip("/")

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(10)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()


def wait_ready(driver, timeout=20):
    """Wait until the page says it has rendered (body[data-ready]); returns its value."""
    from selenium.webdriver.support.ui import WebDriverWait
    return WebDriverWait(driver, timeout).until(
        lambda d: d.find_element("css selector", "body").get_attribute("data-ready"))


def load(driver, url, timeout=20):
    driver.get(url)
    state = wait_ready(driver, timeout)
    assert state == "ok", f"{url}: {state}: " + driver.find_element("id", "status").text
    return driver


def render_ms(driver):
    """Milliseconds from the navigation's start to the page's data-ready mark."""
    return driver.execute_script("return window.deeptraceReadyMs")


def shoot(driver, path):
    """A screenshot of the whole page (taller than the window when it scrolls)."""
    h = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1400, max(1000, min(h + 40, 4000)))
    driver.save_screenshot(str(path))
    driver.set_window_size(1400, 1000)


def copy_to_docs(src, name):
    """Refresh a README screenshot (DEEPTRACE_UI_DOCS=1): docs/ holds the last such run's."""
    if os.environ.get("DEEPTRACE_UI_DOCS") == "1":
        docs = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs")
        os.makedirs(docs, exist_ok=True)
        shutil.copyfile(src, os.path.join(docs, name))


# -- a big synthetic store -------------------------------------------------------------------

SERVICES = ("front", "back", "redis-server")


def fill_store(path, n_traces, now_ns, seed=7, span_ms=(1, 40)):
    """n_traces traces front -> back -> redis-server (5 spans each: server, client,
    server, client, server), spread over the hour before now_ns; 1 in 50 in error.
    Returns the trace ids, newest last."""
    from deeptrace_plugins.exporters.store import COLUMNS, INSERT, connect
    rnd = random.Random(seed)
    conn = connect(str(path))
    conn.execute("BEGIN")    # one transaction: the store's connection autocommits
    ids = []
    MS = 1_000_000
    rows = []
    for i in range(n_traces):
        t0 = now_ns - 3600 * 10**9 + i * (3600 * 10**9 // n_traces)
        total = rnd.randint(*span_ms) * MS
        tid = f"{rnd.getrandbits(128):032x}"
        ids.append(tid)
        sid = [f"{rnd.getrandbits(64):016x}" for _ in range(5)]
        err = i % 50 == 0
        path_ = f"/order/{i % 200}"
        spans = [  # (span, parent, start, end, service, op, protocol, role, error)
            (sid[0], None, t0, t0 + total, "front", f"GET {path_}", "http1", "server", err),
            (sid[1], sid[0], t0 + MS // 10, t0 + total - MS // 10, "front", f"GET /item{path_}",
             "http1", "client", err),
            (sid[2], sid[1], t0 + MS // 5, t0 + total - MS // 5, "back", f"GET /item{path_}",
             "http1", "server", err),
            (sid[3], sid[2], t0 + MS // 2, t0 + MS // 2 + total // 4, "back", "GET",
             "redis", "client", False),
            (sid[4], sid[3], t0 + MS // 2 + 1000, t0 + MS // 2 + total // 4 - 1000,
             "redis-server", "GET", "redis", "server", False),
        ]
        for s, p, a, b, svc, op, proto, role, e in spans:
            row = {"trace_id": tid, "span_id": s, "parent_span_id": p, "start_ns": a,
                   "end_ns": b, "duration_ns": b - a, "service": svc, "operation": op,
                   "protocol": proto, "role": role, "status": "500" if e else "200",
                   "error": int(e), "pid": 100 + SERVICES.index(svc), "comm": svc,
                   "cmdline": svc, "local_addr": "127.0.0.1", "local_port": 8000,
                   "remote_addr": "127.0.0.1", "remote_port": 40000, "request_size": 100,
                   "response_size": 200, "attributes": json.dumps({"url.path": path_}),
                   "link_source": None if p is None else "tcp_seq",
                   "tid": 100 + SERVICES.index(svc), "host": "bench"}
            rows.append(tuple(row[c] for c in COLUMNS))
        if len(rows) >= 50_000:
            conn.executemany(INSERT, rows)
            rows = []
    if rows:
        conn.executemany(INSERT, rows)
    conn.execute("COMMIT")
    conn.close()
    return ids

