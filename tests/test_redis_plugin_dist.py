"""Our Redis plugin is its own distribution, found only through its entry point:
installed, the agent parses Redis; uninstalled, it is gone from `deeptrace plugins` and
Redis bytes are simply not parsed. (Reinstalls it afterwards.)"""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIST = os.path.join(ROOT, "plugins", "protocols", "redis")

PARSE = r"""
import types
from deeptrace_core.plugins import PluginHost
from deeptrace_plugins.protocols.stage import SpanStage, SpansConfig
from deeptrace_plugins.trace.decoder import SocketRecord
reg = PluginHost().load_entry_points().registry()
stage = SpanStage(SpansConfig(), types.SimpleNamespace(registry=reg))
def rec(data, direction, t):
    return SocketRecord(t, t + 1, 1, 1, "c", 3, "write", direction, "tcp", "ipv4", "127.0.0.1",
                        5555, "127.0.0.1", 6379, len(data), None, None, data, 1)
spans = stage.process([rec(b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n", "egress", 1),
                       rec(b"$1\r\nv\r\n", "ingress", 5)])
print(sorted(reg.protocols), [s.operation for s in spans])
"""


def run(*args):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT)


def pip(*args):
    out = run("-m", "pip", *args)
    assert out.returncode == 0, out.stderr
    return out


def test_redis_plugin_install_and_uninstall():
    listed = run("-m", "deeptrace_core.cli", "plugins").stdout
    assert any(l.startswith("redis ") and "deeptrace-plugin-redis" in l and "loaded" in l
               for l in listed.splitlines()), listed
    assert "'redis'" in run("-c", PARSE).stdout and "['GET']" in run("-c", PARSE).stdout
    pip("uninstall", "-y", "deeptrace-plugin-redis")
    try:
        listed = run("-m", "deeptrace_core.cli", "plugins").stdout
        assert not any(l.startswith("redis ") for l in listed.splitlines()), listed
        out = run("-c", PARSE).stdout
        assert "'redis'" not in out and out.rstrip().endswith("[]"), out
    finally:
        pip("install", "-q", "--no-deps", "--no-build-isolation", "-e", DIST)
    assert "deeptrace-plugin-redis" in run("-m", "deeptrace_core.cli", "plugins").stdout


def test_redis_plugin_builds_only_on_the_core():
    """A third-party protocol needs deeptrace_core (its L7 kit), never our built-in
    plugins' package."""
    pkg = os.path.join(DIST, "deeptrace_redis")
    for name in sorted(os.listdir(pkg)):
        if name.endswith(".py"):
            with open(os.path.join(pkg, name), encoding="utf-8") as f:
                assert "deeptrace_plugins" not in f.read(), name
    out = run("-c", "import deeptrace_redis.plugin, sys; "
                    "print(sorted(m for m in sys.modules if m.startswith('deeptrace_plugins')))")
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr + out.stdout
