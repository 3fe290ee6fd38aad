"""The agent's wall clock: CLOCK_MONOTONIC plus an offset fixed once, at start.

Kernel timestamps (bpf_ktime_get_ns) are CLOCK_MONOTONIC; records carry them as wall-clock
ns with this offset. Every "now" compared with a record's time (request timeouts) must
come from here too: compared with time.time_ns(), an NTP step of the wall clock would
make requests that just arrived look minutes old (or never time out).
"""

import time

MONO_TO_WALL = time.time_ns() - time.monotonic_ns()


def wall_ns() -> int:
    """Now, on the records' clock."""
    return time.monotonic_ns() + MONO_TO_WALL
