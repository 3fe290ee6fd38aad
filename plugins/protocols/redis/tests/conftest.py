"""A private redis-server for the tests that record real client/server bytes."""

import tempfile

import pytest

from deeptrace_core.testing import Recorder, Server, free_port


@pytest.fixture(scope="module")
def server():
    port = free_port()
    argv = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--dir", tempfile.mkdtemp(prefix="dt-redis-")]
    with Server(argv, port) as s:
        yield s


@pytest.fixture
def rec(server):
    """A recording proxy in front of the server (see deeptrace_core.testing.Recorder)."""
    r = Recorder(server.port)
    yield r
    r.close()
