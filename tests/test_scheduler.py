"""The scheduler over a fake engine: admission, continuous batching, pipelined decode calls, warm-up, failures
(of the engine, and of a job that loses a process)."""

from __future__ import annotations

import threading
import time

import jax
import numpy as np
import pytest

from gptjax.config import EngineConfig
from gptjax.sampling import SamplingParams
from serving.config import SchedulerConfig
from serving.request import Code, Failed, Finished, Request, Tokens
from serving.commands import Reset
from serving.scheduler import NotAccepting, PeerLost, QueueFull, Scheduler


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
        self.engine_config = EngineConfig(max_slots=slots)
        self.scheduling = SchedulerConfig(decode_steps_per_call=steps, max_queued_requests=4)  # for its Scheduler
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
    sched = Scheduler(engine, engine.scheduling)
    with pytest.raises(NotAccepting):
        sched.submit([request(1, 1, 1)])
    sched.accept()
    reqs = [request(10, 2, 5), request(20, 3, 1), request(30, 1, 4, stops={33}), request(40, 4, 7)]
    sched.submit(reqs)  # two will take the free slots, two wait: the queue of 4 has room for two more, not three
    with pytest.raises(QueueFull):
        sched.submit([request(1, 1, 1) for _ in range(3)])
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
    sched = Scheduler(engine, engine.scheduling)
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
    sched = Scheduler(engine, engine.scheduling)
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
    sched = Scheduler(engine, engine.scheduling)
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
    sched = Scheduler(engine, engine.scheduling)
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
    sched = Scheduler(engine, engine.scheduling)
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


def test_tokens_read_after_a_request_ended_are_not_counted_as_generated():
    """A request its caller ends (an OpenAI stop string: `stop_here`) holds its slot until the loop's next turn, and
    a decode call read meanwhile still has tokens for it. They reach nobody, so they are not in `generated`, which
    the metrics count as generation tokens and divide the inter-token time by: were they counted, those numbers
    would hang on whether the metrics read the request before or after that decode call was read."""
    from serving.commands import Decode
    from serving.executor import Outputs

    engine = FakeEngine(slots=1, steps=3)
    sched = Scheduler(engine, engine.scheduling)
    sched.accept()
    r = request(1, 1, 10)
    sched.submit([r])
    (prefill,) = sched.schedule(time.monotonic())
    sched.deliver(prefill, Outputs(np.array([7]), np.zeros(1, np.float32)))
    assert r.generated == 1
    r.stop_here()
    sched.deliver(Decode(3, (0,), False, (r,)), Outputs(np.array([[8], [9], [10]]), np.zeros((3, 1), np.float32)))
    assert r.generated == 1 and list(r.events) == [Tokens([7], [0.0]), Finished("stop")]
    sched.schedule(time.monotonic())
    assert sched.active() == 0  # its slot frees at the next turn


@pytest.mark.parametrize("window_ms, first_rows", [(1000.0, 4), (0.0, 1)])
def test_an_idle_server_waits_its_batch_window_so_a_burst_shares_one_prefill(window_ms, first_rows):
    engine = FakeEngine(slots=4, steps=2)
    engine.scheduling = engine.scheduling.replace(batch_window_ms=window_ms)
    sched = Scheduler(engine, engine.scheduling)
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


# ---- hardening: failing commands, values out of range, queue places -------------------------------------
class FailingEngine(FakeEngine):
    """Raises on the prefill of a prompt that starts with `bad`; its decode call number `broken` fails on the
    device (the read raises, as reading a device array whose call failed does)."""

    def __init__(self, bad=None, broken=None, **kw):
        super().__init__(**kw)
        self.bad, self.broken, self.states = bad, broken, 0
        self.broken_output = Broken()

    def new_state(self, slots):
        self.states += 1
        return super().new_state(slots)

    def prefill(self, tokens, lengths, samp):
        if self.bad is not None and self.bad in tokens[:, 0]:
            raise RuntimeError("prefill failed")
        return super().prefill(tokens, lengths, samp)

    def generate_steps(self, state, n, sampled=None, live=None):
        state, tokens, logprobs = super().generate_steps(state, n, sampled, live)
        if len(self.live) == self.broken:
            tokens = self.broken_output
        return state, tokens, logprobs


class Broken:
    def __array__(self, dtype=None, copy=None):
        raise RuntimeError("the decode call failed on the device")


def last_event(r):
    assert r.wait_ended(10), "the request did not end within 10 s"
    events = list(r.events)
    return events[-1]


def running(sched):
    loop = threading.Thread(target=sched.run)
    loop.start()
    return loop


def stop(sched, loop):
    sched.stop()
    loop.join(10)
    assert not loop.is_alive()


def test_a_failing_prefill_ends_only_its_requests_and_the_loop_serves_on():
    rng = np.random.default_rng()
    first, bad = (int(v) for v in rng.choice(np.arange(1, 90), 2, replace=False))
    engine = FailingEngine(bad=bad, slots=2, steps=2)
    sched = Scheduler(engine, engine.scheduling)
    sched.accept()
    good, failing = request(first, 1, 5), request(bad, 20, 5)  # prompt buckets 16 and 32: two prefills
    sched.submit([good, failing])
    loop = running(sched)
    assert collect(good) == ([(first + 1 + i) % 97 for i in range(5)], "length")
    event = last_event(failing)
    assert isinstance(event, Failed) and event.code is Code.INTERNAL and "prefill failed" in event.message
    later = request(first, 3, 4)  # the loop goes on, in the slot the failed prefill was given
    sched.submit([later])
    assert collect(later) == ([(first + 3 + i) % 97 for i in range(4)], "length")
    stop(sched, loop)
    assert engine.states == 1  # the state was untouched: nobody made a new one


def test_a_call_that_fails_on_the_device_fails_the_live_requests_and_the_next_run_on_a_fresh_state():
    engine = FailingEngine(broken=2, slots=2, steps=2)
    sched = Scheduler(engine, engine.scheduling)
    sched.accept()
    a, b = request(10, 1, 50), request(20, 1, 50)
    sched.submit([a, b])
    loop = running(sched)
    for r in (a, b):  # both were in the call that failed
        event = last_event(r)
        assert isinstance(event, Failed) and event.code is Code.INTERNAL and "state was lost" in event.message
    later = request(30, 2, 3)
    sched.submit([later])
    assert collect(later) == ([32, 33, 34], "length")
    stop(sched, loop)
    assert engine.states == 2


def test_the_queue_limit_counts_only_requests_that_wait_for_a_slot():
    """A burst reaching an idle server waits out the batch window in the queue: the requests that the free slots
    will take are not refused as over the queue's limit (a queue of 1 and 2 free slots take 3, not 4)."""
    engine = FakeEngine(slots=2, steps=2)
    sched = Scheduler(engine, engine.scheduling.replace(max_queued_requests=1, batch_window_ms=50.0))
    sched.accept()
    burst = [request(10 * (i + 1), 1, 2) for i in range(3)]
    sched.submit(burst)
    with pytest.raises(QueueFull):
        sched.submit([request(40, 1, 2)])
    loop = running(sched)
    assert [collect(r) for r in burst] == [([11, 12], "length"), ([21, 22], "length"), ([31, 32], "length")]
    stop(sched, loop)


def test_values_that_do_not_fit_the_command_fields_fail_their_request_and_nothing_else():
    engine = FakeEngine(slots=2, steps=2)
    sched = Scheduler(engine, engine.scheduling.replace(max_queued_requests=8))
    sched.accept()
    big_top_k = Request([1, 2], 3, SamplingParams(temperature=1.0, top_k=2**31), frozenset())
    big_token = request(2**31, 2, 3)
    too_long = request(5, 33, 3)  # the fake engine's longest prefill is 32 tokens
    good = request(7, 2, 3)  # (a temperature past float32's range is taken as sampling.MAX_TEMPERATURE: it fits)
    sched.submit([big_top_k, big_token, too_long, good])
    assert sched.queued() == 1
    for r, field in [(big_top_k, "top_k"), (big_token, "token id"), (too_long, "prompt length")]:
        event = last_event(r)
        assert isinstance(event, Failed) and event.code is Code.INVALID_ARGUMENT and field in event.message
    loop = running(sched)
    assert collect(good) == ([9, 10, 11], "length")
    stop(sched, loop)


def test_queued_requests_past_their_deadline_leave_the_queue_at_once():
    engine = FakeEngine(slots=2, steps=2)
    sched = Scheduler(engine, engine.scheduling.replace(max_queued_requests=16))
    sched.accept()
    busy = [request(1, 1, 10**9), request(2, 1, 10**9)]
    sched.submit(busy)
    loop = running(sched)
    assert isinstance(busy[0].next_event(10), Tokens) and isinstance(busy[1].next_event(10), Tokens)
    deadline = time.monotonic() + 0.3
    waiting = [request(10 + i, 1, 3) for i in range(16)]
    for r in waiting:
        r.deadline = deadline
    sched.submit(waiting)
    assert sched.queued() == 16
    with pytest.raises(QueueFull):
        sched.submit([request(50, 1, 3)])
    for r in waiting:  # the loop ends them while both slots stay busy (never admitted, no token)
        assert r.wait_ended(10), "a queued request outlived its deadline by 10 s"
        assert last_event(r) == Failed(Code.DEADLINE_EXCEEDED, "the request passed its deadline")
        assert r.admitted is None
    assert sched.queued() == 0 and sched.active() == 2
    late = request(60, 1, 3)
    sched.submit([late])  # a place is free again
    assert sched.queued() == 1 and sched.active() == 2
    for r in busy:
        r.cancel()
    assert collect(late) == ([61, 62, 63], "length")
    stop(sched, loop)


def test_a_request_cancelled_in_the_queue_leaves_it_at_once():
    engine = FakeEngine(slots=1, steps=2)
    sched = Scheduler(engine, engine.scheduling)
    sched.accept()
    busy, queued, after = request(1, 1, 10**9), request(5, 1, 3), request(9, 1, 2)
    sched.submit([busy])
    loop = running(sched)
    assert isinstance(busy.next_event(10), Tokens)
    sched.submit([queued, after])
    assert (sched.active(), sched.queued(), sched.pending(), sched.live_requests()) == (1, 2, 3, [busy])
    queued.cancel()
    assert sched.queued() == 1 and queued.ended  # on the cancelling thread, not at the loop's next turn
    assert list(queued.events)[-1] == Failed(Code.CANCELLED, "the request was cancelled")
    busy.cancel()
    assert collect(after) == ([10, 11], "length")
    stop(sched, loop)
    assert (sched.active(), sched.queued(), sched.pending(), sched.live_requests()) == (0, 0, 0, [])



class StallingEngine(FakeEngine):
    """Its first decode call's tokens are not ready until `release` is set: a device call that hangs."""

    def __init__(self):
        super().__init__(slots=2, steps=2)
        self.release = threading.Event()

    def generate_steps(self, state, n, sampled=None, live=None):
        state, tokens, logprobs = super().generate_steps(state, n, sampled, live)
        return state, Stalled(tokens, self.release), logprobs


class Stalled:
    def __init__(self, tokens, release):
        self.tokens, self.release = tokens, release

    def __array__(self, dtype=None, copy=None):
        self.release.wait(30)
        return np.asarray(self.tokens, dtype)


def test_a_stuck_turn_is_logged_with_its_command_and_where_the_loop_waits(monkeypatch, caplog):
    import serving.scheduler as scheduler_module

    monkeypatch.setattr(scheduler_module, "STUCK_TURN_S", 0.3)
    engine = StallingEngine()
    sched = Scheduler(engine, engine.scheduling)
    sched.accept()
    r = request(3, 2, 4)
    sched.submit([r])
    with caplog.at_level("WARNING", logger="gptjax.serving"):
        loop = running(sched)
        deadline = time.monotonic() + 10
        while "spent" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.05)
        engine.release.set()
        assert collect(r) == ([5, 6, 7, 8], "length")
        stop(sched, loop)
    stuck = [rec.getMessage() for rec in caplog.records if "spent" in rec.getMessage()]
    assert len(stuck) == 1, caplog.text  # once per stall
    assert "a decode call of 2 steps over" in stuck[0] and "__array__" in stuck[0]  # the command, the stack


def test_the_load_line_counts_from_its_first_command_not_from_idle_time(monkeypatch, caplog):
    """A window's rate is over the time the loop worked: 100 idle seconds before the first command do not
    make 31 s of 32 tokens a second read as 8 a second."""
    from serving import scheduler
    from serving.commands import Decode

    clock = [1000.0]
    monkeypatch.setattr(scheduler.time, "monotonic", lambda: clock[0])
    load = scheduler._LoadReport()
    clock[0] += 100  # idle
    step = Decode(steps=8, live=(0, 1, 2, 3), sampled=False, requests=(None,) * 4)
    due = []
    for _ in range(31):  # one call of 32 tokens a second, for 30 s
        due.append(load.count(step))
        clock[0] += 1
    assert due == [False] * 30 + [True]
    with caplog.at_level("INFO", logger="gptjax.serving"):
        load.report(active=4, queued=0)
    assert "in 31 s: 0 prefills, 31 decode calls, 992 tokens (32/s)" in caplog.text  # not 131 s, 8/s


# ---- process 0 of a job of several processes ----------------------------------------------------------------
GLOO_RESET = "UNKNOWN: Gloo all-reduce failed: [pair.cc:538] Read error [127.0.0.1]:11168: Connection reset by peer"


class Followers:
    """The job's other processes as process 0's broadcasts (serving.wire.send) meet them: they take the first
    `lives` commands (all, when None); then one of them is gone, and a broadcast fails as gloo's does when the
    peer's connection resets."""

    def __init__(self):
        self.commands, self.lives = [], None

    def send(self, command, slots):
        if self.lives is not None and len(self.commands) >= self.lives:
            raise RuntimeError(GLOO_RESET)
        self.commands.append(command)


@pytest.fixture
def followers(monkeypatch):
    """A Scheduler made in the test is process 0 of a two-process job whose other process is these Followers."""
    from serving import wire

    f = Followers()
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(wire, "send", f.send)
    return f


class LostWithTheCall:
    """A decode call's output whose collectives met a process that died meanwhile: the read fails, and from then
    on the broadcasts do too."""

    def __init__(self, followers):
        self.followers = followers

    def __array__(self, dtype=None, copy=None):
        self.followers.lives = len(self.followers.commands)
        raise RuntimeError(GLOO_RESET)


def running_to_its_end(sched):
    """The loop on a thread, and a list that gets what the loop raised, if it ends so."""
    raised = []

    def run():
        try:
            sched.run()
        except Exception as e:  # noqa: BLE001 - the test reads it
            raised.append(e)

    loop = threading.Thread(target=run)
    loop.start()
    return loop, raised


@pytest.mark.parametrize("devices_answer", [True, False], ids=["process lost", "device fault here"])
def test_a_broadcast_that_fails_for_a_lost_process_ends_every_request_unavailable(followers, devices_answer):
    """The other process takes a prefill and two decode calls, then it is gone: the running request and the queued
    one end UNAVAILABLE, naming the cause (the job is going down: a client retries elsewhere), and the loop ends.
    Where this process's own devices fail too, the fault is here, and INTERNAL as any engine failure."""
    followers.lives = 3
    engine = FakeEngine(slots=1, steps=2)
    sched = Scheduler(engine, engine.scheduling)
    if not devices_answer:
        sched.executor.devices_answer = lambda: False
    sched.accept()
    running_one, queued = request(10, 1, 50), request(20, 1, 5)
    sched.submit([running_one, queued])
    loop, raised = running_to_its_end(sched)
    for r in (running_one, queued):
        event = last_event(r)
        assert isinstance(event, Failed) and event.code is (Code.UNAVAILABLE if devices_answer else Code.INTERNAL)
        assert "Connection reset by peer" in event.message, event
    assert isinstance(running_one.events[0], Tokens)  # it was running
    if devices_answer:
        assert event.message.startswith("a process of this server's job is gone (broadcasting the Decode command")
    loop.join(10)
    assert not loop.is_alive() and not sched.accepting
    assert isinstance(raised[0], PeerLost) is devices_answer
    with pytest.raises(NotAccepting):
        sched.submit([request(30, 1, 1)])


@pytest.mark.parametrize("process_lost", [False, True], ids=["engine fault", "process lost"])
def test_a_call_that_fails_on_the_device_is_internal_unless_a_process_went_with_it(followers, process_lost):
    """After a call that failed on the device process 0 broadcasts a Reset. The other process takes it: the engine
    failed (INTERNAL) and the loop serves on from a fresh state. It can't: the call failed because a process is gone
    (UNAVAILABLE)."""
    engine = FailingEngine(broken=2, slots=2, steps=2)
    if process_lost:
        engine.broken_output = LostWithTheCall(followers)
    sched = Scheduler(engine, engine.scheduling)
    sched.accept()
    a, b = request(10, 1, 50), request(20, 1, 50)
    sched.submit([a, b])
    loop, raised = running_to_its_end(sched)
    for r in (a, b):  # both were in the call that failed
        event = last_event(r)
        assert isinstance(event, Failed) and event.code is (Code.UNAVAILABLE if process_lost else Code.INTERNAL)
    if process_lost:
        assert event.message.startswith("a process of this server's job is gone (broadcasting the Reset command")
        loop.join(10)
        assert not loop.is_alive() and isinstance(raised[0], PeerLost)
    else:
        assert "state was lost" in event.message and Reset() in followers.commands
        later = request(30, 2, 3)
        sched.submit([later])
        assert collect(later) == ([32, 33, 34], "length")
        stop(sched, loop)
        assert raised == []
