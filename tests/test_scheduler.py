"""The scheduler over a fake engine: admission, continuous batching, pipelined decode calls, warm-up."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from gptjax.config import EngineConfig
from gptjax.sampling import SamplingParams
from serving.request import Finished, Request, Tokens
from serving.scheduler import NotAccepting, QueueFull, Scheduler


# ---- scheduler over a fake engine -------------------------------------------------------------------------
class FakePrefix:
    def __init__(self, tokens, lengths):
        self.base, self.lengths = tokens[:, 0], lengths
        self.first_tokens, self.first_logprobs = (self.base + lengths) % 97, np.zeros(len(lengths), np.float32)


class Pending:
    """A decode call's output that records when the scheduler reads it (as a device array would block then)."""

    def __init__(self, array, calls, n):
        self.array, self.calls, self.n = array, calls, n

    def __array__(self, dtype=None, copy=None):
        self.calls.append(("read", self.n))
        return self.array


class FakeEngine:
    """A slot's token at position p is (its first prompt token + p) % 97; the engine calls are recorded."""

    def __init__(self, slots=2, steps=3, prefill_tokens=1024):
        self.engine_config = EngineConfig(max_slots=slots, decode_steps_per_call=steps, max_queued_requests=4)
        self.prefill_tokens = prefill_tokens  # the token budget of one prefill
        self.calls = []
        self.live = []  # the live slots of each decode call

    def new_state(self, slots):
        return {"base": np.zeros(slots, np.int64), "pos": np.zeros(slots, np.int64)}

    def prefill_bucket(self, n):
        return 16 if n <= 16 else 32

    def prefill_buckets(self):
        return [16, 32]

    def prefill_rows(self, bucket, slots):
        most = max(1, min(slots, self.prefill_tokens // bucket))
        return [1 << k for k in range(most.bit_length())]

    def compile_prefill(self, rows, bucket, state):
        assert state["pos"].shape == (self.engine_config.max_slots,)
        self.calls.append(("compiled prefill", rows, bucket))

    def compile_decode(self, state, n_steps, sampled, rows):
        self.calls.append(("compiled decode", rows, sampled))

    def decode_buckets(self, slots):
        return [slots]

    def prefill(self, tokens, lengths, samp):
        self.calls.append(("prefill", tokens.shape[0]))
        return FakePrefix(tokens, lengths)

    def insert(self, prefix, state, slots):
        for b, n, s in zip(prefix.base, prefix.lengths, slots):
            state["base"][s], state["pos"][s] = b, n
        return state

    def generate_steps(self, state, n, sampled=None, live=None):
        self.calls.append(("decode", n))
        self.live.append(np.flatnonzero(live).tolist())
        out = np.stack([(state["base"] + state["pos"] + i + 1) % 97 for i in range(n)])
        state["pos"] += n
        return state, Pending(out, self.calls, len(self.live)), np.zeros_like(out, np.float32)


def request(first, length, n_new, stops=()):
    return Request([first] + [0] * (length - 1), n_new, SamplingParams(), frozenset(stops))


def collect(r):
    ids, reason = [], None
    while reason is None:
        event = r.next_event(10)
        assert event is not None, "no event within 10 s"
        if isinstance(event, Tokens):
            ids += event.ids
        else:
            assert isinstance(event, Finished), event
            reason = event.reason
    return ids, reason


def test_continuous_batching_with_more_requests_than_slots():
    engine = FakeEngine(slots=2, steps=3)
    sched = Scheduler(engine)
    with pytest.raises(NotAccepting):
        sched.submit([request(1, 1, 1)])
    sched.accept()
    reqs = [request(10, 2, 5), request(20, 3, 1), request(30, 1, 4, stops={33}), request(40, 4, 7)]
    sched.submit(reqs)
    with pytest.raises(QueueFull):
        sched.submit([request(1, 1, 1)])
    loop = threading.Thread(target=sched.run)
    loop.start()
    results = [collect(r) for r in reqs]
    sched.stop()
    loop.join(10)
    assert not loop.is_alive()
    assert results == [([12, 13, 14, 15, 16], "length"), ([23], "length"), ([31, 32, 33], "stop"),
                       ([44, 45, 46, 47, 48, 49, 50], "length")]
    assert max(n for op, n in engine.calls if op == "prefill") <= 2  # never more rows than slots
    assert sched.active() == 0 and sched.queued() == 0


def test_decode_calls_name_the_live_slots():
    engine = FakeEngine(slots=2, steps=2)
    sched = Scheduler(engine)
    sched.accept()
    short, long = request(1, 1, 3), request(5, 1, 7)
    sched.submit([short, long])
    loop = threading.Thread(target=sched.run)
    loop.start()
    assert collect(short)[1] == collect(long)[1] == "length"
    sched.stop()
    loop.join(10)
    # both slots live for the first call; once the short request is done, only the long one's slot
    assert engine.live == [[0, 1], [1], [1]]


def test_the_next_decode_call_is_dispatched_before_the_last_one_is_read():
    engine = FakeEngine(slots=2, steps=2)
    sched = Scheduler(engine)
    sched.accept()
    r = request(1, 1, 7)  # the prefill's token, then three calls of two
    sched.submit([r])
    loop = threading.Thread(target=sched.run)
    loop.start()
    assert collect(r) == ([2, 3, 4, 5, 6, 7, 8], "length")
    sched.stop()
    loop.join(10)
    # the budget is known ahead: no call is made past it
    assert engine.calls == [("prefill", 1), ("decode", 2), ("decode", 2), ("read", 1), ("decode", 2), ("read", 2),
                            ("read", 3)]


def test_a_stop_token_ends_the_stream_though_its_slot_stepped_on():
    engine = FakeEngine(slots=1, steps=2)
    sched = Scheduler(engine)
    sched.accept()
    stopped, after = request(1, 1, 100, stops={4}), request(50, 1, 3)
    sched.submit([stopped])
    loop = threading.Thread(target=sched.run)
    loop.start()
    assert collect(stopped) == ([2, 3, 4], "stop")
    sched.submit([after])  # takes the slot the stopped request stepped once more in
    assert collect(after) == ([51, 52, 53], "length")
    sched.stop()
    loop.join(10)
    assert not loop.is_alive()


def test_warmup_compiles_every_shape_the_loop_runs_and_a_burst_runs_in_those_shapes():
    engine = FakeEngine(slots=4, steps=2, prefill_tokens=32)  # at most 2 rows of 16 tokens, 1 of 32
    sched = Scheduler(engine)
    sched.warmup()
    assert sorted(engine.calls) == sorted([("compiled prefill", 1, 16), ("compiled prefill", 2, 16),
                                           ("compiled prefill", 1, 32),
                                           ("compiled decode", 4, False), ("compiled decode", 4, True)])
    engine.calls.clear()
    sched.accept()
    loop = threading.Thread(target=sched.run)
    loop.start()
    # three prompts of 20 tokens (a row each at 32) and one of 5 (at 16); then two of 5 (one prefill of 2 rows)
    burst = [request(10 * i, 20, 2) for i in range(1, 4)] + [request(40, 5, 2)]
    sched.submit(burst)
    assert [collect(r) for r in burst] == [([30, 31], "length"), ([40, 41], "length"), ([50, 51], "length"),
                                           ([45, 46], "length")]
    pair = [request(50, 5, 2), request(60, 5, 2)]
    sched.submit(pair)
    assert [collect(r) for r in pair] == [([55, 56], "length"), ([65, 66], "length")]
    assert [c for c in engine.calls if c[0] == "prefill"] == [("prefill", 1)] * 4 + [("prefill", 2)]
    sched.stop()
    loop.join(10)
    assert not loop.is_alive()


def test_cancelled_request_frees_its_slot():
    engine = FakeEngine(slots=1, steps=2)
    sched = Scheduler(engine)
    sched.accept()
    long, short = request(1, 1, 10**9), request(5, 1, 3)
    sched.submit([long])
    loop = threading.Thread(target=sched.run)
    loop.start()
    assert isinstance(long.next_event(10), Tokens)
    sched.submit([short])
    long.cancel()
    assert collect(short) == ([6, 7, 8], "length")
    sched.stop()
    loop.join(10)
    assert not loop.is_alive()


@pytest.mark.parametrize("window_ms, first_rows", [(1000.0, 4), (0.0, 1)])
def test_an_idle_server_waits_its_batch_window_so_a_burst_shares_one_prefill(window_ms, first_rows):
    engine = FakeEngine(slots=4, steps=2)
    engine.engine_config = engine.engine_config.replace(batch_window_ms=window_ms)
    sched = Scheduler(engine)
    sched.accept()
    loop = threading.Thread(target=sched.run)
    loop.start()
    reqs = [request(10 * i, 1, 3) for i in (1, 2, 3)]
    for r in reqs:  # three clients, 50 ms apart
        sched.submit([r])
        time.sleep(0.05)
    assert [collect(r) for r in reqs] == [([11 + 10 * i, 12 + 10 * i, 13 + 10 * i], "length") for i in range(3)]
    sched.stop()
    loop.join(10)
    assert not loop.is_alive()
    # rows of a prefill are padded to a power of two: 3 requests -> 4 rows; without a window the first is alone
    assert next(n for op, n in engine.calls if op == "prefill") == first_rows
