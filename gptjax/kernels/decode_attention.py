"""One query per sequence against its KV cache: the decode path.

`decode_attention_reference` is the plain `jnp` form: it is the "xla" implementation and the reference the
Pallas kernel is tested against.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def decode_attention_reference(q, k_cache, v_cache, lengths):
    """q: [batch, heads, head_dim]; caches: [batch, max_seq, heads, head_dim]; lengths: [batch] valid entries."""
    head_dim = q.shape[-1]
    scores = jnp.einsum("bhd,bkhd->bhk", q, k_cache, preferred_element_type=jnp.float32)
    scores = scores / jnp.sqrt(jnp.float32(head_dim))
    valid = jnp.arange(k_cache.shape[1])[None, None, :] < lengths[:, None, None]
    probs = jax.nn.softmax(jnp.where(valid, scores, -jnp.inf), axis=-1)
    out = jnp.einsum("bhk,bkhd->bhd", probs.astype(v_cache.dtype), v_cache, preferred_element_type=jnp.float32)
    return out.astype(q.dtype)
