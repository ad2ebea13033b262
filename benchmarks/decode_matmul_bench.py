"""The decode step's products, our kernel against XLA, at a model's shapes: one JSON line per (shape, rows, variant).

    python -m benchmarks.decode_matmul_bench --model megatron-345m --dtype float16 --rows 1,8,64 [--sweep]

Each product runs as the decode path runs it, with its prologue and epilogue (LayerNorm, bias, GELU, residual,
the K/V write); the XLA peer is the same arithmetic in `jnp` (`decode_matmul_reference`), compiled by XLA. A
timed call runs the product on COPIES different weight matrices one after the other, so no weight is read from
L2. Two times per product: `us`, the call's wall-clock median over the copies (host dispatch and launch gaps
included), and `gpu_us`, the kernels' own time in a profiler trace of one call (every kernel of the call, so
XLA's LayerNorm, bias and scatter fusions count with its matmul). GB/s counts the weight bytes (the activations
are a few KB). `--sweep` also times the block sizes and split counts around the default. The relative error is
against a float64 product of the same rounded inputs.
"""

from __future__ import annotations

import argparse
import json
from functools import partial

import numpy as np

from benchmarks.gpu_time import gpu_busy_seconds, host_seconds

COPIES = 24


def products(config):
    """(name, K, N, epilogue) of one layer's products as `gptjax.decode_block` runs them: "qkv" (LayerNorm
    prologue, bias, the K/V write), "residual" (bias + residual), "gelu" (LayerNorm prologue, bias + GELU)."""
    c, f = config.hidden, config.ffn_hidden
    return [("ln_qkv", c, 3 * c, "qkv"), ("attn_out", c, c, "residual"), ("ln_mlp_in", c, f, "gelu"),
            ("mlp_out", f, c, "residual")]


CACHE_LEN = 16  # the K/V write's cache: short, so that copying it (the timed call does not donate it) is cheap


def operands(key, rows, k, n, kind, dtype, copies):
    """`copies` weight matrices [K, N] and the keyword arguments of one product of `kind` (see `products`),
    random (the LayerNorm's input with a large mean, as a residual stream has)."""
    import jax
    import jax.numpy as jnp

    ks = jax.random.split(key, 8)
    ws = [(jax.random.normal(jax.random.fold_in(ks[0], i), (k, n), jnp.float32) / np.sqrt(k)).astype(dtype)
          for i in range(copies)]
    kw = dict(bias=0.1 * jax.random.normal(ks[3], (n,)).astype(dtype))
    if kind in ("qkv", "gelu"):
        kw.update(x=3 + jax.random.normal(ks[1], (rows, k)), ln_scale=1 + 0.1 * jax.random.normal(ks[4], (k,)),
                  ln_bias=0.1 * jax.random.normal(ks[5], (k,)), out_dtype=dtype)
    else:
        kw.update(x=jax.random.normal(ks[1], (rows, k)).astype(dtype), residual=jax.random.normal(ks[2], (rows, n)))
    if kind == "gelu":
        kw.update(activation="gelu_new")
    if kind == "qkv":
        cache = jax.random.normal(ks[6], (rows, CACHE_LEN, n // 3)).astype(dtype)
        kw.update(kv=(cache, cache + 1, jax.random.randint(ks[7], (rows,), 0, CACHE_LEN)))
    return ws, kw


def run_all(matmul, ws, kw):
    """matmul(w, **kw) for every w; a K/V write hands its caches from one product to the next (in place)."""
    outs = []
    for w in ws:
        out = matmul(w, **kw)
        if "kv" in kw:
            out, k_cache, v_cache = out
            kw = dict(kw, kv=(k_cache, v_cache, kw["kv"][2]))
        outs.append(out)
    return outs


def time_call(fn, ws, reps: int = 20) -> tuple[float, float]:
    """(wall seconds, GPU busy seconds) per product: medians of `reps` calls, and one profiled call's kernel
    time (every kernel the call ran, so XLA's prologue fusions count with its matmul)."""
    busy = gpu_busy_seconds(fn, ws)
    return host_seconds(fn, ws, reps, warmup=1), busy and busy / len(ws)


def gpu_fields(busy, weight_bytes: int, xla_busy=None) -> dict:
    if not busy:
        return {}
    fields = dict(gpu_us=round(busy * 1e6, 2), gpu_gb_s=round(weight_bytes / busy / 1e9, 1))
    return dict(fields, gpu_vs_xla=round(xla_busy / busy, 2)) if xla_busy else fields


def float64_product(w, kw) -> np.ndarray:
    """What `decode_matmul(w, **kw)` computes, in float64 numpy, before the output's rounding and the K/V
    write: [rows, N]. An independent reference: the LayerNorm's output is rounded to the weights' dtype, as both
    implementations round it."""
    import jax.numpy as jnp

    def f64(a):
        return np.asarray(jnp.asarray(a, jnp.float32), np.float64)

    v = f64(kw["x"])
    if "ln_scale" in kw:
        mean = v.mean(-1, keepdims=True)
        v = (v - mean) / np.sqrt(((v - mean) ** 2).mean(-1, keepdims=True) + 1e-5) * f64(kw["ln_scale"])
        v = v + f64(kw["ln_bias"])
    v = f64(jnp.asarray(v, jnp.float32).astype(w.dtype))
    out = v @ f64(w) + f64(kw["bias"])
    if kw.get("activation") == "gelu_new":
        out = 0.5 * out * (1 + np.tanh(np.sqrt(2 / np.pi) * (out + 0.044715 * out ** 3)))
    return out + (f64(kw["residual"]) if "residual" in kw else 0.0)


def rel_err(out, w, kw) -> float:
    """The largest relative error of a product's results against `float64_product`: the output (Q alone for a
    K/V write) and the K and V rows it wrote."""
    ref = float64_product(w, kw)
    if "kv" not in kw:
        pairs = [(out, ref)]
    else:
        (q, k_cache, v_cache), hidden = out, ref.shape[1] // 3
        rows, pos = np.arange(ref.shape[0]), np.asarray(kw["kv"][2])
        pairs = [(q, ref[:, :hidden]), (np.asarray(k_cache, np.float32)[rows, pos], ref[:, hidden:2 * hidden]),
                 (np.asarray(v_cache, np.float32)[rows, pos], ref[:, 2 * hidden:])]
    return max(float(np.linalg.norm(np.asarray(got, np.float64) - want) / np.linalg.norm(want))
               for got, want in pairs)


def variants(rows, k, n, unit, ln: bool, sweep: bool):
    """The default launch parameters for n output columns (column blocks divide `unit`: with a K/V write the
    hidden size) and with `sweep` those around them: a loop over K tiles pipelined in 3 stages, and one tile per
    program (its whole K chunk loaded at once) with 4 or 8 warps."""
    from gptjax.kernels.decode_matmul import MatmulParams, default_params

    base = default_params(rows, k, n, unit, ln=ln)
    out = [base]
    if sweep:
        for block_n in (16, 32, 64, 128):
            for splits in (1, 2, 4, 8, 16):
                chunk, programs = k // splits, n // block_n * splits
                if unit % block_n or k % (splits * 64) or not 64 <= programs <= 1024:
                    continue
                options = [MatmulParams(block_n, min(128, chunk), splits, 4, 3)]
                if chunk * block_n * 2 <= 64 << 10:
                    options += [MatmulParams(block_n, chunk, splits, warps, 1) for warps in (4, 8)]
                out += [p for p in options if p not in out]
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
    from gptjax.kernels.decode_matmul import decode_matmul_reference

    config = preset(args.model)
    interpret = jax.default_backend() != "gpu"  # the Pallas interpreter: slow, but the same arithmetic
    dtype = jnp.dtype(args.dtype)
    for name, k, n, kind in products(config):
        for rows in map(int, args.rows.split(",")):
            ws, kw = operands(jax.random.PRNGKey(rows), rows, k, n, kind, dtype, COPIES)
            weight_bytes = k * n * dtype.itemsize
            xla = jax.jit(lambda ws: run_all(decode_matmul_reference, ws, kw))
            xla_s, xla_gpu = time_call(xla, ws)
            row = dict(model=args.model, dtype=args.dtype, product=name, k=k, n=n, rows=rows, impl="xla",
                       us=round(xla_s * 1e6, 2), **gpu_fields(xla_gpu, weight_bytes))
            print(json.dumps(row), flush=True)
            unit = n // 3 if kind == "qkv" else n
            time_variants(ws, kw, row, variants(rows, k, n, unit, kind != "residual", args.sweep),
                          weight_bytes=weight_bytes, xla_gpu=xla_gpu, interpret=interpret)


def time_variants(ws, kw, row: dict, params_list, *, weight_bytes: int, xla_gpu, interpret: bool):
    """One JSON line per launch-parameter set: the kernel's times beside XLA's and its error against float64."""
    import jax

    from gptjax.kernels.decode_matmul import decode_matmul

    for params in params_list:
        matmul = partial(decode_matmul, params=params, interpret=interpret)
        ours = jax.jit(lambda ws, matmul=matmul: run_all(matmul, ws, kw))
        try:
            s, gpu = time_call(ours, ws)
            err = rel_err(matmul(ws[0], **kw), ws[0], kw)
        except Exception as e:  # a variant Triton cannot compile (shared memory, say): say so, go on
            print(json.dumps(dict(product=row["product"], rows=row["rows"], impl="pallas", params=params._asdict(),
                                  error=str(e)[:200])))
            continue
        print(json.dumps(dict(row, impl="pallas", params=params._asdict(), us=round(s * 1e6, 2),
                              **gpu_fields(gpu, weight_bytes, xla_gpu), rel_err=float(f"{err:.2e}"))), flush=True)


if __name__ == "__main__":
    main()
