"""One query per sequence against its KV cache: the decode path.

`decode_attention` is the Pallas kernel (Triton backend on GPU; `interpret=True` runs it anywhere), and
`decode_attention_reference` is the plain `jnp` form: it is the "xla" implementation and the reference the
kernel is tested against.

Decode attention moves bytes, not FLOPs: each cache entry is read once and used for two multiply-adds per
element. The kernel reads only each sequence's valid entries (`lengths`) and splits the cache's sequence axis
into chunks (flash-decoding), so that a small batch still puts enough programs on the chip to saturate
memory bandwidth; each chunk leaves a partial output and its log-sum-exp, and a small `jnp` step combines
them. With enough (sequence, head) pairs to fill the chip there is one chunk and no combine step.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

# aim for this many programs (several per multiprocessor of a 132-SM H100) before splitting the sequence
TARGET_PROGRAMS = 1024
MIN_SPLIT_KEYS = 512  # shorter chunks are not worth a combine step (three more small kernels per layer)


SHARED_MEMORY = 227 * 1024  # per block on an H100


def default_params(batch: int, heads: int, max_seq: int, head_dim: int,
                   itemsize: int = 2) -> tuple[int, int, int, int, bool]:
    """(block_k, num_splits, num_warps, num_stages, use_dot), tuned on an H100 (benchmarks/kernels.py)."""
    block_k, stages = min(128, max(16, pl.next_power_of_2(max_seq))), 3
    # the pipelined key and value tiles (and the 16-row query) live in shared memory: fp32 needs smaller ones
    while (16 + 2 * stages * block_k) * max(16, head_dim) * itemsize > SHARED_MEMORY and block_k > 16:
        block_k //= 2
    n_blocks = -(-max_seq // block_k)
    splits = 1
    while (batch * heads * splits < TARGET_PROGRAMS and splits * 2 <= n_blocks
           and max_seq // (splits * 2) >= MIN_SPLIT_KEYS):
        splits *= 2
    return block_k, splits, 4, stages, True


def _decode_kernel(len_ref, q_ref, k_ref, v_ref, *out_refs, sm_scale: float, block_k: int, chunk: int,
                   split: bool, rows: int):
    """rows == 1: scores and outputs by elementwise products and reductions. rows == 16: the query repeated
    over 16 rows so that both products run on the matrix units (whose smallest tile has 16 rows); that
    wastes FLOPs nobody needs but keeps reductions inside warps and lets Triton pipeline the tile loads."""
    s_idx = pl.program_id(1)
    length = len_ref[...]
    start = s_idx * chunk
    q = q_ref[...]
    head_dim = q.shape[-1]
    scale = sm_scale * math.log2(math.e)  # exp2 below
    if rows == 1:
        q = q.astype(jnp.float32) * scale
    else:
        q = jnp.broadcast_to(q[None, :], (rows, head_dim))
    n_blocks_chunk = chunk // block_k
    remaining = jnp.maximum(length - start, 0)
    n_full = jnp.minimum(lax.div(remaining, block_k), n_blocks_chunk)
    n_end = jnp.minimum(pl.cdiv(remaining, block_k), n_blocks_chunk)

    def body(j, carry, masked: bool):
        acc, m_prev, l_prev = carry
        idx = pl.ds(j * block_k, block_k)
        if masked:  # the one block that crosses the sequence's end: never read past it (nor past the cache)
            ok = (start + j * block_k + lax.broadcasted_iota(jnp.int32, (block_k, head_dim), 0)) < length
            k = plgpu.load(k_ref.at[idx, :], mask=ok, other=0.0)
            v = plgpu.load(v_ref.at[idx, :], mask=ok, other=0.0)
        else:
            k = k_ref[idx, :]
            v = v_ref[idx, :]
        if rows == 1:
            s = jnp.sum(k.astype(jnp.float32) * q[None, :], axis=1)[None, :]  # [1, block_k]
        else:
            s = plgpu.dot(q, k, trans_b=True) * scale  # [rows, block_k], every row the same
        if masked:
            kpos = start + j * block_k + lax.broadcasted_iota(jnp.int32, s.shape, 1)
            s = jnp.where(kpos < length, s, -jnp.inf)
        m_next = jnp.maximum(m_prev, jnp.max(s, axis=1))
        alpha = jnp.exp2(m_prev - m_next)
        p = jnp.exp2(s - m_next[:, None])
        l_next = l_prev * alpha + jnp.sum(p, axis=1)
        if rows == 1:
            pv = jnp.sum(p[0][:, None] * v.astype(jnp.float32), axis=0)[None, :]
        else:
            pv = plgpu.dot(p.astype(v.dtype), v)
        return acc * alpha[:, None] + pv, m_next, l_next

    carry = (jnp.zeros((rows, head_dim), jnp.float32), jnp.full((rows,), -jnp.inf, jnp.float32),
             jnp.zeros((rows,), jnp.float32))
    carry = lax.fori_loop(0, n_full, functools.partial(body, masked=False), carry)
    acc, m, l = lax.fori_loop(n_full, n_end, functools.partial(body, masked=True), carry)
    # every row holds the same numbers: keep one
    acc, m, l = jnp.max(acc, axis=0), jnp.max(m, axis=0, keepdims=True), jnp.max(l, axis=0, keepdims=True)
    safe_l = jnp.where(l == 0.0, 1.0, l)
    if split:
        o_ref, lse_ref = out_refs
        o_ref[...] = acc / safe_l
        # log2-sum-exp2 of this chunk's scores; -inf for a chunk past the sequence's end
        lse_ref[...] = jnp.where(l == 0.0, -jnp.inf, m + jnp.log2(safe_l))
    else:
        (o_ref,) = out_refs
        o_ref[...] = (acc / safe_l).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("interpret", "block_k", "num_splits", "num_warps", "num_stages",
                                             "use_dot"))
def decode_attention(q, k_cache, v_cache, lengths, *, interpret: bool = False, block_k: int | None = None,
                     num_splits: int | None = None, num_warps: int | None = None,
                     num_stages: int | None = None, use_dot: bool | None = None):
    """q: [batch, heads, head_dim]; caches: [rows >= batch, max_seq, heads, head_dim], of which the first `batch`
    rows are read; lengths: [batch] valid entries (including the current token). Scale 1/sqrt(head_dim). A
    sequence of length 0 gets zeros."""
    batch, heads, head_dim = q.shape
    rows, max_seq = k_cache.shape[:2]
    if rows < batch or k_cache.shape[2:] != (heads, head_dim) or v_cache.shape != k_cache.shape:
        raise ValueError(f"caches must be [rows >= {batch}, max_seq, {heads}, {head_dim}], "
                         f"got {k_cache.shape} and {v_cache.shape}")
    d_bk, d_splits, d_warps, d_stages, d_dot = default_params(batch, heads, max_seq, pl.next_power_of_2(head_dim),
                                                              q.dtype.itemsize)
    block_k, splits = block_k or d_bk, num_splits or d_splits
    num_warps, num_stages = num_warps or d_warps, num_stages or d_stages
    use_dot = d_dot if use_dot is None else use_dot
    lengths = jnp.clip(lengths.astype(jnp.int32), 0, max_seq)
    padded_d = max(16, pl.next_power_of_2(head_dim))
    if padded_d != head_dim:  # whole-cache copy: only for head dims that are not a power of two
        pad = lambda x: jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, padded_d - head_dim)])
        q, k_cache, v_cache = pad(q), pad(k_cache), pad(v_cache)
    # chunks are whole blocks; the last chunk may reach past max_seq, and its masked loads never read there
    chunk = -(-(-(-max_seq // splits)) // block_k) * block_k
    splits = -(-max_seq // chunk)
    split = splits > 1

    kernel = functools.partial(_decode_kernel, sm_scale=1.0 / math.sqrt(head_dim), block_k=block_k, chunk=chunk,
                               split=split, rows=16 if use_dot else 1)
    # heads vary fastest over the grid: neighbouring programs read neighbouring bytes of the cache
    in_specs = [pl.BlockSpec((None,), lambda h, s, b: (b,)),
                pl.BlockSpec((None, None, padded_d), lambda h, s, b: (b, h, 0)),
                pl.BlockSpec((None, chunk, None, padded_d), lambda h, s, b: (b, s, h, 0)),
                pl.BlockSpec((None, chunk, None, padded_d), lambda h, s, b: (b, s, h, 0))]
    if split:
        out_shape = [jax.ShapeDtypeStruct((batch, heads, splits, padded_d), jnp.float32),
                     jax.ShapeDtypeStruct((batch, heads, splits, 1), jnp.float32)]
        out_specs = [pl.BlockSpec((None, None, None, padded_d), lambda h, s, b: (b, h, s, 0)),
                     pl.BlockSpec((None, None, None, 1), lambda h, s, b: (b, h, s, 0))]
    else:
        out_shape = jax.ShapeDtypeStruct((batch, heads, padded_d), q.dtype)
        out_specs = pl.BlockSpec((None, None, padded_d), lambda h, s, b: (b, h, 0))
    out = pl.pallas_call(
        kernel,
        grid=(heads, splits, batch),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="decode_attention",
    )(lengths, q, k_cache, v_cache)
    if split:
        o_parts, lse = out
        lse = lse[..., 0]  # [batch, heads, splits], base 2
        top = jnp.max(lse, axis=-1, keepdims=True)
        w = jnp.exp2(lse - jnp.where(jnp.isfinite(top), top, 0.0))  # empty chunks weigh 0
        total = jnp.sum(w, axis=-1, keepdims=True)
        out = jnp.sum(o_parts * (w / jnp.where(total == 0.0, 1.0, total))[..., None], axis=2).astype(q.dtype)
    return out[..., :head_dim]


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
