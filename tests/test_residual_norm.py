"""`residual_norm` (gptjax/kernels/residual_norm.py): a decode step's LayerNorm with the residual add before it, in
one kernel. The kernel runs interpreted here against its `jnp` reference, and the reference against float64, on
fresh random inputs whose rows have offsets and spreads of their own; it also lowers for CUDA (one Triton kernel)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptjax.kernels.residual_norm import residual_norm, residual_norm_reference, supports

EPS = 1e-5
TOL = {jnp.float32: 2e-6, jnp.bfloat16: 8e-3, jnp.float16: 1e-3}


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def inputs(rows: int, hidden: int, splits: int, dtype, rng):
    h = rng.normal(rng.normal(0, 2, (rows, 1)), rng.uniform(0.5, 3, (rows, 1)), (rows, hidden)).astype(np.float32)
    parts = rng.normal(0, 1, (splits, rows, hidden)).astype(np.float32) if splits else None
    bias = rng.normal(0, 0.5, hidden).astype(np.float32) if splits else None
    return h, parts, bias


def float64_norm(h, parts, bias):
    h = h.astype(np.float64) + (0 if parts is None else bias.astype(np.float64) + parts.astype(np.float64).sum(0))
    return h, (h - h.mean(-1, keepdims=True)) / np.sqrt(h.var(-1, keepdims=True) + EPS)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("rows, hidden, splits", [(1, 1024, 8), (3, 1600, 0), (5, 320, 3), (64, 1024, 4)])
def test_kernel_and_reference_match_float64(dtype, rows, hidden, splits):
    """The summed stream (float32) and the normalised rows (in `dtype`) from the interpreted kernel and from the
    reference, each within the output's rounding of float64; hidden sizes that are not powers of two (1600: 25 tiles
    of 64) included, and a step without parts (the LayerNorm after attention out) returning h itself."""
    rng = np.random.default_rng()
    h, parts, bias = inputs(rows, hidden, splits, dtype, rng)
    bias_ = None if bias is None else jnp.asarray(bias).astype(dtype)
    want_h, want_x = float64_norm(h, parts, None if bias_ is None else np.asarray(bias_, np.float32))
    args = (jnp.asarray(h), None if parts is None else jnp.asarray(parts), bias_)
    for fn in (residual_norm_reference, lambda *a, **k: residual_norm(*a, **k, interpret=True)):
        got_h, got_x = fn(*args, eps=EPS, out_dtype=dtype)
        assert got_h.dtype == jnp.float32 and got_x.dtype == dtype and got_x.shape == (rows, hidden)
        assert rel(got_h, want_h) < 1e-6 and rel(got_x, want_x) < TOL[dtype]
        if parts is None:
            np.testing.assert_array_equal(got_h, h)


def test_bad_shapes_are_refused_with_the_shapes_named():
    h = jnp.zeros((2, 128), jnp.float32)
    with pytest.raises(ValueError, match=r"parts \(4, 2, 64\)"):
        residual_norm(h, jnp.zeros((4, 2, 64)), jnp.zeros(128), eps=EPS, out_dtype=jnp.float16, interpret=True)
    with pytest.raises(ValueError, match="bias None"):
        residual_norm(h, jnp.zeros((4, 2, 128)), None, eps=EPS, out_dtype=jnp.float16, interpret=True)
    assert supports(1024) and supports(1600) and not supports(100) and not supports(32768)
    with pytest.raises(ValueError, match="hidden 100"):
        residual_norm(jnp.zeros((2, 100)), eps=EPS, out_dtype=jnp.float16, interpret=True)


@pytest.mark.parametrize("splits, early_launch", [(8, True), (0, False)])
def test_kernel_lowers_for_cuda(splits, early_launch):
    """One Triton kernel for CUDA, with the early launch's trigger where asked for."""
    s = jax.ShapeDtypeStruct
    args = [s((256, 1024), jnp.float32)] + ([s((splits, 256, 1024), jnp.float32), s((1024,), jnp.float16)]
                                            if splits else [])

    def call(*a):
        return residual_norm(*a, eps=EPS, out_dtype=jnp.float16, early_launch=early_launch)

    traced = jax.jit(call).trace(*args)
    assert str(traced.jaxpr).count("griddepcontrol.launch_dependents") == int(early_launch)
    assert traced.lower(lowering_platforms=("cuda",)).as_text().count("xla.gpu.triton") == 1
