"""The serving programs, prepared before the first request: one per shape a server can run (`gptjax.planning`),
loaded whole from the engine's program store when an earlier run saved it (no tracing, no lowering: a restart
is ready in seconds), else compiled now and saved. The engine runs a prepared program directly; a shape nobody
prepared goes through its jit."""

from __future__ import annotations

from concurrent.futures import Future
from functools import partial

import jax
import numpy as np

from gptjax import sampling
from gptjax.engine_api import SamplingArrays, layout_of, pack_prompts


def _read_failed_stops_here(engine) -> None:
    """A checkpoint read beside the warm-up (`Engine.load`) that has already failed raises here, before the next
    program compiles, rather than after all of them."""
    if isinstance(engine._params, Future) and engine._params.done():
        engine.params  # raises what the read raised (or keeps the weights it read)


def prepare_prefill(engine, rows: int, bucket: int, state) -> None:
    """The prefill of `rows` prompts padded to `bucket` tokens, and the insert of its result into `state`."""
    _read_failed_stops_here(engine)
    with jax.set_mesh(engine.mesh):
        # the arguments are made as `Engine.prefill` makes them (small real arrays, under the mesh: their types
        # carry it), so the program takes its arrays
        packed = engine._put(pack_prompts(np.zeros((rows, bucket), np.int32), np.ones(rows, np.int32),
                                          SamplingArrays.from_params([sampling.SamplingParams()] * rows)))
        lower = partial(engine._prefill_jit.lower, engine.layout.abstract_params, packed, sampled=None)
        compiled = engine._programs.prepare(("prefill", rows, bucket), lower, engine._store)
        slots = engine._put(np.arange(rows, dtype=np.int32))
        lower = partial(_lower_insert, engine, compiled, state, slots)
        # a prefill's K/V are `bucket` long (the insert's key, as `Engine.insert` reads it off the K/V)
        engine._programs.prepare(("insert", rows, bucket), lower, engine._store)


def _lower_insert(engine, prefill, state, slots) -> "jax.stages.Lowered":
    """The insert of `prefill`'s result, its types read off the prefill's program (not traced again)."""
    prefix = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), prefill.out_info)
    return engine._insert_jit.lower(prefix, layout_of(state), slots)


def prepare_decode(engine, state, n_steps: int, sampled: bool, rows: int) -> None:
    """A decode call of `n_steps` steps over the first `rows` slots of `state`."""
    _read_failed_stops_here(engine)
    with jax.set_mesh(engine.mesh):
        live = engine._put(np.ones(state.tokens.shape[0], bool))
        lower = partial(engine._steps_jit.lower, engine.layout.abstract_params, layout_of(state), live, n_steps=n_steps,
                        sampled=sampled, active=rows)
        engine._programs.prepare(("decode", n_steps, sampled, rows), lower, engine._store)
