"""How fast can a batch-256 decode step's products be? One JSON line per (product, form).

    python -m benchmarks.gemm_probe [--model megatron-345m] [--rows 256] [--only xla,mgpu_128x128_n]

At batch 256 XLA runs each of a 345M layer's four products as a Triton GEMM split over K (2, 4 and 8 ways: float32
partials, then a kernel that sums them with the bias): 8.3 us a GEMM on an H100, ~200 TFLOP/s, and ~5 us a sum
(RESULTS, run 27). The weights alone would take ~2 us a product at the copy rate. Forms, each timed by the device
time of `--copies` distinct weights' products in one call (more weight than the L2 holds):
- "xla": the product with its epilogue as the layer has it (`batch_matmul_reference`: + bias, then GELU after MLP in,
  + the residual after attention out and MLP out), compiled by XLA (its GEMM, split sums, bias, GELU, residual);
- "bm_{tm}x{tn}_s{stages}_d{delay}": the same by `gptjax.kernels.batch_matmul` (one Mosaic GPU kernel, tm x tn a
  CTA, `stages` K tiles in flight, `delay` wgmma products left running);
- "xla_f32": `jnp.dot(..., preferred_element_type=float32)`, the bare product;
- "xla_split{s}": the product split over K by hand into `s` float32 parts (one batched dot over the reshaped
  weights), then their sum with the epilogue: what a decode layer pays if a kernel of its own is to take the parts;
- "mgpu_{tm}x{tn}_{m|n}": JAX's Hopper Mosaic GPU matmul (`jax.experimental.pallas.ops.gpu.hopper_matmul_mgpu`,
  warp-specialized, TMA loads, wgmma) with tiles tm x tn a warpgroup, its two warpgroups side by side along M or N:
  whole output tiles, no split over K, no bias; "_cm" / "_cn": CTAs in clusters of two along M / N, each loading
  half of the operand they share and multicasting it to both (the L2 reads it once for two CTAs). Off a Hopper GPU
  these report an error line.
Every output is checked against float64.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json

import numpy as np

COPIES = 8
TILES = ((64, 64), (64, 128), (128, 64), (128, 128), (64, 256))
# batch_matmul's launches: (tile_m, tile_n, stages, delay)
BATCH_TILES = ((64, 64, 4, 0), (64, 64, 4, 1), (64, 64, 6, 1), (64, 64, 6, 2), (64, 128, 4, 0), (64, 128, 4, 1),
               (128, 64, 4, 1), (128, 128, 4, 1), (64, 32, 6, 1), (64, 32, 8, 2))
SPLITS_BY_HAND = (2, 4, 8, 16)
EPILOGUES = {"qkv": ("", False), "attn_out": ("", True), "mlp_in": ("gelu_new", False), "mlp_out": ("", True)}


def shapes_of(config) -> dict[str, tuple[int, int]]:
    c, f = config.hidden, config.ffn_hidden
    return {"qkv": (c, 3 * c), "attn_out": (c, c), "mlp_in": (c, f), "mlp_out": (f, c)}


def forms(rows: int, k: int, n: int, product: str = "qkv") -> dict:
    """{form: fn(x [rows, k], ws [(w [k, n], b [n], residual [rows, n])...]) -> [out [rows, n]]}"""
    import jax
    import jax.numpy as jnp

    from gptjax.kernels.batch_matmul import batch_matmul, batch_matmul_reference, supports

    activation, residual = EPILOGUES[product]

    def epilogue(fn, **launch):
        return jax.jit(lambda x, ws: [fn(x, w, b, r if residual else None, activation=activation, **launch)
                                      for w, b, r in ws])

    def split_by_hand(x, w, b, residual, *, activation: str, splits: int):
        parts = jnp.einsum("rsk,skn->srn", x.reshape(rows, splits, k // splits), w.reshape(splits, k // splits, n),
                           preferred_element_type=jnp.float32)
        y = parts.sum(0) + b.astype(jnp.float32)
        y = jax.nn.gelu(y, approximate=True) if activation else y
        return (y + residual.astype(jnp.float32)).astype(x.dtype) if residual is not None else y.astype(x.dtype)

    out = {
        "xla": epilogue(batch_matmul_reference),
        **{f"xla_split{s}": epilogue(split_by_hand, splits=s) for s in SPLITS_BY_HAND if k % s == 0},
        "xla_f32": jax.jit(lambda x, ws: [jnp.dot(x, w, preferred_element_type=jnp.float32) for w, _, _ in ws]),
        **{f"bm_{tm}x{tn}_s{st}_d{d}": epilogue(batch_matmul, tile_m=tm, tile_n=tn, stages=st, delay=d)
           for tm, tn, st, d in BATCH_TILES if supports(rows, k, n, tile_m=tm, tile_n=tn)},
    }
    try:
        from jax.experimental.pallas.ops.gpu import hopper_matmul_mgpu as hm
    except ImportError:
        return out
    dims = {"m": hm.MatmulDimension.M, "n": hm.MatmulDimension.N}
    for (tm, tn), side, cluster in itertools.product(TILES, dims, ("", *dims)):
        cta_m = tm * (2 if side == "m" else 1)
        cta_n = tn * (2 if side == "n" else 1)
        if rows % cta_m or n % cta_n or (cluster == "m" and rows // cta_m % 2) or (cluster == "n" and n // cta_n % 2):
            continue
        config = hm.TuningConfig(tile_m=tm, tile_n=tn, tile_k=64, max_concurrent_steps=4, epi_tile_m=64,
                                 epi_tile_n=64, wg_dimension=dims[side], cluster_dimension=dims.get(cluster))
        call = functools.partial(hm.matmul, config=config)
        out[f"mgpu_{tm}x{tn}_{side}" + (f"_c{cluster}" if cluster else "")] = jax.jit(
            lambda x, ws, call=call: [call(x, w, None) for w, _, _ in ws])
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="megatron-345m")
    p.add_argument("--dtype", default="float16")
    p.add_argument("--rows", default="256")
    p.add_argument("--copies", type=int, default=COPIES)
    p.add_argument("--only", default="", help="comma-separated forms (default: every one)")
    args = p.parse_args(argv)
    only = set(filter(None, args.only.split(",")))

    import jax
    import jax.numpy as jnp

    from benchmarks.gpu_time import gpu_busy_seconds
    from gptjax.config import preset

    dtype = jnp.dtype(args.dtype)
    key = jax.random.PRNGKey(0)
    for rows in map(int, args.rows.split(",")):
        for product, (k, n) in shapes_of(preset(args.model)).items():
            key, kx, kw = jax.random.split(key, 3)
            x = jax.random.normal(kx, (rows, k), jnp.float32).astype(dtype)
            ws = [((jax.random.normal(k1, (k, n), jnp.float32) / np.sqrt(k)).astype(dtype),
                   (0.1 * jax.random.normal(k2, (n,), jnp.float32)).astype(dtype),
                   jax.random.normal(k3, (rows, n), jnp.float32).astype(dtype))
                  for k1, k2, k3 in jax.random.split(kw, (args.copies, 3))]
            w0, b0, r0 = (np.asarray(a, np.float64) for a in ws[0])
            product64 = np.asarray(x, np.float64) @ w0
            activation, residual = EPILOGUES[product]
            with_epilogue = product64 + b0
            if activation:
                with_epilogue = 0.5 * with_epilogue * (1 + np.tanh(np.sqrt(2 / np.pi) * (
                    with_epilogue + 0.044715 * with_epilogue ** 3)))
            if residual:
                with_epilogue = with_epilogue + r0
            for name, fn in forms(rows, k, n, product).items():
                if only and name not in only:
                    continue
                row = dict(model=args.model, dtype=args.dtype, rows=rows, product=product, k=k, n=n, form=name)
                try:
                    got = np.asarray(fn(x, ws)[0], np.float64)
                    ref = product64 if name.startswith(("xla_f32", "mgpu_")) else with_epilogue
                    row["rel_err"] = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
                    for _ in range(3):
                        jax.block_until_ready(fn(x, ws))
                    busy = sorted(gpu_busy_seconds(functools.partial(fn, x), ws) or 0.0 for _ in range(3))[1]
                    if busy:
                        us = busy / args.copies * 1e6
                        row |= dict(gpu_us=round(us, 2), tflop_s=round(2 * rows * k * n / us / 1e6, 1),
                                    weight_gb_s=round(k * n * dtype.itemsize / us / 1e3, 1))
                except Exception as e:  # a form that fails to build or run is reported; the others still run
                    row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
