"""The residual add and the LayerNorm after it in one kernel, for a decode step's few rows.

At decode a large model's layer on XLA's GEMMs runs ~6 small kernels beside its 4 products, ~2 us apiece on an
H200 whatever their bytes (a 6.7B batch-1 step: 0.36 ms of its 3.9, RESULTS run 33): each product split over K
has its float32 parts summed in a kernel of their own, the residual added in another, each LayerNorm's statistics
taken in a third. `residual_norm` does all three for one LayerNorm: it adds the product's split parts and its bias
to the residual stream and writes both the new stream (float32) and the row normalised, `(h - mean) / std`, in the
next product's dtype. Scale and shift are the folded weights' (`decode_block.fold_layer_norms`), so the product
that reads the output takes it as it is.

A row is `COLUMNS`-wide slices, one program each, so that a batch-1 step's parts are read by several
multiprocessors (one program a row read 16 parts of a 4096-wide row in 5.5 us on an H100, RESULTS run 35); the
row's last program to finish combines their statistics. `residual_norm_reference` is the same arithmetic in plain
`jnp`, the reference the kernel is tested against (`interpret=True` runs the kernel off a GPU).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from gptjax.kernels import early_launch as pdl

MAX_HIDDEN = 16384
COLUMNS = 512  # a program's columns of a row: a 4096-wide row is 8 programs, each reading its slice of every part
MAX_PROGRAMS = 64  # a row's programs at most (the last one combines their statistics one by one)
NUM_WARPS = 4


def _columns(hidden: int) -> int:
    return min(COLUMNS, hidden & -hidden)  # a power of two (a Triton tile's side) that divides the row


def _kernel(*refs, n_parts: int, hidden: int, eps: float, early: str, interpret: bool):
    """Program (r, b): columns b of row r summed (h + bias + the parts, in split order), stored with their mean and
    centred sum of squares; the row's last program to count on `counts` (an atomic add) combines the programs'
    statistics and writes the whole row normalised, reading the others' sums back from memory."""
    h_ref, *refs = refs
    parts_ref, bias_ref, *refs = refs if n_parts else (None, None, *refs)
    _, h_out_ref, x_out_ref, means_ref, squares_ref, counts_ref = refs  # the counts' input is aliased
    cols = _columns(hidden)
    n_blocks = hidden // cols
    r, b = pl.program_id(0), pl.program_id(1)
    at = pl.ds(b * cols, cols)
    h = h_ref[r, at].astype(jnp.float32)
    if n_parts:
        added = bias_ref[at].astype(jnp.float32)
        for s in range(n_parts):  # in split order: the sum does not depend on the launch
            added += parts_ref[s, r, at]
        h = h + added
    if early:
        h = pdl.launch_dependents_after(h)
    mean = jnp.sum(h) / cols
    h_out_ref[r, at] = h
    means_ref[r, b] = mean
    squares_ref[r, b] = jnp.sum(jnp.square(h - mean))
    if not interpret:
        plgpu.debug_barrier()  # every thread's stores are made before the count says so
    finished = plgpu.atomic_add(counts_ref, (r,), jnp.int32(1))  # acq-rel, GPU scope

    @pl.when(finished == n_blocks - 1)
    def _():  # the row's last program: every other one's sums and statistics are in memory
        width = means_ref.shape[-1]  # n_blocks, padded to a power of two
        valid = jnp.arange(width) < n_blocks
        means, squares = (plgpu.load(ref.at[r, pl.ds(0, width)], mask=valid, other=0.0, volatile=True)
                          for ref in (means_ref, squares_ref))
        row_mean = jnp.sum(means) / n_blocks  # blocks of equal size: Chan's combination
        m2 = jnp.sum(squares + jnp.where(valid, cols * jnp.square(means - row_mean), 0.0))
        rstd = jax.lax.rsqrt(m2 / hidden + eps)
        for j in range(n_blocks):
            block = pl.ds(j * cols, cols)
            x_out_ref[r, block] = ((plgpu.load(h_out_ref.at[r, block], volatile=True) - row_mean)
                                   * rstd).astype(x_out_ref.dtype)
        counts_ref[r] = 0  # every program has counted: zero again for the next kernel


def supports(hidden: int) -> bool:
    return 0 < hidden <= MAX_HIDDEN and hidden // _columns(hidden) <= MAX_PROGRAMS


def new_counters(rows: int):
    """Zeros for `residual_norm`'s counters: one per row, zero again after each call."""
    return jnp.zeros((rows,), jnp.int32)


@functools.partial(jax.jit, static_argnames=("eps", "out_dtype", "interpret", "early_launch"))
def residual_norm(h, parts=None, bias=None, counters=None, *, eps: float, out_dtype, interpret: bool = False,
                  early_launch: bool | str | None = None):
    """h [rows, hidden] float32, the residual stream; parts [splits, rows, hidden] float32 (a product's split-K
    parts) and its bias [hidden], or neither; counters (`new_counters`, or None for fresh ones) -> (h + the parts'
    sum + bias, float32; that row normalised, (x - mean) / sqrt(var + eps), in `out_dtype`; the counters, zero)."""
    rows, hidden = h.shape
    if not supports(hidden):
        raise ValueError(f"residual_norm: hidden {hidden} is over {MAX_HIDDEN} or takes more than {MAX_PROGRAMS} "
                         f"slices of a power of two")
    n_parts = 0 if parts is None else parts.shape[0]
    if n_parts and (bias is None or parts.shape[1:] != h.shape or bias.shape != (hidden,)):
        raise ValueError(f"residual_norm: parts {parts.shape} and bias {None if bias is None else bias.shape} "
                         f"must be [splits, {rows}, {hidden}] and [{hidden}]")
    counters = new_counters(rows) if counters is None else counters
    operands = [h.astype(jnp.float32), *((parts.astype(jnp.float32), bias) if n_parts else ()), counters]
    n_blocks = hidden // _columns(hidden)
    kernel = functools.partial(_kernel, n_parts=n_parts, hidden=hidden, eps=eps,
                               early=pdl.resolve(early_launch, interpret), interpret=interpret)
    h, x, _, _, counters = pl.pallas_call(
        kernel, grid=(rows, n_blocks),
        out_shape=[jax.ShapeDtypeStruct((rows, hidden), jnp.float32),
                   jax.ShapeDtypeStruct((rows, hidden), jnp.dtype(out_dtype)),
                   *[jax.ShapeDtypeStruct((rows, pl.next_power_of_2(n_blocks)), jnp.float32)] * 2,  # each
                   jax.ShapeDtypeStruct((rows,), jnp.int32)],  # program's mean and centred sum of squares
        input_output_aliases={len(operands) - 1: 4},
        compiler_params=plgpu.CompilerParams(num_warps=NUM_WARPS, num_stages=1), interpret=interpret,
        name="residual_norm",
    )(*operands)
    return h, x, counters


def residual_norm_reference(h, parts=None, bias=None, *, eps: float, out_dtype):
    """`residual_norm` in plain `jnp`."""
    h = h.astype(jnp.float32)
    if parts is not None:
        h = h + (bias.astype(jnp.float32) + parts.astype(jnp.float32).sum(0))
    centred = h - h.mean(-1, keepdims=True)
    rstd = jax.lax.rsqrt(jnp.square(centred).mean(-1, keepdims=True) + eps)
    return h, (centred * rstd).astype(out_dtype)
