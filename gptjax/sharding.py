"""The device mesh: its shape, what a model needs of it, and the shardings of per-slot values.

Which mesh axis each logical axis is split over is the rules table in `gptjax/rules.py` (re-exported here);
how parameters and the KV cache sit on the mesh, per layer or stacked per pipeline stage, is `gptjax/layout.py`.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from gptjax.config import MeshShape, ModelConfig
from gptjax.planning import round_up
from gptjax.rules import LOGICAL_AXIS_RULES, MESH_AXES, logical_to_mesh

__all__ = ["LOGICAL_AXIS_RULES", "MESH_AXES", "check_layout", "default_mesh", "logical_to_mesh", "make_mesh",
           "mesh_shape", "named", "padded_vocab", "replicated", "slots_sharding"]


def make_mesh(data: int = 1, stage: int = 1, tensor: int = 1, devices=None) -> Mesh:
    """A Mesh over `data x stage x tensor` devices; tensor is the fastest-varying (inside a node)."""
    shape = MeshShape(data=data, stage=stage, tensor=tensor)
    if min(data, stage, tensor) < 1:
        raise ValueError(f"every mesh axis must be at least 1, got {shape}")
    devices = jax.devices() if devices is None else devices
    if shape.size != len(devices):
        raise ValueError(f"mesh {shape} needs data*stage*tensor = {shape.size} devices, "
                         f"but {len(devices)} are available")
    return Mesh(np.asarray(devices).reshape(shape.data, shape.stage, shape.tensor), MESH_AXES)


def default_mesh(mesh: Mesh | MeshShape | str | None = None) -> Mesh:
    """`mesh`; a MeshShape or its text (`"tensor=2"`) over the first devices; or when None the mesh of the first
    device alone (what an engine runs on unless told)."""
    if mesh is None:
        return make_mesh(devices=jax.devices()[:1])
    shape = MeshShape.parse(mesh) if isinstance(mesh, str) else mesh
    if isinstance(shape, MeshShape):
        return make_mesh(shape.data, shape.stage, shape.tensor, jax.devices()[: shape.size])
    if not isinstance(mesh, Mesh):
        raise ValueError(f"mesh must be a jax Mesh, a MeshShape or text such as 'tensor=2', got {mesh!r}")
    return mesh


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


def padded_vocab(config: ModelConfig, tensor: int) -> int:
    """Rows of `wte` for a `tensor`-way vocab split: the vocabulary rounded up to a multiple of `tensor`.

    The padding rows are zeros and their logits are cut off, so real tokens never see them.
    """
    return round_up(config.vocab_size, tensor)


def named(mesh: Mesh, logical: P) -> NamedSharding:
    """The sharding over `mesh` of an array whose axes have the logical names of `logical`."""
    return NamedSharding(mesh, logical_to_mesh(logical))


def slots_sharding(mesh: Mesh) -> NamedSharding:
    """Per-slot vectors (tokens, positions, sampling parameters)."""
    return named(mesh, P("slots"))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())
