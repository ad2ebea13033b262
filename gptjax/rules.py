"""The one table that maps logical axes to mesh axes (MaxText's `logical_axis_rules`).

Every parameter, cache and kernel operand axis has a logical name, given where the tensor is written (`model.py`,
`kernels/`); this table says which mesh axis each name is split over. Changing a layout is a one-line change.
A leaf module: the model, the kernels and the layouts all read it, and it reads none of them.
"""

from __future__ import annotations

import flax.linen as nn
from jax.sharding import PartitionSpec as P

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

CACHE_AXES = ("slots", "cache_seq", "heads", "head_dim")  # one layer's K or V: [slots, max_seq, heads, head_dim]
STAGE_AXES = ("stages", "stage_layers")  # the leading axes of every stacked (stage > 1) array


def logical_to_mesh(spec: P) -> P:
    """A PartitionSpec of logical axis names -> the same spec in mesh axes."""
    return nn.logical_to_mesh_axes(spec, LOGICAL_AXIS_RULES)
