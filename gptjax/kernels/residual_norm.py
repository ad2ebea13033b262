"""A decode step's LayerNorm in one kernel, with the residual add before it.

At 128-256 slots XLA ran each LayerNorm of a decode layer as two kernels (the rows' statistics, then their 1 / std),
and the sum of MLP out's split-K parts with its bias and the residual as one more: ~10 us a layer of small kernels
on an H100 (RESULTS run 34). `residual_norm` is one kernel: it adds a product's float32 split parts and bias to the
residual stream (where given) and writes the new stream (float32) and the rows normalised, `(h - mean) / std`, in
the next product's dtype. Scale and shift are in the next product's weights (`decode_block.fold_layer_norms`), so
the product takes the output as it is.

One program a row, its sums kept in registers: a kernel for steps of many rows (`decode_block.batch_block`; a
large model's batch-1 step through this kernel and split products was 2.2% slower on an H100, RESULTS run 35).
`residual_norm_reference` is the same arithmetic in plain `jnp`, the reference the kernel is tested against
(`interpret=True` runs the kernel off a GPU).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from gptjax.kernels import early_launch as pdl

MAX_HIDDEN = 16384  # a row's float32 sums in one program's registers
MIN_TILE, MAX_TILE = 64, 512  # a row is summed in tiles of the largest power of two (a Triton tile's side) that
                              # divides it, up to MAX_TILE; a row whose largest is under MIN_TILE is not taken
NUM_WARPS = 4


def _tile(hidden: int) -> int:
    return min(MAX_TILE, hidden & -hidden)


def _kernel(*refs, n_parts: int, hidden: int, eps: float, early: str):
    """Program r: row r summed (h + bias + the parts, in split order) in tiles held in registers, then normalised
    (two passes over the registers: the mean, then the centred sum of squares)."""
    h_ref, *refs = refs
    parts_ref, bias_ref, h_out_ref, x_out_ref = refs if n_parts else (None, None, None, *refs)
    r, tile = pl.program_id(0), _tile(hidden)
    spans = [pl.ds(t * tile, tile) for t in range(hidden // tile)]
    sums = []
    for at in spans:
        h = h_ref[r, at].astype(jnp.float32)
        if n_parts:
            added = bias_ref[at].astype(jnp.float32)
            for s in range(n_parts):  # in split order: the sum does not depend on the launch
                added += parts_ref[s, r, at]
            h = h + added
            h_out_ref[r, at] = h  # (without parts the caller keeps its h: no copy is written)
        sums.append(h)
    if early:
        sums[-1] = pdl.launch_dependents_after(sums[-1])
    mean = sum(jnp.sum(h) for h in sums) / hidden
    rstd = jax.lax.rsqrt(sum(jnp.sum(jnp.square(h - mean)) for h in sums) / hidden + eps)
    for at, h in zip(spans, sums):
        x_out_ref[r, at] = ((h - mean) * rstd).astype(x_out_ref.dtype)


def supports(hidden: int) -> bool:
    return 0 < hidden <= MAX_HIDDEN and _tile(hidden) >= min(hidden, MIN_TILE)


@functools.partial(jax.jit, static_argnames=("eps", "out_dtype", "interpret", "early_launch"))
def residual_norm(h, parts=None, bias=None, *, eps: float, out_dtype, interpret: bool = False,
                  early_launch: bool | str | None = None):
    """h [rows, hidden] float32, the residual stream; parts [splits, rows, hidden] float32 (a product's split-K
    parts) and its bias [hidden], or neither -> (h + the parts' sum + bias, float32; that row normalised,
    (x - mean) / sqrt(var + eps), in `out_dtype`)."""
    rows, hidden = h.shape
    if not supports(hidden):
        raise ValueError(f"residual_norm: hidden {hidden} is over {MAX_HIDDEN} or not a multiple of {MIN_TILE}")
    n_parts = 0 if parts is None else parts.shape[0]
    if n_parts and (bias is None or parts.shape[1:] != h.shape or bias.shape != (hidden,)):
        raise ValueError(f"residual_norm: parts {parts.shape} and bias {None if bias is None else bias.shape} "
                         f"must be [splits, {rows}, {hidden}] and [{hidden}]")
    operands = [h.astype(jnp.float32), *((parts.astype(jnp.float32), bias) if n_parts else ())]
    kernel = functools.partial(_kernel, n_parts=n_parts, hidden=hidden, eps=eps,
                               early=pdl.resolve(early_launch, interpret))
    out_shape = [jax.ShapeDtypeStruct((rows, hidden), jnp.dtype(out_dtype))]
    if n_parts:
        out_shape.insert(0, jax.ShapeDtypeStruct((rows, hidden), jnp.float32))
    out = pl.pallas_call(
        kernel, grid=(rows,), out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=NUM_WARPS, num_stages=1), interpret=interpret,
        name="residual_norm",
    )(*operands)
    return (out[0] if n_parts else operands[0]), out[-1]  # h in float32, as the docstring says


def residual_norm_reference(h, parts=None, bias=None, *, eps: float, out_dtype):
    """`residual_norm` in plain `jnp`."""
    h = h.astype(jnp.float32)
    if parts is not None:
        h = h + (bias.astype(jnp.float32) + parts.astype(jnp.float32).sum(0))
    centred = h - h.mean(-1, keepdims=True)
    rstd = jax.lax.rsqrt(jnp.square(centred).mean(-1, keepdims=True) + eps)
    return h, (centred * rstd).astype(out_dtype)
