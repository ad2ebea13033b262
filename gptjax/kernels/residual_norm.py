"""The residual add and the LayerNorm after it in one kernel, for a decode step's few rows.

At decode a large model's layer on XLA's GEMMs runs ~6 small kernels beside its 4 products, ~2 us apiece on an
H200 whatever their bytes (a 6.7B batch-1 step: 0.36 ms of its 3.9, RESULTS run 33): each product split over K
has its float32 parts summed in a kernel of their own, the residual added in another, each LayerNorm's statistics
taken in a third. `residual_norm` does all three for one LayerNorm: it adds the product's split parts and its bias
to the residual stream and writes both the new stream (float32) and the row normalised, `(h - mean) / std`, in the
next product's dtype. Scale and shift are the folded weights' (`decode_block.fold_layer_norms`), so the product
that reads the output takes it as it is.

One program a row, the whole row in registers (hidden sizes up to `MAX_HIDDEN`, in multiples of `MIN_CHUNK`); `residual_norm_reference` is the
same arithmetic in plain `jnp`, the reference the kernel is tested against (`interpret=True` runs the kernel off a
GPU).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from gptjax.kernels import early_launch as pdl

MAX_HIDDEN = 16384  # a row a program: 64 KB of float32 in registers at most
MIN_CHUNK = 64  # a row is read in tiles of the largest power of two that divides it, at least this
NUM_WARPS = 8


def _chunk(hidden: int) -> int:
    return hidden & -hidden  # the largest power of two that divides it


def _kernel(*refs, n_parts: int, hidden: int, eps: float, early: str):
    """One row, in static tiles of `_chunk(hidden)` (a Triton tile's sides are powers of two) kept in registers:
    h_ref [hidden], then (with parts) parts_ref [n_parts, hidden] and bias_ref [hidden]; out h and x [hidden]."""
    h_ref, *refs = refs
    parts_ref, bias_ref, h_out_ref, x_out_ref = refs if n_parts else (None, None, *refs)
    chunk = _chunk(hidden)
    tiles = []
    for c in range(hidden // chunk):
        at = pl.ds(c * chunk, chunk)
        h = h_ref[at].astype(jnp.float32)
        if n_parts:
            added = bias_ref[at].astype(jnp.float32)
            for s in range(n_parts):  # in split order: the sum does not depend on the launch
                added += parts_ref[s, at]
            h = h + added
        tiles.append(h)
    if early:
        tiles[-1] = pdl.launch_dependents_after(tiles[-1])
    mean = sum(jnp.sum(t) for t in tiles) / hidden
    rstd = jax.lax.rsqrt(sum(jnp.sum(jnp.square(t - mean)) for t in tiles) / hidden + eps)
    for c, h in enumerate(tiles):
        at = pl.ds(c * chunk, chunk)
        h_out_ref[at] = h
        x_out_ref[at] = ((h - mean) * rstd).astype(x_out_ref.dtype)


def supports(hidden: int) -> bool:
    return 0 < hidden <= MAX_HIDDEN and _chunk(hidden) >= min(hidden, MIN_CHUNK)


@functools.partial(jax.jit, static_argnames=("eps", "out_dtype", "interpret", "early_launch"))
def residual_norm(h, parts=None, bias=None, *, eps: float, out_dtype, interpret: bool = False,
                  early_launch: bool | str | None = None):
    """h [rows, hidden] float32, the residual stream; parts [splits, rows, hidden] float32 (a product's split-K
    parts) and its bias [hidden], or neither -> (h + the parts' sum + bias, float32; that row normalised,
    (x - mean) / sqrt(var + eps), in `out_dtype`). The statistics are two-pass, in float32."""
    rows, hidden = h.shape
    if not supports(hidden):
        raise ValueError(f"residual_norm: hidden {hidden} is over {MAX_HIDDEN} or not a multiple of {MIN_CHUNK}")
    n_parts = 0 if parts is None else parts.shape[0]
    if n_parts and (bias is None or parts.shape[1:] != h.shape or bias.shape != (hidden,)):
        raise ValueError(f"residual_norm: parts {parts.shape} and bias {None if bias is None else bias.shape} "
                         f"must be [splits, {rows}, {hidden}] and [{hidden}]")
    row = pl.BlockSpec((None, hidden), lambda r: (r, 0))
    operands, in_specs = [h.astype(jnp.float32)], [row]
    if n_parts:
        operands += [parts.astype(jnp.float32), bias]
        in_specs += [pl.BlockSpec((n_parts, None, hidden), lambda r: (0, r, 0)),
                     pl.BlockSpec((hidden,), lambda r: (0,))]
    kernel = functools.partial(_kernel, n_parts=n_parts, hidden=hidden, eps=eps,
                               early=pdl.resolve(early_launch, interpret))
    return pl.pallas_call(
        kernel, grid=(rows,), in_specs=in_specs, out_specs=[row, row],
        out_shape=[jax.ShapeDtypeStruct((rows, hidden), jnp.float32),
                   jax.ShapeDtypeStruct((rows, hidden), jnp.dtype(out_dtype))],
        compiler_params=plgpu.CompilerParams(num_warps=NUM_WARPS, num_stages=1), interpret=interpret,
        name="residual_norm",
    )(*operands)


def residual_norm_reference(h, parts=None, bias=None, *, eps: float, out_dtype):
    """`residual_norm` in plain `jnp`."""
    h = h.astype(jnp.float32)
    if parts is not None:
        h = h + (bias.astype(jnp.float32) + parts.astype(jnp.float32).sum(0))
    centred = h - h.mean(-1, keepdims=True)
    rstd = jax.lax.rsqrt(jnp.square(centred).mean(-1, keepdims=True) + eps)
    return h, (centred * rstd).astype(out_dtype)
