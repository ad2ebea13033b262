"""The front end's one validation path and request life cycle, on the gpt2-tiny limits and the real tokenizer.

No engine is built: validation only reads the model's shape and config (`_ModelShape` stands in for the
Engine), and the life cycle is driven by a scheduler stand-in that records what it was given.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from gptjax.config import EngineConfig, preset
from gptjax.tokenizer import default_tokenizer
from serving.frontend import (INT32_MAX, MAX_STOP_IDS, TEXT_BYTES_PER_POSITION, Frontend, Params, RequestError,
                              grpc_status)
from serving.request import Code, Failed, Finished, Tokens
from serving.scheduler import NotAccepting, QueueFull


class _ModelShape:
    """What the front end reads of an Engine."""

    def __init__(self, **engine_changes):
        self.config = preset("gpt2-tiny")
        self.engine_config = EngineConfig(**engine_changes)
        self.max_seq_len = self.engine_config.seq_len(self.config)
        self.tokenizer = default_tokenizer()


class _Scheduler:
    max_queued = 256

    def __init__(self):
        self.accepting = True
        self.submitted = []
        self.refuse = None

    def submit(self, requests):
        if self.refuse is not None:
            raise self.refuse
        self.submitted += requests

    def active(self):
        return 0

    def queued(self):
        return len(self.submitted)


@pytest.fixture
def frontend():
    f = Frontend("gpt2-tiny")
    f.load(_ModelShape(temperature=0.7, top_k=40, top_p=0.9, max_new_tokens=16), _Scheduler(), max_batch_size=64)
    return f


def refused(frontend, code=Code.INVALID_ARGUMENT, **params) -> str:
    params.setdefault("prompt", [1, 2, 3])
    with pytest.raises(RequestError) as info:
        frontend.validate(Params(**params))
    assert info.value.code == code, info.value
    return info.value.message


def test_defaults_come_from_the_engine_config(frontend):
    r = frontend.validate(Params(prompt=[464, 2068]))
    assert (r.prompt, r.max_new_tokens) == ([464, 2068], 16)
    assert (r.sampling.temperature, r.sampling.top_k, r.sampling.top_p, r.sampling.seed) == (0.7, 40, 0.9, 0)
    assert r.stop_ids == {50256}


def test_the_default_new_tokens_fit_the_prompt_and_the_limit():
    """A request that does not say how many tokens gets the server's default, capped by the positions its
    prompt leaves and by the limit: never refused for a number it did not send. One that says is held to it."""
    f = Frontend("gpt2-tiny")
    f.load(_ModelShape(max_seq_len=64, max_new_tokens=64, max_new_tokens_limit=32), _Scheduler(), max_batch_size=4)
    assert f.validate(Params(prompt=[1])).max_new_tokens == 32
    assert f.validate(Params(prompt=[1] * 40)).max_new_tokens == 24
    assert f.validate(Params(prompt=[1] * 63)).max_new_tokens == 1
    assert "prompt length 40 + max_new_tokens 30 exceeds" in refused(f, prompt=[1] * 40, max_new_tokens=30)
    assert "over the server's limit of 32" in refused(f, Code.RESOURCE_EXHAUSTED, max_new_tokens=33)


def test_text_is_tokenized_with_the_model_tokenizer(frontend):
    r = frontend.validate(Params(prompt="Once upon a time", max_new_tokens=3, ignore_eos=True, stop_ids=[13]))
    assert r.prompt == default_tokenizer().encode("Once upon a time") and r.stop_ids == {13}


@pytest.mark.parametrize("params, words", [
    (dict(prompt=None), "give a text or token ids"),
    (dict(prompt=[]), "empty"),
    (dict(prompt=""), "empty"),
    (dict(prompt=[1, 50257]), "prompt[1] = 50257 is outside the vocabulary"),
    (dict(prompt=[-1]), "outside the vocabulary"),
    (dict(prompt=[1.5]), "must be an integer"),
    (dict(prompt=[True]), "must be an integer"),
    (dict(prompt=np.ones((2, 2), np.int32)), "list of integer token ids"),
    (dict(prompt=np.ones(3, np.float32)), "list of integer token ids"),
    (dict(prompt=[1] * 256, max_new_tokens=1), "at most 255"),
    (dict(prompt=[1] * 250, max_new_tokens=10), "positions"),
    (dict(max_new_tokens=0), "max_new_tokens must be at least 1"),
    (dict(max_new_tokens=-(2**63)), "max_new_tokens"),
    (dict(max_new_tokens=2.0), "max_new_tokens must be an integer"),
    (dict(temperature=float("nan")), "temperature must be a finite number"),
    (dict(temperature=1e39), "finite number (float32)"),
    (dict(temperature=-0.5), "temperature must be >= 0"),
    (dict(top_k=-1), "top_k = -1 is outside"),
    (dict(top_k=2**31), f"top_k = {2**31} is outside [0, {INT32_MAX}]"),
    (dict(top_p=0.0), "top_p must be in (0, 1]"),
    (dict(top_p=1e-50), "top_p must be in (0, 1]"),  # 0 as float32
    (dict(top_p=1.0000001), "top_p"),
    (dict(seed=2**64), "seed"),
    (dict(seed=-(2**63) - 1), "seed"),
    (dict(stop_ids=[50257]), "stop_ids[0] = 50257 is outside the vocabulary"),
    (dict(stop_ids=[-3]), "stop_ids[0] = -3"),
    (dict(stop_ids=[0] * (MAX_STOP_IDS + 1)), f"at most {MAX_STOP_IDS}"),
    (dict(stop_ids="abc"), "stop_ids must be a list"),
    (dict(end_id=2**32 - 1), "end_id"),
    (dict(end_id=50257), "end_id = 50257 is outside the vocabulary"),
])
def test_every_field_is_checked_and_named(frontend, params, words):
    assert words in refused(frontend, **params)


def test_over_a_server_limit_is_resource_exhausted(frontend):
    assert "over the server's limit of 256" in refused(frontend, Code.RESOURCE_EXHAUSTED, max_new_tokens=2**31 - 1)
    with pytest.raises(RequestError) as info:
        frontend.check_batch(65, "input_ids")
    assert info.value.code == Code.RESOURCE_EXHAUSTED and info.value.http_status == 429


def test_field_names_follow_the_callers_api(frontend):
    message = refused(frontend, top_k=-1, max_new_tokens=2)
    assert message.startswith("top_k")
    with pytest.raises(RequestError, match=r"^runtime_top_k\[3\] = -1"):
        frontend.validate(Params(prompt=[1], top_k=-1), {"top_k": "runtime_top_k[3]"})


def test_values_at_the_bounds_of_their_types_are_accepted(frontend):
    r = frontend.validate(Params(prompt=[0, 50256], max_new_tokens=254, top_k=INT32_MAX, top_p=1.0,
                                 temperature=3.4e38, seed=2**64 - 1, stop_ids=np.array([0, 50256], np.uint32)))
    assert (r.max_new_tokens, r.sampling.top_k) == (254, INT32_MAX)
    assert r.sampling.seed == (2**64 - 1) % 2**32  # the engine's seeds are 32 bits
    assert frontend.validate(Params(prompt=[1], seed=-1)).sampling.seed == 2**32 - 1
    assert frontend.validate(Params(prompt=[1], ignore_eos=True)).stop_ids == frozenset()
    assert frontend.validate(Params(prompt=[1], end_id=7)).stop_ids == {7}


def test_a_large_text_is_refused_before_tokenizing(frontend, monkeypatch):
    cap = TEXT_BYTES_PER_POSITION * 256
    assert frontend.limits.max_text_bytes == cap
    calls = []
    monkeypatch.setattr(frontend.engine.tokenizer, "encode", calls.append)
    assert f"at most {cap} bytes" in refused(frontend, prompt="x" * (8 * 1024 * 1024))
    assert f"is {cap + 2} bytes" in refused(frontend, prompt="é" * (cap // 2 + 1))  # bytes, not characters
    assert not calls


def test_tokenizing_runs_off_the_callers_thread(frontend):
    future = frontend.tokenize_async("hello world")
    assert future.result(timeout=10) == default_tokenizer().encode("hello world")
    seen = []
    frontend.engine.tokenizer = type("T", (), {"encode": staticmethod(lambda t: seen.append(
        threading.current_thread().name) or [1])})()
    frontend.tokenize("x")
    assert seen[0].startswith("tokenize")


def test_not_loaded_or_not_accepting_is_unavailable(frontend):
    loading = Frontend("m")
    with pytest.raises(RequestError) as info:
        loading.validate(Params(prompt=[1]))
    assert info.value.code == Code.UNAVAILABLE and not loading.ready and loading.counts() == (0, 0)
    frontend.scheduler.accepting = False
    assert not frontend.ready
    assert "not accepting" in refused(frontend, Code.UNAVAILABLE)


@pytest.mark.parametrize("error, code", [(QueueFull("the queue is full"), Code.RESOURCE_EXHAUSTED),
                                         (NotAccepting(), Code.UNAVAILABLE)])
def test_submit_maps_the_schedulers_refusals(frontend, error, code):
    frontend.scheduler.refuse = error
    with pytest.raises(RequestError) as info:
        frontend.submit([frontend.validate(Params(prompt=[1]))])
    assert info.value.code == code and info.value.message


def test_a_text_meeting_a_full_queue_is_refused_before_tokenizing(frontend, monkeypatch):
    frontend.scheduler.submitted = [object()] * frontend.scheduler.max_queued
    monkeypatch.setattr(frontend.engine.tokenizer, "encode", lambda text: pytest.fail("tokenized"))
    assert "queue is full" in refused(frontend, Code.RESOURCE_EXHAUSTED, prompt="Once upon a time")


def test_collect_gathers_events_and_reports_the_call(frontend):
    calls = []
    frontend.metrics = type("M", (), {"call_finished": staticmethod(lambda *a: calls.append(a))})()
    with frontend.api_call() as call:
        call.requests = [frontend.validate(Params(prompt=[1], max_new_tokens=3)) for _ in range(2)]
        frontend.submit(call.requests)
        for r in call.requests:
            r.put(Tokens([5, 6], [-0.5, -0.25]))
            r.put(Tokens([7], [-1.0]))
            r.put(Finished("length"))
        done = frontend.collect(call.requests, lambda: True)
    expected = ([5, 6, 7], [-0.5, -0.25, -1.0], "length")
    assert [(d.token_ids, d.logprobs, d.finish_reason) for d in done] == [expected] * 2
    ((requests, ok, duration),) = calls
    assert requests == call.requests and ok and duration >= 0


def test_one_failed_request_fails_the_call_and_cancels_the_rest(frontend):
    calls = []
    frontend.metrics = type("M", (), {"call_finished": staticmethod(lambda *a: calls.append(a[1]))})()
    requests = [frontend.validate(Params(prompt=[1])) for _ in range(2)]
    requests[0].put(Failed(Code.DEADLINE_EXCEEDED, "the request passed its deadline"))
    with pytest.raises(RequestError) as info, frontend.api_call():
        frontend.collect(requests, lambda: True)
    assert info.value.code == Code.DEADLINE_EXCEEDED and requests[1].cancelled and calls == [False]


def test_a_caller_that_goes_away_cancels_its_requests(frontend):
    r = frontend.validate(Params(prompt=[1]))
    start = time.monotonic()
    with pytest.raises(RequestError) as info:
        frontend.collect([r], lambda: time.monotonic() - start < 0.05, poll_s=0.01)
    assert info.value.code == Code.CANCELLED and r.cancelled


def test_events_stream_until_finished(frontend):
    r = frontend.validate(Params(prompt=[1]))
    r.put(Tokens([5], [-0.1]))
    r.put(Finished("stop"))
    assert list(frontend.events(r, lambda: True)) == [Tokens([5], [-0.1]), Finished("stop")]
    failing = frontend.validate(Params(prompt=[1]))
    failing.put(Failed(Code.UNAVAILABLE, "the server is shutting down"))
    with pytest.raises(RequestError, match="shutting down"):
        list(frontend.events(failing, lambda: True))


def test_codes_map_to_grpc_and_http():
    import grpc

    assert grpc_status(Code.RESOURCE_EXHAUSTED) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert RequestError(Code.UNAVAILABLE, "x").http_status == 503
    assert {c: grpc_status(c).name for c in Code} == {c: c.name for c in Code}


# ---- text streams ----------------------------------------------------------------------------------------------------
def _pieces(frontend, groups, final=True) -> list[str]:
    stream = frontend.text_stream()
    pieces = [stream.add(ids) for ids in groups]
    return pieces + [stream.add([], final=True)] if final else pieces


def test_a_text_stream_holds_a_split_character_until_it_is_whole_and_joins_into_the_whole_decode(frontend):
    """The halves of an emoji (two tokens each), of a CJK character and of an accented letter, however the tokens
    are grouped: no piece holds part of a character, and the pieces join into the text of all the tokens."""
    tok = frontend.tokenizer
    ids = tok.encode("é 😀 日本語 naïve 🤖🚀")
    assert any("\ufffd" in tok.decode([t]) for t in ids)  # some tokens are parts of a character
    rng = np.random.default_rng(0)
    for _ in range(50):
        cuts = sorted(rng.choice(len(ids) + 1, rng.integers(0, len(ids)), replace=False))
        groups = [ids[a:b] for a, b in zip([0, *cuts], [*cuts, len(ids)])]
        pieces = _pieces(frontend, groups)
        assert "".join(pieces) == tok.decode(ids) and not any("\ufffd" in p for p in pieces), groups
    emoji = tok.encode("😀")
    assert _pieces(frontend, [[t] for t in emoji], final=False) == ["", "😀"]
    assert _pieces(frontend, [emoji[:1]]) == ["", "\ufffd"]  # cut short at the end: U+FFFD, as decode has it


def test_a_text_stream_gives_a_replacement_character_that_no_token_can_complete_at_once(frontend):
    """U+FFFD the model wrote (GPT-2 has tokens of it) and bytes that can't start or continue a character are
    text as soon as they come, not held back until some later token ends the run."""
    tok = frontend.tokenizer
    written, lone = tok.encode("\ufffd"), tok.encode("😀")[1:]  # U+FFFD itself; a continuation byte alone
    assert len(written) == 1 and tok.decode(lone) == "\ufffd"
    pieces = _pieces(frontend, [written, written, lone, tok.encode("😀")[:1], lone, tok.encode("a")])
    assert pieces == ["\ufffd", "\ufffd", "\ufffd", "", "😀", "a", ""]
    all_ids = [t for g in [written, written, lone, tok.encode("😀")[:1], lone, tok.encode("a")] for t in g]
    assert "".join(pieces) == tok.decode(all_ids)
