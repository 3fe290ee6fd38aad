"""asyncio tasks on the trace probe's records: which CPython ``_asyncio`` extensions to hook.

An asyncio service reads its requests in the loop's selector callbacks and makes its
calls from Tasks, several loop iterations later: the thread's order of calls does not
tell which request a call serves, the Task does. trace.bpf.c keeps the Task current on
each thread (uprobe + uretprobe on ``task_step_impl``, which runs one step of a Task in
every caller: ``task_step``, the call_soon'ed step wrapper, 3.12's eager start) and
sends an edge per Task creation (uprobe on ``_asyncio_Task___init__``: the new Task and
the one current on the thread then). Both are static functions, so they come from the
file's ELF symbol table (``.symtab``); where the file is stripped (Debian's
``/usr/bin/python3.11``), it is reported once and its processes are left to the
event-loop rule. The Task is ``task_step_impl``'s parameter named ``task``: its position
comes from the file's DWARF when present (3.11: first, 3.12: second, after the module
state), else from the file's ABI tag.

Files are found by the tls probe's discovery (``plugins/tls/discovery.py``: every
executable mapping in /proc/PID/maps, each file once by device and inode). A uprobe is
set on the file, not a process: it fires in every process that maps the file, also those
started later, so only a file never mapped before needs the next rescan.
"""

import logging
import os
import re
import time

from deeptrace_plugins.tls.discovery import Scanner

log = logging.getLogger("deeptrace.trace")

STEP, INIT = "task_step_impl", "_asyncio_Task___init__"
_NAME = re.compile(r"_asyncio(\.cpython-(\d)(\d+)[^/]*)?\.so$")
MAX_PARAMS = 3     # asyncio_step_enter_<0..2> in trace.bpf.c


def _symtab(elf, wanted) -> dict:
    sec = elf.get_section_by_name(".symtab")
    if sec is None:
        return {}
    out = {}
    for sym in sec.iter_symbols():
        if sym.name in wanted and sym["st_info"]["type"] == "STT_FUNC" and \
                sym["st_shndx"] != "SHN_UNDEF" and sym["st_value"]:
            out[sym.name] = sym["st_value"]
    return out


def _task_param(elf) -> int | None:
    """Position of task_step_impl's parameter `task`, from DWARF; None without DWARF."""
    if not elf.has_dwarf_info():
        return None
    dwarf = elf.get_dwarf_info()
    for cu in dwarf.iter_CUs():
        for die in cu.iter_DIEs():
            if die.tag != "DW_TAG_subprogram":
                continue
            name = die.attributes.get("DW_AT_name")
            if name is None or name.value != STEP.encode():
                continue
            params = [c.attributes["DW_AT_name"].value for c in die.iter_children()
                      if c.tag == "DW_TAG_formal_parameter" and "DW_AT_name" in c.attributes]
            if b"task" in params:
                return params.index(b"task")
    return None


def inspect(open_path: str, path: str) -> dict | None:
    """For a CPython ``_asyncio`` extension: {"task_step_impl": vaddr,
    "_asyncio_Task___init__": vaddr, "task_param": n}, or {"problem": why} when it cannot
    be traced; None for any other file (decided by its name, without opening it)."""
    m = _NAME.search(os.path.basename(path))
    if not m:
        return None
    from elftools.common.exceptions import ELFError
    from elftools.elf.elffile import ELFFile
    try:
        with open(open_path, "rb") as f:
            elf = ELFFile(f)
            syms = _symtab(elf, (STEP, INIT))
            if len(syms) < 2:
                return {"problem": "stripped: no static symbols task_step_impl and "
                                   "_asyncio_Task___init__ (.symtab)"}
            try:
                param = _task_param(elf)
            except (ELFError, KeyError, ValueError, AttributeError):
                param = None   # damaged DWARF: the ABI tag below
    except (ELFError, OSError, ValueError) as exc:
        return {"problem": f"not readable as ELF: {exc}"}
    if param is None and m.group(2) == "3":  # task_step_impl gained `state` first in 3.12
        param = 0 if int(m.group(3)) <= 11 else 1
    if param is None or param >= MAX_PARAMS:
        return {"problem": "no DWARF and no version tag: the task parameter is unknown"}
    return {**syms, "task_param": param}


class AsyncioTracer:
    """Attaches trace.bpf.c's asyncio programs to the ``_asyncio`` files processes map;
    the trace probe calls ``rescan`` at attach and on its poll, ``stats``."""

    def __init__(self, rescan_interval: float, self_pid: int):
        self.scanner = Scanner(self_pid=self_pid, inspect=inspect)
        self.rescan_interval = rescan_interval
        self.attached: dict = {}     # key -> Target
        self.not_traced: dict = {}   # path -> why (each said once)
        self.attach_failed = 0
        self._next = 0.0

    def rescan(self, bpf, force=False):
        now = time.monotonic()
        if not force and (not self.rescan_interval or now < self._next):
            return
        self._next = now + self.rescan_interval
        for target in self.scanner.scan(self.scanner.all_pids()):
            self._attach(bpf, target)

    def _attach(self, bpf, target):
        syms = target.symbols
        if "problem" in syms:
            if target.path not in self.not_traced:
                self.not_traced[target.path] = syms["problem"]
                log.warning("asyncio tasks not traced in %s: %s; its event loops are "
                            "linked by the order of their calls", target.path, syms["problem"])
            return
        path = target.open_path.encode()
        try:
            bpf.attach_uprobe(name=path, addr=syms[STEP],
                              fn_name=f"asyncio_step_enter_{syms['task_param']}".encode())
            bpf.attach_uretprobe(name=path, addr=syms[STEP], fn_name=b"asyncio_step_return")
            bpf.attach_uprobe(name=path, addr=syms[INIT], fn_name=b"asyncio_task_init")
        except Exception as exc:  # a file we cannot hook must not stop the agent
            self.attach_failed += 1
            log.warning("cannot attach asyncio probes to %s: %s", target.path, exc)
            return
        self.attached[target.key] = target
        log.info("asyncio tasks traced in %s (task is parameter %d of %s)", target.path,
                 syms["task_param"], STEP)

    def attached_paths(self) -> list:
        return sorted(t.path for t in self.attached.values())

    def stats(self) -> dict:
        return {"asyncio_files_attached": len(self.attached),
                "asyncio_files_not_traced": len(self.not_traced),
                "asyncio_attach_failed": self.attach_failed}
