"""Attention kernels on one GPU: check, then time ours against `jax.nn.dot_product_attention` (XLA, cuDNN).

    python -m benchmarks.kernels [--json OUT.json] [--sweep] [--quick] [--prefill-dtypes bfloat16,float16]

Prefill: causal self-attention, TFLOP/s counted as 2*b*h*s*s*d (the causal half of 4*b*h*s*s*d); ours are
the Triton kernel and, on Hopper, the Mosaic GPU one; in fp16 JAX's `attention_mgpu` example is a peer too.
Decode: one bf16 query per sequence against a bf16 cache, GB/s counted over the valid K/V entries (each read
once), next to the device's memory bandwidth measured in the same run (`benchmarks.floors`: the larger of
its copy rate, read + written bytes, and its read rate), so no row can honestly pass 100%.
Every number is a median over repeated runs after a warm-up; each run goes through several independent input
sets in one dispatch (so that launch overhead is amortised and no input is still in L2 from the run before).
On a GPU every row also has the device's own time: a dispatch under the profiler, its kernels' durations
summed (the decode kernel with what runs around it, XLA's or cuDNN's fusions alike) and divided by the input sets
(`gpu_us` / `gpu_ms`, and the rates from it, beside the host clock's `us` / `ms`): at the small shapes the host
clock holds launch and dispatch jitter. Decode takes one such dispatch; prefill, where ours and the peers are
within a few percent, the median of `--rounds` dispatches per implementation, interleaved with the others'.
Off a GPU the trace has no kernels and those fields are absent.
`--sweep` also times other block shapes; `--quick` is a small smoke run (interpret mode on CPU).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import re
import statistics
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from gptjax.kernels import decode_attention, decode_attention_reference, flash_attention, on_gpu, on_hopper
from gptjax.kernels.flash_attention_hopper import hopper_flash_attention, hopper_flash_attention_qkv
from benchmarks import floors
from benchmarks.gpu_time import gpu_busy_seconds, host_seconds
from gptjax.kernels.decode_attention import choose_params

PREFILL_SHAPES = [(8, 512, 16, 64), (4, 2048, 16, 64), (2, 4096, 32, 128), (1, 8192, 32, 128)]
DECODE_BATCHES = [1, 8, 32, 64, 128, 256]
DECODE_CONTEXTS = [512, 2048, 8192]
# (block_q, block_k, num_warps, num_stages, heads_first)
PREFILL_SWEEP = {64: [(128, 64, 8, 3, False), (128, 64, 4, 3, True), (64, 64, 4, 3, False),
                      (128, 128, 4, 3, False), (128, 64, 8, 4, True)],
                 128: [(128, 128, 8, 3, False), (128, 128, 8, 3, True), (128, 64, 8, 3, False),
                       (128, 128, 8, 4, False)]}
# (block_k, num_warps, num_stages, use_dot, num_splits or None for the default)
DECODE_SWEEP = [(128, 4, 3, False, None), (64, 4, 3, True, None), (128, 4, 3, True, None),
                (128, 8, 3, True, None), (256, 8, 3, True, None), (128, 8, 3, False, "x2"), (128, 8, 3, False, "x4"),
                (128, 4, 3, True, "x2")]
# the Mosaic GPU kernel's variants timed beside its default (persistent, snake order, the next tile's queries
# prefetched; 128-key blocks, 3 stages at head_dim 64, 2 at 128 with the next block's wait inside PV), by
# head_dim: one query buffer (no prefetch), at 128 the wait at the top of the next block (no wait in PV),
# one tile per program (not persistent), run 6's next steps (RESULTS.md), the next key block's wait inside the PV
# product and a fence after the softmax (alone and together; `attention_mgpu` has both at head_dim <= 128) and,
# at 64, larger key blocks (shared memory holds 4 stages of 192 keys, 3 of 256: `flash_attention_hopper.smem_bytes`);
# at 128, a third stage in place of the second query buffer, and (2-22% slower in runs 14-15 by one traced
# dispatch each; timed again by the interleaved rounds) one tile a program and 64-key blocks four deep (the fence
# alone, and FlashAttention-3's pipelining within each consumer, 10-14% slower at both head dims in run 16 (its
# code is in f92219e), are not timed now); at both, consumer 0's block on the diagonal read to its first half only
# (at 128 also with the stagger carried, so that consumer 0 can spend the half block it saves on the next tile),
# and every head's longest tiles first (the order before the tiles went one head after another, `head_major`)
WAIT = dict(wait_in_pv=True)
FENCE = dict(wait_in_pv=True, fence_softmax=True)
NO_PREFETCH = dict(prefetch_q=False)
A_TILE_A_PROGRAM = dict(programs=1 << 30)  # not persistent: the hardware hands out tiles, longest first
RESYNC = dict(carry_stagger=False)  # the consumers meet at each tile's end (the default at head_dim 128)
CARRY = dict(carry_stagger=True)  # the stagger runs on from tile to tile (the default at head_dim 64)
HALF = dict(half_diagonal=True)  # no product or softmax over a block's half that is after all of the rows
LEVELS = dict(head_major=False)  # every head's longest tiles first (the order before run 22), not head by head
HOPPER_SWEEP = {64: {"hopper(resync each tile)": RESYNC, "hopper(no prefetch)": NO_PREFETCH,
                     "hopper(a tile a program)": A_TILE_A_PROGRAM,
                     "hopper(wait in PV)": WAIT,
                     "hopper(wait in PV, fence)": FENCE,
                     "hopper(192, 2)": dict(block_kv=192, stages=2), "hopper(256, 2)": dict(block_kv=256, stages=2),
                     "hopper(192, 2, wait in PV, fence)": dict(block_kv=192, stages=2, **FENCE),
                     "hopper(half diagonal)": HALF, "hopper(longest first)": LEVELS},
                128: {"hopper(stagger carried)": CARRY,
                      "hopper(no wait in PV)": dict(wait_in_pv=False), "hopper(wait in PV, fence)": FENCE,
                      "hopper(a tile a program)": A_TILE_A_PROGRAM, "hopper(64, 4)": dict(block_kv=64, stages=4),
                      "hopper(no prefetch)": NO_PREFETCH,
                      "hopper(no prefetch, 3 stages)": dict(NO_PREFETCH, stages=3),
                      "hopper(no prefetch, 3 stages, wait in PV)": dict(NO_PREFETCH, stages=3, **WAIT),
                      "hopper(half diagonal)": HALF, "hopper(half diagonal, stagger carried)": dict(HALF, **CARRY),
                      "hopper(longest first)": LEVELS}}
# the ragged float64 checks of the Mosaic GPU kernel: name -> (keywords, the head_dims it runs at); the
# variants' code paths: the waits' order with ragged tiles in persistent programs (7 programs: several tiles
# each at the checks' shapes), with and without the prefetched queries, the padding to whole 192-key blocks
# (384 rows), and the half-read diagonal block at 128 and 256 keys (ragged rows end inside such blocks too)
HOPPER_CHECKS = {"hopper": ({}, (64, 128)), "hopper(7 programs)": (dict(programs=7), (64, 128)),
                 "hopper(resync each tile, 7 programs)": (dict(RESYNC, programs=7), (64,)),
                 "hopper(stagger carried, 7 programs)": (dict(CARRY, programs=7), (128,)),
                 "hopper(no prefetch, 7 programs)": (dict(prefetch_q=False, programs=7), (64, 128)),
                 "hopper(no wait in PV, 7 programs)": (dict(wait_in_pv=False, programs=7), (128,)),
                 "hopper(wait in PV, fence)": (FENCE, (64, 128)),
                 "hopper(192, 2, wait in PV, fence)": (dict(block_kv=192, stages=2, **FENCE), (64,)),
                 "hopper(half diagonal, 7 programs)": (dict(HALF, programs=7), (64, 128)),
                 "hopper(256, 2, half diagonal)": (dict(block_kv=256, stages=2, **HALF), (64,)),
                 "hopper(longest first, 7 programs)": (dict(LEVELS, programs=7), (64, 128))}
MEM_BUDGET = 6 << 30  # bytes of input sets per timed function


def timed(fn, sets, reps=7, warmup=2):
    """Median seconds per call of fn over the input sets (all sets in one jitted dispatch), by the host clock."""
    return host_seconds(jax.jit(lambda sets: [fn(*s) for s in sets]), sets, reps, warmup)


def timed_device(fn, sets, reps=7, warmup=2, kernel: str | None = None):
    """(host seconds, device seconds or None) per call of fn: the host clock as `timed`, and the summed GPU
    kernel time of one more dispatch of all the sets in a profiler trace, over the sets (None off a GPU, or
    when the trace fails or holds no kernels). `kernel`: only the kernels whose names hold it."""
    run = jax.jit(lambda sets: [fn(*s) for s in sets])
    host = host_seconds(run, sets, reps, warmup)
    busy = traced_seconds(run, sets, kernel=kernel)
    return host, (busy / len(sets) if busy else None)


def traced_seconds(run, sets, what: str = "", kernel: str | None = None):
    """`gpu_busy_seconds(run, sets, kernel)`, or None where the trace fails: the profiler is a second opinion, and
    its failure must not lose the host clock's number."""
    try:
        return gpu_busy_seconds(run, sets, kernel)
    except Exception as e:
        print(f"device timing{' of ' + what if what else ''} failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
        return None


def device_fields(device_s, amount, unit: str, scale: float) -> dict:
    """The device-time fields of a row: gpu_us (or gpu_ms) and the rate `amount / time` in `unit` / scale."""
    if device_s is None:
        return {}
    key = "gpu_ms" if unit == "tflops" else "gpu_us"
    return {key: device_s * (1e3 if key == "gpu_ms" else 1e6), f"gpu_{unit}": amount / device_s / scale}


def n_sets(set_bytes, most=8):
    return max(2, min(most, MEM_BUDGET // max(set_bytes, 1)))


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))




# ---- correctness on ragged inputs, against float64 on the host -----------------------------------------
def prefill_reference64(q, k, v, lengths):
    q64, k64, v64 = (np.asarray(x, np.float64) for x in (q, k, v))
    s, d = q64.shape[1], q64.shape[-1]
    sc = np.einsum("bqhd,bkhd->bhqk", q64, k64) / math.sqrt(d)
    pos = np.arange(s)
    mask = (pos[None, :] <= pos[:, None])[None, None] & (pos[None, None, None, :] < lengths[:, None, None, None])
    sc = np.where(mask, sc, -np.inf)
    p = np.exp(sc - sc.max(-1, keepdims=True))
    return np.einsum("bhqk,bkhd->bqhd", p / p.sum(-1, keepdims=True), v64)


class RaggedCases:
    """Ragged prefill inputs and their float64 answers, drawn once per (dtype, shape) and shared by every kernel
    checked on them (the float64 reference of a 4096-token row takes seconds on the host)."""

    def __init__(self, rng):
        self.rng, self.cases = rng, {}

    def get(self, dtype, shape):
        if (dtype, shape) not in self.cases:
            b, s = shape[:2]
            q, k, v = (jnp.asarray(self.rng.standard_normal(shape), dtype) for _ in range(3))
            lengths = self.rng.integers(1, s + 1, size=b).astype(np.int32)
            lengths[0] = s
            self.cases[dtype, shape] = (q, k, v, lengths, prefill_reference64(q, k, v, lengths))
        return self.cases[dtype, shape]


def check_prefill(name, kernel, dtypes, shapes, cases: RaggedCases, tol):
    """One row per dtype and shape: (name, dtype, shape, the worst row's relative error, within tolerance),
    each printed as it comes (a run cut short by its time limit still says which passed)."""
    rows = []
    for dtype in dtypes:
        for shape in shapes:
            q, k, v, lengths, ref = cases.get(dtype, shape)
            try:
                out = np.asarray(kernel(q, k, v, jnp.asarray(lengths)), np.float64)
                err = max(rel_err(out[i, :n], ref[i, :n]) for i, n in enumerate(lengths))
            except Exception as e:  # a kernel that does not build is a failed check, not a crashed run
                traceback.print_exc(limit=4)
                print(f"check {name} failed to run: {type(e).__name__}: {str(e)[:2000]}", flush=True)
                err = float("nan")
            rows.append((name, jnp.dtype(dtype).name, tuple(shape), err, bool(err < tol[dtype])))
            print("check", *rows[-1], flush=True)
    return rows


def check_ragged(interpret, which="all", only=None):
    """which: "all", or "hopper" (only the Mosaic GPU kernel's checks); `only`: `--only`'s names, which select
    among the Mosaic GPU kernel's checks too."""
    rng = np.random.default_rng()
    cases = RaggedCases(rng)
    tol = {jnp.float32: 2e-3, jnp.bfloat16: 3e-2, jnp.float16: 3e-2}
    dtypes = (jnp.float32, jnp.bfloat16, jnp.float16)
    rows = []
    if which == "all":
        rows += check_prefill("flash", lambda q, k, v, n: flash_attention(q, k, v, lengths=n, interpret=interpret),
                              dtypes, [(3, 1000, 4, 64), (2, 300, 2, 128), (2, 77, 3, 80)], cases, tol)
    if on_hopper():  # the default (persistent) and the timed variants' code paths
        for name, (kw, dims) in HOPPER_CHECKS.items():
            if only and not selected(name, only):
                continue
            shapes = [x for x in [(3, 1000, 4, 64), (2, 300, 2, 128), (1, 4096, 2, 64)] if x[-1] in dims]
            rows += check_prefill(name, lambda q, k, v, n, kw=kw: hopper_flash_attention(q, k, v, lengths=n, **kw),
                                  (jnp.bfloat16, jnp.float16), shapes, cases, tol)
        if not only or selected("hopper_qkv", only):  # the engine's form: the QKV product's output read in place
            rows += check_prefill("hopper_qkv", lambda q, k, v, n: hopper_flash_attention_qkv(
                jnp.stack([q, k, v], axis=2), lengths=n), (jnp.bfloat16, jnp.float16),
                [(3, 1000, 4, 64), (2, 300, 2, 128)], cases, tol)
    for dtype in dtypes if which == "all" else ():
        for b, s, h, d in [(5, 3000, 8, 64), (2, 1000, 4, 128), (64, 700, 4, 64), (8, 640, 16, 64)]:
            q = jnp.asarray(rng.standard_normal((b, h, d)), dtype)
            kc, vc = (jnp.asarray(rng.standard_normal((b, s, h, d)), dtype) for _ in range(2))
            lengths = rng.integers(1, s + 1, size=b).astype(np.int32)
            out = np.asarray(decode_attention(q, kc, vc, jnp.asarray(lengths), interpret=interpret), np.float64)
            q64, k64, v64 = (np.asarray(x, np.float64) for x in (q, kc, vc))
            sc = np.einsum("bhd,bkhd->bhk", q64, k64) / math.sqrt(d)
            sc = np.where(np.arange(s)[None, None, :] < lengths[:, None, None], sc, -np.inf)
            p = np.exp(sc - sc.max(-1, keepdims=True))
            ref = np.einsum("bhk,bkhd->bhd", p / p.sum(-1, keepdims=True), v64)
            err = rel_err(out, ref)
            rows.append(("decode", jnp.dtype(dtype).name, (b, s, h, d), err, err < tol[dtype]))
            print("check", *rows[-1], flush=True)
    return rows


# ---- prefill -------------------------------------------------------------------------------------------
def attention_mgpu_peer(block_kv):
    """JAX's own Mosaic GPU attention example (fp16 only: its shared-memory tiles are fp16; no 1/sqrt(d)
    scale, which changes nothing in its timing)."""
    from jax.experimental.pallas.ops.gpu import attention_mgpu

    config = attention_mgpu.TuningConfig(block_q=64, block_kv=block_kv, max_concurrent_steps=2, causal=True)
    return lambda q, k, v: attention_mgpu.attention(q, k, v, config=config)


def prefill_impls(interpret, sweep, dtype, head_dim):
    impls = {"xla": lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")}
    if on_gpu():
        impls["cudnn"] = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                                      implementation="cudnn")
    configs = [None] + (PREFILL_SWEEP[head_dim] if sweep else [])
    for cfg in configs:
        kw = {} if cfg is None else dict(zip(("block_q", "block_k", "num_warps", "num_stages", "heads_first"), cfg))
        impls["pallas" if cfg is None else "pallas" + str(cfg)] = (
            lambda q, k, v, kw=kw: flash_attention(q, k, v, interpret=interpret, **kw))
    if on_hopper():
        for name, kw in {"hopper": {}, **HOPPER_SWEEP.get(head_dim, {})}.items():
            impls[name] = lambda q, k, v, kw=kw: hopper_flash_attention(q, k, v, **kw)
        if jnp.dtype(dtype) == jnp.float16:
            for block_kv in (64, 128):
                impls[f"attention_mgpu({block_kv})"] = attention_mgpu_peer(block_kv)
    return impls


def only_names(text: str | None) -> list[str] | None:
    """`--only`'s comma-separated names; a comma inside parentheses is part of a name ("hopper(wait in PV, fence)")."""
    return [name.strip() for name in re.split(r",(?![^()]*\))", text)] if text else None


def selected(name: str, only: list[str]) -> bool:
    """`--only`'s test: the name is listed, or starts with a listed prefix that ends in '*'."""
    return name in only or any(p.endswith("*") and name.startswith(p[:-1]) for p in only)


def interleaved_device_seconds(runs: dict, sets, rounds: int) -> dict:
    """name -> the device seconds per input set of each of `rounds` traced calls of runs[name] (each one jitted
    call over all the sets), taken in rounds that call every function once, in an order rotated each round:
    the GPU's clocks and temperature drift over a run, and timing one function's calls back to back would hand
    that drift to whichever came last. Empty off a GPU (the trace has no kernels)."""
    names, times = list(runs), {name: [] for name in runs}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            busy = traced_seconds(runs[name], sets, name)
            if busy is None:
                return {}
            times[name].append(busy / len(sets))
    return times


def prefill(shapes, sweep, interpret, reps, dtype=jnp.bfloat16, only=None, deadline=math.inf, rounds=5):
    """Rows of every implementation at every shape: each one checked and timed by the host clock, then all of
    a shape's implementations timed on the device in interleaved rounds (`interleaved_device_seconds`; the row
    keeps every round and the median). Past `deadline` (time.perf_counter()) the rest are marked skipped rather
    than run, so that a time-limited run still writes its JSON."""
    results = []
    for b, s, h, d in shapes:
        flops = 2.0 * b * h * s * s * d
        set_bytes = 3 * b * s * h * d * 2
        keys = jax.random.split(jax.random.key(s + b), 3 * n_sets(set_bytes))
        arrs = [jax.random.normal(kk, (b, s, h, d), dtype) for kk in keys]
        sets = [tuple(arrs[3 * i:3 * i + 3]) for i in range(len(arrs) // 3)]
        q, k, v = sets[0]
        ref = jax.nn.dot_product_attention(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32),
                                           is_causal=True, implementation="xla")
        unscaled = jax.nn.dot_product_attention(q.astype(jnp.float32), k.astype(jnp.float32),
                                                v.astype(jnp.float32), is_causal=True, scale=1.0,
                                                implementation="xla")
        row = {"shape": [b, s, h, d], "dtype": jnp.dtype(dtype).name, "impl": {}}
        runs = {}
        for name, fn in prefill_impls(interpret, sweep, dtype, d).items():
            if only and not selected(name, only):
                continue
            if time.perf_counter() > deadline:
                row["impl"][name] = {"skipped": "time limit"}
                continue
            try:
                err = rel_err(jax.jit(fn)(q, k, v), unscaled if name.startswith("attention_mgpu") else ref)
                runs[name] = jax.jit(lambda sets, fn=fn: [fn(*s) for s in sets])
                t = host_seconds(runs[name], sets, reps, warmup=2)
                row["impl"][name] = {"ms": t * 1e3, "tflops": flops / t / 1e12, "rel_err": err}
            except Exception as e:  # one failing variant must not sink the run
                row["impl"][name] = {"error": f"{type(e).__name__}: {str(e)[:2000]}"}
                runs.pop(name, None)
                traceback.print_exc(limit=4)
            print(f"prefill {(b, s, h, d)} {row['dtype']} {name}: {row['impl'][name]}", flush=True)
        if runs and time.perf_counter() < deadline:
            for name, times in interleaved_device_seconds(runs, sets, rounds).items():
                row["impl"][name] |= {"gpu_ms_rounds": [round(t * 1e3, 4) for t in times],
                                      **device_fields(statistics.median(times), flops, "tflops", 1e12)}
                cell = row["impl"][name]
                print(f"prefill {(b, s, h, d)} {row['dtype']} {name} on the device: {cell['gpu_tflops']:.0f} "
                      f"TFLOP/s (rounds {cell['gpu_ms_rounds']} ms)", flush=True)
        del sets, arrs, runs
        results.append(row)
    return results


# ---- decode --------------------------------------------------------------------------------------------
def decode_inputs(b, ctx, h, d, ragged=False, cache_len=None):
    """Input sets: caches of `cache_len` positions (default ctx), of which `ctx` (or fewer, ragged) are valid."""
    cache_len = cache_len or ctx
    set_bytes = 2 * b * cache_len * h * d * 2
    sets = []
    for i in range(n_sets(set_bytes)):
        kq, kk, kv, kl = jax.random.split(jax.random.key(1000 * i + b + ctx), 4)
        lengths = (jax.random.randint(kl, (b,), 1, ctx + 1) if ragged else jnp.full((b,), ctx)).astype(jnp.int32)
        sets.append((jax.random.normal(kq, (b, h, d), jnp.bfloat16),
                     jax.random.normal(kk, (b, cache_len, h, d), jnp.bfloat16),
                     jax.random.normal(kv, (b, cache_len, h, d), jnp.bfloat16), lengths))
    return sets


def decode_one(b, ctx, h, d, impls, reps, ragged=False, cache_len=None):
    sets = decode_inputs(b, ctx, h, d, ragged, cache_len)
    q, kc, vc, lengths = sets[0]
    ref = decode_attention_reference(q.astype(jnp.float32), kc.astype(jnp.float32), vc.astype(jnp.float32), lengths)
    valid_bytes = float(sum(2 * int(jnp.sum(s[3])) * h * d * 2 for s in sets)) / len(sets)
    row = {"batch": b, "context": ctx, "cache_len": cache_len or ctx, "heads": h, "head_dim": d, "ragged": ragged,
           "impl": {}}
    for name, fn in impls.items():
        try:
            err = rel_err(jax.jit(fn)(q, kc, vc, lengths), ref)
            t, dev = timed_device(fn, sets, reps=reps)
            row["impl"][name] = {"us": t * 1e6, "gbps": valid_bytes / t / 1e9, "rel_err": err,
                                 **device_fields(dev, valid_bytes, "gbps", 1e9)}
        except Exception as e:
            row["impl"][name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            traceback.print_exc(limit=2)
    print(f"decode b={b} ctx={ctx} cache={cache_len or ctx} h={h} d={d} ragged={ragged}: "
          + ", ".join(f"{n} {v.get('gbps', float('nan')):.0f} GB/s (device {v.get('gpu_gbps', float('nan')):.0f})"
                      for n, v in row["impl"].items()), flush=True)
    return row


def decode_impls(interpret, sweep):
    impls = {"pallas": lambda q, k, v, n: decode_attention(q, k, v, n, interpret=interpret),
             "xla": decode_attention_reference}
    if on_gpu():
        impls["cudnn"] = lambda q, k, v, n: jax.nn.dot_product_attention(
            q[:, None], k, v, key_value_seq_lengths=n, implementation="cudnn")[:, 0]
    for cfg in (DECODE_SWEEP if sweep else []):
        bk, w, st, dot, sp = cfg

        def fn(q, k, v, n, bk=bk, w=w, st=st, dot=dot, sp=sp):
            splits = None
            if sp is not None:
                splits = int(sp[1:]) * choose_params(q.shape[0], q.shape[1], k.shape[1], q.shape[2]).num_splits
            return decode_attention(q, k, v, n, interpret=interpret, block_k=bk, num_warps=w, num_stages=st,
                                    use_dot=dot, num_splits=splits, heads_per_program=1)
        impls[f"pallas{cfg}"] = fn
    return impls


# (batch, valid keys, cache length, heads, head_dim) for `--loops`: the engine's caches after a 128-token prompt
# (256 positions for 128 new tokens, 192 for 64), after a 512-token one (576 positions) and long ones
LOOP_SHAPES = [(256, 137, 256, 16, 64), (256, 250, 256, 16, 64), (64, 137, 192, 16, 64), (8, 528, 576, 16, 64),
               (32, 528, 576, 16, 64), (8, 2100, 2112, 16, 64), (32, 2100, 2112, 16, 64), (1, 140, 192, 32, 128),
               (32, 528, 576, 32, 128)]
LOOP_SHAPES_QUICK = [(4, 40, 64, 2, 16)]


def loop_impls(interpret):
    """Decode attention with the table's launch, its chunks walked in one loop and in two (`SINGLE_LOOP`)."""
    return {f"pallas({'one' if single else 'two'} loop{'' if single else 's'})":
            lambda q, k, v, n, single=single: decode_attention(q, k, v, n, interpret=interpret, single_loop=single)
            for single in (True, False)}


def decode(interpret, sweep, reps, quick, deadline=math.inf):
    """The decode table (and the sweep's points with `sweep`); no new shape starts past `deadline`."""
    rows = []
    if quick:
        grid = [(2, 256, 4, 64), (8, 512, 4, 64)]
        sweep_points = grid[:1]
    else:
        # by context, shortest first (a run cut short by its deadline loses the longest), both head shapes
        grid = [(b, c, h, d) for c in DECODE_CONTEXTS
                for h, d, batches in ((16, 64, DECODE_BATCHES), (32, 128, (1, 32, 64))) for b in batches]
        sweep_points = [(8, 8192, 16, 64), (32, 2048, 16, 64), (32, 8192, 16, 64), (64, 2048, 32, 128)]
    if sweep:
        swept = decode_impls(interpret, True)
        for b, c, h, d in sweep_points:
            if time.perf_counter() < deadline:
                rows.append(decode_one(b, c, h, d, swept, reps) | {"sweep": True})
    plain = decode_impls(interpret, False)
    for b, c, h, d in grid:
        if time.perf_counter() < deadline:
            rows.append(decode_one(b, c, h, d, plain, reps))
    b, c = (4, 512) if quick else (64, 8192)
    if time.perf_counter() < deadline:
        rows.append(decode_one(b, c, 16, 64, plain, reps, ragged=True))
    return rows


# ---- report --------------------------------------------------------------------------------------------
def markdown(env, checks, copy_bw, prefill_rows, decode_rows):
    out = [f"Device: {env['device']}; {env['date']}; jax {env['jax']}, jaxlib {env['jaxlib']}, "
           f"Python {env['python']}. Medians of repeated runs after warm-up, all numbers from one run.", ""]
    bad = [c for c in checks if not c[4]]
    worst = "; ".join(f"worst {dtype} {max(c[3] for c in checks if c[1] == dtype):.1e}"
                      for dtype in ("float32", "bfloat16", "float16") if any(c[1] == dtype for c in checks))
    out.append(f"Correctness (ragged lengths vs float64 on the host): {len(checks) - len(bad)}/{len(checks)} "
               f"within tolerance{'; ' + worst if worst else ''}." if checks else
               "Correctness: not checked in this run (`--checks none`); each timed row's rel_err against float32 is "
               "in the JSON.")
    for r in prefill_rows:
        if r is prefill_rows[0] or r["dtype"] != prefill_rows[prefill_rows.index(r) - 1]["dtype"]:
            out += ["", f"Prefill, causal, {r['dtype']}, TFLOP/s (by the device's kernel time where measured):", "",
                    "| (b, s, h, d) | XLA | cuDNN | attention_mgpu (best) | ours, Triton | ours, Hopper | "
                    "ours, Hopper best swept | best ours / cuDNN | best ours / attention_mgpu |",
                    "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        im = {n: {"tflops": v.get("gpu_tflops", v["tflops"])} for n, v in r["impl"].items() if "tflops" in v}
        def tf(name, im=im):
            return im.get(name, {}).get("tflops", float("nan"))

        def best_of(prefix, im=im):
            return max([v["tflops"] for n, v in im.items() if n.startswith(prefix) and "tflops" in v],
                       default=float("nan"))
        peer = best_of("attention_mgpu")
        swept = {n: v["tflops"] for n, v in im.items() if n.startswith("hopper(") and "tflops" in v}
        best_swept = max(swept, key=swept.get) if swept else None
        swept_txt = f"{best_swept[6:]} {swept[best_swept]:.0f}" if best_swept else "-"
        ours = max(best_of("hopper"), best_of("pallas"))
        out.append(f"| {tuple(r['shape'])} | {tf('xla'):.0f} | {tf('cudnn'):.0f} | {peer:.0f} | {tf('pallas'):.0f} | "
                   f"{tf('hopper'):.0f} | {swept_txt} | {ours / tf('cudnn'):.2f} | {ours / peer:.2f} |")
    out += ["", "Decode, bf16, GB/s over the valid K/V bytes by the device's kernel time where measured "
            f"(fraction of the {copy_bw / 1e9:.0f} GB/s memory bandwidth, the larger of the measured copy and read "
            "rates), and ours by the host clock; XLA is the engine's `jnp` reference:", "",
            "| batch | context | heads x dim | Pallas (ours) | of bandwidth | XLA | cuDNN | ours us "
            "| ours, host clock | host us |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in decode_rows:
        if r.get("sweep"):
            continue
        im = r["impl"]
        def gb(name, key="gbps", im=im):  # the device's number where measured, else the host clock's
            v = im.get(name, {})
            return v.get(f"gpu_{key}", v.get(key, float("nan")))
        ctx = f"{r['context']}" + (" (ragged)" if r["ragged"] else "")
        host = im.get("pallas", {})
        out.append(f"| {r['batch']} | {ctx} | {r['heads']}x{r['head_dim']} | {gb('pallas'):.0f} | "
                   f"{gb('pallas') * 1e9 / copy_bw:.0%} | {gb('xla'):.0f} | {gb('cudnn'):.0f} | "
                   f"{gb('pallas', 'us'):.1f} | {host.get('gbps', float('nan')):.0f} | "
                   f"{host.get('us', float('nan')):.1f} |")
    sweeps = [r for r in decode_rows if r.get("sweep")]
    if sweeps:
        out += ["", "Decode sweep (block_k, num_warps, num_stages), GB/s (device time where measured):", ""]
        for r in sweeps:
            cells = ", ".join(f"{n[6:] or 'default'} {v.get('gpu_gbps', v['gbps']):.0f}" for n, v in r["impl"].items()
                              if n.startswith("pallas") and "gbps" in v)
            out.append(f"- b={r['batch']} ctx={r['context']} {r['heads']}x{r['head_dim']}: {cells}")
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write every number here")
    ap.add_argument("--sweep", action="store_true", help="also time other block shapes")
    ap.add_argument("--quick", action="store_true", help="small shapes (a smoke run, e.g. on CPU)")
    ap.add_argument("--skip-decode", action="store_true")
    ap.add_argument("--skip-prefill", action="store_true")
    ap.add_argument("--checks", choices=("all", "hopper", "none"), default="all")
    ap.add_argument("--only", help="comma-separated names: time (and check) only these prefill implementations (a "
                                   "trailing * takes every name it starts: hopper* is the Mosaic GPU kernel and its "
                                   "variants)")
    ap.add_argument("--prefill-shapes", help="comma-separated b x s x h x d, e.g. 1x8192x32x128 (default: the four "
                                             "of PREFILL_SHAPES)")
    ap.add_argument("--time-limit", type=float, default=math.inf,
                    help="seconds from the start: no new prefill timing or decode shape after (the JSON is still "
                         "written; skipped prefill rows say so)")
    ap.add_argument("--prefill-dtypes", default="bfloat16",
                    help="comma-separated; float16 adds JAX's attention_mgpu (fp16 only) as a peer")
    ap.add_argument("--rounds", type=int, default=5,
                    help="prefill: interleaved rounds of device timing per shape (the median is reported)")
    ap.add_argument("--loops", action="store_true",
                    help="only: decode attention walking its chunks in one masked loop against two (whole blocks, "
                         "then the crossing one), at rows the engine makes: a few keys into a block of its cache")
    ap.add_argument("--cache-spread", action="store_true",
                    help="only: the same valid K/V (64 sequences of 192 keys, 16 x 64) in caches of 256, 640 and "
                         "2048 positions, to see what the cache's length costs when the bytes read are equal")
    args = ap.parse_args(argv)
    deadline = time.perf_counter() + args.time_limit
    interpret = not on_gpu()
    reps = 3 if args.quick else 7
    if args.loops:
        for b, ctx, cache_len, h, d in LOOP_SHAPES_QUICK if args.quick else LOOP_SHAPES:
            decode_one(b, ctx, h, d, loop_impls(interpret), reps, cache_len=cache_len)
        return 0
    if args.cache_spread:
        b, ctx, caches = (4, 24, (32, 80)) if args.quick else (64, 192, (256, 640, 2048))
        for cache_len in caches:
            decode_one(b, ctx, 16, 64, decode_impls(interpret, False), reps, cache_len=cache_len)
        return 0
    import jaxlib

    env = {"device": str(jax.devices()[0].device_kind), "date": datetime.date.today().isoformat(),
           "jax": jax.__version__, "jaxlib": jaxlib.__version__, "python": platform.python_version()}
    print(env, flush=True)
    only = only_names(args.only)
    checks = check_ragged(interpret, args.checks, only) if not (args.quick or args.checks == "none") else []
    rates = {} if args.skip_decode else floors.measure(with_torch=on_gpu())
    copy_bw = rates.get("memory_bytes_per_s", float("nan"))  # the larger of copy and read: decode only reads
    print(f"floors {rates}", flush=True)
    shapes = [(2, 128, 2, 64), (1, 256, 2, 128)] if args.quick else PREFILL_SHAPES
    if args.prefill_shapes:
        shapes = [tuple(map(int, shape.split("x"))) for shape in args.prefill_shapes.split(",")]
    global MEM_BUDGET
    if args.quick:
        MEM_BUDGET = 1 << 20
    prefill_rows = [] if args.skip_prefill else [
        row for dtype in args.prefill_dtypes.split(",") for row in prefill(shapes, args.sweep, interpret, reps,
                                                                           jnp.dtype(dtype), only, deadline,
                                                                           args.rounds)]
    decode_rows = [] if args.skip_decode else decode(interpret, args.sweep, reps, args.quick, deadline)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"env": env, "checks": checks, "copy_bw": copy_bw, "rates": rates, "prefill": prefill_rows,
                       "decode": decode_rows}, f, indent=1, default=str)
    print(markdown(env, checks, copy_bw, prefill_rows, decode_rows))
    return 0 if all(c[4] for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
