"""Per-token decode time of one preset under different ways of driving the decode loop.

    python benchmarks/step_probe.py --model megatron-345m --dtype float16 --batch 1

Prints one JSON line per variant: a device-side fori_loop of n steps per call, one step per call (host
loop), and k steps unrolled inside one program. XLA_FLAGS apply to the whole process.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="megatron-345m")
    p.add_argument("--dtype", default="float16")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--attention", default="xla")
    args = p.parse_args()

    import jax

    from gptjax import EngineConfig
    from gptjax.engine import Engine, SamplingArrays
    from gptjax.sampling import SamplingParams

    engine = Engine.from_preset(args.model, dtype=args.dtype,
                                engine_config=EngineConfig(max_slots=args.batch, max_seq_len=512,
                                                           attention=args.attention))
    state = engine.new_state()
    tokens = np.random.default_rng(0).integers(0, 50257, (args.batch, 128)).astype(np.int32)
    prefix = engine.prefill(tokens, np.full((args.batch,), 128, np.int32),
                            SamplingArrays.from_params([SamplingParams()] * args.batch))
    state = engine.insert(prefix, state, np.arange(args.batch))

    def unrolled(k):
        def run(params, state):
            outs = []
            for _ in range(k):
                state, t, _ = engine._decode_step(params, state)
                outs.append(t)
            return state, jax.numpy.stack(outs)
        return jax.jit(run, donate_argnums=(1,))

    results = {}
    for name, per_call, call in [
        ("fori_16", 16, lambda s: engine.generate_steps(s, 16)[0]),
        ("host_1", 1, lambda s: engine.generate_steps(s, 1)[0]),
        ("unrolled_4", 4, (lambda f: lambda s: f(engine.params, s)[0])(unrolled(4))),
        ("unrolled_8", 8, (lambda f: lambda s: f(engine.params, s)[0])(unrolled(8))),
    ]:
        start = time.perf_counter()
        state = call(state)
        jax.block_until_ready(state.tokens)
        compile_s = time.perf_counter() - start
        times = []
        for _ in range(5):
            # positions would run off the cache; start every timing from the same place
            state = state._replace(positions=jax.numpy.full_like(state.positions, 128))
            jax.block_until_ready(state.positions)
            start = time.perf_counter()
            for _ in range(args.steps // per_call):
                state = call(state)
            jax.block_until_ready(state.tokens)
            times.append((time.perf_counter() - start) / (args.steps // per_call * per_call))
        results[name] = round(float(np.median(times)) * 1e3, 4)
        print(json.dumps({"variant": name, "ms_per_token": results[name], "compile_s": round(compile_s, 1),
                          "model": args.model, "batch": args.batch,
                          "xla_flags": os.environ.get("XLA_FLAGS", "")}), flush=True)


if __name__ == "__main__":
    main()
