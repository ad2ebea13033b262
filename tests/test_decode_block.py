"""The decode step's layers on XLA's path (`gptjax/decode_block.py`): each LayerNorm folded into the product after
it computes the model the Flax block computes from the unfolded weights, checked by relative error on fresh random
layers whose LayerNorms, biases and residual stream are far from the identity's and zero."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from gptjax import decode_block
from gptjax.config import preset
from gptjax.model import Block

TOL = {"float32": 1e-5, "bfloat16": 3e-2, "float16": 4e-3}


def fresh_seed() -> int:
    return int(np.random.SeedSequence().entropy % 2**31)


def random_layer(config, seed: int):
    """A layer's parameters drawn wide, LayerNorm scales around 1 +- 0.5, and a residual with an offset of its own
    (so the centring moved into the weights is exercised)."""
    rng = np.random.default_rng(seed)
    init = functools.partial(Block(config).init, attend=lambda _, qkv: (qkv[:, :, 0], None))
    shapes = nn.unbox(jax.eval_shape(init, jax.random.PRNGKey(seed), jnp.zeros((1, 1, config.hidden)))["params"])
    params = jax.tree.map(lambda a: jnp.asarray(rng.normal(0, 0.05, a.shape), a.dtype), shapes)
    for ln in ("ln_1", "ln_2"):
        params[ln] = {"scale": jnp.asarray(1 + rng.uniform(-0.5, 0.5, config.hidden), config.dtype),
                      "bias": jnp.asarray(rng.normal(0, 0.3, config.hidden), config.dtype)}
    h = jnp.asarray(rng.normal(0.5, 2.0, (5, 1, config.hidden)), jnp.float32)
    return params, h


def flax_block(config, params, h):
    """The reference: the Flax block, attention replaced by the query itself (the layers' wiring is under test)."""
    out, _ = Block(config).apply({"params": params}, h, lambda _, qkv: (qkv[:, :, 0], None))
    return out


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_folded_weights_and_folded_blocks_compute_the_unfolded_layer(dtype, monkeypatch):
    seed = fresh_seed()
    config = preset("gpt2-tiny").replace(dtype=dtype)
    params, h = random_layer(config, seed)
    block = jax.jit(functools.partial(flax_block, config))  # each path compiled whole: op by op takes longer
    want = block(jax.tree.map(lambda a: a.astype(jnp.float32), params), h)
    folded = decode_block.fold_layer_norms({"h_0": params})["h_0"]
    assert np.all(np.asarray(folded["ln_1"]["scale"]) == 1) and np.all(np.asarray(folded["ln_2"]["bias"]) == 0)
    assert rel(block(folded, h), want) < TOL[dtype], seed  # the prefill's path on the folded tree
    monkeypatch.setattr(decode_block.kernels, "decode_step_append", lambda qkv, kv, pos, impl: (qkv[:, 0], kv))
    got, _ = jax.jit(lambda p, h: decode_block.folded_block(config, "xla", p, h, None, None))(folded, h)
    assert got.dtype == want.dtype and rel(got, want) < TOL[dtype], seed
    # the batch kernels' layer (their `jnp` reference here, the LayerNorms' kernel interpreted), its MLP out's parts
    # added after the layer as the next layer's first kernel adds them
    batch = jax.jit(lambda p, h: decode_block.batch_block(config, "xla", p, h, None, None, on_gpu=False)[0])
    got = batch(folded, h)
    assert isinstance(got, decode_block.Pending) and got.parts.shape[1:] == h[:, 0].shape
    got = decode_block.settle(got)
    assert got.dtype == want.dtype and rel(got, want) < TOL[dtype], seed
    chained = decode_block.settle(batch(folded, batch(folded, h)))  # a Pending in: the parts added first
    assert rel(chained, block(folded, block(folded, h))) < 2 * TOL[dtype], seed
    again = decode_block.fold_layer_norms({"h_0": folded})["h_0"]  # folding twice: rounding at most
    assert rel(again["qkv"]["kernel"], folded["qkv"]["kernel"]) < TOL[dtype] / 10, seed


def test_a_pipeline_stages_stacked_layers_fold_as_each_layer_does():
    config = preset("gpt2-tiny")
    layers = [random_layer(config, fresh_seed())[0] for _ in range(4)]
    stacked = jax.tree.map(lambda *a: jnp.stack(a).reshape(2, 2, *a[0].shape), *layers)
    folded = decode_block.fold_layer_norms({"stages": stacked, "wte": jnp.ones(3)})
    assert set(folded) == {"stages", "wte"}
    for i, layer in enumerate(layers):
        one = decode_block.fold_layer_norms({"h_0": layer})["h_0"]
        jax.tree.map(lambda s, o: np.testing.assert_allclose(s[i // 2, i % 2], o, rtol=1e-6, atol=1e-7),
                     folded["stages"], one)


def test_the_fold_keeps_each_arrays_sharding():
    """Tensor parallelism splits QKV and MLP in by columns: the folded arrays stay where the layout put them."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    config = preset("gpt2-tiny")
    params, _ = random_layer(config, fresh_seed())
    mesh = jax.make_mesh((2,), ("tensor",), devices=jax.devices()[:2])
    spec = {"qkv": P(None, None, "tensor", None), "mlp_in": P(None, "tensor")}
    placed = {k: {n: jax.device_put(a, NamedSharding(mesh, spec[k] if k in spec and n == "kernel" else P()))
                  for n, a in v.items()} for k, v in params.items()}
    folded = decode_block.fold_layer_norms({"h_0": placed})["h_0"]
    jax.tree.map(lambda a, b: (a.sharding.is_equivalent_to(b.sharding, a.ndim) or pytest.fail(str(a.sharding))),
                 folded, placed)
