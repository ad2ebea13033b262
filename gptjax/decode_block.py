"""A decode step's layers on the small-batch matmul kernels (`gptjax.kernels.decode_matmul`).

The same arithmetic as `gptjax.model.Block`, read from the same parameters, in four matmul kernels per layer
besides attention: LayerNorm + QKV, attention out, LayerNorm + MLP in, GELU + MLP out. LayerNorm and GELU
happen inside the kernels as their inputs are read; each product leaves float32 partial sums (split over K),
which the next kernel (GELU + MLP out) or one small XLA fusion (bias + residual add, QKV's bias) sums.

Opt-in (`EngineConfig.decode_matmuls="pallas"`) for decode steps of at most `KERNEL_ROWS` slots with the
model on one device; products whose weights exceed `KERNEL_MAX_BYTES` run the same arithmetic through XLA.
The Flax block serves every other case, and is the reference the tests compare this path's tokens against.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from gptjax.config import ModelConfig
from gptjax.kernels.decode_matmul import decode_matmul, decode_matmul_reference, sum_parts, supports

KERNEL_ROWS = 16  # more rows: XLA's matmuls win (the kernel's tiles grow past the matrix units' 16 rows)
KERNEL_MAX_BYTES = 32 << 20  # larger weights: XLA's own matmul reads them faster (the H200, RESULTS run 11)


def choose(requested: str, config: ModelConfig, mesh) -> str:
    """The decode matmuls' implementation: "xla" unless "pallas" is asked for (on the H200 the XLA path is
    still the faster one, RESULTS run 11), which needs the model on one device and hidden sizes the kernel
    tiles."""
    dims = (config.hidden, config.ffn_hidden, 3 * config.hidden)
    fits = all(supports(1, k, n) for k in dims for n in dims) and mesh.size == 1
    if requested == "pallas" and not fits:
        raise ValueError(f"decode_matmuls='pallas' needs the model on one device and hidden sizes that are "
                         f"multiples of 16; this is hidden {config.hidden} on {mesh.size} devices")
    return requested or "xla"


def _product(w, *args, interpret: bool, **kw):
    """One of the layer's products: the kernel, or for weights larger than `KERNEL_MAX_BYTES` the same
    arithmetic in `jnp` (its result one part), for XLA to compile."""
    if w.size * w.dtype.itemsize <= KERNEL_MAX_BYTES:
        return decode_matmul(w, *args, interpret=interpret, **kw)
    return decode_matmul_reference(w, *args, **kw)


def block(config: ModelConfig, p, h, attend, *, interpret: bool):
    """One layer for one new token per row, h [rows, 1, hidden] float32 -> (the same, attend's layer state)."""
    x = h[:, 0].astype(jnp.float32)
    rows, heads, head_dim = x.shape[0], config.n_heads, config.head_dim
    matmul = partial(_product, eps=config.layer_norm_eps, interpret=interpret)

    qkv_w = p["qkv"]["kernel"]
    qkv = matmul(qkv_w.reshape(qkv_w.shape[0], -1), x, ln_scale=p["ln_1"]["scale"], ln_bias=p["ln_1"]["bias"])
    qkv = sum_parts(qkv, 3 * config.hidden) + p["qkv"]["bias"].reshape(-1).astype(jnp.float32)
    qkv = qkv.astype(qkv_w.dtype).reshape(rows, 1, 3, heads, head_dim)
    attn, layer_state = attend(0, qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2])

    out_w = p["attn_out"]["kernel"]
    attn = matmul(out_w.reshape(-1, out_w.shape[-1]), attn.reshape(rows, heads * head_dim))
    x = x + sum_parts(attn, config.hidden) + p["attn_out"]["bias"].astype(jnp.float32)
    mlp = matmul(p["mlp_in"]["kernel"], x, ln_scale=p["ln_2"]["scale"], ln_bias=p["ln_2"]["bias"])
    out = matmul(p["mlp_out"]["kernel"], None, mlp, p["mlp_in"]["bias"], activation=config.activation)
    x = x + sum_parts(out, config.hidden) + p["mlp_out"]["bias"].astype(jnp.float32)
    return x[:, None], layer_state


def layer_block(impl: str, config: ModelConfig, rows: int, flax_block):
    """The block function a decode step of `rows` slots runs: `block` with "pallas" up to `KERNEL_ROWS`
    rows, else `flax_block`."""
    if impl == "pallas" and 0 < rows <= KERNEL_ROWS:
        return partial(block, config, interpret=jax.default_backend() != "gpu")
    return flax_block
