"""A decode step's whole MLP in one kernel: LayerNorm, MLP in + bias + GELU, MLP out + bias + residual.

As two `decode_matmul` kernels the MLP is two launches, the second waiting for the first to finish (its K is the
first one's N). Here program j owns the FFN slice [j * block_f, +block_f): it computes its slice of the hidden
activations in full (LayerNorm(x) @ w_in[:, slice], bias, GELU, in registers), multiplies them by w_out's rows of
that slice, and so holds a partial sum of the whole output, over K = its slice. No program needs another's
activations, so nothing waits between the two products.

The partial sums are added up as the split sums of `decode_matmul` are: each program stores its part of every
output column block, then counts each on that block's counter (all at once); the program that counts a block last
adds that block's parts, up to SUM_PARTS programs' at a load and always in the same order (the result is the same
whichever program finishes last), then adds the bias and the residual.

`decode_mlp_reference` is the same arithmetic in plain `jnp` (the two `decode_matmul_reference` products).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from gptjax.kernels import early_launch as pdl
from gptjax.kernels.decode_matmul import (MATRIX_ROWS, MAX_ROWS, _activation, _block_rows, _largest_block,
                                          decode_matmul_reference, new_counters, normalise, row_stats)

TARGET_PROGRAMS = 128  # about one per multiprocessor of an H100 or H200
SUM_PARTS = 16  # parts a load of the final sums takes at most ([SUM_PARTS, block_n] float32)


class MlpParams(NamedTuple):
    block_f: int  # FFN columns a program owns
    block_k: int  # hidden columns a step of the first product takes
    block_n: int  # output columns a partial sum is stored and added up in
    num_warps: int
    num_stages: int


def default_params(hidden: int, ffn: int) -> MlpParams:
    """FFN slices narrow enough for about TARGET_PROGRAMS programs (at least 16, the matrix units' side), the first
    product in steps of up to 256 hidden columns, output blocks of up to 128 columns."""
    block_f = _largest_block(ffn, max(MATRIX_ROWS, pl.next_power_of_2(ffn // TARGET_PROGRAMS)))
    return MlpParams(block_f, _largest_block(hidden, 256), _largest_block(hidden, 128), 4, 3)


def supports(rows: int, hidden: int, ffn: int) -> bool:
    return 0 < rows <= MAX_ROWS and _largest_block(hidden, 16) > 0 and _largest_block(ffn, 16) > 0


class _Shape(NamedTuple):
    rows: int
    hidden: int
    ffn: int
    params: MlpParams
    eps: float
    activation: str
    interpret: bool
    early_launch: str


def _kernel(x_ref, scale_ref, shift_ref, w_in_ref, b_in_ref, w_out_ref, b_out_ref, _counts_in, out_ref, parts_ref,
            counts_ref, *, s: _Shape):
    """Program j: FFN slice [j * block_f, +block_f); its partial sums [rows, hidden] by output column blocks."""
    block_f, block_k, block_n = s.params.block_f, s.params.block_k, s.params.block_n
    block_rows, n_programs, n_blocks = _block_rows(s.rows), s.ffn // block_f, s.hidden // block_n
    j = pl.program_id(0)
    if s.early_launch == "start":
        j = pdl.launch_dependents(j)
    slice_ = pl.ds(j * block_f, block_f)

    def load_x(k0, width: int):
        ok = lax.broadcasted_iota(jnp.int32, (block_rows, width), 0) < s.rows
        return plgpu.load(x_ref.at[pl.ds(0, block_rows), pl.ds(k0, width)], mask=ok, other=0.0).astype(jnp.float32)

    mean, rstd = row_stats(load_x, s.hidden, block_rows, s.eps)
    dtype = w_in_ref.dtype

    def step(i, acc):
        cols = pl.ds(i * block_k, block_k)
        v = normalise(load_x(i * block_k, block_k), mean, rstd, scale_ref, shift_ref, cols)
        return acc + jnp.dot(v.astype(dtype), w_in_ref[cols, slice_], preferred_element_type=jnp.float32)

    acc = lax.fori_loop(0, s.hidden // block_k, step, jnp.zeros((block_rows, block_f), jnp.float32))
    hidden = _activation(s.activation, acc + b_in_ref[slice_].astype(jnp.float32)[None, :])
    if s.early_launch == "end":
        hidden = pdl.launch_dependents_after(hidden)
    hidden = hidden.astype(dtype)
    rows_ok = lax.broadcasted_iota(jnp.int32, (block_rows, block_n), 0) < s.rows
    for c in range(n_blocks):  # every part stored first: w_out's loads stream without a wait between them
        cols = pl.ds(c * block_n, block_n)
        part = jnp.dot(hidden, w_out_ref[slice_, cols], preferred_element_type=jnp.float32)
        plgpu.store(parts_ref.at[j, pl.ds(0, block_rows), cols], part, mask=rows_ok)
    if not s.interpret:
        plgpu.debug_barrier()  # every thread's parts are stored before the counters say so
    # then counted, all the counters at once (one round trip, not one a block): acq-rel, GPU scope
    counted = [plgpu.atomic_add(counts_ref, (jnp.int32(c),), jnp.int32(1)) for c in range(n_blocks)]
    for c, finished in enumerate(counted):
        pl.when(finished == n_programs - 1)(functools.partial(_final_sums, x_ref, b_out_ref, parts_ref, out_ref,
                                                              counts_ref, c, s))


def _final_sums(x_ref, b_out_ref, parts_ref, out_ref, counts_ref, c: int, s: _Shape):
    """Column block c of the output, once every program's part of it is in memory: the parts added up row by row,
    up to SUM_PARTS programs' in one load and always in the same order, then the bias and the residual."""
    n_programs, block_n = s.ffn // s.params.block_f, s.params.block_n
    cols = pl.ds(c * block_n, block_n)
    bias, at_once = b_out_ref[cols].astype(jnp.float32), math.gcd(n_programs, SUM_PARTS)
    for row in map(jnp.int32, range(s.rows)):
        total = bias + x_ref[row, cols].astype(jnp.float32)
        for p0 in range(0, n_programs, at_once):
            total += jnp.sum(plgpu.load(parts_ref.at[pl.ds(p0, at_once), row, cols], volatile=True), axis=0)
        out_ref[row, cols] = total.astype(out_ref.dtype)
    counts_ref[c] = 0  # every program has counted: zero again for the next kernel


@functools.partial(jax.jit, static_argnames=("eps", "activation", "params", "interpret", "early_launch"))
def decode_mlp(x, ln_scale, ln_bias, w_in, b_in, w_out, b_out, *, activation: str = "gelu_new", counters=None,
               eps: float = 1e-5, params: MlpParams | None = None, interpret: bool = False,
               early_launch: bool | str | None = None):
    """x + MLP(LayerNorm(x)) for x [rows, hidden] (the residual stream; the output takes its dtype): w_in
    [hidden, ffn], b_in [ffn], w_out [ffn, hidden], b_out [hidden], ln_scale and ln_bias [hidden]. With
    `counters` (int32 zeros, at least hidden / 16: `new_counters`, left zero again) returns (out, counters), as
    `decode_matmul` does. `early_launch` as there."""
    rows, hidden = x.shape
    ffn = w_in.shape[1]
    if not supports(rows, hidden, ffn) or w_in.shape != (hidden, ffn) or w_out.shape != (ffn, hidden):
        raise ValueError(f"decode_mlp: input {x.shape} against weights {w_in.shape} and {w_out.shape} "
                         f"(rows 1-{MAX_ROWS}, sizes multiples of 16)")
    params = params or default_params(hidden, ffn)
    if ffn % params.block_f or hidden % params.block_n or hidden % params.block_k:
        raise ValueError(f"decode_mlp: {params} does not tile hidden {hidden}, ffn {ffn}")
    n_blocks = hidden // params.block_n
    counts = counters if counters is not None else new_counters(hidden)
    if counts.shape[0] < n_blocks:
        raise ValueError(f"decode_mlp: {counts.shape[0]} counters for {n_blocks} column blocks")
    s = _Shape(rows, hidden, ffn, params, eps, activation, interpret, pdl.resolve(early_launch, interpret))
    out, _, counts = pl.pallas_call(
        functools.partial(_kernel, s=s), grid=(ffn // params.block_f,),
        out_shape=[jax.ShapeDtypeStruct(x.shape, x.dtype),
                   jax.ShapeDtypeStruct((ffn // params.block_f, rows, hidden), jnp.float32),
                   jax.ShapeDtypeStruct(counts.shape, jnp.int32)],
        input_output_aliases={7: 2},
        compiler_params=plgpu.CompilerParams(num_warps=params.num_warps, num_stages=params.num_stages),
        interpret=interpret, name=f"decode_mlp_{hidden}x{ffn}",
    )(x, ln_scale, ln_bias, w_in, b_in, w_out, b_out, counts)
    return (out, counts) if counters is not None else out


def decode_mlp_reference(x, ln_scale, ln_bias, w_in, b_in, w_out, b_out, *, activation: str = "gelu_new",
                         counters=None, eps: float = 1e-5):
    """The same in plain `jnp`, as the two `decode_matmul_reference` products (the same arguments and results)."""
    mlp = decode_matmul_reference(w_in, x, ln_scale, ln_bias, bias=b_in, activation=activation, out_dtype=w_in.dtype,
                                  eps=eps)
    out = decode_matmul_reference(w_out, mlp, bias=b_out, residual=x, out_dtype=x.dtype)
    return (out, counters) if counters is not None else out
