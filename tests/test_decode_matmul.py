"""The decode step's small-batch matmul kernel (interpret mode here) against float64 numpy. (The engine's
tokens with it against XLA's path's: tests/test_kernels.py, with the attention kernels.)

Every check draws new inputs (the seed is in the failure message) and a row count that is not a power of two
where it can, so the kernel's masked rows are exercised."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gptjax
from benchmarks.decode_matmul_bench import operands, rel_err
from gptjax import decode_block
from gptjax.config import preset
from gptjax.kernels.decode_matmul import (TARGET_PROGRAMS, MatmulParams, decode_matmul, decode_matmul_reference,
                                          default_params, new_counters)

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2, jnp.float16: 2e-3}


def fresh_seed() -> int:
    return int(np.random.SeedSequence().entropy % 2**31)


DTYPES, KINDS = [jnp.float32, jnp.bfloat16, jnp.float16], ["qkv", "residual", "gelu"]  # the three epilogues


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", KINDS)
def test_kernel_matches_float64(dtype, kind):
    # a loop over K tiles, or each program's chunk as one tile: each kind and each dtype meets both forms
    one_tile = (DTYPES.index(dtype) + KINDS.index(kind)) % 2 == 1
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    rows, splits = int(rng.choice([1, 3, 16, 23, 64])), int(rng.choice([1, 2]))
    k, n = {"qkv": (128, 192), "residual": (512, 96), "gelu": (128, 96)}[kind]  # 3 column blocks of 32
    ws, kw = operands(jax.random.PRNGKey(seed), rows, k, n, kind, dtype, copies=1)
    counters = new_counters(n)
    params = MatmulParams(32, k // splits if one_tile else 32, splits, 4, 2)
    *out, counters = decode_matmul(ws[0], params=params, counters=counters, interpret=True, **kw)
    err = rel_err(out if kind == "qkv" else out[0], ws[0], kw)
    assert err < TOL[dtype], f"seed {seed}, rows {rows}, {params}: relative error {err:.2e}"
    assert not np.any(np.asarray(counters)), "the split counters must be left at zero for the next kernel"
    # the jnp form (the path for weights too large for the kernel) agrees with it too
    err = rel_err(decode_matmul_reference(ws[0], **kw), ws[0], kw)
    assert err < TOL[dtype], f"seed {seed}, rows {rows}: reference's relative error {err:.2e}"


def test_kv_write_touches_only_each_rows_position():
    seed = fresh_seed()
    ws, kw = operands(jax.random.PRNGKey(seed), 5, 128, 192, "qkv", jnp.float32, copies=1)
    k_cache, v_cache, pos = kw["kv"]
    _, k_new, v_new = decode_matmul(ws[0], params=MatmulParams(32, 32, 4, 4, 2), interpret=True, **kw)
    for before, after in ((k_cache, k_new), (v_cache, v_new)):
        changed = np.any(np.asarray(before) != np.asarray(after), axis=-1)  # [slots, max_seq]
        want = np.zeros_like(changed)
        want[np.arange(5), np.asarray(pos)] = True
        assert (changed == want).all(), f"seed {seed}: the write went elsewhere than (row, position)"


def test_default_params_fill_the_chip_and_tile():
    # gpt2-124m's K = 768 splits into chunks of 384: no one-tile LayerNorm product there (Triton's blocks are
    # powers of two; interpret mode would not notice)
    for rows, k, n, unit in [(1, 1024, 3072, 1024), (8, 1024, 1024, None), (64, 4096, 1024, None),
                             (1, 4096, 16384, None), (3, 128, 384, 128), (1, 96, 288, 96), (1, 768, 2304, 768),
                             (1, 768, 3072, None), (2, 3072, 768, None)]:
        for ln in (False, True):
            p = default_params(rows, k, n, unit, ln=ln)
            assert n % p.block_n == 0 and (unit or n) % p.block_n == 0 and (k // p.splits) % p.block_k == 0
            assert not (p.block_n & (p.block_n - 1) or p.block_k & (p.block_k - 1)), (rows, k, n, ln, p)
        if n >= 1024:  # a narrow output is split over K
            assert (n // p.block_n) * p.splits >= TARGET_PROGRAMS // 2, (rows, k, n, p)


def test_bad_shapes_are_refused_by_name():
    w = jnp.zeros((128, 64), jnp.float32)
    with pytest.raises(ValueError, match="decode_matmul"):
        decode_matmul(w, jnp.ones((65, 128)), interpret=True)  # more rows than the kernel serves
    with pytest.raises(ValueError, match="decode_matmul"):
        decode_matmul(w, jnp.ones((2, 100)), interpret=True)  # K mismatch
    cache = jnp.zeros((2, 8, 32))
    with pytest.raises(ValueError, match="K/V write"):  # 64 columns are no Q, K and V of 32
        decode_matmul(w, jnp.ones((2, 128)), kv=(cache, cache, jnp.zeros(2, jnp.int32)), interpret=True)
    with pytest.raises(ValueError, match="powers of two"):
        decode_matmul(jnp.zeros((768, 64)), jnp.ones((1, 768)), params=MatmulParams(64, 384, 2, 8, 1), interpret=True)
    with pytest.raises(ValueError, match="decode_matmuls"):
        gptjax.EngineConfig(decode_matmuls="cublas")


def test_choose_picks_the_kernels_on_a_gpu_for_small_models_and_refuses_a_split_model():
    config = preset("gpt2-tiny")
    one = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    assert decode_block.choose("", config, one) == "xla"  # off a GPU the kernels would run interpreted
    assert decode_block.choose("", config, one, backend="gpu") == "auto"
    assert decode_block.choose("", preset("gpt3-6.7b"), one, backend="gpu") == "xla"  # XLA reads 128 MB faster
    assert decode_block.choose("pallas", config, one) == "pallas"
    if len(jax.devices()) > 1:
        two = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("tensor",))
        with pytest.raises(ValueError, match="one device"):
            decode_block.choose("pallas", config, two)
    with pytest.raises(ValueError, match="one device"):
        decode_block.choose("pallas", config.replace(hidden=72, n_heads=8), one)  # 72 is no multiple of 16
    # "auto" takes the kernels for steps of up to AUTO_ROWS rows; "pallas" up to KERNEL_ROWS
    assert not on_xla(decode_block.layer_fn("auto", config, decode_block.AUTO_ROWS, "xla"))
    assert on_xla(decode_block.layer_fn("auto", config, decode_block.AUTO_ROWS + 1, "xla"))
    assert not on_xla(decode_block.layer_fn("pallas", config, decode_block.KERNEL_ROWS, "xla"))
    assert on_xla(decode_block.layer_fn("xla", config, 1, "xla"))


def on_xla(layer) -> bool:
    """Whether a decode step's layer function is XLA's path (`folded_block`), not the kernels'."""
    return getattr(layer, "func", None) is decode_block.folded_block


def test_early_launch_trigger_is_in_both_decode_kernels_compiled_for_cuda_and_never_interpreted():
    """`early_launch`: each decode kernel issues the next one's launch as it starts, or once its loads are done.
    Compiled for CUDA (Triton's lowering runs on any machine) the kernels carry the trigger when asked, once
    per program wherever it is placed; on a CPU the default leaves it out, and the interpreter, which cannot run
    the assembly, never takes it."""
    from gptjax.kernels import decode_attention_append, early_launch

    w = jax.ShapeDtypeStruct((256, 512), jnp.float16)
    x = jax.ShapeDtypeStruct((2, 256), jnp.float32)
    qkv = jax.ShapeDtypeStruct((2, 3, 4, 64), jnp.float16)
    cache = jax.ShapeDtypeStruct((2, 128, 4, 64), jnp.float16)
    positions = jax.ShapeDtypeStruct((2,), jnp.int32)
    step = (qkv, cache, cache, positions)
    calls = [(lambda w, x, e: decode_matmul(w, x, bias=jnp.ones(512, jnp.float16), early_launch=e), (w, x)),
             (lambda q, k, v, p, e: decode_attention_append(q, k, v, p, early_launch=e), step),
             (lambda q, k, v, p, e: decode_attention_append(q, k, v, p, heads_per_program=2, block_k=64,
                                                            early_launch=e), step)]
    for fn, args in calls:
        for requested in (True, "start", "end", False, None):
            traced = jax.jit(lambda *a, fn=fn, e=requested: fn(*a, e)).trace(*args)
            assert str(traced.jaxpr).count("griddepcontrol.launch_dependents") == (requested not in (False, None))
            assert traced.lower(lowering_platforms=("cuda",)).as_text().count("xla.gpu.triton") == 1
    assert not early_launch.enabled(interpret=False)  # no GPU here
    assert not early_launch.resolve(True, interpret=True) and early_launch.resolve(True, interpret=False) == "end"
    assert early_launch.resolve("start", interpret=False) == "start" and early_launch.placement("1") == "end"
    assert early_launch.placement("off") == early_launch.placement("0") == "" and early_launch.placement(True) == "end"
    with pytest.raises(ValueError, match="middle"):
        early_launch.placement("middle")


def test_interpreted_kernels_ignore_a_requested_early_launch():
    rng = np.random.default_rng()
    w = jnp.asarray(rng.standard_normal((256, 512)) * 0.05, jnp.float32)
    x = jnp.asarray(rng.standard_normal((3, 256)), jnp.float32)
    want = np.asarray(decode_matmul_reference(w, x, activation="gelu_new"), np.float64)
    got = np.asarray(decode_matmul(w, x, activation="gelu_new", interpret=True, early_launch=True), np.float64)
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-5


def test_batch_block_gives_xlas_greedy_tokens(monkeypatch):
    """`batch_block` (its products as `batch_matmul_reference` off a GPU; the kernel itself is checked against the
    reference on the GPU) over 64 slots, one whole row tile, gives XLA's path's greedy tokens: the LayerNorms,
    the weights' reshapes, the attention's hand-over and the residual are wired as the model has them. It runs
    under "auto" only for steps of at least BATCH_ROWS slots that fill whole tiles."""
    config = preset("gpt2-tiny")
    monkeypatch.setattr(decode_block, "BATCH_ROWS", 64)
    assert not on_xla(decode_block.layer_fn("auto", config, 64, "xla"))
    # on a GPU only 16-bit weights (the kernel would multiply float32 in tf32)
    assert config.dtype == "float32" and not decode_block.batch_fits(config, 64, on_gpu=True)
    assert decode_block.batch_fits(config.replace(dtype="float16"), 64, on_gpu=True)
    assert on_xla(decode_block.layer_fn("auto", config, 96, "xla"))  # a tile and a half
    assert on_xla(decode_block.layer_fn("auto", config.replace(activation="gelu"), 64, "xla"))  # no erf there
    rng = np.random.default_rng(fresh_seed())
    prompts = [rng.integers(0, config.vocab_size, int(n)).tolist() for n in rng.integers(1, 30, 64)]
    xla = gptjax.Engine.from_preset("gpt2-tiny", engine_config=gptjax.EngineConfig(attention="xla",
                                                                                   decode_matmuls="xla"))
    want = xla.generate(prompts, max_new_tokens=5, greedy=True, stop_token_ids=[])
    monkeypatch.setattr(decode_block, "choose", lambda *a, **k: "auto")
    traced, block = [], decode_block.batch_block
    monkeypatch.setattr(decode_block, "batch_block", lambda *a, **k: traced.append(1) or block(*a, **k))
    batched = gptjax.Engine.from_preset("gpt2-tiny", engine_config=gptjax.EngineConfig(attention="xla"))
    assert batched.decode_matmuls == "auto"
    got = batched.generate(prompts, max_new_tokens=5, greedy=True, stop_token_ids=[])
    assert len(traced) == config.n_layers  # the decode step's layers ran it
    assert [r.output_ids for r in got] == [r.output_ids for r in want]
    assert len({tuple(r.output_ids) for r in want}) > 8


def test_a_bad_early_launch_environment_value_is_named_at_the_edge_not_at_import(monkeypatch, capsys):
    """`GPTJAX_EARLY_LAUNCH=bogus` lets gptjax import (a `--help` works); the CLI then refuses it with exit 2 and
    a message naming the variable, and a kernel traced in a notebook raises the same."""
    from gptjax import cli
    from gptjax.kernels import early_launch

    monkeypatch.setenv("GPTJAX_EARLY_LAUNCH", "bogus")
    placement, error = early_launch._from_environment()
    assert placement == early_launch.DEFAULT and "GPTJAX_EARLY_LAUNCH='bogus'" in error
    monkeypatch.setattr(early_launch, "ENVIRONMENT_ERROR", error)
    assert cli.main(["generate", "--model", "gpt2-tiny", "--prompt", "Hi", "--max-new-tokens", "1"]) == 2
    assert "GPTJAX_EARLY_LAUNCH='bogus'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="GPTJAX_EARLY_LAUNCH"):
        early_launch.enabled(interpret=False)
    monkeypatch.setenv("GPTJAX_EARLY_LAUNCH", "off")
    assert early_launch._from_environment() == ("", "")
