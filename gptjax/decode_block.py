"""A decode step's layers: on the small-batch matmul kernels (`gptjax.kernels.decode_matmul`), on the batch matmul
kernel, or through XLA with the LayerNorms folded into the products (`folded_block`).

The same arithmetic as `gptjax.model.Block`, read from the same parameters, in five kernels per layer: LayerNorm
+ QKV + bias with the new token's K/V stored into the cache, attention, attention out + bias + residual,
LayerNorm + MLP in + bias + GELU, MLP out + bias + residual. The residual stream stays in float32 between them,
and no other kernel runs in the layer.

The default on one GPU for a model whose products fit the kernels, for decode steps of at most `AUTO_ROWS`
slots (`EngineConfig.decode_matmuls="pallas"`: steps of up to `KERNEL_ROWS`, 16 slots, "xla": never); products
whose weights exceed `KERNEL_MAX_BYTES` run the same arithmetic through XLA. Steps of more rows were tried on the
kernels in 64-row blocks and lost to XLA's matmuls (345M fp16, batch 256: 4.18 against 2.84 ms/token, RESULTS
run 23).
Steps of at least `BATCH_ROWS` slots (whole 64-row tiles) can instead run `batch_block`: QKV, attention out and MLP
in each one Mosaic GPU kernel with its epilogue (`gptjax.kernels.batch_matmul`: bias, residual or GELU); MLP out
(K = 4096: one CTA a 64 x 64 tile leaves half the chip idle, 13.7 us against XLA's 13.0 at 256 rows; in 64 x 32
tiles level with XLA in the step, RESULTS runs 30 and 31) through XLA, split over K by hand; and each LayerNorm one
`gptjax.kernels.residual_norm` kernel that writes the rows normalised, the first of a layer also adding the MLP out
before it (its parts, bias and residual). Against XLA's statistics, split-K sum and residual add (five kernels a
layer for two) that was 3.3% a 345M step at 256 slots and 4.5% at 128 on an H100 (RESULTS run 35).
The small-batch kernels' MLP was tried as one kernel (each program an FFN slice, the partial sums added in the
kernel): 2.7 times slower a step at batch 1, 6.5 at batch 8; and the attention inside attention out's kernel (each
split-K program attending over its chunk's heads): 10% slower at batch 1 (RESULTS run 31).
Every other step runs `folded_block` through XLA: the engine holds each LayerNorm folded into the product after it
(`fold_layer_norms`), so XLA's products take the residual stream as it is and apply the LayerNorm's 1 / std in their
epilogue, where the Flax block (the tests' reference for every path) runs a kernel normalising their input first.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp

from gptjax import kernels
from gptjax.config import ModelConfig
from gptjax.kernels import batch_matmul as batch
from gptjax.kernels.decode_matmul import (MATRIX_ROWS, decode_matmul, decode_matmul_reference, new_counters,
                                          supports)
from gptjax.kernels.residual_norm import residual_norm
from gptjax.model import ACTIVATIONS, norm_stats

KERNEL_ROWS = 16  # what decode_matmuls="pallas" runs on the kernels: steps of up to 16 slots; more rows: XLA's
                  # matmuls win (the kernel's tiles grow past the matrix units' 16 rows)
AUTO_ROWS = 8  # the default's limit: on the H200 the kernels beat XLA's matmuls at 1, 2 and 4 rows; at 8 the two are
               # level within 2% (RESULTS runs 13 and 17)
KERNEL_MAX_BYTES = 32 << 20  # larger weights: XLA's own matmul reads them faster (the H200, RESULTS run 11)
# steps of at least this many slots run `batch_block` under "auto" (0: never). On an H100 (RESULTS run 27, in one
# process, rounds alternating, every round alike): 256 slots 2.85 ms/token against XLA's 2.98, 128 slots 1.93 against
# 2.12; 64 slots lost (1.45 against 1.40, with the launch before 6 stages and one wgmma left running)
BATCH_ROWS = 128
BATCH_TILE = batch.TILE_M  # a step's slots must fill whole row tiles
BATCH_MAX_K = 1024  # products of longer rows through XLA: the kernel's tiles do not split K


def choose(requested: str, config: ModelConfig, mesh, backend: str | None = None) -> str:
    """The decode matmuls' implementation: "pallas" (the kernels for steps of up to `KERNEL_ROWS` slots),
    "xla", or by default "auto": the kernels for steps of up to `AUTO_ROWS` slots on one GPU when every
    product of the model fits them, XLA otherwise. "pallas" needs the model on one device and hidden sizes
    the kernel tiles."""
    dims = (config.hidden, config.ffn_hidden, 3 * config.hidden)
    fits = all(supports(1, k, n) for k in dims for n in dims) and mesh.size == 1
    if requested == "pallas" and not fits:
        raise ValueError(f"decode_matmuls='pallas' needs the model on one device and hidden sizes that are "
                         f"multiples of 16; this is hidden {config.hidden} on {mesh.size} devices")
    if requested:
        return requested
    itemsize = jnp.dtype(config.dtype).itemsize
    small = config.hidden * config.ffn_hidden * itemsize <= KERNEL_MAX_BYTES
    return "auto" if fits and small and (backend or jax.default_backend()) == "gpu" else "xla"


def _product(w, *args, interpret: bool, **kw):
    """One of the layer's products: the kernel, or for weights larger than `KERNEL_MAX_BYTES` the same
    arithmetic in `jnp`, for XLA to compile."""
    if w.size * w.dtype.itemsize <= KERNEL_MAX_BYTES:
        return decode_matmul(w, *args, interpret=interpret, **kw)
    return decode_matmul_reference(w, *args, **kw)


def block(config: ModelConfig, attention: str, p, h, layer_kv, pos, counters, *, interpret: bool):
    """One layer for one new token per row: h [rows, 1, hidden] float32, the layer's (k, v) cache, each row's
    position and the split counters (`new_counters`: the products' and attention's) -> (the next h, the cache
    with the new token's K/V in it, the counters)."""
    x = h[:, 0].astype(jnp.float32)
    rows, hidden = x.shape
    dtype = p["qkv"]["kernel"].dtype
    matmul = partial(_product, eps=config.layer_norm_eps, interpret=interpret)
    cache_shape = layer_kv[0].shape
    flat = [c.reshape(*cache_shape[:2], hidden) for c in layer_kv]  # [slots, max_seq, heads * head_dim]: free

    qkv_w = p["qkv"]["kernel"]
    q, k_cache, v_cache, counters = matmul(
        qkv_w.reshape(qkv_w.shape[0], -1), x, p["ln_1"]["scale"], p["ln_1"]["bias"],
        bias=p["qkv"]["bias"].reshape(-1), out_dtype=dtype, kv=(*flat, pos), counters=counters)
    layer_kv = (k_cache.reshape(cache_shape), v_cache.reshape(cache_shape))
    q = q.reshape(rows, config.n_heads, config.head_dim)
    attn, counters = kernels.decode_step_attention(q, *layer_kv, pos + 1, attention, counters=counters)
    attn = attn.reshape(rows, hidden)

    out_w = p["attn_out"]["kernel"]
    x, counters = matmul(out_w.reshape(-1, out_w.shape[-1]), attn, bias=p["attn_out"]["bias"], residual=x,
                         counters=counters)
    mlp, counters = matmul(p["mlp_in"]["kernel"], x, p["ln_2"]["scale"], p["ln_2"]["bias"],
                           bias=p["mlp_in"]["bias"], activation=config.activation, out_dtype=dtype, counters=counters)
    x, counters = matmul(p["mlp_out"]["kernel"], mlp, bias=p["mlp_out"]["bias"], residual=x, counters=counters)
    return x[:, None], layer_kv, counters


class Pending(NamedTuple):
    """The residual stream with its last product's split-K parts and bias not yet added: what a `batch_block` layer
    hands the next, whose first kernel adds them (`settle` adds them after the last layer)."""
    h: jax.Array  # [rows, 1, hidden] float32
    parts: jax.Array  # [splits, rows, hidden] float32
    bias: jax.Array  # [hidden]


def settle(h):
    """A layer's output as the residual stream [rows, 1, hidden]: a `Pending`'s parts and bias added."""
    if isinstance(h, Pending):
        return h.h + (h.bias.astype(jnp.float32) + h.parts.sum(0))[:, None]
    return h


SPLIT_K = 512  # batch_block's MLP out: K in parts of at least this, at most 16 (345M: 8, as XLA splits it at 256 rows)


def _split_product(x, w):
    """x [rows, K] @ w [K, N] as float32 parts [splits, rows, N], K split `SPLIT_K` at a time: one batched GEMM,
    whose parts the next `residual_norm` sums in the same kernel as the residual and the LayerNorm. (At one row XLA
    runs this form 36% slower than its own split, RESULTS run 35: it is for whole row tiles.)"""
    (rows, k), n = x.shape, w.shape[-1]
    splits = max(d for d in range(1, 17) if k % d == 0 and (d == 1 or k // d >= SPLIT_K))
    return jnp.einsum("rsk,skn->srn", x.reshape(rows, splits, k // splits), w.reshape(splits, k // splits, n),
                      preferred_element_type=jnp.float32)


def batch_block(config: ModelConfig, attention: str, p, h, layer_kv, pos, *, on_gpu: bool):
    """One layer for one new token per row on `fold_layer_norms`'s tree: QKV, attention out and MLP in each one
    `batch_matmul` kernel with its epilogue (bias, GELU or residual; its `jnp` reference off a GPU), MLP out's longer
    rows through XLA; each LayerNorm one `residual_norm` kernel writing the rows normalised for the product after it,
    the first also adding the previous layer's MLP out (its split-K parts, bias and residual: `Pending`). h is
    [rows, 1, hidden] float32 or the previous layer's `Pending`; returns (a `Pending`, the layer's cache with the
    new token's K/V)."""
    x, qkv = batch_qkv(config, p, h, on_gpu=on_gpu)
    attn, layer_kv = kernels.decode_step_append(qkv, layer_kv, pos, attention)
    return batch_after_attention(config, p, x, attn, on_gpu=on_gpu), layer_kv


def _batch_ops(config: ModelConfig, p, on_gpu: bool):
    """`batch_block`'s LayerNorm and product, and a layer's weight [K, N] by name (its axes flattened)."""
    norm = partial(residual_norm, eps=config.layer_norm_eps, out_dtype=p["qkv"]["kernel"].dtype,
                   interpret=not on_gpu)

    def matmul(x, w, *args, **kw):
        fn = batch.batch_matmul if on_gpu and w.shape[0] <= BATCH_MAX_K else batch.batch_matmul_reference
        return fn(x, w, *args, **kw)

    def weight(name, k: int):
        return p[name]["kernel"].reshape(k, -1)

    return norm, matmul, weight


def batch_qkv(config: ModelConfig, p, h, *, on_gpu: bool):
    """`batch_block` up to attention: (the residual stream [rows, hidden] float32, the step's qkv [rows, 3, heads,
    head_dim])."""
    norm, matmul, weight = _batch_ops(config, p, on_gpu)
    x, x16 = norm(h.h[:, 0], h.parts, h.bias) if isinstance(h, Pending) else norm(h[:, 0].astype(jnp.float32))
    qkv = matmul(x16, weight("qkv", x.shape[1]), p["qkv"]["bias"].reshape(-1))
    return x, qkv.reshape(x.shape[0], 3, config.n_heads, config.head_dim)


def batch_after_attention(config: ModelConfig, p, x, attn, *, on_gpu: bool) -> Pending:
    """`batch_block` from attention's output [rows, heads, head_dim] on, x the residual stream: attention out, the
    second LayerNorm, MLP in and MLP out's parts."""
    norm, matmul, weight = _batch_ops(config, p, on_gpu)
    rows, hidden = x.shape
    x = matmul(attn.reshape(rows, hidden), weight("attn_out", hidden), p["attn_out"]["bias"], x)
    x, x16 = norm(x)
    mlp = matmul(x16, weight("mlp_in", hidden), p["mlp_in"]["bias"], activation=config.activation)
    parts = _split_product(mlp, weight("mlp_out", config.ffn_hidden))
    return Pending(x[:, None], parts, p["mlp_out"]["bias"])


def batch_fits(config: ModelConfig, rows: int, on_gpu: bool) -> bool:
    """Whether a step of `rows` slots can run `batch_block`: whole tiles and GPT-2's GELU, and on a GPU 16-bit
    weights (the kernel would multiply float32 in tf32 on the matrix units)."""
    c, f = config.hidden, config.ffn_hidden
    sixteen_bits = jnp.dtype(config.dtype).itemsize == 2
    return (sixteen_bits or not on_gpu) and all(batch.supports(rows, k, n, activation=a, tile_m=BATCH_TILE)
               for k, n, a in ((c, 3 * c, ""), (c, c, ""), (c, f, config.activation), (f, c, "")))


def layer_fn(impl: str, config: ModelConfig, rows: int, attention: str):
    """The layer function (layer_params, h, layer_kv, positions) -> (h, layer_kv) that a decode step of
    `rows` slots runs: on the kernels (`choose`'s implementation says up to how many rows), else
    `folded_block`. The kernels' layers run one after another in Python (one device: `layout.PerLayer`), so the
    split counters (one zeroed buffer per step) go from each layer to the next here."""
    on_gpu = jax.default_backend() == "gpu"
    if impl == "auto" and BATCH_ROWS and rows >= BATCH_ROWS and batch_fits(config, rows, on_gpu):
        return lambda p, h, layer_kv, pos: batch_block(config, attention, p, h, layer_kv, pos, on_gpu=on_gpu)
    if not 0 < rows <= {"pallas": KERNEL_ROWS, "auto": AUTO_ROWS}.get(impl, 0):
        return partial(folded_block, config, attention)
    # one buffer of counters for the products' splits and attention's (a row's head each)
    carried = {"counters": new_counters(3 * config.hidden, config.ffn_hidden, MATRIX_ROWS * rows * config.n_heads)}

    def layer(p, h, layer_kv, pos):
        h, layer_kv, carried["counters"] = block(config, attention, p, h, layer_kv, pos, carried["counters"],
                                                 interpret=not on_gpu)
        return h, layer_kv

    return layer


# ---- LayerNorms folded into the products after them ------------------------------------------------------------
def _fold(ln, dense):
    """LN(x) @ W + b = rstd(x) * (x @ W') + b', with W' = diag(scale) W less each column's mean (x's centring moved
    into the weights: x @ W' = (x - mean(x)) @ diag(scale) W, as W' sums to 0 down each column) and
    b' = shift @ W + b. Leading axes (a pipeline stage's stacked layers) are kept, and no axis is reshaped (one
    split over `tensor` stays where it is)."""
    f32, lead, w = jnp.float32, ln["scale"].ndim - 1, dense["kernel"]
    out = w.ndim - lead - 1  # the product's output axes: [3, heads, head_dim] for QKV
    scaled = w.astype(f32) * ln["scale"].astype(f32).reshape(ln["scale"].shape + (1,) * out)
    lead_axes, out_axes = "abcd"[:lead], "wxyz"[:out]
    bias = jnp.einsum(f"{lead_axes}k,{lead_axes}k{out_axes}->{lead_axes}{out_axes}", ln["bias"].astype(f32),
                      w.astype(f32), precision=jax.lax.Precision.HIGHEST) + dense["bias"].astype(f32)
    return {"kernel": (scaled - scaled.mean(lead, keepdims=True)).astype(w.dtype),
            "bias": bias.astype(dense["bias"].dtype)}


def _fold_layer(p: dict) -> dict:
    identity = {name: {"scale": jnp.ones_like(p[name]["scale"]), "bias": jnp.zeros_like(p[name]["bias"])}
                for name in ("ln_1", "ln_2")}
    return {**p, **identity, "qkv": _fold(p["ln_1"], p["qkv"]), "mlp_in": _fold(p["ln_2"], p["mlp_in"])}


def _is_layer(value) -> bool:
    return isinstance(value, dict) and {"ln_1", "qkv", "ln_2", "mlp_in"} <= value.keys()


def fold_layer_norms(params) -> dict:
    """The engine's tree with each layer's two LayerNorms folded into QKV and MLP in (`_fold`): the same model,
    its LayerNorms left as the identity's (scale 1, shift 0), so every path computes it from this one tree (the
    Flax block normalises, then multiplies by the centred weights; `folded_block` multiplies, then scales). Folding
    twice changes nothing but rounding. Layer by layer (a pipeline: stage by stage), each keeping its shardings,
    so the copy made while folding is one layer's."""
    def fold(tree):
        leaves = jax.tree.leaves(tree)
        placed = all(isinstance(a, jax.Array) for a in leaves)
        shardings = jax.tree.map(lambda a: a.sharding, tree) if placed else None
        return jax.jit(_fold_layer, out_shardings=shardings)(tree)

    return {k: fold(v) if _is_layer(v) else v for k, v in params.items()}


def folded_block(config: ModelConfig, attention: str, p, h, layer_kv, pos):
    """One layer for one new token per row on `fold_layer_norms`'s tree, for XLA: h [rows, 1, hidden] (the residual
    stream, float32 under 16-bit weights, as in the Flax block) -> (the next h, the layer's cache with the new
    token's K/V). Each LayerNorm is its 1 / std, taken from the residual and applied to the product's float32 sum
    (in the GEMM's epilogue or its split-K sum): no kernel normalises the input (RESULTS run 29: 2 kernels a layer
    fewer, 2.4% a 6.7B batch-1 step and 4.5% a 345M batch-256 one on an H100)."""
    f32, dtype, eps = jnp.float32, p["qkv"]["kernel"].dtype, config.layer_norm_eps
    x = h[:, 0]

    def normed(x, dense, spec: str):
        _, rstd = norm_stats(x, eps)  # the mean is in the weights
        acc = jnp.einsum(spec, x.astype(dtype), dense["kernel"], preferred_element_type=f32)
        rstd = rstd.reshape(rstd.shape + (1,) * (acc.ndim - 2))
        return (rstd * acc + dense["bias"].astype(f32)).astype(dtype)

    def dense(x, d, spec: str):  # as Flax's Dense: the product and its bias in the weights' dtype
        return jnp.einsum(spec, x.astype(dtype), d["kernel"]) + d["bias"]

    qkv = normed(x, p["qkv"], "rk,kthd->rthd")  # heads kept whole, for tensor parallelism
    attn, layer_kv = kernels.decode_step_append(qkv, layer_kv, pos, attention)
    x = x + dense(attn, p["attn_out"], "rhd,hde->re")
    x = x + dense(ACTIVATIONS[config.activation](normed(x, p["mlp_in"], "rk,kf->rf")), p["mlp_out"], "rf,fe->re")
    return x[:, None], layer_kv
