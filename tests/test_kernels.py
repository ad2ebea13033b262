"""The Pallas attention kernels (interpret mode here) against float64 numpy references, on fresh random inputs.

Every check draws new inputs (the seed is in the failure message), uses ragged lengths that are not multiples
of the block sizes, and compares only the rows the contract specifies.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import gptjax
from gptjax import kernels, sharding
from gptjax.kernels import decode_attention, decode_table, flash_attention, hopper_flash_attention
from gptjax.kernels.decode_attention import DecodeParams, choose_params, default_params

TOL = {np.float32: 2e-3, jnp.bfloat16: 3e-2, np.float16: 3e-2}


def fresh_rng():
    seed = int(np.random.SeedSequence().entropy % 2**32)
    return np.random.default_rng(seed), seed


def ragged_lengths(rng, batch, seq):
    lengths = rng.integers(1, seq + 1, size=batch)
    lengths[0] = seq  # one full row, and one of length 1 when there is room
    if batch > 1:
        lengths[1] = 1
    return lengths.astype(np.int32)


def prefill_reference64(q, k, v, lengths, causal=True):
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    _, seq, _, head_dim = q.shape
    scores = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(head_dim)
    kpos = np.arange(seq)
    mask = (kpos[None, :] <= kpos[:, None]) if causal else np.ones((seq, seq), bool)
    mask = mask[None, None] & (kpos[None, None, None, :] < lengths[:, None, None, None])
    scores = np.where(mask, scores, -np.inf)
    scores -= scores.max(-1, keepdims=True)
    p = np.exp(scores)
    return np.einsum("bhqk,bkhd->bqhd", p / p.sum(-1, keepdims=True), v)


def decode_reference64(q, k_cache, v_cache, lengths):
    q, k, v = (np.asarray(x, np.float64) for x in (q, k_cache, v_cache))
    scores = np.einsum("bhd,bkhd->bhk", q, k) / np.sqrt(q.shape[-1])
    scores = np.where(np.arange(k.shape[1])[None, None, :] < lengths[:, None, None], scores, -np.inf)
    scores -= scores.max(-1, keepdims=True)
    p = np.exp(scores)
    return np.einsum("bhk,bkhd->bhd", p / p.sum(-1, keepdims=True), v)


def valid_rows_error(out, ref, lengths):
    """Worst relative error over sequences, counting only rows before each sequence's length."""
    out = np.asarray(out, np.float64)
    return max(np.linalg.norm(out[i, :n] - ref[i, :n]) / np.linalg.norm(ref[i, :n]) for i, n in enumerate(lengths))


def draw(rng, shape, dtype):
    return jnp.asarray(rng.standard_normal(shape).astype(np.float32)).astype(dtype)


# (batch, seq, heads, head_dim, block_q, block_k): several blocks per sequence, both block orders, and a seq
# and head_dim that need padding
PREFILL_CASES = [(3, 100, 2, 16, 32, 16), (2, 77, 3, 40, 16, 32), (2, 64, 2, 32, None, None),
                 (1, 9, 1, 8, None, None)]


@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16, np.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("case", PREFILL_CASES, ids=lambda c: "x".join(map(str, c[:4])))
def test_flash_attention_matches_float64(case, dtype):
    batch, seq, heads, head_dim, block_q, block_k = case
    rng, seed = fresh_rng()
    q, k, v = (draw(rng, (batch, seq, heads, head_dim), dtype) for _ in range(3))
    lengths = ragged_lengths(rng, batch, seq)
    out = flash_attention(q, k, v, lengths=jnp.asarray(lengths), interpret=True, block_q=block_q, block_k=block_k)
    assert out.shape == q.shape and out.dtype == q.dtype
    err = valid_rows_error(out, prefill_reference64(q, k, v, lengths), lengths)
    assert err < TOL[dtype], f"relative error {err:.2e} (seed {seed})"


def test_flash_attention_without_lengths_and_noncausal():
    rng, seed = fresh_rng()
    q, k, v = (draw(rng, (2, 50, 2, 16), np.float32) for _ in range(3))
    full = np.array([50, 50])
    out = flash_attention(q, k, v, interpret=True, block_q=16, block_k=16)
    assert valid_rows_error(out, prefill_reference64(q, k, v, full), full) < 2e-3, f"seed {seed}"
    lengths = np.array([50, 23], np.int32)
    out = flash_attention(q, k, v, lengths=jnp.asarray(lengths), causal=False, interpret=True, block_q=16,
                          block_k=16)
    ref = prefill_reference64(q, k, v, lengths, causal=False)
    assert valid_rows_error(out, ref, lengths) < 2e-3, f"seed {seed}"


def test_flash_attention_padding_rows_are_finite():
    # rows past a length are unspecified, but later layers read them as keys and values: never NaN
    rng, _ = fresh_rng()
    q, k, v = (draw(rng, (2, 64, 2, 16), np.float32) for _ in range(3))
    out = flash_attention(q, k, v, lengths=jnp.array([64, 3]), interpret=True, block_q=16, block_k=16)
    assert np.isfinite(np.asarray(out)).all()


# (batch, max_seq, heads, head_dim, block_k, num_splits): one chunk, several, a max_seq that is not a whole
# number of blocks or chunks, and the default choice (which splits a small batch)
DECODE_CASES = [(3, 100, 2, 16, 16, 1), (4, 200, 2, 32, 32, 3), (2, 130, 3, 40, 32, 2), (2, 77, 2, 16, None, None)]


@pytest.mark.parametrize("use_dot", [False, True], ids=["vector", "matrix-units"])
@pytest.mark.parametrize("case, dtype", [(c, np.float32) for c in DECODE_CASES]
                         + [(DECODE_CASES[i], d) for i in (1, 2) for d in (jnp.bfloat16, np.float16)],
                         ids=lambda x: "x".join(map(str, x[:4])) + f"s{x[5]}" if isinstance(x, tuple)
                         else jnp.dtype(x).name)
def test_decode_attention_matches_float64(case, dtype, use_dot):
    batch, max_seq, heads, head_dim, block_k, splits = case
    rng, seed = fresh_rng()
    q = draw(rng, (batch, heads, head_dim), dtype)
    k_cache, v_cache = (draw(rng, (batch, max_seq, heads, head_dim), dtype) for _ in range(2))
    lengths = ragged_lengths(rng, batch, max_seq)
    out = decode_attention(q, k_cache, v_cache, jnp.asarray(lengths), interpret=True, block_k=block_k,
                           num_splits=splits, use_dot=use_dot, heads_per_program=1)
    assert out.shape == q.shape and out.dtype == q.dtype
    ref = decode_reference64(q, k_cache, v_cache, lengths)
    err = np.linalg.norm(np.asarray(out, np.float64) - ref) / np.linalg.norm(ref)
    assert err < TOL[dtype], f"relative error {err:.2e} (seed {seed})"


# (batch, rows, max_seq, heads, head_dim, overrides): one chunk and several (the last past max_seq), every body
# form (one head by vectors and by the matrix units, head groups of 2 and of every head), a cache with more rows
# than the step, and the two-step path (a head_dim of 40)
APPEND_CASES = [(3, 3, 100, 2, 16, dict(block_k=16, num_splits=1, use_dot=True, heads_per_program=1)),
                (4, 6, 200, 2, 32, dict(block_k=32, num_splits=3, use_dot=False, heads_per_program=1)),
                (2, 2, 70, 2, 16, dict(block_k=16, num_splits=2, use_dot=True, heads_per_program=1)),
                (3, 3, 64, 4, 16, dict(block_k=16, num_splits=2, heads_per_program=2)),
                (2, 4, 77, 4, 32, dict(block_k=16, num_splits=1, heads_per_program=4)),
                (2, 2, 50, 2, 40, dict(heads_per_program=1))]


@pytest.mark.parametrize("case, dtype", [(c, np.float32) for c in APPEND_CASES]
                         + [(APPEND_CASES[i], d) for i in (1, 3) for d in (jnp.bfloat16, np.float16)],
                         ids=lambda x: f"{x[0]}x{x[2]}x{x[3]}x{x[4]}-{len(x[5])}" if isinstance(x, tuple)
                         else jnp.dtype(x).name)
def test_decode_attention_append_stores_then_attends(case, dtype):
    """The step's key and value stored at each row's position (0, the last entry, and between) and attended
    with the cache's entries before it: the caches as `cache.write_token` leaves them, bit for bit, and the
    output against float64."""
    from gptjax.cache import write_token
    from gptjax.kernels import decode_attention_append

    batch, rows, max_seq, heads, head_dim, overrides = case
    rng, seed = fresh_rng()
    qkv = draw(rng, (batch, 3, heads, head_dim), dtype)
    k_cache, v_cache = (draw(rng, (rows, max_seq, heads, head_dim), dtype) for _ in range(2))
    positions = rng.integers(0, max_seq, size=batch).astype(np.int32)
    positions[0], positions[-1] = 0, max_seq - 1
    want_k, want_v = write_token((k_cache, v_cache), qkv[:, 1], qkv[:, 2], jnp.asarray(positions))
    out, new_k, new_v = decode_attention_append(qkv, k_cache, v_cache, jnp.asarray(positions), interpret=True,
                                                **overrides)
    np.testing.assert_array_equal(np.asarray(new_k), np.asarray(want_k))
    np.testing.assert_array_equal(np.asarray(new_v), np.asarray(want_v))
    assert out.shape == (batch, heads, head_dim) and out.dtype == qkv.dtype
    ref = decode_reference64(qkv[:, 0], want_k[:batch], want_v[:batch], positions + 1)
    err = np.linalg.norm(np.asarray(out, np.float64) - ref) / np.linalg.norm(ref)
    assert err < TOL[dtype], f"relative error {err:.2e} (seed {seed})"


@pytest.mark.parametrize("impl, overrides", [("pallas", dict(heads_per_program=1, block_k=16, num_splits=2)),
                                             ("pallas", dict(heads_per_program=2, block_k=16, num_splits=1)),
                                             ("pallas", dict(heads_per_program=1)), ("jnp", {})],
                         ids=["head-split", "head-group", "padded-head-dim", "jnp"])
def test_decode_step_append_in_two_parts_from_a_first_row_matches_one_step(impl, overrides):
    """A step's rows attended in two parts, the second from `first_row` on (each storing into its own rows of the
    same caches, one after the other), gives the caches and outputs of one launch over every row."""
    from gptjax.kernels import decode_attention_append

    def append(qkv, layer_kv, positions, first_row=0):
        if impl == "jnp":
            return kernels.decode_step_append(qkv, layer_kv, positions, impl, first_row)
        out, k, v = decode_attention_append(qkv, *layer_kv, positions, interpret=True, first_row=first_row,
                                            **overrides)
        return out, (k, v)

    head_dim = 40 if overrides == dict(heads_per_program=1) else 16
    rng, _ = fresh_rng()
    qkv = draw(rng, (6, 3, 4, head_dim), np.float32)
    layer_kv = tuple(draw(rng, (7, 48, 4, head_dim), np.float32) for _ in range(2))
    positions = jnp.asarray(rng.integers(0, 48, size=6).astype(np.int32))
    whole, whole_kv = append(qkv, layer_kv, positions)
    first, kv = append(qkv[:2], layer_kv, positions[:2])
    second, kv = append(qkv[2:], kv, positions[2:], first_row=2)
    np.testing.assert_allclose(np.concatenate([first, second]), whole, rtol=1e-6, atol=1e-6)
    for got, want in zip(kv, whole_kv):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    with pytest.raises(ValueError, match="first_row"):
        decode_attention_append(qkv[2:], *layer_kv, positions[2:], interpret=True, first_row=4)


def test_decode_attention_append_lowers_for_cuda_with_the_caches_in_place():
    """Triton's lowering runs on any machine: one kernel, its caches aliased to its inputs (no copy of them), and
    with splits its counters too (the splits combined in the kernel, no XLA after it)."""
    from gptjax.kernels import decode_attention_append

    qkv = jax.ShapeDtypeStruct((8, 3, 16, 64), jnp.bfloat16)
    cache = jax.ShapeDtypeStruct((8, 576, 16, 64), jnp.bfloat16)
    positions = jax.ShapeDtypeStruct((8,), jnp.int32)
    for overrides in ({"heads_per_program": 1, "num_splits": 1},  # one chunk whatever the table says
                      {"heads_per_program": 1, "num_splits": 4, "use_dot": False},
                      {"heads_per_program": 2, "block_k": 64, "num_splits": 1},
                      {"heads_per_program": 2, "block_k": 64, "num_splits": 4},
                      {"heads_per_program": 1, "single_loop": True, "num_splits": 1},
                      {"heads_per_program": 2, "block_k": 64, "single_loop": True, "num_splits": 1}):
        step = jax.jit(lambda *a, kw=overrides: decode_attention_append(*a, **kw))
        text = step.trace(qkv, cache, cache, positions).lower(lowering_platforms=("cuda",)).as_text()
        counted = overrides.get("num_splits", 1) > 1
        assert text.count("xla.gpu.triton") == 1 and text.count("output_operand_alias<") == 2 + counted


@pytest.mark.parametrize("group", [1, 2], ids=["head", "head-group"])
@pytest.mark.parametrize("append", [False, True], ids=["attention", "append"])
def test_decode_attention_splits_combine_in_the_kernel_and_leave_counters_zero(append, group):
    """One head, or a group of two, a program over 3 splits of a ragged batch: the last split of each head (or
    group) combines the parts, on the caller's counters (more than the launch needs, the spare ones untouched),
    which come back zero; a buffer too short for rows x heads (or groups) is refused."""
    from gptjax.kernels import decode_attention_append

    rng, seed = fresh_rng()
    batch, max_seq, heads, head_dim = 3, 96, 2 * group, 16
    qkv = draw(rng, (batch, 3, heads, head_dim), np.float32)
    k_cache, v_cache = (draw(rng, (batch, max_seq, heads, head_dim), np.float32) for _ in range(2))
    lengths = ragged_lengths(rng, batch, max_seq - 1)
    counters = jnp.zeros((batch * 2 + 5,), jnp.int32)
    kw = dict(interpret=True, block_k=16, num_splits=3, heads_per_program=group, counters=counters)
    if append:
        out, k_cache, v_cache, counts = decode_attention_append(qkv, k_cache, v_cache, jnp.asarray(lengths), **kw)
        lengths = lengths + 1
    else:
        out, counts = decode_attention(qkv[:, 0], k_cache, v_cache, jnp.asarray(lengths), **kw)
    ref = decode_reference64(qkv[:, 0], k_cache, v_cache, lengths)
    err = np.linalg.norm(np.asarray(out, np.float64) - ref) / np.linalg.norm(ref)
    assert err < TOL[np.float32], f"relative error {err:.2e} (seed {seed})"
    np.testing.assert_array_equal(np.asarray(counts), np.zeros(counters.shape, np.int32))
    with pytest.raises(ValueError, match=r"counters for 3 rows x 2 heads \(or head groups\)"):
        decode_attention(qkv[:, 0], k_cache, v_cache, jnp.asarray(lengths), **{**kw, "counters": counters[:5]})


# (batch, max_seq, heads, head_dim, heads_per_program, block_k, num_splits, dtype): head groups of 2, of every
# head (4), and of 16 (no padded columns of the block-diagonal query), split and not
HEAD_GROUP_CASES = [(3, 100, 4, 16, 2, 16, 3, np.float32), (2, 77, 4, 32, 4, 16, 1, jnp.bfloat16),
                    (2, 70, 16, 16, 16, 16, 2, np.float16)]


@pytest.mark.parametrize("case", HEAD_GROUP_CASES, ids=lambda c: f"g{c[4]}s{c[6]}")
def test_decode_attention_head_groups_match_float64(case):
    batch, max_seq, heads, head_dim, group, block_k, splits, dtype = case
    rng, seed = fresh_rng()
    q = draw(rng, (batch, heads, head_dim), dtype)
    k_cache, v_cache = (draw(rng, (batch, max_seq, heads, head_dim), dtype) for _ in range(2))
    lengths = ragged_lengths(rng, batch, max_seq)
    out = decode_attention(q, k_cache, v_cache, jnp.asarray(lengths), interpret=True, heads_per_program=group,
                           block_k=block_k, num_splits=splits)
    assert out.shape == q.shape and out.dtype == q.dtype
    ref = decode_reference64(q, k_cache, v_cache, lengths)
    err = np.linalg.norm(np.asarray(out, np.float64) - ref) / np.linalg.norm(ref)
    assert err < TOL[dtype], f"relative error {err:.2e} (seed {seed})"


def test_decode_params_come_from_the_nearest_table_entry(monkeypatch):
    table = {(16, 64, 32, 2048): (1, 128, 4, 4, 2, True), (16, 64, 256, 512): (4, 64, 2, 4, 3, False)}
    monkeypatch.setattr(decode_table, "TABLE", table)
    # nearest on a log scale; the split count keeps the entry's 512 keys per chunk
    assert choose_params(24, 16, 1024, 64) == DecodeParams(1, 128, 2, 4, 2, True)
    assert choose_params(200, 16, 640, 64) == DecodeParams(4, 64, 2, 4, 3, False)
    # other heads x head_dim, or 32-bit caches (not swept): the default rule
    assert choose_params(32, 12, 2048, 64) == default_params(32, 12, 2048, 64)
    assert choose_params(32, 16, 2048, 64, itemsize=4) == default_params(32, 16, 2048, 64, 4)


def test_decode_table_entries_are_valid_launches():
    for (heads, head_dim, batch, max_seq), params in decode_table.TABLE.items():
        group, block_k, splits = params[:3]
        assert heads % group == 0 and block_k & (block_k - 1) == 0 and 1 <= splits <= max_seq // block_k


def test_hopper_kernel_pads_and_traces_on_any_backend():
    # Mosaic GPU runs only on a Hopper GPU (benchmarks/RESULTS.md records its checks there); here: that the
    # wrapper pads a ragged sequence to whole tiles, launches one kernel and slices back to [b, s, h, d]
    q = jnp.zeros((3, 300, 2, 64), jnp.bfloat16)
    jaxpr = jax.make_jaxpr(lambda q, n: hopper_flash_attention(q, q, q, lengths=n, programs=4))(q, jnp.ones(3, int))
    assert str(jaxpr).count("wgmma") >= 2 and jaxpr.out_avals[0].shape == q.shape
    with pytest.raises(ValueError, match="head_dim"):
        hopper_flash_attention(jnp.zeros((1, 64, 2, 32), jnp.bfloat16), *(jnp.zeros((1, 64, 2, 32), jnp.bfloat16),) * 2)


def test_hopper_kernel_reads_the_qkv_product_in_place():
    # the engine's form: the QKV product's [b, s, 3, h, d] output goes to the kernel through a free reshape (no
    # copy of q, k or v taken out of it), padded once for a ragged length; it lowers for CUDA like the other
    from jax import export

    from gptjax.kernels import hopper_flash_attention_qkv

    qkv = jnp.zeros((3, 300, 3, 2, 64), jnp.bfloat16)
    jaxpr = jax.make_jaxpr(lambda x, n: hopper_flash_attention_qkv(x, lengths=n, programs=4))(qkv, jnp.ones(3, int))
    text = str(jaxpr)
    assert text.count("wgmma") >= 2 and text.count(" pad[") == 1 and "squeeze" not in text
    assert jaxpr.out_avals[0].shape == (3, 300, 2, 64)
    spec = jax.ShapeDtypeStruct((2, 256, 3, 2, 128), jnp.float16), jax.ShapeDtypeStruct((2,), jnp.int32)
    exported = export.export(jax.jit(lambda x, n: hopper_flash_attention_qkv(x, lengths=n, programs=5)),
                             platforms=["cuda"])(*spec)
    assert "mosaic_gpu" in exported.mlir_module()
    with pytest.raises(ValueError, match="qkv must be"):
        hopper_flash_attention_qkv(jnp.zeros((1, 64, 2, 2, 64), jnp.bfloat16))


@pytest.mark.parametrize("n_total,programs", [(512, 132), (2048, 132), (7, 3)])
def test_hopper_tile_orders_deal_every_tile_once(n_total, programs):
    # each program's turns cover the tiles exactly once; with the tiles' causal costs (longest first, as `_tile`
    # numbers them) the snake order's busiest program has no more work than round-robin's (program p: tiles p,
    # p + programs, ...)
    from gptjax.kernels.flash_attention_hopper import tile_count, tile_order

    cost = np.repeat(np.arange(n_total // 4 + 1, 0, -1), 4)[:n_total]
    program = jnp.arange(programs, dtype=jnp.int32)
    turns = np.asarray(tile_order(program[:, None], jnp.arange(n_total, dtype=jnp.int32), programs))
    counts = np.asarray(tile_count(program, n_total, programs))
    dealt = [list(turns[p, :counts[p]]) for p in range(programs)]
    assert sorted(sum(dealt, [])) == list(range(n_total))
    assert max(cost[d].sum() for d in dealt) <= max(cost[p::programs].sum() for p in range(programs))


@pytest.mark.parametrize("head_major", [True, False])
def test_hopper_tiles_cover_every_query_tile_once(head_major):
    # both orders number each (sequence, head, 128-row query tile) once, each head's longest tile first; head by
    # head (the default), consecutive tiles share a head, so the programs at work share its keys and values
    from gptjax.kernels.flash_attention_hopper import _tile

    batch, heads, n_tiles = 3, 4, 5
    t = jnp.arange(batch * heads * n_tiles, dtype=jnp.int32)
    tile = _tile(t, None, heads=heads, batch_size=batch, n_tiles=n_tiles, block_kv=128, seq=n_tiles * 128,
                 use_lengths=False, head_major=head_major)
    seen = list(zip(*(np.asarray(x).tolist() for x in (tile.batch, tile.head, tile.start))))
    assert sorted(seen) == [(b, h, q * 128) for b in range(batch) for h in range(heads) for q in range(n_tiles)]
    firsts = {}
    for b, h, start in seen:
        firsts.setdefault((b, h), start)
    assert set(firsts.values()) == {(n_tiles - 1) * 128}
    runs = sum(1 for a, b in zip(seen, seen[1:]) if a[:2] != b[:2])  # changes of (sequence, head)
    assert runs == (batch * heads - 1 if head_major else len(seen) - 1)


def test_hopper_kernel_options_and_block_limits():
    # the orderings of run 6's next step are options: off, the kernel traces as before (no fence, one key wait
    # per block at its top); on, the fence appears. 192-key blocks pad to whole blocks (300 -> 384) and slice
    # back
    from gptjax.kernels.flash_attention_hopper import SMEM_BYTES, SMEM_RESERVED, check_blocks, smem_bytes

    q = jnp.zeros((3, 300, 2, 64), jnp.bfloat16)
    n = jnp.ones(3, jnp.int32)
    base = str(jax.make_jaxpr(lambda q, n: hopper_flash_attention(q, q, q, lengths=n))(q, n))
    both = jax.make_jaxpr(lambda q, n: hopper_flash_attention(q, q, q, lengths=n, block_kv=192, stages=2,
                                                              wait_in_pv=True, fence_softmax=True))(q, n)
    assert "optimization_barrier" not in base and "optimization_barrier" in str(both)
    assert both.out_avals[0].shape == q.shape and "384" in str(both)
    with pytest.raises(ValueError, match="block_kv"):
        hopper_flash_attention(q, q, q, block_kv=96)
    with pytest.raises(ValueError, match="shared memory"):
        hopper_flash_attention(q, q, q, block_kv=256, stages=4)
    with pytest.raises(ValueError, match="stages >= 2"):
        hopper_flash_attention(q, q, q, stages=1, wait_in_pv=True)
    # the next block's wait inside PV is the default at head_dim 128 (faster there on the H200), not at 64
    trace = lambda q, **kw: str(jax.make_jaxpr(lambda q, n: hopper_flash_attention(q, q, q, lengths=n, **kw))(q, n))
    wide = jnp.zeros((3, 300, 2, 128), jnp.bfloat16)
    assert trace(wide) == trace(wide, wait_in_pv=True) != trace(wide, wait_in_pv=False)
    assert base == trace(q, wait_in_pv=False) != trace(q, wait_in_pv=True)
    # the most stages that fit (Mosaic GPU's own count, lowered for sm_90, agrees; see the module)
    most = {(d, b): max(s for s in range(1, 16) if smem_bytes(b, s, d) + SMEM_RESERVED <= SMEM_BYTES)
            for d in (64, 128) for b in (128, 192, 256)}
    assert most == {(64, 128): 6, (64, 192): 4, (64, 256): 3, (128, 128): 3, (128, 192): 2, (128, 256): 1}
    # the default prefetches the next tile's queries into a second buffer (one query load more in the program;
    # one stage fewer fits at head_dim 128)
    single = jax.make_jaxpr(lambda q, n: hopper_flash_attention(q, q, q, lengths=n, prefetch_q=False))(q, n)
    assert base.count("copy_gmem_to_smem") == str(single).count("copy_gmem_to_smem") + 1
    assert smem_bytes(128, 2, 128, q_buffers=2) + SMEM_RESERVED <= SMEM_BYTES
    with pytest.raises(ValueError, match="shared memory"):
        wide = jnp.zeros((1, 128, 2, 128), jnp.float16)
        hopper_flash_attention(wide, wide, wide, stages=3)
    check_blocks(128, 3, 128)  # run 6 timed it


@pytest.mark.parametrize("head_dim, options", [(64, {}), (128, {"wait_in_pv": True, "fence_softmax": True}),
                                               (128, {"carry_stagger": True}), (64, {"carry_stagger": False}),
                                               (128, {"half_diagonal": True}),
                                               (64, {"half_diagonal": True, "block_kv": 256, "stages": 2}),
                                               (128, {"head_major": False})])
def test_hopper_kernel_lowers_for_cuda_on_any_machine(head_dim, options):
    """Mosaic GPU cannot run on a CPU, but it lowers there: exporting for CUDA runs the kernel's lowering
    (layouts, the matrix products' operands, barriers, shared memory), which a trace alone does not."""
    from jax import export

    q = jax.ShapeDtypeStruct((2, 300, 2, head_dim), jnp.bfloat16)
    n = jax.ShapeDtypeStruct((2,), jnp.int32)
    exported = export.export(jax.jit(lambda q, n: hopper_flash_attention(q, q, q, lengths=n, programs=5, **options)),
                             platforms=["cuda"])(q, n)
    assert "mosaic_gpu" in exported.mlir_module()


def test_decode_attention_reads_the_first_rows_of_a_larger_cache():
    # a decode call that runs only the first slots passes the whole cache
    rng, seed = fresh_rng()
    q = draw(rng, (2, 2, 16), np.float32)
    k_cache, v_cache = (draw(rng, (5, 70, 2, 16), np.float32) for _ in range(2))
    lengths = np.array([70, 23], np.int32)
    ref = decode_reference64(q, k_cache[:2], v_cache[:2], lengths)
    for out in (decode_attention(q, k_cache, v_cache, jnp.asarray(lengths), interpret=True, block_k=16),
                kernels.decode_attention_reference(q, k_cache, v_cache, jnp.asarray(lengths))):
        assert out.shape == q.shape
        err = np.linalg.norm(np.asarray(out, np.float64) - ref) / np.linalg.norm(ref)
        assert err < TOL[np.float32], f"relative error {err:.2e} (seed {seed})"


@pytest.mark.parametrize("group", [1, 2])
def test_decode_attention_in_one_loop_or_two_gives_the_same_answer(group):
    """Both walks of a chunk (one masked loop, the default, and whole blocks then the crossing one), on rows
    that end inside a block, on whole blocks and at zero, match float64, for the step's store and attention
    alike."""
    from gptjax.kernels import decode_attention_append

    rng, seed = fresh_rng()
    qkv = draw(rng, (4, 3, 4, 16), np.float32)
    k_cache, v_cache = (draw(rng, (4, 96, 4, 16), np.float32) for _ in range(2))
    positions = np.array([37, 63, 0, 95], np.int32)  # new tokens at these entries: 37 valid, 63, none, 95
    kw = dict(interpret=True, block_k=32, num_splits=1, num_stages=3, heads_per_program=group)
    outs = [decode_attention_append(qkv, k_cache, v_cache, jnp.asarray(positions), single_loop=single, **kw)
            for single in (True, False)]
    ref = decode_reference64(qkv[:, 0], outs[1][1], outs[1][2], positions + 1)
    for out, new_k, new_v in outs:
        err = np.linalg.norm(np.asarray(out, np.float64) - ref) / np.linalg.norm(ref)
        assert err < TOL[np.float32], f"relative error {err:.2e} (seed {seed})"
        np.testing.assert_array_equal(np.asarray(new_k), np.asarray(outs[0][1]))
    lengths = positions + 1
    reads = [decode_attention(qkv[:, 0], outs[0][1], outs[0][2], jnp.asarray(lengths), single_loop=single, **kw)
             for single in (True, False)]
    for out in reads:
        err = np.linalg.norm(np.asarray(out, np.float64) - ref) / np.linalg.norm(ref)
        assert err < TOL[np.float32], f"relative error {err:.2e} (seed {seed})"


def test_decode_attention_reads_only_valid_entries():
    # entries past a length hold NaN here: a kernel that reads them (or weighs them by 0) returns NaN
    rng, seed = fresh_rng()
    q = draw(rng, (3, 2, 16), np.float32)
    k_cache, v_cache = (np.array(draw(rng, (3, 90, 2, 16), np.float32)) for _ in range(2))
    lengths = np.array([90, 37, 1], np.int32)
    ref = decode_reference64(q, k_cache, v_cache, lengths)
    for i, n in enumerate(lengths):
        k_cache[i, n:] = np.nan
        v_cache[i, n:] = np.nan
    for splits, use_dot, group, single in [(1, False, 1, False), (4, False, 1, False), (4, True, 1, True),
                                           (3, False, 2, False), (1, True, 1, True), (2, False, 2, True)]:
        out = decode_attention(q, k_cache, v_cache, jnp.asarray(lengths), interpret=True, block_k=16,
                               num_splits=splits, use_dot=use_dot, heads_per_program=group, single_loop=single)
        err = np.linalg.norm(np.asarray(out, np.float64) - ref) / np.linalg.norm(ref)
        assert err < 2e-3, f"{splits} splits, one loop {single}: relative error {err:.2e} (seed {seed})"


def test_decode_attention_empty_sequence_gives_zeros():
    rng, _ = fresh_rng()
    q = draw(rng, (2, 2, 16), np.float32)
    cache = draw(rng, (2, 64, 2, 16), np.float32)
    for splits, group in [(1, 1), (2, 1), (2, 2)]:
        out = decode_attention(q, cache, cache, jnp.array([0, 5]), interpret=True, block_k=16, num_splits=splits,
                               heads_per_program=group)
        np.testing.assert_array_equal(np.asarray(out[0]), 0.0)


def test_dispatch_pallas_matches_xla():
    assert kernels.default_impl() == ("pallas" if jax.default_backend() == "gpu" else "xla")
    rng, seed = fresh_rng()
    q, k, v = (draw(rng, (2, 48, 2, 16), np.float32) for _ in range(3))
    lengths = jnp.array([48, 29])
    qkv = jnp.stack([q, k, v], axis=2)  # the QKV product's layout
    a = kernels.prefill_attention(qkv, lengths, "pallas")
    b = kernels.prefill_attention(qkv, lengths, "xla")
    assert valid_rows_error(a, np.asarray(b, np.float64), [48, 29]) < 2e-3, f"seed {seed}"
    a = kernels.decode_step_attention(q[:, 0], k, v, lengths, "pallas")
    b = kernels.decode_step_attention(q[:, 0], k, v, lengths, "xla")
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-3, atol=2e-4)


def test_dispatch_runs_per_shard_under_a_mesh():
    # data=2 x tensor=4 over 8 CPU devices: batch rows and heads split, the kernel runs inside shard_map
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 devices")
    mesh = sharding.make_mesh(data=2, tensor=4, devices=jax.devices()[:8])
    rng, seed = fresh_rng()
    q, k, v = (draw(rng, (4, 40, 8, 16), np.float32) for _ in range(3))
    lengths = jnp.array([40, 13, 7, 33])
    cache_layout = NamedSharding(mesh, P("data", None, "tensor", None))
    qs, ks, vs = (jax.device_put(x, cache_layout) for x in (q, k, v))
    qkv = jax.device_put(jnp.stack([q, k, v], axis=2), NamedSharding(mesh, P("data", None, None, "tensor", None)))
    ls = jax.device_put(lengths, NamedSharding(mesh, P("data")))
    prefill = jax.jit(lambda *a: kernels.prefill_attention(*a, "pallas"))
    decode = jax.jit(lambda *a: kernels.decode_step_attention(*a, "pallas"))
    append = jax.jit(lambda qkv, k, v, pos: kernels.decode_step_append(qkv, (k, v), pos, "pallas"))
    step = jnp.stack([q[:, 1], k[:, 1], v[:, 1]], axis=1)  # the token at position 1 again
    with jax.set_mesh(mesh):
        assert "shard_map" in str(jax.make_jaxpr(prefill)(qkv, ls))
        out = prefill(qkv, ls)
        out1 = decode(qs[:, 0], ks, vs, ls)
        odd = decode(qs[:3, 0], ks[:3], vs[:3], ls[:3])  # 3 rows don't split over data=2: kept whole
        appended, (k2, v2) = append(step, ks, vs, ls - 1)
        # the first 2 rows of a 4-row cache, both split over data=2: each shard would pair the wrong rows
        with pytest.raises(ValueError, match="same rows"):
            decode(qs[:2, 0], ks, vs, ls[:2])
    assert k2.sharding.is_equivalent_to(ks.sharding, k2.ndim)  # the caches stay where they were
    np.testing.assert_allclose(np.asarray(appended),
                               decode_reference64(q[:, 1], np.asarray(k2), np.asarray(v2), np.asarray(lengths)),
                               rtol=2e-3, atol=2e-4)
    last = np.asarray(lengths) - 1
    np.testing.assert_array_equal(np.asarray(k2)[np.arange(4), last], np.asarray(k)[:, 1])
    assert out.sharding.is_equivalent_to(NamedSharding(mesh, P("data", None, "tensor", None)), out.ndim)
    n = np.asarray(lengths)
    assert valid_rows_error(out, prefill_reference64(q, k, v, n), n) < 2e-3, f"seed {seed}"
    np.testing.assert_allclose(np.asarray(out1), decode_reference64(q[:, 0], k, v, n), rtol=2e-3, atol=2e-4)
    np.testing.assert_allclose(np.asarray(odd), decode_reference64(q[:3, 0], k[:3], v[:3], n[:3]), rtol=2e-3,
                               atol=2e-4)


def test_engine_greedy_tokens_pallas_equal_xla(monkeypatch):
    """Every Pallas kernel at once (interpret mode) against the XLA path: attention, and the decode matmuls;
    then attention alone, its decode kernel storing each step's K/V (`decode_attention_append`).
    With `KERNEL_MAX_BYTES` at 200 KB, gpt2-tiny's QKV (196 KB) and attention out run on the matmul kernels
    and the MLP's two products (256 KB each) through XLA: both paths and their hand-over of the residual, as
    for the 6.7B model. float32: in 16-bit formats the paths round at
    different places (the matmul kernels keep the sums in float32) and a random model's near-ties part the
    tokens; the kernel tests check the 16-bit arithmetic, and the H200 runs compare fp16 tokens (RESULTS run
    11). Decode attention in 3 splits of 16-key blocks: combined in the kernel, on the counters that the step
    hands from kernel to kernel."""
    import importlib

    from gptjax import decode_block

    monkeypatch.setattr(decode_block, "KERNEL_MAX_BYTES", 200_000)
    attention = importlib.import_module("gptjax.kernels.decode_attention")
    monkeypatch.setattr(attention, "choose_params", lambda *a, **k: attention.DecodeParams(1, 16, 3, 4, 2, True))
    prompts = [[5, 17, 99], list(range(1, 20)), [7] * 30]
    xla = gptjax.Engine.from_preset("gpt2-tiny", engine_config=gptjax.EngineConfig(attention="xla"))
    pallas = gptjax.Engine.from_preset("gpt2-tiny", engine_config=gptjax.EngineConfig(attention="pallas",
                                                                                      decode_matmuls="pallas"))
    # XLA's decode step (`folded_block`) with the attention kernel that stores the step's K/V itself
    appending = gptjax.Engine.from_preset("gpt2-tiny", engine_config=gptjax.EngineConfig(attention="pallas",
                                                                                         decode_matmuls="xla"))
    assert (xla.decode_matmuls, pallas.decode_matmuls) == ("xla", "pallas")
    want = xla.generate(prompts, max_new_tokens=6, greedy=True, stop_token_ids=[])
    for engine in (pallas, appending):
        got = engine.generate(prompts, max_new_tokens=6, greedy=True, stop_token_ids=[])
        assert [r.output_ids for r in got] == [r.output_ids for r in want]
    assert len({tuple(r.output_ids) for r in want}) > 1  # the prompts really lead different ways


def _nucleus_bounds64(row, k: int):
    """The float64 truth for one row of logits: (its logits in falling order; the top-k count, ties at the k-th
    logit kept, or the vocab; the cumulative masses before and including each of those tokens, from the
    renormalised top-k distribution)."""
    order = np.sort(np.asarray(row, np.float64))[::-1]
    k = int((order >= order[k - 1]).sum()) if 0 < k < len(order) else len(order)
    probs = np.exp(order[:k] - order[0])
    probs /= probs.sum()
    return order, k, np.cumsum(probs) - probs, np.cumsum(probs)


@pytest.mark.parametrize("vocab,spread,dtype,launch", [
    (50257, 1.0, np.float32, {}), (50257, 6.0, jnp.bfloat16, {}), (1000, 3.0, np.float16, {}),
    (7, 1.0, np.float32, {}),
    (50257, 1.0, np.float32, {"defer": False, "block": 2048}),
    (1000, 6.0, jnp.bfloat16, {"defer": False, "block": 256})])
def test_sampling_filter_keeps_what_the_float64_sort_keeps(vocab, spread, dtype, launch):
    """Fresh random logits, flat (30k tokens in a 0.9 nucleus) and peaked, rows asking top-k alone, top-p alone,
    both, and neither: the kernel (interpret mode; its default launch, and the sums reduced once a block) keeps
    exactly the top-k; its nucleus is the smallest set of the largest logits holding top_p, except that the last
    token may go either way where its cumulative mass is within float32 rounding of top_p; ties (16-bit logits
    have them) are kept or dropped whole. The sort-based reference holds to the same."""
    from gptjax.kernels import filter_threshold, filter_threshold_reference

    seed = np.random.SeedSequence().entropy % 2**31
    rng = np.random.default_rng(seed)
    top_k = np.array([0, 40, 1, 0, 5, vocab + 3, 0, 3], np.int32)
    top_p = np.array([0.9, 1.0, 0.5, 1.0, 0.3, 0.95, 0.05, 0.99], np.float32)
    scaled = jnp.asarray((rng.standard_normal((len(top_k), vocab)) * spread).astype(dtype)).astype(jnp.float32)
    for threshold in (filter_threshold(scaled, top_k, top_p, interpret=True, **launch),
                      filter_threshold_reference(scaled, top_k, top_p)):
        kept = (np.asarray(scaled) >= np.asarray(threshold)[:, None]).sum(axis=1)
        for r in range(len(top_k)):
            order, k, before, including = _nucleus_bounds64(np.asarray(scaled[r]), int(top_k[r]))
            if top_p[r] >= 1.0:
                assert kept[r] == k, f"row {r}: kept {kept[r]} of a top-{k} (seed {seed})"
                continue
            n = kept[r]
            first_of_tie = int(np.argmax(order == order[n - 1]))
            assert 1 <= n <= k and before[first_of_tie] < top_p[r] + 1e-6, f"row {r}: too many, {n} (seed {seed})"
            assert n == k or including[n - 1] >= top_p[r] - 1e-6, f"row {r}: too few, {n} (seed {seed})"


def test_sampling_filter_keeps_ties_at_the_threshold_whole():
    """Logits in a few distinct values: a threshold inside a tie keeps the whole tie, as the sort does."""
    from gptjax.kernels import filter_threshold, filter_threshold_reference

    scaled = jnp.asarray(np.random.default_rng(3).integers(0, 6, (4, 3000)).astype(np.float32) * 0.5)
    top_k, top_p = np.array([10, 0, 700, 1], np.int32), np.array([1.0, 0.5, 0.9, 0.2], np.float32)
    got = filter_threshold(scaled, top_k, top_p, interpret=True)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(filter_threshold_reference(scaled, top_k, top_p)))
    assert np.isin(np.asarray(got), np.asarray(scaled)).all()  # thresholds are logits, so a tie is in or out


def test_sampling_filter_lowers_for_cuda_as_one_kernel():
    from gptjax.kernels import filter_threshold

    specs = (jax.ShapeDtypeStruct((256, 50257), jnp.float32), jax.ShapeDtypeStruct((256,), jnp.int32),
             jax.ShapeDtypeStruct((256,), jnp.float32))
    text = jax.jit(filter_threshold).trace(*specs).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("xla.gpu.triton") == 1
