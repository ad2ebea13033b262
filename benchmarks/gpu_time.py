"""A call's time, two ways: the host clock around it (`host_seconds`), and from the profiler what its kernels took
on the device (`gpu_busy_seconds`), without the host's dispatch and launch gaps that a wall clock around a small
call mostly measures."""

from __future__ import annotations

import statistics
import time


def host_seconds(run, items, reps: int, warmup: int) -> float:
    """Median wall seconds of run(items) after `warmup` calls, per item (`run` handles them all in one call)."""
    import jax

    for _ in range(warmup):
        jax.block_until_ready(run(items))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(run(items))
        times.append(time.perf_counter() - t0)
    return statistics.median(times) / len(items)


def covered_ns(intervals) -> int:
    """The time that at least one of the (start, end) intervals covers: a kernel launched early (programmatic
    dependent launch) runs beside the one before it, and summing their durations counts the overlap twice."""
    total, reach = 0, None
    for start, end in sorted(intervals):
        if reach is None or start > reach:
            total, reach = total + end - start, end
        elif end > reach:
            total, reach = total + end - reach, end
    return total


def gpu_busy_seconds(fn, ws, kernel: str | None = None) -> float:
    """The time the GPU's streams had a kernel or copy of one call of fn running, from a profiler trace (their
    intervals' union: overlapping kernels counted once); None off a GPU. `kernel`: only the kernels whose names
    hold it (e.g. one kernel's time without the copies XLA adds around it)."""
    import glob
    import os
    import tempfile

    import jax
    from jax.profiler import ProfileData

    if jax.default_backend() != "gpu":
        return None
    with tempfile.TemporaryDirectory() as trace:
        jax.profiler.start_trace(trace)
        jax.block_until_ready(fn(ws))
        jax.profiler.stop_trace()
        path = sorted(glob.glob(os.path.join(trace, "**", "*.xplane.pb"), recursive=True))[-1]
        data = ProfileData.from_file(path)
    return covered_ns((ev.start_ns, ev.start_ns + ev.duration_ns) for plane in data.planes
                      if plane.name.startswith("/device:GPU")
                      for line in plane.lines if "stream" in line.name.lower() for ev in line.events
                      if kernel is None or kernel in ev.name) / 1e9
