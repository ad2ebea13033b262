"""Causal attention over right-padded prompts on Hopper (sm_90): the prefill path, on Pallas's Mosaic GPU
backend. Its reference is `flash_attention.flash_attention_reference` (the tests and the GPU run compare
against it and against float64); other GPUs run the Triton kernel in `flash_attention.py`.

Why a second kernel: prefill at long sequences is bound by the matrix units, and the Triton kernel runs
QK^T, the softmax and PV one after another in every warp, so the matrix units idle through each softmax.
Here a program (a CTA; by default one per multiprocessor, persistent) takes tiles of 2 x 64 query rows of one
head in turn, numbered one head after another (each head's longest first) and dealt in a snake order so that the
programs' sums of work come out nearly even, and runs three warpgroups. Head by head, the programs at work at any
moment share a few heads' keys and values in L2; every head's longest tiles first (`head_major=False`) had all
heads in flight and read them from memory again and again: at (2, 4096, 32, 128) fp16 51% of the memory's
bandwidth against 13% head by head, and (likely by the power that took) a lower clock (1.54 GHz against 1.67 under
Nsight Compute), so the kernel was 6% slower for 2% fewer cycles (run 22 of benchmarks/RESULTS.md).
The three warpgroups:
- a producer that loads key and value blocks with TMA into a ring of `stages` shared-memory slots, each
  slot's arrival signalled on a barrier, and reuses a slot once both consumers have released it; the ring
  runs on across tiles, so the next tile's first blocks load while the consumers finish the last one;
- two consumers, 64 query rows each, that load their query rows with TMA (the next tile's while this one's
  last blocks run: two query buffers each, `prefetch_q`) and run QK^T and PV as warpgroup MMAs (wgmma) from
  shared memory (P from registers), with the online softmax in registers. A two-party barrier taken twice per key block
  staggers them by half a block: while one computes its softmax the other's matrix product runs, so the
  matrix units stay busy (the ping-pong schedule of FlashAttention-3). At head_dim 64 the stagger runs on
  from one tile into the next (`carry_stagger`): consumer 0 finishes a tile, writes its rows out and starts
  the next tile's first product while consumer 1 is still on the last block, rather than both meeting at each
  tile's end and consumer 1 waiting half a block at each start. Run 19e of benchmarks/RESULTS.md: 1.5-2%
  faster at head_dim 64, and level or 0.7% slower at 128, where the two meet at each tile's end.
Causality and `lengths` only decide how many key blocks each consumer visits: blocks wholly before a
consumer's first row run unmasked, the rest up to its last row (or the sequence end) run with the causal
mask, and the producer loads the larger of the two consumers' counts; a consumer with fewer blocks releases
the remaining slots unread. Right padding needs no key mask: a valid query never sees a later key. With
`half_diagonal` (on at head_dim 64), a masked block whose second half lies after all of a consumer's rows
(consumer 0's block on the diagonal, at 128-key blocks) is multiplied and softmaxed over its first half only: a
tenth less matrix work at 512-token prompts, 3% at 2048, 1.5% at 4096, 0.8% at 8192. Run 21 of
benchmarks/RESULTS.md: 2.4-3.5% faster at head_dim 64, level (+-0.3%) at 128.
Query rows of a consumer wholly past its sequence's length read nothing and are written as zeros.

`hopper_flash_attention_qkv` takes the QKV product's output whole, [batch, seq, 3, heads, head_dim]: its query,
key and value heads are read where they lie (head offsets into one [batch, seq, 3 heads, head_dim] view), so
no copy of each out of the product runs before the kernel (XLA made three a layer: 72 of ~6 us at (8, 512) on a
345M prefill, RESULTS run 16; run 24 timed the prefill 0.3 ms faster by the medians, within the runs' spread).

Two static orderings, timed by `benchmarks/kernels.py`: `wait_in_pv` waits for the next key block right after
issuing the PV product, inside its scope, so the wait overlaps the matrix product (JAX's `attention_mgpu` does
this) instead of at the top of the next block (the default at head_dim 128, where runs 15-16 of RESULTS.md
measured it 0.5-2% faster; off at 64); `fence_softmax` (off) puts an
optimization barrier between the softmax and its "done" signal, so the compiler cannot sink softmax work past
the point where the other consumer takes the matrix units.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

BLOCK_Q = 64  # query rows per consumer warpgroup: the M of one wgmma
CONSUMERS = 2
LOG2_E = math.log2(math.e)
SUPPORTED_HEAD_DIMS = (64, 128)
SUPPORTED_DTYPES = ("bfloat16", "float16")
# the shared memory a block may opt into on sm_90 (227 KiB), and what Mosaic GPU adds to our buffers: scratch
# for the row reductions (its CompilerParams.reduction_scratch_bytes default; its own check counts it)
SMEM_BYTES = 227 * 1024
SMEM_RESERVED = 128 * 4 * 4


def supports(q) -> bool:
    """Whether this kernel runs these inputs (the caller falls back to the Triton kernel otherwise)."""
    return q.shape[-1] in SUPPORTED_HEAD_DIMS and jnp.dtype(q.dtype).name in SUPPORTED_DTYPES


class BlockSizes(NamedTuple):
    """One launch's tuning: keys per block, and how many blocks deep the producer runs ahead."""

    block_kv: int
    stages: int


def default_blocks(seq: int, head_dim: int) -> BlockSizes:
    """128-key blocks; three slots deep at head_dim 64, two at 128 (the better of each in run 6 of
    benchmarks/RESULTS.md; 64-key blocks were slower at every shape there)."""
    return BlockSizes(128 if seq >= 128 else 64, 3 if head_dim <= 64 else 2)


def smem_bytes(block_kv: int, stages: int, head_dim: int, itemsize: int = 2, q_buffers: int = 1) -> int:
    """Shared memory of one program: both consumers' query tiles (two each with `prefetch_q`), `stages` key
    and value blocks, the barriers. The most stages that fit: at head_dim 64, 6 of 128 keys, 4 of 192, 3 of
    256; at 128, 3 of 128, 2 of 192, 1 of 256 (Mosaic GPU's own count, lowered for sm_90, agrees to the
    byte); with `prefetch_q`, the same at head_dim 64 and one fewer of 128 and of 192 keys at 128."""
    tiles = (CONSUMERS * q_buffers * BLOCK_Q + 2 * stages * block_kv) * head_dim * itemsize
    return tiles + 8 * (4 * stages + CONSUMERS * q_buffers + 1)


def check_blocks(block_kv: int, stages: int, head_dim: int, itemsize: int = 2, q_buffers: int = 1) -> None:
    """Raise ValueError for a launch the kernel cannot run: key blocks must be whole 64-key tiles of at most
    256 (the wgmma's N), and the ring must fit in shared memory."""
    if block_kv % 64 or not 64 <= block_kv <= 256:
        raise ValueError(f"block_kv must be 64, 128, 192 or 256, got {block_kv}")
    if stages < 1:
        raise ValueError(f"stages must be >= 1, got {stages}")
    need = smem_bytes(block_kv, stages, head_dim, itemsize, q_buffers)
    if need + SMEM_RESERVED > SMEM_BYTES:
        raise ValueError(f"block_kv={block_kv}, stages={stages} at head_dim {head_dim} needs {need} bytes of "
                         f"shared memory (+{SMEM_RESERVED} reserved), over the {SMEM_BYTES} a block may use")


def _visible_blocks(first_row, length, block_kv: int):
    """Key blocks that query rows [first_row, first_row + BLOCK_Q) see: up to the last row (causal) and not
    past the sequence's end; none for rows wholly past it."""
    causal = pl.cdiv(first_row + BLOCK_Q, block_kv)
    return jnp.where(first_row < length, jnp.minimum(causal, pl.cdiv(length, block_kv)), 0)


class _Heads(NamedTuple):
    """Where head h of q, k and v lies in their refs: at head + offset (0 for separate arrays; 0, heads and
    2 heads in a packed [batch, seq, 3 heads, head_dim] view of the QKV product)."""
    q: int = 0
    k: int = 0
    v: int = 0


class _Tile(NamedTuple):
    """One program's unit of work: 2 x 64 query rows of one head of one sequence."""
    batch: jax.Array
    head: jax.Array
    start: jax.Array  # first query row
    length: jax.Array  # the sequence's valid length
    steps: jax.Array  # key blocks the producer loads: the larger of the two consumers' counts


def _tile(t, len_ref, *, heads: int, batch_size: int, n_tiles: int, block_kv: int, seq: int, use_lengths: bool,
          head_major: bool = False):
    """Tile number t, in the order programs take them: the longest (last) query tiles of every head and
    sequence first, so the short ones fill the tail; with `head_major`, one head's tiles after another (each
    head's longest first), so that the programs at work at any moment share the keys and values of a few
    heads in L2 rather than reading those of every head from memory."""
    if head_major:
        rest = lax.div(t, jnp.int32(n_tiles))
        q_tile = n_tiles - 1 - lax.rem(t, jnp.int32(n_tiles))
    else:
        q_tile = n_tiles - 1 - lax.div(t, jnp.int32(heads * batch_size))
        rest = lax.rem(t, jnp.int32(heads * batch_size))
    batch, head = lax.div(rest, jnp.int32(heads)), lax.rem(rest, jnp.int32(heads))
    start = q_tile * (CONSUMERS * BLOCK_Q)
    length = len_ref[batch] if use_lengths else jnp.int32(seq)
    steps = jnp.maximum(*(_visible_blocks(start + w * BLOCK_Q, length, block_kv) for w in range(CONSUMERS)))
    return _Tile(batch, head, start, length, steps)


def tile_order(program, i, programs: int):
    """The tile a program takes on its i-th turn. Dealing tiles round-robin in `_tile`'s order hands program 0
    the longest tile of every round when tiles come longest first over all heads (6-9% more work than the mean
    at the causal shapes of benchmarks/kernels.py; head by head 8-55%); the snake order deals every other round
    backwards, which evens the sums out to within 0-3% in either order (by the tiles' causal costs)."""
    backwards = lax.rem(i, 2) == 1
    return i * programs + jnp.where(backwards, programs - 1 - program, program)


def tile_count(program, n_total: int, programs: int):
    """How many tiles a program takes: the whole rounds, and one more if its place in the last round is a tile."""
    rounds, rest = divmod(n_total, programs)
    last = tile_order(program, jnp.int32(rounds), programs) - rounds * programs
    return rounds + (last < rest).astype(jnp.int32)


class _Consumer(NamedTuple):
    """What a consumer warpgroup's steps share: its query tile in shared memory (the one of the tile at
    hand), the key/value ring, and the barriers."""
    q_smem: object
    k_smem: object
    v_smem: object
    k_ready: object
    v_ready: object
    k_free: object
    v_free: object
    turn: object
    block_kv: int
    stages: int
    scale: float  # softmax scale times log2(e): scores in base 2, exp2 below
    wait_in_pv: bool = False  # wait for block j + 1's keys inside block j's PV product (module docstring)
    fence_softmax: bool = False  # an optimization barrier before the softmax's "done" arrival
    carry_stagger: bool = True  # the half-block stagger runs on from tile to tile (module docstring)
    half_diagonal: bool = False  # a block whose second half no row sees is read to its first half only


def _rendezvous(turn):
    """Both consumers arrive before either goes on."""
    import jax.experimental.pallas.mosaic_gpu as plgpu

    plgpu.barrier_arrive(turn)
    plgpu.barrier_wait(turn)


def _wait_keys(j, *, c: _Consumer, base, steps):
    """With `wait_in_pv`: wait for the keys of the tile's block j, if the producer loads one (j < steps)."""
    import jax.experimental.pallas.mosaic_gpu as plgpu

    @pl.when(j < steps)
    def _():
        plgpu.barrier_wait(c.k_ready.at[lax.rem(base + j, jnp.int32(c.stages))])


def _attend_block(j, carry, *, c: _Consumer, first_row, base, masked: bool, steps=None, keys: int | None = None):
    """Key block j of the tile: scores, online softmax, then the weighted values, in the ping-pong order.
    `steps`: the blocks the producer loads for the tile (used with `wait_in_pv` only). `keys`: the block's
    first keys only (`half_diagonal`: the rest are after every row of this consumer)."""
    import jax.experimental.pallas.mosaic_gpu as plgpu

    acc, m, l = carry
    keys = keys or c.block_kv
    slot = lax.rem(base + j, jnp.int32(c.stages))
    k_tile, v_tile = ((ring.at[slot] if keys == c.block_kv else ring.at[slot, pl.ds(0, keys)])
                      for ring in (c.k_smem, c.v_smem))
    if not c.wait_in_pv:  # else the keys were waited for in the last block's PV product (or before block 0)
        plgpu.barrier_wait(c.k_ready.at[slot])

    def scores(s_ref):
        plgpu.wgmma(s_ref, c.q_smem, plgpu.transpose_ref(k_tile, (1, 0)))
        _rendezvous(c.turn)  # the other consumer's softmax ran while this product was issued
        return s_ref[...]
    s = pl.run_scoped(scores, plgpu.ACC((BLOCK_Q, keys), jnp.float32))
    plgpu.barrier_arrive(c.k_free.at[slot])
    if masked:
        rows = plgpu.broadcasted_iota(jnp.int32, s.shape, 0, layout=plgpu.Layout.WGMMA)
        cols = plgpu.broadcasted_iota(jnp.int32, s.shape, 1, layout=plgpu.Layout.WGMMA)
        s = jnp.where(first_row + rows >= j * c.block_kv + cols, s, -jnp.inf)
    m_next = jnp.maximum(m, s.max(axis=1) * c.scale)
    alpha = jnp.exp2(m - m_next)
    p = jnp.exp2(s * c.scale - lax.broadcast_in_dim(m_next, s.shape, [0]))  # one FMA per score
    acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
    l = l * alpha + p.sum(axis=1)
    p16 = p.astype(c.q_smem.dtype)
    if c.fence_softmax:  # the softmax's values exist before the arrival says so
        acc, l, m_next, p16 = lax.optimization_barrier((acc, l, m_next, p16))
    plgpu.barrier_arrive(c.turn)  # softmax done: the other consumer may issue its product
    plgpu.barrier_wait(c.v_ready.at[slot])
    plgpu.barrier_wait(c.turn)

    def weighted_values(acc_ref):
        plgpu.wgmma(acc_ref, p16, v_tile)
        if c.wait_in_pv:  # the next block's wait overlaps this product (issued, not yet read back)
            _wait_keys(j + 1, c=c, base=base, steps=steps)
    acc = pl.run_state(weighted_values)(plgpu.ACC.init(acc))
    plgpu.barrier_arrive(c.v_free.at[slot])
    return acc, m_next, l


def _attend_masked_block(j, carry, *, c: _Consumer, first_row, **kw):
    """A block that reaches past this consumer's first row. With `half_diagonal` (128- or 256-key blocks), one
    whose second half lies after all of its rows (consumer 0's block on the diagonal: its 64 rows start the
    block) is read to its first half: a product half as wide, and no softmax of scores that are all masked."""
    full = functools.partial(_attend_block, c=c, first_row=first_row, masked=True, **kw)
    half = c.block_kv // 2
    if not (c.half_diagonal and half % 64 == 0):
        return full(j, carry)
    seen = first_row + BLOCK_Q - j * c.block_kv  # keys of block j that this consumer's last row sees
    return lax.cond(seen <= half, functools.partial(full, keys=half), full, j, carry)


def _release_block(j, _, *, c: _Consumer, base, steps=None):
    """A block the other consumer needs and this one does not: free its slot unread, keep the schedule. It
    still waits for the block to land: each wait on a barrier advances the phase this thread expects of it, so
    a skipped wait would leave this consumer a phase behind on that slot for every later tile of the program
    (ragged prompts, where one consumer's rows end before the other's, in programs of several tiles: it could
    read a block before it lands, or wait for a phase that has passed)."""
    import jax.experimental.pallas.mosaic_gpu as plgpu

    slot = lax.rem(base + j, jnp.int32(c.stages))
    if not c.wait_in_pv:  # else waited for before block 0 or at the end of the last block
        plgpu.barrier_wait(c.k_ready.at[slot])
    plgpu.barrier_arrive(c.k_free.at[slot])
    plgpu.barrier_wait(c.v_ready.at[slot])
    plgpu.barrier_arrive(c.v_free.at[slot])
    _rendezvous(c.turn)
    _rendezvous(c.turn)
    if c.wait_in_pv:
        _wait_keys(j + 1, c=c, base=base, steps=steps)


def _rows(tile: _Tile, wg, head_offset: int = 0):
    """The consumer's first query row of a tile, and the tile's block of the output (of q, with q's
    `head_offset`) it takes."""
    first_row = tile.start + wg * BLOCK_Q
    return first_row, (tile.batch, pl.ds(first_row, BLOCK_Q), tile.head + head_offset)


def _load_queries(tile: _Tile, buf, *, q_ref, q_bufs, q_ready, q_head: int):
    """Start the TMA load of this consumer's query rows of `tile` into its buffer `buf`."""
    import jax.experimental.pallas.mosaic_gpu as plgpu

    wg = lax.axis_index("wg")
    plgpu.copy_gmem_to_smem(q_ref.at[_rows(tile, wg, q_head)[1]], q_bufs.at[buf],
                            q_ready.at[wg * q_bufs.shape[0] + buf])


def _consumer_tile(i, base, *, c: _Consumer, q_bufs, q_ref, o_ref, q_ready, tile_of, count: int, q_head: int):
    """This consumer's 64 rows of the program's i-th tile; returns the ring position after the tile. With two
    query buffers (`prefetch_q`) the tile's queries were loaded during the last tile, and the next tile's load
    starts once this one's unmasked blocks are done (by then the output that left from that buffer is out)."""
    import jax.experimental.pallas.mosaic_gpu as plgpu

    wg = lax.axis_index("wg")
    n_bufs = q_bufs.shape[0]
    buf = lax.rem(i, jnp.int32(n_bufs))
    c = c._replace(q_smem=q_bufs.at[buf])
    tile = tile_of(i)
    first_row, rows = _rows(tile, wg)
    steps = _visible_blocks(first_row, tile.length, c.block_kv)
    full = jnp.minimum(lax.div(first_row, c.block_kv), steps)  # blocks wholly before the first row
    load = functools.partial(_load_queries, q_ref=q_ref, q_bufs=q_bufs, q_ready=q_ready, q_head=q_head)
    if n_bufs == 1:
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the last tile's output has left q_smem
        load(tile, buf)
    plgpu.barrier_wait(q_ready.at[wg * n_bufs + buf])
    head_dim = c.q_smem.shape[-1]
    acc = plgpu.layout_cast(jnp.zeros((BLOCK_Q, head_dim), jnp.float32), plgpu.Layout.WGMMA)
    m = plgpu.layout_cast(jnp.full((BLOCK_Q,), -jnp.inf, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
    l = plgpu.layout_cast(jnp.zeros((BLOCK_Q,), jnp.float32), plgpu.Layout.WGMMA.reduce(1))
    # with wait_in_pv, each block waits for the next one's keys: every block of the tile < tile.steps is waited
    # for exactly once by each consumer, as without it (the barriers' phases stay in step across tiles)
    more = dict(steps=tile.steps) if c.wait_in_pv else {}
    if c.wait_in_pv:
        _wait_keys(jnp.int32(0), c=c, base=base, steps=tile.steps)
    # consumer 0 takes the matrix units first: consumer 1 starts a phase of the turn barrier behind, and
    # consumer 0 takes that phase after its last block; both do two phases a block, so with `carry_stagger`
    # they do so once per program (a count of 0 tiles does neither), else once per tile
    first, last = (i == 0, i == count - 1) if c.carry_stagger else (True, True)
    pl.when((wg == 1) & first)(functools.partial(_rendezvous, c.turn))
    step = functools.partial(_attend_block, c=c, first_row=first_row, base=base, **more)
    carry = lax.fori_loop(0, full, functools.partial(step, masked=False), (acc, m, l))
    if n_bufs > 1:
        @pl.when(i + 1 < count)
        def _():
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the last tile's output has left the other buffer
            load(tile_of(i + 1), 1 - buf)
    masked = functools.partial(_attend_masked_block, c=c, first_row=first_row, base=base, **more)
    acc, m, l = lax.fori_loop(full, steps, masked, carry)
    lax.fori_loop(steps, tile.steps, functools.partial(_release_block, c=c, base=base, **more), None)
    pl.when((wg == 0) & last)(functools.partial(_rendezvous, c.turn))
    # l >= 1 for every row that saw a key (its max scores exp2(0)); rows that saw none keep acc = 0
    acc = acc / lax.broadcast_in_dim(jnp.maximum(l, 1e-30), acc.shape, [0])
    c.q_smem[...] = acc.astype(c.q_smem.dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(c.q_smem, o_ref.at[rows])
    return base + tile.steps


def _consumer(q_ref, o_ref, len_ref, scratch, *, tile_of, count, block_kv: int, stages: int, sm_scale: float,
              wait_in_pv: bool, fence_softmax: bool, carry_stagger: bool, half_diagonal: bool, heads: _Heads):
    import jax.experimental.pallas.mosaic_gpu as plgpu

    q_smem2, k_smem, v_smem, k_ready, v_ready, q_ready, k_free, v_free, turn = scratch
    plgpu.set_max_registers(232, action="increase")
    wg = lax.axis_index("wg")
    q_bufs = q_smem2.at[wg]
    c = _Consumer(q_bufs.at[0], k_smem, v_smem, k_ready, v_ready, k_free, v_free, turn,
                  block_kv, stages, sm_scale * LOG2_E, wait_in_pv, fence_softmax, carry_stagger, half_diagonal)
    if q_bufs.shape[0] > 1:  # the first tile's queries; each tile loads the next one's
        pl.when(count > 0)(lambda: _load_queries(tile_of(jnp.int32(0)), 0, q_ref=q_ref, q_bufs=q_bufs,
                                                  q_ready=q_ready, q_head=heads.q))
    tile = functools.partial(_consumer_tile, c=c, q_bufs=q_bufs, q_ref=q_ref, o_ref=o_ref, q_ready=q_ready,
                             tile_of=tile_of, count=count, q_head=heads.q)
    lax.fori_loop(0, count, tile, jnp.int32(0))
    plgpu.wait_smem_to_gmem(0)


def _producer(k_ref, v_ref, scratch, *, tile_of, count, block_kv: int, stages: int, heads: _Heads):
    import jax.experimental.pallas.mosaic_gpu as plgpu

    _, k_smem, v_smem, k_ready, v_ready, _, k_free, v_free, _ = scratch
    plgpu.set_max_registers(40, action="decrease")

    def one_tile(i, base):
        tile = tile_of(i)

        @pl.loop(0, tile.steps)
        def _(j):
            n = base + j  # blocks loaded so far by this program: the ring's position
            slot = lax.rem(n, jnp.int32(stages))

            rows = pl.ds(j * block_kv, block_kv)
            # the slot's last block must be released by both consumers first; its keys are, a softmax before
            # its values, so the keys' load starts without waiting for the values
            for free, ref, smem, ready, offset in ((k_free, k_ref, k_smem, k_ready, heads.k),
                                                   (v_free, v_ref, v_smem, v_ready, heads.v)):
                pl.when(n >= stages)(functools.partial(plgpu.barrier_wait, free.at[slot]))
                plgpu.copy_gmem_to_smem(ref.at[tile.batch, rows, tile.head + offset], smem.at[slot], ready.at[slot])
        return base + tile.steps

    lax.fori_loop(0, count, one_tile, jnp.int32(0))


def _program(len_ref, q_ref, k_ref, v_ref, o_ref, *scratch, block_kv: int, stages: int, sm_scale: float,
             n_tiles: int, heads: int, batch_size: int, seq: int, use_lengths: bool, programs: int,
             head_major: bool, offsets: _Heads, **orderings):
    """`orderings`: the consumers' options (`wait_in_pv`, `fence_softmax`, `carry_stagger`, `half_diagonal`);
    `offsets`: where each head lies in the q, k and v refs (`_Heads`)."""
    program, n_total = lax.axis_index("p"), n_tiles * heads * batch_size

    def tile_of(i):  # this program's i-th tile
        return _tile(tile_order(program, i, programs), len_ref, heads=heads, batch_size=batch_size,
                     n_tiles=n_tiles, block_kv=block_kv, seq=seq, use_lengths=use_lengths, head_major=head_major)
    common = dict(tile_of=tile_of, count=tile_count(program, n_total, programs), block_kv=block_kv,
                  stages=stages, heads=offsets)
    wg = lax.axis_index("wg")
    pl.when(wg < CONSUMERS)(functools.partial(_consumer, q_ref, o_ref, len_ref, scratch, sm_scale=sm_scale,
                                              **orderings, **common))
    pl.when(wg == CONSUMERS)(functools.partial(_producer, k_ref, v_ref, scratch, **common))


def _scratch(dtype, head_dim: int, block_kv: int, stages: int, q_buffers: int) -> list:
    """A program's shared memory, in the order `_program` unpacks it: the query tiles, the key and value rings
    (128-byte swizzled tiles of 64 columns: the layout wgmma reads without bank conflicts), and the barriers
    (keys and values ready, queries ready, keys and values free, the consumers' turn)."""
    import jax.experimental.pallas.mosaic_gpu as plgpu

    transforms = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    return [plgpu.SMEM((CONSUMERS, q_buffers, BLOCK_Q, head_dim), dtype, transforms=transforms),
            plgpu.SMEM((stages, block_kv, head_dim), dtype, transforms=transforms),
            plgpu.SMEM((stages, block_kv, head_dim), dtype, transforms=transforms),
            plgpu.Barrier(num_barriers=stages), plgpu.Barrier(num_barriers=stages),
            plgpu.Barrier(num_barriers=CONSUMERS * q_buffers),
            plgpu.Barrier(num_arrivals=CONSUMERS, num_barriers=stages),
            plgpu.Barrier(num_arrivals=CONSUMERS, num_barriers=stages),
            plgpu.Barrier(num_arrivals=CONSUMERS)]


_OPTIONS = ("block_kv", "stages", "use_lengths", "programs", "wait_in_pv", "fence_softmax", "prefetch_q",
            "carry_stagger", "half_diagonal", "head_major")


@functools.partial(jax.jit, static_argnames=_OPTIONS)
def hopper_flash_attention(q, k, v, *, lengths=None, **options):
    """q, k, v: [batch, seq, heads, head_dim] (bf16 or fp16, head_dim 64 or 128); lengths: [batch] valid
    lengths (right padding) or None. Causal, scale 1/sqrt(head_dim); rows past a length are unspecified
    (zeros for whole 64-row blocks past it). The options (`_attention`'s keywords, static):
    `use_lengths=False` ignores lengths (full causal work).
    `programs`: how many programs (CTAs) share the tiles, each taking one tile of every round of `programs`
    in turn and streaming the next tile's keys while it finishes the last (default: one per multiprocessor,
    i.e. persistent; a number >= the tile count gives one tile per program), in the snake order (`tile_order`).
    `prefetch_q` (default) gives each consumer two query buffers, so that a tile's queries load while the last
    tile finishes (`_consumer_tile`); off, one. `block_kv`: 64, 128, 192 or 256 keys where shared memory holds
    `stages` of them (`check_blocks`; default `default_blocks`). `wait_in_pv`, `fence_softmax` (off): the
    orderings of the module docstring (`wait_in_pv` needs stages >= 2: block j + 1 must not reuse block j's slot;
    None: on at head_dim 128).
    `carry_stagger`: the consumers' stagger runs on across a program's tiles; off, they meet at each tile's end
    and stagger anew (None: on at head_dim 64, module docstring). `half_diagonal`: consumer 0's block on the
    diagonal is read to its first half (`_attend_masked_block`; 128- and 256-key blocks; None: on at head_dim
    64). `head_major` (default): the tiles in one head after another (`_tile`); off, every head's longest
    first."""
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must have one shape, got {q.shape}, {k.shape}, {v.shape}")
    return _attention((q, k, v), q.shape[2], _Heads(), lengths=lengths, **options)


@functools.partial(jax.jit, static_argnames=_OPTIONS)
def hopper_flash_attention_qkv(qkv, *, lengths=None, **options):
    """The same attention from the QKV product's output whole, qkv [batch, seq, 3, heads, head_dim] (query, key,
    value), read in place: no copy of q, k or v is made for the kernel. Options as `hopper_flash_attention`'s."""
    batch, seq, three, heads, head_dim = qkv.shape
    if three != 3:
        raise ValueError(f"qkv must be [batch, seq, 3, heads, head_dim], got {qkv.shape}")
    packed = qkv.reshape(batch, seq, 3 * heads, head_dim)  # free: the heads of q, then k, then v
    return _attention((packed,), heads, _Heads(0, heads, 2 * heads), lengths=lengths, **options)


def _attention(operands, heads: int, offsets: _Heads, *, lengths=None, block_kv: int | None = None,
               stages: int | None = None, use_lengths: bool = True, programs: int | None = None,
               wait_in_pv: bool | None = None, fence_softmax: bool = False, prefetch_q: bool = True,
               carry_stagger: bool | None = None, half_diagonal: bool | None = None, head_major: bool = True):
    """The kernel over `operands`: (q, k, v), or one array holding all three, each head at its `offsets`."""
    import jax.experimental.pallas.mosaic_gpu as plgpu

    batch, seq, _, head_dim = operands[0].shape
    dtype = operands[0].dtype
    if not supports(operands[0]):
        raise ValueError(f"head_dim must be one of {SUPPORTED_HEAD_DIMS} and dtype one of {SUPPORTED_DTYPES}, "
                         f"got {head_dim} and {dtype}")
    d = default_blocks(seq, head_dim)
    block_kv, stages = block_kv or d.block_kv, stages or d.stages
    q_buffers = 2 if prefetch_q else 1
    check_blocks(block_kv, stages, head_dim, jnp.dtype(dtype).itemsize, q_buffers)
    wait_in_pv = head_dim == 128 and stages >= 2 if wait_in_pv is None else wait_in_pv
    carry_stagger = head_dim == 64 if carry_stagger is None else carry_stagger
    half_diagonal = head_dim == 64 if half_diagonal is None else half_diagonal
    if wait_in_pv and stages < 2:
        raise ValueError("wait_in_pv needs stages >= 2 (the next block's slot is freed only after this block)")
    # whole query tiles and whole key blocks (the larger of the two roundings; tiles past `seq` stay empty)
    padded = max(pl.cdiv(seq, step) * step for step in (CONSUMERS * BLOCK_Q, block_kv))
    if padded != seq:  # TMA moves whole blocks: pad the sequence, slice after
        operands = tuple(jnp.pad(x, ((0, 0), (0, padded - seq), (0, 0), (0, 0))) for x in operands)
    q, k, v = operands * 3 if len(operands) == 1 else operands
    lengths = (jnp.full((batch,), seq, jnp.int32) if lengths is None
               else jnp.minimum(lengths.astype(jnp.int32), seq))
    n_tiles = padded // (CONSUMERS * BLOCK_Q)
    programs = min(programs or getattr(jax.devices()[0], "core_count", 132), n_tiles * heads * batch)
    body = functools.partial(_program, block_kv=block_kv, stages=stages, sm_scale=1.0 / math.sqrt(head_dim),
                             n_tiles=n_tiles, heads=heads, batch_size=batch, seq=seq, use_lengths=use_lengths,
                             programs=programs, head_major=head_major, offsets=offsets, wait_in_pv=wait_in_pv,
                             fence_softmax=fence_softmax, carry_stagger=carry_stagger, half_diagonal=half_diagonal)
    out = plgpu.kernel(
        body,
        out_type=jax.ShapeDtypeStruct((batch, padded, heads, head_dim), dtype),
        grid=(programs,),
        grid_names=("p",),
        num_threads=CONSUMERS + 1,
        thread_name="wg",
        scratch_types=_scratch(dtype, head_dim, block_kv, stages, q_buffers),
        compiler_params=plgpu.CompilerParams(approx_math=True),
    )(lengths, q, k, v)
    return out[:, :seq]
