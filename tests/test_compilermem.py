"""The agent gives the compiler's memory back after start-up (deeptrace_core.compilermem)."""

import pytest

from deeptrace_core import compilermem

pytestmark = pytest.mark.bpf


def compiler_rss_kb(field="Rss:") -> int:
    """Resident kB of the mappings compilermem pages out, from /proc/self/smaps (or
    another of their smaps fields, e.g. "Anonymous:")."""
    spans = compilermem.compiler_mappings()
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split(maxsplit=1)[0]
            if "-" in head and not head.endswith(":"):
                start = int(head.partition("-")[0], 16)
                inside = any(s == start for s, _ in spans)
            elif inside and head == field:
                total += int(line.split()[1])
    return total


def file_backed_kb() -> int:
    """Resident pages of the compiler's files themselves (code, read-only data): what
    paging out can take. Pages the process wrote (relocations, data) are anonymous and,
    without swap, stay; how many depends on every compile this process made before."""
    return compiler_rss_kb() - compiler_rss_kb("Anonymous:")


def test_release_pages_out_the_compiler_and_it_still_compiles(bpf_ok):
    from bcc import BPF
    text = b"int f(void *ctx) { return 0; }"
    BPF(text=text).cleanup()
    before = file_backed_kb()
    assert before > 10_000                  # clang/LLVM code touched by the compile
    assert compilermem.release() > 0
    after = file_backed_kb()
    assert after < before / 4, (before, after)   # code pages go; written data stays
    BPF(text=text).cleanup()                # a later compile faults the pages back in
    assert file_backed_kb() > after
