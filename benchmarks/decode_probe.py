"""Where does a decode step's time go? Times one preset's generate loop under variants, one line each.

    python -m benchmarks.decode_probe --model megatron-345m --dtype float16 --batch 1,8 --decode-matmuls pallas,xla
        [--greedy-only] [--profile DIR] [--no-compile-cache]

Run it once per XLA_FLAGS setting (flags are read when JAX starts); compare lines from the same machine.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import time
from typing import NamedTuple

import numpy as np


def _greedy_only_sampling() -> None:
    """Swap the sampler for a bare argmax (and its keys for nothing), to see what sampling costs a step."""
    import jax.numpy as jnp

    from gptjax import sampling

    def argmax(logits, *rest):
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def no_keys(seeds, positions):
        return seeds

    sampling.sample, sampling.row_keys = argmax, no_keys


def _two_step_decode() -> None:
    """Store each step's K/V with XLA's scatter, then attend: the decode step before `decode_attention_append`
    took the step's qkv whole, to time one against the other."""
    from gptjax import cache, kernels

    def two_steps(qkv, layer_kv, positions, impl):
        layer_kv = cache.write_token(layer_kv, qkv[:, 1], qkv[:, 2], positions)
        return kernels.decode_step_attention(qkv[:, 0], *layer_kv, positions + 1, impl), layer_kv

    kernels.decode_step_append = two_steps


def _sort_filter() -> None:
    """The sampler's top-k / top-p filter by sorting the vocabulary on every backend, as before the GPU took the
    kernel (`kernels.filter_threshold`), to time one against the other."""
    from gptjax import kernels

    kernels.sampling_threshold = kernels.filter_threshold_reference


def _set_kernel_switches(args) -> None:
    """The module switches the kernels read as they are traced, set before any engine is made:
    `--two-loop-attention` walks every chunk of decode attention in two loops (whole blocks, then the block that
    crosses the end) as before `decode_attention.SINGLE_LOOP`; `--kernel-max-mb` moves
    `decode_block.KERNEL_MAX_BYTES`; `--early-launch start|end|off` sets `early_launch.EARLY_LAUNCH`;
    `--batch-rows` sets `decode_block.BATCH_ROWS`, `--split-k` `decode_block.SPLIT_K`."""
    import importlib

    from gptjax import decode_block
    from gptjax.kernels import early_launch

    if args.two_loop_attention:
        module = importlib.import_module("gptjax.kernels.decode_attention")  # the package's name is the function's
        module.SINGLE_LOOP = False
    if args.kernel_max_mb is not None:
        decode_block.KERNEL_MAX_BYTES = int(args.kernel_max_mb * (1 << 20))
    if args.early_launch:
        early_launch.EARLY_LAUNCH = early_launch.placement(args.early_launch)
    if args.batch_rows is not None:
        decode_block.BATCH_ROWS = args.batch_rows
    if args.split_k is not None:
        decode_block.SPLIT_K = args.split_k


def _sliced_prefill_qkv() -> None:
    """Hand the Hopper prefill kernel q, k and v sliced out of the QKV product (copies XLA makes for the kernel),
    as the engine did before the kernel read the product in place (`hopper_flash_attention_qkv`), to time one
    against the other."""
    from gptjax import kernels

    def sliced(qkv, **kw):
        return kernels.hopper_flash_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], **kw)

    kernels.hopper_flash_attention_qkv = sliced  # what prefill_attention calls on Hopper


def _per_array_puts() -> None:
    """Send host arrays to the device one `jnp.asarray` at a time and read results one `np.asarray` at a time,
    as the engine did before run 18, to time what the batched transfers save."""
    import jax
    import jax.numpy as jnp

    from gptjax import distributed

    distributed.to_global = lambda tree, mesh: jax.tree.map(jnp.asarray, tree)
    distributed.to_host = lambda tree: jax.tree.map(np.asarray, tree)


# --xla-options: short names -> XLA's debug options, given to one program through `jax.jit(compiler_options=...)`
XLA_OPTIONS = {
    "block_level": ("xla_gpu_experimental_enable_fusion_block_level_rewriter", True),
    "unroll": ("xla_gpu_command_buffer_unroll_loops", True),
    "no_split_k": ("xla_gpu_experimental_force_split_k", 1),
    "multi_output": ("xla_gpu_unsupported_enable_triton_multi_output_fusion", True),
    "exhaustive": ("xla_gpu_exhaustive_tiling_search", True),  # the GEMM autotuner tries every tiling
    "tma": ("xla_gpu_experimental_enable_triton_tma", True),  # this and the next: not in jax 0.11.2's XLA
    "dynamic_search": ("xla_gpu_experimental_enable_dynamic_dot_search_space", True),
    "cublaslt": ("xla_gpu_enable_cublaslt", True),
    "lhs": ("xla_gpu_enable_latency_hiding_scheduler", True),  # orders work around async ops (streams, below)
}


BATCH_OFF = "batch_off"  # a variant name of its own: the program traced with decode_block.BATCH_ROWS at 0
FLAX_BLOCK = "flax_block"  # one more: every decode step through the Flax block (`_flax_layer`)
F32_EPILOGUES = "f32_epilogues"  # and one more: `_f32_epilogue_block` in place of decode_block.folded_block
PREFILL_NORM = "prefill_norm"  # and one more: the prefill's layers as `_norm_kernel_block` (not the Flax block)
# the 128+-slot step (`decode_block.batch_block`) in two halves of its slots (`_halves_layer`): HALVES alone, each
# half's attention on the step's stream; with STREAMS, each half's attention kernel (which stores the step's K/V)
# on GPU stream 1, beside the other half's products; with READ_STREAMS, XLA stores the K/V on the step's stream and
# a read-only attention runs on stream 1 (no cache buffer aliased across the streams); with PIPELINED, the second
# half's products after attention wait into the next layer, so that the first half's next attention runs beside them
HALVES, STREAMS, READ_STREAMS, PIPELINED = "halves", "streams", "read_streams", "pipelined"
OWN_VARIANTS = (BATCH_OFF, FLAX_BLOCK, F32_EPILOGUES, PREFILL_NORM, HALVES, STREAMS, READ_STREAMS, PIPELINED)


class _Halves(NamedTuple):
    """A step's residual stream as two halves of its slots (`_halves_layer`), each a `decode_block.Pending`; with
    PIPELINED the second is a `_Waiting`."""
    first: object
    second: object


class _Waiting(NamedTuple):
    """A half before its products after attention, which the next layer (or `_settle_halves`) runs."""
    x: object  # the residual stream [rows, hidden] float32
    attn: object  # attention's output [rows, heads, head_dim]
    params: dict  # the layer's


def _finish(config, part):
    """A half as the next layer takes it: a `_Waiting` one's products after attention run."""
    import jax

    from gptjax import decode_block

    if not isinstance(part, _Waiting):
        return part
    return decode_block.batch_after_attention(config, part.params, part.x, part.attn,
                                              on_gpu=jax.default_backend() == "gpu")


def _settle_halves(h, settle, config):
    """`decode_block.settle` of the whole step: the halves' rows in order."""
    import jax.numpy as jnp

    if not isinstance(h, _Halves):
        return settle(h)
    return jnp.concatenate([settle(h.first), settle(_finish(config, h.second))])


def _halves_layer(config, attention, rows: int, stream: str, pipelined: bool = False):
    """`decode_block.batch_block` over the two halves of a step's slots, stage by stage (both halves' QKV, both
    attentions, both halves' products after it), each half's attention on its own rows of the cache (`first_row`).
    `stream` "" keeps every kernel on the step's stream; STREAMS puts each attention launch on GPU stream 1
    (`compute_on`), so that it may run beside the other half's products; READ_STREAMS stores the step's K/V with
    XLA on the step's stream and runs the read-only launch on stream 1. `pipelined`: the program's order is the
    first half's QKV and attention, the second half's products after its previous layer's attention, its QKV and
    attention, then the first half's products after attention (`_Halves`)."""
    import jax

    from gptjax import cache, decode_block, kernels

    half, on_gpu = rows // 2, jax.default_backend() == "gpu"

    def attend(qkv, layer_kv, pos, first_row: int):
        if stream == READ_STREAMS:
            layer_kv = cache.write_token(layer_kv, qkv[:, 1], qkv[:, 2], pos, first_row)
            read = functools.partial(kernels.decode_attention, interpret=not on_gpu, first_row=first_row)
            return _on_stream(read, qkv[:, 0], *layer_kv, pos + 1), layer_kv
        step = functools.partial(kernels.decode_step_append, impl=attention, first_row=first_row)
        return _on_stream(step, qkv, layer_kv, pos) if stream == STREAMS else step(qkv, layer_kv, pos)

    def after(p, x, attn):
        return decode_block.batch_after_attention(config, p, x, attn, on_gpu=on_gpu)

    def stage_by_stage(p, parts, layer_kv, pos):
        xs, qkvs = zip(*(decode_block.batch_qkv(config, p, part, on_gpu=on_gpu) for part in parts))
        attns = []
        for qkv, first_row in zip(qkvs, (0, half)):
            out, layer_kv = attend(qkv, layer_kv, pos[first_row:first_row + half], first_row)
            attns.append(out)
        return _Halves(*(after(p, x, a) for x, a in zip(xs, attns))), layer_kv

    def pipeline(p, parts, layer_kv, pos):
        x, qkv = decode_block.batch_qkv(config, p, parts.first, on_gpu=on_gpu)
        attn, layer_kv = attend(qkv, layer_kv, pos[:half], 0)
        x2, qkv2 = decode_block.batch_qkv(config, p, _finish(config, parts.second), on_gpu=on_gpu)
        attn2, layer_kv = attend(qkv2, layer_kv, pos[half:], half)
        return _Halves(after(p, x, attn), _Waiting(x2, attn2, p)), layer_kv

    def layer(p, h, layer_kv, pos):
        parts = h if isinstance(h, _Halves) else _Halves(h[:half], h[half:])
        return (pipeline if pipelined else stage_by_stage)(p, parts, layer_kv, pos)

    return layer


def _on_stream(fn, *args, stream: int = 1):
    """fn(*args) on GPU stream `stream` (XLA's stream annotation; other backends ignore it), its outputs in device
    memory. jax 0.10 spells it `compute_on2`, 0.11 `compute_on`, with the same keyword arguments."""
    import jax
    from jax.experimental import compute_on

    annotate = getattr(compute_on, "compute_on2", compute_on.compute_on)
    spaces = jax.tree.map(lambda _: jax.memory.Space.Device, jax.eval_shape(fn, *args))
    return annotate(compute_type=f"gpu_stream:{stream}", out_memory_spaces=spaces)(fn)(*args)


def _f32_epilogue_block(config, attention, p, h, layer_kv, pos):
    """`decode_block.folded_block` with every product's bias, GELU and residual add on its float32 sum, each
    product's output cast once where the next product or the attention reads it: so that XLA may take the add and
    the GELU into the GEMM's epilogue (the folded block rounds each product to the weights' dtype first, as Flax's
    Dense does, and at 6.7B batch 1 XLA runs the adds, the GELU and the casts as ~6 kernels of ~2 us a layer).
    RESULTS run 34: it does not; the step is 0.2% faster, its small kernels all still there."""
    import jax.numpy as jnp

    from gptjax import kernels
    from gptjax.model import ACTIVATIONS, norm_stats

    f32, dtype, eps = jnp.float32, p["qkv"]["kernel"].dtype, config.layer_norm_eps
    x = h[:, 0]

    def product(x, d, spec: str, normed: bool = False):
        acc = jnp.einsum(spec, x.astype(dtype), d["kernel"], preferred_element_type=f32)
        if normed:  # the folded LayerNorm's 1 / std (its mean is in the weights)
            rstd = norm_stats(x, eps)[1]
            acc = rstd.reshape(rstd.shape + (1,) * (acc.ndim - 2)) * acc
        return acc + d["bias"].astype(f32)

    attn, layer_kv = kernels.decode_step_append(product(x, p["qkv"], "rk,kthd->rthd", True).astype(dtype),
                                                layer_kv, pos, attention)
    x = x + product(attn, p["attn_out"], "rhd,hde->re")
    mid = ACTIVATIONS[config.activation](product(x, p["mlp_in"], "rk,kf->rf", True))
    x = x + product(mid, p["mlp_out"], "rf,fe->re")
    return x[:, None], layer_kv


def _norm_kernel_block(engine):
    """The prefill's layer (the Flax block's arithmetic on the engine's folded tree, whose LayerNorms are the
    identity's) with each LayerNorm one `residual_norm` kernel, the second also adding attention out's float32 product
    and its bias to the residual: XLA runs each as a reduction and a normalising kernel (a 256 x 128 prefill of the
    345M model on an H100, run 34's profile: ~335 us a layer of those four kernels, ~19% of the prefill)."""
    import jax
    import jax.numpy as jnp

    from gptjax.kernels.residual_norm import residual_norm
    from gptjax.model import ACTIVATIONS

    config, f32 = engine.config, jnp.float32
    interpret = jax.default_backend() != "gpu"

    def block(p, x, attend):
        dtype, shape = p["qkv"]["kernel"].dtype, x.shape  # x: [batch, seq, hidden], the float32 residual
        norm = functools.partial(residual_norm, eps=config.layer_norm_eps, out_dtype=dtype, interpret=interpret)
        flat = x.reshape(-1, shape[-1]).astype(f32)
        _, h = norm(flat)
        qkv = jnp.einsum("rk,kthd->rthd", h, p["qkv"]["kernel"]) + p["qkv"]["bias"]
        attn, state = attend(0, qkv.reshape(*shape[:2], *qkv.shape[1:]))
        out = jnp.einsum("bshd,hde->bse", attn, p["attn_out"]["kernel"], preferred_element_type=f32)
        flat, h = norm(flat, out.reshape(1, *flat.shape), p["attn_out"]["bias"])
        mid = ACTIVATIONS[config.activation](jnp.einsum("rk,kf->rf", h, p["mlp_in"]["kernel"]) + p["mlp_in"]["bias"])
        out = jnp.einsum("rf,fe->re", mid, p["mlp_out"]["kernel"]) + p["mlp_out"]["bias"]
        return (flat + out).reshape(shape), state

    return block


def _flax_layer(engine):
    """A decode step's layer as the Flax block runs it (a kernel normalising each LayerNorm's output before the
    product), as the engine's XLA path did before `decode_block.folded_block`, to time one against the other; on
    the engine's folded tree it computes the same model."""
    from gptjax import kernels

    def layer(p, h, layer_kv, pos):
        def attend(_, qkv):
            out, new_kv = kernels.decode_step_append(qkv[:, 0], layer_kv, pos, engine.attention)
            return out[:, None], new_kv
        return engine._block(p, h, attend)

    return layer


def _generate_jit(engine, variant: str | None):
    """The engine's generate program under a variant ("off", or names joined by "+": short names of `XLA_OPTIONS`,
    and this probe's own, `BATCH_OFF`, `FLAX_BLOCK`, `F32_EPILOGUES` and `PREFILL_NORM`, which change what the
    decode step or the prefill traces; None: the engine's own jit)."""
    import jax

    from gptjax import decode_block

    if variant is None:
        return engine._generate_jit
    names = [] if variant == "off" else variant.split("+")
    own = OWN_VARIANTS
    unknown = [n for n in names if n not in XLA_OPTIONS and n not in own]
    if unknown:
        raise SystemExit(f"--xla-options: {unknown} not among {sorted(XLA_OPTIONS) + list(own)} (or off)")
    if {STREAMS, READ_STREAMS, PIPELINED} & set(names) and HALVES not in names:
        raise SystemExit(f"--xla-options {variant}: {STREAMS}, {READ_STREAMS} and {PIPELINED} go with {HALVES}")
    batch_rows = 0 if BATCH_OFF in names else decode_block.BATCH_ROWS
    layer_fn = decode_block.layer_fn
    if FLAX_BLOCK in names:
        layer_fn = lambda impl, config, rows, attention: _flax_layer(engine)  # noqa: E731
    if F32_EPILOGUES in names:
        def layer_fn(impl, config, rows, attention, default=layer_fn):
            layer = default(impl, config, rows, attention)
            is_folded = isinstance(layer, functools.partial) and layer.func is decode_block.folded_block
            return functools.partial(_f32_epilogue_block, config, attention) if is_folded else layer

    if HALVES in names:
        stream = next((n for n in names if n in (STREAMS, READ_STREAMS)), "")

        def layer_fn(impl, config, rows, attention):
            on_gpu, tile = jax.default_backend() == "gpu", decode_block.BATCH_TILE
            batch = impl == "auto" and 0 < decode_block.BATCH_ROWS <= rows and rows % (2 * tile) == 0
            if not (batch and decode_block.batch_fits(config, rows // 2, on_gpu)):  # reported as the variant's error
                raise ValueError(f"{HALVES}: a step of {rows} slots under decode_matmuls {impl!r} does not run "
                                 f"batch_block in two halves of whole {tile}-row tiles")
            return _halves_layer(config, attention, rows, stream, PIPELINED in names)

    prefill_block = _norm_kernel_block(engine) if PREFILL_NORM in names else None
    settle = functools.partial(_settle_halves, settle=decode_block.settle, config=engine.config)
    patches = [(decode_block, "BATCH_ROWS", batch_rows), (decode_block, "layer_fn", layer_fn),
               (decode_block, "settle", settle)]

    @functools.wraps(engine._generate)  # its signature: the static arguments by name
    def generate(*args, **kwargs):  # the patched names and the prefill's block are read as the program is traced
        saved = [getattr(module, name) for module, name, _ in patches]
        for module, name, value in patches:
            setattr(module, name, value)
        if prefill_block:
            engine._block = prefill_block
        try:
            return engine._generate(*args, **kwargs)
        finally:
            for (module, name, _), value in zip(patches, saved):
                setattr(module, name, value)
            if prefill_block:
                del engine._block  # the class's method again

    return jax.jit(generate, static_argnames=("n_new", "cache_len", "sampled"),
                   compiler_options=dict(XLA_OPTIONS[n] for n in names if n not in own) or None)


# --sampling: engine.generate's arguments for every row (one seed: each row's own stream still differs)
SAMPLING = {"greedy": dict(greedy=True), "temperature": dict(temperature=1.0, top_k=0, top_p=1.0),
            "top-k": dict(temperature=1.0, top_k=40, top_p=1.0), "top-p": dict(temperature=1.0, top_k=0, top_p=0.9)}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="megatron-345m")
    p.add_argument("--dtype", default="float16")
    p.add_argument("--batch", default="1", help="batch sizes, comma-separated (one line each)")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=128)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--attention", default="")
    p.add_argument("--decode-matmuls", default="",
                   help="pallas | xla | both, comma-separated (one engine each; default: the engine's choice)")
    p.add_argument("--profile", help="write jax.profiler traces of the first batch size here, and summarise them")
    p.add_argument("--greedy-only", action="store_true", help="replace the sampler by a bare argmax")
    p.add_argument("--sampling", default="greedy",
                   help=f"what every row asks of the sampler, comma-separated (one line each, on one engine): "
                        f"{', '.join(SAMPLING)} (a drawing row with top-k or top-p runs the filter each step: a "
                        f"kernel, or on a GPU below 64 rows a sort; one with a temperature alone does not)")
    p.add_argument("--sort-filter", action="store_true",
                   help="the sampler's top-k / top-p filter sorts the vocabulary (not the GPU's kernel)")
    p.add_argument("--two-step-decode", action="store_true",
                   help="store each step's K/V with XLA's scatter, then attend (not in the attention kernel)")
    p.add_argument("--two-loop-attention", action="store_true",
                   help="decode attention walks whole blocks and the crossing block in two loops everywhere")
    p.add_argument("--sliced-prefill-qkv", action="store_true",
                   help="the Hopper prefill kernel takes q, k, v sliced out of the QKV product (the engine before "
                        "it read the product in place)")
    p.add_argument("--per-array-puts", action="store_true",
                   help="one jnp.asarray per host array and one np.asarray per result (the engine before run 18)")
    p.add_argument("--early-launch", choices=("start", "end", "off"),
                   help="the decode kernels issue the next kernel's launch as they start, once their loads are done, "
                        "or not at all (gptjax/kernels/early_launch.py; default: end)")
    p.add_argument("--kernel-max-mb", type=float,
                   help="with --decode-matmuls pallas: products with weights up to this many MiB run on the kernels "
                        "(default: decode_block.KERNEL_MAX_BYTES, 32), the larger ones on XLA's matmuls")
    p.add_argument("--batch-rows", type=int,
                   help="steps of at least this many slots (whole 64-row tiles) run decode_block.batch_block's "
                        "kernels under the default decode matmuls (0: never; default: decode_block.BATCH_ROWS)")
    p.add_argument("--split-k", type=int,
                   help="batch_block's MLP out is split over K in parts of at least this many (default: "
                        "decode_block.SPLIT_K, 512: 8 parts at the 345M model's K of 4096)")
    p.add_argument("--xla-options",
                   help="variants of XLA's options for the generate program, comma-separated, each 'off' or short "
                        "names of XLA_OPTIONS joined by '+': each compiled, then timed in turn in this process")
    p.add_argument("--rounds", type=int, default=1,
                   help="with --xla-options: time every variant this many times, alternating their order")
    p.add_argument("--device-time", action="store_true",
                   help="with every round, the steps' kernel time from a profiler trace (device ms per token): "
                        "free of the host's dispatch and of what else the machine runs, where the host clock "
                        "around a 16-step call moves by up to 40%% between rounds")
    p.add_argument("--hlo", help="write the optimized HLO of the generate program to this file")
    p.add_argument("--no-compile-cache", action="store_true",
                   help="compile afresh (by default a later probe of the same programs, the 6.7B model's above all, "
                        "reads them from gptjax's compilation cache)")
    args = p.parse_args()
    samplings = args.sampling.split(",")
    if not set(samplings) <= set(SAMPLING):
        p.error(f"--sampling: {sorted(set(samplings) - set(SAMPLING))} not among {', '.join(SAMPLING)}")

    from gptjax import EngineConfig, compile_cache
    from gptjax.engine import Engine

    if not args.no_compile_cache:
        compile_cache.enable()

    if args.greedy_only:
        _greedy_only_sampling()
    if args.two_step_decode:
        _two_step_decode()
    if args.sort_filter:
        _sort_filter()
    if args.per_array_puts:
        _per_array_puts()
    if args.sliced_prefill_qkv:
        _sliced_prefill_qkv()
    _set_kernel_switches(args)
    for impl in args.decode_matmuls.split(","):
        engine = Engine.from_preset(args.model, dtype=args.dtype, engine_config=EngineConfig(
            attention=args.attention, decode_matmuls=impl))
        for i, batch in enumerate(map(int, args.batch.split(","))):
            for j, sampling in enumerate(samplings):
                probe(engine, batch, argparse.Namespace(**{**vars(args), "sampling": sampling}),
                      profile=args.profile and i == j == 0 and f"{args.profile}/{impl}")
        del engine


def probe(engine, batch: int, args, profile: str | None) -> None:
    """One JSON line: the prefill and the per-token decode time of `batch` prompts on `engine`."""
    import jax

    from benchmarks.bench import median_seconds
    from benchmarks.gpu_time import gpu_busy_seconds

    prompts = np.random.default_rng(0).integers(0, 50257, (batch, args.input_len)).tolist()

    def run(n):
        return engine.generate(prompts, max_new_tokens=n, stop_token_ids=[], **SAMPLING[args.sampling])

    # the steps' time is that of a call of steps + 2 tokens less one of 2: a call of one token would leave out the
    # prefill's writes of the cache (no step reads them, and XLA drops them: 2.9 ms of a 256-slot call, RESULTS run 38)
    full_n, base_n = args.steps + 2, 2

    # each variant of XLA's options compiled first, then timed in turn, the order reversed every round: a drift
    # over the process (clocks, heat) falls on all of them alike, where one process per variant differs by up to 11%
    variants = args.xla_options.split(",") if args.xla_options else [None]
    jits = {v: _generate_jit(engine, v) for v in variants}
    first_rows, compile_s, times = {}, {}, {v: ([], []) for v in variants}
    busy = {v: [] for v in variants}  # --device-time: each round's kernel seconds a step
    busy_first = {v: [] for v in variants}  # and of the prefill with the first token
    for v in list(variants):
        engine._generate_jit = jits[v]
        try:
            first_rows[v] = run(full_n)[0].output_ids  # compiles; the tokens to compare between variants
        except Exception as e:  # an option this XLA lacks: reported, the other variants still timed
            print(json.dumps({"xla_options": v, "error": f"{type(e).__name__}: {str(e)[:300]}"}), flush=True)
            variants.remove(v)
            continue
        start = time.perf_counter()
        run(full_n)
        compile_s[v] = time.perf_counter() - start
        run(base_n)  # compiles
    for r in range(args.rounds):
        for v in variants if r % 2 == 0 else variants[::-1]:
            engine._generate_jit = jits[v]
            times[v][0].append(median_seconds(lambda: run(full_n), args.runs, 0, f"{full_n} tokens"))
            times[v][1].append(median_seconds(lambda: run(base_n), args.runs, 0, f"{base_n} tokens"))
            if args.device_time:
                full, base = (gpu_busy_seconds(lambda _, n=n: run(n), None) for n in (full_n, base_n))
                step = None if full is None else (full - base) / args.steps  # None off a GPU
                busy[v].append(step)
                busy_first[v].append(None if full is None else base - step)
    engine._generate_jit = jits[variants[0]]  # the HLO and the profile: the first variant's
    if args.hlo:
        from gptjax.engine_api import SamplingArrays, pack_prompts
        from gptjax.planning import generate_cache_len
        from gptjax.sampling import SamplingParams

        bucket = engine.prefill_bucket(args.input_len)
        packed = pack_prompts(np.zeros((batch, bucket), np.int32), np.full((batch,), args.input_len, np.int32),
                              SamplingArrays.from_params([SamplingParams()] * batch))
        cache_len = generate_cache_len(bucket, full_n, engine.max_seq_len)
        compiled = engine._generate_jit.lower(engine.params, packed, full_n, cache_len, False).compile()
        with open(args.hlo, "w") as f:
            f.write(compiled.as_text())
    if profile:
        # a short run keeps the trace small (one 128-step trace of the 345M model ended in a segfault, cause unknown)
        steps = min(args.steps, 16)
        counts, kinds = {}, {}
        long_n = steps + base_n
        for n in (base_n, long_n):  # the prefill, its cache writes and one step; the difference is `steps` steps
            run(n)
            jax.profiler.start_trace(f"{profile}/{n}")
            run(n)
            jax.profiler.stop_trace()
            counts[n], kinds[n] = kernel_summary(f"{profile}/{n}", steps, top=40 if n > base_n else 25)
        print(json.dumps({"decode_kernels_per_step": round((counts[long_n] - counts[base_n]) / steps, 1),
                          "decode_us_per_step_by_kind": {k: round((us - kinds[base_n].get(k, 0.0)) / steps, 1)
                                                         for k, us in sorted(kinds[long_n].items())}}))
    for v in variants:
        full, base = (statistics.median(t) for t in times[v])
        step = (full - base) / args.steps
        print(json.dumps({"model": args.model, "dtype": args.dtype, "batch": batch, "input_len": args.input_len,
                          "attention": engine.attention,
                          "decode_matmuls": engine.decode_matmuls,
                          "greedy_only": args.greedy_only, "sampling": args.sampling,
                          "sort_filter": args.sort_filter,
                          "two_step_decode": args.two_step_decode,
                          "per_array_puts": args.per_array_puts, "two_loop_attention": args.two_loop_attention,
                          "sliced_prefill_qkv": args.sliced_prefill_qkv,
                          "early_launch": args.early_launch, "kernel_max_mb": args.kernel_max_mb,
                          "batch_rows": args.batch_rows,
                          "xla_flags": os.environ.get("XLA_FLAGS", ""),
                          "xla_options": v or "",
                          "prefill_plus_first_ms": round((base - step) * 1e3, 3),
                          "decode_ms_per_token": round(step * 1e3, 4),
                          "rounds_decode_ms_per_token": [round((f - b) / args.steps * 1e3, 4)
                                                         for f, b in zip(*times[v])],
                          **({"device_ms_per_token": round(statistics.median(busy[v]) * 1e3, 4),
                              "rounds_device_ms_per_token": [round(b * 1e3, 4) for b in busy[v]],
                              "device_prefill_plus_first_ms": round(statistics.median(busy_first[v]) * 1e3, 3)}
                             if busy[v] and busy[v][0] is not None else {}),
                          "first_call_s": round(compile_s[v], 2), "first_row_tokens": first_rows[v][:32],
                          "device": jax.devices()[0].device_kind}), flush=True)


KINDS = (("copies", ("memcpy", "memset")), ("mosaic", ("mosaic",)), ("attention", ("attention", "flash")),
         ("products", ("gemm", "nvjet", "cutlass", "xmma", "cublas", "decode_matmul", "dot")),
         ("reductions", ("reduce",)))


def kernel_kind(name: str) -> str:
    """What a GPU kernel of a trace does, from its name: copies, attention, products (GEMMs and our decode
    matmuls), reductions (LayerNorm's statistics, split sums), else elementwise (adds, casts, GELU, slices). Mosaic
    GPU kernels all trace as `anonymous_mosaic_gpu_kernel`, so they are a kind of their own: the prefill's Hopper
    attention and the batch matmuls, so in a decode step's split (the prefill's subtracted) the batch matmuls."""
    lowered = name.lower()
    return next((kind for kind, words in KINDS if any(w in lowered for w in words)), "elementwise")


def kernel_summary(trace_dir: str, steps: int, top: int = 40) -> tuple[int, dict]:
    """Print what the GPU ran during the trace: kernels per decode step, busy time and the idle gaps between
    kernels, then the costliest kernels; return the number of kernels (memsets and copies included) and the
    microseconds of each `kernel_kind`. Unrolled
    layers give each layer's copy of a fusion its own name (`loop_add_fusion.12`); the numeric suffix is
    dropped so the copies count as one kernel."""
    import collections
    import glob
    import re

    from jax.profiler import ProfileData

    from benchmarks.gpu_time import covered_ns

    path = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True))[-1]
    data = ProfileData.from_file(path)
    for plane in data.planes:
        if not plane.name.startswith("/device:GPU"):
            continue
        by_name = collections.defaultdict(lambda: [0, 0.0])
        events, named = [], []
        for line in plane.lines:
            if "stream" not in line.name.lower():
                continue
            for ev in line.events:
                name = re.sub(r"([._]\d+)+$", "", ev.name)
                by_name[name][0] += 1
                by_name[name][1] += ev.duration_ns / 1e3
                events.append((ev.start_ns, ev.start_ns + ev.duration_ns))
                named.append((ev.start_ns, ev.name, ev.duration_ns, line.name, ev))
        named.sort(key=lambda e: e[0])
        for i, (_, name, ns, line_name, ev) in enumerate(named):  # copies of over 100 us: what they are, where
            if name.startswith("Memcpy") and ns > 100_000:
                print(json.dumps({"long_copy": name, "us": round(ns / 1e3, 1), "stream": line_name,
                                  "stats": {k: str(v)[:120] for k, v in ev.stats},
                                  "after": [n[1][:60] for n in named[max(0, i - 3):i]],
                                  "before": [n[1][:60] for n in named[i + 1:i + 4]]}))
        if not events:
            continue
        events.sort()
        busy = covered_ns(events) / 1e3  # overlapping kernels (launched early) counted once
        span = (events[-1][1] - events[0][0]) / 1e3
        gaps = np.diff([s for s, _ in events]) / 1e3 - np.array([(e - s) / 1e3 for s, e in events[:-1]])
        print(json.dumps({"plane": plane.name, "kernels": len(events),
                          "kernels_per_step": round(len(events) / steps, 1),
                          "busy_us": round(busy), "span_us": round(span), "busy_fraction": round(busy / span, 3),
                          "gap_us_median": round(float(np.median(gaps)), 2) if len(gaps) else 0.0}))
        for name, (n, us) in sorted(by_name.items(), key=lambda kv: -kv[1][1])[:top]:
            print(json.dumps({"kernel": name[:90], "count": n, "total_us": round(us, 1), "mean_us": round(us / n, 2)}))
        for i in np.argsort(gaps)[::-1][:8]:  # where the device waited longest, between which kernels
            print(json.dumps({"idle_us": round(float(gaps[i]), 1), "after": named[i][1][:70],
                              "before": named[i + 1][1][:70]}))
        host_summary(data, events[0][0], events[-1][1])
        by_kind = collections.Counter()
        for name, (_, us) in by_name.items():
            by_kind[kernel_kind(name)] += us
        return len(events), dict(by_kind)
    return 0, {}


def host_summary(data, start_ns: int, end_ns: int, top: int = 25) -> None:
    """What the host threads were doing while the device ran (the profiler's named host events in that window,
    by total time): whether a gap between kernels is the host launching them, or waiting."""
    import collections

    by_name = collections.defaultdict(lambda: [0, 0.0])
    for plane in data.planes:
        if not plane.name.startswith("/host"):
            continue
        for line in plane.lines:
            for ev in line.events:
                if ev.start_ns < end_ns and ev.start_ns + ev.duration_ns > start_ns:
                    by_name[ev.name[:90]][0] += 1
                    by_name[ev.name[:90]][1] += ev.duration_ns / 1e3
    for name, (n, us) in sorted(by_name.items(), key=lambda kv: -kv[1][1])[:top]:
        print(json.dumps({"host": name, "count": n, "total_us": round(us, 1)}))

if __name__ == "__main__":
    main()
