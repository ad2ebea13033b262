"""A decode step's layers on the small-batch matmul kernels (`gptjax.kernels.decode_matmul`).

The same arithmetic as `gptjax.model.Block`, read from the same parameters, in four matmul kernels per layer
besides attention: LayerNorm + QKV, attention out, LayerNorm + MLP in, GELU + MLP out. Between layers the
residual stream travels as a `Residual`, base + sum(parts) + bias, and the next LayerNorm kernel sums it as it
reads it (and writes the sum out once, as the new base): no kernel of its own for bias or residual adds.

Used for decode steps of at most `KERNEL_ROWS` slots with the model on one GPU (`choose`), and for products
whose weights are at most `KERNEL_MAX_BYTES` (larger ones run the same arithmetic through XLA); the Flax block
serves every other case, and is the reference the tests compare this path's tokens against.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp

from gptjax.config import ModelConfig
from gptjax.kernels.decode_matmul import decode_matmul, decode_matmul_reference, sum_parts, supports

KERNEL_ROWS = 16  # more rows: XLA's matmuls win (the kernel's tiles grow past the matrix units' 16 rows)
KERNEL_MAX_BYTES = 32 << 20  # larger weights: XLA's own matmul reads them faster (the H200, RESULTS run 11)


class Residual(NamedTuple):
    """The residual stream [rows, hidden] as base + sum(parts) + bias, the last two not yet added."""
    base: jax.Array  # [rows, hidden] float32
    parts: jax.Array | None = None  # [rows, splits * hidden] float32 partial sums of the last product
    bias: jax.Array | None = None  # [hidden], that product's bias


def choose(requested: str, config: ModelConfig, mesh, on_gpu: bool) -> str:
    """The decode matmuls' implementation: "pallas" when asked, or by default for a 16-bit model on one GPU
    whose every product the kernel tiles; "xla" otherwise."""
    dims = (config.hidden, config.ffn_hidden, 3 * config.hidden)
    fits = all(supports(1, k, n) for k in dims for n in dims) and mesh.size == 1
    if requested == "pallas" and not fits:
        raise ValueError(f"decode_matmuls='pallas' needs the model on one device and hidden sizes that are "
                         f"multiples of 16; this is hidden {config.hidden} on {mesh.size} devices")
    if requested:
        return requested
    return "pallas" if on_gpu and fits and config.dtype in ("float16", "bfloat16") else "xla"


def value(h) -> jax.Array:
    """The hidden state [rows, 1, hidden] float32 of a `Residual` (or of an array, unchanged)."""
    if not isinstance(h, Residual):
        return h
    x = h.base
    if h.parts is not None:
        x = x + sum_parts(h.parts, x.shape[-1]) + h.bias.astype(jnp.float32)
    return x[:, None]


def block(config: ModelConfig, p, h, attend, *, interpret: bool):
    """One layer for one new token per row: h is [rows, 1, hidden] (the first layer's input) or the previous
    layer's `Residual`; returns (the new `Residual`, attend's layer state)."""
    h = h if isinstance(h, Residual) else Residual(h[:, 0].astype(jnp.float32))
    rows, heads, head_dim = h.base.shape[0], config.n_heads, config.head_dim
    matmul = partial(_product, eps=config.layer_norm_eps, interpret=interpret)

    qkv_w = p["qkv"]["kernel"]
    qkv, x = matmul(qkv_w.reshape(qkv_w.shape[0], -1), h.base, h.parts, h.bias, p["ln_1"]["scale"],
                    p["ln_1"]["bias"], save_input=True)  # x: the residual stream, summed
    qkv = sum_parts(qkv, 3 * config.hidden) + p["qkv"]["bias"].reshape(-1).astype(jnp.float32)
    qkv = qkv.astype(qkv_w.dtype).reshape(rows, 1, 3, heads, head_dim)
    attn, layer_state = attend(0, qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2])

    out_w = p["attn_out"]["kernel"]
    attn_parts = matmul(out_w.reshape(-1, out_w.shape[-1]), attn.reshape(rows, heads * head_dim))
    mlp, x = matmul(p["mlp_in"]["kernel"], x, attn_parts, p["attn_out"]["bias"], p["ln_2"]["scale"],
                    p["ln_2"]["bias"], save_input=True)
    out = matmul(p["mlp_out"]["kernel"], None, mlp, p["mlp_in"]["bias"], activation=config.activation)
    return Residual(x, out, p["mlp_out"]["bias"]), layer_state


def _product(w, *args, interpret: bool, **kw):
    """One of the layer's products: the kernel, or for weights larger than `KERNEL_MAX_BYTES` the same
    arithmetic in `jnp` (its result one part), for XLA to compile."""
    if w.size * w.dtype.itemsize <= KERNEL_MAX_BYTES:
        return decode_matmul(w, *args, interpret=interpret, **kw)
    return decode_matmul_reference(w, *args, **kw)


def layer_block(impl: str, config: ModelConfig, rows: int, flax_block):
    """The block function a decode step of `rows` slots runs: `block` with "pallas" up to `KERNEL_ROWS`
    rows, else `flax_block`."""
    if impl == "pallas" and 0 < rows <= KERNEL_ROWS:
        return partial(block, config, interpret=jax.default_backend() != "gpu")
    return flax_block
