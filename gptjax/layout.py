"""How one model's parameters and KV cache sit on one mesh: per layer, or stacked per pipeline stage.

`layout_for(config, mesh)` picks one of two, and nothing else in gptjax asks which:
- `PerLayer` (`stage == 1`): the model's own tree, one subtree per layer (`h_0 ... h_{L-1}`), every layer on
  every device; the cache a list of per-layer `(k, v)`; the layers run unrolled, one after the other.
- `Staged` (`stage > 1`): the layers stacked per stage, `params["stages"]` leaves `[stages, stage_layers, ...]`,
  split over `stage` so each stage holds only its own layers and their cache (`cache.StagedKV`); the layers run
  through `gptjax.pipeline`, micro-batched.
In both, `wte` is padded to `padded_vocab` rows for the vocab-parallel split, and every array's sharding comes
from the logical axes the model names and the one rules table (`gptjax/rules.py`).
"""

from __future__ import annotations

import abc
from functools import cached_property, lru_cache

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from gptjax import cache as kv_cache
from gptjax import compile_cache
from gptjax import pipeline
from gptjax.config import ModelConfig
from gptjax.model import init_params, join_layers, logical_axes, split_layers
from gptjax.rules import CACHE_AXES, STAGE_AXES
from gptjax.sharding import check_layout, mesh_shape, named, padded_vocab

# layer_fn(layer_params, h [rows, seq, hidden], layer_kv (k, v) [rows, T, heads, head_dim], row_values)
#   -> (h, layer_kv): one layer's step, the same in both layouts


def _is_spec(x) -> bool:
    return isinstance(x, P)


class Layout(abc.ABC):
    """The parameters' tree and shardings, the cache's buffers and writes, and how the layers run."""

    lead = 0  # stacked axes before a cache buffer's `slots` axis

    def __init__(self, config: ModelConfig, mesh: Mesh):
        self.config, self.mesh, self.shape = config, mesh, mesh_shape(mesh)
        check_layout(config, self.shape)
        self.vocab_rows = padded_vocab(config, self.shape.tensor)

    @property
    def leading_rows(self) -> bool:
        """Whether a decode call may run only a state's first rows (a decode bucket): not with the rows split
        over `data`, where a call's first rows and the cache's first rows are split differently (the kernels
        run per shard, each pairing its own rows of both)."""
        return self.shape.data == 1

    # ---- parameters ---------------------------------------------------------------------------------
    @cached_property
    def _model_axes(self):
        return logical_axes(self.config)  # traces the model's init: once per layout

    @abc.abstractmethod
    def _stack(self, layers: list) -> dict:
        """The model's layers (in order) -> this layout's layer entries."""

    @abc.abstractmethod
    def _split(self, params) -> tuple[list, dict]:
        """This layout's tree -> (the model's layers in order, the other parameters)."""

    @abc.abstractmethod
    def _stack_placed(self, layers: list) -> dict:
        """`_stack` of layers already on the devices `layer_restore_shardings` names, moving nothing."""

    def param_axes(self):
        """Logical axes of every parameter of this layout's tree (PartitionSpecs)."""
        layers, rest = split_layers(self._model_axes)
        return {**rest, **self._stack_axes(layers)}

    @abc.abstractmethod
    def _stack_axes(self, layers: list) -> dict:
        """`_stack` of the layers' logical axes (PartitionSpecs)."""

    def param_shardings(self):
        """NamedSharding for every parameter, from its logical axes and the rules table."""
        return jax.tree.map(lambda spec: named(self.mesh, spec), self.param_axes(), is_leaf=_is_spec)

    def arrange(self, params):
        """The model's own tree (per layer, `vocab_size` rows) -> this layout's: `wte` padded with zero rows,
        the layers stacked where the layout stacks them. Pure; use inside jit."""
        layers, rest = split_layers(params)
        return {**self._pad_vocab(rest), **self._stack(layers)}

    def _pad_vocab(self, rest: dict) -> dict:
        wte = rest["wte"]
        return {**rest, "wte": jnp.pad(wte, ((0, self.vocab_rows - wte.shape[0]), (0, 0)))}

    def model_tree(self, params):
        """The inverse of `arrange`: this layout's tree -> the model's own, as `init_params` makes it and
        checkpoints store it."""
        layers, rest = self._split(params)
        return join_layers(layers, {**rest, "wte": rest["wte"][: self.config.vocab_size]})

    def holds(self, params) -> bool:
        """Whether `params` are in this layout's tree already."""
        return params["wte"].shape[0] == self.vocab_rows and self._holds_layers(params)

    @abc.abstractmethod
    def _holds_layers(self, params) -> bool:
        """Whether the layer entries of `params` are this layout's."""

    def random_params(self, seed: int | None = None):
        """Random weights (`init_params`, from `seed` or the config's) made in this layout on its devices. The
        program is compiled once per model and layout in a process (seconds on a CPU), whatever the seed."""
        seed = self.config.init_seed if seed is None else seed
        if not 0 <= seed < 2**32:
            raise ValueError(f"seed must be in [0, 2^32), got {seed}")
        return _random_params_program(type(self), self.config, self.mesh)(np.uint32(seed))

    @cached_property
    def abstract_params(self):
        """The parameters' shapes, dtypes and shardings in this layout, nothing made: what the programs compile
        against while a checkpoint still loads."""
        shapes = jax.eval_shape(lambda: self.arrange(init_params(self.config)))
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes,
                            self.param_shardings())

    def place(self, params):
        """Parameters in the model's own tree (numpy or jax arrays, anywhere) -> this layout, on its devices."""
        return jax.jit(self.arrange, out_shardings=self.param_shardings())(params)

    def layer_restore_shardings(self, i: int):
        """Where a checkpoint's layer i is read to: the devices of the stage that holds it, split there over
        `tensor` and `data` by the rules table; no device reads another stage's layers."""
        stage = i // (self.config.n_layers // self.shape.stage)
        stage_mesh = Mesh(self.mesh.devices[:, stage : stage + 1], self.mesh.axis_names)
        layer_axes, _ = split_layers(self._model_axes)
        return jax.tree.map(lambda spec: named(stage_mesh, spec), layer_axes[i], is_leaf=_is_spec)

    def assemble(self, layers: list, rest: dict):
        """A checkpoint's restored parameters -> this layout: `layers` on `layer_restore_shardings`, `rest` (the
        embeddings and final norm) replicated over the mesh."""
        shardings = self.param_shardings()
        rest = jax.jit(self._pad_vocab, out_shardings={k: shardings[k] for k in rest})(rest)
        return {**rest, **self._stack_placed(layers)}

    # ---- the KV cache -------------------------------------------------------------------------------
    def _cache_sharding(self) -> NamedSharding:
        return named(self.mesh, P(*(STAGE_AXES[: self.lead]), *CACHE_AXES))

    def new_cache(self, slots: int, max_seq: int):
        """A zero cache of `slots` rows and `max_seq` positions, laid out on the mesh (inside jit)."""
        return jax.lax.with_sharding_constraint(self._zeros(slots, max_seq), self._cache_sharding())

    @abc.abstractmethod
    def _zeros(self, slots: int, max_seq: int):
        """A zero cache of this layout's tree."""

    def cache_shardings(self, cache):
        """The sharding of every buffer of a cache (arrays or shapes) of this layout."""
        return jax.tree.map(lambda _: self._cache_sharding(), cache)

    def cache_len(self, cache) -> int:
        return kv_cache.cache_len(cache, self.lead)

    def write_prefix(self, cache, prefix, slots):
        """A prefill's K/V (this layout's tree) into rows `slots` of `cache`: see `cache.write_prefix`."""
        return kv_cache.write_prefix(cache, prefix, slots, self.lead)

    def pad_slots(self, cache, slots: int):
        """A cache grown with empty rows to `slots`, laid out on the mesh (inside jit)."""
        return jax.lax.with_sharding_constraint(kv_cache.pad_slots(cache, slots, self.lead), self._cache_sharding())

    def prefill_cache_rows(self, rows: int, slots: int) -> int:
        """Rows of the cache a prefill of `rows` prompts fills when its K/V are to become a `slots`-slot
        decode cache (the one-program generate)."""
        return slots

    def fit_kv(self, a, like):
        """A prefill layer's K or V grown to its buffer in the cache being filled (`like`); laid out on the mesh
        when grown, as the decode cache it becomes."""
        if a.shape == like.shape:
            return a
        return jax.lax.with_sharding_constraint(kv_cache.fit(a, like), self._cache_sharding())

    # ---- running the layers -------------------------------------------------------------------------
    @abc.abstractmethod
    def run(self, params, x, cache, rows, layer_fn, out_fn):
        """Every layer over `x` [n, seq, hidden] with its cache buffers -> (`out_fn(h, rows)` of the last layer's
        activations, the new cache). `rows` is a pytree of per-row values ([n, ...]) handed to `layer_fn`."""


class PerLayer(Layout):
    """One stage: the model's own tree, a `(k, v)` per layer, the layers unrolled one after the other, each
    split over `tensor` by XLA."""

    def _stack(self, layers: list) -> dict:
        return join_layers(layers, {})

    def _stack_axes(self, layers: list) -> dict:
        return join_layers(layers, {})

    def _split(self, params) -> tuple[list, dict]:
        return split_layers(params)

    def _stack_placed(self, layers: list) -> dict:
        return self._stack(layers)

    def _holds_layers(self, params) -> bool:
        return "stages" not in params

    def _zeros(self, slots: int, max_seq: int):
        shape = (slots, max_seq, self.config.n_heads, self.config.head_dim)
        dtype = jnp.dtype(self.config.dtype)
        return [(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(self.config.n_layers)]

    def run(self, params, x, cache, rows, layer_fn, out_fn):
        new_cache = []
        for layer_params, layer_kv in zip(split_layers(params)[0], cache):
            x, layer_kv = layer_fn(layer_params, x, layer_kv, rows)
            new_cache.append(layer_kv)
        return out_fn(x, rows), new_cache


class Staged(Layout):
    """`stage > 1` pipeline stages: the layers and their cache stacked per stage, run by `gptjax.pipeline`."""

    lead = len(STAGE_AXES)
    leading_rows = False  # the pipeline's micro-batches split every row of the state

    def _stack(self, layers: list) -> dict:
        return {"stages": pipeline.stack_stages(layers, self.shape.stage)}

    def _split(self, params) -> tuple[list, dict]:
        return pipeline.unstack_stages(params["stages"]), {k: v for k, v in params.items() if k != "stages"}

    def _stack_axes(self, layers: list) -> dict:
        return {"stages": jax.tree.map(lambda spec: P(*STAGE_AXES, *spec), layers[0], is_leaf=_is_spec)}

    def _stack_placed(self, layers: list) -> dict:
        return {"stages": pipeline.stack_placed_layers(layers, self.param_shardings()["stages"])}

    def _holds_layers(self, params) -> bool:
        return "stages" in params

    def _zeros(self, slots: int, max_seq: int):
        cfg = self.config
        shape = (self.shape.stage, cfg.n_layers // self.shape.stage, slots, max_seq, cfg.n_heads, cfg.head_dim)
        return kv_cache.StagedKV(jnp.zeros(shape, jnp.dtype(cfg.dtype)), jnp.zeros(shape, jnp.dtype(cfg.dtype)))

    def prefill_cache_rows(self, rows: int, slots: int) -> int:
        return rows  # the pipeline's cache rows travel with its micro-batches: the prompts' rows

    def fit_kv(self, a, like):
        return kv_cache.fit(a, like)  # inside the pipeline's shard_map: its specs place the cache

    def run(self, params, x, cache, rows, layer_fn, out_fn):
        return pipeline.run(self.mesh, layer_fn, params["stages"], x, cache, rows, out_fn)


def layout_for(config: ModelConfig, mesh: Mesh) -> Layout:
    """The layout of `config` on `mesh`: staged when the mesh has more than one pipeline stage."""
    return Staged(config, mesh) if mesh_shape(mesh).stage > 1 else PerLayer(config, mesh)


@lru_cache(maxsize=8)
def _random_params_program(kind: type, config: ModelConfig, mesh: Mesh):
    """A layout's random weights as one program of the seed. With the compilation cache on, the program is kept
    whole in a `ProgramStore` and read back at the next start: neither traced nor lowered (~2 s of Flax's init on
    a CPU), as the warm-up's programs are."""
    layout = kind(config, mesh)
    jitted = jax.jit(lambda seed: layout.arrange(init_params(config, seed)), out_shardings=layout.param_shardings())
    store = compile_cache.program_store(compile_cache.identity(
        "random weights", kind.__name__, config, mesh.shape, [d.id for d in mesh.devices.flat]))
    if store is None:
        return jitted
    return store.compiled("random_params", lambda: jitted.lower(jax.ShapeDtypeStruct((), jnp.uint32)))
