"""The device mesh and the one table that maps logical axes to mesh axes.

Every parameter and cache axis has a logical name (given where the layer is written, in `model.py`);
`LOGICAL_AXIS_RULES` below says which mesh axis each name is split over. Changing a layout is a one-line change.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from gptjax.config import MeshShape, ModelConfig
from gptjax.model import logical_axes

MESH_AXES = ("data", "stage", "tensor")

LOGICAL_AXIS_RULES = (
    # parameters (Megatron: QKV and mlp_in split by columns, attn_out and mlp_out by rows)
    ("vocab", "tensor"),  # vocab-parallel embedding and LM head
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("embed", None),
    ("positions", None),
    ("qkv", None),
    ("head_dim", None),
    ("norm", None),
    ("layers", "stage"),
    # KV cache and activations
    ("slots", "data"),
    ("cache_seq", None),
)

CACHE_AXES = ("slots", "cache_seq", "heads", "head_dim")  # [slots, max_seq, heads, head_dim]


def make_mesh(data: int = 1, stage: int = 1, tensor: int = 1, devices=None) -> Mesh:
    """A Mesh over `data x stage x tensor` devices; tensor is the fastest-varying (inside a node)."""
    shape = MeshShape(data=data, stage=stage, tensor=tensor)
    devices = jax.devices() if devices is None else devices
    if shape.size != len(devices):
        raise ValueError(f"mesh {shape} needs data*stage*tensor = {shape.size} devices, "
                         f"but {len(devices)} are available")
    return Mesh(np.asarray(devices).reshape(shape.data, shape.stage, shape.tensor), MESH_AXES)


def mesh_shape(mesh: Mesh) -> MeshShape:
    return MeshShape(**{name: int(mesh.shape[name]) for name in MESH_AXES})


def check_layout(config: ModelConfig, shape: MeshShape) -> None:
    """Fail at once, naming the numbers, when a model can't be split the way the mesh asks."""
    if config.n_heads % shape.tensor:
        raise ValueError(f"tensor={shape.tensor} does not divide the model's {config.n_heads} heads")
    if config.ffn_hidden % shape.tensor:
        raise ValueError(f"tensor={shape.tensor} does not divide the MLP width {config.ffn_hidden}")
    if config.n_layers % shape.stage:
        raise ValueError(f"stage={shape.stage} does not divide the model's {config.n_layers} layers")


def logical_to_mesh(spec: P) -> P:
    return nn.logical_to_mesh_axes(spec, LOGICAL_AXIS_RULES)


def param_shardings(config: ModelConfig, mesh: Mesh):
    """NamedSharding for every parameter, from its logical axes and the rules table."""
    return jax.tree.map(lambda spec: NamedSharding(mesh, logical_to_mesh(spec)), logical_axes(config),
                        is_leaf=lambda x: isinstance(x, P))


def cache_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, logical_to_mesh(P(*CACHE_AXES)))


def slots_sharding(mesh: Mesh) -> NamedSharding:
    """Per-slot vectors (tokens, positions, sampling parameters)."""
    return NamedSharding(mesh, logical_to_mesh(P("slots")))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())
