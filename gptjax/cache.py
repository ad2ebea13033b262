"""The KV cache: K and V buffers `[..., slots, max_seq, heads, head_dim]`, and how they are written.

A cache is a pytree of such buffers in one of two layouts (which one is `gptjax/layout.py`'s business):
- per layer: a list of `(k, v)`, each `[slots, max_seq, heads, head_dim]`. Separate buffers per layer (not one
  stacked array) let XLA update each in place when the cache is donated;
- staged (layer parallelism): `StagedKV`, K and V `[stages, stage_layers, slots, max_seq, heads, head_dim]`,
  split over the `stage` mesh axis so that a stage holds only its own layers' cache.
The functions here treat both alike: `lead` is the number of stacked axes before `slots` (0 or 2).
Entry `t` of a slot holds the key/value of the token at position `t`; a slot's entries at or past its
position are stale and always masked by length.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp

LayerKV = tuple[jax.Array, jax.Array]  # (k, v), each [slots, max_seq, heads, head_dim]


class StagedKV(NamedTuple):
    """Every layer's K and V, stacked per stage: [stages, stage_layers, slots, max_seq, heads, head_dim]."""

    k: jax.Array
    v: jax.Array


def _write_rows(dst, src, slots, lead: int):
    keep = (slice(None),) * lead
    rows = src[(*keep, slice(0, slots.shape[0]))]
    return dst.at[(*keep, slots, slice(0, src.shape[lead + 1]))].set(rows.astype(dst.dtype))


def write_prefix(cache, prefix, slots, lead: int = 0):
    """Copy a prefill's K/V (buffers `[..., n', prompt_len, heads, head_dim]`, the cache's tree) into rows `slots`
    ([n], n <= n') of every buffer, from position 0. Rows of `prefix` past n (padding) are left out.

    One scatter per buffer: a copy per row would put rows x layers x 2 kernels in the program (a 256-row
    insert of a 32-layer model: 16k of them, minutes to compile)."""
    return jax.tree.map(partial(_write_rows, slots=slots, lead=lead), cache, prefix)


def write_token(layer: LayerKV, k_new, v_new, positions, first_row: int = 0) -> LayerKV:
    """Store one new token for each of n slots from `first_row` on: k_new, v_new [n, heads, head_dim] at
    `positions` [n]."""
    k, v = layer
    rows = first_row + jnp.arange(k_new.shape[0])
    return k.at[rows, positions].set(k_new.astype(k.dtype)), v.at[rows, positions].set(v_new.astype(v.dtype))


def cache_len(cache, lead: int = 0) -> int:
    """max_seq of a cache."""
    return jax.tree.leaves(cache)[0].shape[lead + 1]


def fit(a, like):
    """`a` padded with zeros at the end of every axis to the shape of `like` (a prefill's K or V grown to
    the cache it will live in)."""
    if a.shape == like.shape:
        return a
    return jnp.pad(a, [(0, want - have) for have, want in zip(a.shape, like.shape)])


def pad_slots(cache, slots: int, lead: int = 0):
    """Every buffer grown to `slots` rows with zeros (rows that hold no sequence)."""
    def pad(a):
        if a.shape[lead] == slots:
            return a
        widths = [(0, 0)] * a.ndim
        widths[lead] = (0, slots - a.shape[lead])
        return jnp.pad(a, widths)

    return jax.tree.map(pad, cache)
