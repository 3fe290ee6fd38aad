"""Kernel struct members the trace probe reads, by BTF name.

Each entry becomes `-DOFF_<struct>__<member>=<offset>` (dots in nested paths become `__`)
for the BPF C, so nothing is read at a header-derived offset. The BTF test checks every
entry against pahole.
"""

KERNEL_FIELDS = (
    "task_struct.files",
    "task_struct.comm",
    "task_struct.nsproxy",      # confinement to network namespaces (probes.trace.netns)
    "nsproxy.net_ns",
    "net.ns",
    "ns_common.inum",
    "files_struct.fdt",
    "fdtable.max_fds",
    "fdtable.fd",
    "file.private_data",
    "file.f_inode",
    "inode.i_mode",
    "socket.sk",
    "sock.__sk_common",
    "sock.sk_type",
    "sock.sk_protocol",
    "sock_common.skc_daddr",
    "sock_common.skc_rcv_saddr",
    "sock_common.skc_dport",
    "sock_common.skc_num",
    "sock_common.skc_family",
    "sock_common.skc_v6_daddr",
    "sock_common.skc_v6_rcv_saddr",
    "sock_common.skc_state",
    "tcp_sock.write_seq",
    "tcp_sock.copied_seq",
    "tcp_sock.rcv_nxt",
    # x86-64 syscall argument registers, read at the exit of ingress calls (arm64 would
    # name orig_x0 and regs[]: the first argument's register holds the return value there).
    "pt_regs.di",
    "pt_regs.si",
    "pt_regs.dx",
    "pt_regs.r10",
    "pt_regs.r8",
    "pt_regs.r14",   # Go >= 1.17: the current goroutine (goroutine.py)
)
