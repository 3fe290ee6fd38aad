"""Every built-in protocol's detector through the kit's DetectorSuite: the Python mirror
gives what the protocol's table says, never raises, and the kernel detector (its
detect.bpf.c, run with BPF_PROG_TEST_RUN) gives what the mirror gives on the table, on
every cut of the positive rows and on random inputs near the protocol's shapes.

Each protocol's table is the ``detect_cases`` of tests/test_proto_<name>.py. Protocols
of other distributions (deeptrace-plugin-redis) run the same suite in their own tests.
"""

import importlib

import pytest

from deeptrace_core import testing as kit
from deeptrace_core.l7 import REQUEST
from deeptrace_core.plugins import PluginHost

HOST = PluginHost().load_entry_points()
REGISTRY = HOST.registry()
BUILTIN = sorted(name for name, e in REGISTRY.protocols.items()
                 if HOST.infos[e.plugin].dist == "deeptrace")


def cases_of(name):
    return importlib.import_module(f"test_proto_{name}").detect_cases


@pytest.fixture(scope="module", params=BUILTIN)
def detect_cases(request):
    return cases_of(request.param)


class TestDetectors(kit.DetectorSuite):
    pass


def test_every_builtin_protocol_has_its_cases():
    assert {"http1", "http2", "dns", "mysql", "postgresql", "mongodb", "memcached"} <= \
        set(BUILTIN)
    for name in BUILTIN:
        cases = cases_of(name)
        assert isinstance(cases, kit.DetectCases)
        assert cases.protocol is REGISTRY.protocols[name].cls, name


class _SaysTcpForUdp:
    """The http1 protocol with a Python mirror that forgets UDP is never HTTP/1."""

    def __init__(self):
        real = REGISTRY.protocols["http1"].cls
        self.name, self.detect_c, self.config_class = real.name, real.detect_c, real.config_class
        self.detect = lambda data, lport, rport, l4: real.detect(data, lport, rport, "tcp")


def test_the_suite_fails_when_kernel_and_python_disagree():
    wrong = kit.DetectCases(_SaysTcpForUdp(), [(b"GET / HTTP/1.1\r\n", 1, 80, REQUEST)],
                            [(b"GET", 1, 80, 0)])
    kernel = kit.kernel_detector(wrong.protocol)
    assert kernel(b"GET / HTTP/1.1\r\n", 1, 80, 2) == 0     # the C knows better
    with pytest.raises(AssertionError):
        kit.assert_kernel_matches(kernel, wrong.protocol.detect,
                                  [(b"GET / HTTP/1.1\r\n", 1, 80, "udp")])
    with pytest.raises(AssertionError):
        kit.DetectorSuite().test_prefixes_kernel(wrong)
    with pytest.raises(AssertionError):
        kit.DetectorSuite().test_random_kernel(wrong)
