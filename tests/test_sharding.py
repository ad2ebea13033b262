"""Layouts over 8 CPU devices: every mesh gives the same greedy tokens, and each device holds only its part.

(data, stage, tensor): rows split over data, layers over stage (a pipeline), heads/MLP/vocab over tensor.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from conftest import MESH_PROMPTS, forward_logits, greedy_tokens
from conftest import mesh_engine as engine
from gptjax import Engine, decode_block, make_mesh, sharding
from gptjax.config import MeshShape, preset
from gptjax.model import init_params

LAYOUTS = [(1, 1, 1), (2, 1, 4), (1, 1, 8), (1, 2, 4), (2, 2, 2), (1, 4, 1)]
CONFIG = preset("gpt2-tiny")  # 4 layers, 8 heads, hidden 128


@pytest.mark.parametrize("layout", [l for l in LAYOUTS[1:] if l != (2, 2, 2)],
                         ids=lambda l: "data=%d,stage=%d,tensor=%d" % l)
def test_greedy_tokens_identical_on_every_layout(layout, mesh_reference):
    # (2, 2, 2): test_engine's serving interface checks its tokens against the same reference
    assert greedy_tokens(engine(layout)) == mesh_reference


def test_sampled_tokens_identical_with_rows_and_vocabulary_split():
    """Top-k and top-p draws: the filter's kernel runs on each device's rows (the vocabulary gathered whole), and
    every row draws what it draws on one device."""
    def sampled(e):
        return [r.output_ids for r in e.generate(MESH_PROMPTS, max_new_tokens=6, temperature=0.9, top_k=50,
                                                 top_p=0.8, seed=3, stop_token_ids=[])]

    want = sampled(engine((1, 1, 1)))
    assert len({tuple(t) for t in want}) == len(want)
    assert sampled(engine((2, 1, 4))) == want


def shard_shape(x) -> tuple:
    shapes = {tuple(s.data.shape) for s in x.addressable_shards}
    assert len(shapes) == 1
    return shapes.pop()


def test_tensor_parallel_shard_shapes():
    # (data=2, stage=1, tensor=4): Megatron's split, one subtree per layer, everything whole over data
    e = engine((2, 1, 4))
    c, h, f, hd = CONFIG.hidden, CONFIG.n_heads, CONFIG.ffn_hidden, CONFIG.head_dim
    p = e.params
    vocab = sharding.padded_vocab(CONFIG, 4)
    assert vocab % 4 == 0 and vocab >= CONFIG.vocab_size
    assert shard_shape(p["wte"]) == (vocab // 4, c)  # vocab-parallel
    assert shard_shape(p["wpe"]) == (CONFIG.n_positions, c)
    layer = p["h_0"]
    assert shard_shape(layer["qkv"]["kernel"]) == (c, 3, h // 4, hd)  # column-parallel
    assert shard_shape(layer["qkv"]["bias"]) == (3, h // 4, hd)
    assert shard_shape(layer["attn_out"]["kernel"]) == (h // 4, hd, c)  # row-parallel
    assert shard_shape(layer["attn_out"]["bias"]) == (c,)
    assert shard_shape(layer["mlp_in"]["kernel"]) == (c, f // 4)  # column-parallel
    assert shard_shape(layer["mlp_out"]["kernel"]) == (f // 4, c)  # row-parallel
    assert shard_shape(layer["ln_1"]["scale"]) == (c,)
    state = e.new_state(slots=8)
    k, v = state.cache[0]
    assert shard_shape(k) == shard_shape(v) == (8 // 2, e.max_seq_len, h // 4, hd)  # slots on data, heads on tensor
    assert shard_shape(state.tokens) == (4,)


def test_layer_parallel_shard_shapes_and_contents():
    # (data=2, stage=2, tensor=2): every stage holds its own 2 layers (and their cache), nothing else
    e = engine((2, 2, 2))
    c, h, f, hd = CONFIG.hidden, CONFIG.n_heads, CONFIG.ffn_hidden, CONFIG.head_dim
    stages = e.params["stages"]
    assert not any(k.startswith("h_") for k in e.params)
    assert shard_shape(stages["qkv"]["kernel"]) == (1, 2, c, 3, h // 2, hd)
    assert shard_shape(stages["attn_out"]["kernel"]) == (1, 2, h // 2, hd, c)
    assert shard_shape(stages["mlp_in"]["kernel"]) == (1, 2, c, f // 2)
    assert shard_shape(stages["mlp_out"]["kernel"]) == (1, 2, f // 2, c)
    assert shard_shape(stages["ln_2"]["bias"]) == (1, 2, c)
    assert shard_shape(e.params["wte"]) == (sharding.padded_vocab(CONFIG, 2) // 2, c)
    # a device of stage s holds exactly layers 2s and 2s+1 (its tensor half of them)
    full = decode_block.fold_layer_norms(init_params(CONFIG))  # the engine holds its LayerNorms folded
    mesh_pos = {d: np.argwhere(e.mesh.devices == d)[0] for d in e.mesh.devices.flat}
    for shard in stages["mlp_in"]["kernel"].addressable_shards:
        _, s, t = mesh_pos[shard.device]
        for j in range(2):
            want = np.asarray(full[f"h_{2 * s + j}"]["mlp_in"]["kernel"])[:, t * f // 2 : (t + 1) * f // 2]
            np.testing.assert_allclose(np.asarray(shard.data)[0, j], want, rtol=1e-5, atol=1e-6)
    state = e.new_state(slots=4)
    assert shard_shape(state.cache.k) == (1, 2, 4 // 2, e.max_seq_len, h // 2, hd)
    for shard in state.cache.k.addressable_shards:
        assert shard.index[0] == slice(mesh_pos[shard.device][1], mesh_pos[shard.device][1] + 1)


def test_padding_rows_never_change_real_logits():
    e = engine((1, 1, 8))
    wte = np.asarray(e.params["wte"])
    assert wte.shape[0] == sharding.padded_vocab(CONFIG, 8) > CONFIG.vocab_size
    assert not wte[CONFIG.vocab_size :].any()
    np.testing.assert_allclose(wte[: CONFIG.vocab_size], np.asarray(init_params(CONFIG)["wte"]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layout, message", [
    ((1, 1, 3), "tensor=3 does not divide the model's 8 heads"),
    ((1, 3, 1), "stage=3 does not divide the model's 4 layers"),
])
def test_impossible_layout_fails_naming_the_numbers(layout, message):
    d, s, t = layout
    with pytest.raises(ValueError, match=message):
        Engine.from_preset("gpt2-tiny", mesh=make_mesh(d, s, t, devices=jax.devices()[: d * s * t]))


def test_mesh_needs_every_device():
    with pytest.raises(ValueError, match="data\\*stage\\*tensor = 16 devices, but 8 are available"):
        make_mesh(2, 2, 4)


def test_mesh_flag_parses():
    assert MeshShape.parse("data=2,stage=2,tensor=2") == MeshShape(2, 2, 2)
    assert MeshShape.parse("tensor=8").size == 8


def test_checkpoint_restores_into_pipeline_layout(tmp_path, mesh_reference):
    from gptjax.checkpoint import save_checkpoint

    save_checkpoint(tmp_path / "ckpt", CONFIG, jax.tree.map(np.asarray, init_params(CONFIG)))
    mesh = make_mesh(2, 2, 2)
    e = Engine.load(tmp_path / "ckpt", mesh=mesh)
    expected = engine((2, 2, 2)).params["stages"]["qkv"]["kernel"].sharding.spec
    assert e.params["stages"]["qkv"]["kernel"].sharding.spec == expected
    assert shard_shape(e.params["stages"]["qkv"]["kernel"]) == (1, 2, CONFIG.hidden, 3, 4, CONFIG.head_dim)
    assert greedy_tokens(e) == mesh_reference


def test_pipeline_passes_activations_without_gathering_weights():
    # the staged decode step moves activations between stages (collective-permute) and never all-gathers
    e = engine((1, 4, 1))
    state = e.new_state(slots=4)
    with jax.set_mesh(e.mesh):
        hlo = e._steps_jit.lower(e.params, state, n_steps=1).compile().as_text()
    assert "collective-permute" in hlo
    assert "all-gather" not in hlo


def test_model_params_undo_the_layout():
    # any engine's layout reads back as the model's own tree, with the same logits
    e = engine((2, 2, 2))
    own = e.model_params()
    assert own["wte"].shape == (CONFIG.vocab_size, CONFIG.hidden) and "h_3" in own and "stages" not in own
    ids = [MESH_PROMPTS[0]]
    want = np.asarray(forward_logits(CONFIG, engine((1, 1, 1)).model_params(), ids))
    np.testing.assert_allclose(np.asarray(forward_logits(CONFIG, own, ids)), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("data, stage, buckets", [(1, 1, [2, 4, 8]), (2, 1, [8]), (1, 2, [8])])
def test_decode_runs_leading_rows_only_on_one_data_shard(data, stage, buckets):
    """With rows split over `data`, a call's first rows and the cache's first rows sit on different devices
    (the kernels pair each shard's own rows of both): such a mesh runs every row; so does the pipeline."""
    from gptjax.layout import layout_for
    from gptjax.planning import ShapePlan

    mesh = make_mesh(data=data, stage=stage, devices=jax.devices()[: data * stage])
    layout = layout_for(preset("gpt2-tiny"), mesh)
    assert layout.leading_rows == (data == 1 and stage == 1)
    assert ShapePlan(64, 16, 64, 8, data, layout.leading_rows).decode_buckets(8) == buckets
