"""Shape planning (`gptjax/planning.py`): the shapes an engine runs, and the warm-up list that covers them."""

from __future__ import annotations

import numpy as np
import pytest

from gptjax.config import DTYPE_BYTES, DTYPES, EngineConfig, MeshShape, ModelConfig
from gptjax.planning import (DecodeShape, MemoryPlan, PrefillShape, ShapePlan, bucket_length, cdiv,
                             check_serving_memory, device_memory, format_bytes, kv_cache_bytes, round_up,
                             serving_memory, state_rows, weight_bytes)


def plan(**changes) -> ShapePlan:
    values = dict(max_seq_len=64, min_prefill_bucket=16, max_prefill_tokens=64, max_slots=6, data=1, leading_rows=True)
    return ShapePlan(**{**values, **changes})


def test_arithmetic():
    assert [cdiv(n, 4) for n in (0, 1, 4, 5, 8)] == [0, 1, 1, 2, 2]
    assert [round_up(n, 3) for n in (1, 3, 4)] == [3, 3, 6]
    assert [bucket_length(n, 16, 64) for n in (1, 16, 17, 33, 64, 100)] == [16, 16, 32, 64, 64, 64]


def test_prompt_buckets_and_rows():
    p = plan()
    assert p.prefill_buckets() == [16, 32, 64]
    assert [p.prefill_bucket(n) for n in (1, 17, 63)] == [16, 32, 64]
    assert p.prefill_rows(16) == [1, 2, 4]  # 64 tokens hold 4 rows of 16
    assert p.prefill_rows(16, slots=2) == [1, 2]  # never more rows than slots
    assert p.prefill_rows(64) == [1]


@pytest.mark.parametrize("data, leading_rows, slots, rows, buckets", [
    (1, True, 6, 6, [2, 4, 6]),
    (1, True, 1, 2, [2]),  # at least two rows per device
    (2, True, 5, 6, [2, 4, 6]),
    (4, False, 5, 8, [8]),  # a layout that can't run leading rows alone runs them all
])
def test_state_rows_and_decode_buckets(data, leading_rows, slots, rows, buckets):
    p = plan(data=data, leading_rows=leading_rows)
    assert p.state_rows(slots) == rows
    assert p.decode_buckets(slots) == buckets
    assert [p.decode_rows(highest, slots) for highest in (0, rows - 1)] == [buckets[0], buckets[-1]]


def test_warmup_lists_every_shape_a_server_runs():
    p = plan()
    programs = p.warmup_programs(slots=6, steps=4)
    assert programs == [PrefillShape(1, 16), PrefillShape(2, 16), PrefillShape(4, 16), PrefillShape(1, 32),
                        PrefillShape(2, 32), PrefillShape(1, 64),
                        *(DecodeShape(rows, 4, sampled) for rows in (2, 4, 6) for sampled in (False, True))]
    # every prompt length and live-slot set a server can meet lands on a listed shape
    prefills = {(s.rows, s.bucket) for s in programs if isinstance(s, PrefillShape)}
    for length in range(1, 64):
        bucket = p.prefill_bucket(length)
        assert {(rows, bucket) for rows in p.prefill_rows(bucket, 6)} <= prefills
    decodes = {s.rows for s in programs if isinstance(s, DecodeShape)}
    assert {p.decode_rows(highest, 6) for highest in range(6)} <= decodes


# ---- memory ---------------------------------------------------------------------------------------------------
MODEL = ModelConfig(n_layers=4, hidden=64, n_heads=4, vocab_size=1001, n_positions=96, ffn_hidden=200,
                    dtype="bfloat16")


def _bytes_per_device(arrays, shardings) -> set[int]:
    """The bytes each device holds of `arrays` (shapes and dtypes) split as `shardings` say."""
    held = {}
    for x, sharding in zip(arrays, shardings):
        for device, index in sharding.devices_indices_map(x.shape).items():
            size = np.prod([len(range(*s.indices(n))) for s, n in zip(index, x.shape)], dtype=np.int64)
            held[device] = held.get(device, 0) + int(size) * x.dtype.itemsize
    return set(held.values())


@pytest.mark.parametrize("data, stage, tensor", [(1, 1, 1), (1, 1, 2), (1, 2, 2), (2, 2, 2), (2, 1, 4), (8, 1, 1),
                                                 (1, 4, 2)])
def test_the_memory_plan_is_what_the_layout_allocates(data, stage, tensor):
    """The plan counts what every device holds of the weights and of a decode state's cache, as the layout and the
    rules table split them (vocabulary padding, replicated biases and norms, stacked stages included)."""
    import jax

    from gptjax.layout import layout_for
    from gptjax.sharding import make_mesh

    layout = layout_for(MODEL, make_mesh(data, stage, tensor, jax.devices()[: data * stage * tensor]))
    shape, rows = MeshShape(data, stage, tensor), state_rows(6, data)
    params = jax.tree.leaves(layout.abstract_params)
    assert _bytes_per_device(params, [p.sharding for p in params]) == {weight_bytes(MODEL, shape)}
    cache = jax.eval_shape(lambda: layout.new_cache(rows, 40))
    assert _bytes_per_device(jax.tree.leaves(cache), jax.tree.leaves(layout.cache_shardings(cache))) == {
        kv_cache_bytes(MODEL, shape, rows, 40)}


def test_a_server_state_that_can_not_fit_is_refused_naming_its_fields():
    """max_slots=100000 ran into an out-of-memory traceback when the state was allocated."""
    model = MODEL.replace(dtype="float32")
    ec = EngineConfig(max_slots=100000)
    plan = serving_memory(model, ec)
    assert (plan.rows, plan.positions) == (100000, 96)
    assert plan.kv_cache == 4 * 2 * 100000 * 96 * 64 * 4 and plan.total == plan.kv_cache + plan.weights
    available = plan.weights + 10 * plan.kv_cache // 100000  # the weights and 10 slots
    with pytest.raises(ValueError) as e:
        check_serving_memory(model, ec, available)
    message = str(e.value)
    assert message.startswith("max_slots=100000 x max_seq_len=96 (the model's n_positions): ")
    assert f"need {format_bytes(plan.total)} on each device, more than the {format_bytes(available)} it has" in message
    assert "lower max_slots (at most 10 fit with max_seq_len=96) or max_seq_len" in message
    check_serving_memory(model, ec.replace(max_slots=10), available)  # fits
    check_serving_memory(model, ec, None)  # a device that reports no limit (CPU): nothing is guessed
    with pytest.raises(ValueError, match="lower max_seq_len \\(at most 48 fit with 2 slots\\) or max_slots"):
        check_serving_memory(model, ec.replace(max_slots=2, max_seq_len=96), plan.weights + 2 * 48 * 4 * 2 * 64 * 4)
    # with the weights on the devices already, `available` is what they left
    with pytest.raises(ValueError, match="the KV cache needs .* more than the 1.0 MiB .* the weights left free"):
        check_serving_memory(model, ec, 2**20, weights_held=True)


def test_weights_that_can_not_fit_say_so_rather_than_blame_the_cache():
    model, available = MODEL.replace(dtype="float32"), 2**19
    need = format_bytes(weight_bytes(model, MeshShape()))
    with pytest.raises(ValueError) as e:
        MemoryPlan(model, MeshShape(), 2, 8).check(available, "the cache", "fix it")
    assert str(e.value) == (f"the model's weights need {need} on each device (float32, mesh data=1,stage=1,tensor=1), "
                            "more than the 512.0 KiB (524288 bytes) it has: split them over more devices (a larger "
                            "tensor or stage in the mesh) or use a 2-byte dtype (bfloat16)")
    MemoryPlan(model, MeshShape(tensor=4), 2, 8).check(available, "the cache", "fix it")  # split 4 ways, it fits


class _Device:
    def __init__(self, stats):
        self.stats = stats

    def memory_stats(self):
        if isinstance(self.stats, Exception):
            raise self.stats
        return self.stats


def test_device_memory_is_the_least_free_and_unknown_without_a_limit():
    import jax

    gpu = {"bytes_limit": 80 * 2**30, "bytes_in_use": 2**30}
    assert device_memory([_Device(gpu), _Device({**gpu, "bytes_in_use": 2**31})]) == 78 * 2**30
    for unknown in (None, {}, {"bytes_in_use": 5}, NotImplementedError()):
        assert device_memory([_Device(gpu), _Device(unknown)]) is None
    assert device_memory(jax.devices()) is None  # CPU


def test_bytes_are_written_exactly_and_readably():
    assert [format_bytes(n) for n in (0, 1023, 1024, 3 * 2**29)] == ["0 bytes", "1023 bytes", "1.0 KiB (1024 bytes)",
                                                                     "1.5 GiB (1610612736 bytes)"]
    assert format_bytes(2**50 * 3, exact=False) == "3.0 PiB"
    assert {DTYPE_BYTES[d] for d in DTYPES} == {4, 2} and all(np.dtype(d.replace("bfloat16", "float16")).itemsize ==
                                                               DTYPE_BYTES[d] for d in DTYPES)


def test_a_notebook_state_that_can_not_fit_is_refused_naming_its_slots(monkeypatch):
    """`Engine.new_state` checks the cache against what the weights left free (faked here: CPUs report no limit)."""
    from gptjax import planning
    from gptjax.engine import Engine

    engine = Engine.from_preset("gpt2-tiny")
    per_slot = MemoryPlan(engine.config, engine.layout.shape, 1, engine.max_seq_len).kv_cache
    monkeypatch.setattr(planning, "device_memory", lambda devices: 5 * per_slot)  # the weights are held already
    assert engine.new_state(4).tokens.shape == (4,)
    with pytest.raises(ValueError, match=r"a decode state of 6 slots x max_seq_len=\d+: the KV cache needs .* more "
                                         r"than the .* the weights left free; ask for fewer slots \(at most 5 fit\)"):
        engine.new_state(6)
