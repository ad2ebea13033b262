"""Where does the server's time go? The seed's shapes through the scheduler in this process (no gRPC), beside
`engine.generate`, with every engine command the scheduler made timed.

    python benchmarks/scheduler_probe.py --model megatron-345m --dtype float16 --slots 256 --seq 640

One JSON line per shape: the median latency of `generate` and of the scheduler (all requests submitted at
once, as the bench's clients send them), then what the scheduler's last run was made of: its prefill
commands (rows, milliseconds each), the host time to dispatch a decode call (by rows run), and the time
between reads of consecutive decode calls (a call's device time, while the device is kept busy).
Compare with `gptjax bench --server` on the same machine: the rest is gRPC and the clients.
"""

from __future__ import annotations

import argparse
import collections
import json
import threading
import time

import jax
import numpy as np

from benchmarks.bench import median_seconds
from benchmarks.decode_probe import kernel_summary
from gptjax import EngineConfig
from gptjax.engine import Engine
from gptjax.sampling import SamplingParams
from serving.commands import Decode, Prefill
from serving.config import SchedulerConfig
from serving.request import Finished, Request, Tokens
from serving.scheduler import Scheduler


def parse_args():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="megatron-345m")
    p.add_argument("--dtype", default="float16")
    p.add_argument("--slots", type=int, default=256)
    p.add_argument("--seq", type=int, default=640)
    p.add_argument("--steps-per-call", type=int, default=8)
    p.add_argument("--shapes", nargs="+", default=["8,512,16", "1,128,128", "64,128,128", "256,128,128"])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--hlo", help="write each decode bucket's optimized HLO to HLO.rowsN.txt")
    p.add_argument("--profile", help="trace the last shape's scheduler run into this folder and summarise its kernels")
    return p.parse_args()


class Timings:
    """Wraps a scheduler's executor and delivery: every command's host time, and when each decode call was read."""

    def __init__(self, scheduler):
        self.log = []  # (command type, rows, seconds), in order: a prefill until done, a decode its dispatch
        self.reads = []  # when each decode call's tokens had been delivered
        self._run, self._deliver = scheduler.executor.run, scheduler.deliver
        scheduler.executor.run, scheduler.deliver = self.run, self.deliver

    def clear(self):
        self.log.clear()
        self.reads.clear()

    def run(self, command):
        t = time.perf_counter()
        out = self._run(command)
        if isinstance(command, Prefill):  # time the prefill itself (the scheduler reads it later)
            jax.block_until_ready(out)
            self.log.append((Prefill, len(command.rows), time.perf_counter() - t))
        elif isinstance(command, Decode):  # a decode's rows: up to the highest live slot
            self.log.append((Decode, max(command.live, default=-1) + 1, time.perf_counter() - t))
        return out

    def deliver(self, command, outputs):
        self._deliver(command, outputs)
        if isinstance(command, Decode):
            self.reads.append(time.perf_counter())

    def summary(self) -> dict:
        dispatch = collections.defaultdict(list)
        for kind, rows, s in self.log:
            if kind is Decode:
                dispatch[rows].append(s * 1e3)
        return {
            "prefills": [(rows, round(s * 1e3, 2)) for kind, rows, s in self.log if kind is Prefill],
            "decode_dispatch_ms": {rows: {"n": len(ms), "median": round(float(np.median(ms)), 3)}
                                   for rows, ms in dispatch.items()},
            # with a call always queued behind the one running, reads come one device call apart
            "decode_read_interval_ms": (round(float(np.median(np.diff(self.reads))) * 1e3, 3)
                                        if len(self.reads) > 1 else None)}


def through_scheduler(scheduler, prompts, n_new):
    """Submit every prompt at once (as the bench's clients send them) and wait for each to finish."""
    reqs = [Request(row, n_new, SamplingParams(temperature=0.0), frozenset()) for row in prompts]
    scheduler.submit(reqs)
    for r in reqs:
        while isinstance(event := r.next_event(), Tokens):
            pass
        assert event == Finished("length"), event
        assert r.generated == n_new


def probe_shape(args, engine, scheduler, timings, shape, profile: bool) -> dict:
    """One shape's row: `generate`, the scheduler's median, and what its last run was made of."""
    b, i, o = (int(v) for v in shape.split(","))
    prompts = np.random.default_rng(0).integers(0, engine.config.vocab_size, (b, i)).tolist()
    in_process = median_seconds(lambda: engine.generate(prompts, o, greedy=True, stop_token_ids=[]),
                                args.runs, 1, f"generate {shape}")
    through_scheduler(scheduler, prompts, o)  # warm-up compiled every shape: this run only settles the server
    served = median_seconds(lambda: through_scheduler(scheduler, prompts, o), args.runs, 1, f"scheduler {shape}")
    if profile:
        jax.profiler.start_trace(args.profile)
    timings.clear()
    start = time.perf_counter()
    through_scheduler(scheduler, prompts, o)
    last = time.perf_counter() - start
    if profile:
        jax.profiler.stop_trace()
        kernel_summary(args.profile, o)
    return {"shape": [b, i, o], "generate_ms": round(in_process * 1e3, 2), "scheduler_ms": round(served * 1e3, 2),
            "last_run_ms": round(last * 1e3, 2), **timings.summary()}


def decode_memory(args, engine, state) -> None:
    """A decode call's scratch memory per row bucket: a copy of the cache would show here as gigabytes."""
    live = np.ones(args.slots, bool)
    for rows in engine.decode_buckets(args.slots):
        with jax.set_mesh(engine.mesh):
            compiled = engine._steps_jit.lower(engine.params, state, engine._put(live), n_steps=args.steps_per_call,
                                               sampled=False, active=rows).compile()
        stats = compiled.memory_analysis()
        print(json.dumps({"decode_rows": rows, "temp_MB": round(stats.temp_size_in_bytes / 2**20, 1),
                          "alias_MB": round(stats.alias_size_in_bytes / 2**20, 1)}))
        if args.hlo:
            with open(f"{args.hlo}.rows{rows}.txt", "w") as f:
                f.write(compiled.as_text())


def main():
    args = parse_args()
    ec = EngineConfig(max_slots=args.slots, max_seq_len=args.seq)
    engine = Engine.from_preset(args.model, dtype=args.dtype, engine_config=ec)
    scheduler = Scheduler(engine, SchedulerConfig(decode_steps_per_call=args.steps_per_call))
    start = time.perf_counter()
    scheduler.warmup()
    warmup_s = time.perf_counter() - start
    timings = Timings(scheduler)
    scheduler.accept()
    loop = threading.Thread(target=scheduler.run, daemon=True)
    loop.start()
    for shape in args.shapes:
        row = probe_shape(args, engine, scheduler, timings, shape, bool(args.profile) and shape == args.shapes[-1])
        print(json.dumps({**row, "steps_per_call": args.steps_per_call, "slots": args.slots, "seq": args.seq,
                          "warmup_s": round(warmup_s, 1), "device": jax.devices()[0].device_kind}), flush=True)
    scheduler.stop()
    loop.join()
    decode_memory(args, engine, scheduler.executor.state)


if __name__ == "__main__":
    main()
