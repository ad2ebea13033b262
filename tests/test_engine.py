"""The engine's serving interface (prefill / insert / generate_steps and the shapes compiled ahead) against
its own one-program `generate`, on one device and on meshes of 8 CPU devices; its interface and construction."""

from __future__ import annotations

import inspect

import numpy as np
import pytest

from conftest import MESH_NEW_TOKENS, MESH_PROMPTS
from conftest import mesh_engine as engine
from gptjax import Engine
from gptjax.config import EngineConfig
from gptjax.engine import SamplingArrays
from gptjax.engine_api import ServingEngine
from gptjax.sampling import SamplingParams


@pytest.mark.parametrize("layout", [(2, 2, 2)], ids=lambda l: "data=%d,stage=%d,tensor=%d" % l)
def test_serving_interface_matches_generate(layout, mesh_reference):
    # prefill one prompt at a time into free slots, then decode all slots together (continuous batching); one
    # layout of every axis (the deep pipeline's tokens: test_sharding's layouts)
    e = engine(layout)
    state = e.new_state(slots=3)  # rounded up to a multiple of data, at least two per device; extra slots idle
    assert state.tokens.shape[0] == {1: 3, 2: 4}[layout[0]]
    assert e.new_state(slots=1).tokens.shape[0] == 2 * layout[0]  # never one row: XLA's matrix-vector path is slow
    first = []
    greedy_params = SamplingArrays.from_params([SamplingParams(temperature=0.0)])
    for slot, prompt in zip([2, 0, 1], MESH_PROMPTS):
        bucket = e.prefill_bucket(len(prompt))
        tokens = np.zeros((1, bucket), np.int32)
        tokens[0, : len(prompt)] = prompt
        prefix = e.prefill(tokens, np.array([len(prompt)]), greedy_params)
        state = e.insert(prefix, state, np.array([slot]))
        first.append(int(np.asarray(prefix.first_tokens)[0]))
    state, steps, _ = e.generate_steps(state, 2)
    # then slot 1's request ends: parked at position 0, it stops stepping; the others go on unchanged
    state, more, _ = e.generate_steps(state, MESH_NEW_TOKENS - 3, live=[True, False, True])
    steps = np.concatenate([np.asarray(steps), np.asarray(more)])
    got = [[f] + steps[:, slot].tolist() for f, slot in zip(first, [2, 0, 1])]
    assert got[:2] == mesh_reference[:2] and got[2][:3] == mesh_reference[2][:3]
    positions = np.asarray(state.positions)
    assert positions[1] == 0 and positions[0] == len(MESH_PROMPTS[1]) + MESH_NEW_TOKENS - 1


@pytest.mark.parametrize("layout", [(1, 1, 1), (2, 1, 4), (1, 2, 4)], ids=lambda l: "data=%d,stage=%d,tensor=%d" % l)
def test_prefill_and_decode_compiled_ahead_run_without_compiling(layout, mesh_reference):
    import jax.monitoring

    e = engine(layout)
    state = e.new_state(slots=4)
    e.compile_prefill(2, 32, state)
    e.compile_decode(state, 2, False, e.decode_buckets(4)[-1])
    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda name, secs, **kw: compiles.append(name) if name.endswith("backend_compile_duration") else None)
    tokens = np.zeros((2, 32), np.int32)
    tokens[0, :4], tokens[1, :19] = MESH_PROMPTS[0], MESH_PROMPTS[1]
    prefix = e.prefill(tokens, np.array([4, 19]), SamplingArrays.from_params([SamplingParams(temperature=0.0)] * 2))
    state = e.insert(prefix, state, np.array([1, 3]))
    state, steps, _ = e.generate_steps(state, 2, sampled=False, live=[False, True, False, True])
    assert compiles == []
    got = np.concatenate([np.asarray(prefix.first_tokens)[None], np.asarray(steps)[:, [1, 3]]]).T.tolist()
    assert got == [mesh_reference[0][:3], mesh_reference[1][:3]]


def test_prefill_rows_stay_within_the_slots_and_the_token_budget():
    e = Engine.from_preset("gpt2-tiny", engine_config=EngineConfig(max_slots=6, max_prefill_tokens=1000))
    assert e.prefill_rows(16) == [1, 2, 4, 8]  # padded rows: up to the power of two that holds 6
    assert e.prefill_rows(128) == [1, 2, 4]  # 7 rows of 128 fit in 1000 tokens: powers of two up to it
    assert e.prefill_rows(1024) == [1]  # a prompt longer than the budget still runs, alone


@pytest.mark.parametrize("layout", [(1, 1, 1), (1, 1, 8)], ids=lambda l: "data=%d,stage=%d,tensor=%d" % l)
def test_decode_runs_only_the_slots_up_to_the_highest_live_one(layout, mesh_reference):
    e = engine(layout)
    assert e.decode_buckets(40) == [2, 4, 8, 16, 32, 40] and e.decode_buckets(8) == [2, 4, 8]
    state = e.new_state(slots=40)
    bucket = e.prefill_bucket(len(MESH_PROMPTS[0]))
    tokens = np.zeros((1, bucket), np.int32)
    tokens[0, : len(MESH_PROMPTS[0])] = MESH_PROMPTS[0]
    greedy_params = SamplingArrays.from_params([SamplingParams(temperature=0.0)])
    prefix = e.prefill(tokens, np.array([len(MESH_PROMPTS[0])]), greedy_params)
    state = e.insert(prefix, state, np.array([1]))
    live = np.zeros(40, bool)
    live[1] = True
    state, steps, _ = e.generate_steps(state, MESH_NEW_TOKENS - 1, live=live)  # runs 2 rows of the 40
    steps = np.asarray(steps)
    assert steps.shape == (MESH_NEW_TOKENS - 1, 40)
    assert [int(np.asarray(prefix.first_tokens)[0])] + steps[:, 1].tolist() == mesh_reference[0]
    assert not steps[:, 2:].any()  # rows past the bucket did not run
    assert np.asarray(state.positions)[1] == len(MESH_PROMPTS[0]) + MESH_NEW_TOKENS - 1


def test_the_engine_implements_the_serving_interface():
    e = engine((1, 1, 1))
    assert all(hasattr(e, name) for name in ServingEngine.__annotations__)
    members = {name: spec for name, spec in vars(ServingEngine).items() if not name.startswith("_")}
    assert {"prefill", "insert", "generate_steps", "new_state", "max_seq_len"} <= set(members)
    for name, spec in members.items():
        ours = getattr(Engine, name)
        if isinstance(spec, property):
            assert isinstance(ours, property), name
        else:
            assert list(inspect.signature(ours).parameters) == list(inspect.signature(spec).parameters), name


def test_a_calls_host_arrays_travel_packed_in_one_and_come_back_bit_for_bit():
    """`pack_prompts` -> `unpack_prompts` inside a program gives every array back exactly, the float and uint32
    sampling arrays' bits included (fresh random values: negative, fractional, seeds past 2**31)."""
    import jax

    from gptjax.engine_api import pack_prompts, unpack_prompts

    rng = np.random.default_rng()
    n, bucket = 5, 16
    tokens = rng.integers(0, 50257, (n, bucket), dtype=np.int32)
    lengths = rng.integers(1, bucket + 1, n, dtype=np.int32)
    samp = SamplingArrays(rng.uniform(0, 2, n).astype(np.float32), rng.integers(0, 2**31 - 1, n, dtype=np.int32),
                          rng.uniform(-1, 1, n).astype(np.float32), rng.integers(2**31, 2**32, n, dtype=np.uint32))
    packed = pack_prompts(tokens, lengths, samp)
    assert packed.shape == (n, bucket + 5) and packed.dtype == np.int32
    got_tokens, got_lengths, got_samp = jax.tree.map(np.asarray, jax.jit(unpack_prompts)(packed))
    np.testing.assert_array_equal(got_tokens, tokens)
    np.testing.assert_array_equal(got_lengths, lengths)
    for got, want in zip(got_samp, samp):
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)


def test_from_pretrained_loads_the_folder_the_hub_resolves(monkeypatch, tmp_path):
    import jax

    from gptjax import hub
    from gptjax.checkpoint import save_checkpoint
    from gptjax.config import ModelConfig
    from gptjax.model import init_params

    config = ModelConfig(n_layers=2, hidden=32, n_heads=4, vocab_size=300, n_positions=64)
    folder = save_checkpoint(tmp_path / "ckpt", config, jax.tree.map(np.asarray, init_params(config)))
    asked = []

    def pretrained_folder(model_id):
        asked.append(model_id)
        return folder

    monkeypatch.setattr(hub, "pretrained_folder", pretrained_folder)
    e = Engine.from_pretrained("someone/tiny-gpt2", dtype="bfloat16")
    assert asked == ["someone/tiny-gpt2"]
    assert e.config == config.replace(dtype="bfloat16")


def test_the_engine_takes_its_mesh_and_config_in_the_forms_a_notebook_writes():
    from gptjax.sharding import make_mesh

    engine = Engine.from_preset("gpt2-tiny", mesh="tensor=1", engine_config={"max_slots": 2})
    assert engine.mesh.devices.size == 1 and engine.engine_config.max_slots == 2
    for kwargs, words in [(dict(mesh=3), "mesh must be a jax Mesh, a MeshShape or text"),
                          (dict(mesh="tensor=0"), "every axis must be at least 1"),
                          (dict(engine_config={"slots": 2}), "unknown EngineConfig field"),
                          (dict(engine_config=[2]), "engine_config must be an EngineConfig or a dict")]:
        with pytest.raises(ValueError, match=words):
            Engine.from_preset("gpt2-tiny", **kwargs)
    with pytest.raises(ValueError, match="every mesh axis must be at least 1"):
        make_mesh(tensor=0)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_cudnn_attention_off_a_gpu_is_refused_at_once(dtype):
    """`--attention cudnn` on a CPU built the engine, and the first prefill raised cuDNN's RuntimeError ("cuDNN is
    not detected") as a traceback; float32 is refused on a GPU too (cuDNN's attention takes 16-bit values only)."""
    with pytest.raises(ValueError, match="attention 'cudnn' runs only on a GPU, in float16 or bfloat16"):
        Engine.from_preset("gpt2-tiny", dtype=dtype, engine_config={"attention": "cudnn"})


def test_generate_caps_its_default_new_tokens_to_the_room_the_prompt_leaves():
    """The config's default number of new tokens shrinks to fit after the longest prompt; a number asked for
    that does not fit is refused, naming it."""
    engine = Engine.from_preset("gpt2-tiny", engine_config=EngineConfig(max_seq_len=32, max_new_tokens=64))
    out = engine.generate([list(range(1, 21)), [5, 6]], greedy=True, stop_token_ids=[])
    assert [len(r.output_ids) for r in out] == [12, 12]
    with pytest.raises(ValueError, match="prompt length 20 \\+ max_new_tokens 13 exceeds the model's 32 positions"):
        engine.generate([list(range(1, 21))], max_new_tokens=13)
