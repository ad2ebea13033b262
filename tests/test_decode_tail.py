"""The persistent kernel of a decode layer's products after attention (interpret mode here: its phases run as
the grid's outer axis) against float64 numpy; its barrier runs only on a GPU (benchmarks/decode_matmul_bench.py
checks the kernel there against the same float64 arithmetic)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks.decode_matmul_bench import float64_tail, tail_operands
from gptjax.kernels.decode_matmul import new_counters
from gptjax.kernels.decode_tail import (MAX_PROGRAMS, TILE_BYTES, decode_tail, decode_tail_reference, new_sync,
                                        plan, supports)

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2, jnp.float16: 3e-3}


def fresh_seed() -> int:
    return int(np.random.SeedSequence().entropy % 2**31)


def rel_err(got, want) -> float:
    return float(np.linalg.norm(np.asarray(got, np.float64) - want) / np.linalg.norm(want))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_kernel_matches_float64(dtype):
    seed = fresh_seed()
    rows = int(np.random.default_rng(seed).choice([1, 3, 11, 16]))
    ops = tail_operands(jax.random.PRNGKey(seed), rows, 256, 1024, dtype)
    counters = new_counters(1024)
    out, sync, counters = decode_tail(*ops, sync=new_sync(), counters=counters, interpret=True)
    want = float64_tail(*ops)
    assert out.shape == (rows, 256) and out.dtype == jnp.float32
    err = rel_err(out, want)
    assert err < TOL[dtype], f"seed {seed}, rows {rows}: relative error {err:.2e}"
    assert not np.any(np.asarray(counters)), "the split counters must be left at zero for the next kernel"
    # the jnp form agrees with the same float64 arithmetic
    err = rel_err(decode_tail_reference(*ops)[0], want)
    assert err < TOL[dtype], f"seed {seed}, rows {rows}: reference's relative error {err:.2e}"


def test_plan_fills_the_gpu_within_its_limits():
    p = plan(1024, 4096)  # megatron-345m: 128 programs, 32 and 64 KB weight tiles
    assert p.programs == MAX_PROGRAMS and (p.out_cols, p.in_cols, p.splits) == (16, 32, 2)
    for hidden, ffn in ((1024, 4096), (512, 2048), (256, 1024)):
        p = plan(hidden, ffn)
        assert p.programs <= MAX_PROGRAMS
        assert max(hidden * p.out_cols, hidden * p.in_cols, ffn // p.splits * p.out_cols) * 2 <= TILE_BYTES
        assert supports(1, hidden, ffn) and supports(16, hidden, ffn) and not supports(17, hidden, ffn)
    assert plan(768, 3072) is None  # gpt2-124m: not powers of two
    assert plan(2048, 8192) is None  # gpt3-1.3b: weight tiles of 128 KB


def test_bad_operands_are_refused_by_name():
    ops = list(tail_operands(jax.random.PRNGKey(0), 2, 256, 1024, jnp.float32))
    ops[6] = ops[6][:, :512]  # w_i narrower than w_m is tall
    with pytest.raises(ValueError, match="w_m"):
        decode_tail(*ops, sync=new_sync(), counters=new_counters(1024), interpret=True)
    ops = tail_operands(jax.random.PRNGKey(0), 2, 768, 3072, jnp.float32)
    with pytest.raises(ValueError, match="powers of two"):
        decode_tail(*ops, sync=new_sync(), counters=new_counters(3072), interpret=True)
