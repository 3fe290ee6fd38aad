"""The web UI: search traces, read one as a waterfall, the service map, a service's RED
charts and flame graph. One page shell and one script (``static/``, written here, no
third-party code, nothing fetched from elsewhere) over a small JSON API (``server.py``)
that any back-end of ``deeptrace_core.query`` answers: ``deeptrace ui`` serves the local
store, the collector serves the same routes over ClickHouse."""
