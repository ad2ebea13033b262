"""`gptjax bench`: the seed's benchmark (batch, input length, output length, runs).

Every implementation gets the same random prompts and the same weights, produces exactly `output_len` new
tokens per prompt (greedy, no stop token), is warmed up, then timed `runs` times; the median is reported.
Beside each result stands the hardware floor, computed from the device's ceilings as `benchmarks.floors`
measures them in the same process (the memory bandwidth no measured copy or read beats, the matmul rate):
    decode step = (weight bytes + KV bytes read) / memory bandwidth
    prefill     = 2 x params x prompt tokens / matmul rate

`run_bench(BenchOptions(...), make_engine)` is the entry; the `gptjax bench` command builds the options from its
flags (`parse_shapes` reads -b -i -o / --shapes).
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

PROMPT_SEED = 1234
SERVER_APIS = ("triton", "native")
PEERS = ("hf", "hf-compiled")
Shape = tuple[int, int, int]  # (batch, input_len, output_len)


@dataclass(frozen=True)
class BenchOptions:
    """What one static benchmark run measures, and how."""

    shapes: tuple[Shape, ...]
    runs: int = 5
    warmup: int = 1  # untimed runs before the timed ones (at least)
    warmup_seconds: float | None = None  # keep warming up this long (default: 2 s through a server, else 0)
    server: str | None = None  # HOST:PORT: measure through a running server
    server_api: str = "triton"
    api_key: str | None = None  # the key of a server started with --api-key
    peers: tuple[str, ...] = ()
    json: bool = False
    model: str | None = None  # the model a server run's floor is computed for (a preset) ...
    checkpoint: str | None = None  # ... or a checkpoint folder
    dtype: str | None = None

    def __post_init__(self):
        if not self.shapes:
            raise ValueError("shapes: at least one (batch, input_len, output_len) is needed")
        for shape in self.shapes:
            if len(shape) != 3 or min(shape) < 1:
                raise ValueError(f"batch, input_len and output_len must be at least 1, got {tuple(shape)}")
        if self.runs < 1:
            raise ValueError(f"--runs must be at least 1, got {self.runs}")
        if self.warmup < 0:
            raise ValueError(f"--warmup must not be negative, got {self.warmup}")
        if self.warmup_seconds is not None and not self.warmup_seconds >= 0:
            raise ValueError(f"--warmup-seconds must not be negative, got {self.warmup_seconds}")
        if self.server_api not in SERVER_APIS:
            raise ValueError(f"--server-api must be one of {SERVER_APIS}, got {self.server_api!r}")
        unknown = [p for p in self.peers if p not in PEERS]
        if unknown:
            raise ValueError(f"--peer must be one of {PEERS}, got {unknown[0]!r}")


@dataclass
class Row:
    impl: str
    batch: int
    input_len: int
    output_len: int
    runs: int
    latency_ms: float  # median over runs of the whole request: prefill and every new token
    tokens_per_s: float  # new tokens per second, all rows together
    device: str
    # (latency(o) - latency(2)) / (o - 2): a one-token call would leave out the cache's writes (its program has no
    # step to read them, and XLA drops them), which are the prefill's, not the steps'
    decode_ms_per_token: float | None = None
    floor_ms: float | None = None
    pct_of_floor: float | None = None  # floor / latency, in percent
    extra: dict = field(default_factory=dict)


def median_seconds(fn, runs: int, warmup: int, label: str, warmup_seconds: float = 0.0) -> float:
    """The median time of `runs` calls of fn, after at least `warmup` calls and `warmup_seconds` of them."""
    from tqdm import tqdm

    start = time.perf_counter()
    done = 0
    while done < warmup or time.perf_counter() - start < warmup_seconds:
        fn()
        done += 1
    times = []
    for _ in tqdm(range(runs), desc=label, unit="run", leave=False, file=sys.stderr,
                  disable=not sys.stderr.isatty()):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def random_prompts(batch: int, input_len: int, vocab: int) -> np.ndarray:
    return np.random.default_rng(PROMPT_SEED).integers(0, min(vocab, 50257), (batch, input_len), dtype=np.int32)


# ---- hardware rates and floors -----------------------------------------------------------------------
def measure_rates(dtype: str) -> dict:
    """Device 0's memory bandwidth (bytes/s) and dense matmul rate (FLOP/s), measured now by `benchmarks.floors`,
    the one measurement every benchmark's floor uses."""
    from benchmarks import floors

    return {"memory_bytes_per_s": floors.memory_bandwidth(), "matmul_flops": floors.matmul_rate(dtype)}


def floor_seconds(config, batch: int, input_len: int, output_len: int, rates: dict, devices: int = 1) -> float:
    """The least time any engine could take on `devices` of this device, the work spread evenly over them: the
    prefill's FLOPs at the matmul rate (the layers' products on every prompt token, causal attention's half of
    the score and value products, the LM head on each row's last token only, as the engine runs it), then each
    decode step's bytes at the read rate (the weights, but of the position table the one row a step uses, and
    the K/V so far)."""
    itemsize = 2 if config.dtype in ("bfloat16", "float16") else 4
    c, layers = config.hidden, config.n_layers
    tables = (config.vocab_size + config.n_positions) * c
    layer_flops = 2 * (config.num_params() - tables) * batch * input_len
    attention_flops = 2 * layers * c * batch * input_len * (input_len + 1)
    head_flops = 2 * config.vocab_size * c * batch
    prefill = (layer_flops + attention_flops + head_flops) / (rates["matmul_flops"] * devices)
    weight_bytes = (config.num_params() - config.n_positions * c + c) * itemsize
    kv_bytes_per_token = 2 * layers * c * itemsize
    decode = sum((weight_bytes + kv_bytes_per_token * batch * (input_len + j)) / rates["memory_bytes_per_s"]
                 for j in range(1, output_len)) / devices
    return prefill + decode


# ---- implementations ---------------------------------------------------------------------------------
def gptjax_runner(engine, prompts: np.ndarray, output_len: int):
    """Token ids in, token ids out, as the peer's `model.generate` runs (`hf_runner`: its prompts made before the
    clock starts, the new ids its result, no text): the prompts padded to the engine's bucket once, then each run one
    `Engine.complete`, its arrays' transfer and its result's fetch included. (`Engine.generate` also checks the
    prompts and detokenizes every row: at (256, 128, 128) on an H100, 18.7 ms of a 430 ms call before RESULTS run 32
    made the detokenizing faster.)"""
    from gptjax.generate import sampling_params

    n, length = prompts.shape
    tokens = np.zeros((n, engine.prefill_bucket(length)), np.int32)
    tokens[:, :length] = prompts
    lengths = np.full(n, length, np.int32)
    params = sampling_params(engine, n, None, None, None, 0, greedy=True)

    def run():
        out, _ = engine.complete(tokens, lengths, output_len, params)
        assert out.shape == (n, output_len), out.shape
        return out

    return run


def hf_runner(model, prompts: np.ndarray, output_len: int, compiled: bool):
    import torch

    device = next(model.parameters()).device
    ids = torch.from_numpy(prompts.astype(np.int64)).to(device)
    mask = torch.ones_like(ids)
    kwargs = dict(max_new_tokens=output_len, min_new_tokens=output_len, do_sample=False, pad_token_id=0)
    if compiled:
        kwargs["cache_implementation"] = "static"

    def run():
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=mask, **kwargs)
        if device.type == "cuda":
            torch.cuda.synchronize()
        assert out.shape[1] == prompts.shape[1] + output_len
        return out

    return run


def server_runner(target: str, prompts: np.ndarray, output_len: int, api: str = "triton",
                  api_key: str | None = None):
    """Through a server. `triton`: the batch as the seed's client sends it, in KServe v2 `ModelInfer` requests
    of up to the server's `batch_size` rows (one request when it fits), all in flight at once. `native`: one
    `Generate` call per row, issued from one thread without waiting (gRPC futures), as independent clients'
    requests would reach the server. `api_key`: sent with every call."""
    if api == "native":
        from serving.client import Client, make_request

        client = Client(target, api_key=api_key)
        requests = [make_request(list(map(int, p)), output_len, temperature=0.0, ignore_eos=True) for p in prompts]

        def run():
            calls = [client.stub.Generate.future(r) for r in requests]
            for call in calls:
                assert len(_answer(call, target).token_ids) == output_len, "the server returned fewer tokens than asked"

        return run

    from benchmarks.identity_test import KServeClient, KServeInput, KServeResult, build_inputs

    client = KServeClient(target, api_key=api_key)
    model = "fastertransformer"
    limit = int(client.get_model_config(model).config.parameters["batch_size"].string_value or len(prompts))
    ids = np.asarray(prompts, np.uint32)
    never = 2**32 - 1  # the end id: no token has it, so every row makes output_len tokens
    requests = [client.request(model, build_inputs(KServeInput, ids[s:s + limit], output_len, 1, 0.0, 0, never))
                for s in range(0, len(ids), limit)]

    def run():
        calls = [client.stub.ModelInfer.future(r) for r in requests]
        for call in calls:
            lengths = KServeResult(_answer(call, target)).as_numpy("sequence_length")
            assert (lengths == ids.shape[1] + output_len).all(), "the server returned fewer tokens than asked"

    return run


def _answer(call, target: str):
    """A gRPC future's answer; a refusal as a ValueError saying what the server said (the command's one line)."""
    import grpc

    try:
        return call.result()
    except grpc.RpcError as e:
        raise ValueError(f"--server {target} refused a request: {e.code().name}: {e.details()}") from None


def _free_peer_memory():
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def hf_model_for(engine):
    """The peer: Hugging Face GPT2LMHeadModel with the engine's weights. `hf-compiled` is the same model run
    with a static cache, for which `generate` compiles the forward itself (torch.compile, CUDA graphs)."""
    import torch

    from checkpoints.hf_gpt2 import to_hf_model

    device = "cuda" if torch.cuda.is_available() else "cpu"

    model = to_hf_model(engine.config, engine.model_params(), device=device)
    return model, (torch.cuda.get_device_name() if device == "cuda" else "cpu")


def parse_shapes(batch: int | None, input_len: int | None, output_len: int | None,
                 shapes: list[str] | None) -> tuple[Shape, ...]:
    """(batch, input_len, output_len) from -b -i -o or from --shapes B,I,O ..."""
    if shapes:
        if any(v is not None for v in (batch, input_len, output_len)):
            raise ValueError("give either -b/-i/-o or --shapes, not both")
        try:
            parsed = tuple(tuple(int(v) for v in s.split(",")) for s in shapes)
        except ValueError:
            raise ValueError(f"--shapes: expected B,I,O triples, got {' '.join(shapes)}") from None
        if any(len(s) != 3 for s in parsed):
            raise ValueError(f"--shapes: expected B,I,O triples, got {' '.join(shapes)}")
        return parsed
    missing = [f for f, v in (("-b", batch), ("-i", input_len), ("-o", output_len)) if v is None]
    if missing:
        raise ValueError(f"{', '.join(missing)} required (or --shapes)")
    return ((batch, input_len, output_len),)


def model_config(options: BenchOptions):
    """The model a `--server` run measures (for its floor), read without loading or creating weights."""
    from gptjax.config import DEFAULT_PRESET, preset

    if options.checkpoint:
        from gptjax.checkpoint import read_config

        config = read_config(options.checkpoint)
    else:
        config = preset(options.model or DEFAULT_PRESET)
    return config.replace(dtype=options.dtype) if options.dtype else config


def served_model(options: BenchOptions):
    """(ModelConfig, positions, devices) of the model the `--server` runs: its shape from the server, the rest
    from `--model` / `--checkpoint`, or from the server's model name when that is a preset or a folder here (else
    GPT-2's MLP width), in the server's dtype; refused when they disagree, so that the floor is the served
    model's."""
    from gptjax.config import PRESETS, MeshShape, ModelConfig
    from serving.client import serving_model_info

    info = serving_model_info(options.server, options.api_key)  # a clear error for no server, or a key it wants
    options = dataclasses.replace(options, dtype=options.dtype or info.dtype)
    shape = {"n_layers": info.n_layers, "hidden": info.hidden, "n_heads": info.n_heads,
             "vocab_size": info.vocab_size, "dtype": info.dtype}
    if options.model or options.checkpoint:
        config = model_config(options)
    elif info.name in PRESETS or (Path(info.name) / "config.json").is_file():
        config = model_config(dataclasses.replace(options, model=info.name if info.name in PRESETS else None,
                                                  checkpoint=None if info.name in PRESETS else info.name))
    else:
        config = ModelConfig(n_positions=info.max_seq_len, **shape)
    wrong = [f"{k} {getattr(config, k)} (the server's: {v})" for k, v in shape.items() if getattr(config, k) != v]
    if wrong:
        raise ValueError(f"--server {options.server} runs {info.name}, not this model: {', '.join(wrong)}; pass the "
                         "server's --model or --checkpoint (and --dtype)")
    return config, info.max_seq_len, MeshShape.parse(info.mesh).size


@dataclass
class _Context:
    """What every shape of one run shares."""

    options: BenchOptions
    config: object  # the ModelConfig
    engine: object | None  # the in-process Engine (None through a server without peers)
    rates: dict
    device: str
    devices: int  # the floor's work is spread over this many (the engine's mesh; the server's)


def _row(ctx: _Context, shape: Shape, impl: str, seconds: float, seconds_two: float | None, device: str) -> Row:
    b, i, o = shape
    floor = floor_seconds(ctx.config, b, i, o, ctx.rates, ctx.devices)
    decode = (seconds - seconds_two) / (o - 2) * 1e3 if seconds_two is not None and o > 2 else None
    extra = {"memory_GBps": ctx.rates["memory_bytes_per_s"] / 1e9, "matmul_TFLOPs": ctx.rates["matmul_flops"] / 1e12,
             "dtype": ctx.config.dtype, "model_params": ctx.config.num_params()}
    if impl == "gptjax":
        extra.update(mesh=str(ctx.engine.engine_config.mesh), attention=ctx.engine.attention)
    if impl == "gptjax-server":
        extra["server_api"] = ctx.options.server_api
    return Row(impl=impl, batch=b, input_len=i, output_len=o, runs=ctx.options.runs, latency_ms=seconds * 1e3,
               tokens_per_s=b * o / seconds, device=device, decode_ms_per_token=decode, floor_ms=floor * 1e3,
               pct_of_floor=100 * floor / seconds, extra=extra)


def _timed(ctx: _Context, shape: Shape, make, label: str, warmup_s: float = 0.0) -> tuple[float, float | None]:
    """Median seconds of the whole shape, and of the same with two new tokens (None when the shape has two or
    fewer): the difference is o - 2 decode steps."""
    from gptjax import distributed

    b, i, o = shape
    opts = ctx.options
    start = time.perf_counter()
    full = median_seconds(make(o), opts.runs, opts.warmup, label, warmup_s)
    two = median_seconds(make(2), opts.runs, opts.warmup, label + " (2 tokens)", warmup_s) if o > 2 else None
    if distributed.is_main_process():  # a log line where no progress bar shows (not a terminal)
        print(f"{label} ({b}, {i}, {o}): median {full * 1e3:.1f} ms, {time.perf_counter() - start:.0f} s "
              "with warm-ups and compiles", file=sys.stderr, flush=True)
    return full, two


def _peer_rows(ctx: _Context, shape: Shape, prompts: np.ndarray, peers: dict) -> list[Row]:
    """The peers first: torch hands its memory back after each, while JAX keeps what it grew to (a 6.7B
    batch-256 cache is 32 GB, and each implementation needs its own in turn)."""
    rows = []
    for peer, (model, peer_device) in peers.items():
        try:
            full, two = _timed(ctx, shape, lambda n: hf_runner(model, prompts, n, compiled=peer == "hf-compiled"),
                               peer)
        except Exception as e:
            if type(e).__name__ != "OutOfMemoryError":  # torch's: the peer's cache does not fit beside ours
                raise
            print(f"{peer}: out of memory at {shape}: no row ({e})", file=sys.stderr)
            continue
        finally:
            _free_peer_memory()
        rows.append(_row(ctx, shape, peer, full, two, peer_device))
    return rows


def _prepare_process(options: BenchOptions) -> None:
    """Memory settings for JAX, before it starts its backend."""
    if options.peers or options.server:
        # the peer (or the server) shares the GPU: let JAX allocate as it goes, not 75% up front
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    if options.peers:
        # JAX keeps what it allocated for one shape, and the peer has emptied torch's cache before gptjax runs:
        # 75% was too little for a 6.7B model's batch-256 cache (37 GB) beside the earlier shapes' buffers
        os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")


def run_bench(options: BenchOptions, make_engine: Callable[[], object] | None = None) -> int:
    """Every shape, in process (`make_engine()` builds the engine) or through `options.server`, beside the
    peers; prints each shape's rows as it finishes (process 0)."""
    _prepare_process(options)
    # through a server, the engine is the server's; here only a peer needs the weights
    needs_engine = bool(options.peers) or not options.server
    if needs_engine and make_engine is None:
        raise ValueError("an in-process benchmark (or a peer) needs the engine: pass make_engine")
    engine = make_engine() if needs_engine else None
    import jax

    from gptjax import distributed

    if options.server:
        config, max_seq, devices = served_model(options)
    else:
        config, max_seq, devices = engine.config, engine.max_seq_len, engine.mesh.devices.size
    for b, i, o in options.shapes:
        if i + o > max_seq:
            raise ValueError(f"input_len {i} + output_len {o} exceeds the model's {max_seq} positions")
    ctx = _Context(options, config, engine, measure_rates(config.dtype), jax.devices()[0].device_kind, devices)
    peers = {peer: hf_model_for(engine) for peer in options.peers} if distributed.is_main_process() else {}
    # a server compiles every shape it runs before serving; a couple of seconds of warm-up settle its threads
    server_warmup_s = 2.0 if options.warmup_seconds is None else options.warmup_seconds
    for shape in options.shapes:
        prompts = random_prompts(shape[0], shape[1], config.vocab_size)
        peer_rows = _peer_rows(ctx, shape, prompts, peers)
        rows = []
        if options.server:
            if distributed.is_main_process():
                def runner(n):
                    return server_runner(options.server, prompts, n, options.server_api, options.api_key)
                full, two = _timed(ctx, shape, runner, "server", server_warmup_s)
                rows.append(_row(ctx, shape, "gptjax-server", full, two, ctx.device))
        else:
            full, two = _timed(ctx, shape, lambda n: gptjax_runner(engine, prompts, n), "gptjax")
            rows.append(_row(ctx, shape, "gptjax", full, two, ctx.device))
        if distributed.is_main_process():
            print_rows(rows + peer_rows, options.json)
            sys.stdout.flush()
    return 0


def print_rows(rows: list[Row], as_json: bool) -> None:
    if as_json:
        for r in rows:
            print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(r).items()}))
        return
    base = rows[0].latency_ms
    print(f"{'impl':<14}{'batch':>6}{'in':>6}{'out':>6}{'latency ms':>12}{'tok/s':>11}{'ms/token':>10}"
          f"{'floor ms':>10}{'% floor':>9}{'vs first':>10}")
    for r in rows:
        decode = f"{r.decode_ms_per_token:.3f}" if r.decode_ms_per_token is not None else "-"
        print(f"{r.impl:<14}{r.batch:>6}{r.input_len:>6}{r.output_len:>6}{r.latency_ms:>12.2f}"
              f"{r.tokens_per_s:>11.1f}{decode:>10}{r.floor_ms:>10.2f}{r.pct_of_floor:>8.1f}%"
              f"{r.latency_ms / base:>9.2f}x")
    print(f"device: {rows[0].device}; memory {rows[0].extra['memory_GBps']:.0f} GB/s, "
          f"matmul {rows[0].extra['matmul_TFLOPs']:.1f} TFLOP/s ({rows[0].extra['dtype']})")
