"""The model against Hugging Face GPT2LMHeadModel with the same weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import forward_logits, hf_greedy, rel_error
from gptjax.engine import Engine

PROMPTS = [[464, 2068, 7586, 21831, 18045, 625, 262, 16931, 3290, 13], [15496, 995], [40, 588, 257, 1310, 286]]


def hf_logits(model, ids, dtype=torch.float32):
    with torch.no_grad():
        return model.to(dtype)(torch.tensor([ids])).logits[0].float().numpy()


def test_fp32_logits_match_hugging_face(hf_model, converted_dir):
    engine = Engine.load(converted_dir)
    rng = np.random.default_rng(0)
    for length in (1, 7, 33):
        ids = rng.integers(0, 50257, length).tolist()
        ours = np.asarray(forward_logits(engine.config, engine.model_params(), [ids]))[0]
        assert rel_error(ours, hf_logits(hf_model, ids)) < 1e-4


def test_bf16_logits_match_hugging_face(hf_model, converted_dir):
    engine = Engine.load(converted_dir, dtype="bfloat16")
    ids = np.random.default_rng(1).integers(0, 50257, 24).tolist()
    ours = np.asarray(forward_logits(engine.config, engine.model_params(), [ids]))[0]
    assert rel_error(ours, hf_logits(hf_model, ids)) < 2e-2


def test_ragged_batch_greedy_tokens_match_hugging_face(hf_model, converted_dir):
    engine = Engine.load(converted_dir)
    results = engine.generate(PROMPTS, max_new_tokens=12, greedy=True, stop_token_ids=[])
    for prompt, result in zip(PROMPTS, results):
        expected = hf_greedy(hf_model, prompt, 12)
        assert len(set(expected)) > 3, "the reference model should not repeat one token"
        assert result.output_ids == expected
        assert result.finish_reason == "length"
    # each prompt alone gives what it gave in the batch
    for prompt, result in zip(PROMPTS, results):
        assert engine.generate([prompt], max_new_tokens=12, greedy=True, stop_token_ids=[])[0].output_ids == \
            result.output_ids


def test_decode_logprobs_are_the_models(hf_model, converted_dir):
    engine = Engine.load(converted_dir)
    result = engine.generate([PROMPTS[0]], max_new_tokens=5, greedy=True, stop_token_ids=[],
                             return_logprobs=True)[0]
    full = PROMPTS[0] + result.output_ids
    logp = torch.log_softmax(torch.tensor(hf_logits(hf_model, full)), -1).numpy()
    expected = [logp[len(PROMPTS[0]) - 1 + j, t] for j, t in enumerate(result.output_ids)]
    np.testing.assert_allclose(result.logprobs, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_presets_generate(dtype):
    engine = Engine.from_preset("gpt2-tiny", dtype=dtype)
    out = engine.generate(["Once upon a time"], max_new_tokens=8, greedy=True, stop_token_ids=[])[0]
    assert len(out.output_ids) == 8 and all(0 <= t < 50257 for t in out.output_ids)


def test_stop_token_ends_a_sequence(converted_dir):
    engine = Engine.load(converted_dir)
    free = engine.generate([PROMPTS[1]], max_new_tokens=8, greedy=True, stop_token_ids=[])[0].output_ids
    stopped = engine.generate([PROMPTS[1]], max_new_tokens=8, greedy=True, stop_token_ids=[free[2]])[0]
    assert stopped.output_ids == free[: free.index(free[2]) + 1]
    assert stopped.finish_reason == "stop"


def test_prompt_too_long_is_rejected(converted_dir):
    engine = Engine.load(converted_dir)
    with pytest.raises(ValueError, match="exceeds"):
        engine.generate([[1] * 120], max_new_tokens=20)
    with pytest.raises(ValueError, match="empty"):
        engine.generate([[]], max_new_tokens=2)


def test_one_new_token(converted_dir, hf_model):
    engine = Engine.load(converted_dir)
    out = engine.generate([PROMPTS[0]], max_new_tokens=1, greedy=True, stop_token_ids=[])[0]
    assert out.output_ids == hf_greedy(hf_model, PROMPTS[0], 1)


@pytest.mark.parametrize("torch_dtype", [None, torch.float64])  # None shares the engine's memory; float64 copies
def test_to_hf_model_holds_the_same_weights(hf_model, converted_dir, torch_dtype):
    from checkpoints.hf_gpt2 import to_hf_model

    engine = Engine.load(converted_dir)
    peer = to_hf_model(engine.config, engine.params, torch_dtype=torch_dtype)
    shared = peer.transformer.h[0].attn.c_attn.weight.data_ptr() == \
        engine.params["h_0"]["qkv"]["kernel"].unsafe_buffer_pointer()
    assert shared == (torch_dtype is None)
    ids = np.random.default_rng(2).integers(0, 50257, 17).tolist()
    assert rel_error(hf_logits(peer, ids, torch_dtype or torch.float32), hf_logits(hf_model, ids)) < 1e-5
