"""A decode step's kernels bracketed for Nsight Compute, one launch form a process, and its counters read back as
one JSON line: where a decode attention launch or a batch-256 product spends its time.

    ncu --profile-from-start off --clock-control none --set full -o att \
      python3 -m benchmarks.ncu_decode attention --shape 256x136x192 --params '{"block_k": 128}'
    ncu --import att.ncu-rep --csv --page details > att.csv
    python3 -m benchmarks.ncu_decode summary att.csv        # {"kernel": ..., "duration_us": ..., "dram_pct": ...}

- `attention --shape BxLxC [--heads HxD] [--params JSON] [--append]`: `decode_attention` (or, with `--append`,
  `decode_attention_append`, the engine's form) over B rows of L valid keys in caches of C positions; `--params`
  overrides the table's launch (`DecodeParams` fields).
- `product --shape MxKxN [--params JSON]`: `batch_matmul` (+ bias), the batch-256 step's products; `--params`
  its tiles (`tile_m`, `tile_n`, `stages`, `delay`).

Each checks its output against the `jnp` reference before the profiled range opens (`ncu_prefill.ProfiledRange`),
so that counters of a wrong kernel are never read. Off a GPU the attention runs in interpret mode, checked and not
profiled. `benchmarks/ncu_decode.sh` runs the cases the decode step's open questions need.
"""

from __future__ import annotations

import argparse
import csv
import io
import json

# (section, metric) of ncu's details page -> the summary's field; the duration is converted to microseconds
SUMMARY_METRICS = {
    ("GPU Speed Of Light Throughput", "Duration"): "duration_us",
    ("GPU Speed Of Light Throughput", "DRAM Throughput"): "dram_pct",
    ("GPU Speed Of Light Throughput", "Memory Throughput"): "memory_pct",
    ("GPU Speed Of Light Throughput", "Compute (SM) Throughput"): "sm_pct",
    ("Memory Workload Analysis", "Memory Throughput"): "dram_gb_s",
    ("Memory Workload Analysis", "L2 Hit Rate"): "l2_hit_pct",
    ("Memory Workload Analysis", "L1/TEX Hit Rate"): "l1_hit_pct",
    ("Memory Workload Analysis", "Mem Busy"): "mem_busy_pct",
    ("Launch Statistics", "Grid Size"): "grid",
    ("Launch Statistics", "Block Size"): "block",
    ("Launch Statistics", "Registers Per Thread"): "registers",
    ("Launch Statistics", "Waves Per SM"): "waves",
    ("Occupancy", "Theoretical Occupancy"): "occupancy_theoretical_pct",
    ("Occupancy", "Achieved Occupancy"): "occupancy_pct",
    ("Scheduler Statistics", "No Eligible"): "no_eligible_pct",
    ("Warp State Statistics", "Warp Cycles Per Issued Instruction"): "cycles_per_issue",
}
TO_US = {"nsecond": 1e-3, "usecond": 1.0, "msecond": 1e3, "second": 1e6,  # ncu has printed both spellings
         "ns": 1e-3, "us": 1.0, "ms": 1e3, "s": 1e6}


def _number(text: str):
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return text


def summarize(csv_text: str, every: bool = False) -> list[dict]:
    """ncu's `--csv --page details` output -> one dict per profiled launch: its kernel's name and the
    `SUMMARY_METRICS` it reports (a metric missing from this ncu's sections is left out); `every`: all its
    metrics instead, each as "section: metric [unit]"."""
    launches: dict[str, dict] = {}
    if '"ID"' not in csv_text:  # the profiled process died, or no launch matched the filter
        return []
    for row in csv.DictReader(io.StringIO(csv_text[csv_text.find('"ID"'):])):
        launch = launches.setdefault(row["ID"], {"kernel": row["Kernel Name"]})
        if every:
            name = f'{row["Section Name"]}: {row["Metric Name"]}'
            launch[f'{name} [{row["Metric Unit"]}]' if row["Metric Unit"] else name] = _number(row["Metric Value"])
            continue
        field = SUMMARY_METRICS.get((row["Section Name"], row["Metric Name"]))
        if field is None:
            continue
        value = _number(row["Metric Value"])
        if field == "duration_us" and isinstance(value, float):
            value = round(value * TO_US.get(row["Metric Unit"], float("nan")), 3)
        elif field == "dram_gb_s" and row["Metric Unit"] == "Tbyte/s" and isinstance(value, float):
            value *= 1e3
        launch[field] = value
    return list(launches.values())


def attention_call(shape: str, heads: str, params: dict, append: bool, interpret: bool):
    """(fn, args, reference output) for one decode attention launch."""
    import functools

    import jax.numpy as jnp

    from benchmarks.attention_probe import appending, inputs
    from gptjax.kernels import decode_attention, decode_attention_reference

    batch, length, cache_len = map(int, shape.split("x"))
    n_heads, head_dim = map(int, heads.split("x"))
    if not 1 <= length <= cache_len:
        raise SystemExit(f"--shape: {length} valid keys do not fit a cache of {cache_len}")
    q, k, v, lengths = inputs(batch, cache_len, length, n_heads, head_dim, jnp.float16, sets=1)[0]
    kw = dict(params, interpret=interpret)
    fn = appending(**kw) if append else functools.partial(decode_attention, **kw)
    ref = decode_attention_reference(*(x.astype(jnp.float32) for x in (q, k, v)), lengths)
    return fn, (q, k, v, lengths), ref


def product_call(shape: str, params: dict):
    """(fn, args, reference output) for one `batch_matmul` launch (+ bias)."""
    import functools

    import jax
    import jax.numpy as jnp

    from gptjax.kernels.batch_matmul import batch_matmul, batch_matmul_reference

    m, k, n = map(int, shape.split("x"))
    kx, kw, kb = jax.random.split(jax.random.key(m * k + n), 3)
    x = jax.random.normal(kx, (m, k), jnp.float16)
    w = (jax.random.normal(kw, (k, n), jnp.float32) / k ** 0.5).astype(jnp.float16)
    b = (0.1 * jax.random.normal(kb, (n,), jnp.float32)).astype(jnp.float16)
    ref = batch_matmul_reference(x.astype(jnp.float32), w.astype(jnp.float32), b.astype(jnp.float32))
    return functools.partial(batch_matmul, **params), (x, w, b), ref


def run_profiled(fn, args, ref, calls: int, on_gpu: bool, tol: float) -> float:
    """The output's relative error against `ref`; then, on a GPU and within `tol`, `calls` launches inside the
    profiled range."""
    import jax

    from benchmarks.kernels import rel_err
    from benchmarks.ncu_prefill import ProfiledRange

    fn = jax.jit(fn)
    err = rel_err(fn(*args), ref)
    if on_gpu and err <= tol:
        for _ in range(3):
            jax.block_until_ready(fn(*args))
        with ProfiledRange():
            for _ in range(calls):
                jax.block_until_ready(fn(*args))
    return err


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="what", required=True)
    att = sub.add_parser("attention", help="one decode attention launch form")
    att.add_argument("--shape", default="256x136x192", help="rows x valid keys x cache positions")
    att.add_argument("--heads", default="16x64", help="heads x head_dim")
    att.add_argument("--append", action="store_true", help="decode_attention_append, as the engine's step runs it")
    prod = sub.add_parser("product", help="one batch_matmul launch form")
    prod.add_argument("--shape", default="256x1024x3072", help="M x K x N")
    for s in (att, prod):
        s.add_argument("--params", default="{}", help="the launch's keyword arguments, as JSON")
        s.add_argument("--calls", type=int, default=1, help="profiled calls")
        s.add_argument("--tol", type=float, default=2e-2, help="largest relative error profiled")
    summ = sub.add_parser("summary", help="ncu's details CSVs -> one JSON line per profiled launch")
    summ.add_argument("csv", nargs="+")
    summ.add_argument("--all", action="store_true", help="every metric of the page, not only the summary's")
    args = p.parse_args(argv)

    if args.what == "summary":
        for path in args.csv:
            with open(path) as f:
                launches = summarize(f.read(), every=args.all)
            for launch in launches:
                print(json.dumps({"file": path} | launch), flush=True)
            if not launches:
                print(json.dumps({"file": path, "error": "no profiled launch (see the profiled run's log)"}))
        return 0

    from gptjax.kernels import on_gpu

    for flag, text, n in (("--shape", args.shape, 3), ("--heads", getattr(args, "heads", "1x1"), 2)):
        dims = text.split("x")
        if len(dims) != n or not all(d.isdigit() and int(d) > 0 for d in dims):
            p.error(f"{flag} {text!r}: positive integers joined by 'x', as in its default")
    try:
        params = json.loads(args.params)
    except json.JSONDecodeError as e:
        p.error(f"--params is not JSON: {e}")
    if not isinstance(params, dict):
        p.error("--params must be a JSON object of keyword arguments")
    gpu = on_gpu()
    if args.what == "attention":
        fn, call_args, ref = attention_call(args.shape, args.heads, params, args.append, interpret=not gpu)
    elif not gpu:
        p.error("product: batch_matmul is a Mosaic GPU kernel, which runs only on a Hopper GPU")
    else:
        fn, call_args, ref = product_call(args.shape, params)
    err = run_profiled(fn, call_args, ref, args.calls, gpu, args.tol)
    right = err <= args.tol
    print(json.dumps({"what": args.what, "shape": args.shape, "params": params, "rel_err": err,
                      "profiled": gpu and right}), flush=True)
    return 0 if right else 1


if __name__ == "__main__":
    raise SystemExit(main())
