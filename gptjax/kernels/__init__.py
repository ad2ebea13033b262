"""Attention kernels and the one place that picks an implementation ("pallas" | "xla" | "cudnn").

- "pallas": our kernels. Prefill on a Hopper GPU (sm_90) runs `hopper_flash_attention` (Mosaic GPU: wgmma,
  TMA, warp specialisation) where it supports the shape (head_dim 64 or 128, fp16/bf16), else
  `flash_attention` (Triton); decode runs `decode_attention` (Triton), its launch parameters from the swept
  table, or `decode_attention_append`, which also stores the step's keys and values. Off a GPU the Pallas
  interpreter runs the Triton-form kernels (slow, but the same arithmetic: it is how the tests check them on
  CPU).
- "xla": the plain `jnp` references, which XLA fuses as it can.
- "cudnn": `jax.nn.dot_product_attention(implementation="cudnn")` for prefill (GPU, fp16/bf16 only); decode
  uses the reference, which XLA fuses well enough for one query.

Sharding: a `pallas_call` has no partitioning rule, so under a sharded jit XLA would gather its operands to
every device. When a mesh is set (`jax.set_mesh(mesh)` around the jitted call, so that
`jax.sharding.get_abstract_mesh()` sees it), the Pallas path runs inside `jax.shard_map` instead: batch rows
split over the mesh axis that `gptjax.sharding` gives to slots, heads over the one it gives to heads;
attention is independent per row and per head, so each device runs the kernel on its own shard.
"""

from __future__ import annotations

import functools

import jax
from jax.sharding import PartitionSpec as P

from gptjax.cache import write_token
from gptjax.kernels.decode_attention import decode_attention, decode_attention_append, decode_attention_reference
from gptjax.kernels.flash_attention import flash_attention, flash_attention_reference
from gptjax.kernels.flash_attention_hopper import (hopper_flash_attention, hopper_flash_attention_qkv,
                                                   supports as hopper_supports)
from gptjax.kernels.sampling_filter import GPU_MIN_ROWS, filter_threshold, filter_threshold_reference

__all__ = ["prefill_attention", "decode_step_attention", "decode_step_append", "default_impl", "on_gpu",
           "on_hopper", "flash_attention", "flash_attention_reference", "hopper_flash_attention",
           "hopper_flash_attention_qkv", "decode_attention",
           "decode_attention_append", "decode_attention_reference", "sampling_threshold", "filter_threshold",
           "filter_threshold_reference"]


def on_gpu() -> bool:
    return jax.default_backend() == "gpu"


def on_hopper() -> bool:
    return on_gpu() and getattr(jax.devices()[0], "compute_capability", "") == "9.0"


def default_impl() -> str:
    return "pallas" if on_gpu() else "xla"


def prefill_attention(qkv, lengths, impl: str):
    """Causal self-attention over right-padded prompts: qkv [batch, seq, 3, heads, head_dim] (the QKV product's
    output: query, key, value) -> [batch, seq, heads, head_dim]; lengths [batch] or None. On Hopper the kernel
    reads the three in place (`hopper_flash_attention_qkv`); the other paths take them apart."""
    if impl == "pallas":
        if on_hopper() and hopper_supports(qkv):
            kernel = hopper_flash_attention_qkv
        else:
            triton = functools.partial(flash_attention, causal=True, interpret=not on_gpu())

            def kernel(qkv, lengths=None):
                return triton(*_split(qkv), lengths=lengths)
        if lengths is None:
            return _per_shard(kernel, (qkv,), (_PROMPT_QKV,), _QKV)
        return _per_shard(lambda qkv, n: kernel(qkv, lengths=n), (qkv, lengths), (_PROMPT_QKV, _ROWS), _QKV)
    if impl == "cudnn":
        # right padding needs no length mask under causality: a valid query never sees a later (padded) key
        return jax.nn.dot_product_attention(*_split(qkv), is_causal=True, implementation="cudnn")
    return flash_attention_reference(*_split(qkv), lengths=lengths, causal=True)


def _split(qkv):
    """[batch, seq, 3, heads, head_dim] -> q, k, v, [batch, seq, heads, head_dim] each."""
    return qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]


def decode_step_attention(q, k_cache, v_cache, lengths, impl: str, counters=None):
    """One new query per sequence, q [batch, heads, head_dim], against the first `batch` rows of
    [rows, max_seq, heads, head_dim] caches; lengths [batch] counts the valid entries, the current token's
    included. With `counters` (zeros, at least batch x heads: `decode_attention`'s split counters, which it
    leaves zero) the result is (out, counters)."""
    if impl == "pallas" and counters is None:
        kernel = functools.partial(decode_attention, interpret=not on_gpu())
        return _per_shard(kernel, (q, k_cache, v_cache, lengths), (_Q1, _QKV, _QKV, _ROWS), _Q1)
    if impl == "pallas":
        def counted(q, k_cache, v_cache, lengths, counters):
            return decode_attention(q, k_cache, v_cache, lengths, interpret=not on_gpu(), counters=counters)
        return _per_shard(counted, (q, k_cache, v_cache, lengths, counters), (_Q1, _QKV, _QKV, _ROWS, _COUNTERS),
                          (_Q1, _COUNTERS))
    out = decode_attention_reference(q, k_cache, v_cache, lengths)
    return out if counters is None else (out, counters)


def decode_step_append(qkv, layer_kv, positions, impl: str, first_row: int = 0):
    """One decode step's attention with its own keys and values: qkv [batch, 3, heads, head_dim] (the new
    token's query, key and value per sequence), the layer's (k, v) caches [rows, max_seq, heads, head_dim] and
    `positions` [batch] where the new tokens go -> (out [batch, heads, head_dim], the caches with them stored).
    "pallas" stores and attends in one kernel (`decode_attention_append`); the others store, then attend.
    `first_row`: qkv's rows are the caches' from there on (a step run in parts of its slots, on one device)."""
    mesh = jax.sharding.get_abstract_mesh()
    if first_row and not mesh.empty and mesh.size > 1:
        raise ValueError(f"decode_step_append: first_row={first_row} needs the slots on one device")
    if impl == "pallas":
        kernel = functools.partial(decode_attention_append, interpret=not on_gpu(), first_row=first_row)
        out, k, v = _per_shard(kernel, (qkv, *layer_kv, positions), (_STEP, _QKV, _QKV, _ROWS), (_Q1, _QKV, _QKV))
        return out, (k, v)
    layer_kv = write_token(layer_kv, qkv[:, 1], qkv[:, 2], positions, first_row)
    read = [c[first_row:first_row + qkv.shape[0]] for c in layer_kv] if first_row else layer_kv
    return decode_step_attention(qkv[:, 0], *read, positions + 1, impl), layer_kv


def sampling_threshold(scaled, top_k, top_p):
    """Each row's top-k / top-p threshold (`sampling_filter`), each device on its rows (the whole vocabulary of
    each): the kernel, compiled on a GPU for at least `GPU_MIN_ROWS` rows a device (the sort for fewer), and
    interpreted elsewhere, where it still beats the sort 6-9x (a 2-core CPU: 64 rows of 50257 in 0.10 s against
    0.65)."""
    def threshold(scaled, top_k, top_p):
        if on_gpu() and scaled.shape[0] < GPU_MIN_ROWS:
            return filter_threshold_reference(scaled, top_k, top_p)
        return filter_threshold(scaled, top_k, top_p, interpret=not on_gpu())

    return _per_shard(threshold, (scaled, top_k, top_p), (("slots", None), _ROWS, _ROWS), _ROWS)


# logical axes of the kernels' operands, mapped to mesh axes by gptjax.sharding's one table
_QKV = ("slots", "cache_seq", "heads", "head_dim")  # [batch, seq, heads, head_dim]
_Q1 = ("slots", "heads", "head_dim")  # [batch, heads, head_dim]
_STEP = ("slots", "qkv", "heads", "head_dim")  # [batch, 3, heads, head_dim]: a step's query, key and value
_PROMPT_QKV = ("slots", "cache_seq", "qkv", "heads", "head_dim")  # [batch, seq, 3, heads, head_dim]: prompts' q, k, v
_ROWS = ("slots",)  # [batch]
_COUNTERS = (None,)  # a kernel's split counters: every device its own


def _per_shard(fn, args, logical, out_logical):
    """fn(*args), inside shard_map when a mesh with more than one device is set; plain otherwise.
    `out_logical`: the output's logical axes, or a tuple of them for a tuple of outputs."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return fn(*args)
    from gptjax import sharding  # imported here: sharding imports the model, which imports this package

    def spec(axes, shape):
        mesh_axes = sharding.logical_to_mesh(P(*axes))
        # an axis the mesh can't split evenly (a small prefill batch, say) stays whole on every device
        return P(*(a if a is not None and _splits(mesh, a, n) else None for a, n in zip(mesh_axes, shape)))

    in_specs = tuple(spec(axes, x.shape) for axes, x in zip(logical, args))
    # the kernels pair row i of every operand: split over devices, rows only line up when every operand has
    # as many (a decode over the first rows of a cache split over `data` would read other sequences' rows)
    split_rows = {x.shape[0] for axes, x, s in zip(logical, args, in_specs)
                  if axes[0] == "slots" and s[0] is not None and _size(mesh, s[0]) > 1}
    if len(split_rows) > 1:
        raise ValueError(f"operands split over the slots' mesh axis must have the same rows, got {sorted(split_rows)}")
    out_shapes = jax.eval_shape(fn, *args)
    out_specs = (tuple(spec(axes, o.shape) for axes, o in zip(out_logical, out_shapes))
                 if isinstance(out_shapes, (tuple, list)) else spec(out_logical, out_shapes.shape))
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)(*args)


def _splits(mesh, axes, n: int) -> bool:
    axes = axes if isinstance(axes, tuple) else (axes,)
    return all(a in mesh.axis_names for a in axes) and n % _size(mesh, axes) == 0


def _size(mesh, axes) -> int:
    """Devices along mesh axis `axes` (a name or a tuple of names)."""
    size = 1
    for a in axes if isinstance(axes, tuple) else (axes,):
        size *= mesh.shape[a]
    return size
