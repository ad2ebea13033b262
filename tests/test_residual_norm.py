"""The residual-add-and-LayerNorm kernel (interpret mode here) against float64 numpy, on fresh random inputs."""

import jax.numpy as jnp
import numpy as np
import pytest

from gptjax.kernels.residual_norm import residual_norm, residual_norm_reference, supports

EPS = 1e-5


def _layer_norm64(h, scale, shift):
    mean, var = h.mean(-1, keepdims=True), h.var(-1, keepdims=True)
    return (h - mean) / np.sqrt(var + EPS) * np.asarray(scale, np.float64) + np.asarray(shift, np.float64)


def _rel(got, want):
    return np.linalg.norm(np.asarray(got, np.float64) - want) / np.linalg.norm(want)


@pytest.mark.parametrize("splits,rows,hidden,dtype,tol", [(8, 3, 256, jnp.bfloat16, 4e-3), (1, 2, 128, jnp.float32, 1e-6),
                                                          (16, 1, 512, jnp.float16, 5e-4), (0, 5, 256, jnp.float16, 5e-4),
                                                          (0, 2, 128, jnp.float32, 1e-6)])
def test_kernel_matches_float64(splits, rows, hidden, dtype, tol):
    rng = np.random.default_rng()
    scale, shift, bias = (jnp.asarray(rng.standard_normal(hidden), dtype) for _ in range(3))
    residual = jnp.asarray(rng.standard_normal((rows, hidden)) * 3 + 1, jnp.float32)  # an offset: the mean matters
    if not splits:
        x = residual_norm(residual, scale, shift, eps=EPS, interpret=True)
        assert x.dtype == dtype and x.shape == (rows, hidden)
        assert _rel(x, _layer_norm64(np.asarray(residual, np.float64), scale, shift)) < tol
        return
    parts = jnp.asarray(rng.standard_normal((splits, rows, hidden)), jnp.float32)
    h, x = residual_norm(residual, scale, shift, parts, bias, eps=EPS, interpret=True)
    h64 = np.asarray(residual, np.float64) + np.asarray(bias, np.float64) + np.asarray(parts, np.float64).sum(0)
    assert h.dtype == jnp.float32 and x.dtype == dtype
    assert _rel(h, h64) < 1e-6
    assert _rel(x, _layer_norm64(h64, scale, shift)) < tol
    h_ref, x_ref = residual_norm_reference(residual, scale, shift, parts, bias, eps=EPS)
    assert _rel(h_ref, h64) < 1e-6 and _rel(x_ref, _layer_norm64(h64, scale, shift)) < tol


def test_hidden_sizes_that_are_no_power_of_two_take_the_reference():
    """Triton's blocks are powers of two: hidden 768 (GPT-2) runs the reference, with the same result."""
    assert supports(4, 1024) and supports(0, 1024) and not supports(4, 768) and not supports(17, 1024)
    rng = np.random.default_rng()
    residual = jnp.asarray(rng.standard_normal((2, 768)), jnp.float32)
    scale, shift = jnp.ones(768, jnp.float32), jnp.zeros(768, jnp.float32)
    x = residual_norm(residual, scale, shift, eps=EPS, interpret=True)
    assert _rel(x, _layer_norm64(np.asarray(residual, np.float64), scale, shift)) < 1e-6


@pytest.mark.parametrize("splits", [0, 8])
def test_kernel_lowers_for_cuda(splits):
    """Triton's lowering runs on any machine: the kernel as the 6.7B step has it (hidden 4096, bf16) lowers to
    one Triton call."""
    import jax

    residual = jax.ShapeDtypeStruct((2, 4096), jnp.float32)
    vector = jax.ShapeDtypeStruct((4096,), jnp.bfloat16)
    parts = jax.ShapeDtypeStruct((splits, 2, 4096), jnp.float32)
    if splits:
        fn, args = (lambda r, s, b, p, c: residual_norm(r, s, b, p, c, eps=EPS)), (residual, vector, vector, parts,
                                                                                     vector)
    else:
        fn, args = (lambda r, s, b: residual_norm(r, s, b, eps=EPS)), (residual, vector, vector)
    text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("xla.gpu.triton") == 1
