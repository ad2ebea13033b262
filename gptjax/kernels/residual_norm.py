"""A decode step's residual add and the LayerNorm after it, in one kernel: h = residual + sum(parts) + bias, and
x = LayerNorm(h).

At small batch a large model's step is bound by its weights, and what it spends beside them is small kernels: in
a 6.7B layer XLA sums each split-K product's float32 parts with the bias and residual in one kernel, then takes
LayerNorm's statistics in a second and normalises in a third (RESULTS, run 18). Here one program a row does all
three: it reads the row's parts (the product split over K by hand, `[splits, rows, hidden]`; one part when the
product was summed already), adds them in split order, writes the new residual stream, and normalises it in the
same registers. Given no parts it is a LayerNorm of one kernel (XLA takes two at decode: the statistics, then the
normalisation).

`residual_norm_reference` is the same arithmetic in plain `jnp`: what the kernel is tested against, and what runs
where the kernel cannot (hidden sizes that are no power of two: Triton's blocks are).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from gptjax.model import layer_norm

MAX_SPLITS = 16  # a program reads its row's parts one after another, unrolled


def supports(splits: int, hidden: int) -> bool:
    return 0 <= splits <= MAX_SPLITS and hidden >= 16 and hidden & (hidden - 1) == 0


def residual_norm_reference(residual, scale, shift, parts=None, bias=None, *, eps: float):
    """residual [rows, hidden], parts [splits, rows, hidden] float32 and their bias [hidden] -> (h = residual +
    parts + bias [rows, hidden] float32, LayerNorm(h) in the scale's dtype). Without parts: LayerNorm(residual)."""
    if parts is None:
        return layer_norm(residual, scale, shift, eps)
    h = residual.astype(jnp.float32) + bias.astype(jnp.float32)
    for part in parts:  # in split order, as the kernel adds them
        h = h + part
    return h, layer_norm(h, scale, shift, eps)


def _kernel(*refs, splits: int, eps: float):
    if splits:
        residual_ref, scale_ref, shift_ref, parts_ref, bias_ref, h_ref, x_ref = refs
        h = residual_ref[...].astype(jnp.float32) + bias_ref[...].astype(jnp.float32)
        for s in range(splits):
            h = h + parts_ref[s, :]
        h_ref[...] = h
    else:
        residual_ref, scale_ref, shift_ref, x_ref = refs
        h = residual_ref[...].astype(jnp.float32)
    mean = jnp.mean(h)
    var = jnp.maximum(jnp.mean(h * h) - mean * mean, 0.0)  # as `model.layer_norm`: one pass
    y = (h - mean) * jax.lax.rsqrt(var + eps)
    x_ref[...] = (y * scale_ref[...].astype(jnp.float32) + shift_ref[...].astype(jnp.float32)).astype(x_ref.dtype)


def residual_norm(residual, scale, shift, parts=None, bias=None, *, eps: float, interpret: bool = False):
    """`residual_norm_reference` as one Pallas kernel, one program a row."""
    rows, hidden = residual.shape
    splits = 0 if parts is None else parts.shape[0]
    if not supports(splits, hidden):
        return residual_norm_reference(residual, scale, shift, parts, bias, eps=eps)
    vector = pl.BlockSpec((hidden,), lambda r: (0,))
    row = pl.BlockSpec((None, hidden), lambda r: (r, 0))
    normed = jax.ShapeDtypeStruct((rows, hidden), scale.dtype)
    in_specs, operands, out_specs, out_shape = [row, vector, vector], [residual, scale, shift], [row], [normed]
    if splits:
        in_specs += [pl.BlockSpec((splits, None, hidden), lambda r: (0, r, 0)), vector]
        operands += [parts.astype(jnp.float32), bias]
        out_specs, out_shape = [row, row], [jax.ShapeDtypeStruct((rows, hidden), jnp.float32), normed]
    out = pl.pallas_call(
        functools.partial(_kernel, splits=splits, eps=eps), grid=(rows,), in_specs=in_specs, out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=max(1, min(8, hidden // 512)), num_stages=1),
        interpret=interpret, name="residual_norm" if splits else "layer_norm",
    )(*operands)
    return tuple(out) if splits else out[0]
