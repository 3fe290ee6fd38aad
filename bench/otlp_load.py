"""OTLP load for the collector: agents' real export requests, sent over gRPC at a fixed
offered rate, every span unique.

A template is a set of serialized ExportTraceServiceRequests of three hosts' agents
(``plugins/exporters/otlp.py``'s encoding of a request chain, so every cross-host
request has both ends in different requests). Each round re-sends the whole set with
byte patches in place, so no span, trace or stitch key repeats (a replayed span would
be deduplicated by the stitcher and flatter the figures):

- ids (trace, span, parent): the first 4 bytes XOR the round's key;
- the TCP sequence numbers (5-byte varints, >= 2**28 by construction): 21 payload
  bits XOR the key, so both ends of a pair still agree and other rounds' do not;
- start/end times (fixed64): moved to now, so the stitcher's window sees them as recent.

Patching is numpy over precomputed offsets: the sender costs little beside the collector
on a shared 2-core machine.
"""

import os
import random
import struct
import sys
import threading
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
SEQ_KEYS = (b"deeptrace.request.seq_start", b"deeptrace.request.seq_end",
            b"deeptrace.response.seq_start", b"deeptrace.response.seq_end")


class _BigSeq(random.Random):
    """Sequence numbers in [2**28, 2**32 - 2**20): always a 5-byte varint, no wrap."""

    def getrandbits(self, k):
        v = super().getrandbits(k)
        return (1 << 28) + v % ((1 << 32) - (1 << 28) - (1 << 20)) if k == 32 else v


class Template:
    """One serialized request and where its patchable bytes are."""

    def __init__(self, payload: bytes):
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
        req = trace_service_pb2.ExportTraceServiceRequest.FromString(payload)
        ids, times = set(), set()
        self.spans = 0
        for rs in req.resource_spans:
            for ss in rs.scope_spans:
                for s in ss.spans:
                    self.spans += 1
                    ids.update(x for x in (s.trace_id, s.span_id, s.parent_span_id) if x)
                    times.add(b"\x39" + struct.pack("<Q", s.start_time_unix_nano))
                    times.add(b"\x41" + struct.pack("<Q", s.end_time_unix_nano))
        self.buf = np.frombuffer(payload, np.uint8).copy()
        self.id_at = np.array(sorted(_find_all(payload, ids)), np.int64)
        ts_at = sorted(i + 1 for i in _find_all(payload, times))
        self.ts_at = np.array(ts_at, np.int64)
        self.ts = np.array([struct.unpack_from("<Q", payload, i)[0] for i in ts_at], np.uint64)
        seq_at = []
        for key in SEQ_KEYS:
            # KeyValue: key, then value AnyValue{int_value (field 3): 5-byte varint}.
            pat = bytes([len(key)]) + key + b"\x12\x06\x18"
            seq_at += [i + len(pat) + 1 for i in _find_all(payload, [pat])]   # varint byte 1
        self.seq_at = np.array(sorted(seq_at), np.int64)

    def render(self, key: int, shift_ns: int) -> bytes:
        b = self.buf.copy()
        kb = np.frombuffer(struct.pack("<I", key), np.uint8)
        b[self.id_at[:, None] + np.arange(4)] ^= kb
        b[self.seq_at[:, None] + np.arange(3)] ^= np.array(
            [key & 0x7F, (key >> 7) & 0x7F, (key >> 14) & 0x7F], np.uint8)
        ts = (self.ts + np.uint64(shift_ns)).view(np.uint8).reshape(-1, 8)
        b[self.ts_at[:, None] + np.arange(8)] = ts
        return b.tobytes()


def _find_all(data: bytes, patterns):
    out = set()
    for p in patterns:
        i = data.find(p)
        while i >= 0:
            out.add(i)
            i = data.find(p, i + 1)
    return out


def templates(n_requests: int, seed: int, spans_per_request=512):
    """Templates of about `n_requests` requests: three hosts' agents, whole chains."""
    sys.path.insert(0, os.path.join(REPO, "tests"))
    from test_collector_stitch import World

    from deeptrace_plugins.exporters.otlp import Converter
    from deeptrace_plugins.exporters.red import ServiceNamer
    # 7 spans a chain, A:2, B:3, C:2: chains for about n requests of the given size.
    chains = max(1, n_requests * spans_per_request // 7)
    world = World(chains, _BigSeq(seed), skew_b=0, skew_c=0, t0=1_000_000_000 * 10**9)
    out = []
    for host, spans in world.spans.items():
        conv = Converter(ServiceNamer(), resource={"host.name": f"host-{host}"})
        for i in range(0, len(spans), spans_per_request):
            out.append(Template(conv.traces_request(spans[i:i + spans_per_request])
                                .SerializeToString()))
    return out, world


def send(port: int, sender: int, rate: float, seconds: float, result, max_inflight=64,
         n_requests=24, seed=1):
    """Offer `rate` spans/s for `seconds` over gRPC to 127.0.0.1:`port`; put a dict of what
    was offered, acknowledged, refused, and the acknowledgement latencies on `result`."""
    import grpc
    tmpl, _ = templates(n_requests, seed + 1000 * sender)
    per_round = sum(t.spans for t in tmpl)
    ch = grpc.insecure_channel(f"127.0.0.1:{port}", options=[
        ("grpc.max_send_message_length", 64 << 20)])
    call = ch.unary_unary("/opentelemetry.proto.collector.trace.v1.TraceService/Export",
                          request_serializer=lambda b: b, response_deserializer=lambda b: b)
    lock = threading.Lock()
    slots = threading.Semaphore(max_inflight)
    st = {"offered_spans": 0, "acked_spans": 0, "refused_spans": 0, "behind": 0,
          "requests": 0, "latencies_ms": [], "errors": {}}
    base_ns = tmpl[0].ts.min() if len(tmpl[0].ts) else 0

    def done(fut, n, t_sent):
        lat = (time.monotonic() - t_sent) * 1000
        with lock:
            st["latencies_ms"].append(lat)
            if fut.exception() is None:
                st["acked_spans"] += n
            else:
                st["refused_spans"] += n
                code = str(fut.exception().code())
                st["errors"][code] = st["errors"].get(code, 0) + 1
        slots.release()

    t0 = time.monotonic()
    end = t0 + seconds
    offered_s = 0.0               # offered spans so far, on the schedule
    rnd = 0
    while True:
        rnd += 1
        key = ((sender & 0xFF) << 24) | rnd
        for t in tmpl:
            due = t0 + offered_s / rate
            now = time.monotonic()
            if due >= end:
                break
            if due > now:
                time.sleep(due - now)
            elif now - due > 0.1:
                st["behind"] += 1             # the sender itself could not keep up
            payload = t.render(key, time.time_ns() - int(base_ns))
            slots.acquire()                   # an agent's queue bound: in flight at most
            if time.monotonic() >= end:       # the collector held us past the window
                slots.release()
                break
            fut = call.future(payload, timeout=60)
            fut.add_done_callback(lambda f, n=t.spans, ts=time.monotonic(): done(f, n, ts))
            offered_s += t.spans
            st["offered_spans"] += t.spans
            st["requests"] += 1
        else:
            continue
        break
    for _ in range(max_inflight):               # wait for the last acknowledgements
        slots.acquire()
    st["seconds"] = time.monotonic() - t0
    st["spans_per_round"] = per_round
    ch.close()
    result.put(st)
