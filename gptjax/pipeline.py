"""Layer parallelism: the layers split into stages over the `stage` mesh axis, activations passed on.

Each stage holds only its own layers (stacked: leaves `[stages, stage_layers, ...]`, split over `stage`) and
their KV cache (`cache.StagedKV`); `gptjax/layout.py` chooses this layout and calls `run`. The rows (prompts or
slots) of each data shard are cut into micro-batches; at tick `t` stage `s` runs micro-batch `t - s` through
its layers and hands the activations to stage `s + 1` with a collective permute, so after `stages - 1` ticks
every stage is busy at once (GPipe's forward schedule). Inside, `data` and `stage` are manual (`shard_map`)
while `tensor` stays automatic: the blocks are the model's own, and XLA splits their heads and MLP over
`tensor` exactly as on one stage.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from gptjax.cache import StagedKV

# layer_fn(layer_params, h [mb, seq, hidden], layer_kv (k, v) [mb, T, heads, head_dim], rows) -> (h, layer_kv)
LayerFn = Callable[..., tuple[jax.Array, tuple[jax.Array, jax.Array]]]


def stack_stages(layers: list, stages: int):
    """The model's layers (a subtree each, in order) -> one tree whose every leaf is `[stages, stage_layers, ...]`;
    stage `s` gets layers `s*L/S ... (s+1)*L/S - 1`."""
    per = len(layers) // stages

    def stack(*leaves):
        return jnp.stack(leaves).reshape(stages, per, *leaves[0].shape)

    return jax.tree.map(stack, *layers)


def unstack_stages(stacked) -> list:
    """The inverse of `stack_stages`: back to one subtree per layer (for checks and saving)."""
    n_stages, per = jax.tree.leaves(stacked)[0].shape[:2]
    return [jax.tree.map(lambda a: a[i // per, i % per], stacked) for i in range(n_stages * per)]


def stack_placed_layers(layers, shardings):
    """Per-layer trees, each already on the devices of its stage -> `stack_stages`' tree in `shardings`.

    Every device stacks the shards of its own stage's layers that it already holds; nothing moves between
    devices (how a checkpoint is restored for layer parallelism without any device seeing all layers).
    """
    def stack(target, *leaves):
        n_stages = int(target.mesh.shape["stage"])
        per = len(leaves) // n_stages
        global_shape = (n_stages, per, *leaves[0].shape)
        held = [{shard.device: shard.data for shard in leaf.addressable_shards} for leaf in leaves]
        arrays = []
        for device, index in target.addressable_devices_indices_map(global_shape).items():
            stage = index[0].start or 0
            arrays.append(jnp.stack([held[stage * per + j][device] for j in range(per)])[None])
        return jax.make_array_from_single_device_arrays(global_shape, target, arrays)

    return jax.tree.map(stack, shardings, *layers)


def micro_batches(rows: int, stages: int) -> int:
    """The most micro-batches (up to one per stage) that split `rows` evenly."""
    return max(m for m in range(1, min(rows, stages) + 1) if rows % m == 0)


def run(mesh: Mesh, layer_fn: LayerFn, stage_params, x, kv: StagedKV, rows, out_fn):
    """Run every layer over `x` [n, seq, hidden] (n a multiple of the `data` size), stage by stage.

    `kv` is the stacked cache whose third axis is the rows of `x` (a decode state's slots, or zeros for a
    prefill to fill); `rows` is a pytree of per-row arrays [n, ...] handed to `layer_fn` micro-batch by
    micro-batch; `out_fn(h, rows)` picks what to keep of the last layer's activations ([mb, ...] per row).
    Returns (outputs [n, ...] on every stage, the updated `kv`).
    """
    n_stages = int(mesh.shape["stage"])
    ring = [(i, (i + 1) % n_stages) for i in range(n_stages)]

    def body(stage_params, x, k, v, rows):
        s = jax.lax.axis_index("stage")
        params = jax.tree.map(lambda a: a[0], stage_params)  # [stage_layers, ...]: this stage's layers
        k, v = k[0], v[0]  # [stage_layers, rows, T, heads, head_dim]
        n_layers = k.shape[0]
        n_micro = micro_batches(x.shape[0], n_stages)
        mb = x.shape[0] // n_micro

        def take(a, start):
            return jax.lax.dynamic_slice_in_dim(a, start, mb, axis=0)

        first_rows = jax.tree.map(lambda a: a[:mb], rows)
        out_shape = jax.eval_shape(out_fn, x[:mb], first_rows)
        outs = jnp.zeros((x.shape[0], *out_shape.shape[1:]), out_shape.dtype)

        def tick(t, carry):
            h_in, k, v, outs = carry
            m = t - s
            valid = (m >= 0) & (m < n_micro)  # outside it, this stage idles in the pipeline's fill or drain
            start = jnp.clip(m, 0, n_micro - 1) * mb
            h = jnp.where(s == 0, take(x, start), h_in)
            rows_mb = jax.tree.map(lambda a: take(a, start), rows)
            for j in range(n_layers):
                kj, vj = take(k[j], start), take(v[j], start)
                h, (kj_new, vj_new) = layer_fn(jax.tree.map(lambda a: a[j], params), h, (kj, vj), rows_mb)
                kj_new = jnp.where(valid, kj_new.astype(kj.dtype), kj)
                vj_new = jnp.where(valid, vj_new.astype(vj.dtype), vj)
                k = jax.lax.dynamic_update_slice(k, kj_new[None], (j, start, 0, 0, 0))
                v = jax.lax.dynamic_update_slice(v, vj_new[None], (j, start, 0, 0, 0))
            y = out_fn(h, rows_mb)
            keep = valid & (s == n_stages - 1)
            outs = jax.lax.dynamic_update_slice_in_dim(outs, jnp.where(keep, y, take(outs, start)), start, 0)
            return jax.lax.ppermute(h, "stage", ring), k, v, outs

        init = (jnp.zeros_like(x[:mb]), k, v, outs)
        _, k, v, outs = jax.lax.fori_loop(0, n_micro + n_stages - 1, tick, init)
        # only the last stage wrote outputs; the sum hands them to every stage
        return jax.lax.psum(outs, "stage"), k[None], v[None]

    stage_spec = jax.tree.map(lambda _: P("stage"), stage_params)
    kv_spec = P("stage", None, "data")
    rows_spec = jax.tree.map(lambda _: P("data"), rows)
    fn = jax.shard_map(body, mesh=mesh, in_specs=(stage_spec, P("data"), kv_spec, kv_spec, rows_spec),
                       out_specs=(P("data"), kv_spec, kv_spec), axis_names={"data", "stage"}, check_vma=False)
    outs, k, v = fn(stage_params, x, kv.k, kv.v, rows)
    return outs, StagedKV(k, v)
