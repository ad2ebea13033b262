"""Small-batch matmuls for the decode step: a few rows of activations times a whole weight matrix.

At decode a layer's products have 1-64 rows, so they are bound by reading the weights once; what costs time is
the launches, of the products and of the small XLA kernels between them (LayerNorm, bias, GELU, residual adds,
the K/V cache writes): on an H200 each launch leaves the GPU idle for a microsecond or two. One kernel here is a
product with its neighbours fused in, so a layer is four of them and attention:

- a LayerNorm prologue (optional), in float32 as each [rows, block_k] tile of the input is loaded, with the
  row's statistics from a first pass;
- the product, split over K (`splits`) so that a narrow output still puts enough programs on the chip to read
  the weights at full speed. Each split stores its float32 partial sum; the split of a column block that
  finishes last (it counts the finished splits on an atomic counter) adds them up in split order, so the
  result is the same whichever split finishes last;
- an epilogue on that sum: + bias, an activation, + a residual, the cast to the output's dtype, and for the
  QKV product the new token's K and V stored into the layer's cache at each row's position.

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

from gptjax.kernels import early_launch as pdl

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


def default_params(rows: int, k: int, n: int, unit: int | None = None, itemsize: int = 2,
                   ln: bool = False) -> MatmulParams:
    """Column blocks of 64 that divide `unit` (default n: with a K/V write, the hidden size, so no block
    straddles Q, K and V), then K split (in chunks of at least 64) until about TARGET_PROGRAMS programs read the
    weights. With a LayerNorm prologue (`ln`) and up to 16 rows, a program's whole chunk is one tile of at most
    64 KB, loaded before the statistics pass so the two overlap (8 warps hold it); otherwise 128-row K tiles in
    a 3-stage pipeline, shrunk until the tiles fit in shared memory (also when the chunk is no power of two, as
    at K = 768: Triton's blocks are). The H200 sweep of RESULTS run 13 chose
    these: 13-20% less kernel time than run 12's 128-column blocks."""
    block_n = _largest_block(unit or n, 64)
    splits = 1
    while (n // block_n) * splits * 2 <= TARGET_PROGRAMS and k % (splits * 2 * 64) == 0:
        splits *= 2
    chunk, block_rows = k // splits, _block_rows(rows)
    one_tile = chunk & (chunk - 1) == 0 and chunk * block_n * itemsize <= 64 << 10  # Triton's blocks: 2^n
    if ln and block_rows == MATRIX_ROWS and one_tile:
        return MatmulParams(block_n, chunk, splits, 8, 1)
    block_k, stages = _largest_block(chunk, 128), 3
    while stages * block_k * (block_rows * 4 + block_n * itemsize) > SHARED_MEMORY and block_k > 16:
        block_k //= 2
    return MatmulParams(block_n, block_k, splits, 4, stages)


def _block_rows(rows: int) -> int:
    return max(MATRIX_ROWS, pl.next_power_of_2(rows))


def _activation(name: str, v):
    return jax.nn.gelu(v, approximate=(name == "gelu_new"))


class _Shape(NamedTuple):
    """What a kernel instance is: its static shapes and which optional operands it has."""

    rows: int
    k: int
    hidden: int  # with a K/V write: columns [hidden, 2 hidden) are K, [2 hidden, 3 hidden) V
    chunk: int  # K rows per split
    params: MatmulParams
    ln: bool
    eps: float
    bias: bool
    activation: str
    residual: bool
    kv: bool
    interpret: bool  # the interpreter runs programs one at a time, and has no barrier
    early_launch: str  # where the next kernel's launch is issued: "start", "end" or "" (`early_launch.py`)


class _Refs(NamedTuple):
    """A program's operands by name (None where the kernel has no such operand)."""

    x: object
    scale: object
    shift: object
    w: object
    bias: object
    residual: object
    positions: object
    out: object
    parts: object
    counts: object
    k_cache: object
    v_cache: object


def _unpack(refs, s: _Shape) -> _Refs:
    """The pallas_call's refs in `decode_matmul`'s order: inputs, then outputs. The aliased inputs (counters,
    caches) are skipped: their outputs are the same buffers."""
    it = iter(refs)
    x, (scale, shift) = next(it), ((next(it), next(it)) if s.ln else (None, None))
    w = next(it)
    bias, residual, positions = (next(it) if on else None for on in (s.bias, s.residual, s.kv))
    split_k = s.params.splits > 1
    for _ in range(split_k + 2 * s.kv):
        next(it)
    out = next(it)
    parts, counts = (next(it), next(it)) if split_k else (None, None)
    k_cache, v_cache = (next(it), next(it)) if s.kv else (None, None)
    return _Refs(x, scale, shift, w, bias, residual, positions, out, parts, counts, k_cache, v_cache)


def _product(r: _Refs, s: _Shape, col, split):
    """This program's float32 partial product: LayerNorm(x)[:, chunk] @ w[chunk, columns], [block_rows, block_n]."""
    block_n, block_k, block_rows = s.params.block_n, s.params.block_k, _block_rows(s.rows)

    def load_x(k0, width: int):
        ok = lax.broadcasted_iota(jnp.int32, (block_rows, width), 0) < s.rows
        return plgpu.load(r.x.at[pl.ds(0, block_rows), pl.ds(k0, width)], mask=ok, other=0.0).astype(jnp.float32)

    def load_w(k0):
        return r.w[pl.ds(k0, block_k), pl.ds(col * block_n, block_n)]

    # a program of one weight tile loads it first: its read is in flight during the statistics pass
    first_w = load_w(split * s.chunk) if s.chunk == block_k else None

    if s.ln:
        mean, rstd = row_stats(load_x, s.k, block_rows, s.eps)

    def body(i, acc, w=None):
        k0 = split * s.chunk + i * block_k
        v = load_x(k0, block_k)
        if s.ln:
            v = normalise(v, mean, rstd, r.scale, r.shift, pl.ds(k0, block_k))
        w = load_w(k0) if w is None else w
        return acc + jnp.dot(v.astype(w.dtype), w, preferred_element_type=jnp.float32)

    zero = jnp.zeros((block_rows, block_n), jnp.float32)
    if first_w is not None:
        return body(0, zero, first_w)
    return lax.fori_loop(0, s.chunk // block_k, body, zero)


def row_stats(load_x, k: int, block_rows: int, eps: float):
    """LayerNorm's statistics of each row, (mean, 1 / std) [block_rows] in float32: one pass over the whole row in
    `STATS_BLOCK`-wide tiles, load_x(k0, width) -> [block_rows, width] float32."""
    width = _largest_block(k, STATS_BLOCK)

    def stats(i, carry):
        v = load_x(i * width, width)
        return carry[0] + jnp.sum(v, axis=1), carry[1] + jnp.sum(v * v, axis=1)

    zeros = jnp.zeros((block_rows,), jnp.float32)
    total, total_sq = lax.fori_loop(0, k // width, stats, (zeros, zeros))
    mean = total / k
    return mean, lax.rsqrt(jnp.maximum(total_sq / k - mean * mean, 0.0) + eps)


def normalise(v, mean, rstd, scale_ref, shift_ref, cols):
    """LayerNorm of the float32 tile v [block_rows, width] holding columns `cols` of the rows."""
    return ((v - mean[:, None]) * rstd[:, None] * scale_ref[cols].astype(jnp.float32)[None, :]
            + shift_ref[cols].astype(jnp.float32)[None, :])


def _epilogue_operands(r: _Refs, s: _Shape, c0, tile, rows_ok):
    """The bias [block_n] and residual [block_rows, block_n] tiles the epilogue adds (None where there are none),
    in float32: loaded by every program before its product, so that their reads overlap the weights' rather
    than follow the split sums."""
    bias = r.bias[pl.ds(c0, s.params.block_n)].astype(jnp.float32) if s.bias else None
    residual = (plgpu.load(r.residual.at[tile], mask=rows_ok, other=0.0).astype(jnp.float32) if s.residual
                else None)
    return bias, residual


def _finish(r: _Refs, s: _Shape, total, c0, tile, rows_ok, operands):
    """The epilogue on a column block's whole sum: bias, activation, residual (`_epilogue_operands`), then the
    output (or Q's output and K's and V's cache rows)."""
    bias, residual = operands
    if s.bias:
        total += bias[None, :]
    if s.activation:
        total = _activation(s.activation, total)
    if s.residual:
        total += residual
    if not s.kv:
        plgpu.store(r.out.at[tile], total.astype(r.out.dtype), mask=rows_ok)
        return

    @pl.when(c0 < s.hidden)
    def _():  # Q: the output
        plgpu.store(r.out.at[tile], total.astype(r.out.dtype), mask=rows_ok)

    for which, cache in ((1, r.k_cache), (2, r.v_cache)):  # K and V: into the cache
        pl.when((c0 >= which * s.hidden) & (c0 < (which + 1) * s.hidden))(
            functools.partial(_store_new_token, cache, r.positions, total, c0 - which * s.hidden, s.rows))


def _kernel(*refs, s: _Shape):
    """Program (col, split): output columns [col * block_n, +block_n) over K rows [split * chunk, +chunk)."""
    r = _unpack(refs, s)
    block_n, block_rows = s.params.block_n, _block_rows(s.rows)
    col, split = pl.program_id(0), pl.program_id(1)
    if s.early_launch == "start":
        col = pdl.launch_dependents(col)
    rows_ok = lax.broadcasted_iota(jnp.int32, (block_rows, block_n), 0) < s.rows
    c0 = col * block_n
    tile = (pl.ds(0, block_rows), pl.ds(c0, block_n))
    operands = _epilogue_operands(r, s, c0, tile, rows_ok)
    acc = _product(r, s, col, split)
    if s.early_launch == "end":
        acc = pdl.launch_dependents_after(acc)
    if s.params.splits == 1:
        _finish(r, s, acc, c0, tile, rows_ok, operands)
        return
    plgpu.store(r.parts.at[(split, *tile)], acc, mask=rows_ok)
    if not s.interpret:
        plgpu.debug_barrier()  # every thread's part is stored before the counter says so
    finished = plgpu.atomic_add(r.counts, (jnp.asarray(col, jnp.int32),), jnp.int32(1))  # acq-rel, GPU scope

    @pl.when(finished == s.params.splits - 1)
    def _():  # the last split: every other one's part is in memory; sum them in split order
        total = jnp.zeros((block_rows, block_n), jnp.float32)
        for p in range(s.params.splits):
            part = r.parts.at[(jnp.int32(p), *tile)]
            total += plgpu.load(part, mask=rows_ok, other=0.0, volatile=True)  # not an L1 copy: fresh
        _finish(r, s, total, c0, tile, rows_ok, operands)
        r.counts[col] = 0  # every split has counted: the counter is zero again for the next kernel


def _store_new_token(cache_ref, pos_ref, values, c0, rows: int):
    """Row r of values [block_rows, block_n] into cache_ref [slots, max_seq, hidden] at (r, pos[r], c0:)."""
    block_rows, block_n = values.shape
    row_of = lax.broadcasted_iota(jnp.int32, values.shape, 0)
    for r in range(rows):
        pos = jnp.clip(pos_ref[r], 0, cache_ref.shape[1] - 1)
        row = jnp.sum(jnp.where(row_of == r, values, 0.0), axis=0)
        cache_ref[r, pos, pl.ds(c0, block_n)] = row.astype(cache_ref.dtype)


def _check_operands(w, x, kv) -> int:
    """`decode_matmul`'s operands against each other (a ValueError naming the one that does not fit); the
    output's width: N, or the hidden size with a K/V write."""
    (k, n), rows = w.shape, x.shape[0]
    if not supports(rows, k, n) or x.shape[1] != k:
        raise ValueError(f"decode_matmul: input {x.shape} against weights {w.shape} "
                         f"(rows 1-{MAX_ROWS}, K and N multiples of 16)")
    hidden = n // 3 if kv is not None else n
    if kv is not None and (n % 3 or kv[0].shape[2:] != (hidden,) or kv[0].shape[0] < rows):
        raise ValueError(f"decode_matmul: a K/V write needs N = 3 x hidden and caches [slots >= {rows}, max_seq, "
                         f"{hidden}]; got N={n} and caches {kv[0].shape}")
    return hidden


@functools.partial(jax.jit, static_argnames=("eps", "activation", "out_dtype", "params", "interpret",
                                             "early_launch"))
def decode_matmul(w, x, ln_scale=None, ln_bias=None, *, bias=None, residual=None, activation: str = "",
                  out_dtype=jnp.float32, kv=None, counters=None, eps: float = 1e-5,
                  params: MatmulParams | None = None, interpret: bool = False, early_launch: bool | str | None = None):
    """epilogue(prologue(x) @ w), [rows, N] in `out_dtype`; with `kv` or `counters` a tuple: (that, the two
    updated caches if `kv`, the counters if `counters`).

    w: [K, N]; x: [rows, K]; ln_scale and ln_bias: [K] for a LayerNorm prologue. The epilogue, in float32:
    + bias [N], then activation ("gelu_new" | "gelu" | ""), then + residual [rows, N].
    kv: (k_cache, v_cache, positions) for a QKV product (N = 3 hidden, columns Q then K then V): caches [slots
    >= rows, max_seq, hidden]; row r's K and V are stored at (r, positions[r]), in place when the caller's
    buffers are donated, and the output is Q alone, [rows, hidden].
    counters: int32 zeros, at least N / 16 of them (`new_counters`), which a split product counts its
    finished splits on and leaves zero again: one buffer handed from kernel to kernel saves each kernel the
    memset of its own. early_launch: issue the next kernel's launch as each program starts ("start" or True) or
    once its product is done ("end"); None: as `early_launch.EARLY_LAUNCH` says, where the GPU has it
    (`early_launch.resolve`)."""
    k, n = w.shape
    rows = x.shape[0]
    hidden = _check_operands(w, x, kv)
    params = params or default_params(rows, k, n, hidden, w.dtype.itemsize, ln_scale is not None)
    chunk = k // params.splits
    if (n % params.block_n or chunk % params.block_k or k % params.splits or hidden % params.block_n
            or any(b & (b - 1) for b in (params.block_n, params.block_k))):
        raise ValueError(f"decode_matmul: {params} does not tile K={k}, N={n} (hidden {hidden}) in blocks of "
                         f"powers of two")
    n_cols = n // params.block_n
    if counters is not None and counters.shape[0] < n_cols:
        raise ValueError(f"decode_matmul: {counters.shape[0]} counters for {n_cols} column blocks")
    s = _Shape(rows, k, hidden, chunk, params, ln_scale is not None, eps, bias is not None, activation,
               residual is not None, kv is not None, interpret,
               pdl.resolve(early_launch, interpret))
    inputs = [x, *((ln_scale, ln_bias) if s.ln else ()), w, *(a for a in (bias, residual) if a is not None)]
    out_shape = [jax.ShapeDtypeStruct((rows, hidden), out_dtype)]
    aliases = {}
    if kv is not None:
        inputs.append(kv[2].astype(jnp.int32))
    split_k = params.splits > 1
    if split_k:  # each split's partial sums, and per column block the count of its finished splits
        counts = counters if counters is not None else new_counters(n)
        aliases[len(inputs)] = 2
        inputs.append(counts)
        out_shape += [jax.ShapeDtypeStruct((params.splits, rows, n), jnp.float32),
                      jax.ShapeDtypeStruct(counts.shape, jnp.int32)]
    if kv is not None:
        for cache in kv[:2]:
            aliases[len(inputs)] = len(out_shape)
            inputs.append(cache)
            out_shape.append(jax.ShapeDtypeStruct(cache.shape, cache.dtype))
    out = pl.pallas_call(
        functools.partial(_kernel, s=s), grid=(n_cols, params.splits), out_shape=out_shape,
        input_output_aliases=aliases,
        compiler_params=plgpu.CompilerParams(num_warps=params.num_warps, num_stages=params.num_stages),
        interpret=interpret, name=f"decode_matmul_{k}x{n}",
    )(*inputs)
    result = (out[0], *(out[-2:] if kv is not None else ()))
    if counters is not None:
        result += (out[2] if split_k else counters,)
    return result if len(result) > 1 else result[0]


def new_counters(*widths: int):
    """Zeros for the split counters of products with these output widths (one per 16 columns, the narrowest
    column block)."""
    return jnp.zeros((max(widths) // MATRIX_ROWS,), jnp.int32)


def decode_matmul_reference(w, x, ln_scale=None, ln_bias=None, *, bias=None, residual=None, activation: str = "",
                            out_dtype=jnp.float32, kv=None, counters=None, eps: float = 1e-5):
    """The same product in plain `jnp`, for XLA to compile (the same arguments and results)."""
    v = x.astype(jnp.float32)
    if ln_scale is not None:
        mean = v.mean(-1, keepdims=True)
        var = jnp.square(v - mean).mean(-1, keepdims=True)
        v = (v - mean) * lax.rsqrt(var + eps) * ln_scale.astype(jnp.float32) + ln_bias.astype(jnp.float32)
    out = jnp.dot(v.astype(w.dtype), w, preferred_element_type=jnp.float32)
    if bias is not None:
        out += bias.astype(jnp.float32)
    if activation:
        out = _activation(activation, out)
    if residual is not None:
        out += residual.astype(jnp.float32)
    result = (out.astype(out_dtype),)
    if kv is not None:
        k_cache, v_cache, positions = kv
        hidden, rows = k_cache.shape[2], jnp.arange(x.shape[0])
        positions = jnp.clip(positions, 0, k_cache.shape[1] - 1)
        k_new, v_new = out[:, hidden:2 * hidden], out[:, 2 * hidden:]
        result = (result[0][:, :hidden], k_cache.at[rows, positions].set(k_new.astype(k_cache.dtype)),
                  v_cache.at[rows, positions].set(v_new.astype(v_cache.dtype)))
    if counters is not None:
        result += (counters,)
    return result if len(result) > 1 else result[0]
