"""One query per sequence against its KV cache: the decode path.

`decode_attention` is the Pallas kernel (Triton backend on GPU; `interpret=True` runs it anywhere), and
`decode_attention_reference` is the plain `jnp` form: it is the "xla" implementation and the reference the
kernel is tested against.

Decode attention moves bytes, not FLOPs: each cache entry is read once and used for two multiply-adds per
element. The kernel reads only each sequence's valid entries (`lengths`) and splits the cache's sequence axis
into chunks (flash-decoding), so that a small batch still puts enough programs on the chip to saturate
memory bandwidth; each chunk leaves a partial output and its log-sum-exp, and the last of a head's chunks to
finish combines them in the same launch (`_store`), counting on an atomic counter. With enough programs to fill
the chip there is one chunk and nothing to combine.

Two forms of the program body, both tested against the reference:
- one head per program (`heads_per_program=1`): scores by elementwise products (`use_dot=False`), or on the
  matrix units with the query repeated over 16 rows (`use_dot=True`);
- a group of G heads per program: the program reads [block_k, G * head_dim] tiles, whole cache rows when G
  is every head, so its loads are long contiguous runs rather than one head's 128 bytes every few KB. Both
  products run on the matrix units against a block-diagonal query (column h holds head h's query in rows
  h*d..(h+1)*d): scores = K @ Q_bd is [block_k, G]; outputs = P^T @ V is [G, G * head_dim], of which head h
  keeps its own d columns. That multiplies the FLOPs by G (at most 16 per byte read, far under what the
  matrix units do at memory speed) to keep every reduction inside one matrix product.
Which form, block size and split count a shape gets comes from `decode_table.TABLE`, which the sweep
(`benchmarks/decode_sweep.py`) writes; shapes it does not cover get `default_params`.
A program walks its chunk's key blocks in one loop, every block masked at the sequence's end (`SINGLE_LOOP`).

`decode_attention_append` is a decode step's whole attention: it takes the step's query, key and value as
one [batch, 3, heads, head_dim] array (the QKV product's output, uncopied), attends over the cache's entries
before each row's position and the new key, and stores the new key and value into the caches in place: one
kernel where XLA would run a copy of each of q, k and v out of the product and a scatter of k and v.
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

from gptjax.cache import write_token
from gptjax.kernels import decode_table
from gptjax.kernels import early_launch as pdl

# aim for this many programs (several per multiprocessor of a 132-SM H100) before splitting the sequence
TARGET_PROGRAMS = 1024
# shorter chunks did not pay for the combine step when it was three more small kernels a layer; with it in the
# launch, 2-8 chunks were 3-5% faster than one at 8 rows x 520 keys on an H100 (RESULTS run 39), not yet re-swept
MIN_SPLIT_KEYS = 512
SHARED_MEMORY = 227 * 1024  # per block on an H100 or H200
MATRIX_ROWS = 16  # the matrix units' smallest tile side in Triton's dot
# Walk a chunk's key blocks in one loop, each masked at the row's end, rather than the whole blocks in one loop and
# the block that crosses the end in a second: the pipeline does not run on from one loop into the next, so the
# crossing block's load would start only once the whole blocks are done. The mask on whole blocks costs less than
# that wait at every shape timed (run 19d of benchmarks/RESULTS.md: 1-18% of device time, most on short rows).
SINGLE_LOOP = True


class DecodeParams(NamedTuple):
    heads_per_program: int
    block_k: int
    num_splits: int
    num_warps: int
    num_stages: int
    use_dot: bool  # one head per program only: the matrix-unit form


def default_params(batch: int, heads: int, max_seq: int, head_dim: int, itemsize: int = 2) -> DecodeParams:
    """The fallback for shapes the table does not cover: one head per program, matrix units (tuned on an
    H100, benchmarks/kernels.py)."""
    block_k, stages = min(128, max(16, pl.next_power_of_2(max_seq))), 3
    # the pipelined key and value tiles (and the 16-row query) live in shared memory: fp32 needs smaller ones
    while (16 + 2 * stages * block_k) * max(16, head_dim) * itemsize > SHARED_MEMORY and block_k > 16:
        block_k //= 2
    n_blocks = pl.cdiv(max_seq, block_k)
    splits = 1
    while (batch * heads * splits < TARGET_PROGRAMS and splits * 2 <= n_blocks
           and max_seq // (splits * 2) >= MIN_SPLIT_KEYS):
        splits *= 2
    return DecodeParams(1, block_k, splits, 4, stages, True)


def _nearest(entries, batch: int, max_seq: int):
    """The table item ((heads, head_dim, batch, max_seq), launch) nearest these on a log scale."""
    return min(entries, key=lambda item: abs(math.log2(item[0][2] / batch)) + abs(math.log2(item[0][3] / max_seq)))


def choose_params(batch: int, heads: int, max_seq: int, head_dim: int, itemsize: int = 2) -> DecodeParams:
    """The swept table's nearest entry for these heads x head_dim (nearest batch and cache length on a log
    scale), its split count rescaled to keep the keys per chunk; `default_params` when none fits."""
    entries = [(key, value) for key, value in decode_table.TABLE.items()
               if key[:2] == (heads, head_dim) and heads % value[0] == 0]
    if not entries or itemsize != 2:  # the sweep timed 16-bit caches
        return default_params(batch, heads, max_seq, head_dim, itemsize)

    (_, _, _, table_seq), entry = _nearest(entries, batch, max_seq)
    entry = DecodeParams(*entry)
    splits = max(1, min(round(max_seq / (table_seq / entry.num_splits)), pl.cdiv(max_seq, entry.block_k)))
    return entry._replace(block_k=min(entry.block_k, max(16, pl.next_power_of_2(max_seq))), num_splits=splits)


def _online_softmax_step(s, m_prev, l_prev, axis: int):
    """One block of the running softmax over scores s (base 2): the new max, the rescale of what came
    before, the block's probabilities and the new running sum, reduced along `axis` (the keys)."""
    m_next = jnp.maximum(m_prev, jnp.max(s, axis=axis))
    alpha = jnp.exp2(m_prev - m_next)
    p = jnp.exp2(s - (m_next[:, None] if axis == 1 else m_next[None, :]))
    return m_next, alpha, p, l_prev * alpha + jnp.sum(p, axis=axis)


def _key_blocks(length, start, chunk: int, block_k: int):
    """How many of this chunk's key blocks are whole (unmasked) and how many hold any valid key."""
    n_blocks_chunk = chunk // block_k
    remaining = jnp.maximum(length - start, 0)
    return (jnp.minimum(lax.div(remaining, block_k), n_blocks_chunk),
            jnp.minimum(pl.cdiv(remaining, block_k), n_blocks_chunk))


def _walk_blocks(body, carry, n_full, n_end, single: bool):
    """Run `body(j, carry, masked)` over the chunk's blocks [0, n_end), of which [0, n_full) are whole: in
    one masked loop (`single`, `SINGLE_LOOP`) or in two."""
    if single:
        return lax.fori_loop(0, n_end, functools.partial(body, masked=True), carry)
    carry = lax.fori_loop(0, n_full, functools.partial(body, masked=False), carry)
    return lax.fori_loop(n_full, n_end, functools.partial(body, masked=True), carry)


def _store(out_refs, out, lse, splits: int, interpret: bool):
    """A program's output: out [width] (its heads' columns, normalised) and lse [width] (each column its head's
    log-sum-exp, base 2; -inf for a chunk that saw no key). One chunk: the output. Several: the program stores
    its part and its log-sum-exps in its row of the heads' parts, then counts itself on their counter (heads, or
    head groups, vary fastest over the grid); the last of their chunks to count (every other part then in
    memory) combines the parts into the output and sets the counter back to zero, so a split launch needs no
    combine kernel after it."""
    if splits == 1:
        out_refs[0][...] = out.astype(out_refs[0].dtype)
        return
    o_ref, parts_ref, lse_ref, counts_ref = out_refs
    split, counter = pl.program_id(1), pl.program_id(2) * pl.num_programs(0) + pl.program_id(0)
    parts_ref[pl.ds(split, 1), :] = out[None, :]
    lse_ref[pl.ds(split, 1), :] = lse[None, :]
    if not interpret:
        plgpu.debug_barrier()  # every thread's stores are done before the counter says so
    finished = plgpu.atomic_add(counts_ref, (counter,), jnp.int32(1))  # acq-rel, GPU scope

    @pl.when(finished == splits - 1)
    def _():
        ok = lax.broadcasted_iota(jnp.int32, parts_ref.shape, 0) < splits  # rows past `splits` pad to 2^n
        lse_all = plgpu.load(lse_ref, mask=ok, other=-jnp.inf, volatile=True)  # volatile: not an L1 copy
        parts = plgpu.load(parts_ref, mask=ok, other=0.0, volatile=True)
        o_ref[...] = _combine(parts, lse_all).astype(o_ref.dtype)
        counts_ref[counter] = 0


def _log_sum_exp(m, l):
    """The running max and sum (base 2) -> log2 of the sum of exp2 over the chunk's keys; -inf where none."""
    return jnp.where(l == 0.0, -jnp.inf, m + jnp.log2(jnp.where(l == 0.0, 1.0, l)))


def _per_head_kernel(len_ref, q_ref, k_ref, v_ref, *refs, sm_scale: float, block_k: int, chunk: int,
                     splits: int, rows: int, max_seq: int, single: bool, early: str, append: bool = False,
                     interpret: bool = False):
    """rows == 1: scores and outputs by elementwise products and reductions. rows == 16: the query repeated
    over 16 rows so that both products run on the matrix units (whose smallest tile has 16 rows); that
    wastes FLOPs nobody needs but keeps reductions inside warps and lets Triton pipeline the tile loads.
    `append` (`decode_attention_append`): len_ref holds the new token's position, refs start with its key and
    value and end with the caches (aliased to k_ref and v_ref): the cache's keys before that position are
    read, the new one is taken from its ref and stored by the program whose chunk holds the position.
    `single`: the chunk's blocks in one loop (`SINGLE_LOOP`). `early`: where the next kernel's launch is
    issued (`early_launch`): as the program starts, or at the "end" of its walk over the keys. With `splits` > 1
    the outputs are the head's output, its parts and their log-sum-exps, and the counters (`_store`)."""
    length, out_refs, (k_new_ref, v_new_ref, k_out_ref, v_out_ref) = _split_refs(len_ref, refs, max_seq, append,
                                                                                 combine=splits > 1)
    start = _chunk_start(chunk, early)
    q_in = q_ref[...]
    head_dim = q_in.shape[-1]
    scale = sm_scale * math.log2(math.e)  # exp2 below
    q = q_in.astype(jnp.float32) * scale if rows == 1 else jnp.broadcast_to(q_in[None, :], (rows, head_dim))
    n_full, n_end = _key_blocks(length, start, chunk, block_k)

    def body(j, carry, masked: bool):
        k, v = _load_kv_block(k_ref, v_ref, j, block_k, start, length, masked)
        first_key = start + j * block_k
        return _attend_head_block(q, k, v, carry, scale, first_key if masked else None, length)

    carry = _head_carry(rows, head_dim)
    if append:
        def scores(k_new):
            return jnp.full((rows,), jnp.sum(q_in.astype(jnp.float32) * k_new.astype(jnp.float32)) * scale)
        carry = _new_key_first(carry, scores, k_new_ref, v_new_ref, k_out_ref, v_out_ref, start, chunk, length)
    acc, m, l = _walk_blocks(body, carry, n_full, n_end, single)
    if early == "end":
        acc = pdl.launch_dependents_after(acc)
    # every row holds the same numbers: keep one
    acc, m, l = jnp.max(acc, axis=0), jnp.max(m, axis=0, keepdims=True), jnp.max(l, axis=0, keepdims=True)
    acc = acc / jnp.where(l == 0.0, 1.0, l)
    _store(out_refs, acc, jnp.broadcast_to(_log_sum_exp(m, l), acc.shape), splits, interpret)


def _head_carry(rows: int, head_dim: int):
    """A head's running softmax before its first key: (acc [rows, d], max [rows], sum [rows])."""
    return (jnp.zeros((rows, head_dim), jnp.float32), jnp.full((rows,), -jnp.inf, jnp.float32),
            jnp.zeros((rows,), jnp.float32))


def _attend_head_block(q, k, v, carry, scale: float, first_key, length):
    """One key block of one head's running softmax: q [d] scaled (elementwise form) or [16, d] (the query on
    every row, matrix-unit form), k and v [block_k, d]; keys from `first_key` on at or past `length` are masked
    (first_key None: a whole block)."""
    acc, m_prev, l_prev = carry
    if q.ndim == 1:
        s = jnp.sum(k.astype(jnp.float32) * q[None, :], axis=1)[None, :]  # [1, block_k]
    else:
        s = plgpu.dot(q, k, trans_b=True) * scale  # [rows, block_k], every row the same
    if first_key is not None:
        kpos = first_key + lax.broadcasted_iota(jnp.int32, s.shape, 1)
        s = jnp.where(kpos < length, s, -jnp.inf)
    m_next, alpha, p, l_next = _online_softmax_step(s, m_prev, l_prev, axis=1)
    if q.ndim == 1:
        pv = jnp.sum(p[0][:, None] * v.astype(jnp.float32), axis=0)[None, :]
    else:
        pv = plgpu.dot(p.astype(v.dtype), v)
    return acc * alpha[:, None] + pv, m_next, l_next


def _chunk_start(chunk: int, early: str):
    """The first key of this program's chunk; with `early` "start", the trigger of `early_launch` comes first."""
    split = pl.program_id(1)
    return (pdl.launch_dependents(split) if early == "start" else split) * chunk


def _split_refs(len_ref, refs, max_seq: int, append: bool, combine: bool = False):
    """(the keys to read from the cache, the output refs, with `append` the new token's key and value refs and
    the caches' output refs, else Nones): without `append` len_ref holds lengths, with it the new token's
    position, and the cache's keys before it are read. Clipped here, not in a kernel of its own. `combine`:
    the counters' input (aliased to their output, which `out_refs` holds) comes after the step's key and value."""
    refs = list(refs)
    k_new_ref, v_new_ref = (refs.pop(0), refs.pop(0)) if append else (None, None)
    if combine:
        refs.pop(0)
    k_out_ref, v_out_ref = (refs.pop(-2), refs.pop(-1)) if append else (None, None)
    if not append:
        return jnp.clip(len_ref[...], 0, max_seq), refs, (None,) * 4
    return jnp.clip(len_ref[...], 0, max_seq - 1), refs, (k_new_ref, v_new_ref, k_out_ref, v_out_ref)


def _append_key(acc, m, l, s, v, owner):
    """The running softmax (acc [n, width], m and l [n], base 2) with one more key, of scores s [n] and values
    v [width], where `owner`; unchanged elsewhere, and safe on a chunk that has seen no key (m = -inf)."""
    s = jnp.where(owner, s, -jnp.inf)
    m_next = jnp.maximum(m, s)
    base = jnp.where(m_next == -jnp.inf, 0.0, m_next)
    alpha, p = jnp.exp2(m - base), jnp.exp2(s - base)
    return acc * alpha[:, None] + p[:, None] * v.astype(jnp.float32)[None, :], m_next, l * alpha + p


def _new_key_first(carry, scores, k_new_ref, v_new_ref, k_out_ref, v_out_ref, start, chunk: int, length):
    """The running softmax `carry` with the step's own key in it, and that key and value stored into the caches,
    by the program whose chunk holds the new token's position (`length`); `scores(k_new)` are its scores, one per
    row of the carry. Done as the program starts, so that these loads and stores overlap the walk over the cache
    (which reads only the keys before `length`) rather than adding a round trip after it."""
    k_new, v_new = k_new_ref[...], v_new_ref[...]
    owner = (start <= length) & (length < start + chunk)
    row = length - start

    @pl.when(owner)
    def _():
        k_out_ref[pl.ds(row, 1), :] = k_new[None, :].astype(k_out_ref.dtype)
        v_out_ref[pl.ds(row, 1), :] = v_new[None, :].astype(v_out_ref.dtype)

    return _append_key(*carry, scores(k_new), v_new, owner)


def _load_kv_block(k_ref, v_ref, j, block_k: int, start, length, masked: bool):
    """Key block j of a chunk starting at `start`, keys then values. `masked`: the one block that crosses the
    sequence's end, read without going past it (nor past the cache); its rows past the end are zeros."""
    idx = pl.ds(j * block_k, block_k)
    if not masked:
        return k_ref[idx, :], v_ref[idx, :]
    ok = (start + j * block_k + lax.broadcasted_iota(jnp.int32, (block_k, k_ref.shape[-1]), 0)) < length
    return plgpu.load(k_ref.at[idx, :], mask=ok, other=0.0), plgpu.load(v_ref.at[idx, :], mask=ok, other=0.0)


def _head_group_kernel(len_ref, q_ref, k_ref, v_ref, *refs, sm_scale: float, block_k: int, chunk: int,
                       splits: int, head_dim: int, cols: int, max_seq: int, single: bool, early: str,
                       append: bool = False, interpret: bool = False):
    """G heads of one sequence's chunk: q_ref [G*d], k_ref and v_ref [chunk, G*d]; `cols` = max(G, 16)
    columns of the block-diagonal query (those past G are zero and their results unused). `append`, `single`
    and `early`: as in `_per_head_kernel`, and `splits` too (the head group's counter)."""
    length, out_refs, (k_new_ref, v_new_ref, k_out_ref, v_out_ref) = _split_refs(len_ref, refs, max_seq, append,
                                                                                 combine=splits > 1)
    start = _chunk_start(chunk, early)
    q = q_ref[...]
    width = q.shape[0]
    head_of_row = lax.broadcasted_iota(jnp.int32, (width, cols), 0) // head_dim
    q_bd = jnp.where(head_of_row == lax.broadcasted_iota(jnp.int32, (width, cols), 1), q[:, None],
                     jnp.zeros((), q.dtype))
    scale = sm_scale * math.log2(math.e)
    n_full, n_end = _key_blocks(length, start, chunk, block_k)

    def body(j, carry, masked: bool):
        acc, m_prev, l_prev = carry
        k, v = _load_kv_block(k_ref, v_ref, j, block_k, start, length, masked)
        s = plgpu.dot(k, q_bd) * scale  # [block_k, cols]: column h is head h's scores
        if masked:
            kpos = start + j * block_k + lax.broadcasted_iota(jnp.int32, s.shape, 0)
            s = jnp.where(kpos < length, s, -jnp.inf)
        m_next, alpha, p, l_next = _online_softmax_step(s, m_prev, l_prev, axis=0)
        pv = plgpu.dot(p.astype(v.dtype), v, trans_a=True)  # [cols, width]: row h is head h's weights on all
        return acc * alpha[:, None] + pv, m_next, l_next

    carry = (jnp.zeros((cols, width), jnp.float32), jnp.full((cols,), -jnp.inf, jnp.float32),
             jnp.zeros((cols,), jnp.float32))
    if append:  # the new key's scores, column h head h's: elementwise, a one-row product being too small
        def scores(k_new):
            return jnp.sum(q_bd.astype(jnp.float32) * k_new.astype(jnp.float32)[:, None], axis=0) * scale
        carry = _new_key_first(carry, scores, k_new_ref, v_new_ref, k_out_ref, v_out_ref, start, chunk, length)
    acc, m, l = _walk_blocks(body, carry, n_full, n_end, single)
    if early == "end":
        acc = pdl.launch_dependents_after(acc)
    acc = acc / jnp.where(l == 0.0, 1.0, l)[:, None]
    own = (lax.broadcasted_iota(jnp.int32, (cols, width), 0)
           == lax.broadcasted_iota(jnp.int32, (cols, width), 1) // head_dim)  # head h's own d columns
    lse = jnp.max(jnp.where(own, _log_sum_exp(m, l)[:, None], -jnp.inf), axis=0)  # each column its head's
    _store(out_refs, jnp.sum(jnp.where(own, acc, 0.0), axis=0), lse, splits, interpret)


def _check_caches(k_cache, v_cache, batch: int, heads: int, head_dim: int, first_row: int = 0) -> int:
    """Raise ValueError unless the caches are [rows >= first_row + batch, max_seq, heads, head_dim]; return
    max_seq."""
    rows, max_seq = k_cache.shape[:2]
    if first_row < 0 or rows < first_row + batch or k_cache.shape[2:] != (heads, head_dim) \
            or v_cache.shape != k_cache.shape:
        raise ValueError(f"caches must be [rows >= {first_row + batch}, max_seq, {heads}, {head_dim}] (first_row "
                         f"{first_row} >= 0), got {k_cache.shape} and {v_cache.shape}")
    return max_seq


_OVERRIDES = ("heads_per_program", "block_k", "num_splits", "num_warps", "num_stages", "use_dot")


def _launch_params(batch: int, heads: int, max_seq: int, head_dim: int, dtype, overrides: dict) -> DecodeParams:
    """`choose_params`'s choice for a (power-of-two padded) head_dim, with the caller's overrides."""
    chosen = choose_params(batch, heads, max_seq, max(16, pl.next_power_of_2(head_dim)), jnp.dtype(dtype).itemsize)
    params = chosen._replace(**{k: v for k, v in overrides.items() if v is not None})
    if heads % params.heads_per_program:
        raise ValueError(f"heads_per_program={params.heads_per_program} must divide heads={heads}")
    return params


def _chunks(max_seq: int, params: DecodeParams) -> tuple[int, int]:
    """(keys per chunk, chunks): chunks are whole blocks; the last may reach past max_seq, and its masked loads
    never read there."""
    chunk = pl.cdiv(pl.cdiv(max_seq, params.num_splits), params.block_k) * params.block_k
    return chunk, pl.cdiv(max_seq, chunk)


@functools.partial(jax.jit, static_argnames=("interpret", "single_loop", "early_launch", "first_row", *_OVERRIDES))
def decode_attention(q, k_cache, v_cache, lengths, *, interpret: bool = False, block_k: int | None = None,
                     num_splits: int | None = None, num_warps: int | None = None,
                     num_stages: int | None = None, use_dot: bool | None = None,
                     heads_per_program: int | None = None, single_loop: bool | None = None,
                     early_launch: bool | str | None = None, counters=None, first_row: int = 0):
    """q: [batch, heads, head_dim]; caches: [rows >= first_row + batch, max_seq, heads, head_dim], of which the
    `batch` rows from `first_row` on are read (a part of the slots, as a step in two halves runs them); lengths:
    [batch] valid entries (including the current token). Scale 1/sqrt(head_dim). A
    sequence of length 0 gets zeros. The keyword arguments override `choose_params`'s choice, `single_loop`
    `SINGLE_LOOP`, and `early_launch` `early_launch.resolve` (where the next kernel's launch is issued: as
    each program starts, or at the end of its walk). counters: int32 zeros, at least batch x heads (the decode
    step's `decode_matmul.new_counters` buffer), on which a split launch counts each head's finished splits and
    leaves them zero again: given, the result is (out, counters), and the caller hands them on to the next launch
    rather than each launch zeroing its own."""
    batch, heads, head_dim = q.shape
    max_seq = _check_caches(k_cache, v_cache, batch, heads, head_dim, first_row)
    params = _launch_params(batch, heads, max_seq, head_dim, q.dtype, dict(
        heads_per_program=heads_per_program, block_k=block_k, num_splits=num_splits, num_warps=num_warps,
        num_stages=num_stages, use_dot=use_dot))
    padded_d = max(16, pl.next_power_of_2(head_dim))
    lengths = lengths.astype(jnp.int32)  # clipped to [0, max_seq] inside the kernel
    if padded_d != head_dim:  # whole-cache copy: only for head dims that are not a power of two
        q, k_cache, v_cache = (jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, padded_d - head_dim)])
                               for x in (q, k_cache, v_cache))
    out, counts = _attend(q, k_cache, v_cache, lengths, params, head_dim, interpret, single_loop, early_launch,
                          counters, first_row=first_row)
    return out[..., :head_dim] if counters is None else (out[..., :head_dim], counts)


@functools.partial(jax.jit, static_argnames=("interpret", "single_loop", "early_launch", "first_row", *_OVERRIDES))
def decode_attention_append(qkv, k_cache, v_cache, positions, *, interpret: bool = False,
                            block_k: int | None = None, num_splits: int | None = None,
                            num_warps: int | None = None, num_stages: int | None = None,
                            use_dot: bool | None = None, heads_per_program: int | None = None,
                            single_loop: bool | None = None, early_launch: bool | str | None = None,
                            counters=None, first_row: int = 0):
    """A decode step's attention with the step's own key and value: qkv [batch, 3, heads, head_dim] (the new
    token's query, key and value), caches [rows >= first_row + batch, max_seq, heads, head_dim] (qkv's rows are
    theirs from `first_row` on), positions [batch] (where each row's new token goes, < max_seq) -> (out [batch,
    heads, head_dim], the caches with the new keys and values stored). The same as storing them
    (`cache.write_token`) and running `decode_attention` over `positions + 1` entries, in one kernel (the caches
    updated in place, aliased): no scatter of K and V, nor a copy of each out of qkv, before it. Head dims that
    are not a power of two take the two steps."""
    batch, _, heads, head_dim = qkv.shape
    max_seq = _check_caches(k_cache, v_cache, batch, heads, head_dim, first_row)
    positions = positions.astype(jnp.int32)
    overrides = dict(heads_per_program=heads_per_program, block_k=block_k, num_splits=num_splits,
                     num_warps=num_warps, num_stages=num_stages, use_dot=use_dot)
    params = _launch_params(batch, heads, max_seq, head_dim, qkv.dtype, overrides)
    if head_dim != max(16, pl.next_power_of_2(head_dim)):  # padded caches would be copies
        k_cache, v_cache = write_token((k_cache, v_cache), qkv[:, 1], qkv[:, 2], positions, first_row)
        out = decode_attention(qkv[:, 0], k_cache, v_cache, positions + 1, interpret=interpret,
                               single_loop=single_loop, early_launch=early_launch, counters=counters,
                               first_row=first_row, **overrides)
        return (out, k_cache, v_cache) if counters is None else (out[0], k_cache, v_cache, out[1])
    (out, k_cache, v_cache), counts = _attend(qkv, k_cache, v_cache, positions, params, head_dim, interpret,
                                              single_loop, early_launch, counters, append=True, first_row=first_row)
    return (out, k_cache, v_cache) if counters is None else (out, k_cache, v_cache, counts)


def _attend(q, k_cache, v_cache, lengths, params: DecodeParams, head_dim: int, interpret: bool, single_loop,
            early_launch, counters, append: bool = False, first_row: int = 0):
    """The launch `params` say -> (its output, the counters): with `append`, the output is (out, k_cache,
    v_cache). A launch with splits combines them in the kernel, on `counters` (zeros of its own when None)."""
    batch, heads = q.shape[0], q.shape[-2]
    chunk, splits = _chunks(k_cache.shape[1], params)
    single = SINGLE_LOOP if single_loop is None else single_loop
    launch = _launch_per_head if params.heads_per_program == 1 else _launch_head_group
    counts = None
    if splits > 1:
        programs = batch * (heads // params.heads_per_program)  # a counter each (row, head or head group)
        counts = jnp.zeros((programs,), jnp.int32) if counters is None else counters
        if counts.shape[0] < programs:
            raise ValueError(f"decode attention: {counts.shape[0]} counters for {batch} rows x "
                             f"{heads // params.heads_per_program} heads (or head groups)")
    out = launch(q, k_cache, v_cache, lengths, params, chunk, splits, 1.0 / math.sqrt(head_dim), interpret, single,
                 pdl.resolve(early_launch, interpret), append, counts, first_row)
    if splits > 1:
        *out, counters = out
    return (tuple(out) if append else out[0]), counters


def _combine(parts, lse):
    """parts and lse [splits, width]: each chunk's normalised output and, column by column, its head's log-sum-exp
    (base 2) -> [width], the output over all the chunks' keys."""
    top = jnp.max(lse, axis=0)
    w = jnp.exp2(lse - jnp.where(top > -jnp.inf, top, 0.0)[None, :])  # empty chunks weigh 0
    total = jnp.sum(w, axis=0)
    return jnp.sum(parts * w, axis=0) / jnp.where(total == 0.0, 1.0, total)


def _launch_per_head(q, k_cache, v_cache, lengths, params: DecodeParams, chunk: int, splits: int,
                     sm_scale: float, interpret: bool, single: bool, early: str, append: bool, counters,
                     first_row: int = 0):
    """-> (out [batch, heads, d], *the caches if `append`, *the counters if split). `append`: q is the step's
    qkv [batch, 3, heads, d] and lengths its positions. Row b of q is the caches' row first_row + b."""
    batch, heads, d = q.shape[0], q.shape[-2], q.shape[-1]
    kernel = functools.partial(_per_head_kernel, sm_scale=sm_scale, block_k=params.block_k, chunk=chunk,
                               splits=splits, rows=MATRIX_ROWS if params.use_dot else 1, max_seq=k_cache.shape[1],
                               single=single, early=early, append=append, interpret=interpret)
    # heads vary fastest over the grid: neighbouring programs read neighbouring bytes of the cache
    cache_spec = pl.BlockSpec((None, chunk, None, d), lambda h, s, b: (b + first_row, s, h, 0))
    if append:  # the query, key and value: three views of qkv
        step = [pl.BlockSpec((None, None, None, d), lambda h, s, b, i=i: (b, i, h, 0)) for i in range(3)]
    else:
        step = [pl.BlockSpec((None, None, d), lambda h, s, b: (b, h, 0))]
    in_specs = [pl.BlockSpec((None,), lambda h, s, b: (b,)), step[0], cache_spec, cache_spec, *step[1:]]
    out_shape = [jax.ShapeDtypeStruct((batch, heads, d), q.dtype)]
    out_specs = [pl.BlockSpec((None, None, d), lambda h, s, b: (b, h, 0))]
    return _call(kernel, (heads, splits, batch), in_specs, out_shape, out_specs, cache_spec,
                 (lengths, q, k_cache, v_cache), params, "decode_attention", interpret, append, counters)


def _launch_head_group(q, k_cache, v_cache, lengths, params: DecodeParams, chunk: int, splits: int,
                       sm_scale: float, interpret: bool, single: bool, early: str, append: bool, counters,
                       first_row: int = 0):
    """As `_launch_per_head`, G heads a program."""
    batch, heads, d = q.shape[0], q.shape[-2], q.shape[-1]
    cache_shape = k_cache.shape
    rows, max_seq = cache_shape[:2]
    group = params.heads_per_program
    width, cols = group * d, max(group, MATRIX_ROWS)
    # [.., heads, d] -> [.., heads * d]: free (contiguous), and a group's slice is one run of G*d elements
    q, k_cache, v_cache = q.reshape(*q.shape[:-2], heads * d), *(c.reshape(rows, max_seq, heads * d)
                                                                 for c in (k_cache, v_cache))
    kernel = functools.partial(_head_group_kernel, sm_scale=sm_scale, block_k=params.block_k, chunk=chunk,
                               splits=splits, head_dim=d, cols=cols, max_seq=max_seq, single=single,
                               early=early, append=append, interpret=interpret)
    cache_spec = pl.BlockSpec((None, chunk, width), lambda g, s, b: (b + first_row, s, g))
    if append:  # the query, key and value: three views of qkv
        step = [pl.BlockSpec((None, None, width), lambda g, s, b, i=i: (b, i, g)) for i in range(3)]
    else:
        step = [pl.BlockSpec((None, width), lambda g, s, b: (b, g))]
    in_specs = [pl.BlockSpec((None,), lambda g, s, b: (b,)), step[0], cache_spec, cache_spec, *step[1:]]
    out_shape = [jax.ShapeDtypeStruct((batch, heads * d), q.dtype)]
    out_specs = [pl.BlockSpec((None, width), lambda g, s, b: (b, g))]
    out = _call(kernel, (heads // group, splits, batch), in_specs, out_shape, out_specs, cache_spec,
                (lengths, q, k_cache, v_cache), params, "decode_attention_heads", interpret, append, counters)
    caches = tuple(c.reshape(cache_shape) for c in out[1:3]) if append else ()
    return (out[0].reshape(batch, heads, d), *caches, *out[1 + len(caches):])


def _call(kernel, grid, in_specs, out_shape, out_specs, cache_spec, operands, params: DecodeParams, name: str,
          interpret: bool, append: bool, counters):
    """The launch over grid (heads or head groups, splits, batch) -> (out, *the caches if `append`, *the counters
    if split). A split launch also writes each program's part and log-sum-exps (`_store`) into rows padded to a
    power of two, and counts on `counters`, which it updates in place (aliased)."""
    batch, n, splits = grid[2], grid[0], grid[1]
    if splits > 1:
        rows, width = pl.next_power_of_2(splits), out_specs[0].block_shape[-1]
        part = jax.ShapeDtypeStruct((batch, n, rows, width), jnp.float32)
        part_spec = pl.BlockSpec((None, None, rows, width), lambda x, s, b: (b, x, 0, 0))
        out_shape += [part, part, jax.ShapeDtypeStruct(counters.shape, jnp.int32)]
        out_specs += [part_spec, part_spec, pl.no_block_spec]
    n_out = len(out_shape)
    operands, aliases = _append_operands(out_shape, out_specs, cache_spec, operands, append)
    if splits > 1:
        aliases[len(operands)] = n_out - 1
        operands, in_specs = (*operands, counters), [*in_specs, pl.no_block_spec]
    out = pl.pallas_call(
        kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape, input_output_aliases=aliases,
        compiler_params=plgpu.CompilerParams(num_warps=params.num_warps, num_stages=params.num_stages),
        interpret=interpret, name=name + ("_append" if append else ""),
    )(*operands)
    return (out[0], *(out[-2:] if append else ()), *((out[n_out - 1],) if splits > 1 else ()))


def _append_operands(out_shape: list, out_specs: list, cache_spec, operands: tuple, append: bool):
    """With `append`, the launch's operands and outputs grow: qkv twice more (the key's and the value's
    views) and the caches as outputs, aliased to their inputs so that only the new entries are stored.
    Returns (operands, input_output_aliases); extends out_shape and out_specs in place."""
    if not append:
        return operands, {}
    lengths, qkv, k_cache, v_cache = operands
    aliases = {2: len(out_shape), 3: len(out_shape) + 1}
    out_shape += [jax.ShapeDtypeStruct(k_cache.shape, k_cache.dtype)] * 2
    out_specs += [cache_spec] * 2
    return (lengths, qkv, k_cache, v_cache, qkv, qkv), aliases


def decode_attention_reference(q, k_cache, v_cache, lengths):
    """q: [batch, heads, head_dim]; caches: [rows >= batch, max_seq, heads, head_dim]; lengths: [batch] valid
    entries."""
    head_dim = q.shape[-1]
    k_cache, v_cache = k_cache[: q.shape[0]], v_cache[: q.shape[0]]
    scores = jnp.einsum("bhd,bkhd->bhk", q, k_cache, preferred_element_type=jnp.float32)
    scores = scores / jnp.sqrt(jnp.float32(head_dim))
    valid = jnp.arange(k_cache.shape[1])[None, None, :] < lengths[:, None, None]
    probs = jax.nn.softmax(jnp.where(valid, scores, -jnp.inf), axis=-1)
    out = jnp.einsum("bhk,bkhd->bhd", probs.astype(v_cache.dtype), v_cache, preferred_element_type=jnp.float32)
    return out.astype(q.dtype)
