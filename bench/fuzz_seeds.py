"""Seed corpora for `python -m bench.fuzz`: every conversation the protocol tests feed a
parser, recorded while they run, written as fuzz inputs (bench/fuzz_targets.py).

    python -m bench.fuzz_seeds OUT_DIR [pytest args...]

runs pytest with a plugin that records each parser's ``feed`` calls (side, bytes, bytes
moved, transport) and, at the end, writes OUT_DIR/<target>/<n>.bin: each conversation
as recorded, whole and cut again, and its first bytes of each side for the ``detect``
target. The tests' real captures (nginx, redis-server, memcached, MySQL, PostgreSQL,
gRPC) and their hand-built messages are far better starting points than random bytes.
Conversations that gave messages come first; each target keeps at most MAX_SEEDS.
"""

import os
import sys
from collections import defaultdict

from bench.fuzz_targets import PARSER_TARGETS, encode

MAX_SEEDS = 600            # conversations per target
# An encoded seed is cut to this: libFuzzer starts mutating at the longest seed's length
# and lengthens inputs (to max_len) only once short ones stop finding new coverage.
MAX_BYTES = 1024
PORTS = {"dns": 53, "mysql": 3306, "postgresql": 5432, "redis": 6379, "memcached": 11211,
         "mongodb": 27017, "http1": 80, "http2": 443}


class FeedRecorder:
    """A pytest plugin: wraps every parser class's ``feed`` (only the outermost call of
    a parser is recorded: Http1Parser.feed calls the base's)."""

    def __init__(self):
        self.convs = {}          # id(parser) -> [parser, calls, messages]
        self._undo = []

    def pytest_configure(self, config):
        from deeptrace_core.l7 import Parser
        fuzz_targets_import_parsers()
        classes, todo = [], [Parser]
        while todo:
            cls = todo.pop()
            todo += cls.__subclasses__()
            if "feed" in cls.__dict__:
                classes.append(cls)
        for cls in classes:
            orig = cls.__dict__["feed"]
            setattr(cls, "feed", self._wrap(orig))
            self._undo.append((cls, orig))

    def _wrap(self, orig):
        convs = self.convs

        def feed(parser, side, data, nbytes, *args, **kw):
            conv = convs.get(id(parser))
            if conv is None:
                conv = convs[id(parser)] = [parser, [], 0, 0]
            conv[3] += 1
            try:
                if conv[3] == 1:
                    conv[1].append((side, bytes(data[:nbytes]), max(nbytes, 0)))
                msgs = orig(parser, side, data, nbytes, *args, **kw)
                if conv[3] == 1:
                    conv[2] += len(msgs)
                return msgs
            finally:
                conv[3] -= 1
        return feed

    def pytest_unconfigure(self, config):
        for cls, orig in self._undo:
            setattr(cls, "feed", orig)


def fuzz_targets_import_parsers():
    """Import every registered protocol, so that their parser classes exist to wrap."""
    from bench.fuzz_targets import registry
    registry()


def target_of(parser, calls) -> str:
    if parser.protocol == "memcached":
        first = next((d for _, d, _ in calls if d), b"")
        return "memcached_binary" if first[:1] in (b"\x80", b"\x81") else "memcached_text"
    return parser.protocol


def write(convs, out_dir):
    by_target = defaultdict(list)
    for parser, calls, n_msgs, _ in convs.values():
        if calls:
            by_target[target_of(parser, calls)].append((n_msgs, calls, parser))
    counts = {}
    for target, items in by_target.items():
        if target not in PARSER_TARGETS:
            continue
        items.sort(key=lambda t: -min(t[0], 1))     # conversations with messages first
        seen, kept = set(), 0
        os.makedirs(os.path.join(out_dir, target), exist_ok=True)
        for _, calls, parser in items:
            udp = getattr(parser, "l4", "tcp") == "udp"
            blob = encode(calls, 0, udp)[:MAX_BYTES]
            if blob in seen:
                continue
            seen.add(blob)
            for mode in (0, 1, 2):
                _put(out_dir, target, f"{kept}-{mode}", encode(calls, mode, udp)[:MAX_BYTES])
            _detect_seeds(out_dir, parser.protocol, calls, udp, kept)
            kept += 1
            if kept >= MAX_SEEDS:
                break
        counts[target] = kept
    return counts


def _detect_seeds(out_dir, protocol, calls, udp, k):
    port = PORTS.get(protocol, 80)
    for side in ("req", "resp"):
        data = next((d for s, d, _ in calls if s == side and d), None)
        if data is not None:
            ports = (40000, port) if side == "req" else (port, 40000)
            head = b"".join(p.to_bytes(2, "big") for p in ports) + bytes([udp])
            _put(out_dir, "detect", f"{protocol}-{k}-{side}", head + data[:256])


def _put(out_dir, target, name, blob):
    os.makedirs(os.path.join(out_dir, target), exist_ok=True)
    with open(os.path.join(out_dir, target, name + ".bin"), "wb") as f:
        f.write(blob)


def main(argv):
    import pytest
    out_dir, args = argv[0], argv[1:]
    rec = FeedRecorder()
    code = pytest.main(["-q", "-p", "no:cacheprovider", *args], plugins=[rec])
    counts = write(rec.convs, out_dir)
    print(f"fuzz seeds: {counts} (pytest exit {int(code)})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
