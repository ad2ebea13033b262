"""Causal attention over a whole (right-padded) prompt: the prefill path.

`flash_attention` is the Pallas kernel (Triton backend on GPU; `interpret=True` runs it anywhere), and
`flash_attention_reference` is the plain `jnp` form: it is the "xla" implementation and the reference the
kernel is tested against.

The kernel is FlashAttention-2's forward pass: one program per (query block, head, sequence) keeps its
query tile and an fp32 output accumulator on chip and streams key/value blocks past them with an online
softmax. Causality and the ragged `lengths` only decide which key blocks a program visits: blocks wholly in
the past and inside the sequence run unmasked, the (at most two) blocks that cross the diagonal or the
sequence end run masked, and blocks past either are never read. Query blocks past a sequence's length are
skipped and written as zeros, so padding never holds NaN that later layers could pick up.
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

# finite, so a block of masked scores against a running max of -inf gives exp(-inf) = 0, never NaN
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
LOG2_E = math.log2(math.e)


SHARED_MEMORY = 227 * 1024  # per block on an H100


class BlockSizes(NamedTuple):
    """One launch's tuning: tile sizes, Triton's warps and pipeline stages, and the launch order."""

    block_q: int
    block_k: int
    num_warps: int
    num_stages: int
    heads_first: bool


def _shared_bytes(block_q: int, block_k: int, stages: int, head_dim: int, itemsize: int) -> int:
    """What Triton keeps in shared memory: the query tile and `stages` key and value tiles."""
    return (block_q + 2 * stages * block_k) * max(16, head_dim) * itemsize


def default_blocks(seq: int, head_dim: int, itemsize: int = 2) -> BlockSizes:
    """Tuned on an H100 (benchmarks/kernels.py)."""
    if head_dim <= 64 and seq <= 1024:
        block_q, block_k, warps, stages, heads_first = 128, 64, 8, 3, False
    elif head_dim <= 64:
        block_q, block_k, warps, stages, heads_first = 128, 64, 8, 4, True
    else:
        block_q, block_k, warps, stages, heads_first = 128, 128, 8, 3, False
    cap = max(16, pl.next_power_of_2(seq))
    block_q, block_k = min(block_q, cap), min(block_k, cap)
    # seen on an H100: 288 KiB asked for bf16 128x128 tiles, head_dim 128, 4 stages. fp32 tiles are twice the
    # bytes: give up stages, then key rows, until they fit
    while _shared_bytes(block_q, block_k, stages, head_dim, itemsize) > SHARED_MEMORY and stages > 2:
        stages -= 1
    while _shared_bytes(block_q, block_k, stages, head_dim, itemsize) > SHARED_MEMORY and block_k > 16:
        block_k //= 2
    return BlockSizes(block_q, block_k, warps, stages, heads_first)


def _flash_kernel(len_ref, q_ref, k_ref, v_ref, o_ref, *, sm_scale: float, block_q: int, block_k: int,
                  causal: bool, n_q_blocks: int, q_axis: int):
    # query blocks go from the last (the most key blocks) to the first, so the short ones fill the tail
    qi = n_q_blocks - 1 - pl.program_id(q_axis)
    length = len_ref[...]
    q_start = qi * block_q
    q = q_ref[...]  # [block_q, head_dim]
    head_dim = q.shape[-1]
    scale = sm_scale * LOG2_E  # exp2 instead of exp

    def body(j, carry, masked: bool):
        acc, m_prev, l_prev = carry
        k = k_ref[pl.ds(j * block_k, block_k), :]
        v = v_ref[pl.ds(j * block_k, block_k), :]
        s = plgpu.dot(q, k, trans_b=True)  # [block_q, block_k] fp32, unscaled
        if masked:
            kpos = j * block_k + lax.broadcasted_iota(jnp.int32, (block_q, block_k), 1)
            ok = kpos < length
            if causal:
                ok = ok & (kpos <= q_start + lax.broadcasted_iota(jnp.int32, (block_q, block_k), 0))
            s = jnp.where(ok, s, MASK_VALUE)
        # the scale goes into the max and the exponent's one fused multiply-add, not a pass of its own
        m_next = jnp.maximum(m_prev, jnp.max(s, axis=1) * scale)
        alpha = jnp.exp2(m_prev - m_next)
        p = jnp.exp2(s * scale - m_next[:, None])
        l_next = l_prev * alpha + jnp.sum(p, axis=1)
        acc = acc * alpha[:, None] + plgpu.dot(p.astype(v.dtype), v)
        return acc, m_next, l_next

    n_valid = pl.cdiv(length, block_k)
    if causal:
        n_end = jnp.minimum(lax.div(q_start + block_q + block_k - 1, block_k), n_valid)
        n_full = jnp.minimum(lax.div(q_start, block_k), lax.div(length, block_k))
    else:
        n_end = n_valid
        n_full = lax.div(length, block_k)
    n_end = jnp.where(q_start < length, n_end, 0)
    n_full = jnp.minimum(n_full, n_end)

    carry = (jnp.zeros((block_q, head_dim), jnp.float32), jnp.full((block_q,), -jnp.inf, jnp.float32),
             jnp.zeros((block_q,), jnp.float32))
    carry = lax.fori_loop(0, n_full, functools.partial(body, masked=False), carry)
    acc, _, l = lax.fori_loop(n_full, n_end, functools.partial(body, masked=True), carry)
    l = jnp.where(l == 0.0, 1.0, l)  # skipped blocks: zeros, not NaN
    o_ref[...] = (acc / l[:, None]).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("causal", "interpret", "block_q", "block_k", "num_warps",
                                             "num_stages", "heads_first"))
def flash_attention(q, k, v, *, lengths=None, causal: bool = True, interpret: bool = False,
                    block_q: int | None = None, block_k: int | None = None, num_warps: int | None = None,
                    num_stages: int | None = None, heads_first: bool | None = None):
    """q, k, v: [batch, seq, heads, head_dim]; lengths: [batch] valid lengths (right padding) or None.

    Scale 1/sqrt(head_dim). Output rows past a sequence's length are unspecified (this kernel writes zeros
    for whole query blocks past it). fp32 inputs use TF32 matrix units on GPU. The rest are tuning knobs:
    tile sizes, Triton's warps and pipeline stages, and the launch order (`heads_first`: all heads' last
    query blocks first, then the next-to-last, ...; otherwise one head's query blocks after another, which
    shares its keys and values in L2).
    """
    batch, seq, heads, head_dim = q.shape
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must have one shape, got {q.shape}, {k.shape}, {v.shape}")
    d = default_blocks(seq, pl.next_power_of_2(head_dim), q.dtype.itemsize)
    block_q, block_k = block_q or d.block_q, block_k or d.block_k
    num_warps, num_stages = num_warps or d.num_warps, num_stages or d.num_stages
    heads_first = d.heads_first if heads_first is None else heads_first
    lengths = (jnp.full((batch,), seq, jnp.int32) if lengths is None
               else jnp.minimum(lengths.astype(jnp.int32), seq))

    # tiles want power-of-two head dims of at least 16 and sequences in whole blocks: pad, slice after
    padded_d = max(16, pl.next_power_of_2(head_dim))
    padded_seq = pl.cdiv(seq, max(block_q, block_k)) * max(block_q, block_k)
    if padded_d != head_dim or padded_seq != seq:
        pad = ((0, 0), (0, padded_seq - seq), (0, 0), (0, padded_d - head_dim))
        q, k, v = (jnp.pad(x, pad) for x in (q, k, v))

    n_q_blocks = padded_seq // block_q
    kernel = functools.partial(_flash_kernel, sm_scale=1.0 / math.sqrt(head_dim), block_q=block_q,
                               block_k=block_k, causal=causal, n_q_blocks=n_q_blocks, q_axis=2 if heads_first else 0)
    grid = (heads, batch, n_q_blocks) if heads_first else (n_q_blocks, heads, batch)
    order = functools.partial(_in_launch_order, heads_first=heads_first)
    q_spec = pl.BlockSpec((None, block_q, None, padded_d), order(lambda i, h, b: (b, n_q_blocks - 1 - i, h, 0)))
    kv_spec = pl.BlockSpec((None, padded_seq, None, padded_d), order(lambda i, h, b: (b, 0, h, 0)))
    out = pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=[pl.BlockSpec((None,), order(lambda i, h, b: (b,))), q_spec, kv_spec, kv_spec],
        out_specs=q_spec,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="flash_attention",
    )(lengths, q, k, v)
    return out[:, :seq, :, :head_dim]


def _in_launch_order(index_map, heads_first: bool):
    """An index map written over (query block, head, sequence), for the grid in its launch order."""
    if not heads_first:
        return index_map

    def heads_first_map(h, b, i):
        return index_map(i, h, b)
    return heads_first_map


def flash_attention_reference(q, k, v, *, lengths=None, causal=True):
    """q, k, v: [batch, seq, heads, head_dim]; lengths: [batch] valid lengths (right padding) or None."""
    batch, seq, heads, head_dim = q.shape
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
    scores = scores / jnp.sqrt(jnp.float32(head_dim))
    kpos = jnp.arange(k.shape[1])
    mask = jnp.ones((seq, k.shape[1]), bool)
    if causal:
        mask = kpos[None, :] <= jnp.arange(seq)[:, None]
    mask = mask[None, None]
    if lengths is not None:
        mask = mask & (kpos[None, None, None, :] < lengths[:, None, None, None])
    scores = jnp.where(mask, scores, -jnp.inf)
    # rows with no valid key (padding past a length) would be NaN; they are unspecified, keep them finite
    scores = jnp.where(mask.any(-1, keepdims=True), scores, 0.0)
    probs = jax.nn.softmax(scores, axis=-1)
    return jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32).astype(q.dtype)
