"""Causal attention over a whole (right-padded) prompt: the prefill path.

`flash_attention_reference` is the plain `jnp` form: it is the "xla" implementation and the reference the
Pallas kernel is tested against.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def flash_attention_reference(q, k, v, *, lengths=None, causal=True):
    """q, k, v: [batch, seq, heads, head_dim]; lengths: [batch] valid lengths (right padding) or None."""
    batch, seq, heads, head_dim = q.shape
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
    scores = scores / jnp.sqrt(jnp.float32(head_dim))
    kpos = jnp.arange(k.shape[1])
    mask = jnp.ones((seq, k.shape[1]), bool)
    if causal:
        mask = kpos[None, :] <= jnp.arange(seq)[:, None]
    mask = mask[None, None]
    if lengths is not None:
        mask = mask & (kpos[None, None, None, :] < lengths[:, None, None, None])
    scores = jnp.where(mask, scores, -jnp.inf)
    # rows with no valid key (padding past a length) would be NaN; they are unspecified, keep them finite
    scores = jnp.where(mask.any(-1, keepdims=True), scores, 0.0)
    probs = jax.nn.softmax(scores, axis=-1)
    return jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32).astype(q.dtype)
