"""The decode step's products, our kernel against XLA, at a model's shapes: one JSON line per (shape, rows, variant).

    python -m benchmarks.decode_matmul_bench --model megatron-345m --dtype float16 --rows 1,8,64 [--sweep]

Each product runs as the decode path runs it, with its prologue (LayerNorm, GELU, the residual's partial sums);
the XLA peer is the same arithmetic in `jnp` (`decode_matmul_reference`), compiled by XLA. A timed call runs the
product on COPIES different weight matrices one after the other, so no weight is read from L2. Two times per
product: `us`, the call's wall-clock median over the copies (host dispatch and launch gaps included), and
`gpu_us`, the kernels' own time in a profiler trace of one call (every kernel of the call, so XLA's
prologue fusions count with its matmul). GB/s counts the weight bytes (the activations are a few KB). `--sweep` also times the block sizes and split counts around the
default. The relative error is against a float64 product of the same rounded inputs.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

COPIES = 24


def products(config):
    """(name, K, N, prologue, the (K, N) of the product whose parts it reads) of one layer's products, as
    `gptjax.decode_block` runs them."""
    c, f = config.hidden, config.ffn_hidden
    return [("ln_qkv", c, 3 * c, "ln", None), ("attn_out", c, c, "", None), ("ln_mlp_in", c, f, "ln", None),
            ("gelu_mlp_out", f, c, "gelu", (c, f))]


def operands(key, rows, k, n, prologue, dtype, copies, n_parts: int = 2):
    import jax
    import jax.numpy as jnp

    ks = jax.random.split(key, 6)
    ws = [(jax.random.normal(jax.random.fold_in(ks[0], i), (k, n), jnp.float32) / np.sqrt(k)).astype(dtype)
          for i in range(copies)]
    kw = {}
    if prologue == "ln":
        kw = dict(x=jax.random.normal(ks[1], (rows, k)), ln_scale=1 + 0.1 * jax.random.normal(ks[4], (k,)),
                  ln_bias=0.1 * jax.random.normal(ks[5], (k,)))
    elif prologue == "gelu":
        kw = dict(parts=jax.random.normal(ks[2], (rows, n_parts * k)), x_bias=jax.random.normal(ks[3], (k,)),
                  activation="gelu_new")
    else:
        kw = dict(x=jax.random.normal(ks[1], (rows, k)).astype(dtype))
    return ws, kw


def time_call(fn, ws, reps: int = 20) -> tuple[float, float]:
    """(wall seconds, GPU busy seconds) per product: medians of `reps` calls, and one profiled call's kernel
    time (every kernel the call ran, so XLA's prologue fusions count with its matmul)."""
    import jax

    jax.block_until_ready(fn(ws))
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(fn(ws))
        times.append(time.perf_counter() - start)
    busy = gpu_busy_seconds(fn, ws)
    return float(np.median(times)) / len(ws), busy and busy / len(ws)


def gpu_busy_seconds(fn, ws) -> float:
    """The summed duration of the GPU kernels of one call of fn, from a profiler trace (None off a GPU)."""
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
    total_ns = sum(ev.duration_ns for plane in data.planes if plane.name.startswith("/device:GPU")
                   for line in plane.lines if "stream" in line.name.lower() for ev in line.events)
    return total_ns / 1e9


def gpu_fields(busy, weight_bytes: int, xla_busy=None) -> dict:
    if not busy:
        return {}
    fields = dict(gpu_us=round(busy * 1e6, 2), gpu_gb_s=round(weight_bytes / busy / 1e9, 1))
    return dict(fields, gpu_vs_xla=round(xla_busy / busy, 2)) if xla_busy else fields


def float64_product(w, kw) -> np.ndarray:
    """What `decode_matmul(w, **kw)` computes, summed, in float64 numpy: an independent reference (the
    prologue's output rounded to the weights' dtype, as both implementations round it)."""
    import jax.numpy as jnp

    f64 = {name: np.asarray(jnp.asarray(v, jnp.float32), np.float64) for name, v in kw.items() if hasattr(v, "shape")}
    w64 = np.asarray(jnp.asarray(w, jnp.float32), np.float64)
    v = f64.get("x", 0.0)
    if "parts" in f64:
        v = v + f64["parts"].reshape(f64["parts"].shape[0], -1, w64.shape[0]).sum(1)
    v = v + f64.get("x_bias", 0.0)
    if "ln_scale" in f64:
        mean = v.mean(-1, keepdims=True)
        v = (v - mean) / np.sqrt(((v - mean) ** 2).mean(-1, keepdims=True) + 1e-5) * f64["ln_scale"] + f64["ln_bias"]
    if kw.get("activation") == "gelu_new":
        v = 0.5 * v * (1 + np.tanh(np.sqrt(2 / np.pi) * (v + 0.044715 * v ** 3)))
    elif kw.get("activation") == "gelu":
        from scipy.special import erf

        v = 0.5 * v * (1 + erf(v / np.sqrt(2)))
    v = np.asarray(jnp.asarray(v, jnp.float32).astype(w.dtype).astype(jnp.float32), np.float64)
    return v @ w64


def rel_err(out, w, kw, n) -> float:
    from gptjax.kernels.decode_matmul import sum_parts

    ref = float64_product(w, kw)
    got = np.asarray(sum_parts(out, n), np.float64)
    return float(np.linalg.norm(got - ref) / np.linalg.norm(ref))


def variants(rows, k, n, sweep: bool):
    from gptjax.kernels.decode_matmul import MatmulParams, default_params

    base = default_params(rows, k, n)
    out = [base]
    if sweep:
        for block_n in (32, 64, 128):
            for splits in (1, 2, 4, 8, 16):
                programs = n // block_n * splits
                if n % block_n or k % (splits * 64) or not 48 <= programs <= 1024:
                    continue
                p = MatmulParams(block_n, min(base.block_k, k // splits), splits, 4, 3)
                if p not in out:
                    out.append(p)
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="megatron-345m")
    p.add_argument("--dtype", default="float16")
    p.add_argument("--rows", default="1,8,64")
    p.add_argument("--sweep", action="store_true")
    args = p.parse_args()

    import jax
    import jax.numpy as jnp

    from gptjax.config import preset
    from gptjax.kernels.decode_matmul import decode_matmul, decode_matmul_reference, default_params

    config = preset(args.model)
    interpret = jax.default_backend() != "gpu"  # the Pallas interpreter: slow, but the same arithmetic
    dtype = jnp.dtype(args.dtype)
    for name, k, n, prologue, producer in products(config):
        for rows in map(int, args.rows.split(",")):
            n_parts = default_params(rows, *producer).splits if producer else 0
            ws, kw = operands(jax.random.PRNGKey(rows), rows, k, n, prologue, dtype, COPIES, n_parts)
            weight_bytes = k * n * dtype.itemsize
            xla = jax.jit(lambda ws: [decode_matmul_reference(w, **kw) for w in ws])
            xla_s, xla_gpu = time_call(xla, ws)
            row = dict(model=args.model, dtype=args.dtype, product=name, k=k, n=n, rows=rows, impl="xla",
                       us=round(xla_s * 1e6, 2), **gpu_fields(xla_gpu, weight_bytes))
            print(json.dumps(row), flush=True)
            for params in variants(rows, k, n, args.sweep):
                ours = jax.jit(lambda ws, params=params: [decode_matmul(w, params=params, interpret=interpret, **kw)
                                                           for w in ws])
                try:
                    s, gpu = time_call(ours, ws)
                    err = rel_err(ours(ws)[0], ws[0], kw, n)
                except Exception as e:  # a variant Triton cannot compile (shared memory, say): say so, go on
                    print(json.dumps(dict(product=name, rows=rows, params=params._asdict(), error=str(e)[:200])))
                    continue
                print(json.dumps(dict(row, impl="pallas", params=params._asdict(), us=round(s * 1e6, 2),
                                      **gpu_fields(gpu, weight_bytes, xla_gpu), rel_err=float(f"{err:.2e}"))),
                      flush=True)


if __name__ == "__main__":
    main()
