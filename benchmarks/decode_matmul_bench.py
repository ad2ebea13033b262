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


def tail_operands(key, rows: int, hidden: int, ffn: int, dtype):
    """Random operands of `decode_tail` in its argument order: attention output, a residual stream with a
    large mean (as a real one has), weights scaled to keep activations O(1), biases and a LayerNorm near 1."""
    import jax

    ks = jax.random.split(key, 10)

    def normal(i, shape, scale=1.0):
        return (scale * jax.random.normal(ks[i], shape)).astype(dtype)
    return (normal(0, (rows, hidden)), 3 + jax.random.normal(ks[1], (rows, hidden)),
            normal(2, (hidden, hidden), hidden ** -0.5), normal(3, (hidden,), 0.1),
            (1 + 0.1 * jax.random.normal(ks[4], (hidden,))).astype(dtype), normal(5, (hidden,), 0.1),
            normal(6, (hidden, ffn), hidden ** -0.5), normal(7, (ffn,), 0.1),
            normal(8, (ffn, hidden), ffn ** -0.5), normal(9, (hidden,), 0.1))


def float64_tail(attn, x, w_o, b_o, scale, shift, w_i, b_i, w_m, b_m, eps=1e-5) -> np.ndarray:
    """What `decode_tail` computes, in float64 numpy, with the tanh GELU (gelu_new): an independent reference.
    The MLP's input and hidden activations are rounded to the weights' dtype, as both implementations do."""
    import jax.numpy as jnp

    def f64(a):
        return np.asarray(jnp.asarray(a, jnp.float32), np.float64)

    def rounded(a):
        return f64(jnp.asarray(a, jnp.float32).astype(w_i.dtype))
    h = f64(x) + f64(b_o) + f64(attn) @ f64(w_o)
    mean, var = h.mean(-1, keepdims=True), h.var(-1, keepdims=True)
    u = rounded((h - mean) / np.sqrt(var + eps) * f64(scale) + f64(shift)) @ f64(w_i) + f64(b_i)
    g = rounded(0.5 * u * (1 + np.tanh(np.sqrt(2 / np.pi) * (u + 0.044715 * u ** 3))))
    return h + f64(b_m) + g @ f64(w_m)


def three_kernels(attn, x, w_o, b_o, scale, shift, w_i, b_i, w_m, b_m, *, sync, counters, interpret: bool):
    """The same layer tail as `decode_tail` on three `decode_matmul` kernels, as `gptjax.decode_block` runs it
    without the persistent kernel."""
    from gptjax.kernels.decode_matmul import decode_matmul

    mm = partial(decode_matmul, interpret=interpret)
    h, counters = mm(w_o, attn, bias=b_o, residual=x, counters=counters)
    g, counters = mm(w_i, h, scale, shift, bias=b_i, activation="gelu_new", out_dtype=w_i.dtype,
                     counters=counters)
    out, counters = mm(w_m, g, bias=b_m, residual=h, counters=counters)
    return out, sync, counters


TAIL_VARIANTS = {"no prefetch": dict(prefetch=False), "volatile spin": dict(spin="volatile"),
                 "4 warps": dict(num_warps=4), "16 warps": dict(num_warps=16), "barriers only": dict(work=False)}


def check_tail_phases(config, dtype, rows: int, interpret: bool):
    """Each phase's output of `decode_tail` (h, g, out) against float64, row by row: one JSON line per launch
    choice, so that an error on the GPU says which phase and which rows it is in."""
    import jax
    import jax.numpy as jnp

    from gptjax.kernels.decode_matmul import new_counters
    from gptjax.kernels.decode_tail import Options, decode_tail_buffers, new_sync

    ops = tail_operands(jax.random.PRNGKey(7), rows, config.hidden, config.ffn_hidden, dtype)
    attn, x, w_o, b_o, scale, shift, w_i, b_i, w_m, b_m = ops
    f64 = lambda a: np.asarray(jnp.asarray(a, jnp.float32), np.float64)  # noqa: E731
    want_h = f64(x) + f64(b_o) + f64(attn) @ f64(w_o)
    want_out = float64_tail(*ops)
    for name, options in {"default": {}, **TAIL_VARIANTS}.items():
        if not options.get("work", True):
            continue
        call = jax.jit(partial(decode_tail_buffers, interpret=interpret, options=Options(**options)))
        rel = lambda got, want: [round(float(np.linalg.norm(f64(got)[i] - want[i]) / np.linalg.norm(want[i])), 7)  # noqa: E731
                                 for i in range(rows)]
        sync, counters = new_sync(), new_counters(config.ffn_hidden)
        for launch in (1, 2):  # the second finds the barrier and the counters as the first left them
            try:
                out, h, g, sync, counters = call(*ops, sync=sync, counters=counters)
            except Exception as e:
                print(json.dumps(dict(check="tail phases", variant=name, error=str(e)[:300])), flush=True)
                break
            print(json.dumps(dict(check="tail phases", variant=name, launch=launch, rows=rows, h=rel(h, want_h),
                                  out=rel(out, want_out), g_nonfinite=int(np.sum(~np.isfinite(f64(g)))),
                                  sync=np.asarray(sync).tolist(), counters=int(np.abs(np.asarray(counters)).sum()))),
                  flush=True)


def time_tail(model: str, config, dtype, rows_list, interpret: bool):
    """The layer's products after attention: the persistent kernel (`decode_tail`) against the three kernels
    and XLA, COPIES layers' weights a call, one JSON line each, with the error against `float64_tail`."""
    import jax

    from gptjax.kernels.decode_matmul import new_counters
    from gptjax.kernels.decode_tail import decode_tail, decode_tail_reference, new_sync

    from gptjax.kernels.decode_tail import Options

    c, f = config.hidden, config.ffn_hidden
    weight_bytes = (c * c + 2 * c * f) * dtype.itemsize
    impls = {"xla": decode_tail_reference, "pallas": partial(three_kernels, interpret=interpret),
             "pallas-tail": partial(decode_tail, interpret=interpret)}
    if not interpret:  # the launch choices (`decode_tail.Options`), and the barriers alone (errors meaningless)
        for name, options in TAIL_VARIANTS.items():
            impls[f"pallas-tail({name})"] = partial(decode_tail, options=Options(**options))
    for rows in rows_list:
        sets = [tail_operands(jax.random.PRNGKey(1000 * rows + i), rows, c, f, dtype) for i in range(COPIES)]
        xla_gpu = None
        for name, fn in impls.items():
            def layers(sets, fn=fn):
                sync, counters, outs = new_sync(), new_counters(f), []
                for ops in sets:
                    out, sync, counters = fn(*ops, sync=sync, counters=counters)
                    outs.append(out)
                return outs
            call = jax.jit(layers)
            try:
                s, gpu = time_call(call, sets)
                got = call(sets[:2])  # two launches: the second finds the barrier as the first left it
                err = max(float(np.linalg.norm(np.asarray(o, np.float64) - want) / np.linalg.norm(want))
                          for o, want in zip(got, map(lambda ops: float64_tail(*ops), sets[:2])))
            except Exception as e:  # a kernel that does not compile: say so, go on
                print(json.dumps(dict(product="tail", rows=rows, impl=name, error=str(e)[:300])), flush=True)
                continue
            xla_gpu = xla_gpu or gpu
            print(json.dumps(dict(model=model, dtype=dtype.name, product="tail", rows=rows, impl=name,
                                  us=round(s * 1e6, 2), **gpu_fields(gpu, weight_bytes, None if name == "xla"
                                                                     else xla_gpu),
                                  rel_err=float(f"{err:.2e}"))), flush=True)


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
    p.add_argument("--tail", action="store_true",
                   help="time the products after attention as one persistent kernel against the three kernels")
    args = p.parse_args()

    import jax
    import jax.numpy as jnp

    from gptjax.config import preset
    from gptjax.kernels.decode_matmul import decode_matmul_reference

    config = preset(args.model)
    interpret = jax.default_backend() != "gpu"  # the Pallas interpreter: slow, but the same arithmetic
    dtype = jnp.dtype(args.dtype)
    if args.tail:
        for rows in map(int, args.rows.split(",")):
            check_tail_phases(config, dtype, rows, interpret)
        time_tail(args.model, config, dtype, list(map(int, args.rows.split(","))), interpret)
        return
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
