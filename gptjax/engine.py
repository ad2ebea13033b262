"""The engine: jitted prefill, insert and decode steps over slots, behind the interface a server drives
(`gptjax.engine_api.ServingEngine`; shapes planned by `gptjax.planning`, programs prepared by `gptjax.warmup`);
`engine.generate` (`gptjax.generate`) runs prefill and every decode step as one program. Every call is a jitted
SPMD program over the engine's mesh; the state is donated, so the cache is updated in place. How parameters and
cache sit on the mesh and how the layers run over them (unrolled, or through pipeline stages) is the `layout`
(`gptjax.layout`); a decode step's layers are `gptjax.decode_block`'s (`decode_matmuls`). Rows are split over
`data`; a batch that does not divide it is padded inside with copies of a row."""

from __future__ import annotations

from concurrent.futures import Future
from functools import cached_property, partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from gptjax import compile_cache, decode_block, distributed, kernels, planning, sampling, sharding, warmup
from gptjax.checkpoint import open_checkpoint, restore_in_background
from gptjax.config import EngineConfig, ModelConfig, engine_config_of, preset
from gptjax.engine_api import DecodeState, Prefix, SamplingArrays, layout_of, pack_prompts, unpack_prompts
from gptjax.generate import GenerationResult, generate
from gptjax.layout import layout_for
from gptjax.model import GPT, Block
from gptjax.planning import PlannedShapes, ShapePlan, round_up
from gptjax.tokenizer import default_tokenizer, folder_tokenizer

__all__ = ["DecodeState", "Engine", "GenerationResult", "Prefix", "SamplingArrays", "layout_of"]


def _last_token(x, lengths):
    """Each prompt's last real position of x [n, seq, hidden] (only its logits are needed)."""
    return jnp.take_along_axis(x, (lengths - 1)[:, None, None], axis=1)[:, 0]


def _pad_end(a, to: int, mode: str = "constant"):
    """a's first axis grown to `to` rows: zeros, or with mode "edge" copies of its last row."""
    return jnp.pad(a, [(0, to - a.shape[0])] + [(0, 0)] * (a.ndim - 1), mode=mode)


class Engine(PlannedShapes):
    def __init__(self, config: ModelConfig, params, engine_config: EngineConfig | None = None, mesh=None,
                 tokenizer=None):
        self.config = config
        self.engine_config = ec = engine_config_of(engine_config)
        self.mesh = sharding.default_mesh(mesh)
        self.layout = layout_for(config, self.mesh)
        self.attention = ec.attention or kernels.default_impl()
        if self.attention == "cudnn" and (config.dtype == "float32" or not kernels.on_gpu()):  # else a late traceback
            raise ValueError("attention 'cudnn' runs only on a GPU, in float16 or bfloat16: choose xla or pallas")
        self.decode_matmuls = decode_block.choose(ec.decode_matmuls, config, self.mesh)
        params = params if isinstance(params, Future) or self.layout.holds(params) else self.layout.place(params)
        self._params = params if isinstance(params, Future) else decode_block.fold_layer_norms(params)
        self._tokenizer = tokenizer
        self._model = GPT(config, vocab_rows=self.layout.vocab_rows)
        self.plan = ShapePlan(self.max_seq_len, ec.min_prefill_bucket, ec.max_prefill_tokens, ec.max_slots,
                              self.layout.shape.data, self.layout.leading_rows)
        self._prefill_jit = jax.jit(self._prefill_packed, static_argnames=("sampled",))
        self._insert_jit = jax.jit(self._insert, donate_argnames=("state",))
        self._steps_jit = jax.jit(self._decode_steps, static_argnames=("n_steps", "sampled", "active"),
                                  donate_argnames=("state",))
        self._generate_jit = jax.jit(self._generate, static_argnames=("n_new", "cache_len", "sampled"))
        self._programs = compile_cache.Programs()  # the serving programs compiled (or loaded) at warm-up

    # ---- construction -------------------------------------------------------------------------------
    @classmethod
    def from_preset(cls, name: str = "gpt2-tiny", *, dtype: str | None = None, mesh=None,
                    engine_config: EngineConfig | None = None, seed: int | None = None) -> "Engine":
        """A preset model with random weights from a fixed seed (the same tokens on every run)."""
        config = preset(name)
        if dtype:
            config = config.replace(dtype=dtype)
        layout = layout_for(config, sharding.default_mesh(mesh))
        return cls(config, layout.random_params(seed), engine_config, layout.mesh)

    @classmethod
    def load(cls, checkpoint_dir: str | Path, *, mesh=None, engine_config: EngineConfig | None = None,
             dtype: str | None = None) -> "Engine":
        """A converted checkpoint folder (config.json + orbax params/), restored into the mesh's layout: checked
        now, read on a thread of its own (one process), so that a server's programs compile meanwhile."""
        mesh, tokenizer = sharding.default_mesh(mesh), folder_tokenizer(checkpoint_dir)
        config, restore = open_checkpoint(checkpoint_dir, mesh, dtype=dtype)
        return cls(config, restore_in_background(restore) if jax.process_count() == 1 else restore(),
                   engine_config_of(engine_config).ending_at(tokenizer), mesh, tokenizer)

    @classmethod
    def from_pretrained(cls, model_id: str, **kw) -> "Engine":
        """A Hugging Face Hub model of GPT-2 architecture (`gpt2`, `org/name@revision`), fetched and converted
        the first time; `kw` as for `load`."""
        from gptjax.hub import pretrained_folder

        return cls.load(pretrained_folder(model_id), **kw)

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = default_tokenizer()
        return self._tokenizer

    @property
    def params(self):
        """The weights in this layout, each LayerNorm folded into the product after it (`decode_block`). While a
        checkpoint loads (`load`: a Future), the warm-up compiles against `layout.abstract_params`; the first call
        that runs a program waits for the weights here."""
        if isinstance(self._params, Future):
            self._params = decode_block.fold_layer_norms(self._params.result())
        return self._params

    @property
    def max_seq_len(self) -> int:
        return self.engine_config.seq_len(self.config)

    def model_params(self):
        """The parameters as the model's own tree (per layer, `vocab_size` rows), as checkpoints store them: the
        same model as the one loaded, with its LayerNorms folded (`decode_block.fold_layer_norms`)."""
        return self.layout.model_tree(self.params)

    # ---- the pure functions (traced inside jit) -----------------------------------------------------
    def _embed(self, params, tokens, positions):
        return self._model.apply({"params": params}, tokens, positions, method=GPT.embed)

    def _logits(self, params, x):
        return self._model.apply({"params": params}, x, method=GPT.logits)

    def _block(self, layer_params, h, attend):
        return Block(self.config).apply({"params": layer_params}, h, attend)

    def _pad_rows(self, tree, n: int):
        """Pad every leaf's first axis from n to a multiple of `data`, with copies of the last row."""
        to = round_up(n, self.layout.shape.data)
        return tree if to == n else jax.tree.map(partial(_pad_end, to=to, mode="edge"), tree)

    def _prefill(self, params, tokens, lengths, samp: SamplingArrays, sampled: bool | None = None,
                 cache_shape: tuple[int, int] | None = None) -> Prefix:
        """`cache_shape` (slots, max_seq): the K/V come out as a decode cache of that shape, each layer's grown
        as it is made, so the prompts' K/V (16 GB for a 6.7B model at batch 256, 128 tokens) is never held
        beside the cache for every layer at once."""
        n = tokens.shape[0]
        tokens, lengths, samp = self._pad_rows((tokens, lengths, samp), n)
        rows, bucket = tokens.shape
        slots, max_seq = cache_shape or (rows, bucket)
        cache = self.layout.new_cache(self.layout.prefill_cache_rows(rows, slots), max_seq)
        positions = jnp.broadcast_to(jnp.arange(bucket, dtype=jnp.int32), tokens.shape)

        def layer(layer_params, h, layer_kv, lengths):
            def attend(_, qkv):
                grown = (self.layout.fit_kv(qkv[:, :, 1], layer_kv[0]), self.layout.fit_kv(qkv[:, :, 2], layer_kv[1]))
                return kernels.prefill_attention(qkv, lengths, self.attention), grown
            return self._block(layer_params, h, attend)

        last, kv = self.layout.run(params, self._embed(params, tokens, positions), cache, lengths, layer,
                                   _last_token)
        logits = self._logits(params, last)
        keys = partial(sampling.row_keys, samp.seed, lengths)
        first, first_logprobs = sampling.next_tokens(logits, samp.temperature, samp.top_k, samp.top_p, keys, sampled)
        first, first_logprobs = self._replicated((first[:n], first_logprobs[:n]))
        return Prefix(kv, lengths[:n], first, first_logprobs, SamplingArrays(*(a[:n] for a in samp)))  # process 0 reads

    def _prefill_packed(self, params, packed, sampled: bool | None = None) -> Prefix:
        """`_prefill` of `pack_prompts`'s one array: the program `prefill` runs."""
        return self._prefill(params, *unpack_prompts(packed), sampled)

    def _insert(self, prefix: Prefix, state: DecodeState, slots) -> DecodeState:
        def put(dst, src):
            return dst.at[slots].set(src.astype(dst.dtype))

        return DecodeState(self.layout.write_prefix(state.cache, prefix.kv, slots),
                           put(state.tokens, prefix.first_tokens), put(state.positions, prefix.lengths),
                           SamplingArrays(*map(put, state.sampling, prefix.sampling)))

    def _decode_step(self, params, state: DecodeState, sampled: bool | None = None):
        pos = state.positions
        layer = decode_block.layer_fn(self.decode_matmuls, self.config, pos.shape[0], self.attention)
        x = self._embed(params, state.tokens[:, None], pos[:, None])
        last, cache = self.layout.run(params, x, state.cache, pos, layer, lambda h, _: decode_block.settle(h)[:, 0])
        logits = self._logits(params, last)
        samp = state.sampling
        keys = partial(sampling.row_keys, samp.seed, pos + 1)
        tokens, logprobs = sampling.next_tokens(logits, samp.temperature, samp.top_k, samp.top_p, keys, sampled)
        # a slot at position 0 holds no sequence (prompts are never empty): it stays there, reading one key;
        # a finished one keeps stepping until it is reused or parked, clamped inside the cache
        next_pos = jnp.where(pos > 0, jnp.minimum(pos + 1, self.layout.cache_len(state.cache) - 1), 0)
        return DecodeState(cache, tokens, next_pos, samp), tokens, logprobs

    def _decode_steps(self, params, state: DecodeState, live=None, *, n_steps: int, sampled: bool | None = None,
                      active: int | None = None):
        """n_steps for the first `active` slots (default all); the cache stays whole, written in place."""
        slots = state.tokens.shape[0]
        if live is not None:  # park the slots no sequence holds, so they stop reading their stale K/V
            state = state._replace(positions=jnp.where(live, state.positions, 0))
        active = active or slots
        run = state if active == slots else DecodeState(
            state.cache, state.tokens[:active], state.positions[:active],
            SamplingArrays(*(a[:active] for a in state.sampling)))

        def body(i, carry):
            run, tokens, logprobs = carry
            run, t, lp = self._decode_step(params, run, sampled)
            return run, tokens.at[i].set(t), logprobs.at[i].set(lp)

        init = (run, jnp.zeros((n_steps, active), jnp.int32), jnp.zeros((n_steps, active), jnp.float32))
        run, tokens, logprobs = jax.lax.fori_loop(0, n_steps, body, init) if n_steps else init
        if active < slots:
            tokens, logprobs = (jnp.pad(a, ((0, 0), (0, slots - active))) for a in (tokens, logprobs))
            run = state._replace(cache=run.cache, tokens=state.tokens.at[:active].set(run.tokens),
                                 positions=state.positions.at[:active].set(run.positions))
        return run, self._replicated(tokens), self._replicated(logprobs)

    def _replicated(self, x):
        """New tokens end replicated, so every process (process 0 in particular) can read them."""
        return jax.lax.with_sharding_constraint(x, sharding.replicated(self.mesh))

    def _generate(self, params, packed, n_new: int, cache_len: int, sampled: bool):
        """`complete`'s program, of `pack_prompts`'s one array."""
        tokens, lengths, samp = unpack_prompts(packed)
        n = tokens.shape[0]
        tokens, lengths, samp = self._pad_rows((tokens, lengths, samp), n)
        rows, slots = tokens.shape[0], self.plan.state_rows(tokens.shape[0])
        # the prefill's K/V become the cache; the extra slots start parked (position 0)
        prefix = self._prefill(params, tokens, lengths, samp, sampled, cache_shape=(slots, cache_len))
        state = DecodeState(self.layout.pad_slots(prefix.kv, slots), _pad_end(prefix.first_tokens, slots),
                            _pad_end(prefix.lengths, slots),
                            SamplingArrays(*(_pad_end(a, slots, "edge") for a in prefix.sampling)))
        _, steps, step_logprobs = self._decode_steps(params, state, n_steps=n_new - 1, sampled=sampled)
        out = jnp.concatenate([prefix.first_tokens[:, None], steps[:, :rows].T], axis=1)[:n]
        logprobs = jnp.concatenate([prefix.first_logprobs[:, None], step_logprobs[:, :rows].T], axis=1)[:n]
        return self._replicated(out), self._replicated(logprobs)

    # ---- the serving interface (gptjax.engine_api.ServingEngine) -------------------------------------
    def new_state(self, slots: int | None = None) -> DecodeState:
        """An empty decode state; the slot count is rounded up to a multiple of `data`, and to at least two
        per device (extra slots idle). ValueError naming the slots when it can't fit beside the weights."""
        rows = self.plan.state_rows(slots or self.engine_config.max_slots)
        planning.check_state_memory(self.config, self.layout.shape, rows, self.max_seq_len, self.mesh.local_devices,
                                    weights_held=not isinstance(self._params, Future))
        def make():
            return DecodeState.empty(self.layout.new_cache(rows, self.max_seq_len), rows)
        shardings = DecodeState.shardings(self.layout.cache_shardings(jax.eval_shape(make).cache),
                                          sharding.slots_sharding(self.mesh))
        return jax.jit(make, out_shardings=shardings)()

    def _put(self, tree):
        """Host arrays (a pytree; device arrays pass as they are) -> the jitted calls' arrays, sent by one call."""
        return distributed.to_global(tree, self.mesh)

    def prefill(self, tokens: np.ndarray, lengths: np.ndarray, samp: SamplingArrays) -> Prefix:
        """Whether any row samples is decided on the device (one program per shape, whatever the requests'
        temperatures)."""
        with jax.set_mesh(self.mesh):  # arrays made here carry the mesh in their types (one program per shape)
            packed = self._put(pack_prompts(tokens, lengths, samp))
            return self._run(("prefill", *np.shape(tokens)), self._prefill_jit, self.params, packed, sampled=None)

    def insert(self, prefix: Prefix, state: DecodeState, slots: np.ndarray) -> DecodeState:
        with jax.set_mesh(self.mesh):
            key = ("insert", prefix.first_tokens.shape[0], self.layout.cache_len(prefix.kv))
            return self._run(key, self._insert_jit, prefix, state, self._put(np.asarray(slots, np.int32)))

    def generate_steps(self, state: DecodeState, n_steps: int, sampled: bool | None = None, live=None):
        """The tokens and logprobs come back replicated (read them with `distributed.to_host`). Only the
        slots up to the highest live one run (the least `decode_buckets` entry over it), so keep live slots
        low; a finished slot left live reads its whole stale context every step."""
        rows = state.tokens.shape[0]
        live = np.ones(rows, bool) if live is None else np.pad(np.asarray(live, bool), (0, rows - len(live)))
        active = self.plan.decode_rows(int(np.flatnonzero(live)[-1]) if live.any() else 0, rows)
        with jax.set_mesh(self.mesh):  # the kernels' dispatch reads it to run per shard
            return self._run(("decode", n_steps, sampled, active), self._steps_jit, self.params, state,
                             self._put(live), n_steps=n_steps, sampled=sampled, active=active)

    def _run(self, key: tuple, jitted, *args, **static):
        """The warm-up's program of `key` (static arguments built in), else the jit (a shape not prepared)."""
        program = self._programs.get(key)
        return jitted(*args, **static) if program is None else program(*args)

    @cached_property
    def _store(self):
        """Where warm-up programs are kept (None with the cache off): the rest of EngineConfig is in no program."""
        return compile_cache.program_store(compile_cache.identity(
            self.config, self.plan, self.attention, self.decode_matmuls, self.mesh.shape,
            arrays=self.layout.abstract_params))

    def compile_prefill(self, rows: int, bucket: int, state: DecodeState) -> None:
        warmup.prepare_prefill(self, rows, bucket, state)

    def compile_decode(self, state: DecodeState, n_steps: int, sampled: bool, rows: int) -> None:
        warmup.prepare_decode(self, state, n_steps, sampled, rows)

    # ---- the notebook API ---------------------------------------------------------------------------
    generate = generate  # gptjax.generate.generate(engine, prompts, ...), as a method

    def complete(self, tokens: np.ndarray, lengths: np.ndarray, n_new: int, params) -> tuple[np.ndarray, np.ndarray]:
        """Prompts [n, bucket] right-padded to a `prefill_bucket` length, one SamplingParams per row -> (tokens
        [n, n_new], their logprobs) as host arrays, prefill and every decode step in one program."""
        cache_len = planning.generate_cache_len(tokens.shape[1], n_new, self.max_seq_len)
        with jax.set_mesh(self.mesh):
            packed = self._put(pack_prompts(tokens, lengths, SamplingArrays.from_params(params)))
            out, logprobs = self._generate_jit(self.params, packed, n_new, cache_len,
                                               any(p.temperature > 0 for p in params))
        return distributed.to_host((out, logprobs))
