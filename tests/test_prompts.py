"""The one prompt check (`gptjax/prompts.py`) that every entry point shares, the notebook's among them."""

from __future__ import annotations

import numpy as np
import pytest

from gptjax.prompts import check_new_tokens, check_prompt


def test_good_prompts_come_back_as_ints():
    assert check_prompt([1, np.int64(2), 299], 300, 8) == [1, 2, 299]
    assert check_prompt(np.array([5, 6], np.uint16), 300, 8) == [5, 6]
    assert check_new_tokens(3, 5, 8) == 3


@pytest.mark.parametrize("ids, words", [
    ([], "prompt is empty"),
    ([1] * 8, "prompt has 8 tokens; the model holds 8 positions, so a prompt may have at most 7"),
    ([1, 300], r"prompt\[1\] = 300 is outside the vocabulary \[0, 300\)"),
    ([-1], r"prompt\[0\] = -1 is outside the vocabulary"),
    ([1, 2.0], r"prompt\[1\] must be an integer token id, got 2.0"),
    ([True], r"prompt\[0\] must be an integer token id, got True"),
    ("hello", "prompt must be a list of token ids, got str"),
    (np.array([[1, 2]]), r"prompt must be a list of integer token ids, got an array of int64 \[1, 2\]"),
])
def test_bad_prompts_name_the_field(ids, words):
    with pytest.raises(ValueError, match=words):
        check_prompt(ids, 300, 8)


def test_length_is_checked_before_any_id_is_read():
    with pytest.raises(ValueError, match="has 10000 tokens"):
        check_prompt(["not an id"] * 10_000, 300, 8)


def test_new_tokens():
    with pytest.raises(ValueError, match="max_new_tokens must be at least 1, got 0"):
        check_new_tokens(0, 3, 8)
    with pytest.raises(ValueError, match="prompt length 5 \\+ request_output_len 4 exceeds the model's 8 positions"):
        check_new_tokens(4, 5, 8, field="request_output_len")


def test_the_notebook_generate_uses_it():
    from gptjax import Engine

    engine = Engine.from_preset("gpt2-tiny")
    with pytest.raises(ValueError, match=r"prompts\[1\]\[0\] = 50257 is outside the vocabulary \[0, 50257\)"):
        engine.generate([[1, 2], [50257]], max_new_tokens=2)
    with pytest.raises(ValueError, match=r"prompts\[0\] \(as tokens\) is empty"):
        engine.generate([""], max_new_tokens=2)
    for args, kwargs, words in [(([],), {}, "prompts is empty"),
                                (([[1, 2]],), dict(seed=None), "seed must be an integer or one per prompt"),
                                (([[1, 2]],), dict(stop_token_ids=5), "stop_token_ids must be a list of token ids"),
                                # a string is not taken digit by digit, nor a fraction rounded
                                (([[1, 2]],), dict(stop_token_ids="52"), "stop_token_ids must be a list of token ids"),
                                (([[1, 2]],), dict(stop_token_ids=[50257]), r"stop_token_ids\[0\] = 50257 is outside"),
                                (([[1, 2]],), dict(top_k=2.5), "top_k must be a whole number, got 2.5"),
                                (([[1, 2]],), dict(max_new_tokens=2.5), "max_new_tokens must be a whole number")]:
        with pytest.raises(ValueError, match=words):
            engine.generate(*args, **{"max_new_tokens": 2, **kwargs})
    # whole numbers as floats, and a set of stop ids, are taken
    (free,) = engine.generate([[1, 2]], max_new_tokens=4.0, greedy=True, stop_token_ids=[])
    (stopped,) = engine.generate([[1, 2]], max_new_tokens=4, greedy=True, stop_token_ids={free.output_ids[1]})
    assert len(free.output_ids) == 4 and stopped.finish_reason == "stop"
    assert stopped.output_ids == free.output_ids[:free.output_ids.index(free.output_ids[1]) + 1]
    # one prompt as a 1-D array of ids, as a list of them would be
    (one,) = engine.generate(np.array([464, 2068]), max_new_tokens=2, greedy=True)
    assert one.prompt_ids == [464, 2068]

