"""The engine interface a server drives, and the values that cross it (JetStream's `engine_api.py` shape).

    state = engine.new_state(slots)                              # an empty KV cache of `slots` slots
    prefix = engine.prefill(tokens, lengths, sampling)           # prompts -> their K/V and first tokens
    state = engine.insert(prefix, state, slots)                  # ... into free slots
    state, tokens, logprobs = engine.generate_steps(state, n)    # n decode steps for every slot

The engine knows nothing of requests, queues or gRPC; the server knows nothing of JAX beyond reading the
arrays it is handed (`distributed.to_host`). `gptjax.engine.Engine` is the implementation; a test's fake
engine is another.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from gptjax import sampling
from gptjax.config import EngineConfig, ModelConfig


class SamplingArrays(NamedTuple):
    """Per-row sampling parameters, as (host or device) arrays."""

    temperature: jax.Array  # [n] float32, 0 = greedy
    top_k: jax.Array  # [n] int32, 0 = off
    top_p: jax.Array  # [n] float32, 1 = off
    seed: jax.Array  # [n] uint32

    @classmethod
    def from_params(cls, params: Sequence[sampling.SamplingParams]) -> "SamplingArrays":
        columns = ([p.temperature for p in params],
                   [min(p.top_k, 2**31 - 1) for p in params],  # past the vocabulary: off
                   [p.top_p for p in params],
                   [int(p.seed) % 2**32 for p in params])
        return cls(*(np.array(c, d) for c, d in zip(columns, SAMPLING_DTYPES)))


SAMPLING_DTYPES = SamplingArrays(np.float32, np.int32, np.float32, np.uint32)  # what `from_params` makes


def pack_prompts(tokens, lengths, samp: SamplingArrays) -> np.ndarray:
    """A call's host arrays (prompts [n, bucket], lengths [n], the sampling arrays [n]) as one int32 array
    [n, bucket + 5], the sampling arrays' bits as they are: one transfer where six took 0.4 ms more a call on an
    H100 (RESULTS run 37). `unpack_prompts` takes it apart inside the program."""
    columns = [np.asarray(a, d).view(np.int32) for a, d in zip(samp, SAMPLING_DTYPES)]
    return np.concatenate([np.asarray(tokens, np.int32), np.asarray(lengths, np.int32)[:, None],
                           *(c[:, None] for c in columns)], axis=1)


def unpack_prompts(packed) -> tuple[jax.Array, jax.Array, SamplingArrays]:
    """`pack_prompts`'s array [n, bucket + 5] -> (tokens [n, bucket], lengths [n], SamplingArrays), in a program."""
    bucket = packed.shape[1] - 1 - len(SAMPLING_DTYPES)
    fields = (jax.lax.bitcast_convert_type(packed[:, bucket + 1 + i], d) for i, d in enumerate(SAMPLING_DTYPES))
    return packed[:, :bucket], packed[:, bucket], SamplingArrays(*fields)


class Prefix(NamedTuple):
    """What prefill hands to insert: the prompts' K/V and each prompt's first generated token."""

    kv: object  # the cache's tree (see gptjax/cache.py), rows [n' >= n] (padding rows), bucket_len positions
    lengths: jax.Array  # [n]
    first_tokens: jax.Array  # [n]
    first_logprobs: jax.Array  # [n]
    sampling: SamplingArrays


class DecodeState(NamedTuple):
    """Everything a decode step needs for every slot; lives on device between steps."""

    cache: object  # the KV cache (see gptjax/cache.py): [slots, max_seq, heads, head_dim] per buffer
    tokens: jax.Array  # [slots] the token to feed next
    positions: jax.Array  # [slots] the position that token takes; 0: the slot holds no sequence
    sampling: SamplingArrays

    @classmethod
    def empty(cls, cache, slots: int) -> "DecodeState":
        """Every slot free (position 0) and greedy, over `cache` (inside jit)."""
        zeros_i = jnp.zeros((slots,), jnp.int32)
        samp = SamplingArrays(jnp.zeros((slots,), jnp.float32), zeros_i, jnp.ones((slots,), jnp.float32),
                              jnp.zeros((slots,), jnp.uint32))
        return cls(cache, zeros_i, zeros_i, samp)

    @classmethod
    def shardings(cls, cache, per_slot) -> "DecodeState":
        """The shardings of a state: `cache`'s for the cache, `per_slot` for every per-slot vector."""
        return cls(cache, per_slot, per_slot, SamplingArrays(*[per_slot] * len(SamplingArrays._fields)))


def abstract(a) -> jax.ShapeDtypeStruct:
    """An array (or ShapeDtypeStruct) -> its shape, dtype and sharding."""
    return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=getattr(a, "sharding", None))


def layout_of(tree):
    """Arrays (or ShapeDtypeStructs) -> ShapeDtypeStructs with their shardings: what compiling ahead needs."""
    return jax.tree.map(abstract, tree)


class ServingEngine(Protocol):
    """What the scheduler and the front end call. Rows of every array are prompts or slots; all shapes are
    static per call, and every shape a server runs comes from `prefill_bucket` / `prefill_rows` /
    `decode_buckets`, so all of them can be compiled before serving (`compile_prefill`, `compile_decode`)."""

    engine_config: EngineConfig  # slots, lengths, budgets and sampling defaults
    config: ModelConfig  # the model: vocab_size, n_positions, ...

    @property
    def max_seq_len(self) -> int:
        """Positions of a slot: prompt plus new tokens never exceed it."""

    @property
    def tokenizer(self):
        """Text <-> token ids (`encode`, `decode`, `token_bytes`, `eos_token_id`)."""

    def new_state(self, slots: int | None = None) -> DecodeState:
        """An empty decode state of at least `slots` slots (default `max_slots`): every slot free, at position
        0. The count is rounded up as the mesh needs (`tokens.shape[0]` says how many there are)."""

    def prefill(self, tokens: np.ndarray, lengths: np.ndarray, samp: SamplingArrays) -> Prefix:
        """Run prompts: tokens [n, bucket] int32 right-padded (bucket a `prefill_bucket` length), lengths [n]
        (each >= 1), samp of [n] arrays -> their K/V and first sampled tokens (`first_tokens` [n])."""

    def insert(self, prefix: Prefix, state: DecodeState, slots: np.ndarray) -> DecodeState:
        """Put prefix row i into slot slots[i] ([n] distinct ints); the other slots are untouched. `state` is
        consumed (its buffers are donated): use only the returned one."""

    def generate_steps(self, state: DecodeState, n_steps: int, sampled: bool | None = None, live=None):
        """n_steps decode steps for the live slots -> (state, tokens [n_steps, slots], logprobs [n_steps, slots]).

        `live` (bool per slot, None: all) names the slots that hold a sequence; the others are parked at
        position 0 and their outputs mean nothing. `sampled=False` promises every live slot is greedy; None
        decides on device. `state` is consumed, as in `insert`."""

    def prefill_bucket(self, prompt_len: int) -> int:
        """The padded length a prompt of `prompt_len` tokens is prefilled at."""

    def prefill_buckets(self) -> list[int]:
        """Every length `prefill_bucket` returns."""

    def prefill_rows(self, bucket: int, slots: int | None = None) -> list[int]:
        """The row counts (ascending) a prefill of this bucket runs at for a state of `slots` slots."""

    def decode_buckets(self, slots: int | None = None) -> list[int]:
        """The row counts (ascending) a decode call of a `slots`-slot state runs at."""

    def compile_prefill(self, rows: int, bucket: int, state: DecodeState) -> None:
        """Compile `prefill` of [rows, bucket] and `insert` of its result into a state laid out as `state`
        (arrays or `layout_of(state)`), running neither. Any thread may call it."""

    def compile_decode(self, state: DecodeState, n_steps: int, sampled: bool, rows: int) -> None:
        """Compile `generate_steps` of `n_steps` steps over the first `rows` slots (a `decode_buckets` entry)
        of a state laid out as `state`, running nothing. Any thread may call it."""
