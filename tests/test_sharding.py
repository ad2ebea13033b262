"""Layouts over 8 CPU devices: every mesh gives the same greedy tokens, and each device holds only its part.

(data, stage, tensor): rows split over data, layers over stage (a pipeline), heads/MLP/vocab over tensor.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from gptjax import Engine, make_mesh, sharding
from gptjax.config import EngineConfig, MeshShape, preset
from gptjax.model import init_params
from gptjax.sampling import SamplingParams
from gptjax.engine import SamplingArrays

LAYOUTS = [(1, 1, 1), (2, 1, 4), (1, 1, 8), (1, 2, 4), (2, 2, 2), (1, 4, 1)]
PROMPTS = [[5, 17, 99, 3], list(range(1, 20)), [7]]  # 3 rows: does not divide data=2, padded inside
N_NEW = 8
CONFIG = preset("gpt2-tiny")  # 4 layers, 8 heads, hidden 128
_engines: dict = {}


def engine(layout) -> Engine:
    if layout not in _engines:
        d, s, t = layout
        _engines[layout] = Engine.from_preset("gpt2-tiny", mesh=make_mesh(d, s, t, devices=jax.devices()[: d * s * t]))
    return _engines[layout]


def greedy(e: Engine, prompts=PROMPTS):
    return [r.output_ids for r in e.generate(prompts, max_new_tokens=N_NEW, greedy=True, stop_token_ids=[])]


@pytest.fixture(scope="module")
def reference():
    tokens = greedy(engine((1, 1, 1)))
    assert len({tuple(t) for t in tokens}) == len(tokens)  # the prompts really lead different ways
    return tokens


@pytest.mark.parametrize("layout", LAYOUTS[1:], ids=lambda l: "data=%d,stage=%d,tensor=%d" % l)
def test_greedy_tokens_identical_on_every_layout(layout, reference):
    assert greedy(engine(layout)) == reference


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
    full = init_params(CONFIG)
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


@pytest.mark.parametrize("layout", [(2, 2, 2), (1, 4, 1)], ids=lambda l: "data=%d,stage=%d,tensor=%d" % l)
def test_serving_interface_matches_generate(layout, reference):
    # prefill one prompt at a time into free slots, then decode all slots together (continuous batching)
    e = engine(layout)
    state = e.new_state(slots=3)  # rounded up to a multiple of data, at least two per device; extra slots idle
    assert state.tokens.shape[0] == {1: 3, 2: 4}[layout[0]]
    assert e.new_state(slots=1).tokens.shape[0] == 2 * layout[0]  # never one row: XLA's matrix-vector path is slow
    first = []
    greedy_params = SamplingArrays.from_params([SamplingParams(temperature=0.0)])
    for slot, prompt in zip([2, 0, 1], PROMPTS):
        bucket = e.prefill_bucket(len(prompt))
        tokens = np.zeros((1, bucket), np.int32)
        tokens[0, : len(prompt)] = prompt
        prefix = e.prefill(tokens, np.array([len(prompt)]), greedy_params)
        state = e.insert(prefix, state, np.array([slot]))
        first.append(int(np.asarray(prefix.first_tokens)[0]))
    state, steps, _ = e.generate_steps(state, 2)
    # then slot 1's request ends: parked at position 0, it stops stepping; the others go on unchanged
    state, more, _ = e.generate_steps(state, N_NEW - 3, live=[True, False, True])
    steps = np.concatenate([np.asarray(steps), np.asarray(more)])
    got = [[f] + steps[:, slot].tolist() for f, slot in zip(first, [2, 0, 1])]
    assert got[:2] == reference[:2] and got[2][:3] == reference[2][:3]
    assert np.asarray(state.positions)[1] == 0 and np.asarray(state.positions)[0] == len(PROMPTS[1]) + N_NEW - 1


@pytest.mark.parametrize("layout", [(1, 1, 1), (2, 1, 4), (1, 2, 4)], ids=lambda l: "data=%d,stage=%d,tensor=%d" % l)
def test_prefill_and_decode_compiled_ahead_run_without_compiling(layout, reference):
    import jax.monitoring

    e = engine(layout)
    state = e.new_state(slots=4)
    e.compile_prefill(2, 32, state)
    e.compile_decode(state, 2, False, e.decode_buckets(4)[-1])
    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda name, secs, **kw: compiles.append(name) if name.endswith("backend_compile_duration") else None)
    tokens = np.zeros((2, 32), np.int32)
    tokens[0, :4], tokens[1, :19] = PROMPTS[0], PROMPTS[1]
    prefix = e.prefill(tokens, np.array([4, 19]), SamplingArrays.from_params([SamplingParams(temperature=0.0)] * 2))
    state = e.insert(prefix, state, np.array([1, 3]))
    state, steps, _ = e.generate_steps(state, 2, sampled=False, live=[False, True, False, True])
    assert compiles == []
    got = np.concatenate([np.asarray(prefix.first_tokens)[None], np.asarray(steps)[:, [1, 3]]]).T.tolist()
    assert got == [reference[0][:3], reference[1][:3]]


def test_prefill_rows_stay_within_the_slots_and_the_token_budget():
    e = Engine.from_preset("gpt2-tiny", engine_config=EngineConfig(max_slots=6, max_prefill_tokens=1000))
    assert e.prefill_rows(16) == [1, 2, 4, 8]  # padded rows: up to the power of two that holds 6
    assert e.prefill_rows(128) == [1, 2, 4]  # 7 rows of 128 fit in 1000 tokens: powers of two up to it
    assert e.prefill_rows(1024) == [1]  # a prompt longer than the budget still runs, alone


@pytest.mark.parametrize("layout", [(1, 1, 1), (1, 1, 8)], ids=lambda l: "data=%d,stage=%d,tensor=%d" % l)
def test_decode_runs_only_the_slots_up_to_the_highest_live_one(layout, reference):
    e = engine(layout)
    assert e.decode_buckets(40) == [2, 4, 8, 16, 32, 40] and e.decode_buckets(8) == [2, 4, 8]
    state = e.new_state(slots=40)
    bucket = e.prefill_bucket(len(PROMPTS[0]))
    tokens = np.zeros((1, bucket), np.int32)
    tokens[0, : len(PROMPTS[0])] = PROMPTS[0]
    prefix = e.prefill(tokens, np.array([len(PROMPTS[0])]), SamplingArrays.from_params([SamplingParams(temperature=0.0)]))
    state = e.insert(prefix, state, np.array([1]))
    live = np.zeros(40, bool)
    live[1] = True
    state, steps, _ = e.generate_steps(state, N_NEW - 1, live=live)  # runs 2 rows of the 40
    steps = np.asarray(steps)
    assert steps.shape == (N_NEW - 1, 40)
    assert [int(np.asarray(prefix.first_tokens)[0])] + steps[:, 1].tolist() == reference[0]
    assert not steps[:, 2:].any()  # rows past the bucket did not run
    assert np.asarray(state.positions)[1] == len(PROMPTS[0]) + N_NEW - 1


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


def test_checkpoint_restores_into_pipeline_layout(tmp_path, reference):
    from checkpoints.folder import save_checkpoint

    save_checkpoint(tmp_path / "ckpt", CONFIG, jax.tree.map(np.asarray, init_params(CONFIG)))
    mesh = make_mesh(2, 2, 2)
    e = Engine.load(tmp_path / "ckpt", mesh=mesh)
    assert e.params["stages"]["qkv"]["kernel"].sharding.spec == engine((2, 2, 2)).params["stages"]["qkv"]["kernel"].sharding.spec
    assert shard_shape(e.params["stages"]["qkv"]["kernel"]) == (1, 2, CONFIG.hidden, 3, 4, CONFIG.head_dim)
    assert greedy(e) == reference


def test_pipeline_passes_activations_without_gathering_weights():
    # the staged decode step moves activations between stages (collective-permute) and never all-gathers
    e = engine((1, 4, 1))
    state = e.new_state(slots=4)
    with jax.set_mesh(e.mesh):
        hlo = e._steps_jit.lower(e.params, state, 1).compile().as_text()
    assert "collective-permute" in hlo
    assert "all-gather" not in hlo


def test_model_params_undo_the_layout():
    # forward_logits and model_params read any engine's layout back as the model's own tree
    from gptjax.model import forward_logits

    e = engine((2, 2, 2))
    own = sharding.model_params(CONFIG, e.params)
    assert own["wte"].shape == (CONFIG.vocab_size, CONFIG.hidden) and "h_3" in own and "stages" not in own
    ids = [[5, 17, 99, 3]]
    want = np.asarray(forward_logits(CONFIG, engine((1, 1, 1)).params, ids))
    np.testing.assert_allclose(np.asarray(forward_logits(CONFIG, e.params, ids)), want, rtol=1e-4, atol=1e-4)
