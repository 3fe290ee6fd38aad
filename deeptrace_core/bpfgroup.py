"""Compiling several probes' BPF C as one BCC module.

Each BCC compile pays a fixed ~0.3 s (clang parses BCC's helpers and the kernel headers)
on top of the probe's own code, and libbcc cannot compile two modules at once. The agent
therefore hands every probe's final text to :func:`preload`, which compiles them together;
``bpf.load(text)`` then returns the probe's :class:`View` of the shared module instead of
compiling again. A probe sees its own names only: before concatenation every global name
of a probe's text (maps, structs, functions, enum constants, macros) is prefixed, and its
``TRACEPOINT_PROBE`` handlers become plain functions that the view attaches itself (BCC's
autoload would name two handlers of one tracepoint alike). If the combined text does not
compile, nothing is preloaded and each probe compiles alone, so one probe's broken C still
fails only that probe.
"""

import logging
import re

log = logging.getLogger("deeptrace.bpf")

_DEFINE = re.compile(r"^\s*#\s*define\s+(\w+)", re.M)
_MAP = re.compile(r"^\s*BPF_\w+\(\s*(\w+)\s*,", re.M)
_STRUCT = re.compile(r"\bstruct\s+(\w+)\s*\{")
_FUNC = re.compile(r"^(?:static\s+)?(?:__always_inline\s+|inline\s+)*(?:const\s+)?"
                   r"(?:unsigned\s+|signed\s+|struct\s+)?\w+[\s*]+(\w+)\s*\([^;{]*\)\s*\{", re.M)
_ENUM = re.compile(r"\benum\s*\w*\s*\{([^}]*)\}")
_TP = re.compile(r"TRACEPOINT_PROBE\(\s*(\w+)\s*,\s*(\w+)\s*\)\s*\{")
_TP_FN = "tp__"

_preloaded: dict = {}   # final text -> View, until the probe's load() takes it


def global_names(text: str) -> set:
    """Every file-scope name a probe's C declares (what could clash with another probe)."""
    out = set(_MAP.findall(text)) | set(_STRUCT.findall(text)) | set(_FUNC.findall(text))
    out |= set(_DEFINE.findall(text))
    for body in _ENUM.findall(text):
        for item in body.split(","):
            m = re.match(r"\s*(\w+)", item)
            if m:
                out.add(m.group(1))
    return out


_STRUCT_BODY = re.compile(r"\bstruct\s+\w+\s*\{([^}]*)\}")
_MEMBER = re.compile(r"(\w+)\s*(?:\[[^\]]*\])?\s*;")
_FIELD = re.compile(r"(?:->|\.)\s*([A-Za-z_]\w*)")
_COMMENT = re.compile(r"//[^\n]*|/\*.*?\*/", re.S)


def clashes(text: str) -> set:
    """Global names of a probe that are also spelled as a struct member or a field it reads
    (``args->x``, ``k.x``): prefixing would rename those too, and the probe's Python side
    (table keys and values by member name) or BCC's tracepoint struct would not match."""
    text = _COMMENT.sub(" ", text)
    members = set()
    for body in _STRUCT_BODY.findall(text):
        members.update(_MEMBER.findall(body))
    return (members | set(_FIELD.findall(text))) & global_names(text)


def namespace(prefix: str, text: str, seen_tracepoints: set) -> tuple[str, list]:
    """(text with every global name prefixed, [(category, event)] of its handlers).

    A tracepoint an earlier probe of the group already handles gets ``void *`` as its
    argument: BCC emits the tracepoint's struct before each function that takes it, and a
    second copy would not compile; the first one, earlier in the text, serves both."""
    tracepoints = [(m.group(1), m.group(2)) for m in _TP.finditer(text)]
    names = global_names(text)

    def handler(m):
        cat, ev = m.group(1), m.group(2)
        struct = f"struct tracepoint__{cat}__{ev}"
        name = f"{prefix}{_TP_FN}{cat}__{ev}"
        if (cat, ev) in seen_tracepoints:
            return f"int {name}(void *tp_ctx__) {{ {struct} *args = tp_ctx__;"
        seen_tracepoints.add((cat, ev))
        return f"int {name}({struct} *args) {{"

    text = _TP.sub(handler, text)
    if names:
        pattern = re.compile(r"\b(" + "|".join(sorted(names, key=len, reverse=True)) + r")\b")
        text = pattern.sub(lambda m: prefix + m.group(1), text)
    return text, tracepoints


def preload(items) -> int:
    """Compile [(id, final text)] as one module; returns how many probes it serves."""
    from . import bpf
    items = [(cid, text) for cid, text in items if text]
    for cid, text in list(items):
        bad = clashes(text)
        if bad:  # it compiles alone, as written
            log.info("probe %s compiles alone: %s also spelled as members", cid,
                     ", ".join(sorted(bad)))
            items.remove((cid, text))
    if len(items) < 2:
        return 0
    parts, plan, seen = [], [], set()
    for i, (cid, text) in enumerate(items):
        prefix = f"{re.sub(r'[^A-Za-z0-9]', '_', cid)[:8]}{i}__"
        body, tps = namespace(prefix, text, seen)
        parts.append(f"/* ---- probe {cid} ---- */\n{body}\n")
        plan.append((cid, text, prefix, tps))
    try:
        module = bpf.compile_text("".join(parts))
    except bpf.BPFUnavailable as exc:
        log.warning("probes %s do not compile together (%s); compiling each alone",
                    ", ".join(cid for cid, *_ in plan), str(exc)[:300])
        return 0
    shared = _Shared(module, len(plan))
    for cid, text, prefix, tps in plan:
        _preloaded[text] = View(shared, prefix, tps)
    return len(plan)


def take(text: str):
    """The preloaded view for a probe's final text, attached now; None if there is none."""
    view = _preloaded.pop(text, None)
    if view is not None:
        try:
            view.attach_tracepoints()
        except Exception:
            view.cleanup()
            raise
    return view


def discard():
    """Forget views no probe took (a probe failed before loading)."""
    for view in list(_preloaded.values()):
        view.cleanup()
    _preloaded.clear()


class _Shared:
    def __init__(self, module, users):
        self.module = module
        self.users = users

    def release(self):
        self.users -= 1
        if self.users == 0:
            self.module.cleanup()


class View:
    """What a probe uses of a BCC ``BPF`` object, over its own names in a shared module."""

    def __init__(self, shared, prefix, tracepoints):
        self._shared = shared
        self._b = shared.module
        self.prefix = prefix
        self.tracepoints = tracepoints
        self._tp_fds = []
        self._perf = []
        self._kprobes = []
        self._uprobes = []   # BCC event names
        self.funcs = {}      # this probe's loaded programs, by their names in its source
        self._closed = False

    def _name(self, name) -> bytes:
        return self.prefix.encode() + (name.encode() if isinstance(name, str) else name)

    def __getitem__(self, name):
        return self._b[self._name(name)]

    def load_func(self, name, prog_type, *args, **kw):
        fn = self._b.load_func(self._name(name), prog_type, *args, **kw)
        self.funcs[name.decode() if isinstance(name, bytes) else name] = fn
        return fn

    def attach_tracepoints(self):
        from bcc import BPF, lib
        for cat, ev in self.tracepoints:
            name = f"{_TP_FN}{cat}__{ev}".encode()
            if not lib.bpf_function_start(self._b.module, self._name(name)):
                continue  # compiled out (#if) in this probe's configuration
            fn = self.load_func(name, BPF.TRACEPOINT)
            fd = lib.bpf_attach_tracepoint(fn.fd, cat.encode(), ev.encode())
            if fd < 0:
                raise RuntimeError(f"cannot attach {self.prefix}{cat}:{ev}")
            self._tp_fds.append(fd)

    def attach_perf_event(self, *, ev_type, ev_config, fn_name, **kw):
        self._b.attach_perf_event(ev_type=ev_type, ev_config=ev_config,
                                  fn_name=self._name(fn_name), **kw)
        self.funcs[fn_name.decode() if isinstance(fn_name, bytes) else fn_name] = \
            self._b.funcs[self._name(fn_name)]
        self._perf.append((ev_type, ev_config))

    def attach_kprobe(self, *, event, fn_name):
        self._b.attach_kprobe(event=event, fn_name=self._name(fn_name))
        self._kprobes.append((self._b.detach_kprobe, event, self._name(fn_name)))

    def attach_kretprobe(self, *, event, fn_name):
        self._b.attach_kretprobe(event=event, fn_name=self._name(fn_name))
        self._kprobes.append((self._b.detach_kretprobe, event, self._name(fn_name)))

    def attach_uprobe(self, *, name, addr, fn_name):
        """Attach `fn_name` at `addr` (vaddr) of file `name`, in every process (pid -1)."""
        self._uprobe(self._b.attach_uprobe, name, addr, fn_name)

    def attach_uretprobe(self, *, name, addr, fn_name):
        self._uprobe(self._b.attach_uretprobe, name, addr, fn_name)

    def _uprobe(self, attach, name, addr, fn_name):
        # Detached by event name at cleanup: the path (/proc/PID/root/...) may be gone.
        before = set(self._b.uprobe_fds)
        attach(name=name, addr=addr, fn_name=self._name(fn_name))
        self._uprobes.extend(set(self._b.uprobe_fds) - before)
        key = fn_name.decode() if isinstance(fn_name, bytes) else fn_name
        self.funcs[key] = self._b.funcs[self._name(fn_name)]

    def ring_buffer_consume(self):
        self._b.ring_buffer_consume()

    def cleanup(self):
        """Detach this probe's programs; the module goes with the last probe using it."""
        if self._closed:
            return
        self._closed = True
        from bcc import lib
        for fd in self._tp_fds:
            lib.bpf_close_perf_event_fd(fd)
        self._tp_fds.clear()
        for ev_type, ev_config in self._perf:
            try:
                self._b.detach_perf_event(ev_type=ev_type, ev_config=ev_config)
            except Exception as exc:
                log.error("detaching perf event %s/%s failed: %r", ev_type, ev_config, exc)
        self._perf.clear()
        for detach, event, fn_name in self._kprobes:
            try:
                detach(event=event, fn_name=fn_name)
            except Exception as exc:
                log.error("detaching kprobe %s failed: %r", event, exc)
        self._kprobes.clear()
        for ev_name in self._uprobes:
            try:
                self._b.detach_uprobe_event(ev_name)
            except Exception as exc:
                log.error("detaching uprobe %s failed: %r", ev_name, exc)
        self._uprobes.clear()
        self._shared.release()
