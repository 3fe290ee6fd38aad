"""Reading a BPF ring buffer in bulk, straight from its memory mapping.

BCC hands each record to a ctypes callback: a C -> Python transition, a ctypes argument
conversion and a copy per record, which cost more than decoding the record. Here the
consumer maps the ring (as libbpf does) and walks every committed record in one Python
loop, decoding each in place, then releases the space with one store.

Layout (kernel/bpf/ringbuf.c): page 0 holds consumer_pos (ours to write), page 1
producer_pos, then the data pages mapped twice in a row, so a record that wraps is still
contiguous. Each record: u32 len (bit 31 busy, bit 30 discarded), u32 page offset, then
`len` bytes, padded to 8. x86 and arm64 loads of aligned 4/8-byte words are single
instructions; the kernel publishes a record by clearing its busy bit with a release store.
"""

import ctypes
import mmap
import select
import struct

BUSY = 1 << 31
DISCARD = 1 << 30
HDR = 8
# Native formats: CPython reads them with one fixed-size memcpy (a single aligned load);
# the "<"/">" forms assemble the value byte by byte and could see a half-written word.
_LEN = struct.Struct("I")
_POS = struct.Struct("Q")


class RingBuffer:
    def __init__(self, map_fd: int, size: int):
        if size <= 0 or size & (size - 1) or size % mmap.PAGESIZE:
            raise ValueError(f"ring buffer size {size} is not a power-of-two number of pages")
        page = mmap.PAGESIZE
        self.mask = size - 1
        self._cons_map = mmap.mmap(map_fd, page, mmap.MAP_SHARED,
                                   mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
        self._prod_map = mmap.mmap(map_fd, page + 2 * size, mmap.MAP_SHARED,
                                   mmap.PROT_READ, offset=page)
        # A ctypes view: one aligned 8-byte load or store (the producer page is read-only,
        # so it is read with a native struct unpack instead).
        self._cons = ctypes.c_uint64.from_buffer(self._cons_map, 0)
        self._prod_view = memoryview(self._prod_map)
        self.data = self._prod_view[page:]
        self._epoll = select.epoll()
        self._epoll.register(map_fd, select.EPOLLIN)
        self.records = 0
        self.decode_errors = 0

    def _producer_pos(self) -> int:
        return _POS.unpack_from(self._prod_map, 0)[0]

    def wait(self, timeout_ms: int) -> bool:
        """Block until the kernel signals data (or the timeout); True if data is there."""
        if self._producer_pos() != self._cons.value:
            return True
        if timeout_ms > 0:
            self._epoll.poll(timeout_ms / 1000)
        return self._producer_pos() != self._cons.value

    def consume(self, decode, out: list, limit: int = 0) -> int:
        """Append ``decode(data, offset, length)`` for every committed record to ``out``
        (at most `limit` records, if set) and release their space; returns how many records
        were read. `data` is valid only during the call: decode copies what it keeps. A
        record decode raises on is counted in ``decode_errors`` and released like any
        other: it never blocks the ring."""
        data, mask, unpack = self.data, self.mask, _LEN.unpack_from
        cons = self._cons.value
        n = 0
        busy = False
        limit = limit or -1
        while not busy and n != limit:
            prod = self._producer_pos()
            start = cons
            while cons < prod and n != limit:
                off = cons & mask
                length = unpack(data, off)[0]
                if length & BUSY:  # reserved, not committed yet: the rest waits for later
                    busy = True
                    break
                cons += ((length & ~(BUSY | DISCARD)) + HDR + 7) & ~7
                if not length & DISCARD:
                    try:
                        out.append(decode(data, off + HDR, length))
                        n += 1
                    except Exception:
                        self.decode_errors += 1
            if cons == start:
                break
            self._cons.value = cons  # release the space (one aligned store)
        self.records += n
        return n

    def close(self):
        self._epoll.close()
        self.data.release()
        self._prod_view.release()
        del self._cons
        self._cons_map.close()
        self._prod_map.close()
