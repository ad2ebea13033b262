"""The device's ceilings, measured one way for every benchmark: memory bandwidth and matmul rate.

    from benchmarks import floors
    floors.memory_bandwidth()        # bytes/s: what a floor divides bytes by (max of the two below)
    floors.copy_bandwidth()          # bytes/s, (bytes read + bytes written) / time of the fastest copy
    floors.read_bandwidth()          # bytes/s, bytes read / time of the fastest sum over a large buffer
    floors.matmul_rate("bfloat16")   # FLOP/s (2*m*n*k per product) of a large product on random data

    python -m benchmarks.floors [--json]   # print them, each copy and read method's rate beside

Why these and not one elementwise op through XLA: a bf16 `x * 2` over 2 GiB read 3.09 TB/s on an H200
where PyTorch's `copy_` reads 4.27 TB/s, and a floor computed from the low number was beaten by 10%. Each
measurement here uses a large buffer (4 GiB on a big GPU, several times the L2), repeats the operation
several times inside one dispatch (so a launch and an allocation are a small part of the time), takes the
median of repeated dispatches after a warm-up, and on a GPU takes the faster of an XLA loop and PyTorch's
`copy_` where PyTorch has the GPU (on an H200, 2026-12-02: XLA 4.05-4.14 TB/s, PyTorch 4.25-4.30).
A decode step mostly reads (weights, K/V): a read-only stream can run faster than a copy's mix of reads and
writes, so `memory_bandwidth` is the larger of the copy and read rates, and the read rate is the fastest of
several readers: XLA's sum of the buffer and its row-wise sums, Pallas read kernels (with and without the
matrix units' pipelined loads), cuDNN's decode attention over a K/V cache of the same size, and PyTorch's
`sum`; the JAX ones timed by the host clock and by the device's kernel time (`read_seconds`), as the kernel
benchmarks time their rows. A result at 100% of a floor built on it moves bytes as fast as anything
measured on this device.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp
from jax import lax

ITERS = 8  # operations per timed dispatch
REPS = 9  # timed dispatches (median)
WARMUP = 2


def median_seconds(fn, reps: int = REPS, warmup: int = WARMUP) -> float:
    """Median wall time of fn() (which must block until the device is done) after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def read_seconds(fn) -> float:
    """Seconds of fn() (a read; it blocks): the host clock's median, or on a GPU the device's kernel time of
    one more call from the profiler when that is shorter, so that kernels timed by the device clock (as the
    attention benchmarks time them) are held to a floor measured the same way."""
    seconds = median_seconds(fn)
    if jax.default_backend() == "gpu":
        from benchmarks.gpu_time import gpu_busy_seconds

        seconds = min(seconds, gpu_busy_seconds(lambda _: fn(), None) or seconds)
    return seconds


def _add_torch_rate(rates: dict, name: str, measure, device, with_torch: bool) -> None:
    """rates[name] = measure() where PyTorch shares the device (a GPU, device 0) and measures something."""
    if with_torch and device.platform == "gpu" and device.id == 0:
        rate = measure()
        if rate is not None:
            rates[name] = rate


def _device(device):
    return device if device is not None else jax.devices()[0]


def default_bytes(device=None) -> int:
    """4 GiB on a GPU with room for it (in and out), less on small GPUs; 64 MiB elsewhere."""
    device = _device(device)
    if device.platform != "gpu":
        return 64 << 20
    limit = (device.memory_stats() or {}).get("bytes_limit", 16 << 30)
    return int(min(4 << 30, max(256 << 20, limit // 8)))


def _random_words(n_bytes: int, device) -> jax.Array:
    # random float32 words: no zeros for the hardware to skip; the dtype of the bytes does not matter
    return jax.device_put(jax.random.normal(jax.random.key(0), (n_bytes // 4,), jnp.float32), device)


# ---- copy --------------------------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnames=("iters",), donate_argnums=0)
def _xla_copy_loop(x, *, iters: int):
    # y + 1 on float32 words, donated: one read and one write of the buffer per iteration, in place
    return lax.fori_loop(0, iters, lambda _, y: y + 1.0, x)


def copy_rates(device=None, n_bytes: int | None = None, with_torch: bool = True) -> dict[str, float]:
    """bytes/s, (read + written) / time, of each copy method this device runs: the XLA loop, and PyTorch's
    `copy_` where PyTorch has a GPU (the same device, when it is device 0)."""
    device = _device(device)
    n_bytes = n_bytes or default_bytes(device)
    box = [_random_words(n_bytes, device)]

    def once():
        box[0] = _xla_copy_loop(box[0], iters=ITERS)  # donated: the same two buffers every call
        box[0].block_until_ready()
    rates = {"xla": 2 * n_bytes * ITERS / median_seconds(once)}
    box.clear()  # the buffers freed before PyTorch's copy
    _add_torch_rate(rates, "torch", lambda: torch_copy_bandwidth(n_bytes), device, with_torch)
    return rates


def copy_bandwidth(device=None, n_bytes: int | None = None) -> float:
    """bytes/s, (bytes read + bytes written) / time, of the fastest copy of a large buffer."""
    return max(copy_rates(device, n_bytes).values())


# ---- read --------------------------------------------------------------------------------------------
READ_ROW = 8192  # the row length of the row-wise sum: a reduction XLA tiles differently from the whole sum


@functools.partial(jax.jit, static_argnames=("iters", "rows"))
def _read_loop(x, *, iters: int, rows: bool = False):
    def body(_, carry):
        total, c = carry
        # the carried factor keeps XLA from hoisting the (otherwise loop-invariant) sum out of the loop
        y = x * c
        return total + (jnp.sum(y.reshape(-1, READ_ROW), axis=1).sum() if rows else jnp.sum(y)), c * 1.0001
    return lax.fori_loop(0, iters, body, (jnp.float32(0), jnp.float32(1)))[0]


# Pallas read kernels: (tile rows, num_warps, num_stages, through the matrix units), each program summing its
# share of [*, READ_ROW // 16] bf16 tiles in a pipelined loop; the dot form reads its tiles as the decode
# kernels read K and V (into shared memory, asynchronously)
PALLAS_READS = [(32, 4, 3, True), (64, 8, 3, True), (16, 4, 4, False), (32, 8, 4, False)]
READ_PROGRAMS = 1056  # 8 per multiprocessor of an H200


def _pallas_read(x2d, scale, *, tile_rows: int, num_warps: int, num_stages: int, use_dot: bool, programs: int,
                 interpret: bool = False):
    """scale x the sum of x2d [rows, width] (bf16), one partial sum per program: a read of every byte."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    rows, width = x2d.shape
    per = rows // programs

    def kernel(x_ref, scale_ref, out_ref):
        first = pl.program_id(0) * per

        def body(i, acc):
            tile = x_ref[pl.ds(first + i * tile_rows, tile_rows), :]
            if use_dot:
                return acc + jnp.dot(jnp.ones((16, tile_rows), tile.dtype), tile, preferred_element_type=jnp.float32)
            return acc + tile.astype(jnp.float32)
        acc = lax.fori_loop(0, per // tile_rows, body,
                            jnp.zeros((16, width) if use_dot else (tile_rows, width), jnp.float32))
        # the dot form's 16 rows each hold the column sums
        out_ref[pl.program_id(0)] = jnp.sum(acc) / (16 if use_dot else 1) * scale_ref[0]

    return pl.pallas_call(kernel, grid=(programs,), out_shape=jax.ShapeDtypeStruct((programs,), jnp.float32),
                          compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
                          interpret=interpret)(x2d, scale)


@functools.partial(jax.jit, static_argnames=("iters", "config", "programs", "interpret"))
def _pallas_read_loop(x2d, *, iters: int, config: tuple, programs: int, interpret: bool = False):
    def body(_, carry):
        total, c = carry  # the carried scale: each call depends on the last, so none is hoisted or merged
        part = _pallas_read(x2d, c[None], tile_rows=config[0], num_warps=config[1], num_stages=config[2],
                            use_dot=config[3], programs=programs, interpret=interpret)
        return total + jnp.sum(part), c * 1.0001
    return lax.fori_loop(0, iters, body, (jnp.float32(0), jnp.float32(1)))[0]


def pallas_read_rates(device=None, n_bytes: int | None = None, programs: int = READ_PROGRAMS,
                      interpret: bool = False) -> dict[str, float]:
    """bytes/s of each `PALLAS_READS` kernel over a large bf16 buffer (a config that fails to compile is left
    out, with its error on stderr)."""
    device = _device(device)
    n_bytes = n_bytes or default_bytes(device)
    width = READ_ROW // 16
    quantum = programs * max(c[0] for c in PALLAS_READS) * width * 2
    n_bytes -= n_bytes % quantum
    x2d = _random_words(n_bytes, device).view(jnp.bfloat16).reshape(-1, width)
    x2d = jnp.where(jnp.isfinite(x2d), x2d, 1.0)  # random words as bf16: no inf or NaN in the sums
    rates = {}
    for config in PALLAS_READS:
        try:
            seconds = read_seconds(lambda: _pallas_read_loop(x2d, iters=ITERS, config=config, programs=programs,
                                                               interpret=interpret).block_until_ready())
        except Exception as e:  # noqa: BLE001 - a config Triton cannot build (shared memory): the others stand
            print(f"pallas read {config}: {type(e).__name__}: {str(e)[:200]}", file=sys.stderr)
            continue
        rates["pallas_read" + "".join(f"_{v}" for v in config)] = n_bytes * ITERS / seconds
    return rates


CUDNN_READ_SHAPE = (64, 32, 128)  # batch, heads, head_dim: the 6.7B model's layer at a full server's batch


@functools.partial(jax.jit, static_argnames=("iters",))
def _cudnn_read_loop(q, k, v, *, iters: int):
    def body(_, carry):
        total, c = carry  # the carried scale on the query: each call depends on the last
        out = jax.nn.dot_product_attention(q * c.astype(q.dtype), k, v, implementation="cudnn")
        return total + jnp.sum(out.astype(jnp.float32)), c * 1.0001
    return lax.fori_loop(0, iters, body, (jnp.float32(0), jnp.float32(1)))[0]


def cudnn_read_bandwidth(device=None, n_bytes: int | None = None) -> float:
    """bytes/s, K/V bytes / time, of cuDNN's attention for one query per sequence over bf16 K/V caches of
    n_bytes: a decode step's read, by a library kernel built for it (a GPU only)."""
    device = _device(device)
    n_bytes = n_bytes or default_bytes(device)
    batch, heads, dim = CUDNN_READ_SHAPE
    seq = n_bytes // (2 * batch * heads * dim * 2)
    keys = jax.random.split(jax.random.key(2), 3)
    q, k, v = (jax.device_put(jax.random.normal(key, (batch, s, heads, dim), jnp.bfloat16), device)
               for key, s in zip(keys, (1, seq, seq)))
    seconds = read_seconds(lambda: _cudnn_read_loop(q, k, v, iters=ITERS).block_until_ready())
    return 2 * batch * seq * heads * dim * 2 * ITERS / seconds


def read_rates(device=None, n_bytes: int | None = None, with_torch: bool = True) -> dict[str, float]:
    """bytes/s, bytes read / time, of each way of reading a large buffer: XLA's sum of the whole buffer, its
    row-wise sums, and on a GPU the Pallas read kernels, cuDNN's decode attention and PyTorch's `sum` (where
    PyTorch has the GPU)."""
    device = _device(device)
    n_bytes = n_bytes or default_bytes(device)
    n_bytes -= n_bytes % (READ_ROW * 4)  # whole rows
    x = _random_words(n_bytes, device)
    rates = {name: n_bytes * ITERS / read_seconds(lambda: _read_loop(x, iters=ITERS, rows=rows).block_until_ready())
             for name, rows in (("xla_sum", False), ("xla_rows", True))}
    x = None  # freed before the next readers'
    if device.platform == "gpu":
        rates |= pallas_read_rates(device, n_bytes)
        rates["cudnn_attention"] = cudnn_read_bandwidth(device, n_bytes)
    _add_torch_rate(rates, "torch_sum", lambda: torch_read_bandwidth(n_bytes), device, with_torch)
    return rates


def read_bandwidth(device=None, n_bytes: int | None = None) -> float:
    """bytes/s, bytes read / time, of the fastest read of a large buffer (nothing written but a scalar)."""
    return max(read_rates(device, n_bytes).values())


def memory_bandwidth(device=None, n_bytes: int | None = None) -> float:
    """bytes/s to divide a floor's bytes by: the larger of the copy and the read rates."""
    return max(copy_bandwidth(device, n_bytes), read_bandwidth(device, n_bytes))


# ---- matmul ------------------------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnames=("iters",))
def _matmul_loop(a, b, *, iters: int):
    return lax.fori_loop(0, iters, lambda _, y: y @ b, a)


def matmul_rate(dtype="bfloat16", device=None, m: int | None = None) -> float:
    """FLOP/s (2*m^3 per product) of chained m x m products on random data (b's entries have variance 1/m,
    so the chain neither overflows nor decays toward zeros)."""
    device = _device(device)
    m = m or (8192 if device.platform == "gpu" else 512)
    ka, kb = jax.random.split(jax.random.key(1))
    a = jax.device_put(jax.random.normal(ka, (m, m), jnp.float32).astype(dtype), device)
    b = jax.device_put((jax.random.normal(kb, (m, m), jnp.float32) / m ** 0.5).astype(dtype), device)
    t = median_seconds(lambda: _matmul_loop(a, b, iters=ITERS).block_until_ready())
    return 2.0 * m ** 3 * ITERS / t


# ---- PyTorch's copy and read ---------------------------------------------------------------------------
def _cuda_seconds(op) -> float:
    """Median seconds of ITERS calls of op(), timed with CUDA events after a warm-up."""
    import torch

    for _ in range(WARMUP):
        op()
    times = []
    for _ in range(REPS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(ITERS):
            op()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def _torch_cuda():
    try:
        import torch
    except ImportError:
        return None
    return torch if torch.cuda.is_available() else None


def torch_copy_bandwidth(n_bytes: int = 4 << 30) -> float | None:
    """bytes/s, (read + written) / time, of PyTorch's `y.copy_(x)` on CUDA; None where PyTorch has no GPU."""
    torch = _torch_cuda()
    if torch is None:
        return None
    x = torch.randn(n_bytes // 4, device="cuda")
    y = torch.empty_like(x)
    seconds = _cuda_seconds(lambda: y.copy_(x))
    x = y = None
    torch.cuda.empty_cache()
    return 2 * n_bytes * ITERS / seconds


def torch_read_bandwidth(n_bytes: int = 4 << 30) -> float | None:
    """bytes/s, bytes read / time, of PyTorch's `x.sum()` on CUDA; None where PyTorch has no GPU."""
    torch = _torch_cuda()
    if torch is None:
        return None
    x = torch.randn(n_bytes // 4, device="cuda")
    seconds = _cuda_seconds(lambda: x.sum())
    x = None
    torch.cuda.empty_cache()
    return n_bytes * ITERS / seconds


def measure(dtype: str = "bfloat16", with_torch: bool = True) -> dict:
    """Every number above for device 0, in one dict (bytes/s and FLOP/s)."""
    copies = copy_rates(with_torch=with_torch)
    reads = read_rates(with_torch=with_torch)
    out = {"device": jax.devices()[0].device_kind, "copy_bytes_per_s": max(copies.values()),
           "copy_by_method": copies, "read_bytes_per_s": max(reads.values()), "read_by_method": reads,
           "matmul_flops": matmul_rate(dtype), "matmul_dtype": str(jnp.dtype(dtype))}
    out["memory_bytes_per_s"] = max(out["copy_bytes_per_s"], out["read_bytes_per_s"])
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--no-torch", action="store_true", help="leave PyTorch's copy_ out")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    rates = measure(args.dtype, not args.no_torch)
    if args.json:
        print(json.dumps(rates))
    else:
        for key, value in rates.items():
            print(f"{key}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
