"""Each row's top-k / top-p threshold without sorting the vocabulary: what the sampler's filter keeps.

A row keeps the tokens whose logit is at least its threshold: the k-th largest logit (top-k), then the smallest
logit whose tokens at or above it hold top_p of the top-k distribution's mass (top-p); ties at the threshold are
kept. `filter_threshold_reference` finds it by sorting each row, which XLA does with a radix sort: 1.25 ms for
256 rows of 50257 logits on an H100, 0.17 ms for 8 (benchmarks/RESULTS.md, run 26), where a whole decode step
of the 345M model takes 3 ms and 0.9. Passes of plain `jnp` over the rows instead of the sort lost there (each
pass reads the rows from memory again); this kernel takes 0.60 ms for the 256 rows, and the sort stays the GPU's
way below `GPU_MIN_ROWS` rows a device.

`filter_threshold` (Pallas, Triton backend on GPU; `interpret=True` runs it anywhere, and on a CPU faster than
the sort) keeps a row's passes inside one program: each pass over the row weighs `WAYS` candidate thresholds at
once (a count for top-k, a mass for top-p) and keeps the part of the range between the last candidate that holds
and the next, so that `PASSES` passes narrow the logits' range by 17^9; the threshold is then the smallest logit
in what is left. With `defer` (the default) a pass's sums are reduced across the program's warps once a pass
rather than once a block.
It is the sort's threshold unless two logits lie closer than the range / 17^9 at the threshold (one more or
one fewer token of near-equal logit kept), and the masses are float32 sums in another order than the sort's
cumulative one, so a token whose cumulative mass falls within float32 rounding of top_p may go either way.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

WAYS = 16  # candidate thresholds weighed per pass over a row
PASSES = 9  # each keeps 1/17 of the range: 17^9 ~ 1.2e11
# logits read at a time, warps a program, and the warps' sums reduced once a pass: the fastest of the launches timed
# on an H100 (RESULTS run 27: 256 rows in 0.60 ms, against 0.68 for 2048 logits a read reduced once a block, 0.86
# for 512 deferred, 1.3 for 256)
BLOCK = 1024
NUM_WARPS = 8
DEFER = True
# fewer rows a device than this sort faster on a GPU: a program takes ~0.3 ms for its row whatever the batch, and
# 8 rows leave most of the chip idle (H100, run 27: 8 rows 0.31 ms against the sort's 0.17, 64 rows 0.32 against 0.47)
GPU_MIN_ROWS = 64


def _kernel(k_ref, p_ref, s_ref, o_ref, *, vocab: int, n_blocks: int, block: int, defer: bool):
    """One row: s_ref [n_blocks * block] float32 (padded with -inf), k_ref its top-k (0: none), p_ref its top-p.
    `defer`: a search pass adds each block's weights into a [WAYS, block] sum and reduces it once at the pass's
    end, rather than reducing every block across the program's warps."""
    k, p = k_ref[...], p_ref[...]
    iota = lax.broadcasted_iota(jnp.int32, (WAYS,), 0)
    fractions = (iota + 1).astype(jnp.float32) / (WAYS + 1)

    def fold(fn, init):
        return lax.fori_loop(0, n_blocks, lambda j, carry: fn(s_ref[pl.ds(j * block, block)], carry), init)

    top, low = fold(lambda s, c: (jnp.maximum(c[0], jnp.max(s)),
                                  jnp.minimum(c[1], jnp.min(jnp.where(s == -jnp.inf, jnp.inf, s)))),
                    (jnp.float32(-jnp.inf), jnp.float32(jnp.inf)))

    def smallest_from(t):
        """The smallest logit at or above t: the threshold a search's lower bound stands for."""
        return fold(lambda s, c: jnp.minimum(c, jnp.min(jnp.where(s >= t, s, jnp.inf))), jnp.float32(jnp.inf))

    def search(weigh, target, lo, hi):
        """The largest t in [lo, hi] with weigh(t) >= target, weigh falling as t grows; weigh(lo) >= target
        and weigh(t) < target for every t > hi."""
        def one_pass(_, bounds):
            lo, hi = bounds
            candidates = lo + (hi - lo) * fractions  # ascending
            if defer:
                totals = jnp.sum(fold(lambda s, acc: acc + weigh(s, candidates),
                                      jnp.zeros((WAYS, block), jnp.float32)), axis=1)
            else:
                totals = fold(lambda s, acc: acc + jnp.sum(weigh(s, candidates), axis=1),
                              jnp.zeros((WAYS,), jnp.float32))
            held = jnp.sum((totals >= target).astype(jnp.int32))  # the first `held` candidates hold
            below = jnp.sum(jnp.where(iota == held - 1, candidates, 0.0))
            above = jnp.sum(jnp.where(iota == held, candidates, 0.0))
            return jnp.where(held > 0, below, lo), jnp.where(held < WAYS, above, hi)

        lo, _ = lax.fori_loop(0, PASSES, one_pass, (lo, hi))
        return smallest_from(lo)

    def count(s, candidates):  # each logit's part in the count at or above each candidate: [WAYS, block]
        return jnp.where(s[None, :] >= candidates[:, None], 1.0, 0.0)

    kth = lax.cond((k > 0) & (k < vocab), lambda: search(count, k.astype(jnp.float32), low, top), lambda: low)

    def weights(s):
        return jnp.where(s >= kth, jnp.exp(s - top), 0.0)

    def mass(s, candidates):
        return jnp.where(s[None, :] >= candidates[:, None], weights(s)[None, :], 0.0)

    def nucleus():
        total = fold(lambda s, acc: acc + jnp.sum(weights(s)), jnp.float32(0.0))
        return search(mass, p * total, kth, top)

    o_ref[...] = jnp.maximum(kth, lax.cond(p < 1.0, nucleus, lambda: kth))


@functools.partial(jax.jit, static_argnames=("interpret", "block", "num_warps", "defer"))
def filter_threshold(scaled, top_k, top_p, *, interpret: bool = False, block: int = BLOCK,
                     num_warps: int = NUM_WARPS, defer: bool = DEFER):
    """scaled [rows, vocab] (logits over the temperature), top_k [rows] int (0: none), top_p [rows] float
    (1: none) -> each row's threshold [rows] float32: the row keeps the tokens whose logit is at least it.
    `block` and `num_warps`: the launch's logits per read and warps per program; `defer`: as in `_kernel`."""
    rows, vocab = scaled.shape
    padded = pl.cdiv(vocab, block) * block
    scaled = jnp.pad(scaled.astype(jnp.float32), ((0, 0), (0, padded - vocab)), constant_values=-jnp.inf)
    row = pl.BlockSpec((None,), lambda r: (r,))
    return pl.pallas_call(
        functools.partial(_kernel, vocab=vocab, n_blocks=padded // block, block=block, defer=defer), grid=(rows,),
        in_specs=[row, row, pl.BlockSpec((None, padded), lambda r: (r, 0))], out_specs=row,
        out_shape=jax.ShapeDtypeStruct((rows,), jnp.float32),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=2), interpret=interpret,
        name="sampling_filter",
    )(top_k.astype(jnp.int32), top_p.astype(jnp.float32), scaled)


def filter_threshold_reference(scaled, top_k, top_p):
    """`filter_threshold` by sorting each row: the k-th largest logit, and the logit of the last token the nucleus
    needs (tokens in falling order, each kept while the mass before it is below top_p; never none), the nucleus
    taken from the top-k tokens' distribution (ties at the k-th logit in it, as they are in what is kept)."""
    vocab = scaled.shape[-1]
    sorted_desc = -jnp.sort(-scaled.astype(jnp.float32), axis=-1)
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    kth_value = jnp.take_along_axis(sorted_desc, (k - 1)[:, None], axis=-1)[:, 0]
    probs = jax.nn.softmax(jnp.where(sorted_desc >= kth_value[:, None], sorted_desc, -jnp.inf), axis=-1)
    in_nucleus = (jnp.cumsum(probs, axis=-1) - probs) < top_p[:, None]
    n_nucleus = jnp.maximum(in_nucleus.sum(-1), 1)
    nucleus_value = jnp.take_along_axis(sorted_desc, (n_nucleus - 1)[:, None], axis=-1)[:, 0]
    return jnp.maximum(kth_value, jnp.where(top_p < 1.0, nucleus_value, kth_value))
