"""The GPT: learned positions, pre-LayerNorm blocks, GELU MLP, LM head tied to the token embedding.

Layers only name the logical axes of their parameters (`embed`, `heads`, `mlp`, `vocab`, ...); which mesh axis
each one lands on is decided in `gptjax/sharding.py`. Attention is passed in as a function, so the same blocks
serve prefill (causal over the prompt, returning its K/V) and decode (one token against the cache).
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from gptjax.config import ModelConfig

# attend(layer, qkv) -> (out, layer_state); qkv is [batch, seq, 3, heads, head_dim] (queries, keys, values: one
# array, so a kernel may read all three without XLA copying each out), out [batch, seq, heads, head_dim]
Attend = Callable[[int, jax.Array], tuple[jax.Array, object]]

def gelu_tanh(x):
    """GPT-2's GELU ("gelu_new"): the tanh approximation."""
    return jax.nn.gelu(x, approximate=True)


def gelu_erf(x):
    """The exact GELU, with erf."""
    return jax.nn.gelu(x, approximate=False)


ACTIVATIONS = {"gelu_new": gelu_tanh, "gelu": gelu_erf}
_LAYER_PREFIX = "h_"


def layer_name(i: int) -> str:
    """The name of layer i's subtree in the model's parameters."""
    return f"{_LAYER_PREFIX}{i}"


def layer_index(name: str) -> int | None:
    """The layer number of a top-level parameter name (`h_3` -> 3); None for the others (wte, wpe, ln_f)."""
    digits = name[len(_LAYER_PREFIX):]
    return int(digits) if name.startswith(_LAYER_PREFIX) and digits.isdigit() else None


def split_layers(params) -> tuple[list, dict]:
    """The model's tree -> (its layers' subtrees in layer order, the other parameters)."""
    layers = sorted((layer_index(k), v) for k, v in params.items() if layer_index(k) is not None)
    return [v for _, v in layers], {k: v for k, v in params.items() if layer_index(k) is None}


def join_layers(layers, rest) -> dict:
    """The inverse of `split_layers`."""
    return {**rest, **{layer_name(i): layer for i, layer in enumerate(layers)}}


def _init(std: float, axes: tuple[str, ...]):
    return nn.with_logical_partitioning(nn.initializers.normal(std), axes)


def _zeros(axes):
    return nn.with_logical_partitioning(nn.initializers.zeros_init(), axes)


def norm_stats(x, eps: float):
    """Each row's mean and 1 / std over the last axis, in float32 whatever x's dtype (fp16 overflows in the
    variance). The mean and the mean square are taken in one pass (var = E[x^2] - E[x]^2): two sibling reductions
    that XLA fuses into one kernel, where the two-pass form costs two kernels per LayerNorm at decode."""
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.maximum(jnp.square(x32).mean(-1, keepdims=True) - jnp.square(mean), 0.0)
    return mean, jax.lax.rsqrt(var + eps)


def layer_norm(x, scale, bias, eps: float):
    """LayerNorm computed in float32 (`norm_stats`), returned in the weights' dtype."""
    mean, rstd = norm_stats(x, eps)
    y = (x.astype(jnp.float32) - mean) * rstd
    return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(scale.dtype)


class LayerNorm(nn.Module):
    """`layer_norm` with its scale and bias as the layer's parameters."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x):
        dtype = jnp.dtype(self.config.dtype)
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
                           (x.shape[-1],), dtype)
        bias = self.param("bias", _zeros(("norm",)), (x.shape[-1],), dtype)
        return layer_norm(x, scale, bias, self.config.layer_norm_eps)


class Block(nn.Module):
    """One transformer layer: x + attn(ln_1(x)), then + mlp(ln_2(x))."""

    config: ModelConfig
    layer: int = 0

    @nn.compact
    def __call__(self, x, attend: Attend):
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        # GPT-2's scaled init: residual projections shrink with depth so the residual stream stays O(1)
        out_std = cfg.init_std / (2 * cfg.n_layers) ** 0.5
        dense = dict(dtype=dtype, param_dtype=dtype)

        h = LayerNorm(cfg, name="ln_1")(x)
        # QKV fused in one matmul; its [3, heads, head_dim] output keeps heads whole for tensor parallelism
        qkv = nn.DenseGeneral((3, cfg.n_heads, cfg.head_dim), name="qkv", **dense,
                              kernel_init=_init(cfg.init_std, ("embed", "qkv", "heads", "head_dim")),
                              bias_init=_zeros(("qkv", "heads", "head_dim")))(h)
        attn, layer_state = attend(self.layer, qkv)
        x = x + nn.DenseGeneral(cfg.hidden, axis=(-2, -1), name="attn_out", **dense,
                                kernel_init=_init(out_std, ("heads", "head_dim", "embed")),
                                bias_init=_zeros(("norm",)))(attn)

        h = LayerNorm(cfg, name="ln_2")(x)
        h = nn.Dense(cfg.ffn_hidden, name="mlp_in", **dense,
                     kernel_init=_init(cfg.init_std, ("embed", "mlp")), bias_init=_zeros(("mlp",)))(h)
        h = ACTIVATIONS[cfg.activation](h)
        h = nn.Dense(cfg.hidden, name="mlp_out", **dense,
                     kernel_init=_init(out_std, ("mlp", "embed")), bias_init=_zeros(("norm",)))(h)
        return x + h, layer_state


class GPT(nn.Module):
    """Token ids and positions in, last-layer hidden states or logits out.

    `wte` may hold more rows than `vocab_size` (`vocab_rows`: padding for a vocab-parallel split); logits of
    the padding rows are cut off, so real tokens' logits never change.
    """

    config: ModelConfig
    vocab_rows: int = 0  # rows of wte; 0 means config.vocab_size

    def setup(self):
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        self.wte = self.param("wte", _init(cfg.init_std, ("vocab", "embed")),
                              (self.vocab_rows or cfg.vocab_size, cfg.hidden), dtype)
        self.wpe = self.param("wpe", _init(cfg.init_std / 2, ("positions", "embed")),
                              (cfg.n_positions, cfg.hidden), dtype)
        self.blocks = [Block(cfg, layer=i, name=layer_name(i)) for i in range(cfg.n_layers)]
        self.ln_f = LayerNorm(cfg)

    def embed(self, tokens, positions):
        """tokens, positions: [batch, seq] -> [batch, seq, hidden] float32.

        The residual stream stays in float32 (it is small next to the weights); matmuls run in the model dtype.
        """
        return (jnp.take(self.wte, tokens, axis=0).astype(jnp.float32)
                + jnp.take(self.wpe, positions, axis=0).astype(jnp.float32))

    def run_blocks(self, x, attend: Attend):
        states = []
        for block in self.blocks:
            x, state = block(x, attend)
            states.append(state)
        return x, states

    def logits(self, x):
        """x: [..., hidden] -> float32 logits [..., vocab_size]; the head is the embedding, transposed."""
        x = self.ln_f(x)
        logits = jnp.einsum("...c,vc->...v", x, self.wte, preferred_element_type=jnp.float32)
        return logits[..., : self.config.vocab_size]

    def __call__(self, tokens, positions, attend: Attend):
        x, states = self.run_blocks(self.embed(tokens, positions), attend)
        return x, states

    def everything(self, tokens, positions, attend: Attend):
        """Touches every parameter: what `init` runs."""
        x, _ = self(tokens, positions, attend)
        return self.logits(x)


def _init_attend(layer, qkv):
    return qkv[:, :, 2], None


def init_params(config: ModelConfig, seed: int | None = None):
    """Random weights (std 0.02, GPT-2's scaled residual init) from `seed` (default: the config's)."""
    key = jax.random.PRNGKey(config.init_seed if seed is None else seed)
    tokens = jnp.zeros((1, 1), jnp.int32)
    variables = GPT(config).init(key, tokens, tokens, _init_attend, method=GPT.everything)
    return nn.meta.unbox(variables["params"])


def logical_axes(config: ModelConfig):
    """The logical axis names of every parameter, as a pytree of PartitionSpecs matching the params."""
    tokens = jnp.zeros((1, 1), jnp.int32)
    boxed = jax.eval_shape(lambda: GPT(config).init(jax.random.PRNGKey(0), tokens, tokens, _init_attend,
                                                          method=GPT.everything))
    return nn.get_partition_spec(boxed)["params"]

