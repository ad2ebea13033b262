"""Whether one persistent Mosaic GPU kernel streams a decode layer's weights near the copy rate: the question a
whole-layer decode kernel stands on. One JSON line per (model's layer, rows, form).

    python -m benchmarks.stream_probe --model megatron-345m --dtype float16 --rows 1,8

The decode step's products read their weights at ~1 TB/s (RESULTS, "Decode matmuls": a Triton kernel's start,
first loads and split sums cost 3-4 us each against 1-2 us of bytes), and a persistent Triton kernel of one
program a multiprocessor read them at 600-750 GB/s (run 15). Here one CTA a multiprocessor streams 64-column
slabs of each weight matrix by TMA, `--stages` deep, and multiplies them with up to 8 rows on the matrix units
(the slab's columns as the wgmma's M, the rows as its N: no padding of the rows to 64). Forms timed, each over
`COPIES` layers' distinct weights (so none is read from L2):
- "layer": one launch per layer, its four products in turn with a grid-wide barrier between them
  (`_grid_barrier`), as a whole-layer kernel would run its dependent phases;
- "product": the same kernel, one launch per product;
- "layer_stream_k", "product_stream_k": the same two, with each product's (slab, K tile) steps dealt to the CTAs
  in equal runs (stream-K, `_product_stream_k`): a product of N / 64 slabs fills every multiprocessor, where
  one slab a CTA leaves most of them idle (16 of 132 for attention out and MLP out);
- "layer_stream_k_ws": the stream-K layer with its weight stream in a warpgroup of its own (`warp_specialized_call`):
  a producer loads every product's tiles in turn into a ring of `stages` slots, never waiting on the grid
  barriers (weights do not depend on the products before), while the consumer multiplies, adds and waits at
  the barriers: the next product's first tiles land during the barrier rather than after it;
- "layer_stream_k_ws_free": the same without the barriers between products (the probe's products do not
  depend on each other, so its outputs still check): what the barriers cost;
- "ws_loads_only": the same stream with nothing multiplied (each tile waited for and released; outputs not
  checked): the ceiling of this producer and ring;
- "..._tiled" of the last two: the weights laid out tile by tile (`tiled_weights`, as a loader could store
  them), so that each TMA copy reads 8 KB in one run rather than 64 runs of 128 bytes;
- "layers_N_stream_k_ws" (a barrier after every product) and "ws_loads_only_N_layers" (none): N layers'
  products in one launch, as a kernel for a whole decode step would run them;
- "layers_N_stream_k_ws_2_barriers": a barrier after every second product only (after attention out and MLP
  out, where a LayerNorm needs the whole residual): what a whole-step kernel would pay if the QKV -> attention
  -> attention out and MLP in -> MLP out dependencies stayed inside each CTA (a head's, a slab's);
- "ws_loads_only_N_layers_barriers": the loads alone with a barrier after every product; "grid_barriers_only":
  a launch of as many grid barriers as the layers' products and nothing else. With the forms above, they
  split a barrier's cost into its own and what it does to the stream;
- "..._deferred" of the multiplying ws forms: each tile's wgmma waited for one step late (`_deferred_steps`);
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
LOADS_ONLY = "ws_loads_only"
BARRIERS_ONLY = "grid_barriers_only"
UNCHECKED = (LOADS_ONLY, BARRIERS_ONLY)  # the forms (name prefixes) that multiply nothing: outputs not checked
LAYERS_PER_LAUNCH = (4, 24)  # the "layers_N" forms: N layers' products in one launch (COPIES a multiple of N)
TILED = "_tiled"  # forms taking the weights as `tiled_weights` lays them out (done before timing)


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


def _product_stream_k(x_ref, w_ref, o_ref, *, tile_k: int, stages: int, sm, n_sm: int):
    """Stream-K: the product's steps, K tile by K tile and slab after slab, dealt to the CTAs in runs of
    ceil(steps / n_sm); a CTA adds its partial sum into o (zero beforehand) atomically where a slab or its run
    ends, so every multiprocessor streams whatever the number of slabs. o [N, ROWS] += (x @ w)^T."""
    import jax.experimental.pallas.mosaic_gpu as plgpu
    import jax.numpy as jnp
    from jax.experimental import pallas as pl

    k = w_ref.shape[0]
    k_tiles, total, run, first = _run_of(w_ref.shape, tile_k, sm, n_sm)
    transforms = _transforms(w_ref.dtype)

    def tile(i):
        return stream_k_step(first, i, run, k_tiles, total)[:2]

    def with_rows(rows_smem, ready):
        plgpu.copy_gmem_to_smem(x_ref.at[:, pl.ds(0, k)], rows_smem, ready.at[0])
        plgpu.barrier_wait(ready.at[0])

        def with_acc(acc):
            def step(index, w_smem, flushed):
                (i,) = index
                kk, slab, flush = stream_k_step(first, i, run, k_tiles, total)
                rows = plgpu.transpose_ref(rows_smem.at[:, pl.ds(kk * tile_k, tile_k)], (1, 0))
                plgpu.wgmma(acc, plgpu.transpose_ref(w_smem, (1, 0)), rows)
                return _flush(o_ref, slab, flush, acc[...], flushed)  # acc[...] waits for the wgmma

            spec = plgpu.BlockSpec((tile_k, SLAB), lambda i: tile(i), transforms=transforms)
            plgpu.emit_pipeline(step, grid=(run,), in_specs=[spec], max_concurrent_steps=stages,
                                init_carry=acc[...])(w_ref)

        pl.when(first < total)(lambda: pl.run_scoped(with_acc, plgpu.ACC((SLAB, ROWS), jnp.float32)))

    pl.run_scoped(with_rows, plgpu.SMEM((ROWS, k), w_ref.dtype, transforms=transforms),
                  plgpu.Barrier(num_barriers=1))


def _flush(o_ref, slab, flush, total_so_far, flushed):
    """Where a slab or the run ends (`flush`), add the slab's sum into o -> the sum added so far. The
    accumulator runs on over the slabs, so what was added before is taken off (one register tile, no store to
    the accumulator)."""
    import jax.experimental.pallas.mosaic_gpu as plgpu
    from jax import lax
    from jax.experimental import pallas as pl

    pl.when(flush)(lambda: plgpu.atomic_add(o_ref.at[pl.ds(slab * SLAB, SLAB), :], total_so_far - flushed))
    # a branch, not a select: Mosaic GPU's warpgroup lowering does not broadcast a scalar predicate
    return lax.cond(flush, lambda: total_so_far, lambda: flushed)


def stream_k_step(first, i, run: int, k_tiles: int, total: int):
    """(K tile, slab, whether to add the sum into o) of step i of the CTA whose run starts at step `first`; a
    step past the product's last repeats the last tile and adds nothing (its load is wasted, its sum unused)."""
    import jax.numpy as jnp

    t = jnp.minimum(first + i, total - 1)
    kk = t % k_tiles
    return kk, t // k_tiles, (first + i < total) & ((kk == k_tiles - 1) | (i == run - 1))


def _zero(o_ref, *, sm, n_sm: int):
    """This CTA's share of o's slabs set to zero (stores of a fresh accumulator: its layout's own store)."""
    import jax.experimental.pallas.mosaic_gpu as plgpu
    import jax.numpy as jnp
    from jax.experimental import pallas as pl

    def with_acc(acc):
        @pl.loop(sm, o_ref.shape[0] // SLAB, step=n_sm)
        def _(slab):
            o_ref[pl.ds(slab * SLAB, SLAB), :] = acc[...]

    pl.run_scoped(with_acc, plgpu.ACC((SLAB, ROWS), jnp.float32))


def _grid_barrier(sem, n: int, n_sm: int):
    """The grid's n-th barrier (from 1): every CTA gets here before any goes on (all n_sm CTAs are resident, one
    a multiprocessor). The semaphore counts arrivals and is never taken down: Pallas zeroes a kernel's global
    semaphores at each call (an aliased scratch input), so barrier n waits for n x n_sm."""
    import jax.experimental.pallas.mosaic_gpu as plgpu

    plgpu.semaphore_signal(sem, 1, memory_scope="gpu")
    plgpu.semaphore_wait(sem, n * n_sm, decrement=False, memory_scope="gpu")


def _run_of(shape, tile_k: int, sm, n_sm: int):
    """A stream-K product's deal for this CTA: (K tiles a slab, steps in all, steps a CTA, this CTA's first)."""
    from jax.experimental import pallas as pl

    k, n = shape
    k_tiles = k // tile_k
    total = k_tiles * (n // SLAB)
    run = pl.cdiv(total, n_sm)
    return k_tiles, total, run, sm * run


def tiled_weights(w, tile_k: int):
    """w [K, N] with each (K tile, slab) tile made one contiguous run of bytes, slab after slab: rows
    (slab * K / tile_k + kk) * tile_k onwards of the [K * N / SLAB, SLAB] result hold w's tile (kk, slab). A
    tile of w itself is tile_k runs of SLAB * itemsize (128) bytes, one per row of w."""
    k, n = w.shape
    return w.reshape(k // tile_k, tile_k, n // SLAB, SLAB).transpose(2, 0, 1, 3).reshape(k * n // SLAB, SLAB)


def _stream_weights(w_refs, shapes, ring, ready, free, *, tile_k: int, stages: int, sm, n_sm: int,
                    tiled: bool = False):
    """The producer: every product's tiles of this CTA's runs, in turn, into the ring (a slot reused once the
    consumer has released it), with no regard for the consumer's grid barriers. `tiled`: the weights come as
    `tiled_weights` lays them out."""
    import jax.experimental.pallas.mosaic_gpu as plgpu
    import jax.numpy as jnp
    from jax import lax
    from jax.experimental import pallas as pl

    base = 0
    for shape, w_ref in zip(shapes, w_refs):
        k_tiles, total, run, first = _run_of(shape, tile_k, sm, n_sm)

        @pl.loop(0, run)
        def _(i, base=base, k_tiles=k_tiles, total=total, run=run, first=first, w_ref=w_ref):
            n = base + i
            slot = lax.rem(n, jnp.int32(stages))
            pl.when(n >= stages)(functools.partial(plgpu.barrier_wait, free.at[slot]))
            kk, slab, _ = stream_k_step(first, i, run, k_tiles, total)
            tile = (w_ref.at[pl.ds((slab * k_tiles + kk) * tile_k, tile_k), :] if tiled
                    else w_ref.at[pl.ds(kk * tile_k, tile_k), pl.ds(slab * SLAB, SLAB)])
            plgpu.copy_gmem_to_smem(tile, ring.at[slot], ready.at[slot])
        base += run


def _consume_weights(x_ref, o_refs, shapes, rows_smem, rows_ready, ring, ready, free, *, tile_k: int, stages: int,
                     sm, n_sm: int, barrier_every: int = 1, multiply: bool = True, deferred: bool = False):
    """The consumer: the rows into shared memory and the outputs zeroed (one grid barrier), then each product's
    steps from the ring, its sums added into o where a slab or the run ends, a grid barrier after every
    `barrier_every`-th product but the last (none for 0). Without `multiply` each tile is only waited for and
    released: o stays zero, and the time is the producer's stream alone. `deferred`: each tile's wgmma is
    waited for one step later (`_deferred_steps`), so that the next tile's wait and issue overlap it."""
    import jax.experimental.pallas.mosaic_gpu as plgpu
    import jax.numpy as jnp
    from jax import lax
    from jax.experimental import pallas as pl

    plgpu.copy_gmem_to_smem(x_ref.at[:, pl.ds(0, rows_smem.shape[1])], rows_smem, rows_ready.at[0])
    sem = pl.get_global(plgpu.SemaphoreType.REGULAR)
    for o_ref in o_refs:
        _zero(o_ref, sm=sm, n_sm=n_sm)
    _grid_barrier(sem, 1, n_sm)
    plgpu.barrier_wait(rows_ready.at[0])
    base = 0
    for p, (shape, o_ref) in enumerate(zip(shapes, o_refs)):
        k_tiles, total, run, first = _run_of(shape, tile_k, sm, n_sm)

        def step(i, carry, base=base, k_tiles=k_tiles, total=total, run=run, first=first, o_ref=o_ref):
            acc, flushed = carry
            n = base + i
            slot = lax.rem(n, jnp.int32(stages))
            kk, slab, flush = stream_k_step(first, i, run, k_tiles, total)
            rows = plgpu.transpose_ref(rows_smem.at[:, pl.ds(kk * tile_k, tile_k)], (1, 0))
            plgpu.barrier_wait(ready.at[slot])
            if not multiply:
                plgpu.barrier_arrive(free.at[slot])
                return carry

            def multiply_tile(acc_ref):
                plgpu.wgmma(acc_ref, plgpu.transpose_ref(ring.at[slot], (1, 0)), rows)

            acc = pl.run_state(multiply_tile)(plgpu.ACC.init(acc))  # read back: the slot is free after this
            plgpu.barrier_arrive(free.at[slot])
            return acc, _flush(o_ref, slab, flush, acc, flushed)

        zero = plgpu.layout_cast(jnp.zeros((SLAB, ROWS), jnp.float32), plgpu.Layout.WGMMA)
        if deferred:
            pl.run_scoped(functools.partial(_deferred_steps, o_ref, rows_smem, ring, ready, free, base=base,
                                            k_tiles=k_tiles, total=total, run=run, first=first, tile_k=tile_k,
                                            stages=stages),
                          plgpu.ACC((SLAB, ROWS), jnp.float32))
        else:
            lax.fori_loop(0, run, step, (zero, zero))
        base += run
        if barrier_every and (p + 1) % barrier_every == 0 and p + 1 < len(shapes):
            _grid_barrier(sem, (p + 1) // barrier_every + 1, n_sm)


def _deferred_steps(o_ref, rows_smem, ring, ready, free, acc_ref, *, base, k_tiles: int, total: int, run: int,
                    first, tile_k: int, stages: int):
    """One product's steps with each wgmma waited for a step late: step i issues its tile's wgmma into the
    accumulator, then waits until one is left in flight (step i - 1's) and frees that step's slot; the sum is
    read (which waits for every wgmma) only where a slab or the run ends. Each slot is freed once, the last
    after the loop."""
    import jax.experimental.pallas.mosaic_gpu as plgpu
    import jax.numpy as jnp
    from jax import lax
    from jax.experimental import pallas as pl

    def step(i, flushed):
        n = base + i
        slot = lax.rem(n, jnp.int32(stages))
        kk, slab, flush = stream_k_step(first, i, run, k_tiles, total)
        rows = plgpu.transpose_ref(rows_smem.at[:, pl.ds(kk * tile_k, tile_k)], (1, 0))
        plgpu.barrier_wait(ready.at[slot])
        plgpu.wgmma(acc_ref, plgpu.transpose_ref(ring.at[slot], (1, 0)), rows)
        plgpu.wgmma_wait(1)
        pl.when(i > 0)(lambda: plgpu.barrier_arrive(free.at[lax.rem(n - 1, jnp.int32(stages))]))

        def add_into_o():
            so_far = acc_ref[...]
            plgpu.atomic_add(o_ref.at[pl.ds(slab * SLAB, SLAB), :], so_far - flushed)
            return so_far

        return lax.cond(flush, add_into_o, lambda: flushed)

    zero = plgpu.layout_cast(jnp.zeros((SLAB, ROWS), jnp.float32), plgpu.Layout.WGMMA)
    lax.fori_loop(0, run, step, zero)
    plgpu.wgmma_wait(0)
    plgpu.barrier_arrive(free.at[lax.rem(jnp.int32(base + run - 1), jnp.int32(stages))])


def warp_specialized_call(shapes, dtype, *, tile_k: int = 64, stages: int = 8, n_sm: int = NUM_SMS,
                          barrier_every: int = 1, multiply: bool = True, tiled: bool = False,
                          deferred: bool = False):
    """The stream-K layer of `streaming_call` (x, w_1 .. w_p) -> (o_1 .. o_p), with a producer warpgroup
    streaming the weights (`_stream_weights`, `tiled` as there) and a consumer warpgroup doing the rest
    (`_consume_weights`; `barrier_every`, `multiply` and `deferred` as there)."""
    import jax
    import jax.experimental.pallas.mosaic_gpu as plgpu
    import jax.numpy as jnp
    from jax import lax
    from jax.experimental import pallas as pl

    p = len(shapes)
    max_k = max(k for k, _ in shapes)
    transforms = _transforms(dtype)

    def body(x_ref, *refs):
        w_refs, o_refs = refs[:p], refs[p:2 * p]
        rows_smem, ring, rows_ready, ready, free = refs[2 * p:]
        sm, wg = lax.axis_index("sm"), lax.axis_index("wg")
        common = dict(tile_k=tile_k, stages=stages, sm=sm, n_sm=n_sm)
        pl.when(wg == 0)(lambda: _consume_weights(x_ref, o_refs, shapes, rows_smem, rows_ready, ring, ready, free,
                                                  barrier_every=barrier_every, multiply=multiply, deferred=deferred,
                                                  **common))
        pl.when(wg == 1)(lambda: _stream_weights(w_refs, shapes, ring, ready, free, tiled=tiled, **common))

    scratch = [plgpu.SMEM((ROWS, max_k), dtype, transforms=transforms),
               plgpu.SMEM((stages, tile_k, SLAB), dtype, transforms=transforms),
               plgpu.Barrier(num_barriers=1), plgpu.Barrier(num_barriers=stages), plgpu.Barrier(num_barriers=stages)]
    out_type = [jax.ShapeDtypeStruct((n, ROWS), jnp.float32) for _, n in shapes]
    return plgpu.kernel(body, out_type=out_type, grid=(n_sm,), grid_names=("sm",), num_threads=2,
                        thread_name="wg", scratch_types=scratch)


def barriers_call(n: int, n_sm: int = NUM_SMS):
    """A kernel of n grid barriers and nothing else (its output is left unwritten): a barrier's own cost."""
    import jax
    import jax.experimental.pallas.mosaic_gpu as plgpu
    import jax.numpy as jnp
    from jax.experimental import pallas as pl

    def body(o_ref):
        sem = pl.get_global(plgpu.SemaphoreType.REGULAR)

        @pl.loop(0, n)
        def _(i):
            _grid_barrier(sem, i + 1, n_sm)

    return plgpu.kernel(body, out_type=jax.ShapeDtypeStruct((SLAB, ROWS), jnp.float32), grid=(n_sm,),
                        grid_names=("sm",))


def streaming_call(shapes, dtype, *, barriers: bool, stream_k: bool = False, tile_k: int = 64, stages: int = 4,
                   n_sm: int = NUM_SMS, interpret: bool = False):
    """A kernel (x [ROWS, max K], w_1 .. w_p) -> (o_1 .. o_p), o_i = (x[:, :K_i] @ w_i)^T in float32, of the
    products of `shapes` [(K, N)] in turn; `barriers`: a grid-wide barrier after each but the last;
    `stream_k`: `_product_stream_k`'s deal (the outputs zeroed first, behind a barrier of their own)."""
    import jax
    import jax.experimental.pallas.mosaic_gpu as plgpu
    import jax.numpy as jnp
    from jax import lax
    from jax.experimental import pallas as pl

    product = _product_stream_k if stream_k else _product

    def body(x_ref, *refs):
        w_refs, o_refs = refs[:len(shapes)], refs[len(shapes):]
        sm = lax.axis_index("sm")
        sem = pl.get_global(plgpu.SemaphoreType.REGULAR) if barriers or stream_k else None
        passed = 0
        if stream_k:
            for o_ref in o_refs:
                _zero(o_ref, sm=sm, n_sm=n_sm)
            passed += 1
            _grid_barrier(sem, passed, n_sm)
        for i, (w_ref, o_ref) in enumerate(zip(w_refs, o_refs)):
            product(x_ref, w_ref, o_ref, tile_k=tile_k, stages=stages, sm=sm, n_sm=n_sm)
            if barriers and i + 1 < len(shapes):  # every CTA's products done before any starts the next
                passed += 1
                _grid_barrier(sem, passed, n_sm)

    out_type = [jax.ShapeDtypeStruct((n, ROWS), jnp.float32) for _, n in shapes]
    return plgpu.kernel(body, out_type=out_type, grid=(n_sm,), grid_names=("sm",), interpret=interpret or None)


def layer_shapes(config) -> list[tuple[int, int]]:
    """A layer's four products (K, N): QKV, attention out, MLP in, MLP out."""
    c, f = config.hidden, config.ffn_hidden
    return [(c, 3 * c), (c, c), (c, f), (f, c)]


def rel_err(got, want) -> float:
    return float(np.linalg.norm(np.asarray(got, np.float64) - want) / np.linalg.norm(want))


def forms(shapes, dtype, rows: int, interpret: bool, pipelines=()):
    """{form: fn(x, layers) -> [[o per product] per layer]}, every output [N, rows] in float32, or [N, ROWS]
    for the Mosaic GPU forms, whose rows are padded to ROWS (read o[:, :rows]: sliced inside, each output
    would cost one more small kernel in the timed call). `pipelines`:
    (tile_k, stages) pairs, each one more stream-K layer form, "layer_stream_k_{tile_k}x{stages}"."""
    import jax
    import jax.numpy as jnp

    from gptjax.kernels.decode_matmul import decode_matmul

    def padded(x):
        return jnp.pad(x, ((0, ROWS - rows), (0, 0)))

    def persistent(stream_k: bool):
        layer = streaming_call(shapes, dtype, barriers=True, stream_k=stream_k, interpret=interpret)
        product = [streaming_call([shape], dtype, barriers=False, stream_k=stream_k, interpret=interpret)
                   for shape in shapes]
        suffix = "_stream_k" if stream_k else ""
        return {
            "layer" + suffix: jax.jit(lambda x, ws: [layer(padded(x), *w) for w in ws]),
            "product" + suffix: jax.jit(lambda x, ws: [[call(padded(x), wi)[0]
                                                        for call, wi in zip(product, w)] for w in ws]),
        }

    def layer_stream_k(tile_k: int, stages: int):
        layer = streaming_call(shapes, dtype, barriers=True, stream_k=True, tile_k=tile_k, stages=stages,
                               interpret=interpret)
        return jax.jit(lambda x, ws: [layer(padded(x), *w) for w in ws])

    def layer_ws(**variant):
        layer = warp_specialized_call(shapes, dtype, **variant)
        return jax.jit(lambda x, ws: [layer(padded(x), *w) for w in ws])

    def layers_ws(n: int, **variant):
        """n layers' products in one launch: the start, the first loads and the drain paid once per n layers."""
        call = warp_specialized_call(shapes * n, dtype, **variant)

        def run(x, ws):
            outs = [o for i in range(0, len(ws), n) for o in call(padded(x), *sum(ws[i:i + n], []))]
            return [outs[i:i + len(shapes)] for i in range(0, len(outs), len(shapes))]
        return jax.jit(run)

    ws_forms = {} if interpret else {  # the interpreter has no warpgroups' barriers
        "layer_stream_k_ws": layer_ws(), "layer_stream_k_ws_free": layer_ws(barrier_every=0),
        LOADS_ONLY: layer_ws(barrier_every=0, multiply=False),
        **{name + TILED: layer_ws(barrier_every=0, multiply=multiply, tiled=True)
           for name, multiply in (("layer_stream_k_ws_free", True), (LOADS_ONLY, False))},
        **{f"layers_{n}_stream_k_ws": layers_ws(n) for n in LAYERS_PER_LAUNCH},
        **{f"{LOADS_ONLY}_{n}_layers": layers_ws(n, barrier_every=0, multiply=False) for n in LAYERS_PER_LAUNCH},
        **{f"{LOADS_ONLY}_{n}_layers_barriers": layers_ws(n, multiply=False) for n in LAYERS_PER_LAUNCH},
        BARRIERS_ONLY: jax.jit(lambda x, ws: [[o] * len(shapes) for o in [barriers_call(len(ws) * len(shapes))()]
                                              for _ in ws]),
        **{f"layers_{n}_stream_k_ws_2_barriers": layers_ws(n, barrier_every=2) for n in LAYERS_PER_LAUNCH},
        "layer_stream_k_ws_deferred": layer_ws(deferred=True),
        **{f"layers_{n}_stream_k_ws_deferred": layers_ws(n, deferred=True) for n in LAYERS_PER_LAUNCH}}

    return {
        **persistent(False),
        **persistent(True),
        **{f"layer_stream_k_{tile_k}x{stages}": layer_stream_k(tile_k, stages) for tile_k, stages in pipelines},
        **ws_forms,
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
    p.add_argument("--pipelines", default="", help="more stream-K layer forms, comma-separated tile_k x stages "
                                                   "(e.g. 128x4,64x8; the default form is 64x4)")
    p.add_argument("--only", default="", help="comma-separated forms to run (default: every one)")
    args = p.parse_args(argv)
    pipelines = [tuple(map(int, pair.split("x"))) for pair in args.pipelines.split(",") if pair]
    only = set(filter(None, args.only.split(",")))

    import jax
    import jax.numpy as jnp

    from benchmarks.gpu_time import gpu_busy_seconds, host_seconds
    from gptjax.config import preset

    # off the GPU, interpreters: Triton's runs; Mosaic GPU's (jax 0.10.2) has no rule for the TMA copies, so those
    # forms report an error line there
    interpret = jax.default_backend() != "gpu"
    dtype = jnp.dtype(args.dtype)
    shapes = layer_shapes(preset(args.model))
    keys = jax.random.split(jax.random.PRNGKey(0), args.copies * len(shapes) + 1)
    ws = [[(jax.random.normal(keys[i * len(shapes) + j], shape, jnp.float32) / np.sqrt(shape[0])).astype(dtype)
           for j, shape in enumerate(shapes)] for i in range(args.copies)]
    weight_bytes = sum(k * n for k, n in shapes) * dtype.itemsize * args.copies
    for rows in map(int, args.rows.split(",")):
        x = jax.random.normal(keys[-1], (rows, max(k for k, _ in shapes))).astype(dtype)
        want = [np.asarray(x[:, :k], np.float64) @ np.asarray(w, np.float64) for w, (k, _) in zip(ws[0], shapes)]
        for name, fn in forms(shapes, dtype, rows, interpret, pipelines).items():
            if only and name not in only:
                continue
            row = dict(model=args.model, dtype=args.dtype, rows=rows, form=name, layers=args.copies)
            try:
                weights = [[tiled_weights(w, 64) for w in layer] for layer in ws] if name.endswith(TILED) else ws
                outs = fn(x, weights)
                row["rel_err"] = (None if name.startswith(UNCHECKED)
                                  else max(rel_err(o.T[:rows], w) for o, w in zip(outs[0], want)))
                busy = gpu_busy_seconds(functools.partial(fn, x), weights)
                row["us_per_layer"] = round(host_seconds(functools.partial(fn, x), weights, 5, 1) * 1e6, 2)
                if busy:
                    row |= dict(gpu_us_per_layer=round(busy / args.copies * 1e6, 2),
                                gpu_gb_s=round(weight_bytes / busy / 1e9, 1))
            except Exception as e:  # a form that fails to build or run is reported, the others still run
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
