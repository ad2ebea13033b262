"""The KV cache: per layer, separate K and V buffers of shape [slots, max_seq, heads, head_dim].

Separate buffers per layer (not one stacked array) let XLA update each in place when the cache is donated.
Entry `t` of a slot holds the key/value of the token at position `t`; a slot's entries at or past its
position are stale and always masked by length.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gptjax.config import ModelConfig

LayerKV = tuple[jax.Array, jax.Array]  # (k, v), each [slots, max_seq, heads, head_dim]


def init_cache(config: ModelConfig, slots: int, max_seq: int) -> list[LayerKV]:
    shape = (slots, max_seq, config.n_heads, config.head_dim)
    dtype = jnp.dtype(config.dtype)
    return [(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(config.n_layers)]


def write_prefix(cache: list[LayerKV], prefix: list[LayerKV], slots) -> list[LayerKV]:
    """Copy a prefill's K/V ([n, prompt_len, heads, head_dim] per layer) into rows `slots` ([n]) at 0."""
    out = []
    for (k, v), (pk, pv) in zip(cache, prefix):
        for i in range(pk.shape[0]):
            k = jax.lax.dynamic_update_slice(k, pk[i : i + 1].astype(k.dtype), (slots[i], 0, 0, 0))
            v = jax.lax.dynamic_update_slice(v, pv[i : i + 1].astype(v.dtype), (slots[i], 0, 0, 0))
        out.append((k, v))
    return out


def write_token(layer: LayerKV, k_new, v_new, positions) -> LayerKV:
    """Store one new token per slot: k_new, v_new [slots, heads, head_dim] at `positions` [slots]."""
    k, v = layer
    rows = jnp.arange(k.shape[0])
    return k.at[rows, positions].set(k_new.astype(k.dtype)), v.at[rows, positions].set(v_new.astype(v.dtype))
