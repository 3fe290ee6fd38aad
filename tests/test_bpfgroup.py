"""Probes compiled as one BCC module (deeptrace_core/bpfgroup.py), on the real kernel: two
probes whose C declares the same map, function, struct, enum constant and macro names and
handles the same tracepoint each keep their own state and detach alone; a probe whose C
does not compile with the others makes the group fall back to one module per probe."""

import os

import pytest

from deeptrace_core import bpf, bpfgroup

pytestmark = pytest.mark.bpf


def probe_text(step: int) -> str:
    # The same names in both probes; only STEP differs.
    return f"""
#define STEP {step}
enum {{ SLOT = 0, NSLOTS }};
struct acc_t {{ u64 n; }};
BPF_ARRAY(stats, struct acc_t, NSLOTS);
static __always_inline void bump(void) {{
    u32 k = SLOT;
    struct acc_t *a = stats.lookup(&k);
    if (a) a->n += STEP;
}}
TRACEPOINT_PROBE(syscalls, sys_enter_getppid) {{
    if ((bpf_get_current_pid_tgid() >> 32) == {os.getpid()})
        bump();
    return 0;
}}
"""


def count(view) -> int:
    return view[b"stats"][0].n


def test_two_probes_with_the_same_names_share_one_module(bpf_ok):
    a, b = probe_text(1), probe_text(100)
    assert bpfgroup.preload([("a", a), ("b", b)]) == 2
    va, vb = bpf.load(a), bpf.load(b)
    try:
        assert isinstance(va, bpfgroup.View) and isinstance(vb, bpfgroup.View)
        assert va._shared is vb._shared            # one compile served both
        for _ in range(3):
            os.getppid()
        assert (count(va), count(vb)) == (3, 300)  # each its own map, its own STEP
        assert set(va.funcs) == {"tp__syscalls__sys_enter_getppid"}
        vb.cleanup()                               # b detaches alone
        os.getppid()
        assert count(va) == 4
    finally:
        va.cleanup()
        vb.cleanup()
        bpfgroup.discard()


def loads_alone(text, step):
    """`text` loads as a plain BCC module of its own (not a view of the shared one), and
    its tracepoint counts: one getppid() adds `step`."""
    module = bpf.load(text)
    try:
        assert not isinstance(module, bpfgroup.View)
        os.getppid()
        assert module[b"stats"][0].n == step
    finally:
        module.cleanup()


def test_a_probe_that_does_not_compile_with_the_others_compiles_alone(bpf_ok):
    good, bad = probe_text(1), probe_text(2) + "\nthis is not C;\n"
    assert bpfgroup.preload([("good", good), ("bad", bad)]) == 0
    assert bpfgroup.take(good) is None
    loads_alone(good, 1)
    with pytest.raises(bpf.BPFUnavailable):
        bpf.load(bad)


def test_namespace_prefixes_every_global_name():
    seen = set()
    text, tps = bpfgroup.namespace("p0__", probe_text(1), seen)
    for name in ("stats", "bump", "acc_t", "SLOT", "NSLOTS", "STEP"):
        assert f"p0__{name}" in text
    assert "int p0__tp__syscalls__sys_enter_getppid(struct tracepoint__syscalls__" in text
    assert tps == [("syscalls", "sys_enter_getppid")]
    # A second probe on the same tracepoint reuses the struct BCC emits for the first.
    text2, _ = bpfgroup.namespace("p1__", probe_text(2), seen)
    assert "int p1__tp__syscalls__sys_enter_getppid(void *tp_ctx__)" in text2


def test_a_probe_whose_members_share_a_global_name_stays_out_of_the_group(bpf_ok):
    # `n` is both a function and a member: prefixing would rename the member its Python
    # side reads (count() reads .n).
    odd = probe_text(3).replace("#define STEP 3",
                                "#define STEP 3\nstatic __always_inline u64 n(void) { return 0; }")
    assert bpfgroup.clashes(odd) == {"n"} and bpfgroup.clashes(probe_text(1)) == set()
    assert bpfgroup.preload([("a", probe_text(1)), ("odd", odd)]) == 0
    try:
        loads_alone(odd, 3)
    finally:
        bpfgroup.discard()
