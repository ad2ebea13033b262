"""What a decode attention launch's device time follows: the keys each row reads, or the programs it runs.

    python -m benchmarks.attention_probe [--batch 256] [--cache-len 256] [--lengths 1,32,64,128,192,256]

Every row of a run has the same length, so each program walks the same number of key blocks. One JSON line per
launch: its parameters, the device time (`gpu_us`, kernels only, per input set, `benchmarks.kernels.timed_device`),
the host clock's `us`, GB/s over the valid K/V bytes, and the relative error against the `jnp` reference. The
`append` variants time `decode_attention_append`, the engine's form; `gpu_us` is the attention kernel's alone (XLA
copies the caches around that launch's in-place update, and gathers its new key and value). If the
time stays flat as the lengths grow, a launch's cost is its programs' fixed work (their start, their query and
length loads, their stores), not the keys they read, and fewer, longer programs are the lever; if it grows with the
keys, the bytes are.
"""

from __future__ import annotations

import argparse
import functools
import json

import jax
import jax.numpy as jnp

from benchmarks.kernels import rel_err, timed_device
from gptjax.kernels import decode_attention, decode_attention_append, decode_attention_reference, on_gpu

# launches beside the table's own ("table"), each the keyword arguments it overrides: what changes the programs'
# count or their weight
VARIANTS = {
    "table": {},
    "no_early_launch": {"early_launch": False},
    "warps_2_stages_1": {"num_warps": 2, "num_stages": 1},
    "warps_4_stages_1": {"num_warps": 4, "num_stages": 1},
    "block_32": {"block_k": 32},
    "block_128": {"block_k": 128},
    "elementwise": {"use_dot": False},
    "heads_2": {"heads_per_program": 2, "use_dot": False},
    "heads_4": {"heads_per_program": 4, "use_dot": False},
    # every head of a row a program (16 at 345M): each key's heads one contiguous 2 KB run, where one head a program
    # reads 128 bytes of every 2 KB; 16-key blocks two deep keep the K and V tiles (32 KB each) and the block-diagonal
    # query in shared memory; at 8 rows the split gives 128 programs. Both lost on an H100 (RESULTS run 40)
    "rows": {"heads_per_program": 16, "block_k": 16, "num_warps": 8, "num_stages": 2},
    "rows_splits_16": {"heads_per_program": 16, "block_k": 16, "num_warps": 8, "num_stages": 2, "num_splits": 16},
    "splits_2": {"num_splits": 2},
    "splits_4": {"num_splits": 4},
    "splits_8": {"num_splits": 8},
    # the engine's decode step runs `decode_attention_append`: the same walk, the step's key and value taken from
    # its QKV product (uncopied) and stored into the caches, which the launch updates in place
    "append": {},
    "append_no_early_launch": {"early_launch": False},
}


def inputs(batch: int, cache_len: int, length: int, heads: int, head_dim: int, dtype, sets: int = 4):
    """`sets` independent (q, caches, lengths): a dispatch walks all of them, so none is still in L2 from the last."""
    out = []
    for i in range(sets):
        kq, kk, kv = jax.random.split(jax.random.key(7919 * i + length), 3)
        out.append((jax.random.normal(kq, (batch, heads, head_dim), dtype),
                    jax.random.normal(kk, (batch, cache_len, heads, head_dim), dtype),
                    jax.random.normal(kv, (batch, cache_len, heads, head_dim), dtype),
                    jnp.full((batch,), length, jnp.int32)))
    return out


def appending(**kw):
    """decode_attention's arguments -> `decode_attention_append`'s attention output: the new token is the last of
    the `lengths` entries (its key and value the cache's own there, so both forms see the same entries)."""
    def attend(q, k, v, lengths):
        pos = lengths - 1
        rows = jnp.arange(q.shape[0])
        qkv = jnp.stack([q, k[rows, pos], v[rows, pos]], axis=1)
        return decode_attention_append(qkv, k, v, pos, **kw)[0]

    return attend


def probe(batch: int, cache_len: int, length: int, heads: int, head_dim: int, variant: str, reps: int,
          interpret: bool, dtype=jnp.float16) -> dict:
    sets = inputs(batch, cache_len, length, heads, head_dim, dtype)
    q, k, v, n = sets[0]
    kw = dict(VARIANTS[variant], interpret=interpret)
    attend = appending(**kw) if variant.startswith("append") else functools.partial(decode_attention, **kw)
    row = dict(batch=batch, cache_len=cache_len, length=length, heads=heads, head_dim=head_dim, variant=variant)
    try:
        ref = decode_attention_reference(*(x.astype(jnp.float32) for x in (q, k, v)), n)
        row["rel_err"] = rel_err(attend(q, k, v, n), ref)
        # `append`: the kernel alone, as XLA copies the caches (which the sets do not donate) around its in-place
        # update; `splits_N`: the kernel alone too, which combines its splits itself (its counters' zeros are made
        # once a step in the engine, not once a launch as here); the others: every kernel
        alone = variant.startswith(("append", "splits"))
        host_s, device_s = timed_device(attend, sets, reps=reps, kernel="decode_attention" if alone else None)
    except Exception as e:  # one launch's failure must not lose the others
        return row | {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    kv_bytes = 2 * batch * length * heads * head_dim * jnp.dtype(dtype).itemsize
    row |= {"us": round(host_s * 1e6, 2), "gbps": round(kv_bytes / host_s / 1e9, 1)}
    if device_s:
        row |= {"gpu_us": round(device_s * 1e6, 2), "gpu_gbps": round(kv_bytes / device_s / 1e9, 1)}
    return row


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", default="256", help="comma-separated batch sizes")
    ap.add_argument("--cache-len", type=int, default=256)
    ap.add_argument("--lengths", default="1,32,64,128,192,256", help="every row's valid entries, one run each")
    ap.add_argument("--heads", default="16x64", help="heads x head_dim")
    ap.add_argument("--variants", default="table", help=f"comma-separated, of: {', '.join(VARIANTS)}")
    ap.add_argument("--reps", type=int, default=7)
    args = ap.parse_args(argv)
    heads, head_dim = _ints(args.heads.replace("x", ","))
    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        ap.error(f"--variants: unknown {unknown}; known: {', '.join(VARIANTS)}")
    for batch in _ints(args.batch):
        for length in _ints(args.lengths):
            if not 1 <= length <= args.cache_len:
                ap.error(f"--lengths: {length} is outside [1, --cache-len={args.cache_len}]")
            for name in names:
                print(json.dumps(probe(batch, args.cache_len, length, heads, head_dim, name, args.reps,
                                       interpret=not on_gpu())), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
