"""One prefill attention call of one implementation, bracketed for Nsight Compute: the kernels to read
counters of, and nothing else (no input generation, no compile, no warm-up).

    ncu --profile-from-start off --clock-control none --set full -o ours \
      python3 -m benchmarks.ncu_prefill --impl hopper --shape 2x4096x32x128 --dtype float16

The implementations are `benchmarks/kernels.py`'s (`hopper`, its variants, `cudnn`, `attention_mgpu(128)`).
The profiled range is opened with the CUDA driver's `cuProfilerStart` on the device's primary context, the
context XLA runs in, so `--profile-from-start off` skips everything before it.
"""

from __future__ import annotations

import argparse
import ctypes

import jax
import jax.numpy as jnp

from benchmarks.kernels import prefill_impls


class ProfiledRange:
    """cuProfilerStart / cuProfilerStop on device 0's primary context, current on this thread."""

    def __init__(self):
        self.cuda = ctypes.CDLL("libcuda.so.1")
        ctx, dev = ctypes.c_void_p(), ctypes.c_int()
        for call, args in (("cuInit", (0,)), ("cuDeviceGet", (ctypes.byref(dev), 0)),
                           ("cuDevicePrimaryCtxRetain", (ctypes.byref(ctx), dev)), ("cuCtxSetCurrent", (ctx,))):
            if getattr(self.cuda, call)(*args) != 0:
                raise RuntimeError(f"{call} failed")

    def __enter__(self):
        self.cuda.cuProfilerStart()

    def __exit__(self, *exc):
        self.cuda.cuProfilerStop()


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--impl", required=True)
    p.add_argument("--shape", default="2x4096x32x128", help="b x s x h x d")
    p.add_argument("--dtype", default="float16")
    p.add_argument("--calls", type=int, default=1, help="profiled calls")
    args = p.parse_args(argv)
    b, s, h, d = map(int, args.shape.split("x"))
    impls = prefill_impls(False, True, jnp.dtype(args.dtype), d)
    if args.impl not in impls:
        p.error(f"--impl must be one of {sorted(impls)}")
    fn = jax.jit(impls[args.impl])
    q, k, v = (jax.random.normal(key, (b, s, h, d), args.dtype) for key in jax.random.split(jax.random.key(s), 3))
    for _ in range(3):
        jax.block_until_ready(fn(q, k, v))
    with ProfiledRange():
        for _ in range(args.calls):
            jax.block_until_ready(fn(q, k, v))
    print(f"profiled {args.calls} call(s) of {args.impl} at {args.shape} {args.dtype}")


if __name__ == "__main__":
    main()
