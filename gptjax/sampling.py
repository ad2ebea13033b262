"""Choosing the next token on device: greedy, temperature, top-k, top-p, one seed per sequence.

Every argument is a per-row array, so one compiled step serves a batch whose rows ask for different things,
and a row's tokens never depend on the others'. A row with temperature 0 (or below `GREEDY_BELOW`), or with
top-k 1, is greedy; a temperature above `MAX_TEMPERATURE` samples as that one does. Top-k is applied before top-p
(the nucleus is taken from the renormalized top-k distribution), as Hugging Face and FasterTransformer do.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from gptjax import kernels

# a row whose temperature is below this is greedy: logits / temperature would overflow float32 near 1e-38, and the
# distribution is already its argmax long before that
GREEDY_BELOW = 1e-5
# a temperature above this is taken as this one, on the host: near float32's largest (3.4e38, which every API takes)
# logits / temperature fall below float32's normal range and tie at 0, so top-k and top-p kept every token; at 2**33
# the division is exact (a power of two) and the draw already even over what the filters keep (logits 100 apart:
# odds within 1.2e-8 of even, under float32's resolution)
MAX_TEMPERATURE = 2.0**33


@dataclass(frozen=True)
class SamplingParams:
    """What one request asks of the sampler; temperature 0 means greedy, and one above `MAX_TEMPERATURE` is
    stored as that (the same draws)."""

    temperature: float = 0.0
    top_k: int = 0  # 0: no top-k
    top_p: float = 1.0  # 1.0: no top-p
    seed: int = 0  # used modulo 2**32: seeds equal modulo 2**32 give the same tokens

    def __post_init__(self):
        if not np.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if self.temperature > MAX_TEMPERATURE:
            object.__setattr__(self, "temperature", MAX_TEMPERATURE)
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not np.isfinite(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not -(2**63) <= int(self.seed) < 2**64:
            raise ValueError(f"seed must fit in 64 bits, got {self.seed}")


def row_keys(seeds, positions):
    """One PRNG key per row from its seed and the position being sampled.

    Folding in the position (not a step counter) makes a request's tokens depend only on its own seed,
    whatever else shares the batch and whenever it joined.
    """
    return jax.vmap(lambda s, p: jax.random.fold_in(jax.random.PRNGKey(s), p))(seeds, positions)


def _filters(top_k, top_p):
    """The rows that ask for top-k or top-p: what the filter (`kernels.sampling_threshold`) is for."""
    return (top_k > 0) | (top_p < 1.0)


def _filtered_logits(scaled, top_k, top_p):
    """`scaled` [batch, vocab] with everything outside each row's top-k and top-p nucleus set to -inf; a row
    that asks for neither (top_k 0, top_p 1) is left whole."""
    threshold = kernels.sampling_threshold(scaled, top_k, top_p)
    return jnp.where(_filters(top_k, top_p)[:, None] & (scaled < threshold[:, None]), -jnp.inf, scaled)


def sample(logits, temperature, top_k, top_p, keys, sampled: bool | None = None):
    """logits [batch, vocab] float32; temperature, top_p [batch] float32; top_k [batch] int; keys [batch]
    (or a function returning them).

    `sampled` is what the caller knows when compiling: False (every row greedy: a bare argmax), True (some
    row may sample), or None (decide on device). Either way a row draws only if its temperature is at least
    `GREEDY_BELOW` and its top-k is not 1 (which keeps its argmax alone), and the filter runs only when a
    drawing row asks for top-k or top-p: it costs far more than the rest of a step's sampling.
    """
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if sampled is False:
        return greedy
    draws = (temperature >= GREEDY_BELOW) & (top_k != 1)

    def draw(_):
        scaled = logits / jnp.where(draws, temperature, 1.0)[:, None]
        scaled = jax.lax.cond(jnp.any(draws & _filters(top_k, top_p)),
                              lambda s: _filtered_logits(s, top_k, top_p), lambda s: s, scaled)
        keys_now = keys() if callable(keys) else keys  # a callable defers the key math to when it is needed
        gumbel = jax.vmap(lambda key: jax.random.gumbel(key, logits.shape[-1:], jnp.float32))(keys_now)
        drawn = jnp.argmax(scaled + gumbel, axis=-1).astype(jnp.int32)
        return jnp.where(draws, drawn, greedy)

    if sampled:
        return draw(None)
    return jax.lax.cond(jnp.any(draws), draw, lambda _: greedy, None)


def next_tokens(logits, temperature, top_k, top_p, keys, sampled: bool | None = None):
    """`sample`'s tokens and each one's log-probability (`token_logprobs`): what a prefill or a decode step hands
    on."""
    tokens = sample(logits, temperature, top_k, top_p, keys, sampled)
    return tokens, token_logprobs(logits, tokens)


def token_logprobs(logits, tokens):
    """log p(token) under the model's own distribution (before temperature and filtering)."""
    return jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), tokens[:, None], axis=-1)[:, 0]
