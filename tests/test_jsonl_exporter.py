"""The jsonl exporter writes payloads (which may hold credentials): its files are private."""

import json
import os
import stat

from deeptrace_core.span import Span
from deeptrace_plugins.exporters.jsonl import JsonlConfig, JsonlExporter

T0 = 1_700_000_000_000_000_000


def span():
    return Span(T0, T0 + 1000, "http1", "client", 1, 1, "curl", "curl", "tcp", "ipv4",
                "127.0.0.1", 5000, "127.0.0.1", 80, 1, "GET /", "200", False, 10, 20)


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_created_file_is_0600_and_folders_0700_whatever_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        path = tmp_path / "a" / "b" / "spans.jsonl"
        exp = JsonlExporter(JsonlConfig(path=str(path)))
        exp.export([span()])
        exp.shutdown()
    finally:
        os.umask(old)
    assert mode(path) == 0o600
    assert mode(tmp_path / "a") == mode(tmp_path / "a" / "b") == 0o700
    assert json.loads(path.read_text())["operation"] == "GET /"


def test_append_and_truncate_keep_working(tmp_path):
    path = tmp_path / "spans.jsonl"
    for append, lines in ((True, 1), (True, 2), (False, 1)):
        exp = JsonlExporter(JsonlConfig(path=str(path), append=append))
        exp.export([span()])
        exp.shutdown()
        assert len(path.read_text().splitlines()) == lines
    assert mode(path) == 0o600
