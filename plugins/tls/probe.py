"""The tls probe: plaintext of OpenSSL's SSL_read/SSL_write (and _ex) calls, mapped to the
TCP connection underneath, as socket records with ``tls=True``.

How a call is mapped to its connection is in tls.bpf.c; what is left to user space here:
finding the files to attach (discovery.py) at start-up and whenever a process's link map
changes, and joining memory-BIO writes with their thread's next socket write.

Go's crypto/tls has no SSL_* symbols: golang.py finds Go executables and attaches
gotls.bpf.c (compiled after tls.bpf.c, same records) to their ``(*Conn).Write``/``Read``.
"""

import logging
import os
import time

import attrs
from attrs import validators as v

from deeptrace_core import bpf
from deeptrace_core.metricprobe import power_of_two
from deeptrace_core.ringbuf import RingBuffer
from deeptrace_plugins.trace.probe import _pow2_at_least

from .decoder import EV_CLOSE, EV_LOADED, STAT_NAMES, Control, make_decoder
from .discovery import LOADER_SYMBOL, Scanner
from .golang import GoTracer

log = logging.getLogger("deeptrace.tls")

MAX_PAYLOAD = 8192
BATCH_RECORDS = 4096
# Rule 3: the thread's last socket read counts if it is at most this old. Event loops
# consume right after the read (microseconds here); the margin is for slow machines (a
# TCG-emulated guest took over 100 ms between the two).
NEIGHBOUR_NS = 1_000_000_000
# struct bio_st of OpenSSL 3.x (crypto/bio/bio_local.h, with the deprecated callback
# member, as distributions and Node build it): num_read and num_write.
BIO_NUM_READ, BIO_NUM_WRITE = 96, 104
PAGE = os.sysconf("SC_PAGE_SIZE")

KERNEL_FIELDS = (
    "task_struct.files",
    "files_struct.fdt",
    "fdtable.max_fds",
    "fdtable.fd",
    "file.private_data",
    "file.f_inode",
    "inode.i_mode",
    "socket.sk",
    "sock.__sk_common",
    "sock.sk_protocol",
    "sock_common.skc_daddr",
    "sock_common.skc_rcv_saddr",
    "sock_common.skc_dport",
    "sock_common.skc_num",
    "sock_common.skc_family",
    "sock_common.skc_v6_daddr",
    "sock_common.skc_v6_rcv_saddr",
    "tcp_sock.write_seq",
    "tcp_sock.copied_seq",
    "pt_regs.di",
    "pt_regs.r14",   # gotls.bpf.c: the goroutine at a syscall
)

# function -> (entry program, exit program or None)
PROGRAMS = {
    "SSL_read": ("ssl_read_enter", "ssl_call_exit"),
    "SSL_write": ("ssl_write_enter", "ssl_call_exit"),
    "SSL_read_ex": ("ssl_read_ex_enter", "ssl_call_exit"),
    "SSL_write_ex": ("ssl_write_ex_enter", "ssl_call_exit"),
    "SSL_set_fd": ("ssl_set_fd_enter", None),
    "SSL_set_bio": ("ssl_set_bio_enter", None),
    "SSL_free": ("ssl_free_enter", None),
    "SSL_do_handshake": ("ssl_handshake_enter", "ssl_call_exit"),
    LOADER_SYMBOL: ("dl_debug_state", None),
}


@attrs.define
class TlsConfig:
    """``probes.tls`` in the YAML config."""

    enabled: bool = True
    # Glob patterns on the path of a library or executable that exports SSL_write, as the
    # process maps it (or its file name): e.g. include [libssl.so.3], exclude [/usr/bin/node].
    include: list[str] = attrs.field(factory=list)
    exclude: list[str] = attrs.field(factory=list)
    payload_bytes: int = attrs.field(default=1024, validator=[v.ge(1), v.le(MAX_PAYLOAD)])
    ringbuf_pages: int = attrs.field(default=1024, validator=power_of_two)
    poll_ms: int = attrs.field(default=100, validator=[v.ge(1), v.le(10000)])
    max_connections: int = attrs.field(default=65536, validator=[v.ge(16), v.le(1 << 22)])
    # Besides the loader's trigger, every process is rescanned this often (static
    # binaries have no loader); 0: never.
    rescan_interval: float = attrs.field(default=30.0, validator=[v.ge(0), v.le(86400)],
                                         metadata={"unit": "seconds"})


class TlsProbe:
    name = "tls"
    config_class = TlsConfig
    kernel_fields = KERNEL_FIELDS
    batch_limit = BATCH_RECORDS
    loss_counters = ("ringbuf_full", "read_failed", "thread_state_failed", "ssl_map_full",
                     "unmapped_read", "unmapped_write", "decode_failed", "attach_failed",
                     "prog_recursion_misses", "go_unconfigured", "go_unmapped",
                     "go_calls_full", "go_read_failed", "go_attach_failed")
    source = ("deeptrace_plugins.tls", "tls.bpf.c")

    def __init__(self, config: TlsConfig, context=None):
        self.config = config
        self.context = context
        self.bpf = None
        self.ring = None
        self.self_pid = os.getpid()
        self.scanner = Scanner(config.include, config.exclude, self.self_pid)
        self.go = GoTracer(config.include, config.exclude, self.self_pid)
        self.attached: dict = {}      # key -> Target
        self.attach_failed = 0
        self.last: dict = {}          # (pid, conn_id) -> latest record (for its close)
        self.rescan_pids: set = set()
        self.counts = {"closes": 0}
        self._next_full = 0.0
        self._decode = make_decoder()

    # -- build --------------------------------------------------------------------------
    def defines(self) -> dict:
        c = self.config
        ring = c.ringbuf_pages * PAGE
        return {
            "PAYLOAD_CAP": c.payload_bytes,
            "PAYLOAD_MAX": _pow2_at_least(c.payload_bytes),
            "RINGBUF_PAGES": c.ringbuf_pages,
            "WAKEUP_BYTES": max(64, ring // (4 * (os.cpu_count() or 1))),
            "SSL_MAX": c.max_connections,
            "SELF_TGID": self.self_pid,
            "NEIGHBOUR_NS": NEIGHBOUR_NS,
            "BIO_NUM_READ": BIO_NUM_READ,
            "BIO_NUM_WRITE": BIO_NUM_WRITE,
        }

    def render(self, defines: dict) -> str:
        if not self.config.enabled:
            return ""
        source = bpf.read_source(*self.source) + bpf.read_source(self.source[0], "gotls.bpf.c")
        return bpf.render(source, {**defines, **self.defines()})

    # -- run ----------------------------------------------------------------------------
    def attach(self, defines: dict):
        if not self.config.enabled:
            return
        self.bpf = bpf.load(self.render(defines))
        self.ring = RingBuffer(self.bpf[b"tls_events"].map_fd,
                               self.config.ringbuf_pages * PAGE)
        self.rescan(full=True)

    def rescan(self, pids=None, full=False):
        """Attach to files exporting SSL_write (and the loader's trigger) that the given
        processes, or all, map and that are not attached yet."""
        if full:
            pids = self.scanner.all_pids()
            self._next_full = time.monotonic() + (self.config.rescan_interval or float("inf"))
        for target in self.scanner.scan(pids or ()):
            self._attach(target)
        self.go.rescan(self.bpf, pids or ())

    def _attach(self, target):
        try:
            for sym, addr in sorted(target.symbols.items()):
                if sym not in PROGRAMS or (sym == "SSL_set_bio" and not target.openssl3):
                    continue  # memory BIOs are read with OpenSSL 3's layout only
                enter, ret = PROGRAMS[sym]
                self.bpf.attach_uprobe(name=target.open_path.encode(), addr=addr,
                                       fn_name=enter.encode())
                if ret:
                    self.bpf.attach_uretprobe(name=target.open_path.encode(), addr=addr,
                                              fn_name=ret.encode())
        except Exception as exc:  # a file we cannot hook must not stop the agent
            self.attach_failed += 1
            log.warning("cannot attach to %s: %s", target.path, exc)
            return
        self.attached[target.key] = target
        log.info("attached to %s (%s)", target.path, ", ".join(sorted(target.symbols)))

    def attached_paths(self) -> list:
        return sorted(t.path for t in self.attached.values())

    def poll(self, timeout_ms: int | None = None) -> list:
        if self.ring is None:
            return []
        if timeout_ms is None:
            timeout_ms = self.config.poll_ms
        raw: list = []
        if self.ring.wait(timeout_ms):
            self.ring.consume(self._decode, raw, BATCH_RECORDS)
        out = self._join(raw)
        if self.rescan_pids:
            pids, self.rescan_pids = self.rescan_pids, set()
            self.rescan(pids)
        if time.monotonic() >= self._next_full:
            self.rescan(full=True)
        return out

    def _join(self, raw) -> list:
        """Records in ring order; control events act here."""
        out = []
        last = self.last
        for item in raw:
            if isinstance(item, Control):
                if item.kind == EV_CLOSE:
                    self._close(item, out)
                elif item.kind == EV_LOADED:
                    self.rescan_pids.add(item.pid)
                continue
            key = (item.pid, item.conn_id)
            if key not in last and len(last) > self.config.max_connections:
                for k in list(last)[: len(last) // 2]:
                    del last[k]
            last[key] = item
            out.append(item)
        return out

    def _close(self, ctl, out):
        rec = self.last.pop((ctl.pid, ctl.conn_id), None)
        if rec is None:
            return  # no data was ever sent up for it
        self.counts["closes"] += 1
        out.append(attrs.evolve(rec, syscall="close", direction="none", bytes=0, payload=b"",
                                tcp_seq_start=None, tcp_seq_end=None, truncated=False,
                                ts_enter_ns=rec.ts_exit_ns))

    def stats(self) -> dict:
        if self.bpf is None:
            return {}
        out = bpf.counters(self.bpf, STAT_NAMES)
        out.update(self.counts)
        out["prog_recursion_misses"] = sum(bpf.recursion_misses(self.bpf).values())
        out["decode_failed"] = self.ring.decode_errors if self.ring else 0
        out["files_attached"] = sum(1 for t in self.attached.values() if t.is_ssl)
        out["attach_failed"] = self.attach_failed
        out["maps_scanned"] = self.scanner.scans
        out["ssl_map_entries"] = len(self.bpf[b"ssl_conns"])
        out.update(self.go.stats(self.bpf))
        return out

    def gc(self):
        """Forget SSL* entries of processes that exited without SSL_free."""
        if self.bpf is None:
            return
        table = self.bpf[b"ssl_conns"]
        for key in [k for k in table.keys() if not os.path.exists(f"/proc/{k.tgid}")]:
            try:
                del table[key]
            except KeyError:
                pass
        for key in [k for k in self.last if not os.path.exists(f"/proc/{k[0]}")]:
            del self.last[key]
        self.go.gc(self.bpf)

    def detach(self):
        if self.bpf is not None:
            if self.ring is not None:
                self.ring.close()
                self.ring = None
            self.go.detach()
            self.bpf.cleanup()
            self.bpf = None
