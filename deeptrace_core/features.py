"""What this kernel's BPF offers, probed with the bpf() system call itself (no compile).

Each probe loads the smallest program or map that needs the feature and closes it at once,
so the answer is the kernel's own (a config file or a version number can lie: a feature
can be built in and still refused, as fentry is with EPERM on the project's 6.18 kernel).
`deeptrace doctor` prints them with what the agent does without each.
"""

import ctypes
import errno
import os
import struct

import attrs

SYS_BPF = 321          # x86-64
BPF_MAP_CREATE, BPF_PROG_LOAD, BPF_RAW_TRACEPOINT_OPEN = 0, 5, 17
BPF_MAP_TYPE_RINGBUF = 27
BPF_PROG_TYPE_TRACEPOINT, BPF_PROG_TYPE_TRACING = 5, 26
BPF_TRACE_FENTRY = 24
FUNC_GET_CURRENT_TASK_BTF, FUNC_TASK_PT_REGS = 158, 175
BTF_KIND_FUNC = 12
FENTRY_TARGET = "tcp_sendmsg"   # any traceable kernel function will do
TRACEFS = "/sys/kernel/tracing"
BTF_PATH = "/sys/kernel/btf/vmlinux"

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


@attrs.frozen
class Feature:
    name: str
    available: bool
    detail: str        # how it was found, or why not (errno name)
    required: bool     # the agent cannot run without it
    use: str           # what the agent does with it, or without it


def _insn(code, dst=0, src=0, off=0, imm=0) -> bytes:
    return struct.pack("<BBhi", code, dst | (src << 4), off, imm)


CALL, MOV64_IMM, MOV64_REG, EXIT = 0x85, 0xB7, 0xBF, 0x95
RETURN_0 = _insn(MOV64_IMM, 0, imm=0) + _insn(EXIT)


def _bpf(cmd: int, attr: bytes) -> tuple[int, int]:
    """-> (fd or -1, errno)."""
    buf = ctypes.create_string_buffer(attr, 128)
    fd = _libc.syscall(SYS_BPF, cmd, buf, 128)
    return (fd, 0) if fd >= 0 else (-1, ctypes.get_errno())


def _prog_load(prog_type: int, insns: bytes, attach_type: int = 0,
               attach_btf_id: int = 0) -> tuple[int, int]:
    code = ctypes.create_string_buffer(insns, len(insns))
    lic = ctypes.create_string_buffer(b"GPL")
    attr = struct.pack("<IIQQIIQII16sIIIIQIIQIII", prog_type, len(insns) // 8,
                       ctypes.addressof(code), ctypes.addressof(lic), 0, 0, 0, 0, 0,
                       b"dt_feature", 0, attach_type, 0, 0, 0, 0, 0, 0, 0, attach_btf_id, 0)
    return _bpf(BPF_PROG_LOAD, attr)


def _result(fd: int, err: int, ok: str) -> tuple[bool, str]:
    if fd >= 0:
        os.close(fd)
        return True, ok
    return False, f"refused: {errno.errorcode.get(err, err)}"


def ringbuf() -> tuple[bool, str]:
    fd, err = _bpf(BPF_MAP_CREATE, struct.pack("<IIII", BPF_MAP_TYPE_RINGBUF, 0, 0, 4096))
    return _result(fd, err, "BPF_MAP_TYPE_RINGBUF created")


def task_pt_regs() -> tuple[bool, str]:
    insns = (_insn(CALL, imm=FUNC_GET_CURRENT_TASK_BTF) + _insn(MOV64_REG, 1, 0)
             + _insn(CALL, imm=FUNC_TASK_PT_REGS) + RETURN_0)
    fd, err = _prog_load(BPF_PROG_TYPE_TRACEPOINT, insns)
    return _result(fd, err, "a tracepoint program calling it loads")


def _func_btf_id(name: str) -> int | None:
    from .btf import BTF
    btf = BTF.load(BTF_PATH)
    return btf.func_id(name)


def fentry() -> tuple[bool, str]:
    try:
        tid = _func_btf_id(FENTRY_TARGET)
    except (OSError, ValueError) as exc:
        return False, f"no BTF to name a target ({exc})"
    if tid is None:
        return False, f"{FENTRY_TARGET} not in BTF"
    fd, err = _prog_load(BPF_PROG_TYPE_TRACING, RETURN_0, BPF_TRACE_FENTRY, tid)
    if fd < 0:
        return False, f"load refused: {errno.errorcode.get(err, err)}"
    try:  # loading is not enough: the trampoline is made at attach
        link, err = _bpf(BPF_RAW_TRACEPOINT_OPEN, struct.pack("<QI", 0, fd))
        return _result(link, err, f"attached to {FENTRY_TARGET}")
    finally:
        os.close(fd)


def kprobes() -> tuple[bool, str]:
    for path in ("/sys/bus/event_source/devices/kprobe/type", f"{TRACEFS}/kprobe_events"):
        if os.path.exists(path):
            return True, path
    return False, "no kprobe PMU or kprobe_events (CONFIG_KPROBES off)"


def btf() -> tuple[bool, str]:
    ok = os.path.exists(BTF_PATH)
    return ok, BTF_PATH if ok else f"{BTF_PATH} missing (CONFIG_DEBUG_INFO_BTF off)"


def probe() -> list[Feature]:
    """Every feature, probed now (needs root for the bpf() ones)."""
    rows = [
        ("BTF", btf, True, "kernel struct offsets come from it; without it the agent "
         "cannot read sockets or sequence numbers (no header is trusted)"),
        ("ring buffer", ringbuf, True, "records reach user space through it; without "
         "it (kernel < 5.8) the agent cannot start"),
        ("bpf_task_pt_regs", task_pt_regs, True, "ingress calls are hooked at exit only, "
         "their arguments read from the entry registers; without it (kernel < 5.15) the "
         "agent cannot start"),
        ("kprobes", kprobes, False, "every probe hooks tracepoints; only where the "
         "sock:sock_send_length tracepoint is missing (Linux < 6.3) does the network "
         "probe count bytes per process with kprobes, and without both it reports none"),
        ("fentry/fexit", fentry, False, "not used: syscall tracepoints instead (each hit "
         "costs ~0.1 us more than a trampoline would)"),
    ]
    out = []
    for name, fn, required, use in rows:
        try:
            ok, detail = fn()
        except OSError as exc:
            ok, detail = False, f"probe failed: {exc}"
        out.append(Feature(name, ok, detail, required, use))
    return out
