"""Causal attention over right-padded prompts on Hopper (sm_90): the prefill path, on Pallas's Mosaic GPU
backend. Its reference is `flash_attention.flash_attention_reference` (the tests and the GPU run compare
against it and against float64); other GPUs run the Triton kernel in `flash_attention.py`.

Why a second kernel: prefill at long sequences is bound by the matrix units, and the Triton kernel runs
QK^T, the softmax and PV one after another in every warp, so the matrix units idle through each softmax.
Here one program (a CTA) takes 2 x 64 query rows of one head and runs three warpgroups:
- a producer that loads key and value blocks with TMA into a ring of `stages` shared-memory slots, each
  slot's arrival signalled on a barrier, and reuses a slot once both consumers have released it;
- two consumers, 64 query rows each, that run QK^T and PV as warpgroup MMAs (wgmma) from shared memory
  (P from registers), with the online softmax in registers. A two-party barrier taken twice per key block
  staggers them by half a block: while one computes its softmax the other's matrix product runs, so the
  matrix units stay busy (the ping-pong schedule of FlashAttention-3).
Causality and `lengths` only decide how many key blocks each consumer visits: blocks wholly before a
consumer's first row run unmasked, the rest up to its last row (or the sequence end) run with the causal
mask, and the producer loads the larger of the two consumers' counts; a consumer with fewer blocks releases
the remaining slots unread. Right padding needs no key mask: a valid query never sees a later key. Query
rows of a consumer wholly past its sequence's length read nothing and are written as zeros.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

BLOCK_Q = 64  # query rows per consumer warpgroup: the M of one wgmma
CONSUMERS = 2
LOG2_E = math.log2(math.e)
SUPPORTED_HEAD_DIMS = (64, 128)
SUPPORTED_DTYPES = ("bfloat16", "float16")


def supports(q) -> bool:
    """Whether this kernel runs these inputs (the caller falls back to the Triton kernel otherwise)."""
    return q.shape[-1] in SUPPORTED_HEAD_DIMS and jnp.dtype(q.dtype).name in SUPPORTED_DTYPES


def default_blocks(seq: int, head_dim: int) -> tuple[int, int]:
    """(block_kv, stages): 128-key blocks, two slots deep (benchmarks/kernels.py sweeps the others)."""
    return (128 if seq >= 128 else 64), 2


def _visible_blocks(first_row, length, block_kv: int):
    """Key blocks that query rows [first_row, first_row + BLOCK_Q) see: up to the last row (causal) and not
    past the sequence's end; none for rows wholly past it."""
    causal = pl.cdiv(first_row + BLOCK_Q, block_kv)
    return jnp.where(first_row < length, jnp.minimum(causal, pl.cdiv(length, block_kv)), 0)


def _consumer(q_ref, o_ref, scratch, *, tile_start, length, batch, head, block_kv: int, stages: int,
              sm_scale: float, producer_steps):
    import jax.experimental.pallas.mosaic_gpu as plgpu

    q_smem2, k_smem, v_smem, k_ready, v_ready, q_ready, k_free, v_free, turn = scratch
    wg = lax.axis_index("wg")
    plgpu.set_max_registers(232, action="increase")
    q_smem = q_smem2.at[wg]
    first_row = tile_start + wg * BLOCK_Q
    steps = _visible_blocks(first_row, length, block_kv)
    full = jnp.minimum(lax.div(first_row, block_kv), steps)  # blocks wholly before the first row
    plgpu.copy_gmem_to_smem(q_ref.at[batch, pl.ds(first_row, BLOCK_Q), head], q_smem, q_ready.at[wg])
    plgpu.barrier_wait(q_ready.at[wg])
    scale = sm_scale * LOG2_E  # scores in base 2: exp2 below

    def rendezvous():  # both consumers arrive before either goes on
        plgpu.barrier_arrive(turn)
        plgpu.barrier_wait(turn)

    def block(j, carry, masked: bool):
        acc, m, l = carry
        slot = lax.rem(j, jnp.int32(stages))
        plgpu.barrier_wait(k_ready.at[slot])

        def scores(s_ref):
            plgpu.wgmma(s_ref, q_smem, plgpu.transpose_ref(k_smem.at[slot], (1, 0)))
            rendezvous()  # the other consumer's softmax ran while this product was issued
            return s_ref[...]
        s = pl.run_scoped(scores, plgpu.ACC((BLOCK_Q, block_kv), jnp.float32))
        plgpu.barrier_arrive(k_free.at[slot])
        if masked:
            rows = plgpu.broadcasted_iota(jnp.int32, s.shape, 0, layout=plgpu.Layout.WGMMA)
            keys = plgpu.broadcasted_iota(jnp.int32, s.shape, 1, layout=plgpu.Layout.WGMMA)
            s = jnp.where(first_row + rows >= j * block_kv + keys, s, -jnp.inf)
        m_next = jnp.maximum(m, s.max(axis=1) * scale)
        alpha = jnp.exp2(m - m_next)
        p = jnp.exp2(s * scale - lax.broadcast_in_dim(m_next, s.shape, [0]))  # one FMA per score
        acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
        l = l * alpha + p.sum(axis=1)
        p16 = p.astype(q_smem.dtype)
        plgpu.barrier_arrive(turn)  # softmax done: the other consumer may issue its product
        plgpu.barrier_wait(v_ready.at[slot])
        plgpu.barrier_wait(turn)

        def weighted_values(acc_ref):
            plgpu.wgmma(acc_ref, p16, v_smem.at[slot])
        acc = pl.run_state(weighted_values)(plgpu.ACC.init(acc))
        plgpu.barrier_arrive(v_free.at[slot])
        return acc, m_next, l

    def release(j, _):  # blocks the other consumer needs and this one does not: free their slots unread
        slot = lax.rem(j, jnp.int32(stages))
        plgpu.barrier_arrive(k_free.at[slot])
        plgpu.barrier_arrive(v_free.at[slot])
        rendezvous()
        rendezvous()

    head_dim = q_smem.shape[-1]
    acc = plgpu.layout_cast(jnp.zeros((BLOCK_Q, head_dim), jnp.float32), plgpu.Layout.WGMMA)
    m = plgpu.layout_cast(jnp.full((BLOCK_Q,), -jnp.inf, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
    l = plgpu.layout_cast(jnp.zeros((BLOCK_Q,), jnp.float32), plgpu.Layout.WGMMA.reduce(1))
    pl.when(wg == 1)(rendezvous)  # consumer 0 takes the matrix units first
    carry = lax.fori_loop(0, full, functools.partial(block, masked=False), (acc, m, l))
    acc, m, l = lax.fori_loop(full, steps, functools.partial(block, masked=True), carry)
    lax.fori_loop(steps, producer_steps, release, None)
    pl.when(wg == 0)(rendezvous)
    # l >= 1 for every row that saw a key (its max scores exp2(0)); rows that saw none keep acc = 0
    acc = acc / lax.broadcast_in_dim(jnp.maximum(l, 1e-30), acc.shape, [0])
    q_smem[...] = acc.astype(q_smem.dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(q_smem, o_ref.at[batch, pl.ds(first_row, BLOCK_Q), head])
    plgpu.wait_smem_to_gmem(0)


def _producer(k_ref, v_ref, scratch, *, batch, head, block_kv: int, stages: int, producer_steps):
    import jax.experimental.pallas.mosaic_gpu as plgpu

    _, k_smem, v_smem, k_ready, v_ready, _, k_free, v_free, _ = scratch
    plgpu.set_max_registers(40, action="decrease")

    def load(step, slot):
        keys = (batch, pl.ds(step * block_kv, block_kv), head)
        plgpu.copy_gmem_to_smem(k_ref.at[keys], k_smem.at[slot], k_ready.at[slot])
        plgpu.copy_gmem_to_smem(v_ref.at[keys], v_smem.at[slot], v_ready.at[slot])

    for i in range(stages):
        pl.when(i < producer_steps)(functools.partial(load, i, i))

    @pl.loop(0, jnp.maximum(producer_steps - stages, 0))
    def _(j):
        slot = lax.rem(j, jnp.int32(stages))  # the slot of block j, which block j + stages reuses
        plgpu.barrier_wait(k_free.at[slot])
        plgpu.barrier_wait(v_free.at[slot])
        load(j + stages, slot)


def _program(len_ref, q_ref, k_ref, v_ref, o_ref, *scratch, block_kv: int, stages: int, sm_scale: float,
             n_tiles: int, seq: int, use_lengths: bool):
    tile = n_tiles - 1 - lax.axis_index("q")  # the longest tiles first: the short ones fill the tail
    batch, head = lax.axis_index("batch"), lax.axis_index("heads")
    tile_start = tile * (CONSUMERS * BLOCK_Q)
    length = len_ref[batch] if use_lengths else jnp.int32(seq)
    producer_steps = jnp.maximum(*(_visible_blocks(tile_start + w * BLOCK_Q, length, block_kv)
                                   for w in range(CONSUMERS)))
    wg = lax.axis_index("wg")
    where = dict(batch=batch, head=head, block_kv=block_kv, stages=stages, producer_steps=producer_steps)
    pl.when(wg < CONSUMERS)(functools.partial(_consumer, q_ref, o_ref, scratch, tile_start=tile_start,
                                              length=length, sm_scale=sm_scale, **where))
    pl.when(wg == CONSUMERS)(functools.partial(_producer, k_ref, v_ref, scratch, **where))


@functools.partial(jax.jit, static_argnames=("block_kv", "stages", "use_lengths"))
def hopper_flash_attention(q, k, v, *, lengths=None, block_kv: int | None = None, stages: int | None = None,
                           use_lengths: bool = True):
    """q, k, v: [batch, seq, heads, head_dim] (bf16 or fp16, head_dim 64 or 128); lengths: [batch] valid
    lengths (right padding) or None. Causal, scale 1/sqrt(head_dim); rows past a length are unspecified
    (zeros for whole 64-row blocks past it). `use_lengths=False` ignores lengths (full causal work)."""
    import jax.experimental.pallas.mosaic_gpu as plgpu

    batch, seq, heads, head_dim = q.shape
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must have one shape, got {q.shape}, {k.shape}, {v.shape}")
    if not supports(q):
        raise ValueError(f"head_dim must be one of {SUPPORTED_HEAD_DIMS} and dtype one of {SUPPORTED_DTYPES}, "
                         f"got {head_dim} and {q.dtype}")
    d_kv, d_stages = default_blocks(seq, head_dim)
    block_kv, stages = block_kv or d_kv, stages or d_stages
    step = max(CONSUMERS * BLOCK_Q, block_kv)
    padded = -(-seq // step) * step
    if padded != seq:  # TMA moves whole blocks: pad the sequence, slice after
        q, k, v = (jnp.pad(x, ((0, 0), (0, padded - seq), (0, 0), (0, 0))) for x in (q, k, v))
    lengths = (jnp.full((batch,), seq, jnp.int32) if lengths is None
               else jnp.minimum(lengths.astype(jnp.int32), seq))
    n_tiles = padded // (CONSUMERS * BLOCK_Q)
    # 128-byte swizzled tiles of 64 columns: the layout wgmma reads without bank conflicts
    transforms = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    scratch = [plgpu.SMEM((CONSUMERS, BLOCK_Q, head_dim), q.dtype, transforms=transforms),
               plgpu.SMEM((stages, block_kv, head_dim), q.dtype, transforms=transforms),
               plgpu.SMEM((stages, block_kv, head_dim), q.dtype, transforms=transforms),
               plgpu.Barrier(num_barriers=stages), plgpu.Barrier(num_barriers=stages),
               plgpu.Barrier(num_barriers=CONSUMERS),
               plgpu.Barrier(num_arrivals=CONSUMERS, num_barriers=stages),
               plgpu.Barrier(num_arrivals=CONSUMERS, num_barriers=stages),
               plgpu.Barrier(num_arrivals=CONSUMERS)]
    body = functools.partial(_program, block_kv=block_kv, stages=stages, sm_scale=1.0 / math.sqrt(head_dim),
                             n_tiles=n_tiles, seq=seq, use_lengths=use_lengths)
    out = plgpu.kernel(
        body,
        out_type=jax.ShapeDtypeStruct(q.shape, q.dtype),
        grid=(heads, n_tiles, batch),  # heads vary fastest: every head's longest tile is in the first wave
        grid_names=("heads", "q", "batch"),
        num_threads=CONSUMERS + 1,
        thread_name="wg",
        scratch_types=scratch,
        compiler_params=plgpu.CompilerParams(approx_math=True),
    )(lengths, q, k, v)
    return out[:, :seq]
