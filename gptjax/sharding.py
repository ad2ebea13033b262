"""The device mesh and the one table that maps logical axes to mesh axes.

Every parameter and cache axis has a logical name (given where the layer is written, in `model.py`);
`LOGICAL_AXIS_RULES` below says which mesh axis each name is split over. Changing a layout is a one-line change.

Two parameter layouts, chosen by the mesh:
- `stage == 1`: the model's own tree, one subtree per layer (`h_0 ... h_{L-1}`), every layer on every device.
- `stage > 1`: the layers stacked per stage, `params["stages"]` leaves `[stages, stage_layers, ...]`, split over
  the `stage` axis so each stage holds only its own layers (see `gptjax/pipeline.py`).
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
    ("vocab", "tensor"),  # vocab-parallel embedding and LM head (rows padded to a multiple of tensor)
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("embed", None),
    ("positions", None),
    ("qkv", None),
    ("head_dim", None),
    ("norm", None),
    # layer parallelism: the stacked layers' leading axes
    ("stages", "stage"),
    ("stage_layers", None),
    # KV cache and activations
    ("slots", "data"),
    ("cache_seq", None),
)

CACHE_AXES = ("slots", "cache_seq", "heads", "head_dim")  # [slots, max_seq, heads, head_dim]
STAGE_AXES = ("stages", "stage_layers")  # the leading axes of every stacked (stage > 1) array


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


def padded_vocab(config: ModelConfig, tensor: int) -> int:
    """Rows of `wte` for a `tensor`-way vocab split: the vocabulary rounded up to a multiple of `tensor`.

    The padding rows are zeros and their logits are cut off, so real tokens never see them.
    """
    return -(-config.vocab_size // tensor) * tensor


def logical_to_mesh(spec: P) -> P:
    return nn.logical_to_mesh_axes(spec, LOGICAL_AXIS_RULES)


def _is_spec(x) -> bool:
    return isinstance(x, P)


def param_axes(config: ModelConfig, stages: int = 1):
    """Logical axes of every parameter in the layout that `stages` asks for (see the module docstring)."""
    axes = logical_axes(config)
    if stages == 1:
        return axes
    out = {k: v for k, v in axes.items() if not k.startswith("h_")}
    out["stages"] = jax.tree.map(lambda spec: P(*STAGE_AXES, *spec), axes["h_0"], is_leaf=_is_spec)
    return out


def param_shardings(config: ModelConfig, mesh: Mesh):
    """NamedSharding for every parameter, from its logical axes and the rules table."""
    return jax.tree.map(lambda spec: NamedSharding(mesh, logical_to_mesh(spec)),
                        param_axes(config, mesh_shape(mesh).stage), is_leaf=_is_spec)


def cache_sharding(mesh: Mesh) -> NamedSharding:
    """K or V of the cache: per layer `[slots, max_seq, heads, head_dim]`, or stacked per stage."""
    axes = CACHE_AXES if mesh_shape(mesh).stage == 1 else (*STAGE_AXES, *CACHE_AXES)
    return NamedSharding(mesh, logical_to_mesh(P(*axes)))


def slots_sharding(mesh: Mesh) -> NamedSharding:
    """Per-slot vectors (tokens, positions, sampling parameters)."""
    return NamedSharding(mesh, logical_to_mesh(P("slots")))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def arrange_params(config: ModelConfig, params, mesh: Mesh):
    """The model's own tree (per-layer, `vocab_size` rows) -> the mesh's layout: wte padded to
    `padded_vocab` rows with zeros, layers stacked per stage when `stage > 1`. Pure; use inside jit."""
    import jax.numpy as jnp

    from gptjax.pipeline import stack_stages

    shape = mesh_shape(mesh)
    rows = padded_vocab(config, shape.tensor)
    wte = params["wte"]
    if wte.shape[0] != rows:
        params = {**params, "wte": jnp.pad(wte, ((0, rows - wte.shape[0]), (0, 0)))}
    if shape.stage > 1 and any(k.startswith("h_") for k in params):
        params = stack_stages(params, shape.stage)
    return params


def in_layout(config: ModelConfig, params, mesh: Mesh) -> bool:
    shape = mesh_shape(mesh)
    return (params["wte"].shape[0] == padded_vocab(config, shape.tensor)
            and ("stages" in params) == (shape.stage > 1))


def place_params(config: ModelConfig, params, mesh: Mesh):
    """Parameters in the model's own tree (numpy or jax arrays) -> the mesh's layout, on its devices."""
    return jax.jit(lambda p: arrange_params(config, p, mesh), out_shardings=param_shardings(config, mesh))(params)


def model_params(config: ModelConfig, params):
    """The inverse of `arrange_params`: any layout -> the model's own tree (per-layer, `vocab_size` rows),
    as `init_params` makes it and checkpoints store it."""
    from gptjax.pipeline import unstack_stages

    if "stages" in params:
        params = unstack_stages(params)
    if params["wte"].shape[0] != config.vocab_size:
        params = {**params, "wte": params["wte"][: config.vocab_size]}
    return params
