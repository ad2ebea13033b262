"""Where one `generate` call's time goes outside the device's kernels. One JSON line per shape.

    python -m benchmarks.call_probe --model megatron-345m --dtype float16 --shapes 8,512,16 1,128,128

Each part is timed alone, greedy, median of `--runs` after a warm-up:
- `generate_ms`: `engine.generate` as the seed's benchmark calls it (token-id lists in, texts out);
- `complete_ms`: `engine.complete`, the padded arrays in and host arrays out: generate's own Python (checks,
  padding, stop tokens, detokenizing) is the difference;
- `put_ms`: the call's host arrays sent, packed into one (`engine_api.pack_prompts`, as `complete` sends them)
  and waited for;
- `program_ms`: the compiled program on arrays already on the device, and its result fetched; `device_ms`: the
  time its kernels and copies kept the GPU busy (profiler); the difference is the program's launch, idle gaps
  and the fetch.
"""

from __future__ import annotations

import argparse
import functools
import json

import numpy as np


def _median_ms(fn, runs: int) -> float:
    from benchmarks.bench import median_seconds

    return round(median_seconds(fn, runs, warmup=2, label="") * 1e3, 3)


def probe(engine, batch: int, input_len: int, output_len: int, runs: int) -> dict:
    import jax

    from benchmarks.bench import random_prompts
    from benchmarks.gpu_time import gpu_busy_seconds
    from gptjax import distributed
    from gptjax.engine_api import SamplingArrays, pack_prompts
    from gptjax.planning import generate_cache_len
    from gptjax.sampling import SamplingParams

    prompts = random_prompts(batch, input_len, engine.config.vocab_size)
    rows = prompts.tolist()
    tokens = np.zeros((batch, engine.prefill_bucket(input_len)), np.int32)
    tokens[:, :input_len] = prompts
    lengths = np.full(batch, input_len, np.int32)
    params = [SamplingParams()] * batch
    cache_len = generate_cache_len(tokens.shape[1], output_len, engine.max_seq_len)  # as `complete` has it
    packed = pack_prompts(tokens, lengths, SamplingArrays.from_params(params))
    with jax.set_mesh(engine.mesh):
        on_device = engine._put(packed)

        def program(packed):
            return distributed.to_host(engine._generate_jit(engine.params, packed, output_len, cache_len, False))

        row = dict(batch=batch, input_len=input_len, output_len=output_len, runs=runs,
                   generate_ms=_median_ms(lambda: engine.generate(rows, max_new_tokens=output_len, greedy=True,
                                                                  stop_token_ids=[]), runs),
                   complete_ms=_median_ms(lambda: engine.complete(tokens, lengths, output_len, params), runs),
                   put_ms=_median_ms(lambda: jax.block_until_ready(engine._put(packed)), runs),
                   program_ms=_median_ms(functools.partial(program, on_device), runs))
        busy = gpu_busy_seconds(program, on_device)
    if busy:
        row["device_ms"] = round(busy * 1e3, 3)
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="megatron-345m")
    p.add_argument("--dtype", default="float16")
    p.add_argument("--shapes", nargs="+", default=["8,512,16", "1,128,128"], help="batch,input_len,output_len")
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--no-compile-cache", action="store_true", help="compile every program here (by default they "
                                                                   "come from gptjax's compilation cache)")
    args = p.parse_args(argv)

    from gptjax import compile_cache
    from gptjax.engine import Engine

    if not args.no_compile_cache:
        compile_cache.enable()
    engine = Engine.from_preset(args.model, dtype=args.dtype)
    for shape in args.shapes:
        batch, input_len, output_len = map(int, shape.split(","))
        row = probe(engine, batch, input_len, output_len, args.runs)
        print(json.dumps(dict(model=args.model, dtype=args.dtype, **row)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
