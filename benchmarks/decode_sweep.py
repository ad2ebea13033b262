"""Sweep decode attention's launch parameters at the shapes a server sees, and write the table it picks from.

    python -m benchmarks.decode_sweep --jsonl OUT.jsonl --table gptjax/kernels/decode_table.py [--quick]
        [--heads 16x64] [--seqs 2048] [--batches 64,256]   # some shapes only: the table keeps the others'
        [--ragged]

For each (heads x head_dim, batch, cache length), every candidate (body form, heads per program, block,
warps, stages, and a split count from a target number of programs) is checked against the `jnp` reference
and timed over full caches (every entry valid; with `--ragged`, lengths uniform in [1, max_seq]), GB/s over
the valid K/V bytes, beside the device's memory bandwidth measured in the same run (`benchmarks.floors`).
Two times per row: `us`, the host clock's median over dispatches of several input sets, and on a GPU `gpu_us`,
the kernels' own time summed over one more dispatch in a profiler trace, per input set
(`benchmarks.kernels.timed_device`): for a candidate its one launch (a split launch combines its chunks itself;
the zeros its counters start from, which the engine makes once a step, are left out), for a peer every kernel.
GB/s and the fraction of bandwidth come from each.
The fastest correct candidate of each shape, by `gpu_us` where every candidate has it (by `us` otherwise, e.g.
on the CPU), goes into the table; `gptjax.kernels.decode_attention.choose_params` reads it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time

import jax
import jax.numpy as jnp

from benchmarks import floors
from benchmarks.kernels import decode_inputs, rel_err, timed_device
from gptjax.kernels import decode_attention, decode_attention_reference, on_gpu

# (heads, head_dim) -> batches x cache lengths: the 6.7B model's layer, and the 345M model's (in this order, so
# that a time-limited run drops the 345M model's largest shapes, already near the copy rate, first)
SHAPES = {(32, 128): ([32, 64], [512, 2048]), (16, 64): ([8, 32, 64, 128, 256], [512, 2048, 256])}
QUICK_SHAPES = {(4, 16): ([2], [64])}
# (heads_per_program, block_k, num_warps, num_stages, use_dot, target programs to split toward);
# a head group's tiles are [block_k, G * head_dim]: block_k shrinks as the group widens (shared memory)
# (run 1 of 2026-12-02 on an H200: the head groups won only at batch 256 x 2048 and 32 x 128 at batch <= 32;
# run 2 adds per-head variants: deeper or shallower pipelines, smaller and larger blocks; 8 and 16 heads a
# program, each key's heads read as one run of 1-2 KB, lost to one head a program by 25-54% at 256-key caches
# and batch 64-256 in run 16 of RESULTS.md, and are not swept; 64-key blocks two deep put twice the programs
# on a multiprocessor as 128-key ones, for rows of a few blocks (run 16: the engine's rows of 129-145 keys in
# 192-position caches read 53% of the floor, full 256-key caches 90%)); run 3 adds programs with no pipeline
# (one stage: their loads go to registers, no shared-memory ring) on 2 or 4 warps, so that many more of them fit
# on a multiprocessor: a row of one or two blocks spends its time waiting on a few dependent loads (its length, its
# query, its blocks), and only more programs at once hide that (RESULTS run 17: 61-63 us a layer at batch 256
# whether 137 or 250 of 256 keys are valid); one head of 2-8 rows a program, their blocks in one loop
# (`rows_per_program`), lost to the best one-row launch by 5-17% at batch 256 and 64 with ragged 256-key rows
# (RESULTS, attention run 23) and were removed; every head of a row a program (16 at 345M, its K and V read as whole
# 2 KB rows, 16-key blocks) lost at 8 rows too, 103 us against 13 (23 us in 16 chunks), and at 256 rows by 8%
# (RESULTS run 40), and is not swept; 32-key blocks on 4 warps: Nsight Compute found the 256-slot launch (64-key
# blocks) held to 6 programs a multiprocessor by its 79 registers a thread, with no warp ready 68% of the time
# (run 40), and a thread's share of a 32-key tile is half
CANDIDATES = {64: [(1, 128, 4, 3, True, 1056), (1, 64, 4, 4, True, 1056), (1, 128, 4, 2, True, 2112),
                   (1, 256, 8, 2, True, 1056), (4, 64, 4, 3, False, 1056), (1, 64, 4, 2, True, 2112),
                   (1, 128, 4, 1, True, 2112), (1, 128, 2, 1, True, 2112), (1, 64, 2, 1, True, 2112),
                   (1, 128, 4, 1, False, 2112), (1, 32, 4, 2, True, 2112)],
              128: [(1, 128, 4, 3, True, 1056), (1, 64, 4, 4, True, 1056), (1, 128, 4, 2, True, 2112),
                    (2, 64, 4, 3, False, 1056), (4, 32, 8, 3, False, 528)],
              16: [(1, 16, 4, 3, True, 8), (4, 16, 4, 3, False, 8)]}


def splits_for(batch: int, heads: int, group: int, max_seq: int, block_k: int, target: int) -> int:
    """The power of two that brings batch x head groups x splits to `target` programs, each chunk at least
    two blocks long."""
    programs, splits = batch * (heads // group), 1
    while programs * splits < target and max_seq // (splits * 2) >= 2 * block_k:
        splits *= 2
    return splits


def candidates(batch: int, heads: int, head_dim: int, max_seq: int) -> list[tuple]:
    """Distinct (heads_per_program, block_k, num_splits, num_warps, num_stages, use_dot) to time."""
    seen = []
    for group, block_k, warps, stages, use_dot, target in CANDIDATES[head_dim]:
        if heads % group:
            continue
        params = (group, block_k, splits_for(batch, heads, group, max_seq, block_k, target), warps, stages, use_dot)
        if params not in seen:
            seen.append(params)
    return seen


def peers() -> dict:
    out = {"xla": decode_attention_reference}
    if on_gpu():
        out["cudnn"] = lambda q, k, v, n: jax.nn.dot_product_attention(
            q[:, None], k, v, key_value_seq_lengths=n, implementation="cudnn")[:, 0]
    return out


def timing_fields(host_s: float, device_s, kv_bytes: int, bandwidth: float) -> dict:
    """A row's times and rates: by the host clock, and by the device's kernel time where measured."""
    out = {"us": host_s * 1e6, "gbps": kv_bytes / host_s / 1e9, "of_bandwidth": kv_bytes / host_s / bandwidth}
    if device_s:
        out |= {"gpu_us": device_s * 1e6, "gpu_gbps": kv_bytes / device_s / 1e9,
                "gpu_of_bandwidth": kv_bytes / device_s / bandwidth}
    return out


def pick_best(rows: list[dict], tol: float = 3e-2):
    """The fastest correct candidate: by device time when every correct candidate has one, else by the host
    clock (one clock for all, so a failed trace can't favour its candidate)."""
    ok = [r for r in rows if "us" in r and r["rel_err"] < tol]
    if not ok:
        return None
    key = "gpu_us" if all("gpu_us" in r for r in ok) else "us"
    return min(ok, key=lambda r: r[key]) | {"chosen_by": key}


def sweep_shape(batch, heads, head_dim, max_seq, bandwidth, interpret, reps, out, ragged: bool = False):
    """`ragged`: each row's length uniform in [1, max_seq] (a server's mix of short and long sequences) in
    place of full caches; the bytes are the valid K/V's either way."""
    sets = decode_inputs(batch, max_seq, heads, head_dim, ragged=ragged)
    q, kc, vc, lengths = sets[0]
    ref = decode_attention_reference(q.astype(jnp.float32), kc.astype(jnp.float32), vc.astype(jnp.float32), lengths)
    kv_bytes = sum(2 * int(jnp.sum(s[3])) * heads * head_dim * 2 for s in sets) / len(sets)
    rows, nan = [], float("nan")
    for params in candidates(batch, heads, head_dim, max_seq):
        kw = dict(zip(("heads_per_program", "block_k", "num_splits", "num_warps", "num_stages", "use_dot"), params))

        def fn(q, k, v, n, kw=kw):
            return decode_attention(q, k, v, n, interpret=interpret, **kw)
        row = {"batch": batch, "max_seq": max_seq, "heads": heads, "head_dim": head_dim, "ragged": ragged,
               "params": params}
        try:
            row["rel_err"] = rel_err(jax.jit(fn)(q, kc, vc, lengths), ref)
            row |= timing_fields(*timed_device(fn, sets, reps=reps, kernel="decode_attention"), kv_bytes, bandwidth)
        except Exception as e:  # one candidate that fails to compile (shared memory, registers) is skipped
            row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
        rows.append(row)
        out.write(json.dumps(row) + "\n")
        out.flush()
    for name, fn in peers().items():  # beside the candidates, in the same run: XLA (the engine's "xla"), cuDNN
        row = {"batch": batch, "max_seq": max_seq, "heads": heads, "head_dim": head_dim, "ragged": ragged,
               "peer": name}
        try:
            row |= timing_fields(*timed_device(fn, sets, reps=reps), kv_bytes, bandwidth)
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
        out.write(json.dumps(row) + "\n")
        print(f"  peer {name}: {row.get('gbps', nan):.0f} GB/s (device {row.get('gpu_gbps', nan):.0f})", flush=True)
    best = pick_best(rows)
    print(f"b={batch} seq={max_seq} {heads}x{head_dim}: "
          + ", ".join(f"{r['params']} {r.get('gbps', nan):.0f} (device {r.get('gpu_gbps', nan):.0f})" for r in rows)
          + (f" | best by {best['chosen_by']} {best['params']} {best.get('gpu_of_bandwidth', best['of_bandwidth']):.0%}"
             if best else " | none"), flush=True)
    if best:  # which candidate the table takes, and by which clock
        out.write(json.dumps({"batch": batch, "max_seq": max_seq, "heads": heads, "head_dim": head_dim,
                              "chosen": best["params"], "chosen_by": best["chosen_by"]}) + "\n")
    return best


def write_table(path: str, best_rows: list[dict], device: str) -> None:
    """The checked-in table with this run's shapes replaced (a run may sweep only some shapes)."""
    from gptjax.kernels import decode_table

    table = dict(decode_table.TABLE)
    table |= {(r["heads"], r["head_dim"], r["batch"], r["max_seq"]): tuple(r["params"]) for r in best_rows}
    text = (f'"""Decode attention\'s launch parameters by shape, as the sweep measured them '
            f'(`benchmarks/decode_sweep.py`\nwrites this file; edit the sweep, not the table). '
            f'Last swept on {device}, {datetime.date.today().isoformat()};\na run replaces only the shapes it '
            'swept, and RESULTS.md says which run measured each.\n\n'
            '(heads, head_dim, batch, max_seq) -> (heads_per_program, block_k, num_splits, num_warps, '
            'num_stages, use_dot)\n"""\n\n'
            f"DEVICE = {device!r}\n"
            "TABLE: dict[tuple[int, int, int, int], tuple[int, int, int, int, int, bool]] = {\n"
            + "".join(f"    {key}: {value},\n" for key, value in sorted(table.items())) + "}\n")
    with open(path, "w") as f:
        f.write(text)


def _ints(text: str | None) -> list[int]:
    return [int(x) for x in text.split(",")] if text else []


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jsonl", default="decode_sweep.jsonl", help="every candidate's row")
    ap.add_argument("--table", help="write the chosen table (a Python module) here")
    ap.add_argument("--quick", action="store_true", help="one tiny shape (a smoke run, e.g. on CPU)")
    ap.add_argument("--time-limit", type=float, default=1e9, help="seconds: stop starting new shapes after")
    ap.add_argument("--heads", help="only this heads x head_dim, e.g. 16x64")
    ap.add_argument("--seqs", help="these cache lengths in place of the shapes' own, e.g. 256,2048")
    ap.add_argument("--batches", help="these batch sizes in place of the shapes' own, e.g. 64,256")
    ap.add_argument("--ragged", action="store_true",
                    help="time (and choose) on rows of lengths uniform in [1, max_seq] rather than full caches")
    ap.add_argument("--floors", help="the memory bandwidth from this `benchmarks.floors --json` output of the "
                                     "same machine, rather than measured again")
    args = ap.parse_args(argv)
    interpret = not on_gpu()
    started = time.perf_counter()
    if args.floors:
        with open(args.floors) as f:
            bandwidth = json.load(f)["memory_bytes_per_s"]
    else:
        bandwidth = floors.memory_bandwidth()
    device = jax.devices()[0].device_kind
    print(f"{device}: memory bandwidth {bandwidth / 1e9:.0f} GB/s", flush=True)
    best_rows = []
    with open(args.jsonl, "a") as out:
        for (heads, head_dim), (batches, seqs) in (QUICK_SHAPES if args.quick else SHAPES).items():
            if args.heads and args.heads != f"{heads}x{head_dim}":
                continue
            for max_seq in _ints(args.seqs) or seqs:
                for batch in _ints(args.batches) or batches:
                    if time.perf_counter() - started > args.time_limit:
                        break
                    best = sweep_shape(batch, heads, head_dim, max_seq, bandwidth, interpret, 3 if args.quick else 7,
                                       out, args.ragged)
                    if best:
                        best_rows.append(best)
    if args.table:
        write_table(args.table, best_rows, device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
