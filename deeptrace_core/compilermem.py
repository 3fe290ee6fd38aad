"""Give back the memory BCC's in-process compiler held once every probe is compiled.

clang and LLVM run inside the agent: compiling leaves ~80 MB of their code pages
resident (libLLVM, libclang-cpp: file-backed, clean) and freed heap that glibc keeps.
The agent compiles only at start-up, so both go back to the system after it; a later
compile faults the pages back in.
"""

import ctypes
import ctypes.util
import logging

log = logging.getLogger("deeptrace.memory")
MADV_PAGEOUT = 21          # Linux 5.4+: reclaim these pages now
COMPILER_LIBS = ("libLLVM", "libclang")


def compiler_mappings(maps="/proc/self/maps"):
    """(start, end) of every mapping of the compiler's shared libraries."""
    out = []
    with open(maps) as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 6 and parts[5].rpartition("/")[2].startswith(COMPILER_LIBS):
                start, _, end = parts[0].partition("-")
                out.append((int(start, 16), int(end, 16)))
    return out


def release() -> int:
    """Trim the heap and page out the compiler's code; returns the bytes advised."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.malloc_trim(0)
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    advised = 0
    for start, end in compiler_mappings():
        if libc.madvise(start, end - start, MADV_PAGEOUT) == 0:
            advised += end - start
        else:  # older kernel (EINVAL): the pages stay until memory is short
            log.debug("madvise(MADV_PAGEOUT) failed: errno %d", ctypes.get_errno())
    return advised
