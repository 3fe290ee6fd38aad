"""The agent gives the compiler's memory back after start-up (deeptrace_core.compilermem)."""

import pytest

from deeptrace_core import compilermem

pytestmark = pytest.mark.bpf


def compiler_rss_kb() -> int:
    """Resident kB of the mappings compilermem pages out, from /proc/self/smaps."""
    spans = compilermem.compiler_mappings()
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split(maxsplit=1)[0]
            if "-" in head and not head.endswith(":"):
                start = int(head.partition("-")[0], 16)
                inside = any(s == start for s, _ in spans)
            elif inside and head == "Rss:":
                total += int(line.split()[1])
    return total


def test_release_pages_out_the_compiler_and_it_still_compiles(bpf_ok):
    from bcc import BPF
    text = b"int f(void *ctx) { return 0; }"
    BPF(text=text).cleanup()
    before = compiler_rss_kb()
    assert before > 10_000                  # clang/LLVM code touched by the compile
    assert compilermem.release() > 0
    after = compiler_rss_kb()
    assert after < before / 4, (before, after)   # code pages go; written data stays
    BPF(text=text).cleanup()                # a later compile faults the pages back in
    assert compiler_rss_kb() > after
