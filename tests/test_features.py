"""Kernel feature probes (deeptrace_core/features.py) against the kernel itself, and
`deeptrace doctor`'s report of them. The kernel job (tests/kernels) runs these inside
Debian's 6.1 too, where kprobes exist."""

import os
import re
import subprocess
import sys

import pytest

from conftest import require_bpf
from deeptrace_core import btf, features

pytestmark = pytest.mark.bpf


def test_func_id_matches_bpftool():
    require_bpf()
    out = subprocess.run(["bpftool", "btf", "dump", "file", btf.VMLINUX], check=True,
                         capture_output=True, text=True).stdout
    want = int(re.search(r"^\[(\d+)\] FUNC 'tcp_sendmsg' ", out, re.M).group(1))
    assert btf.BTF.load().func_id("tcp_sendmsg") == want
    assert btf.BTF.load().func_id("no_such_function_here") is None


def test_required_features_load_and_a_bad_program_is_refused():
    require_bpf()
    got = {f.name: f for f in features.probe()}
    assert set(got) == {"BTF", "ring buffer", "bpf_task_pt_regs", "kprobes", "fentry/fexit"}
    for name in ("BTF", "ring buffer", "bpf_task_pt_regs"):
        assert got[name].available and got[name].required, got[name]
    # the probe can say no: the same program with a helper id no kernel has is refused
    bad = features._insn(features.CALL, imm=99999) + features.RETURN_0
    fd, err = features._prog_load(features.BPF_PROG_TYPE_TRACEPOINT, bad)
    assert fd == -1 and err != 0
    # kprobes: the kernel's own files say the same thing
    assert got["kprobes"].available == os.path.exists("/sys/bus/event_source/devices/kprobe")


def test_doctor_prints_every_feature_with_what_the_agent_does_without_it():
    require_bpf()
    out = subprocess.run([sys.executable, "-m", "deeptrace_core.cli", "doctor"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout
    assert f"ok   kernel: {os.uname().release}" in out.stdout
    for f in features.probe():
        line = next(ln for ln in out.stdout.splitlines() if f"kernel feature {f.name}" in ln)
        assert ("not available" not in line) == f.available
        assert f.use in line
