"""The `gptjax` command: generate, convert, serve, client, bench, models.

Exit status 0 on success, 2 on bad arguments or bad input files, with one line naming what is wrong.
Under srun or mpirun every process runs the same command; only process 0 prints results.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from functools import partial

from gptjax.config import ATTENTION_IMPLS, DEFAULT_PRESET, DTYPES, MATMUL_IMPLS, PRESETS, MeshShape, preset


class UsageError(ValueError):
    """Bad input from the command line or its files: exit 2 with one line."""


def _mesh(text: str) -> MeshShape:
    try:
        return MeshShape.parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("mesh: ")) from None


def _ids(text: str) -> list[int]:
    items = [t.strip() for t in text.split(",")]
    if items == [""] or items == ["", ""]:
        raise argparse.ArgumentTypeError("an empty list of token ids")
    # ASCII digits only: int() also reads "1 2" with the space taken out (12), "1_0" and other scripts' digits
    if not all(t.removeprefix("-").isascii() and t.removeprefix("-").isdigit() for t in items):
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    return [int(t) for t in items]


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"a port is between 0 and 65535, got {port}")
    return port


def _host_port(text: str) -> str:
    """HOST:PORT (an IPv6 host in brackets), the port in 1-65535: gRPC took port 99999 as 34463 (modulo 2**16),
    and an empty one as 443."""
    host, sep, port = text.rpartition(":")
    if not sep or not host.strip("[]") or not (port.isascii() and port.isdigit()):
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    if not 1 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"a port is between 1 and 65535, got {port} in {text!r}")
    return text


def _seconds(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not 0 <= seconds < math.inf:  # inf warmed up for ever; NaN and negative mean nothing
        raise argparse.ArgumentTypeError(f"expected a finite number of seconds >= 0, got {text!r}")
    return seconds


def _api_key(text: str) -> str:
    """A key that HTTP headers and gRPC metadata can carry as sent: printable ASCII, no spaces around it (a
    server with any other key refused every call; gRPC clients could not even send it)."""
    if text and not (text.isascii() and text.isprintable() and text == text.strip()):
        raise argparse.ArgumentTypeError("the key (--api-key or $GPTJAX_API_KEY) must be printable ASCII without "
                                         "spaces around it")
    return text


def add_model_args(p: argparse.ArgumentParser) -> None:
    """What every model-running subcommand takes: the model, its dtype and layout, and multi-host flags."""
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", metavar="NAME",
                     help=f"a preset with random weights ({', '.join(PRESETS)}; default {DEFAULT_PRESET}), or a "
                          "Hugging Face Hub id[@REVISION] of GPT-2 architecture, e.g. gpt2 (fetched and converted "
                          "once; `gptjax models` lists them)")
    src.add_argument("--checkpoint", metavar="DIR", help="a converted checkpoint folder (config.json + params/)")
    p.add_argument("--config", metavar="FILE",
                   help="engine/server config file: .toml, .json or a Triton config.pbtxt (by its suffix; a file of "
                        "another suffix is read as JSON, else TOML)")
    p.add_argument("--dtype", choices=DTYPES, help="compute and weight dtype (default: the model's)")
    p.add_argument("--mesh", type=_mesh, help="device layout, e.g. data=1,stage=1,tensor=8 (default: one device)")
    p.add_argument("--attention", choices=ATTENTION_IMPLS, help="attention implementation (default: pallas on GPU)")
    p.add_argument("--decode-matmuls", choices=MATMUL_IMPLS,
                   help="the decode step's small-batch products (default: this project's kernels for "
                        "steps of up to 8 slots on one GPU, XLA's otherwise; pallas: the kernels up to 16 slots)")
    p.add_argument("--coordinator", metavar="HOST:PORT", type=_host_port,
                   help="jax.distributed coordinator (multi-host)")
    p.add_argument("--num-processes", type=int, help="number of processes (multi-host)")
    p.add_argument("--process-id", type=int, help="this process's index (multi-host)")
    p.add_argument("--no-compile-cache", action="store_true",
                   help="compile every program afresh instead of keeping compiled programs between runs")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gptjax", description="A JAX/XLA sharded inference engine for GPT models.")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_generate, _add_convert, _add_serve, _add_client, _add_bench, _add_models):
        add(sub)
    return parser


def _add_generate(sub) -> None:
    g = sub.add_parser("generate", help="complete prompts and print the text")
    add_model_args(g)
    prompts = g.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompt", action="append", metavar="TEXT", help="a prompt (repeat for a batch)")
    prompts.add_argument("--prompt-ids", action="append", type=_ids, metavar="1,2,3",
                         help="a prompt as token ids (repeat for a batch)")
    g.add_argument("--max-new-tokens", type=int, help="tokens to generate per prompt (default from config: 64)")
    g.add_argument("--greedy", action="store_true", help="always take the most likely token")
    g.add_argument("--temperature", type=float)
    g.add_argument("--top-k", type=int)
    g.add_argument("--top-p", type=float)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--no-stop", action="store_true", help="do not stop at end-of-text")
    g.add_argument("--json", action="store_true", help="one JSON object per prompt")


def _add_convert(sub) -> None:
    c = sub.add_parser("convert", help="convert a checkpoint to a gptjax checkpoint folder")
    csub = c.add_subparsers(dest="format", required=True)
    hf = csub.add_parser("hf-gpt2", help="a Hugging Face GPT-2 folder (config.json + weights)")
    mg = csub.add_parser("megatron", help="a Megatron-LM checkpoint folder (mp_rank_XX parts) or release zip")
    mg.add_argument("--num-heads", type=int, help="attention heads (when the checkpoint has no args)")
    mg.add_argument("--vocab-size", type=int, help="real vocabulary size: drops Megatron's padding rows")
    ft = csub.add_parser("ft", help="a FasterTransformer c-model folder (config.ini + model.*.bin)")
    for p in (hf, mg, ft):
        p.add_argument("src")
        p.add_argument("dst")


def _add_serve(sub) -> None:
    s = sub.add_parser("serve", help="serve the model over gRPC (native API and Triton/KServe v2)")
    add_model_args(s)
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=_port, default=8001, help="gRPC: native API and Triton/KServe v2 (default 8001)")
    s.add_argument("--http-port", type=_port, default=8000,
                   help="HTTP: KServe v2 REST, OpenAI completions, metrics (default 8000; 0 turns it off)")
    s.add_argument("--metrics-port", type=_port, default=8002,
                   help="Prometheus metrics alone (default 8002; 0 turns it off)")
    s.add_argument("--api-key", default=os.environ.get("GPTJAX_API_KEY"), type=_api_key,
                   help="the key every request but health must carry, over HTTP and gRPC (default: "
                        "$GPTJAX_API_KEY; none: no key needed)")


def _add_client(sub) -> None:
    cl = sub.add_parser("client", help="send a request to a running server")
    cl.add_argument("--server", default="127.0.0.1:8001", metavar="HOST:PORT", type=_host_port)
    cl.add_argument("--api-key", default=os.environ.get("GPTJAX_API_KEY"), type=_api_key,
                    help="the key of a server started with --api-key (default: $GPTJAX_API_KEY)")
    cl.add_argument("--prompt", help="prompt text")
    cl.add_argument("--prompt-ids", type=_ids, metavar="1,2,3")
    cl.add_argument("--max-new-tokens", type=int, default=32)
    cl.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (the default)")
    cl.add_argument("--top-k", type=int, default=0)
    cl.add_argument("--top-p", type=float, default=1.0)
    cl.add_argument("--seed", type=int, default=0)
    cl.add_argument("--no-stop", action="store_true", help="do not stop at end-of-text")
    cl.add_argument("--stream", action="store_true", help="print tokens as they come")
    cl.add_argument("--json", action="store_true")


def _add_bench(sub) -> None:
    b = sub.add_parser("bench", help="latency and throughput: gptjax against a peer and the hardware floor")
    add_model_args(b)
    b.add_argument("-b", "--batch", type=int)
    b.add_argument("-i", "--input-len", type=int)
    b.add_argument("-o", "--output-len", type=int)
    b.add_argument("--shapes", metavar="B,I,O ...", nargs="+",
                   help="several (batch, input_len, output_len) shapes in one process, instead of -b -i -o")
    # the flags of one benchmark default to None here, so that those given to the other are refused, not ignored
    b.add_argument("-n", "--runs", type=int, help="timed runs (default 5)")
    b.add_argument("--warmup", type=int, help="untimed runs before the timed ones (at least; default 1)")
    b.add_argument("--warmup-seconds", type=_seconds, default=None,
                   help="with --server, keep warming up for this long (default 2)")
    b.add_argument("--server", metavar="HOST:PORT", type=_host_port, help="measure through a running server instead")
    b.add_argument("--api-key", default=os.environ.get("GPTJAX_API_KEY"), type=_api_key,
                   help="with --server: the key of a server started with --api-key (default: $GPTJAX_API_KEY)")
    b.add_argument("--server-api", choices=["triton", "native"],
                   help="with --server: the batch in KServe v2 requests as the seed's client sends it (triton, the "
                        "default), or one native Generate call per row, all at once (native)")
    b.add_argument("--peer", action="append", choices=["hf", "hf-compiled"], default=[],
                   help="also run a peer with the same weights (repeatable)")
    b.add_argument("--request-rate", nargs="+", metavar="R",
                   help="with --server: the serving benchmark, Poisson arrivals at each rate (requests/s; inf sends "
                        "all at once), or auto: the saturation rate, then fractions of it")
    b.add_argument("--num-requests", type=int, help="with --request-rate: requests per rate (default 200)")
    b.add_argument("--input-len-dist", metavar="DIST",
                   help="with --request-rate: prompt lengths, fixed:N, uniform:LO,HI or normal:MEAN,STD "
                        "(default fixed:128)")
    b.add_argument("--output-len-dist", metavar="DIST",
                   help="with --request-rate: new tokens per request, as --input-len-dist (default fixed:128)")
    b.add_argument("--seed", type=int,
                   help="with --request-rate: the seed of the lengths, the prompts and the arrivals (default 0)")
    b.add_argument("--json", action="store_true", help="one JSON row per implementation")


def _add_models(sub) -> None:
    m = sub.add_parser("models", help="list the presets and the models converted from the Hub, with their sizes")
    m.add_argument("--rm", metavar="ID[@REV]", help="delete a converted model (every revision, unless REV names one)")


def resolve_model(args) -> None:
    """A `--model` that is not a preset names a Hugging Face Hub model: fetch and convert it (once), and run
    its checkpoint folder. Call it before anything uses JAX, so that jax.distributed can still start."""
    if args.model is None or args.model in PRESETS or args.checkpoint:
        return
    from gptjax.hub import ModelNotFound, pretrained_folder

    try:
        args.checkpoint = str(pretrained_folder(args.model, isolate=True))
    except ModelNotFound as e:
        raise UsageError(f"--model {args.model}: not a preset ({', '.join(PRESETS)}), and {e}") from None


ENGINE_FLAGS = ("mesh", "attention", "decode_matmuls")  # EngineConfig fields that flags override


def serving_config(args):
    """The config file's engine, scheduler and server settings (defaults without --config), with the flags that
    override them: --mesh, --attention, --decode-matmuls, --dtype and, for `serve`, the addresses and --api-key."""
    from serving.config import ADDRESS_FIELDS, ServingConfig, serving_config_from_file

    config = serving_config_from_file(args.config) if args.config else ServingConfig()
    engine = config.engine.replace(**{name: getattr(args, name, None) for name in ENGINE_FLAGS
                                      if getattr(args, name, None)})
    server = config.server.replace(**{name: getattr(args, name) for name in ADDRESS_FIELDS if hasattr(args, name)})
    return config.replace(engine=engine, server=server, dtype=args.dtype or config.dtype)


def join_job(args) -> None:
    """Start jax.distributed as the multi-host flags (or the launcher) say; a lone process needs nothing."""
    from gptjax import distributed

    distributed.initialize(coordinator=args.coordinator, num_processes=args.num_processes,
                           process_id=args.process_id)


def build_engine(args, config=None, cache=None):
    """The Engine that the model arguments and `config` (a ServingConfig; default: serving_config(args)) ask
    for. Also starts jax.distributed when asked, and keeps compiled programs between runs unless
    --no-compile-cache. Before anything is allocated, the weights and the largest KV cache the run makes are
    checked against the devices' memory: `cache` (`_cache_of_runs`) says how large that is; default: a server's
    decode state, max_slots x max_seq_len."""
    from gptjax import compile_cache

    resolve_model(args)
    config = config or serving_config(args)
    join_job(args)
    if args.no_compile_cache:
        compile_cache.disable()
    else:
        compile_cache.enable()
    import jax

    from gptjax.engine import Engine
    from gptjax.sharding import make_mesh

    if jax.process_count() > 1:
        _check_one_job(args, config)
    _check_memory(args, config, cache)
    shape = config.engine.mesh
    mesh = make_mesh(shape.data, shape.stage, shape.tensor) if shape.size > 1 else None
    if args.checkpoint:
        return Engine.load(args.checkpoint, mesh=mesh, engine_config=config.engine, dtype=config.dtype)
    return Engine.from_preset(args.model or DEFAULT_PRESET, dtype=config.dtype, mesh=mesh,
                              engine_config=config.engine)


def _check_one_job(args, config) -> None:
    """Every process of a job must build the same engine over all the job's devices: process 0's commands would
    meet another engine on a process started with other flags or another config (a hang, or wrong tokens). The
    processes compare their settings first, so that each refuses alike."""
    import jax

    from gptjax import distributed
    from gptjax.config import to_dict

    settings = [args.model, args.checkpoint, config.dtype, to_dict(config.engine), to_dict(config.scheduler)]
    if not distributed.same_on_every_process(json.dumps(settings, sort_keys=True)):
        raise UsageError("the processes of this job were started with different models or settings (model, "
                         "checkpoint, dtype, engine or scheduler): start every process with the same command and "
                         "config")
    shape, devices = config.engine.mesh, jax.device_count()
    if shape.size != devices:  # each process would run a model of its own
        raise UsageError(f"a job of {jax.process_count()} processes runs one model over all {devices} devices: "
                         f"give --mesh with data*stage*tensor = {devices} (got {shape})")


def _check_memory(args, config, cache) -> None:
    """Refuse (ValueError: exit 2, one line naming the fields) a run whose weights and KV cache can't fit on the
    devices, which would otherwise end in an out-of-memory traceback when they are allocated. Devices that report
    no memory limit (CPU) are not checked."""
    import jax

    from gptjax import planning
    from gptjax.checkpoint import read_config
    from gptjax.sharding import check_layout

    shape = config.engine.mesh
    if shape.size > jax.device_count():
        return  # the mesh says so itself, in the words it uses
    model = read_config(args.checkpoint) if args.checkpoint else preset(args.model or DEFAULT_PRESET)
    model = model.replace(dtype=config.dtype) if config.dtype else model
    check_layout(model, shape)  # first: the memory a layout can't make is not worth counting
    available = planning.device_memory(jax.local_devices()[: shape.size])
    if cache is None:
        planning.check_serving_memory(model, config.engine, available)
    else:
        rows, positions, what, fix = cache(model, config.engine)
        planning.MemoryPlan(model, shape, rows, positions).check(available, what, fix)


def _cache_of_runs(runs, fix: str):
    """A `cache` for build_engine: the largest KV cache of the one-program runs (`Engine.complete`) in `runs`, each
    (prompts, longest prompt's tokens, new tokens or None for the config's default, what to call it). That cache
    holds at least the prompts' bucket and the new tokens (it rounds them up), so a run refused can't fit."""
    def cache(model, ec):
        from gptjax.planning import bucket_length, state_rows
        from gptjax.prompts import default_new_tokens

        seq = ec.seq_len(model)
        sizes = []
        for rows, longest, new, name in runs:
            new = new or default_new_tokens(ec.max_new_tokens, longest, seq)
            positions = min(seq, bucket_length(longest, ec.min_prefill_bucket, seq) + new)
            sizes.append((state_rows(rows, ec.mesh.data), positions, name))
        rows, positions, name = max(sizes, key=lambda size: size[0] * size[1])
        return rows, positions, f"{name} x at least {positions} positions", fix

    return cache


def cmd_generate(args) -> int:
    from gptjax import distributed

    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if args.greedy and (args.temperature is not None or args.top_k is not None or args.top_p is not None):
        raise UsageError("--greedy can't be combined with --temperature/--top-k/--top-p")
    for text in args.prompt or ():
        try:
            text.encode()
        except UnicodeEncodeError:  # bytes of the command line that are not UTF-8 (Python keeps them as surrogates)
            raise UsageError(f"--prompt {text.encode(errors='surrogateescape')[:60]!r} is not valid UTF-8") from None
    prompts = args.prompt if args.prompt else args.prompt_ids
    longest = max(map(len, args.prompt_ids)) if args.prompt_ids else 1  # a text prompt has a token at least
    runs = [(len(prompts), longest, args.max_new_tokens, f"{len(prompts)} prompt{'s' * (len(prompts) > 1)}")]
    engine = build_engine(args, cache=_cache_of_runs(runs, "give fewer prompts at once or a lower --max-new-tokens, "
                                                           "or split the cache over more devices (--mesh data or "
                                                           "tensor)"))
    results = engine.generate(prompts, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                              top_k=args.top_k, top_p=args.top_p, seed=args.seed, greedy=args.greedy,
                              stop_token_ids=[] if args.no_stop else None)
    if distributed.is_main_process():
        for prompt, r in zip(prompts, results):
            if args.json:
                print(json.dumps({"prompt_ids": r.prompt_ids, "output_ids": r.output_ids, "text": r.text}))
            else:
                head = prompt if isinstance(prompt, str) else engine.tokenizer.decode(r.prompt_ids)
                print(head + r.text)
    return 0


def cmd_convert(args) -> int:
    if args.format == "hf-gpt2":
        from checkpoints.hf_gpt2 import convert_hf_gpt2 as convert

        out = convert(args.src, args.dst)
    elif args.format == "megatron":
        from checkpoints.megatron import convert_megatron

        out = convert_megatron(args.src, args.dst, num_heads=args.num_heads, vocab_size=args.vocab_size)
    else:
        from checkpoints.ft import convert_ft

        out = convert_ft(args.src, args.dst)
    print(f"wrote {out}", file=sys.stderr)
    return 0


def cmd_models(args) -> int:
    from gptjax.checkpoint import CheckpointError, read_config
    from gptjax import hub
    from gptjax.planning import format_bytes

    if args.rm is not None:
        for m in hub.remove_converted(args.rm):
            print(f"removed {m.name} ({m.path}); its download stays in the Hugging Face cache", file=sys.stderr)
        return 0
    rows = [("MODEL", "SOURCE", "PARAMS", "DISK")]
    rows += [(name, "preset", _count(config.num_params()), "-") for name, config in PRESETS.items()]
    for m in hub.converted_models():
        try:
            params = _count(read_config(m.path).num_params())
        except CheckpointError:
            params = "?"
        pinned = m.revision == m.commit  # asked for by commit: its name shows it already
        size = format_bytes(m.disk_bytes(), exact=False)
        rows.append((m.name, "hub" if pinned else f"hub {m.revision}", params, size))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for row in rows:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip())
    print(f"(presets have random weights; converted models are in {hub.models_dir()})")
    return 0


def _count(n: int) -> str:
    return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def cmd_serve(args) -> int:
    from gptjax import distributed

    if args.api_key == "":  # it would serve without a key: every route open to anyone who reaches the port
        raise UsageError("the API key (--api-key or $GPTJAX_API_KEY) is empty: give a key, or leave both unset to "
                         "serve without one")
    ports = [(flag, getattr(args, flag[2:].replace("-", "_"))) for flag in ("--port", "--http-port", "--metrics-port")]
    for i, (flag, port) in enumerate(ports):  # else "Address already in use" blamed another program
        same = next((other for other, p in ports[i + 1:] if p == port and port), None)
        if same:
            raise UsageError(f"{flag} and {same} are both {port}: each listener needs a port of its own")
    config = serving_config(args)
    rank = distributed.launcher_rank(args.process_id)
    from serving.server import serve  # after the checks: the servers' imports are heavy

    return serve(config, args.checkpoint or args.model or DEFAULT_PRESET, partial(build_engine, args, config), rank,
                 partial(join_job, args))


def cmd_client(args) -> int:
    from serving.client import main as client_main

    return client_main(args)


SERVING_BENCH_FLAGS = (("--num-requests", "num_requests"), ("--input-len-dist", "input_len_dist"),
                       ("--output-len-dist", "output_len_dist"), ("--seed", "seed"))
STATIC_BENCH_FLAGS = (("-b", "batch"), ("-i", "input_len"), ("-o", "output_len"), ("--shapes", "shapes"),
                      ("--peer", "peer"), ("-n", "runs"), ("--warmup", "warmup"),
                      ("--warmup-seconds", "warmup_seconds"), ("--server-api", "server_api"))


def _given(args, flags) -> list[str]:
    return [flag for flag, name in flags if getattr(args, name) not in (None, [])]


def _default(value, default):
    return default if value is None else value


def cmd_bench(args) -> int:
    if args.request_rate:
        return _serving_bench(args)
    from benchmarks.bench import BenchOptions, parse_shapes, run_bench

    serving_only = _given(args, SERVING_BENCH_FLAGS)
    if serving_only:
        raise UsageError(f"only the serving benchmark takes {', '.join(serving_only)}: give --request-rate (and "
                         "--server)")
    server_only = [] if args.server else _given(args, (("--warmup-seconds", "warmup_seconds"),
                                                       ("--server-api", "server_api")))
    if server_only:
        raise UsageError(f"only a run through a server takes {', '.join(server_only)}: give --server HOST:PORT")
    resolve_model(args)  # a run through --server reads the model's config without building an engine
    options = BenchOptions(shapes=parse_shapes(args.batch, args.input_len, args.output_len, args.shapes),
                           runs=_default(args.runs, 5), warmup=_default(args.warmup, 1),
                           warmup_seconds=args.warmup_seconds, server=args.server,
                           server_api=_default(args.server_api, "triton"), api_key=args.api_key,
                           peers=tuple(args.peer), json=args.json,
                           model=args.model, checkpoint=args.checkpoint, dtype=args.dtype)
    runs = [(b, i, o, f"-b {b} (-i {i}, -o {o})") for b, i, o in options.shapes]
    fix = "give a smaller batch or lengths, or split the cache over more devices (--mesh data or tensor)"
    return run_bench(options, partial(build_engine, args, cache=_cache_of_runs(runs, fix)))


COMMANDS = {"generate": cmd_generate, "convert": cmd_convert, "serve": cmd_serve, "client": cmd_client,
            "bench": cmd_bench, "models": cmd_models}


def _serving_bench(args) -> int:
    """`bench --server HOST:PORT --request-rate ...`: the serving benchmark (benchmarks/serving_bench.py)."""
    from benchmarks.serving_bench import LengthDist, ServingBenchOptions, parse_rates, run_serving_bench

    if not args.server:
        raise UsageError("--request-rate measures a running server: give --server HOST:PORT")
    static = _given(args, STATIC_BENCH_FLAGS)
    if static:
        raise UsageError(f"--request-rate runs the serving benchmark: {', '.join(static)} do not apply")
    seed = _default(args.seed, 0)
    if seed < 0:  # numpy's seeds are not negative: its error named no flag
        raise UsageError(f"--seed must not be negative, got {seed}")
    rates, auto = parse_rates(args.request_rate)
    return run_serving_bench(ServingBenchOptions(
        server=args.server, request_rates=rates, auto=auto,
        num_requests=_default(args.num_requests, 200),
        input_len=LengthDist.parse(_default(args.input_len_dist, "fixed:128"), "--input-len-dist"),
        output_len=LengthDist.parse(_default(args.output_len_dist, "fixed:128"), "--output-len-dist"), seed=seed,
        json=args.json, api_key=args.api_key))


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from gptjax import distributed
    from gptjax.checkpoint import CheckpointError
    from gptjax.kernels import early_launch

    # conversions from the Hub say where they went, on this run's stderr
    hub_log, handler = logging.getLogger("gptjax.hub"), logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("gptjax: %(message)s"))
    hub_log.addHandler(handler)
    hub_log.setLevel(logging.INFO)
    try:
        early_launch.check_environment()
        return distributed.end_job(COMMANDS[args.command](args))
    except (UsageError, CheckpointError, ValueError, OSError) as e:  # OSError: a path that cannot be read or written
        print(f"gptjax {args.command}: error: {e}", file=sys.stderr)
        return distributed.leave_job(2)
    except KeyboardInterrupt:
        return 130
    finally:
        hub_log.removeHandler(handler)


if __name__ == "__main__":
    sys.exit(main())
