"""serving/ft.py: the FasterTransformer tensors of both dialects -> front-end requests -> output tensors.

No engine: the front end is loaded with gpt2-tiny's shape (tests/test_frontend.py's stand-ins), so every
check here is the parsing and the one validation path behind it.
"""

from __future__ import annotations

import numpy as np
import pytest

from gptjax.sampling import MAX_TEMPERATURE
from serving import ft
from serving.frontend import Completion, Frontend, RequestError
from serving.request import Code
from test_frontend import _ModelShape, _Scheduler


@pytest.fixture
def frontend():
    f = Frontend("gpt2-tiny")
    f.load(_ModelShape(temperature=1.0, top_k=0, top_p=1.0), _Scheduler(), max_batch_size=64)
    return f


def v5(ids, lengths, out_len, **extra):
    ids = np.asarray(ids, np.uint32)
    arrays = {"input_ids": ids, "input_lengths": np.asarray(lengths, np.uint32).reshape(-1, 1),
              "request_output_len": np.full((ids.shape[0], 1), out_len, np.uint32)}
    return {**arrays, **extra}


def v1(ids, lengths, out_len):
    ids = np.asarray(ids, np.uint32)
    return {"INPUT_ID": ids, "REQUEST_INPUT_LEN": np.asarray(lengths, np.uint32).reshape(-1, 1),
            "REQUEST_OUTPUT_LEN": np.full((ids.shape[0], 1), out_len, np.uint32)}


def refused(frontend, arrays, code=Code.INVALID_ARGUMENT, requested=()) -> str:
    with pytest.raises(RequestError) as info:
        ft.parse(arrays, frontend, None, requested)
    assert info.value.code == code, info.value
    return info.value.message


def test_rows_become_requests_with_fastertransformer_greedy(frontend):
    requests, info = ft.parse(v5([[5, 6, 7], [8, 0, 0]], [3, 1], 4), frontend, None)
    assert [r.prompt for r in requests] == [[5, 6, 7], [8]] and [r.max_new_tokens for r in requests] == [4, 4]
    # top_k 0 with top-p off is FasterTransformer's greedy, whatever the temperature
    assert all(r.sampling.temperature == 0 and r.stop_ids == {50256} for r in requests)
    assert (info.dialect, info.width, info.outputs) == (ft.V5, 3, ("output_ids", "sequence_length"))


def test_sampling_knobs_per_row(frontend):
    arrays = v5([[1], [2]], [1, 1], 2, runtime_top_k=np.array([[1], [40]], np.uint32),
                runtime_top_p=np.array([[0.0], [0.5]], np.float32), temperature=np.array([[0.3], [0.7]], np.float32),
                random_seed=np.array([[2**64 - 1], [3]], np.uint64), end_id=np.array([[7], [9]], np.uint32))
    (a, b), info = ft.parse(arrays, frontend, 12.5)
    assert a.sampling.temperature == 0 and a.stop_ids == {7}  # top_k 1: greedy
    assert (b.sampling.top_k, b.sampling.top_p, b.sampling.seed) == (40, 0.5, 3)
    assert b.sampling.temperature == pytest.approx(0.7) and b.deadline == 12.5 and info.end_ids == (7, 9)


def test_top_p_zero_is_off_and_one_is_the_whole_distribution(frontend):
    """FasterTransformer's greedy is top_k 0 with runtime_top_p 0 (off); runtime_top_p 1.0 samples."""
    arrays = v5([[1], [2], [3]], [1, 1, 1], 2, runtime_top_k=np.zeros((3, 1), np.uint32),
                runtime_top_p=np.array([[0.0], [1.0], [0.9]], np.float32), temperature=np.ones((3, 1), np.float32))
    off, whole, nucleus = (r.sampling for r in ft.parse(arrays, frontend, None)[0])
    assert off.temperature == 0
    assert (whole.temperature, whole.top_k, whole.top_p) == (1.0, 0, 1.0)
    assert (nucleus.temperature, nucleus.top_p) == (1.0, pytest.approx(0.9))


def test_a_config_of_top_p_one_samples_requests_that_name_no_top_p():
    """probability_threshold 1.0 (ServerConfig.ft_top_p_off False) with top_k 0: FasterTransformer samples the
    whole distribution where gptjax's engine top_p of 1.0 alone would read as its greedy."""
    f = Frontend("gpt2-tiny")
    f.load(_ModelShape(temperature=0.8, top_k=0, top_p=1.0), _Scheduler(), max_batch_size=64, ft_top_p_off=False)
    (row,), _ = ft.parse(v5([[1]], [1], 2), f, None)
    assert (row.sampling.temperature, row.sampling.top_k, row.sampling.top_p) == (pytest.approx(0.8), 0, 1.0)


def test_a_request_wider_than_the_model_is_refused(frontend):
    """Its padding columns would come back in output_ids: a few short rows padded to 65300 ran, then their answer
    was over the message limit."""
    width = frontend.limits.max_seq_len + 1
    message = refused(frontend, v5(np.zeros((2, width)), [1, 1], 4))
    assert message == f"input_ids is {width} tokens wide, more than the model's {width - 1} positions"


def test_outputs_are_prompt_then_new_tokens_then_end_id(frontend):
    requests, info = ft.parse(v5([[5, 6, 7], [8, 0, 0]], [3, 1], 3, is_return_log_probs=np.ones((2, 1), bool)),
                              frontend, None)
    done = [Completion([10, 11, 12], [-0.5, -0.25, -1.0], "length"), Completion([13], [-2.0], "stop")]
    out = ft.outputs(requests, done, info)
    assert set(out) == {"output_ids", "sequence_length", "cum_log_probs", "output_log_probs"}
    assert out["output_ids"].shape == (2, 1, 6) and out["output_ids"].dtype == np.uint32
    assert out["output_ids"][:, 0].tolist() == [[5, 6, 7, 10, 11, 12], [8, 13, 50256, 50256, 50256, 50256]]
    assert out["sequence_length"].tolist() == [[6], [2]]
    np.testing.assert_allclose(out["cum_log_probs"], [[-1.75], [-2.0]])


def test_v1_names_pick_the_v1_dialect(frontend):
    requests, info = ft.parse(v1([[5, 6], [7, 8]], [2, 2], 2), frontend, None)
    out = ft.outputs(requests, [Completion([1, 2], [0, 0], "length")] * 2, info)
    # time-major under the [B, L + out] shape, as the 2021 backend answered: its tools reshape to [-1, B], transpose
    assert list(out) == ["OUTPUT0"] and out["OUTPUT0"].shape == (2, 4)
    assert out["OUTPUT0"].reshape(-1, 2).T.tolist() == [[5, 6, 1, 2], [7, 8, 1, 2]]
    bad = v1([[5], [6]], [1, 1], 1)
    bad["REQUEST_OUTPUT_LEN"] = np.array([[1], [0]], np.uint32)
    assert "REQUEST_OUTPUT_LEN[1] must be at least 1" in refused(frontend, bad)
    assert "this model gives OUTPUT0" in refused(frontend, v1([[5]], [1], 1), requested=["output_ids"])


@pytest.mark.parametrize("arrays, words", [
    (dict(v1([[1]], [1], 1), input_lengths=np.ones((1, 1), np.uint32)), "mix FasterTransformer 5.x names"),
    ({"input_ids": np.ones((1, 2), np.uint32)}, "missing required input(s): input_lengths, request_output_len"),
    (dict(v5([[1]], [1], 1), prompt_learning_task_name_ids=np.zeros((1, 1), np.uint32)), "unknown input(s)"),
    (dict(v5([[1]], [1], 1), runtime_top_k=np.array([[2**31]], np.uint32)), "runtime_top_k[0] = 2147483648"),
    (dict(v5([[1]], [1], 1), end_id=np.array([[-1]], np.int32)), "end_id[0] = -1 is outside the vocab"),
    (dict(v5([[1]], [1], 1), stop_words_list=np.array([[[-5], [1]]], np.int32)), "stop_words_list[0] tokens[0] = -5"),
    (dict(v5([[1]], [1], 1), stop_words_list=np.array([[[5, 6], [2, 1]]], np.int32)), "offsets must not decrease"),
    (dict(v5([[1]], [1], 1), stop_words_list=np.array([[[5], [3]]], np.int32)), "past the row's 1 tokens"),
    (dict(v5([[1]], [1], 1), stop_words_list=np.array([[[5, 6], [2, -1]]], np.int32)), "single-token"),
    (dict(v5([[1]], [1], 1), bad_words_list=np.array([[[5], [1]]], np.int32)), "bad words are not supported"),
    # a word after the -1 padding was dropped unread (a stop word that never stopped, a bad word let through)
    (dict(v5([[1]], [1], 1), stop_words_list=np.array([[[5, 6], [-1, 1]]], np.int32)),
     "stop_words_list[0]: offset[1] = 1 follows the padding offset[0] = -1"),
    (dict(v5([[1]], [1], 1), bad_words_list=np.array([[[5, 6, 7], [-1, -1, 3]]], np.int32)),
     "bad_words_list[0]: offset[2] = 3 follows the padding offset[0] = -1"),
    (dict(v5([[1]], [1], 1), runtime_top_p=np.array([[np.nan]], np.float32)), "runtime_top_p[0] must be in [0, 1]"),
    (dict(v5([[1]], [1], 1), temperature=np.array([[np.inf]], np.float32)), "temperature[0] must be a finite"),
    (dict(v5([[1]], [1], 1), beam_width=np.array([[2]], np.uint32)), "beam search is not supported"),
    (dict(v5([[1]], [1], 1), input_lengths=np.ones((2, 1), np.uint32)), "has batch 2 but input_ids has 1"),
    (dict(v5([[1]], [1], 1), input_ids=np.ones(3, np.uint32)), "must be [batch, length]"),
    (dict(v5([[1]], [1], 1), runtime_top_k=np.ones((1, 2), np.uint32)), "must be [1, 1]"),
    (dict(v5([[1]], [1], 1), input_ids=np.ones((1, 1), np.float32)), "input_ids must be UINT32 or INT32"),
    (v5([[1, 2]], [3], 1), "input_lengths[0] = 3 must be in [1, 2]"),
    (v5(np.zeros((0, 2)), [], 1), "empty batch"),
    (v5([[1, 50257]], [2], 1), "input_ids[0][1] = 50257 is outside the vocabulary"),
])
def test_bad_tensors_are_named(frontend, arrays, words):
    assert words in refused(frontend, arrays)


def test_empty_words_and_padding_are_no_words(frontend):
    """FasterTransformer's word lists pad the offsets with -1 (and the tokens with anything); an offset equal to the
    one before it is a word of no tokens. None of them is a word to stop at, or a bad word to refuse."""
    words = np.array([[[5, 0, 0], [0, 1, -1]], [[0, 0, 0], [-1, -1, -1]]], np.int32)
    (a, b), _ = ft.parse(v5([[1], [2]], [1, 1], 1, stop_words_list=words, bad_words_list=words[[1, 1]]), frontend,
                         None)
    assert a.stop_ids == {5, 50256} and b.stop_ids == {50256}


def test_float32s_largest_temperature_keeps_its_top_k(frontend):
    """It reaches the sampler as MAX_TEMPERATURE, where logits / temperature are still apart and top-k holds."""
    arrays = v5([[1]], [1], 1, temperature=np.array([[np.finfo(np.float32).max]], np.float32),
                runtime_top_k=np.array([[5]], np.uint32))
    (r,), _ = ft.parse(arrays, frontend, None)
    assert (r.sampling.temperature, r.sampling.top_k) == (MAX_TEMPERATURE, 5)


def test_over_the_limits_is_resource_exhausted(frontend):
    assert "request_output_len[0]" in refused(frontend, v5([[1]], [1], 100000), Code.RESOURCE_EXHAUSTED)
    assert "batch of 65 rows" in refused(frontend, v5(np.ones((65, 1)), [1] * 65, 1), Code.RESOURCE_EXHAUSTED)


def test_check_input_before_the_data(frontend):
    assert ft.check_input("random_seed", "INT64", [1, 1]) == np.dtype("<i8")
    for name, datatype, shape, words in [("input_ids", "BYTES", [1, 1], "UINT32 or INT32, got BYTES"),
                                         ("INPUT_ID", "UINT32", [-1, 2], "negative dimension"),
                                         ("nope", "UINT32", [1], "unknown input")]:
        with pytest.raises(RequestError) as info:
            ft.check_input(name, datatype, shape)
        assert words in info.value.message
    assert "given more than once: input_ids" in pytest.raises(
        RequestError, ft.dialect_of, ["input_ids", "input_ids", "input_lengths"]).value.message


def test_metadata_and_config_describe_the_dialect(frontend):
    meta = ft.model_metadata(ft.V1)
    assert [t["name"] for t in meta["inputs"]] == ["INPUT_ID", "REQUEST_INPUT_LEN", "REQUEST_OUTPUT_LEN"]
    assert meta["outputs"] == [{"name": "OUTPUT0", "datatype": "UINT32", "shape": [-1, -1]}]
    config = ft.model_config(ft.V5, Frontend("loading"))
    assert config["max_batch_size"] == 0 and "parameters" not in config
    config = ft.model_config(ft.V1, frontend)
    assert config["parameters"]["candidate_num"] == {"string_value": "0"} and config["max_batch_size"] == 64
    assert config["parameters"]["probability_threshold"] == {"string_value": "0.0"}  # top-p off, as FT says it
    # the knob that sets the slots when the file is read: the slots, not the rows a request may have
    slots = frontend.engine.engine_config.max_slots
    assert config["parameters"]["batch_size"] == {"string_value": str(slots)} and slots != 64
    assert {i["name"]: i["optional"] for i in ft.model_config(ft.V5, frontend)["input"]}["runtime_top_k"]


def test_an_end_id_past_the_vocabulary_never_stops_a_row(frontend):
    """FasterTransformer's way to ask for exactly request_output_len tokens: the row pads with that end_id."""
    arrays = v5([[5, 6], [7, 0]], [2, 1], 3, end_id=np.array([[2**32 - 1], [9]], np.uint32))
    (a, b), info = ft.parse(arrays, frontend, None)
    assert a.stop_ids == frozenset() and b.stop_ids == {9} and info.end_ids == (2**32 - 1, 9)
    out = ft.outputs([a, b], [Completion([1], [0.0], "length"), Completion([2, 9], [0.0, 0.0], "stop")], info)
    assert out["output_ids"][:, 0].tolist() == [[5, 6, 1, 2**32 - 1, 2**32 - 1], [7, 2, 9, 9, 9]]
