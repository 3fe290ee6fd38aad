"""The bulk ring-buffer reader against a real BPF ring buffer: the kernel writes records of
varied sizes (and discards some) from a syscall tracepoint; the reader must hand over
every committed record exactly once, in order, across many wrap-arounds, skip discarded
ones, count a record its decode rejects and go on, and release the space."""

import os
import time

import pytest

from deeptrace_core.ringbuf import RingBuffer

PROG = r"""
BPF_RINGBUF_OUTPUT(rb, 1);               // one page: wraps every few dozen records
BPF_ARRAY(seq, u64, 1);
struct rec_t { u64 seq; u64 fill[3]; };

TRACEPOINT_PROBE(syscalls, sys_enter_getppid) {
    if ((bpf_get_current_pid_tgid() >> 32) != TGID)
        return 0;
    u32 zero = 0;
    u64 *s = seq.lookup(&zero);
    if (!s)
        return 0;
    u64 n = (*s)++;
    if (n % 5 == 4) {                     // every fifth: reserved, then discarded
        struct rec_t *r = rb.ringbuf_reserve(sizeof(struct rec_t));
        if (r)
            rb.ringbuf_discard(r, 0);
        return 0;
    }
    struct rec_t r = {.seq = n, .fill = {n, n, n}};
    u32 size = 8 + (n % 4) * 4;           // 8, 12, 16, 20 bytes: padding to 8 varies
    rb.ringbuf_output(&r, size & 31, 0);
    return 0;
}
"""


@pytest.fixture
def ring(bpf_ok):
    from bcc import BPF
    b = BPF(text=PROG.replace("TGID", str(os.getpid())).encode())
    rb = RingBuffer(b[b"rb"].map_fd, os.sysconf("SC_PAGE_SIZE"))
    yield rb
    rb.close()
    b.cleanup()


def _seq(data, off, length):
    return int.from_bytes(bytes(data[off:off + 8]), "little"), length


def test_every_committed_record_once_in_order_across_wraps(ring):
    got = []
    for _ in range(40):                     # 40 x 50 calls: 2000 records through 4 KiB
        for _ in range(50):
            os.getppid()
        assert ring.wait(0)
        ring.consume(_seq, got)
    expected = [(n, 8 + (n % 4) * 4) for n in range(2000) if n % 5 != 4]
    assert got == expected
    assert ring.records == len(expected) and ring.decode_errors == 0
    assert not ring.wait(0)                 # all space released: nothing left to read


def test_a_record_decode_rejects_is_counted_and_reading_goes_on(ring):
    def picky(data, off, length):
        n, _ = _seq(data, off, length)
        if n % 3 == 0:
            raise ValueError("malformed")
        return n

    got = []
    for _ in range(30):
        os.getppid()
    ring.consume(picky, got)
    kept = [n for n in range(30) if n % 5 != 4]
    assert got == [n for n in kept if n % 3]
    assert ring.decode_errors == sum(1 for n in kept if n % 3 == 0)
    for _ in range(5):                      # later records still arrive
        os.getppid()
    ring.consume(picky, got)
    assert got == [n for n in range(35) if n % 5 != 4 and n % 3]


def test_a_limit_takes_records_in_order_a_batch_at_a_time(ring):
    """consume(limit=N) hands over at most N records and releases only their space: the
    next call goes on from the first record not taken, and nothing is lost or repeated."""
    for _ in range(60):
        os.getppid()
    kept = [n for n in range(60) if n % 5 != 4]       # 48 committed records
    got = []
    assert ring.consume(_seq, got, limit=20) == 20
    assert [n for n, _ in got] == kept[:20]
    assert ring.wait(0)                               # the rest still waits
    assert ring.consume(_seq, got, limit=20) == 20
    assert ring.consume(_seq, got, limit=20) == 8
    assert [n for n, _ in got] == kept and not ring.wait(0)


def test_wait_times_out_without_data(ring):
    t0 = time.monotonic()
    assert ring.wait(50) is False
    assert time.monotonic() - t0 >= 0.04


def test_rejects_a_size_that_is_not_pages():
    with pytest.raises(ValueError):
        RingBuffer(-1, 1000)


def test_default_wakeup_leaves_three_quarters_of_the_ring_for_any_cpu_count():
    """Each CPU wakes the agent after its share: all CPUs together leave at most a quarter
    of the ring unannounced (ring/16 per CPU let 16 CPUs fill it without a wake-up)."""
    from deeptrace_plugins.trace.probe import default_wakeup_bytes
    ring = 4 << 20
    for cpus in (1, 2, 16, 64, 1024):
        assert default_wakeup_bytes(ring, cpus) * cpus <= ring // 4
    assert default_wakeup_bytes(ring, 2) == ring // 8
    assert default_wakeup_bytes(4096, 1024) == 64        # never 0: that would wake per record
