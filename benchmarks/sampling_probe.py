"""What a decode step's top-k / top-p filter costs, and what could replace the vocabulary sort. One JSON line per
(rows, form).

    python -m benchmarks.sampling_probe --rows 8,64,256 [--spread 1.0]

At batch 256 a step whose rows ask for top-p took 4.49 ms against 3.07 greedy on an H100 (RESULTS, run 26): the
sort of 256 x 50257 logits. Forms, each on the same logits (normal, times `--spread`: larger is more peaked):
- "sort_top_p", "sort_top_k": the filter by sorting (`kernels.filter_threshold_reference`, what the sampler
  runs off a GPU) with top-p 0.9, or top-k 40;
- "kernel_top_p", "kernel_top_k": the same with the kernel the sampler runs on a GPU (`kernels.filter_threshold`);
  "kernel_wW_bB[_defer]_top_p" with W warps a program and B logits a read, `defer` as there (`LAUNCHES`);
- "lax_top_k_K": `jax.lax.top_k` of K entries a row, the candidates a filter could take instead of a sort;
- "bisect_top_p": the nucleus threshold found without a sort, by halving the range of the logits' ordered bit
  patterns (32 passes of a compare and a sum over the row); its kept set is checked against the sort's;
- "search16_top_p": the same threshold in 8 passes, each weighing 16 thresholds at once;
- "draw": the rest of a drawing step (Gumbel noise and argmax), for scale.
"""

from __future__ import annotations

import argparse
import functools
import json

VOCAB = 50257
# more launches of the kernel's top-p: (num_warps, block, defer)
LAUNCHES = ((4, 1024, False), (8, 1024, False), (8, 2048, False), (16, 1024, False), (16, 2048, False), (4, 512, False),
            (4, 256, True), (4, 512, True), (8, 512, True), (8, 1024, True))


def _ordered_bits(x):
    """float32 -> uint32 in the same order (negative floats' bits flipped, positive ones' sign bit set)."""
    import jax.numpy as jnp
    from jax import lax

    b = lax.bitcast_convert_type(x, jnp.uint32)
    return jnp.where(b >> 31 == 1, ~b, b | jnp.uint32(0x80000000))


def bisect_top_p(scaled, top_p):
    """`scaled` [rows, vocab] with everything outside each row's top-p nucleus at -inf, as the sort-based filter
    (ties at the threshold kept): the threshold is the largest logit t whose tokens at or above it hold top_p."""
    import jax
    import jax.numpy as jnp
    from jax import lax

    keys = _ordered_bits(scaled)
    probs = jax.nn.softmax(scaled, axis=-1)
    lo, hi = jnp.min(keys, axis=-1), jnp.max(keys, axis=-1)

    def halve(_, bounds):
        lo, hi = bounds
        mid = lo + (hi - lo) // 2 + ((hi - lo) & 1)  # the upper middle: no overflow, and lo < mid when lo < hi
        enough = jnp.sum(jnp.where(keys >= mid[:, None], probs, 0.0), axis=-1) >= top_p
        return jnp.where(enough, mid, lo), jnp.where(enough, hi, mid - 1)

    lo, _ = lax.fori_loop(0, 32, halve, (lo, hi))
    return jnp.where(keys >= lo[:, None], scaled, -jnp.inf)


def search_top_p(scaled, top_p, ways: int = 16):
    """`bisect_top_p`'s threshold in 8 passes rather than 32: each pass weighs `ways` thresholds spread over the
    range left (one read of the row for all of them) and keeps the part between the last that holds top_p and
    the next."""
    import jax
    import jax.numpy as jnp
    from jax import lax

    keys = _ordered_bits(scaled)
    probs = jax.nn.softmax(scaled, axis=-1)
    lo, hi = jnp.min(keys, axis=-1), jnp.max(keys, axis=-1)
    steps = jnp.arange(1, ways + 1, dtype=jnp.uint32)

    def narrow(_, bounds):
        lo, hi = bounds
        step = (hi - lo) // (ways + 1) + 1
        cands = jnp.minimum(lo[:, None] + step[:, None] * steps[None, :], hi[:, None])  # ascending [rows, ways]
        mass = jnp.sum(jnp.where(keys[:, None, :] >= cands[:, :, None], probs[:, None, :], 0.0), axis=-1)
        n_ok = jnp.sum(mass >= top_p[:, None], axis=-1)  # the first n_ok candidates hold top_p, the rest do not
        below = jnp.take_along_axis(cands, jnp.maximum(n_ok - 1, 0)[:, None], axis=-1)[:, 0]
        above = jnp.take_along_axis(cands, jnp.minimum(n_ok, ways - 1)[:, None], axis=-1)[:, 0]
        return jnp.where(n_ok > 0, below, lo), jnp.where(n_ok < ways, above - 1, hi)

    lo, _ = lax.fori_loop(0, 8, narrow, (lo, hi))  # 17 ** 8 > 2 ** 32: the range is one key by then
    return jnp.where(keys >= lo[:, None], scaled, -jnp.inf)


def forms():
    import jax
    import jax.numpy as jnp

    from gptjax import kernels

    def sort_filter(s, k, p):
        return jnp.where(s < kernels.filter_threshold_reference(s, k, p)[:, None], -jnp.inf, s)

    def kernel_filter(s, k, p, **launch):
        threshold = kernels.filter_threshold(s, k, p, interpret=jax.default_backend() != "gpu", **launch)
        return jnp.where(s < threshold[:, None], -jnp.inf, s)

    def draw(scaled, key):
        gumbel = jax.random.gumbel(key, scaled.shape, jnp.float32)
        return jnp.argmax(scaled + gumbel, axis=-1)

    return {
        "sort_top_p": jax.jit(lambda s, k, p: sort_filter(s, jnp.zeros_like(k), p)),
        "sort_top_k": jax.jit(lambda s, k, p: sort_filter(s, k, jnp.ones_like(p))),
        "kernel_top_p": jax.jit(lambda s, k, p: kernel_filter(s, jnp.zeros_like(k), p)),
        "kernel_top_k": jax.jit(lambda s, k, p: kernel_filter(s, k, jnp.ones_like(p))),
        **{f"kernel_w{w}_b{b}{'_defer' if d else ''}_top_p": jax.jit(functools.partial(
            lambda s, k, p, w, b, d: kernel_filter(s, jnp.zeros_like(k), p, num_warps=w, block=b, defer=d),
            w=w, b=b, d=d)) for w, b, d in LAUNCHES},
        **{f"lax_top_k_{n}": jax.jit(functools.partial(lambda s, k, p, n: jax.lax.top_k(s, n)[0], n=n))
           for n in (64, 256, 1024)},
        "bisect_top_p": jax.jit(lambda s, k, p: bisect_top_p(s, p)),
        "search16_top_p": jax.jit(lambda s, k, p: search_top_p(s, p)),
        "draw": jax.jit(lambda s, k, p: draw(s, jax.random.PRNGKey(0))),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default="8,64,256")
    p.add_argument("--spread", type=float, default=1.0, help="the logits' scale (larger: a more peaked distribution)")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--only", default="", help="comma-separated forms to run (default: every one)")
    args = p.parse_args(argv)
    only = set(filter(None, args.only.split(",")))

    import jax
    import jax.numpy as jnp
    import numpy as np

    from benchmarks.gpu_time import gpu_busy_seconds, host_seconds

    for rows in map(int, args.rows.split(",")):
        scaled = jax.random.normal(jax.random.PRNGKey(rows), (rows, VOCAB), jnp.float32) * args.spread
        top_k, top_p = jnp.full((rows,), 40, jnp.int32), jnp.full((rows,), 0.9, jnp.float32)
        by_sort = {}
        for name, fn in forms().items():
            if only and name not in only:
                continue
            out = jax.block_until_ready(fn(scaled, top_k, top_p))
            row = dict(rows=rows, vocab=VOCAB, spread=args.spread, form=name)
            if name.startswith("sort_"):
                by_sort[name[5:]] = np.isfinite(np.asarray(out))
                row["kept_per_row"] = float(by_sort[name[5:]].sum(-1).mean())
            elif name.endswith(("_top_p", "_top_k")):  # rows whose kept set is not the sort's
                row["rows_unlike_sort"] = int((np.isfinite(np.asarray(out)) != by_sort[name[-5:]]).any(-1).sum())
            call = functools.partial(lambda items, fn: [fn(scaled, top_k, top_p) for _ in items], fn=fn)
            row["host_us"] = round(host_seconds(call, [0], args.reps, 2) * 1e6, 1)
            busy = gpu_busy_seconds(call, [0])
            if busy:
                row["gpu_us"] = round(busy * 1e6, 1)
            print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
