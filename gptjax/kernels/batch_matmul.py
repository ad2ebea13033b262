"""A decode step's products at large batch (128 rows a device and more), each with its epilogue, on Hopper's matrix
units.

At batch 256 XLA runs a 345M layer's four products as Triton GEMMs split over K, each followed by a kernel that
sums the float32 parts with the bias (and the residual), and GELU as a kernel of its own: 12 kernels a layer, the
products ~200 TFLOP/s (benchmarks/RESULTS.md, run 27). `batch_matmul` is one kernel a product: each CTA owns a
`tile_m x tile_n` block of the output, streams its rows of x and columns of w through shared memory by TMA
(`stages` deep) into wgmma, and adds the bias, applies GELU or adds the residual before its one store.

`batch_matmul_reference` is the same in plain `jnp`, the float32 accumulation included: what the kernel is tested
against, and what runs off a Hopper GPU. The kernel is Mosaic GPU (Pallas), which only runs on an H100 or H200;
elsewhere it is lowered in the tests, not run.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

# none, or ModelConfig's: GPT-2's tanh GELU ("gelu_new"), the exact erf one ("gelu", which Mosaic GPU cannot lower:
# the reference takes it, the kernel does not)
KERNEL_ACTIVATIONS = ("", "gelu_new")
# 64 x 64 output tiles, 6 K tiles in flight, one wgmma left running: the fastest launch for each 345M product at 256
# rows on an H100 (RESULTS run 27: QKV 6.5 us against XLA's 11.1, MLP in + GELU 7.7 against 13.7, attention out +
# residual 4.6 against 5.6; MLP out + residual, K = 4096, 13.7 against 13.0)
TILE_M = TILE_N = 64
STAGES, DELAY = 6, 1
BIAS_WINDOW = 64  # columns of a 16-bit bias a CTA copies at least (a copy moves a multiple of 128 bytes)


def _activation(name: str, y):
    return jax.nn.gelu(y, approximate=(name == "gelu_new")) if name else y


def batch_matmul_reference(x, w, b, residual=None, *, activation: str = ""):
    """x [M, K] @ w [K, N] accumulated in float32, + b [N], then `activation` or + residual [M, N]; in x's dtype, or
    the residual's where there is one."""
    acc = jnp.dot(x, w, preferred_element_type=jnp.float32)
    y = _activation(activation, acc + b.astype(jnp.float32))
    if residual is not None:
        return (y + residual.astype(jnp.float32)).astype(residual.dtype)
    return y.astype(x.dtype)


def _transforms(dtype, cols: int):
    import jax.experimental.pallas.mosaic_gpu as plgpu

    swizzle = plgpu.find_swizzle(cols * jnp.dtype(dtype).itemsize * 8)
    return plgpu.TilingTransform((8, swizzle // jnp.dtype(dtype).itemsize)), plgpu.SwizzleTransform(swizzle)


def _kernel(x_ref, w_ref, b_ref, *refs, tile_m: int, tile_n: int, tile_k: int, stages: int, delay: int,
            activation: str, with_residual: bool):
    import jax.experimental.pallas.mosaic_gpu as plgpu

    refs = list(refs)
    r_ref = refs.pop(0) if with_residual else None
    o_ref, b_smem, o_smem, loaded = refs
    rows = pl.ds(lax.axis_index("m") * tile_m, tile_m)
    col0 = lax.axis_index("n") * tile_n
    cols = pl.ds(col0, tile_n)
    # the epilogue's operands start loading first, so that they land while the product runs; the residual lands
    # in the output's buffer (the output takes its dtype), which the sum then overwrites
    # a copy moves a multiple of 128 bytes: a narrow tile's bias comes in the aligned window of BIAS_WINDOW around it
    window = max(tile_n, BIAS_WINDOW)
    window_start = col0 // window * window
    plgpu.copy_gmem_to_smem(b_ref.at[pl.ds(window_start, window)], b_smem, loaded.at[0])
    if with_residual:
        plgpu.copy_gmem_to_smem(r_ref.at[rows, cols], o_smem, loaded.at[1])
    # wgmma takes the two tiles with one swizzle: that of x's tile_k columns, which w's tile_n must match
    in_transforms = _transforms(x_ref.dtype, min(tile_k, tile_n))

    def with_acc(acc):
        def step(_, x_smem, w_smem):
            plgpu.wgmma(acc, x_smem, w_smem)
            # `delay` products left running: a step's tiles go back to the pipeline `delay` steps after it returns
            plgpu.wgmma_wait(delay)

        spec = functools.partial(plgpu.BlockSpec, transforms=in_transforms, delay_release=delay)
        plgpu.emit_pipeline(
            step, grid=(x_ref.shape[1] // tile_k,), max_concurrent_steps=stages,
            in_specs=[spec((tile_m, tile_k), lambda k: (0, k)), spec((tile_k, tile_n), lambda k: (k, 0))],
        )(x_ref.at[rows, :], w_ref.at[:, cols])
        plgpu.wgmma_wait(0)
        y = acc[...]
        plgpu.barrier_wait(loaded.at[0])
        bias_cols = b_smem.at[pl.ds(col0 - window_start, tile_n)] if window > tile_n else b_smem
        bias = plgpu.load(bias_cols, (), layout=plgpu.Layout.WGMMA.reduce(0)).astype(jnp.float32)
        y = y + lax.broadcast_in_dim(bias, (tile_m, tile_n), [1])
        y = _activation(activation, y)
        if with_residual:
            plgpu.barrier_wait(loaded.at[1])
            y = y + plgpu.load(o_smem, (), layout=plgpu.Layout.WGMMA).astype(jnp.float32)
        o_smem[...] = y.astype(o_smem.dtype)

    pl.run_scoped(with_acc, plgpu.ACC((tile_m, tile_n), jnp.float32))
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_smem, o_ref.at[rows, cols])
    plgpu.wait_smem_to_gmem(0)


def supports(m: int, k: int, n: int, *, activation: str = "", tile_m: int = TILE_M, tile_n: int = TILE_N,
             tile_k: int = 64) -> bool:
    """Whether the kernel takes this product: whole tiles, and an activation it has."""
    return m % tile_m == 0 and n % tile_n == 0 and k % tile_k == 0 and activation in KERNEL_ACTIVATIONS


@functools.partial(jax.jit, static_argnames=("activation", "tile_m", "tile_n", "tile_k", "stages", "delay"))
def batch_matmul(x, w, b, residual=None, *, activation: str = "", tile_m: int = TILE_M,
                 tile_n: int = TILE_N, tile_k: int = 64, stages: int = STAGES, delay: int = DELAY):
    """`batch_matmul_reference` as one Mosaic GPU kernel: x [M, K], w [K, N], b [N] (x's dtype), residual [M, N]
    (any float dtype; the output takes it). M, N and K must be whole tiles (`supports`).
    `stages`: K tiles in flight; `delay` (< stages): wgmma products left running while the next is issued."""
    import jax.experimental.pallas.mosaic_gpu as plgpu

    if activation not in KERNEL_ACTIVATIONS:
        raise ValueError(f"batch_matmul's activation must be one of {KERNEL_ACTIVATIONS}, got {activation!r}")
    (m, k), n = x.shape, w.shape[1]
    if not supports(m, k, n, tile_m=tile_m, tile_n=tile_n, tile_k=tile_k):
        raise ValueError(f"batch_matmul takes whole {tile_m} x {tile_n} x {tile_k} tiles, got M={m}, K={k}, N={n}")
    out_dtype = x.dtype if residual is None else residual.dtype
    scratch = [plgpu.SMEM((max(tile_n, BIAS_WINDOW),), b.dtype),
               plgpu.SMEM((tile_m, tile_n), out_dtype, transforms=_transforms(out_dtype, tile_n)),
               plgpu.Barrier(num_barriers=2)]
    kernel = functools.partial(_kernel, tile_m=tile_m, tile_n=tile_n, tile_k=tile_k, stages=stages, delay=delay,
                               activation=activation, with_residual=residual is not None)
    call = plgpu.kernel(kernel, out_type=jax.ShapeDtypeStruct((m, n), out_dtype), grid=(n // tile_n, m // tile_m),
                        grid_names=("n", "m"), scratch_types=scratch)
    return call(x, w, b, *([] if residual is None else [residual]))
