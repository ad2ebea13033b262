"""The large-batch decode products (`gptjax.kernels.batch_matmul`): the `jnp` reference against float64 here; the
Mosaic GPU kernel, which runs only on a Hopper GPU, lowered for CUDA here and checked against the reference on
the GPU (`benchmarks/gemm_probe.py`)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptjax.kernels.batch_matmul import batch_matmul, batch_matmul_reference, supports


def _gelu64(y, name):
    if name == "gelu":
        return 0.5 * y * (1 + np.vectorize(math.erf)(y / np.sqrt(2)))
    return 0.5 * y * (1 + np.tanh(np.sqrt(2 / np.pi) * (y + 0.044715 * y ** 3)))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("activation, with_residual", [("", False), ("gelu_new", False), ("gelu", False), ("", True)])
def test_reference_matches_float64(dtype, activation, with_residual):
    """x @ w + b accumulated in float32, then GELU (tanh or erf) or + the residual (float32, the residual stream's
    dtype), on fresh random inputs: within the output dtype's rounding of float64."""
    rng = np.random.default_rng()
    m, k, n = 24, 96, 40
    x = rng.standard_normal((m, k)).astype(np.float32)
    w = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
    b = (0.1 * rng.standard_normal(n)).astype(np.float32)
    r = rng.standard_normal((m, n)).astype(np.float32) if with_residual else None
    x_, w_, b_ = (jnp.asarray(a).astype(dtype) for a in (x, w, b))
    got = batch_matmul_reference(x_, w_, b_, None if r is None else jnp.asarray(r), activation=activation)
    assert got.dtype == (jnp.float32 if with_residual else dtype)
    want = np.asarray(x_, np.float64) @ np.asarray(w_, np.float64) + np.asarray(b_, np.float64)
    if activation:
        want = _gelu64(want, activation)
    if with_residual:
        want = want + r
    err = np.linalg.norm(np.asarray(got, np.float64) - want) / np.linalg.norm(want)
    assert err < {jnp.float32: 1e-6, jnp.bfloat16: 8e-3, jnp.float16: 1e-3}[dtype], err


@pytest.mark.parametrize("tile_m, tile_n, stages, delay", [(64, 128, 4, 0), (64, 64, 4, 1), (128, 128, 4, 1),
                                                          (64, 256, 3, 2)])
@pytest.mark.parametrize("k, n, activation, residual", [
    (1024, 3072, "", None), (1024, 1024, "", jnp.float32), (1024, 4096, "gelu_new", None),
    (4096, 1024, "", jnp.float16)])
def test_kernel_lowers_for_cuda_at_the_345m_products(tile_m, tile_n, stages, delay, k, n, activation, residual):
    """Each product of a megatron-345m layer at 256 rows, with its epilogue (bias; GPT-2's GELU after MLP in; the
    residual in float32 or float16 after attention out and MLP out), lowers to one Mosaic GPU kernel for CUDA, with
    up to two products left running."""
    s = jax.ShapeDtypeStruct
    args = [s((256, k), jnp.float16), s((k, n), jnp.float16), s((n,), jnp.float16)]
    if residual is not None:
        args.append(s((256, n), residual))

    def call(*a):
        return batch_matmul(*a, activation=activation, tile_m=tile_m, tile_n=tile_n, stages=stages, delay=delay)

    text = jax.jit(call).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("mosaic_gpu") >= 1


@pytest.mark.parametrize("k, n, activation, residual", [
    (1024, 3072, "", None), (4096, 1024, "", jnp.float32), (1024, 1024, "", jnp.float16)])
def test_kernel_lowers_for_cuda_in_narrow_tiles(k, n, activation, residual):
    """32-column tiles (their bias copied in an aligned 64-column window, the copy's smallest) lower to one Mosaic GPU
    kernel each."""
    s = jax.ShapeDtypeStruct
    args = [s((256, k), jnp.float16), s((k, n), jnp.float16), s((n,), jnp.float16)]
    args += [s((256, n), residual)] if residual is not None else []

    def call(x, w, b, *rest):
        return batch_matmul(x, w, b, *rest, activation=activation, tile_n=32)

    assert "mosaic_gpu" in jax.jit(call).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


def test_kernel_lowers_for_cuda_in_bfloat16():
    """bfloat16 weights, with GELU and with a float32 residual, lower too."""
    s = jax.ShapeDtypeStruct
    x, w, b = s((128, 1024), jnp.bfloat16), s((1024, 4096), jnp.bfloat16), s((4096,), jnp.bfloat16)
    gelu = jax.jit(lambda *a: batch_matmul(*a, activation="gelu_new")).trace(x, w, b)
    assert "mosaic_gpu" in gelu.lower(lowering_platforms=("cuda",)).as_text()
    residual = jax.jit(batch_matmul).trace(x, w, b, s((128, 4096), jnp.float32))
    assert "mosaic_gpu" in residual.lower(lowering_platforms=("cuda",)).as_text()


def test_partial_tiles_and_activations_it_lacks_are_refused_by_name():
    """Whole tiles only; the erf GELU (Mosaic GPU has no erf) and unknown activations are refused."""
    x, w, b = jnp.zeros((100, 64), jnp.float16), jnp.zeros((64, 128), jnp.float16), jnp.zeros((128,), jnp.float16)
    assert not supports(100, 64, 128) and supports(128, 64, 128) and supports(128, 64, 128, activation="gelu_new")
    assert not supports(128, 64, 128, activation="gelu")
    with pytest.raises(ValueError, match="M=100"):
        batch_matmul(x, w, b)
    for name in ("relu", "gelu"):
        with pytest.raises(ValueError, match=name):
            batch_matmul(x[:64], w, b, activation=name)
