"""Small-batch matmuls for the decode step: a few rows of activations times a whole weight matrix.

At decode a layer's products have 1-64 rows, so they are bound by reading the weights once; what costs time is
each kernel's launch and the small XLA kernels between them (LayerNorm, bias, GELU, residual adds). One kernel
here does a product with its neighbours fused in:

- a prologue on the input, computed in float32 as each [rows, block_k] tile is loaded:
  v = x + sum(parts) + x_bias (any of the three), then LayerNorm (statistics over the whole row, in a first
  pass) or an activation, then cast to the weights' dtype;
- the product, split over K (`splits`) so that a narrow output still puts enough programs on the chip to read
  the weights at full speed. Each split writes its own float32 partial sum, side by side in [rows, splits * N]
  (every start index the kernel reads is then a traced one, whatever the split): no atomics, and
  the same numbers every run. Whoever reads the result next sums the parts in its own prologue (the next
  matmul) or in an XLA fusion it needs anyway.

`decode_matmul_reference` is the same arithmetic in plain `jnp`, the reference the kernel is tested against.
Rows past the input's are masked, not padded: the kernel reads and writes exactly `rows` rows.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

MATRIX_ROWS = 16  # the matrix units' smallest tile side in Triton's dot
MAX_ROWS = 64  # past this the product is no longer weight-bound, and XLA's own matmuls do well
TARGET_PROGRAMS = 128  # about one per multiprocessor of an H100 or H200 (fewer, longer programs won the sweep)
SHARED_MEMORY = 200 * 1024  # of the 227 KB a block may have, what the pipelined tiles may take
STATS_BLOCK = 512  # LayerNorm's statistics pass reads the input in wider tiles: fewer, longer loads


class MatmulParams(NamedTuple):
    block_n: int
    block_k: int
    splits: int
    num_warps: int
    num_stages: int


def _largest_block(n: int, most: int) -> int:
    """The largest power of two <= most that divides n (0 when even 16 does not)."""
    block = most
    while block >= MATRIX_ROWS and n % block:
        block //= 2
    return block if block >= MATRIX_ROWS else 0


def supports(rows: int, k: int, n: int) -> bool:
    return 0 < rows <= MAX_ROWS and _largest_block(k, 16) > 0 and _largest_block(n, 16) > 0


def default_params(rows: int, k: int, n: int, input_tiles: int = 1, itemsize: int = 2) -> MatmulParams:
    """Column blocks of 128 (256-byte runs of a 16-bit weight row), then K split (in chunks of at least 64)
    until about TARGET_PROGRAMS programs read the weights; the K block shrinks until the pipelined tiles (the
    weights', and `input_tiles` float32 input tiles: x and each part) fit in shared memory. The H200 sweep of
    RESULTS run 11 chose these."""
    block_n = _largest_block(n, 128)
    splits = 1
    while (n // block_n) * splits * 2 <= TARGET_PROGRAMS and k % (splits * 2 * 64) == 0:
        splits *= 2
    block_k = _largest_block(k // splits, 128)
    stages, block_rows = 3, _block_rows(rows)
    while stages * block_k * (block_rows * 4 * input_tiles + block_n * itemsize) > SHARED_MEMORY and block_k > 16:
        block_k //= 2
    return MatmulParams(block_n, block_k, splits, 4, stages)


def _block_rows(rows: int) -> int:
    return max(MATRIX_ROWS, pl.next_power_of_2(rows))


def _activation(name: str, v):
    return jax.nn.gelu(v, approximate=(name == "gelu_new"))


def _kernel(*refs, rows: int, block_rows: int, k: int, chunk: int, params: MatmulParams, has_x: bool,
            n_parts: int, has_bias: bool, ln: bool, eps: float, activation: str):
    """Program (col, split): output columns [col * block_n, +block_n) over K rows [split * chunk, +chunk)."""
    it = iter(refs)
    x_ref = next(it) if has_x else None
    parts_ref = next(it) if n_parts else None
    bias_ref = next(it) if has_bias else None
    scale_ref, shift_ref = (next(it), next(it)) if ln else (None, None)
    w_ref, out_ref = next(it), next(it)
    block_n, block_k = params.block_n, params.block_k
    col, split = pl.program_id(0), pl.program_id(1)

    def load_input(k0, width: int):
        """v = x + sum(parts) + bias over columns [k0, k0 + width), float32 [block_rows, width]."""
        cols = pl.ds(k0, width)
        ok = lax.broadcasted_iota(jnp.int32, (block_rows, width), 0) < rows
        v = jnp.zeros((block_rows, width), jnp.float32)
        if has_x:
            v += plgpu.load(x_ref.at[pl.ds(0, block_rows), cols], mask=ok, other=0.0).astype(jnp.float32)
        for p in range(n_parts):
            v += plgpu.load(parts_ref.at[pl.ds(0, block_rows), pl.ds(p * k + k0, width)], mask=ok, other=0.0)
        if has_bias:
            v += bias_ref[cols].astype(jnp.float32)[None, :]
        return v

    if ln:  # a first pass over the whole row: LayerNorm's statistics
        width = _largest_block(k, STATS_BLOCK)

        def stats(i, carry):
            v = load_input(i * width, width)
            return carry[0] + jnp.sum(v, axis=1), carry[1] + jnp.sum(v * v, axis=1)

        zero = jnp.zeros((block_rows,), jnp.float32)
        total, total_sq = lax.fori_loop(0, k // width, stats, (zero, zero))
        mean = total / k
        rstd = lax.rsqrt(jnp.maximum(total_sq / k - mean * mean, 0.0) + eps)

    def body(i, acc):
        k0 = split * chunk + i * block_k
        v = load_input(k0, block_k)
        if ln:
            cols = pl.ds(k0, block_k)
            v = ((v - mean[:, None]) * rstd[:, None] * scale_ref[cols].astype(jnp.float32)[None, :]
                 + shift_ref[cols].astype(jnp.float32)[None, :])
        if activation:
            v = _activation(activation, v)
        w = w_ref[pl.ds(k0, block_k), pl.ds(col * block_n, block_n)]
        return acc + jnp.dot(v.astype(w.dtype), w, preferred_element_type=jnp.float32)

    acc = lax.fori_loop(0, chunk // block_k, body, jnp.zeros((block_rows, block_n), jnp.float32))
    out_ok = lax.broadcasted_iota(jnp.int32, (block_rows, block_n), 0) < rows
    start = split * (out_ref.shape[1] // params.splits) + col * block_n  # split s's sums sit in [s*N, (s+1)*N)
    plgpu.store(out_ref.at[pl.ds(0, block_rows), pl.ds(start, block_n)], acc, mask=out_ok)


@functools.partial(jax.jit, static_argnames=("eps", "activation", "params", "interpret"))
def decode_matmul(w, x=None, parts=None, x_bias=None, ln_scale=None, ln_bias=None, *, eps: float = 1e-5,
                  activation: str = "", params: MatmulParams | None = None, interpret: bool = False):
    """prologue(x + sum(parts) + x_bias) @ w as float32 partial sums side by side, [rows, splits * N] (the
    product is `sum_parts(out, N)`).

    w: [K, N]; x: [rows, K] (any float dtype) or None; parts: [rows, P * K] float32 (P partial sums side by
    side, as this kernel writes them) or None; x_bias: [K];
    ln_scale and ln_bias: [K] for a LayerNorm prologue; activation: "gelu_new" | "gelu" | "" (after the
    LayerNorm, if both)."""
    k, n = w.shape
    rows, width = (x if x is not None else parts).shape
    if not supports(rows, k, n) or width % k or (x is not None and width != k):
        raise ValueError(f"decode_matmul: input [{rows}, {width}] against weights {w.shape} "
                         f"(rows 1-{MAX_ROWS}, K and N multiples of 16)")
    n_parts = 0 if parts is None else parts.shape[1] // k
    params = params or default_params(rows, k, n, (x is not None) + n_parts, w.dtype.itemsize)
    chunk = k // params.splits
    if n % params.block_n or chunk % params.block_k:
        raise ValueError(f"decode_matmul: {params} does not tile K={k}, N={n}")
    ln = ln_scale is not None
    operands = [a for a in (x, parts, x_bias, ln_scale if ln else None, ln_bias if ln else None) if a is not None]
    kernel = functools.partial(
        _kernel, rows=rows, block_rows=_block_rows(rows), k=k, chunk=chunk, params=params, has_x=x is not None,
        n_parts=n_parts, has_bias=x_bias is not None, ln=ln, eps=eps, activation=activation)
    return pl.pallas_call(
        kernel, grid=(n // params.block_n, params.splits),
        out_shape=jax.ShapeDtypeStruct((rows, params.splits * n), jnp.float32),
        compiler_params=plgpu.CompilerParams(num_warps=params.num_warps, num_stages=params.num_stages),
        interpret=interpret, name=f"decode_matmul_{k}x{n}",
    )(*operands, w)


def sum_parts(parts, n: int):
    """[rows, P * n] partial sums side by side -> their sum, [rows, n]."""
    return parts.reshape(parts.shape[0], -1, n).sum(1)


def decode_matmul_reference(w, x=None, parts=None, x_bias=None, ln_scale=None, ln_bias=None, *,
                            eps: float = 1e-5, activation: str = ""):
    """The same product in plain `jnp`, summed: float32 [rows, N] (one part)."""
    v = 0.0
    if x is not None:
        v = v + x.astype(jnp.float32)
    if parts is not None:
        v = v + sum_parts(parts, w.shape[0])
    if x_bias is not None:
        v = v + x_bias.astype(jnp.float32)
    if ln_scale is not None:
        mean = v.mean(-1, keepdims=True)
        var = jnp.square(v - mean).mean(-1, keepdims=True)
        v = (v - mean) * lax.rsqrt(var + eps) * ln_scale.astype(jnp.float32) + ln_bias.astype(jnp.float32)
    if activation:
        v = _activation(activation, v)
    return jnp.dot(v.astype(w.dtype), w, preferred_element_type=jnp.float32)
