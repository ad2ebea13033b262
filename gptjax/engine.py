"""The engine: prefill, insert, generate over slots, and the notebook API built on them.

The interface a server drives (JetStream's shape):
    state = engine.new_state()                                # an empty cache with `max_slots` slots
    prefix = engine.prefill(tokens, lengths, sampling)        # prompts -> their K/V and first tokens
    state = engine.insert(prefix, state, slots)               # into free slots
    state, tokens, logprobs = engine.generate_steps(state, n) # n decode steps for every slot
`engine.generate(prompts, ...)` runs all of it as one compiled program for a batch of prompts.
Every call is a jitted SPMD program over the engine's mesh; the state is donated, so the cache is updated in
place. The engine knows nothing of requests, queues or gRPC.

Layout: on one stage the layers run unrolled, one after the other, each split over `tensor` by XLA; with
`stage > 1` they run through `gptjax.pipeline` (each stage its own layers and cache, micro-batched). Rows
(prompts, slots) are split over `data`; a batch that does not divide it is padded inside with copies of a row.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from gptjax import cache as kv_cache
from gptjax import distributed, kernels, pipeline, sampling, sharding
from gptjax.config import EngineConfig, ModelConfig, preset
from gptjax.model import GPT, Block, init_params


class SamplingArrays(NamedTuple):
    """Per-row sampling parameters, as device arrays."""

    temperature: jax.Array  # [n] float32, 0 = greedy
    top_k: jax.Array  # [n] int32, 0 = off
    top_p: jax.Array  # [n] float32, 1 = off
    seed: jax.Array  # [n] uint32

    @classmethod
    def from_params(cls, params: Sequence[sampling.SamplingParams]) -> "SamplingArrays":
        return cls(np.array([p.temperature for p in params], np.float32),
                   np.array([p.top_k for p in params], np.int32),
                   np.array([p.top_p for p in params], np.float32),
                   np.array([int(p.seed) % 2**32 for p in params], np.uint32))


class Prefix(NamedTuple):
    """What prefill hands to insert: the prompts' K/V and each prompt's first generated token."""

    kv: list  # per layer (k, v) [n', bucket_len, heads, head_dim], or a StagedKV; n' >= n (padding rows)
    lengths: jax.Array  # [n]
    first_tokens: jax.Array  # [n]
    first_logprobs: jax.Array  # [n]
    sampling: SamplingArrays


class DecodeState(NamedTuple):
    """Everything a decode step needs for every slot; lives on device between steps."""

    cache: list  # per layer (k, v), [slots, max_seq, heads, head_dim], or a StagedKV (stage > 1)
    tokens: jax.Array  # [slots] the token to feed next
    positions: jax.Array  # [slots] the position that token takes
    sampling: SamplingArrays


@dataclass
class GenerationResult:
    prompt_ids: list[int]
    output_ids: list[int]  # the new tokens only
    text: str
    finish_reason: str  # "stop" (a stop token was produced, and is included) or "length"
    logprobs: list[float] | None = None


def bucket_length(n: int, minimum: int, maximum: int) -> int:
    """Pad prompt lengths to powers of two (at least `minimum`, at most `maximum`), so few shapes compile."""
    return min(max(minimum, 1 << max(0, math.ceil(math.log2(max(n, 1))))), maximum)


def layout_of(tree):
    """Arrays (or ShapeDtypeStructs) -> ShapeDtypeStructs with their shardings: what compiling ahead needs."""
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=getattr(a, "sharding", None)), tree)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


class Engine:
    def __init__(self, config: ModelConfig, params, engine_config: EngineConfig | None = None, mesh=None,
                 tokenizer=None):
        self.config = config
        self.engine_config = engine_config or EngineConfig()
        self.mesh = mesh if mesh is not None else sharding.make_mesh(devices=jax.devices()[:1])
        self.layout = sharding.mesh_shape(self.mesh)
        sharding.check_layout(config, self.layout)
        self.attention = self.engine_config.attention or kernels.default_impl()
        if not sharding.in_layout(config, params, self.mesh):
            params = sharding.place_params(config, params, self.mesh)
        self.params = params
        self._tokenizer = tokenizer
        self._model = GPT(config, vocab_rows=sharding.padded_vocab(config, self.layout.tensor))
        self._prefill_jit = jax.jit(self._prefill, static_argnums=(4,))
        self._insert_jit = jax.jit(self._insert, donate_argnums=(1,))
        self._steps_jit = jax.jit(self._decode_steps, static_argnums=(2, 3, 5), donate_argnums=(1,))
        self._generate_jit = jax.jit(self._generate, static_argnums=(3, 4, 6))

    # ---- construction -------------------------------------------------------------------------------
    @classmethod
    def from_preset(cls, name: str = "gpt2-tiny", *, dtype: str | None = None, mesh=None,
                    engine_config: EngineConfig | None = None, seed: int | None = None) -> "Engine":
        """A preset model with random weights from a fixed seed (the same tokens on every run)."""
        config = preset(name)
        if dtype:
            config = config.replace(dtype=dtype)
        mesh = mesh if mesh is not None else sharding.make_mesh(devices=jax.devices()[:1])
        sharding.check_layout(config, sharding.mesh_shape(mesh))
        init = jax.jit(lambda: sharding.arrange_params(config, init_params(config, seed), mesh),
                       out_shardings=sharding.param_shardings(config, mesh))
        return cls(config, init(), engine_config, mesh)

    @classmethod
    def load(cls, checkpoint_dir: str | Path, *, mesh=None, engine_config: EngineConfig | None = None,
             dtype: str | None = None) -> "Engine":
        """A converted checkpoint folder (config.json + orbax params/), restored into the mesh's layout."""
        from checkpoints.folder import load_checkpoint

        mesh = mesh if mesh is not None else sharding.make_mesh(devices=jax.devices()[:1])
        config, params = load_checkpoint(checkpoint_dir, mesh, dtype=dtype)
        return cls(config, params, engine_config, mesh)

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from gptjax.tokenizer import default_tokenizer

            self._tokenizer = default_tokenizer()
        return self._tokenizer

    @property
    def max_seq_len(self) -> int:
        return self.engine_config.seq_len(self.config)

    # ---- the pure functions (traced inside jit) -----------------------------------------------------
    @property
    def staged(self) -> bool:
        """Layer parallelism: the layers split over `stage > 1` pipeline stages."""
        return self.layout.stage > 1

    def _hidden(self, params, tokens, positions, attend):
        return self._model.apply({"params": params}, tokens, positions, attend)

    def _embed(self, params, tokens, positions):
        return self._model.apply({"params": params}, tokens, positions, method=GPT.embed)

    def _logits(self, params, x):
        return self._model.apply({"params": params}, x, method=GPT.logits)

    def _block(self, layer_params, h, attend):
        return Block(self.config).apply({"params": layer_params}, h, attend)

    def _pad_rows(self, tree, n: int):
        """Pad every leaf's first axis from n to a multiple of `data`, with copies of the last row."""
        to = _round_up(n, self.layout.data)
        if to == n:
            return tree
        return jax.tree.map(lambda a: jnp.concatenate([a, jnp.repeat(a[-1:], to - n, axis=0)]), tree)

    def _prefill(self, params, tokens, lengths, samp: SamplingArrays, sampled: bool | None = None,
                 cache_shape: tuple[int, int] | None = None) -> Prefix:
        """`cache_shape` (slots, max_seq), one stage only: each layer's K/V comes out already padded to a
        decode cache, so the prompts' K/V (16 GB for a 6.7B model at batch 256, 128 tokens) is never held
        beside the cache for every layer at once."""
        n = tokens.shape[0]
        tokens, lengths, samp = self._pad_rows((tokens, lengths, samp), n)
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)

        def as_cache(a):
            if cache_shape is None:
                return a
            a = jnp.pad(a, ((0, cache_shape[0] - a.shape[0]), (0, cache_shape[1] - a.shape[1]), (0, 0), (0, 0)))
            return jax.lax.with_sharding_constraint(a, sharding.cache_sharding(self.mesh))

        def attend_to(lengths):
            def attend(layer, q, k, v):
                return kernels.prefill_attention(q, k, v, lengths, self.attention), (as_cache(k), as_cache(v))
            return attend

        def last_token(x, lengths):  # only the last token's logits are needed
            return jnp.take_along_axis(x, (lengths - 1)[:, None, None], axis=1)[:, 0]

        if self.staged:
            kv = kv_cache.init_cache(self.config, tokens.shape[0], tokens.shape[1], self.layout.stage)
            kv = jax.lax.with_sharding_constraint(kv, sharding.cache_sharding(self.mesh))
            last, kv = pipeline.run(self.mesh, lambda p, h, _, lengths: self._block(p, h, attend_to(lengths)),
                                    params["stages"], self._embed(params, tokens, positions), kv, lengths,
                                    last_token)
        else:
            x, kv = self._hidden(params, tokens, positions, attend_to(lengths))
            last = last_token(x, lengths)
        logits = self._logits(params, last)
        keys = lambda: sampling.row_keys(samp.seed, lengths)
        first = sampling.sample(logits, samp.temperature, samp.top_k, samp.top_p, keys, sampled)
        real = lambda a: a[:n]
        return Prefix(kv, real(lengths), real(first), real(sampling.token_logprobs(logits, first)),
                      SamplingArrays(*map(real, samp)))

    def _insert(self, prefix: Prefix, state: DecodeState, slots) -> DecodeState:
        put = lambda dst, src: dst.at[slots].set(src.astype(dst.dtype))
        return DecodeState(
            cache=kv_cache.write_prefix(state.cache, prefix.kv, slots),
            tokens=put(state.tokens, prefix.first_tokens),
            positions=put(state.positions, prefix.lengths),
            sampling=SamplingArrays(*(put(d, s) for d, s in zip(state.sampling, prefix.sampling))),
        )

    def _decode_step(self, params, state: DecodeState, sampled: bool | None = None):
        pos = state.positions
        cache = state.cache

        def attend_to(layer_kv, pos):
            def attend(layer, q, k, v):
                new_kv = kv_cache.write_token(layer_kv(layer), k[:, 0], v[:, 0], pos)
                return kernels.decode_step_attention(q[:, 0], *new_kv, pos + 1, self.attention)[:, None], new_kv
            return attend

        if self.staged:
            x = self._embed(params, state.tokens[:, None], pos[:, None])
            last, new_cache = pipeline.run(
                self.mesh, lambda p, h, kv, pos: self._block(p, h, attend_to(lambda _: kv, pos)),
                params["stages"], x, cache, pos, lambda h, _: h[:, 0])
        else:
            x, new_cache = self._hidden(params, state.tokens[:, None], pos[:, None],
                                        attend_to(cache.__getitem__, pos))
            last = x[:, 0]
        logits = self._logits(params, last)
        samp = state.sampling
        keys = lambda: sampling.row_keys(samp.seed, pos + 1)
        tokens = sampling.sample(logits, samp.temperature, samp.top_k, samp.top_p, keys, sampled)
        # a slot at position 0 holds no sequence (prompts are never empty): it stays there, reading one key;
        # a finished one keeps stepping until it is reused or parked, clamped inside the cache
        next_pos = jnp.where(pos > 0, jnp.minimum(pos + 1, kv_cache.cache_len(state.cache) - 1), 0)
        new_state = DecodeState(new_cache, tokens, next_pos, samp)
        return new_state, tokens, sampling.token_logprobs(logits, tokens)

    def _decode_steps(self, params, state: DecodeState, n_steps: int, sampled: bool | None = None, live=None,
                      active: int | None = None):
        """n_steps for the first `active` slots (default all); the cache stays whole, written in place."""
        slots = state.tokens.shape[0]
        if live is not None:  # park the slots no sequence holds, so they stop reading their stale K/V
            state = state._replace(positions=jnp.where(live, state.positions, 0))
        active = active or slots
        head = lambda a: a[:active]
        run = state if active == slots else DecodeState(state.cache, head(state.tokens), head(state.positions),
                                                          SamplingArrays(*map(head, state.sampling)))

        def body(i, carry):
            run, tokens, logprobs = carry
            run, t, lp = self._decode_step(params, run, sampled)
            return run, tokens.at[i].set(t), logprobs.at[i].set(lp)

        init = (run, jnp.zeros((n_steps, active), jnp.int32), jnp.zeros((n_steps, active), jnp.float32))
        run, tokens, logprobs = jax.lax.fori_loop(0, n_steps, body, init) if n_steps else init
        if active < slots:
            tail = lambda a: jnp.pad(a, ((0, 0), (0, slots - active)))
            tokens, logprobs = tail(tokens), tail(logprobs)
            run = state._replace(cache=run.cache, tokens=state.tokens.at[:active].set(run.tokens),
                                 positions=state.positions.at[:active].set(run.positions))
        return run, self._replicated(tokens), self._replicated(logprobs)

    def decode_buckets(self, slots: int | None = None) -> list[int]:
        """The row counts a decode call of a state with `slots` slots runs at (`generate_steps` picks the least
        that covers the highest live slot): powers of two from 2, then all. One stage and one data shard only;
        otherwise always all. Powers of four compiled fewer programs, but ran 64 live slots at 128 rows: an
        8-step call of the 345M model took 21.9 ms there against 17.7 ms at 64 rows (H100)."""
        rows = self._state_rows(slots or self.engine_config.max_slots)
        if self.layout.data > 1 or self.staged:
            return [rows]
        buckets = [2]
        while buckets[-1] * 2 < rows:
            buckets.append(buckets[-1] * 2)
        return buckets + [rows] if buckets[-1] < rows else buckets

    def _replicated(self, x):
        """New tokens end replicated, so every process (process 0 in particular) can read them."""
        return jax.lax.with_sharding_constraint(x, sharding.replicated(self.mesh))

    def _generate(self, params, tokens, lengths, n_new: int, cache_len: int, samp: SamplingArrays,
                  sampled: bool):
        n = tokens.shape[0]
        tokens, lengths, samp = self._pad_rows((tokens, lengths, samp), n)
        rows, slots = tokens.shape[0], self._state_rows(tokens.shape[0])
        if self.staged:
            prefix = self._prefill(params, tokens, lengths, samp, sampled)
            state = self._insert(prefix, self._empty_state(slots, cache_len), jnp.arange(rows))
        else:  # the prefill's K/V is the cache; the extra slots start parked (position 0)
            prefix = self._prefill(params, tokens, lengths, samp, sampled, cache_shape=(slots, cache_len))
            pad = lambda a, mode="constant": jnp.pad(a, (0, slots - rows), mode=mode)
            state = DecodeState(prefix.kv, pad(prefix.first_tokens), pad(prefix.lengths),
                                SamplingArrays(*(pad(a, "edge") for a in prefix.sampling)))
        _, steps, step_logprobs = self._decode_steps(params, state, n_new - 1, sampled)
        steps, step_logprobs = steps[:, :rows], step_logprobs[:, :rows]
        out = jnp.concatenate([prefix.first_tokens[:, None], steps.T], axis=1)[:n]
        logprobs = jnp.concatenate([prefix.first_logprobs[:, None], step_logprobs.T], axis=1)[:n]
        return self._replicated(out), self._replicated(logprobs)

    def _state_rows(self, rows: int) -> int:
        """Slots of a decode state for `rows` sequences: a multiple of `data`, at least two per device. With one
        row XLA rewrites every matmul as multiply and reduce kernels that reach well under half the memory
        bandwidth of a GEMM (345M batch-1 decode on an H100: 1.50 ms/token with one row, 0.96 with two)."""
        return _round_up(max(rows, 2 * self.layout.data), self.layout.data)

    def _empty_state(self, slots: int, max_seq: int) -> DecodeState:
        zeros_i = jnp.zeros((slots,), jnp.int32)
        samp = SamplingArrays(jnp.zeros((slots,), jnp.float32), zeros_i, jnp.ones((slots,), jnp.float32),
                              jnp.zeros((slots,), jnp.uint32))
        cache = kv_cache.init_cache(self.config, slots, max_seq, self.layout.stage)
        cache = jax.lax.with_sharding_constraint(cache, sharding.cache_sharding(self.mesh))
        return DecodeState(cache, zeros_i, zeros_i, samp)

    # ---- the serving interface ----------------------------------------------------------------------
    def new_state(self, slots: int | None = None) -> DecodeState:
        """An empty decode state; the slot count is rounded up to a multiple of `data`, and to at least two
        per device (extra slots idle)."""
        slots = self._state_rows(slots or self.engine_config.max_slots)
        make = partial(self._empty_state, slots, self.max_seq_len)
        layout = jax.tree.map(lambda x: sharding.cache_sharding(self.mesh) if x.ndim >= 4
                              else sharding.slots_sharding(self.mesh), jax.eval_shape(make))
        return jax.jit(make, out_shardings=layout)()

    def _put(self, x, dtype=None):
        """Host values (the same on every process) -> device arrays the jitted calls take."""
        return distributed.to_global(np.asarray(x, dtype), self.mesh)

    def prefill(self, tokens: np.ndarray, lengths: np.ndarray, samp: SamplingArrays) -> Prefix:
        """tokens [n, bucket_len] right-padded int32, lengths [n]. Whether any row samples is decided on the
        device (one program per shape, whatever the requests' temperatures)."""
        with jax.set_mesh(self.mesh):  # arrays made here carry the mesh in their types (one program per shape)
            samp = SamplingArrays(*(a if isinstance(a, jax.Array) else self._put(a) for a in samp))
            return self._prefill_jit(self.params, self._put(tokens, np.int32), self._put(lengths, np.int32), samp,
                                     None)

    def insert(self, prefix: Prefix, state: DecodeState, slots: np.ndarray) -> DecodeState:
        with jax.set_mesh(self.mesh):
            return self._insert_jit(prefix, state, self._put(slots, np.int32))

    def generate_steps(self, state: DecodeState, n_steps: int, sampled: bool | None = None, live=None):
        """n decode steps for every slot -> (state, tokens [n_steps, slots], logprobs [n_steps, slots]);
        the tokens and logprobs are replicated (read them with `distributed.to_host`).

        `sampled=False` promises every live slot is greedy (a cheaper program); None decides on device.
        `live` (bool per slot, None: all) names the slots that hold a sequence; the others are parked at
        position 0 until an insert reuses them. A finished slot left stepping reads its whole stale context
        every step: with 256 slots of 640 positions, 16 GB per step for the 345M model. Only the first
        `decode_buckets` rows that cover the highest live slot run, so keep live slots low.
        """
        rows = state.tokens.shape[0]
        live = np.ones(rows, bool) if live is None else np.pad(np.asarray(live, bool), (0, rows - len(live)))
        # only the slots up to the highest live one run (a server of 256 slots serving one request steps 2)
        highest = int(np.flatnonzero(live)[-1]) if live.any() else 0
        active = next(b for b in self.decode_buckets(rows) if b > highest)
        with jax.set_mesh(self.mesh):  # the kernels' dispatch reads it to run per shard
            return self._steps_jit(self.params, state, n_steps, sampled, self._put(live), active)

    def prefill_bucket(self, prompt_len: int) -> int:
        return bucket_length(prompt_len, self.engine_config.min_prefill_bucket, self.max_seq_len)

    def prefill_buckets(self) -> list[int]:
        """Every length `prefill_bucket` pads to."""
        return sorted({self.prefill_bucket(1 << k) for k in range(self.max_seq_len.bit_length() + 1)})

    def prefill_rows(self, bucket: int, slots: int | None = None) -> list[int]:
        """The row counts a server prefills prompts of this bucket in: powers of two up to the slots and to
        `max_prefill_tokens` (one row at least). A burst runs as prefills of the largest, then one of the least
        that holds the rest; every one is compiled before serving (rows x bucket shapes, a bounded set)."""
        slots = slots or self.engine_config.max_slots
        by_tokens = self.engine_config.max_prefill_tokens // bucket
        most = min(1 << (slots - 1).bit_length(), 1 << max(by_tokens.bit_length() - 1, 0))
        return [1 << k for k in range(most.bit_length())]

    def compile_prefill(self, rows: int, bucket: int, state: DecodeState) -> None:
        """Compile `prefill` of `rows` prompts padded to `bucket` tokens, and `insert` of its result into a state
        laid out as `state` (arrays or ShapeDtypeStructs), without running either: later calls of those shapes
        start at once. Any thread may call it (compiles of several shapes overlap)."""
        with jax.set_mesh(self.mesh):
            # the arguments are made as `prefill` makes them (small real arrays, under the mesh: their types
            # carry it), so the jit's own cache gets the program
            tokens, lengths = self._put(np.zeros((rows, bucket), np.int32)), self._put(np.ones(rows, np.int32))
            samp = SamplingArrays(*map(self._put, SamplingArrays.from_params([sampling.SamplingParams()] * rows)))
            compiled = self._prefill_jit.lower(self.params, tokens, lengths, samp, None).compile()
            prefix = jax.eval_shape(self._prefill, self.params, tokens, lengths, samp)
            prefix = jax.tree.map(lambda a, sharding: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding),
                                  prefix, compiled.output_shardings)
            self._insert_jit.lower(prefix, layout_of(state), self._put(np.arange(rows, dtype=np.int32))).compile()

    def compile_decode(self, state: DecodeState, n_steps: int, sampled: bool, active: int) -> None:
        """Compile `generate_steps` of `n_steps` steps over the first `active` slots (a `decode_buckets` entry)
        of a state laid out as `state`, without running it; any thread may call it."""
        with jax.set_mesh(self.mesh):
            live = self._put(np.ones(state.tokens.shape[0], bool))
            self._steps_jit.lower(self.params, layout_of(state), n_steps, sampled, live, active).compile()

    # ---- the notebook API ---------------------------------------------------------------------------
    def encode_prompts(self, prompts) -> list[list[int]]:
        """Texts or token-id lists (or one of either) -> token-id lists, checked against the model."""
        if isinstance(prompts, str) or (isinstance(prompts, Sequence) and prompts
                                        and isinstance(prompts[0], (int, np.integer))):
            prompts = [prompts]
        ids = [self.tokenizer.encode(p) if isinstance(p, str) else [int(t) for t in p] for p in prompts]
        for i, row in enumerate(ids):
            if not row:
                raise ValueError(f"prompt {i} is empty")
            bad = [t for t in row if not 0 <= t < self.config.vocab_size]
            if bad:
                raise ValueError(f"prompt {i}: token id {bad[0]} is outside the vocabulary [0, {self.config.vocab_size})")
        return ids

    def generate(self, prompts, max_new_tokens: int | None = None, *, temperature: float | None = None,
                 top_k: int | None = None, top_p: float | None = None, seed: int | Sequence[int] = 0,
                 greedy: bool = False, stop_token_ids: Sequence[int] | None = None,
                 return_logprobs: bool = False) -> list[GenerationResult]:
        """Complete a batch of prompts (texts or token-id lists) in one compiled program.

        Sampling defaults come from the engine config; `greedy=True` (or temperature 0) takes the argmax.
        Generation stops at `max_new_tokens` or after a stop token (default: end-of-text; `[]` for none).
        """
        ec = self.engine_config
        ids = self.encode_prompts(prompts)
        n_new = ec.max_new_tokens if max_new_tokens is None else int(max_new_tokens)
        if n_new < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {n_new}")
        longest = max(len(r) for r in ids)
        if longest + n_new > self.max_seq_len:
            raise ValueError(f"prompt length {longest} + max_new_tokens {n_new} exceeds the model's "
                             f"{self.max_seq_len} positions")
        seeds = [seed] * len(ids) if isinstance(seed, (int, np.integer)) else list(seed)
        if len(seeds) != len(ids):
            raise ValueError(f"got {len(seeds)} seeds for {len(ids)} prompts")
        params = [sampling.SamplingParams(
            temperature=0.0 if greedy else (ec.temperature if temperature is None else float(temperature)),
            top_k=ec.top_k if top_k is None else int(top_k), top_p=ec.top_p if top_p is None else float(top_p),
            seed=int(s)) for s in seeds]
        stops = {ec.eos_token_id} if stop_token_ids is None else {int(t) for t in stop_token_ids}

        bucket = self.prefill_bucket(longest)
        tokens = np.zeros((len(ids), bucket), np.int32)
        for i, row in enumerate(ids):
            tokens[i, : len(row)] = row
        lengths = np.array([len(r) for r in ids], np.int32)
        cache_len = min(self.max_seq_len, max(bucket, _round_up(bucket + n_new, 64)))
        samp = SamplingArrays(*map(self._put, SamplingArrays.from_params(params)))
        with jax.set_mesh(self.mesh):
            out, logprobs = self._generate_jit(self.params, self._put(tokens), self._put(lengths), n_new, cache_len,
                                               samp, any(p.temperature > 0 for p in params))
        out, logprobs = distributed.to_host(out), distributed.to_host(logprobs)

        results = []
        for i, row in enumerate(ids):
            new = out[i].tolist()
            stop_at = next((j for j, t in enumerate(new) if t in stops), None)
            if stop_at is not None:
                new = new[: stop_at + 1]
            results.append(GenerationResult(
                prompt_ids=row, output_ids=new, text=self.tokenizer.decode(new),
                finish_reason="stop" if stop_at is not None else "length",
                logprobs=logprobs[i, : len(new)].tolist() if return_logprobs else None))
        return results

