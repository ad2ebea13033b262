"""The KV cache: separate K and V buffers, per layer `[slots, max_seq, heads, head_dim]`.

Separate buffers per layer (not one stacked array) let XLA update each in place when the cache is donated.
With layer parallelism (stage > 1) the layers of each stage are stacked instead, `StagedKV` with K and V
`[stages, stage_layers, slots, max_seq, heads, head_dim]`, split over the `stage` mesh axis so a stage holds
only its own layers' cache.
Entry `t` of a slot holds the key/value of the token at position `t`; a slot's entries at or past its
position are stale and always masked by length.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from gptjax.config import ModelConfig

LayerKV = tuple[jax.Array, jax.Array]  # (k, v), each [slots, max_seq, heads, head_dim]


class StagedKV(NamedTuple):
    """Every layer's K and V, stacked per stage: [stages, stage_layers, slots, max_seq, heads, head_dim]."""

    k: jax.Array
    v: jax.Array


def init_cache(config: ModelConfig, slots: int, max_seq: int, stages: int = 1):
    """Zeros: a list of per-layer (k, v) for one stage, a `StagedKV` for several."""
    shape = (slots, max_seq, config.n_heads, config.head_dim)
    dtype = jnp.dtype(config.dtype)
    if stages > 1:
        staged = (stages, config.n_layers // stages, *shape)
        return StagedKV(jnp.zeros(staged, dtype), jnp.zeros(staged, dtype))
    return [(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(config.n_layers)]


def cache_len(cache) -> int:
    """max_seq of a cache in either layout."""
    return cache.k.shape[3] if isinstance(cache, StagedKV) else cache[0][0].shape[1]


def write_prefix(cache, prefix, slots):
    """Copy a prefill's K/V (`[n', prompt_len, heads, head_dim]` per layer, or a `StagedKV` of them) into rows
    `slots` ([n], n <= n') from position 0. Rows of `prefix` past n (padding) are left out.

    One scatter per buffer: a copy per row would put rows x layers x 2 kernels in the program (a 256-row
    insert of a 32-layer model: 16k of them, minutes to compile)."""
    n = slots.shape[0]
    if isinstance(cache, StagedKV):
        put = lambda dst, src: dst.at[:, :, slots, : src.shape[3]].set(src[:, :, :n].astype(dst.dtype))
        return StagedKV(put(cache.k, prefix.k), put(cache.v, prefix.v))
    put = lambda dst, src: dst.at[slots, : src.shape[1]].set(src[:n].astype(dst.dtype))
    return [(put(k, pk), put(v, pv)) for (k, v), (pk, pv) in zip(cache, prefix)]


def write_token(layer: LayerKV, k_new, v_new, positions) -> LayerKV:
    """Store one new token for each of the first n slots: k_new, v_new [n, heads, head_dim] at `positions` [n]."""
    k, v = layer
    rows = jnp.arange(k_new.shape[0])
    return k.at[rows, positions].set(k_new.astype(k.dtype)), v.at[rows, positions].set(v_new.astype(v.dtype))
