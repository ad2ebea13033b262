"""The notebook API: complete a batch of prompts, prefill and every decode step in one compiled program.

    engine.generate(["Once upon a time"], max_new_tokens=32, top_p=0.9, seed=0)   # -> [GenerationResult]

`Engine.generate` is `generate` below; it checks its arguments here, at the edge, and hands the engine arrays.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from gptjax.prompts import (MAX_STOP_IDS, check_new_tokens, check_prompt, check_token_ids, default_new_tokens,
                            real_number, whole_number)
from gptjax.sampling import SamplingParams


@dataclass
class GenerationResult:
    prompt_ids: list[int]
    output_ids: list[int]  # the new tokens only
    text: str
    finish_reason: str  # "stop" (a stop token was produced, and is included) or "length"
    logprobs: list[float] | None = None


def encode_prompts(engine, prompts) -> list[list[int]]:
    """Texts or token-id lists (or one of either: a string, a list or 1-D array of ids) -> token-id lists,
    checked against the model."""
    one_of_ids = isinstance(prompts, Sequence) and prompts and isinstance(prompts[0], (int, np.integer))
    if isinstance(prompts, str) or one_of_ids or (isinstance(prompts, np.ndarray) and prompts.ndim == 1):
        prompts = [prompts]
    if len(prompts) == 0:
        raise ValueError("prompts is empty: give at least one text or list of token ids")
    vocab, seq = engine.config.vocab_size, engine.max_seq_len
    return [check_prompt(engine.tokenizer.encode(p), vocab, seq, f"prompts[{i}] (as tokens)") if isinstance(p, str)
            else check_prompt(p, vocab, seq, f"prompts[{i}]") for i, p in enumerate(prompts)]


def sampling_params(engine, n: int, temperature, top_k, top_p, seed, greedy: bool) -> list[SamplingParams]:
    """One SamplingParams per prompt: the arguments given, the engine config's defaults for the rest."""
    ec = engine.engine_config
    if not isinstance(seed, (int, np.integer, Sequence, np.ndarray)) or isinstance(seed, (bool, str)):
        raise ValueError(f"seed must be an integer or one per prompt, got {seed!r}")
    seeds = [seed] * n if isinstance(seed, (int, np.integer)) else list(seed)
    if len(seeds) != n:
        raise ValueError(f"got {len(seeds)} seeds for {n} prompts")
    temperature = ec.temperature if temperature is None else real_number(temperature, "temperature")
    top_k = ec.top_k if top_k is None else whole_number(top_k, "top_k")
    top_p = ec.top_p if top_p is None else real_number(top_p, "top_p")
    return [SamplingParams(temperature=0.0 if greedy else temperature, top_k=top_k, top_p=top_p,
                           seed=whole_number(s, "seed")) for s in seeds]


def generate(engine, prompts, max_new_tokens: int | None = None, *, temperature: float | None = None,
             top_k: int | None = None, top_p: float | None = None, seed: int | Sequence[int] = 0,
             greedy: bool = False, stop_token_ids: Sequence[int] | None = None,
             return_logprobs: bool = False) -> list[GenerationResult]:
    """Complete a batch of prompts (texts or token-id lists) in one compiled program.

    Sampling defaults come from the engine config; `greedy=True` (or temperature 0) takes the argmax.
    Generation stops at `max_new_tokens` or after a stop token (default: end-of-text; `[]` for none).
    """
    ec = engine.engine_config
    ids = encode_prompts(engine, prompts)
    longest = max(len(r) for r in ids)
    n_new = check_new_tokens(default_new_tokens(ec.max_new_tokens, longest, engine.max_seq_len)
                             if max_new_tokens is None else whole_number(max_new_tokens, "max_new_tokens"),
                             longest, engine.max_seq_len)
    params = sampling_params(engine, len(ids), temperature, top_k, top_p, seed, greedy)
    if isinstance(stop_token_ids, (set, frozenset)):
        stop_token_ids = sorted(stop_token_ids)
    stops = ({ec.eos_token_id} if stop_token_ids is None else
             set(check_token_ids(stop_token_ids, engine.config.vocab_size, MAX_STOP_IDS, "stop_token_ids",
                                 f"entries; at most {MAX_STOP_IDS} are taken")))

    tokens = np.zeros((len(ids), engine.prefill_bucket(longest)), np.int32)
    for i, row in enumerate(ids):
        tokens[i, : len(row)] = row
    lengths = np.array([len(r) for r in ids], np.int32)
    out, logprobs = engine.complete(tokens, lengths, n_new, params)
    new = [_until_stop(row, stops) for row in out.tolist()]
    texts = engine.tokenizer.decode_batch(new)
    return [GenerationResult(prompt_ids=row, output_ids=new[i], text=texts[i],
                             finish_reason="stop" if new[i][-1] in stops else "length",
                             logprobs=logprobs[i, : len(new[i])].tolist() if return_logprobs else None)
            for i, row in enumerate(ids)]


def _until_stop(new: list[int], stops: set[int]) -> list[int]:
    """The new tokens up to and including the first stop token."""
    stop_at = next((j for j, t in enumerate(new) if t in stops), None)
    return new if stop_at is None else new[: stop_at + 1]
