"""The fuzzer's crash corpus as regression tests: every input `python -m bench.fuzz` saved
under tests/fuzz_corpus/<target>/ (the input format: bench/fuzz_targets.py) goes through
its target again, uninstrumented, and must raise nothing, keep every bound and contract,
and stay within its time limit (with slack for a busy machine: what the fuzzer saves as
slow takes many times its limit)."""

import glob
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # `bench` is a top-level package of the repository, not installed
    sys.path.insert(0, REPO)

from bench import fuzz_targets as ft  # noqa: E402

CORPUS = os.path.join(REPO, "tests", "fuzz_corpus")
FILES = sorted(glob.glob(os.path.join(CORPUS, "*", "*.bin")))
SLACK = 3.0


@pytest.fixture(scope="module")
def registry():
    return ft.registry()


@pytest.fixture(scope="module")
def targets(registry):
    return {}


def target(targets, registry, name):
    if name not in targets:
        targets[name] = ft.make(name, registry)
    return targets[name]


@pytest.mark.parametrize("path", FILES, ids=lambda p: os.path.relpath(p, CORPUS))
def test_corpus_input(path, targets, registry):
    name = os.path.basename(os.path.dirname(path))
    with open(path, "rb") as f:
        data = f.read()
    ft.replay(target(targets, registry, name), data, slack=SLACK)


def test_corpus_folders_are_targets():
    """A folder of inputs no target replays would never be checked."""
    for d in os.listdir(CORPUS):
        if os.path.isdir(os.path.join(CORPUS, d)):
            assert d in ft.TARGETS, d


def test_every_registered_protocol_is_fuzzed(registry):
    assert {p for p, _ in ft.PARSER_TARGETS.values()} == set(registry.protocols)


def test_input_format_round_trips():
    calls = [("req", b"GET / HTTP/1.1\r\n", 16), ("req", b"Host: a\r\n\r\n", 11),
             ("resp", b"HTTP/1.1 200 OK\r\n", 5000)]
    assert ft.decode(ft.encode(calls)) == (calls, False)
    whole, udp = ft.decode(ft.encode(calls, mode=1, udp=True))
    assert udp and whole == [("req", b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", 27), calls[2]]
    cut, _ = ft.decode(ft.encode(calls, mode=2))
    assert b"".join(c for s, c, _ in cut if s == "req") == calls[0][1] + calls[1][1]
    assert sum(n for s, _, n in cut if s == "resp") == 5000


class _Boom:
    """A parser that raises, and one that breaks a bound: what the replay must catch."""
    def __init__(self, how):
        self.how = how

    def __call__(self, data):
        if self.how == "raise":
            raise KeyError("boom")
        ft._check(False, "bound")


def test_replay_fails_on_what_the_fuzzer_counts_as_a_crash(registry, monkeypatch):
    with pytest.raises(KeyError):
        ft.replay(_Boom("raise"), b"x")
    with pytest.raises(ft.ContractError):
        ft.replay(_Boom("bound"), b"x")
    with pytest.raises(ft.ContractError, match="took"):
        ft.replay(lambda data: sum(range(200_000)), b"x", slack=1e-6)
    # a parser target checks the stream bound after every call: a Stream that no longer
    # drops what is over its cap breaks it
    from deeptrace_core import l7
    append = l7.Stream.append

    def append_uncapped(self, *args):
        cap, self.cap = self.cap, 1 << 40
        append(self, *args)
        self.cap = cap
    monkeypatch.setattr(l7.Parser, "stream_cap", 16)
    monkeypatch.setattr(l7.Stream, "append", append_uncapped)
    http1 = ft.make("http1", registry)
    with pytest.raises(ft.ContractError, match="stream holds"):
        http1(ft.encode([("req", b"GET / HTTP/1.1\r\n", 16), ("req", b"X" * 8, 8)]))
