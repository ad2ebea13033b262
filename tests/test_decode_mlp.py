"""The decode step's MLP as one kernel (`gptjax.kernels.decode_mlp`, interpret mode here) against float64 numpy, on
fresh random inputs (the seed is in each failure message), row counts that are not powers of two included; and the
engine's greedy tokens with it against XLA's path's."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gptjax
from gptjax import decode_block
from gptjax.kernels.decode_mlp import MlpParams, decode_mlp, decode_mlp_reference, default_params
from gptjax.kernels.decode_matmul import new_counters

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2, jnp.float16: 2e-3}


def fresh_seed() -> int:
    return int(np.random.SeedSequence().entropy % 2**31)


def operands(rng, rows: int, hidden: int, ffn: int, dtype):
    """x (the float32 residual stream, offset from zero), LayerNorm far from the identity, weights and biases."""
    def draw(shape, spread, mean=0.0):
        return jnp.asarray(rng.normal(mean, spread, shape), dtype)

    x = jnp.asarray(rng.normal(0.4, 1.5, (rows, hidden)), jnp.float32)
    return (x, draw(hidden, 0.3, 1.0), draw(hidden, 0.3), draw((hidden, ffn), hidden ** -0.5), draw(ffn, 0.1),
            draw((ffn, hidden), ffn ** -0.5), draw(hidden, 0.1))


def mlp64(x, scale, shift, w_in, b_in, w_out, b_out):
    """x + MLP(LayerNorm(x)) in float64, GPT-2's tanh GELU."""
    x, scale, shift, w_in, b_in, w_out, b_out = (np.asarray(a, np.float64)
                                                 for a in (x, scale, shift, w_in, b_in, w_out, b_out))
    normed = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5) * scale + shift
    y = normed @ w_in + b_in
    y = 0.5 * y * (1 + np.tanh(np.sqrt(2 / np.pi) * (y + 0.044715 * y ** 3)))
    return x + y @ w_out + b_out


def rel(got, want) -> float:
    got = np.asarray(got, np.float64)
    return float(np.linalg.norm(got - want) / np.linalg.norm(want - 0))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_kernel_matches_float64(dtype):
    """Against float64: the output, the MLP's own part of it (the residual left out, so that its size does not hide
    the MLP's error), and the split counters left zero for the next kernel; the `jnp` form too."""
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    rows = int(rng.choice([1, 3, 8, 13]))
    ops = operands(rng, rows, 128, 512, dtype)
    want = mlp64(*ops)
    params = MlpParams(block_f=32, block_k=64, block_n=32, num_warps=4, num_stages=2)  # 16 programs, 4 blocks
    got, counters = decode_mlp(*ops, counters=new_counters(512), params=params, interpret=True)
    assert got.dtype == jnp.float32 and got.shape == (rows, 128)
    x = np.asarray(ops[0], np.float64)
    assert rel(np.asarray(got, np.float64) - x, want - x) < TOL[dtype], f"seed {seed}, rows {rows}"
    assert not np.any(np.asarray(counters)), f"seed {seed}: the counters must be left at zero"
    reference = np.asarray(decode_mlp_reference(*ops), np.float64)
    assert rel(reference - x, want - x) < TOL[dtype], f"seed {seed}, rows {rows}: the jnp form"


def test_default_params_give_a_program_an_ffn_slice_and_tile():
    """About 128 programs for the 345M model's 4096-wide FFN, the matrix units' 16 columns at least for a small
    one; sizes the defaults do not tile are refused by name."""
    assert default_params(1024, 4096) == MlpParams(32, 256, 128, 4, 3)
    assert default_params(64, 256).block_f == 16
    x = jnp.zeros((2, 96), jnp.float32)
    with pytest.raises(ValueError, match="decode_mlp"):
        decode_mlp(x, jnp.ones(96), jnp.zeros(96), jnp.zeros((96, 200)), jnp.zeros(200), jnp.zeros((200, 96)),
                   jnp.zeros(96), interpret=True)
    with pytest.raises(ValueError, match="counters"):
        decode_mlp(x, jnp.ones(96), jnp.zeros(96), jnp.zeros((96, 256)), jnp.zeros(256), jnp.zeros((256, 96)),
                   jnp.zeros(96), counters=jnp.zeros((1,), jnp.int32), params=MlpParams(16, 32, 32, 4, 2),
                   interpret=True)


def test_kernel_lowers_for_cuda_as_one_triton_kernel_with_the_early_trigger():
    """The 345M model's MLP at 1 and 8 rows: one Triton kernel, issuing the next kernel's launch where asked."""
    s = jax.ShapeDtypeStruct
    for rows in (1, 8):
        args = [s((rows, 1024), jnp.float32), s((1024,), jnp.float16), s((1024,), jnp.float16),
                s((1024, 4096), jnp.float16), s((4096,), jnp.float16), s((4096, 1024), jnp.float16),
                s((1024,), jnp.float16)]
        for early in ("end", False):
            traced = jax.jit(lambda *a, e=early: decode_mlp(*a, early_launch=e)).trace(*args)
            assert str(traced.jaxpr).count("griddepcontrol.launch_dependents") == (early == "end")
            assert traced.lower(lowering_platforms=("cuda",)).as_text().count("xla.gpu.triton") == 1


def test_engine_greedy_tokens_with_the_fused_mlp_equal_xlas(monkeypatch):
    """gpt2-tiny on the small-batch kernels with the MLP as one kernel gives XLA's path's greedy tokens (float32;
    the 16-bit arithmetic is checked above), and the kernel is what the decode step traced."""
    monkeypatch.setattr(decode_block, "FUSED_MLP", True)
    traced, fused = [], decode_block.decode_mlp
    monkeypatch.setattr(decode_block, "decode_mlp", lambda *a, **k: traced.append(1) or fused(*a, **k))
    prompts = [[5, 17, 99], list(range(1, 20)), [7] * 30]
    xla = gptjax.Engine.from_preset("gpt2-tiny", engine_config=gptjax.EngineConfig(attention="xla"))
    kernels = gptjax.Engine.from_preset("gpt2-tiny", engine_config=gptjax.EngineConfig(attention="xla",
                                                                                       decode_matmuls="pallas"))
    want = xla.generate(prompts, max_new_tokens=6, greedy=True, stop_token_ids=[])
    got = kernels.generate(prompts, max_new_tokens=6, greedy=True, stop_token_ids=[])
    assert traced and [r.output_ids for r in got] == [r.output_ids for r in want]
    assert len({tuple(r.output_ids) for r in want}) > 1
