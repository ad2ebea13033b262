"""Whether one persistent Mosaic GPU kernel streams a decode layer's weights near the copy rate: the question a
whole-layer decode kernel stands on. One JSON line per (model's layer, rows, form).

    python -m benchmarks.stream_probe --model megatron-345m --dtype float16 --rows 1,8

The decode step's products read their weights at ~1 TB/s (RESULTS, "Decode matmuls": a Triton kernel's start,
first loads and split sums cost 3-4 us each against 1-2 us of bytes), and a persistent Triton kernel of one
program a multiprocessor read them at 600-750 GB/s (run 15). Here one CTA a multiprocessor streams 64-column
slabs of each weight matrix by TMA, `--stages` deep, and multiplies them with up to 8 rows on the matrix units
(the slab's columns as the wgmma's M, the rows as its N: no padding of the rows to 64). Forms timed, each over
`COPIES` layers' distinct weights (so none is read from L2):
- "layer": one launch per layer, its four products in turn with a grid-wide barrier between them (a global
  semaphore), as a whole-layer kernel would run its dependent phases;
- "product": the same kernel, one launch per product;
- "triton": the decode path's `decode_matmul` kernels (the default launch parameters), one launch per product;
- "xla": `x @ w` per product.
The products here have no LayerNorm, bias or epilogue, and every one reads the same input rows: the probe
measures streaming and synchronisation, not a layer's arithmetic. Each output is checked against float64.
"""

from __future__ import annotations

import argparse
import functools
import json

import numpy as np

COPIES = 24  # layers' distinct weights per timed call
SLAB = 64  # weight columns a wgmma takes (its M)
ROWS = 8  # rows padded to the wgmma's smallest N
NUM_SMS = 132


def _transforms(dtype):
    import jax.experimental.pallas.mosaic_gpu as plgpu
    import jax.numpy as jnp

    swizzle = 128
    elems = swizzle // jnp.dtype(dtype).itemsize
    return plgpu.TilingTransform((8, elems)), plgpu.SwizzleTransform(swizzle)


def _product(x_ref, w_ref, o_ref, *, tile_k: int, stages: int, sm, n_sm: int):
    """This CTA's slabs of o = (x @ w)^T: slab s, s + n_sm, ... of the 64-column slabs of w [K, N]; o [N, ROWS]."""
    import jax.experimental.pallas.mosaic_gpu as plgpu
    import jax.numpy as jnp
    from jax.experimental import pallas as pl

    k, n = w_ref.shape
    transforms = _transforms(w_ref.dtype)

    def with_rows(rows_smem, ready):
        plgpu.copy_gmem_to_smem(x_ref.at[:, pl.ds(0, k)], rows_smem, ready.at[0])
        plgpu.barrier_wait(ready.at[0])

        @pl.loop(sm, n // SLAB, step=n_sm)
        def _(slab):
            def with_acc(acc):
                def step(index, w_smem):
                    (kk,) = index
                    rows = plgpu.transpose_ref(rows_smem.at[:, pl.ds(kk * tile_k, tile_k)], (1, 0))
                    plgpu.wgmma(acc, plgpu.transpose_ref(w_smem, (1, 0)), rows)
                    plgpu.wgmma_wait(0)

                spec = plgpu.BlockSpec((tile_k, SLAB), lambda kk: (kk, 0), transforms=transforms)
                plgpu.emit_pipeline(step, grid=(k // tile_k,), in_specs=[spec], max_concurrent_steps=stages)(
                    w_ref.at[:, pl.ds(slab * SLAB, SLAB)])
                o_ref[pl.ds(slab * SLAB, SLAB), :] = acc[...]

            pl.run_scoped(with_acc, plgpu.ACC((SLAB, ROWS), jnp.float32))

    pl.run_scoped(with_rows, plgpu.SMEM((ROWS, k), w_ref.dtype, transforms=transforms),
                  plgpu.Barrier(num_barriers=1))


def streaming_call(shapes, dtype, *, barriers: bool, tile_k: int = 64, stages: int = 4, n_sm: int = NUM_SMS,
                   interpret: bool = False):
    """A kernel (x [ROWS, max K], w_1 .. w_p) -> (o_1 .. o_p), o_i = (x[:, :K_i] @ w_i)^T in float32, of the
    products of `shapes` [(K, N)] in turn; `barriers`: a grid-wide barrier after each but the last."""
    import jax
    import jax.experimental.pallas.mosaic_gpu as plgpu
    import jax.numpy as jnp
    from jax import lax
    from jax.experimental import pallas as pl

    def body(x_ref, *refs):
        w_refs, o_refs = refs[:len(shapes)], refs[len(shapes):]
        sm = lax.axis_index("sm")
        sem = pl.get_global(plgpu.SemaphoreType.REGULAR) if barriers else None
        for i, (w_ref, o_ref) in enumerate(zip(w_refs, o_refs)):
            _product(x_ref, w_ref, o_ref, tile_k=tile_k, stages=stages, sm=sm, n_sm=n_sm)
            if barriers and i + 1 < len(shapes):  # every CTA's products done before any starts the next
                plgpu.semaphore_signal(sem, 1, memory_scope="gpu")
                plgpu.semaphore_wait(sem, (i + 1) * n_sm, decrement=False, memory_scope="gpu")

    out_type = [jax.ShapeDtypeStruct((n, ROWS), jnp.float32) for _, n in shapes]
    return plgpu.kernel(body, out_type=out_type, grid=(n_sm,), grid_names=("sm",), interpret=interpret or None)


def layer_shapes(config) -> list[tuple[int, int]]:
    """A layer's four products (K, N): QKV, attention out, MLP in, MLP out."""
    c, f = config.hidden, config.ffn_hidden
    return [(c, 3 * c), (c, c), (c, f), (f, c)]


def rel_err(got, want) -> float:
    return float(np.linalg.norm(np.asarray(got, np.float64) - want) / np.linalg.norm(want))


def forms(shapes, dtype, rows: int, interpret: bool):
    """{form: fn(x, layers) -> [[o per product] per layer]}, every output [N, rows] in float32."""
    import jax
    import jax.numpy as jnp

    from gptjax.kernels.decode_matmul import decode_matmul

    layer = streaming_call(shapes, dtype, barriers=True, interpret=interpret)
    product = [streaming_call([shape], dtype, barriers=False, interpret=interpret) for shape in shapes]

    def padded(x):
        return jnp.pad(x, ((0, ROWS - rows), (0, 0)))

    return {
        "layer": jax.jit(lambda x, ws: [[o[:, :rows] for o in layer(padded(x), *w)] for w in ws]),
        "product": jax.jit(lambda x, ws: [[call(padded(x), wi)[0][:, :rows] for call, wi in zip(product, w)]
                                          for w in ws]),
        "triton": jax.jit(lambda x, ws: [[decode_matmul(wi, x[:, :wi.shape[0]], interpret=interpret).T for wi in w]
                                         for w in ws]),
        "xla": jax.jit(lambda x, ws: [[jnp.dot(x[:, :wi.shape[0]].astype(wi.dtype), wi,
                                               preferred_element_type=jnp.float32).T for wi in w] for w in ws]),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="megatron-345m")
    p.add_argument("--dtype", default="float16")
    p.add_argument("--rows", default="1,8")
    p.add_argument("--copies", type=int, default=COPIES, help="layers' distinct weights per timed call")
    args = p.parse_args(argv)

    import jax
    import jax.numpy as jnp

    from benchmarks.gpu_time import gpu_busy_seconds, host_seconds
    from gptjax.config import preset

    interpret = jax.default_backend() != "gpu"  # Mosaic GPU's interpreter: the arithmetic, not the speed
    dtype = jnp.dtype(args.dtype)
    shapes = layer_shapes(preset(args.model))
    keys = jax.random.split(jax.random.PRNGKey(0), args.copies * len(shapes) + 1)
    ws = [[(jax.random.normal(keys[i * len(shapes) + j], shape, jnp.float32) / np.sqrt(shape[0])).astype(dtype)
           for j, shape in enumerate(shapes)] for i in range(args.copies)]
    weight_bytes = sum(k * n for k, n in shapes) * dtype.itemsize * args.copies
    for rows in map(int, args.rows.split(",")):
        x = jax.random.normal(keys[-1], (rows, max(k for k, _ in shapes))).astype(dtype)
        want = [np.asarray(x[:, :k], np.float64) @ np.asarray(w, np.float64) for w, (k, _) in zip(ws[0], shapes)]
        for name, fn in forms(shapes, dtype, rows, interpret).items():
            row = dict(model=args.model, dtype=args.dtype, rows=rows, form=name, layers=args.copies)
            try:
                outs = fn(x, ws)
                row["rel_err"] = max(rel_err(o.T, w) for o, w in zip(outs[0], want))
                busy = gpu_busy_seconds(functools.partial(fn, x), ws)
                row["us_per_layer"] = round(host_seconds(functools.partial(fn, x), ws, 5, 1) * 1e6, 2)
                if busy:
                    row |= dict(gpu_us_per_layer=round(busy / args.copies * 1e6, 2),
                                gpu_gb_s=round(weight_bytes / busy / 1e9, 1))
            except Exception as e:  # a form that fails to build or run is reported, the others still run
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
