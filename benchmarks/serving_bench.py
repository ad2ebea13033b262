"""`gptjax bench --server HOST:PORT --request-rate ...`: a running server measured as users measure servers.

Requests arrive as a Poisson process (exponential gaps at the given rate; `inf` sends them all at once), each a
random token-id prompt of a length drawn from `--input-len-dist` asking for exactly a length drawn from
`--output-len-dist` new tokens (`ignore_eos`, greedy). They go through the native gRPC streaming API
(`GenerateStream`), and the client times each one:
    TTFT  time to first token: the call's start to the first message that carries tokens
    TPOT  time per output token after the first: (last token's time - first token's) / (tokens - 1)
    E2E   the call's start to its last token
reported as mean / p50 / p90 / p99 per rate, with request throughput (completed requests / the time from the
first arrival to the last completion) and output tokens/s; one JSON row per rate with `--json`.

Length distributions (integers, drawn with `--seed`; the same prompts at every rate):
    fixed:N            always N
    uniform:LO,HI      uniform on LO..HI, both included
    normal:MEAN,STD    rounded, then clipped to 1..the server's limit
`--request-rate auto` first sends min(N, slots + queue) requests at once: their throughput is the server's
saturation rate X. It then sweeps Poisson rates at AUTO_FRACTIONS of X, so the rows run from a nearly idle
server to a saturated one and include the half-saturation rate that latency is usually quoted at.
"""

from __future__ import annotations

import asyncio
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field, replace

import numpy as np

AUTO = "auto"
AUTO_FRACTIONS = (0.125, 0.25, 0.5, 0.75, 0.9, 1.0)
WARMUP_REQUESTS = 4
CHANNELS = 8  # requests spread over several connections, as many clients' would be
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 16 << 20), ("grpc.max_send_message_length", 16 << 20)]
PERCENTILES = (50, 90, 99)
_KINDS = {"fixed": 1, "uniform": 2, "normal": 2}


@dataclass(frozen=True)
class LengthDist:
    """A distribution of token counts; `parse("uniform:64,256")`."""

    kind: str
    a: float
    b: float = 0.0

    @classmethod
    def parse(cls, text: str, flag: str = "length distribution") -> "LengthDist":
        kind, _, values = text.partition(":")
        if kind not in _KINDS:
            raise ValueError(f"{flag}: expected fixed:N, uniform:LO,HI or normal:MEAN,STD, got {text!r}")
        try:
            numbers = [float(v) for v in values.split(",")]
        except ValueError:
            raise ValueError(f"{flag}: {kind} takes {_KINDS[kind]} number(s), got {text!r}") from None
        if len(numbers) != _KINDS[kind] or not all(map(math.isfinite, numbers)):
            raise ValueError(f"{flag}: {kind} takes {_KINDS[kind]} finite number(s), got {text!r}")
        dist = cls(kind, *numbers)
        if kind == "fixed" and (dist.a < 1 or dist.a != int(dist.a)):
            raise ValueError(f"{flag}: fixed:N needs a whole N of at least 1, got {text!r}")
        if kind == "uniform" and not (1 <= dist.a <= dist.b and dist.a == int(dist.a) and dist.b == int(dist.b)):
            raise ValueError(f"{flag}: uniform:LO,HI needs whole 1 <= LO <= HI, got {text!r}")
        if kind == "normal" and (dist.a < 1 or dist.b < 0):
            raise ValueError(f"{flag}: normal:MEAN,STD needs MEAN >= 1 and STD >= 0, got {text!r}")
        return dist

    def __str__(self) -> str:
        numbers = [self.a] if self.kind == "fixed" else [self.a, self.b]
        return f"{self.kind}:" + ",".join(f"{v:g}" for v in numbers)

    def most(self) -> float:
        """The largest value it draws before clipping (normal: unbounded)."""
        return {"fixed": self.a, "uniform": self.b, "normal": math.inf}[self.kind]

    def sample(self, rng: np.random.Generator, n: int, limit: int) -> np.ndarray:
        if self.kind == "fixed":
            drawn = np.full(n, self.a)
        elif self.kind == "uniform":
            drawn = rng.integers(int(self.a), int(self.b) + 1, n)
        else:
            drawn = np.rint(rng.normal(self.a, self.b, n))
        return np.clip(drawn, 1, limit).astype(np.int64)


@dataclass(frozen=True)
class ServingBenchOptions:
    """What one `gptjax bench --server ... --request-rate ...` run measures."""

    server: str
    request_rates: tuple[float, ...] = ()  # requests/s; math.inf sends all at once; empty with auto
    auto: bool = False
    num_requests: int = 200
    input_len: LengthDist = LengthDist("fixed", 128)
    output_len: LengthDist = LengthDist("fixed", 128)
    seed: int = 0
    json: bool = False
    request_timeout_s: float = 600.0
    api_key: str | None = None  # the key of a server started with --api-key

    def __post_init__(self):
        if self.auto == bool(self.request_rates):
            raise ValueError("--request-rate: give rates (requests/s, or inf) or auto")
        if any(not r > 0 for r in self.request_rates):
            raise ValueError(f"--request-rate: rates must be positive, got {list(self.request_rates)}")
        if self.num_requests < 1:
            raise ValueError(f"--num-requests must be at least 1, got {self.num_requests}")


def parse_rates(values: list[str]) -> tuple[tuple[float, ...], bool]:
    """`--request-rate` values -> (rates, auto): numbers or `inf`, or `auto` alone."""
    if values == [AUTO]:
        return (), True
    try:
        return tuple(float(v) for v in values), False
    except ValueError:
        raise ValueError(f"--request-rate: expected numbers (requests/s), inf, or auto alone, got {' '.join(values)}"
                         ) from None


@dataclass
class Timing:
    """One request as the client saw it (perf_counter seconds)."""

    start: float
    prompt_len: int
    asked: int
    first: float | None = None
    last: float | None = None
    tokens: int = 0
    error: str = ""


@dataclass
class ServingRow:
    impl: str
    request_rate: float | str  # requests/s, or "inf"
    num_requests: int
    completed: int
    failed: int
    duration_s: float
    request_throughput: float  # completed requests / s
    output_tokens_per_s: float
    ttft_ms: dict
    tpot_ms: dict
    e2e_ms: dict
    input_len_dist: str
    output_len_dist: str
    mean_input_len: float
    mean_output_len: float
    seed: int
    fraction_of_saturation: float | None = None  # with --request-rate auto
    errors: dict = field(default_factory=dict)  # gRPC status name -> count
    extra: dict = field(default_factory=dict)  # the server's model info


def stats_ms(seconds: list[float]) -> dict:
    if not seconds:
        return {"mean": None, **{f"p{p}": None for p in PERCENTILES}}
    ms = np.asarray(seconds) * 1e3
    return {"mean": float(ms.mean()), **{f"p{p}": float(np.percentile(ms, p)) for p in PERCENTILES}}


def summarize(timings: list[Timing], duration: float) -> dict:
    """The row's measured fields from each request's timing."""
    done = [t for t in timings if not t.error]
    errors: dict[str, int] = {}
    for t in timings:
        if t.error:
            errors[t.error] = errors.get(t.error, 0) + 1
    tokens = sum(t.tokens for t in done)
    return dict(completed=len(done), failed=len(timings) - len(done), duration_s=duration,
                request_throughput=len(done) / duration if duration > 0 else 0.0,
                output_tokens_per_s=tokens / duration if duration > 0 else 0.0,
                ttft_ms=stats_ms([t.first - t.start for t in done]),
                tpot_ms=stats_ms([(t.last - t.first) / (t.tokens - 1) for t in done if t.tokens > 1]),
                e2e_ms=stats_ms([t.last - t.start for t in done]), errors=errors)


# ---- the workload -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Workload:
    prompts: list[list[int]]
    output_lens: list[int]


def make_workload(options: ServingBenchOptions, n: int, info) -> Workload:
    """n requests drawn from the options' distributions (seeded), fitted to the server's limits: a prompt leaves
    room for at least one new token, and prompt plus new tokens fit the server's `max_seq_len`."""
    longest_new = min(info.max_new_tokens_limit or info.max_seq_len, info.max_seq_len - 1)
    for flag, dist, limit in (("--input-len-dist", options.input_len, info.max_seq_len - 1),
                              ("--output-len-dist", options.output_len, longest_new)):
        if dist.kind != "normal" and dist.most() > limit:
            raise ValueError(f"{flag} {dist}: the server takes at most {limit} tokens there")
    if options.input_len.kind != "normal" and options.output_len.kind != "normal":
        if options.input_len.most() + options.output_len.most() > info.max_seq_len:
            raise ValueError(f"--input-len-dist {options.input_len} with --output-len-dist {options.output_len}: "
                             f"prompt plus new tokens can exceed the server's {info.max_seq_len} positions")
    rng = np.random.default_rng(options.seed)
    inputs = options.input_len.sample(rng, n, info.max_seq_len - 1)
    outputs = np.minimum(options.output_len.sample(rng, n, longest_new), info.max_seq_len - inputs)
    vocab = min(info.vocab_size, 50257)
    prompts = [rng.integers(0, vocab, int(k)).tolist() for k in inputs]
    return Workload(prompts, [int(k) for k in outputs])


def poisson_arrivals(rate: float, n: int, seed: int) -> np.ndarray:
    """Seconds from the first arrival (at 0) to each arrival; all 0 at rate inf."""
    if math.isinf(rate):
        return np.zeros(n)
    gaps = np.random.default_rng([seed, 1]).exponential(1.0 / rate, n)
    return np.concatenate([[0.0], np.cumsum(gaps[1:])])


# ---- the client ------------------------------------------------------------------------------------
async def _one(stub, request, timing: Timing, timeout: float, metadata: tuple) -> None:
    import grpc

    try:
        async for message in stub.GenerateStream(request, timeout=timeout, metadata=metadata):
            if message.token_ids:
                now = time.perf_counter()
                timing.first = timing.first or now
                timing.last = now
                timing.tokens += len(message.token_ids)
        if timing.tokens != timing.asked:
            timing.error = "FEWER_TOKENS"
    except grpc.aio.AioRpcError as e:
        timing.error = e.code().name


async def _send(target: str, workload: Workload, arrivals: np.ndarray, timeout: float,
                api_key: str | None = None) -> tuple[list[Timing], float]:
    """Each request at its arrival time (from now) -> timings, and the time from the first arrival to the
    last completion."""
    import grpc

    from serving.client import key_metadata, make_request
    from serving.proto.gptjax.v1 import generator_pb2_grpc as pb_grpc

    channels = [grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS) for _ in range(CHANNELS)]
    stubs = [pb_grpc.GeneratorStub(c) for c in channels]
    requests = [make_request(p, k, temperature=0.0, ignore_eos=True)
                for p, k in zip(workload.prompts, workload.output_lens)]
    try:
        tasks, timings = [], []
        begin = time.perf_counter()
        for i, (request, at) in enumerate(zip(requests, arrivals)):
            wait = begin + at - time.perf_counter()
            if wait > 0:
                await asyncio.sleep(wait)
            timing = Timing(time.perf_counter(), len(request.token_ids.ids), request.max_new_tokens)
            timings.append(timing)
            tasks.append(asyncio.create_task(_one(stubs[i % CHANNELS], request, timing, timeout,
                                                  key_metadata(api_key))))
        await asyncio.gather(*tasks)
        end = max([t.last for t in timings if t.last] or [time.perf_counter()])
        return timings, end - begin
    finally:
        for c in channels:
            await c.close()


def measure(options: ServingBenchOptions, workload: Workload, rate: float) -> tuple[list[Timing], float]:
    arrivals = poisson_arrivals(rate, len(workload.prompts), options.seed)
    return asyncio.run(_send(options.server, workload, arrivals, options.request_timeout_s, options.api_key))


def _row(options, workload: Workload, rate: float, timings, duration, info, fraction=None) -> ServingRow:
    return ServingRow(
        impl="gptjax-server", request_rate="inf" if math.isinf(rate) else rate, num_requests=len(timings),
        input_len_dist=str(options.input_len), output_len_dist=str(options.output_len),
        mean_input_len=float(np.mean([len(p) for p in workload.prompts])),
        mean_output_len=float(np.mean(workload.output_lens)), seed=options.seed, fraction_of_saturation=fraction,
        extra={"model": info.name, "dtype": info.dtype, "max_slots": info.max_slots, "mesh": info.mesh,
               "max_seq_len": info.max_seq_len, "server": options.server},
        **summarize(timings, duration))


def _head(workload: Workload, n: int) -> Workload:
    return Workload(workload.prompts[:n], workload.output_lens[:n])


def run_serving_bench(options: ServingBenchOptions) -> int:
    """Measure every rate (or the saturation, then AUTO_FRACTIONS of it); print a row as each finishes."""
    from serving.client import serving_model_info

    info = serving_model_info(options.server, options.api_key)
    workload = make_workload(options, options.num_requests, info)
    warmup = make_workload(replace(options, seed=options.seed + 1), WARMUP_REQUESTS, info)
    measure(options, warmup, math.inf)  # the first requests' connections and threads, not timed
    rows = []
    rates = [(r, None) for r in options.request_rates]
    if options.auto:
        burst = _head(workload, min(options.num_requests, info.max_slots + info.max_queued_requests))
        timings, duration = measure(options, burst, math.inf)
        rows.append(_row(options, burst, math.inf, timings, duration, info))
        print_row(rows[-1], options.json)
        saturation = rows[-1].request_throughput
        if saturation <= 0:
            raise RuntimeError(f"no request of the saturation burst completed: {rows[-1].errors}")
        rates = [(f * saturation, f) for f in AUTO_FRACTIONS]
    for rate, fraction in rates:
        timings, duration = measure(options, workload, rate)
        rows.append(_row(options, workload, rate, timings, duration, info, fraction))
        print_row(rows[-1], options.json)
    if options.auto:
        half = next(r for r in rows if r.fraction_of_saturation == 0.5)
        print(f"saturation {saturation:.2f} requests/s ({rows[0].output_tokens_per_s:.0f} output tokens/s); "
              f"p99 TTFT at half that rate {half.ttft_ms['p99']:.1f} ms", file=sys.stderr)
    return 0


def print_row(row: ServingRow, as_json: bool) -> None:
    if as_json:
        print(json.dumps(_rounded(asdict(row))), flush=True)
        return
    rate = row.request_rate if isinstance(row.request_rate, str) else f"{row.request_rate:.2f}"
    ms = {k: ("-" if v is None else f"{v:.1f}") for k, v in
          (("ttft50", row.ttft_ms["p50"]), ("ttft99", row.ttft_ms["p99"]), ("tpot50", row.tpot_ms["p50"]),
           ("tpot99", row.tpot_ms["p99"]))}
    print(f"rate {rate:>8} req/s: {row.completed}/{row.num_requests} done ({row.failed} failed) in "
          f"{row.duration_s:.1f} s, {row.request_throughput:.2f} req/s, {row.output_tokens_per_s:.0f} tok/s; "
          f"TTFT p50 {ms['ttft50']} p99 {ms['ttft99']} ms; TPOT p50 {ms['tpot50']} p99 {ms['tpot99']} ms", flush=True)


def _rounded(value):
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    return value
