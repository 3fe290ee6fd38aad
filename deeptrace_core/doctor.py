"""`deeptrace doctor`: checks what the agent needs from this machine and says what to fix."""

import os

TRACEFS = "/sys/kernel/tracing"
BTF_PATH = "/sys/kernel/btf/vmlinux"
SYSCALLS = ("read", "readv", "recvfrom", "recvmsg", "recvmmsg", "write", "writev", "sendto",
            "sendmsg", "sendmmsg", "socket", "connect", "accept", "accept4", "close")


def checks(registry=None):
    """Yield (name, ok, detail) for each requirement."""
    yield ("kernel", True, f"{os.uname().release} ({os.uname().version})")
    yield ("root", os.geteuid() == 0, "running as root" if os.geteuid() == 0
           else "loading BPF needs root: run as root")
    ok = os.path.exists(BTF_PATH)
    yield ("btf", ok, BTF_PATH if ok else f"{BTF_PATH} missing: a kernel built with "
           "CONFIG_DEBUG_INFO_BTF=y is required (struct offsets come from BTF)")
    if ok and registry is not None:
        from . import btf
        for name, entry in registry.probes.items():
            try:
                fields = getattr(entry.cls, "kernel_fields", None) or ()
                btf.kernel_offsets(fields)
                yield (f"btf fields of {name}", True, f"{len(fields)} fields found")
            except Exception as exc:
                yield (f"btf fields of {name}", False, f"{exc}")
    ok = os.path.isdir(f"{TRACEFS}/events")
    yield ("tracefs", ok, TRACEFS if ok else
           f"not mounted: mount -t tracefs nodev {TRACEFS} (scripts/setup.sh does it)")
    try:
        import bcc  # noqa: F401
        yield ("bcc", True, "python bcc importable")
    except Exception as exc:
        yield ("bcc", False, f"cannot import bcc ({exc}): apt-get install python3-bpfcc and "
               "run scripts/setup.sh (links it into .venv)")
    build = f"/lib/modules/{os.uname().release}"
    ok = (os.path.exists(f"{build}/build/Makefile")
          and os.path.exists(f"{build}/source/include/linux/kconfig.h"))
    yield ("kernel headers", ok, f"{build}/build and source" if ok else
           f"BCC needs a headers tree at {build}/build and {build}/source: "
           "scripts/setup.sh links the newest Debian linux-headers there")
    if os.path.isdir(f"{TRACEFS}/events"):
        missing = [s for p in ("enter", "exit") for s in SYSCALLS
                   if not os.path.isdir(f"{TRACEFS}/events/syscalls/sys_{p}_{s}")]
        yield ("syscall tracepoints", not missing,
               "all present" if not missing else f"missing: {', '.join(missing)}")
    if os.geteuid() == 0:   # the bpf() probes need root; the root check says so
        from . import features
        for f in features.probe():
            state = "available" if f.available else "not available"
            yield (f"kernel feature {f.name}" + ("" if f.required else " (optional)"),
                   f.available or not f.required, f"{state} ({f.detail}); {f.use}")


def run(registry=None, out=print) -> int:
    failed = 0
    for name, ok, detail in checks(registry):
        out(f"{'ok  ' if ok else 'FAIL'} {name}: {detail}")
        failed += not ok
    out("all checks passed" if not failed else f"{failed} check(s) failed")
    return 1 if failed else 0
