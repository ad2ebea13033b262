"""Where a server's start goes: the engine's build, then warm-up's programs split into tracing, lowering to
StableHLO and XLA's compile (or the persistent cache's read), as JAX's own monitoring events time them.

    python -m benchmarks.startup_probe --model gpt2-tiny --slots 256 --cache-dir /tmp/probe-cache   # cold
    python -m benchmarks.startup_probe --model gpt2-tiny --slots 256 --cache-dir /tmp/probe-cache   # restart
    python -m benchmarks.startup_probe --checkpoint DIR [--read-first]   # a checkpoint read beside the warm-up

Warm-up compiles on threads, so the sums of the phases exceed its wall time: tracing and lowering are Python
(one thread at a time, under the GIL), XLA's compiles run beside them. One JSON object on stdout.
"""

from __future__ import annotations

import argparse
import collections
import json
import threading
import time

START = time.perf_counter()

PHASES = {"/jax/core/compile/jaxpr_trace_duration": "trace_s",
          "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower_s",
          "/jax/core/compile/backend_compile_duration": "compile_or_read_s",
          "/jax/compilation_cache/cache_retrieval_time_sec": "cache_read_s"}


class PhaseTimes:
    """Sums and counts of JAX's compile-path durations, from any thread."""

    def __init__(self):
        self.seconds = collections.Counter()
        self.counts = collections.Counter()
        self._lock = threading.Lock()

    def __call__(self, event: str, duration: float, **_metadata) -> None:
        if event in PHASES:
            with self._lock:
                self.seconds[PHASES[event]] += duration
                self.counts[PHASES[event]] += 1


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="gpt2-tiny")
    p.add_argument("--dtype")
    p.add_argument("--slots", type=int, default=8)
    p.add_argument("--seq", type=int, default=0, help="max_seq_len (0: the model's)")
    p.add_argument("--steps", type=int, default=4, help="decode_steps_per_call")
    p.add_argument("--cache-dir", help="the persistent compilation cache (default: none)")
    p.add_argument("--checkpoint", help="a converted checkpoint folder in place of --model's random weights")
    p.add_argument("--read-first", action="store_true",
                   help="with --checkpoint: read the weights, then compile (not side by side), for comparison")
    args = p.parse_args(argv)

    import jax

    from gptjax import compile_cache

    if args.cache_dir:
        compile_cache.enable(args.cache_dir)
    else:
        compile_cache.disable()
    phases = PhaseTimes()
    jax.monitoring.register_event_duration_secs_listener(phases)
    imported = time.perf_counter()

    from gptjax.config import EngineConfig
    from gptjax.engine import Engine
    from serving.config import SchedulerConfig
    from serving.scheduler import Scheduler

    ec = EngineConfig(max_slots=args.slots, max_seq_len=args.seq)
    if args.checkpoint:
        if args.read_first:
            from gptjax import engine as engine_module

            engine_module.restore_in_background = lambda restore: restore()
        engine = Engine.load(args.checkpoint, dtype=args.dtype, engine_config=ec)
    else:
        engine = Engine.from_preset(args.model, dtype=args.dtype, engine_config=ec)
        jax.block_until_ready(engine.params)
    built = time.perf_counter()
    scheduler = Scheduler(engine, SchedulerConfig(decode_steps_per_call=args.steps))
    before = dict(phases.seconds)
    scheduler.warmup()
    compiled = time.perf_counter()
    jax.block_until_ready(engine.params)  # a checkpoint read beside the warm-up is waited for here, as serve does
    warmed = time.perf_counter()
    warmup_phases = {k: round(v - before.get(k, 0.0), 3) for k, v in phases.seconds.items()}
    print(json.dumps({
        "model": args.checkpoint or args.model, "read_first": args.read_first, "slots": args.slots,
        "seq": engine.max_seq_len, "device": jax.devices()[0].device_kind,
        "cache": bool(args.cache_dir), "import_s": round(imported - START, 3), "engine_s": round(built - imported, 3),
        "warmup_s": round(compiled - built, 3), "weights_wait_s": round(warmed - compiled, 3),
        "total_s": round(warmed - START, 3),
        "programs_compiled_or_read": phases.counts["compile_or_read_s"], "cache_hits": compile_cache.hits(),
        "traces": phases.counts["trace_s"], "warmup_phase_sums": warmup_phases}))


if __name__ == "__main__":
    main()
