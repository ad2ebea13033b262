"""The decode step's small-batch matmul kernel (interpret mode here) against float64 numpy. (The engine's
tokens with it against the Flax block's: tests/test_kernels.py, with the attention kernels.)

Every check draws new inputs (the seed is in the failure message) and a row count that is not a power of two
where it can, so the kernel's masked rows are exercised."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gptjax
from benchmarks.decode_matmul_bench import float64_product, operands
from gptjax import decode_block
from gptjax.config import preset
from gptjax.kernels.decode_matmul import (TARGET_PROGRAMS, MatmulParams, decode_matmul, decode_matmul_reference,
                                          default_params, sum_parts)

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2, jnp.float16: 2e-3}


def fresh_seed() -> int:
    return int(np.random.SeedSequence().entropy % 2**31)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("prologue", ["ln", "", "gelu"])  # "gelu": GELU over two parts + bias
def test_kernel_matches_float64(dtype, prologue):
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    rows, splits = int(rng.choice([1, 3, 16, 23, 64])), int(rng.choice([1, 4]))
    k, n = (512, 96) if prologue == "gelu" else (128, 192)  # N not a power of two: 3 column blocks of 32
    ws, kw = operands(jax.random.PRNGKey(seed), rows, k, n, prologue, dtype, copies=1)
    params = MatmulParams(32, 32, splits, 4, 2)
    out = decode_matmul(ws[0], params=params, interpret=True, **kw)
    ref = float64_product(ws[0], kw)
    got = np.asarray(sum_parts(out, n), np.float64)
    err = np.linalg.norm(got - ref) / np.linalg.norm(ref)
    assert err < TOL[dtype], f"seed {seed}, rows {rows}, splits {splits}: relative error {err:.2e}"
    # the jnp form (the path for weights too large for the kernel) agrees with it too
    err = np.linalg.norm(np.asarray(decode_matmul_reference(ws[0], **kw), np.float64) - ref) / np.linalg.norm(ref)
    assert err < TOL[dtype], f"seed {seed}, rows {rows}: reference's relative error {err:.2e}"


def test_default_params_fill_the_chip_and_tile():
    for rows, k, n in [(1, 1024, 3072), (8, 1024, 1024), (64, 4096, 1024), (1, 4096, 16384), (3, 128, 384)]:
        p = default_params(rows, k, n)
        assert n % p.block_n == 0 and (k // p.splits) % p.block_k == 0
        if n >= 1024:  # a narrow output is split over K
            assert (n // p.block_n) * p.splits >= TARGET_PROGRAMS // 2, (rows, k, n, p)


def test_bad_shapes_are_refused_by_name():
    w = jnp.zeros((128, 64), jnp.float32)
    with pytest.raises(ValueError, match="decode_matmul"):
        decode_matmul(w, jnp.ones((65, 128)), interpret=True)  # more rows than the kernel serves
    with pytest.raises(ValueError, match="decode_matmul"):
        decode_matmul(w, jnp.ones((2, 100)), interpret=True)  # K mismatch
    with pytest.raises(ValueError, match="decode_matmuls"):
        gptjax.EngineConfig(decode_matmuls="cublas")


def test_choose_defaults_to_xla_and_refuses_a_split_model():
    config = preset("gpt2-tiny")
    one = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    assert decode_block.choose("", config, one) == "xla"
    assert decode_block.choose("pallas", config, one) == "pallas"
    if len(jax.devices()) > 1:
        two = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("tensor",))
        with pytest.raises(ValueError, match="one device"):
            decode_block.choose("pallas", config, two)
    with pytest.raises(ValueError, match="one device"):
        decode_block.choose("pallas", config.replace(hidden=72, n_heads=8), one)  # 72 is no multiple of 16
