"""Attention kernels and the one place that picks an implementation ("pallas" | "xla" | "cudnn")."""

from __future__ import annotations

import jax

from gptjax.kernels.decode_attention import decode_attention_reference
from gptjax.kernels.flash_attention import flash_attention_reference

__all__ = ["prefill_attention", "decode_step_attention", "default_impl",
           "flash_attention_reference", "decode_attention_reference"]


def default_impl() -> str:
    return "xla"


def prefill_attention(q, k, v, lengths, impl: str):
    """Causal self-attention over right-padded prompts, [batch, seq, heads, head_dim]."""
    if impl == "cudnn":
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
    return flash_attention_reference(q, k, v, lengths=lengths, causal=True)


def decode_step_attention(q, k_cache, v_cache, lengths, impl: str):
    """One new query per sequence against [batch, max_seq, heads, head_dim] caches."""
    return decode_attention_reference(q, k_cache, v_cache, lengths)
