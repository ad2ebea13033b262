"""The OpenAI-compatible API of the real `gptjax serve`, driven by the official `openai` package: the model list,
completions unary and streamed (the streamed text is the unary text at temperature 0, and both are the native
API's greedy text), stop strings, echo, logprobs, n, seeds, usage, and the errors it raises.

What needs no tokens runs in this process too: the routes over a front end whose engine and scheduler are
test_frontend's stand-ins (any name, any queue), and a choice's text, offsets and stops fed crafted tokens."""

from __future__ import annotations

import json

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.testclient import TestClient
from test_frontend import _ModelShape, _Scheduler

from gptjax.tokenizer import default_tokenizer
from serving.frontend import Frontend
from serving.http import Context
from serving.http_app import create_app
from serving.openai import Choice
from serving.request import Finished, Tokens
from serving.scheduler import QueueFull

openai = pytest.importorskip("openai")
pytest_plugins = ["http_server"]  # the `served` fixture: one server for the session

MODEL = "gpt2-tiny"
TEXT = "Once upon a time"
N_NEW = 12
EOS = 50256


@pytest.fixture(scope="module")
def client(served):
    with openai.OpenAI(base_url=served.http + "/v1", api_key=served.key, max_retries=0, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def reference(served):
    """The greedy tokens and text of TEXT and of a token-id prompt from the native gRPC API (tested against
    `gptjax generate` in test_serving.py), with their log-probabilities."""
    from serving.client import Client

    rows = []
    with Client(served.grpc, api_key=served.key) as native:
        for ids in (default_tokenizer().encode(TEXT), [40, 588, 257, 1310]):
            out = native.generate(ids, N_NEW, temperature=0.0, return_logprobs=True, ignore_eos=True)
            assert EOS not in out.token_ids
            rows.append({"prompt_ids": ids, "output_ids": out.token_ids, "text": out.text, "logprobs": out.logprobs})
    return rows


def streamed(client, **kw) -> tuple[dict, list, object]:
    """A streamed completion read to its end -> ({index: text}, {index: finish_reason}, the usage)."""
    texts, reasons, usage = {}, {}, None
    for chunk in client.completions.create(model=MODEL, stream=True, **kw):
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
            reasons[c.index] = c.finish_reason or reasons.get(c.index)
        usage = chunk.usage or usage
    return texts, reasons, usage


def test_the_model_is_listed(client):
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_unary_and_streamed_text_are_the_greedy_text(client, reference):
    unary = client.completions.create(model=MODEL, prompt=TEXT, max_tokens=N_NEW, temperature=0)
    (choice,) = unary.choices
    assert choice.text == reference[0]["text"] and choice.finish_reason == "length"
    assert unary.usage.prompt_tokens == len(reference[0]["prompt_ids"])
    assert unary.usage.completion_tokens == N_NEW and unary.usage.total_tokens == unary.usage.prompt_tokens + N_NEW
    texts, reasons, usage = streamed(client, prompt=TEXT, max_tokens=N_NEW, temperature=0,
                                     stream_options={"include_usage": True})
    assert texts == {0: choice.text} and reasons == {0: "length"}
    assert usage.completion_tokens == N_NEW


def test_a_list_of_prompts_gives_a_choice_each(client, reference):
    ids = reference[1]["prompt_ids"]
    out = client.completions.create(model=MODEL, prompt=[ids, reference[0]["prompt_ids"]], max_tokens=N_NEW,
                                    temperature=0)
    assert [c.index for c in out.choices] == [0, 1]
    assert [c.text for c in out.choices] == [reference[1]["text"], reference[0]["text"]]
    assert out.usage.prompt_tokens == len(ids) + len(reference[0]["prompt_ids"])


def test_stop_strings_end_the_text_before_them(client, reference):
    full = reference[0]["text"]
    words = full.split(" ")
    stop = " " + words[len(words) // 2]  # a word in the middle
    cut = full[: full.index(stop)]
    out = client.completions.create(model=MODEL, prompt=TEXT, max_tokens=N_NEW, temperature=0, stop=[stop, "\x00"])
    assert (out.choices[0].text, out.choices[0].finish_reason) == (cut, "stop")
    assert out.usage.completion_tokens < N_NEW
    texts, reasons, _ = streamed(client, prompt=TEXT, max_tokens=N_NEW, temperature=0, stop=stop)
    assert (texts[0], reasons[0]) == (cut, "stop")


def test_a_streamed_choice_that_stops_early_leaves_the_others_running(client, reference):
    """Two prompts streamed together, a stop string in the middle of the first one's text: the first ends there
    and its request is cancelled, the second streams to its end."""
    full = reference[0]["text"]
    words = full.split(" ")
    stop = " " + words[len(words) // 2]
    cut = [r["text"][: r["text"].index(stop)] if stop in r["text"] else r["text"] for r in reference]
    reasons_expected = {i: "stop" if stop in r["text"] else "length" for i, r in enumerate(reference)}
    texts, reasons, usage = streamed(client, prompt=[r["prompt_ids"] for r in reference], max_tokens=N_NEW,
                                     temperature=0, stop=stop, stream_options={"include_usage": True})
    assert texts == dict(enumerate(cut)) and reasons == reasons_expected
    assert usage.completion_tokens > 0
    with pytest.raises(openai.BadRequestError, match="at most 256 characters"):
        client.completions.create(model=MODEL, prompt=TEXT, max_tokens=2, stop="z" * 257)


def test_echo_logprobs_and_seeded_choices(client, reference):
    echoed = client.completions.create(model=MODEL, prompt=TEXT, max_tokens=N_NEW, temperature=0, echo=True)
    assert echoed.choices[0].text == TEXT + reference[0]["text"]

    scored = client.completions.create(model=MODEL, prompt=reference[0]["prompt_ids"], max_tokens=N_NEW,
                                       temperature=0, logprobs=0)
    lp = scored.choices[0].logprobs
    assert lp.token_logprobs == pytest.approx(reference[0]["logprobs"], abs=1e-6)
    assert "".join(lp.tokens) == scored.choices[0].text and lp.text_offset[0] == 0

    def sampled(seed):
        out = client.completions.create(model=MODEL, prompt=TEXT, max_tokens=N_NEW, temperature=1.0, n=3, seed=seed)
        return [c.text for c in out.choices]

    first = sampled(11)
    assert sampled(11) == first and len(set(first)) > 1  # reproducible, and the choices differ


def test_what_is_not_supported_is_a_clear_400(client):
    for kwargs, words in ((dict(logprobs=2), "top alternatives"), (dict(best_of=3), "best_of"),
                          (dict(presence_penalty=0.5), "presence_penalty"), (dict(max_tokens=0), "max_tokens")):
        with pytest.raises(openai.BadRequestError, match=words):
            client.completions.create(model=MODEL, prompt=TEXT, **kwargs)
    with pytest.raises(openai.NotFoundError, match="not served"):
        client.completions.create(model="gpt-4", prompt=TEXT, max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="no chat template"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    bad_key = openai.OpenAI(base_url=str(client.base_url), api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad_key.models.list()


def test_a_model_is_retrieved_by_its_id(client):
    assert client.models.retrieve(MODEL) == client.models.list().data[0]
    with pytest.raises(openai.NotFoundError, match="not served"):
        client.models.retrieve("gpt-4")


def ended_calls(served) -> tuple[float, float]:
    """(successful API calls, requests in the end-to-end latency histogram) from /metrics."""
    text = httpx.get(served.metrics + "/metrics", headers=served.headers, timeout=10).raise_for_status().text
    values = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
    return values["nv_inference_request_success_total"], values["gptjax_e2e_request_latency_seconds_count"]


def test_usage_counts_no_token_after_a_stop_string(client, reference, served):
    """A stop string that a token starts: the engine has made the rest of its decode call's tokens by then, but
    the answer's text, logprobs and usage all end before that token. The request ends there, a success with its
    end-to-end latency in the metrics."""
    before = ended_calls(served)
    tokenizer, ids, full = default_tokenizer(), reference[0]["output_ids"], reference[0]["text"]
    pieces = [tokenizer.decode([t]) for t in ids]
    i = next(i for i in range(1, N_NEW - 1) if pieces[i].strip() and full.find(pieces[i]) == len("".join(pieces[:i])))
    kw = dict(prompt=TEXT, max_tokens=N_NEW, temperature=0, stop=pieces[i])
    out = client.completions.create(model=MODEL, logprobs=0, **kw)
    (choice,) = out.choices
    assert (choice.text, choice.finish_reason) == ("".join(pieces[:i]), "stop")
    assert out.usage.completion_tokens == len(choice.logprobs.tokens) == i
    _, _, usage = streamed(client, stream_options={"include_usage": True}, **kw)
    assert usage.completion_tokens == i
    assert [after - b for after, b in zip(ended_calls(served), before)] == [2, 2]


def test_seeds_of_the_choices_wrap_past_the_largest(client):
    """Choice j's seed is seed + j modulo 2**64, and the engine samples with the seed modulo 2**32."""
    def texts(seed, n=1):
        out = client.completions.create(model=MODEL, prompt=TEXT, max_tokens=N_NEW, temperature=1.0, n=n, seed=seed)
        return [c.text for c in out.choices]

    assert texts(2**64 - 1, n=2) == texts(2**32 - 1) + texts(0)
    with pytest.raises(openai.BadRequestError, match="seed"):
        texts(2**64, n=2)


def test_stream_options_ask_for_a_stream_and_an_object(client):
    for kwargs, words in ((dict(stream_options={"include_usage": True}), "only allowed when stream is true"),
                          (dict(stream=True, extra_body={"stream_options": []}), "stream_options must be an object"),
                          (dict(stream=True, stream_options={"include_usage": 1}), "include_usage must be true")):
        with pytest.raises(openai.BadRequestError, match=words):
            client.completions.create(model=MODEL, prompt=TEXT, max_tokens=2, **kwargs)


def test_null_stream_and_echo_are_their_defaults(served, reference):
    """OpenAI's fields are nullable, null meaning the default: clients that send every unset field as null get
    the plain answer, as for null n, seed or stop."""
    body = {"model": MODEL, "prompt": TEXT, "max_tokens": N_NEW, "temperature": 0, "stream": None, "echo": None,
            "n": None, "stop": None, "stream_options": None}
    r = httpx.post(served.http + "/v1/completions", json=body, headers=served.headers, timeout=120)
    assert r.status_code == 200, r.text
    assert [c["text"] for c in r.json()["choices"]] == [reference[0]["text"]]  # one choice, neither streamed nor echoed


# ---- in this process ------------------------------------------------------------------------------------
HUB_ID = "openai-community/gpt2"


@pytest.fixture
def local():
    """(the scheduler stand-in, an OpenAI client) of the routes in this process: nothing is generated, so only
    answers that come before any token can be asked for."""
    frontend = Frontend(HUB_ID)
    frontend.load(_ModelShape(), _Scheduler(), max_batch_size=4)
    app = create_app(Context(frontend, max_body_bytes=1 << 20, dialect="v1", body_timeout_s=10.0), max_requests=8)
    with TestClient(app) as http, openai.OpenAI(base_url="http://testserver/v1", api_key="-", http_client=http,
                                                max_retries=0) as c:
        yield frontend.scheduler, c


def test_a_hub_id_with_a_slash_is_retrieved(local):
    _, c = local
    assert c.models.retrieve(HUB_ID).id == HUB_ID == c.models.list().data[0].id
    with pytest.raises(openai.NotFoundError, match="not served"):
        c.models.retrieve("openai-community/gpt2-xl")


def test_a_full_queue_is_a_429_for_text_and_token_prompts_and_a_size_limit_a_400(local):
    """OpenAI clients retry a 429 (a full queue clears) but not a 400 (a request over a limit stays over it)."""
    scheduler, c = local
    scheduler.submitted = [object()] * scheduler.max_queued  # the text is refused before tokenizing
    with pytest.raises(openai.RateLimitError, match="queue is full"):
        c.completions.create(model=HUB_ID, prompt=TEXT, max_tokens=2)
    scheduler.refuse = QueueFull.of(scheduler.max_queued)  # token ids meet the queue at submit
    with pytest.raises(openai.RateLimitError, match="queue is full"):
        c.completions.create(model=HUB_ID, prompt=[1, 2], max_tokens=2)
    scheduler.submitted, scheduler.refuse = [], None
    for kwargs, words in ((dict(prompt="x" * 5000), "bytes"), (dict(prompt=[1] * 999), "positions"),
                          (dict(prompt=TEXT, max_tokens=10**6), "over the server's limit"),
                          (dict(prompt=[TEXT] * 3, n=2), "prompt x n: a batch of 6 rows is over the server's limit")):
        with pytest.raises(openai.BadRequestError, match=words):
            c.completions.create(model=HUB_ID, **kwargs)


def test_a_refused_chat_completion_counts_as_a_failed_call_as_a_refused_completion_does():
    """Every inference call a client makes is in Triton's counters whatever refused it (test_http checks the other
    routes): a chat completion, always refused here, was in none."""
    from serving.metrics import Metrics

    frontend = Frontend(MODEL, Metrics(MODEL))
    frontend.load(_ModelShape(), _Scheduler(), max_batch_size=4)
    app = create_app(Context(frontend, max_body_bytes=1 << 20, dialect="v1", body_timeout_s=10.0), max_requests=8)
    sent = [("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}, 400),
            ("/v1/chat/completions", {"model": "gpt-4", "messages": []}, 404),
            ("/v1/completions", {"model": MODEL, "prompt": [1], "max_tokens": 0}, 400)]
    with TestClient(app) as http:
        for path, body, status in sent:
            assert http.post(path, json=body).status_code == status, path
        text = http.get("/metrics").text
    values = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
    assert (values["nv_inference_request_failure_total"], values["nv_inference_request_success_total"]) == (3, 0)


def _choice(stops: list[str], groups: list[list[int]], end: str | None = None):
    """A choice fed `groups` of tokens, an event each (as a decode call sends them), then `end`'s Finished."""
    frontend = Frontend(MODEL)
    frontend.load(_ModelShape(), _Scheduler(), max_batch_size=1)
    choice = Choice(frontend, stops, frozenset({EOS}))
    for ids in groups:
        choice.add(Tokens(ids, [-float(t) for t in ids]))
    if end:
        choice.add(Finished(end))
    return choice


def test_text_offsets_start_a_character_split_over_tokens_at_its_first_token():
    """Each byte of an emoji is a token that alone decodes to U+FFFD: all of them start where the emoji does,
    so a stop string right after one keeps every token of it."""
    ids = default_tokenizer().encode("a😀😀 b")
    assert len(ids) == 6  # a, two tokens per emoji, " b"
    whole = _choice([], [ids], end="length")
    assert (whole.text, whole.offsets) == ("a😀😀 b", [0, 1, 1, 2, 2, 3])
    cut = _choice([" b"], [[t] for t in ids])
    assert (cut.text, cut.finish_reason, cut.kept_tokens()) == ("a😀😀", "stop", 5)
    assert cut.offsets == whole.offsets and cut.logprobs == [-float(t) for t in ids]


def test_an_echoed_prompt_ending_inside_a_character_is_decoded_whole_with_the_first_new_token():
    """A token-id prompt whose last token holds half of an emoji: echoed text + new text is the whole decoding,
    the emoji whole (each half decoded apart would be U+FFFD)."""
    ids = default_tokenizer().encode("a😀 b")
    assert len(ids) == 4  # a, two tokens for the emoji, " b"
    frontend = Frontend(MODEL)
    frontend.load(_ModelShape(), _Scheduler(), max_batch_size=1)
    choice = Choice(frontend, [], frozenset({EOS}))
    choice.echo(ids[:2])
    choice.add(Tokens(ids[2:], [-1.0, -1.0]))
    choice.add(Finished("length"))
    assert (choice.echoed, choice.text, choice.offsets) == ("a", "😀 b", [0, 1])
    alone = Choice(frontend, [], frozenset({EOS}))
    alone.echo(ids[:2])
    alone.add(Finished("length"))  # no new token completes it: the half is U+FFFD, as the whole decoding says
    assert alone.echoed + alone.text == default_tokenizer().decode(ids[:2]) == "a\ufffd"


def test_the_stop_string_that_completes_first_wins_however_tokens_are_grouped():
    """Of the stops "quick brown" and "ck", the second completes first (with " quick", the first one token
    later, though it starts earlier): the text ends before "ck" and the tokens after " quick" are not taken,
    whether the tokens come one by one or together."""
    ids = default_tokenizer().encode("The quick brown fox")
    assert len(ids) == 4
    for groups in ([[t] for t in ids], [ids], [ids[:1], ids[1:]], [ids[:3], ids[3:]]):
        c = _choice(["quick brown", "ck"], groups)
        assert (c.text, c.finish_reason, c.ids, c.kept_tokens()) == ("The qui", "stop", ids[:2], 2), groups
    together = _choice(["quick", "u", "qu"], [ids])  # in one token: the earliest end, then the longest
    assert together.text == "The "


class _Scripted(_Scheduler):
    """Answers every request with the same token groups, an event each (as decode calls send them), then its end."""

    def __init__(self, groups: list[list[int]]):
        super().__init__()
        self.groups = groups

    def submit(self, requests):
        super().submit(requests)
        for r in requests:
            for ids in self.groups:
                r.put(Tokens(ids, [-t / 1000 for t in ids]))
            r.put(Finished("length"))


def _unary_and_streamed(groups: list[list[int]], **body) -> tuple[dict, dict]:
    """(the unary choice, the streamed chunks' choice joined: text, finish_reason and logprobs lists) of a
    completion whose tokens are `groups`."""
    frontend = Frontend(MODEL)
    frontend.load(_ModelShape(), _Scripted(groups), max_batch_size=1)
    app = create_app(Context(frontend, max_body_bytes=1 << 20, dialect="v1", body_timeout_s=10.0), max_requests=8)
    body = {"prompt": [1], "max_tokens": 16, "logprobs": 0, **body}
    with TestClient(app) as http:
        unary = http.post("/v1/completions", json=body).json()["choices"][0]
        lines = http.post("/v1/completions", json={**body, "stream": True}).text.split("\n\n")
    joined = {"text": "", "finish_reason": None, "logprobs": {"tokens": [], "token_logprobs": [], "text_offset": []}}
    for line in lines:
        if line.startswith("data: {"):
            (c,) = json.loads(line[len("data: "):])["choices"]
            joined["text"] += c["text"]
            joined["finish_reason"] = c["finish_reason"] or joined["finish_reason"]
            for key, values in joined["logprobs"].items():
                values += c["logprobs"][key]
    return unary, joined


def test_a_stream_names_in_logprobs_only_tokens_whose_text_it_sent():
    """" a" comes with "x" in one decode call, and is held back as the start of the stop string " a b": the chunk
    that sends "x" names only "x" in its logprobs, so when " b" completes the stop string the stream has named no
    token of it, and its logprobs are the unary answer's."""
    ids = default_tokenizer().encode("x a b c")
    assert len(ids) == 4
    unary, streamed = _unary_and_streamed([ids[:2], ids[2:]], stop=" a b")
    assert (unary["text"], unary["finish_reason"], unary["logprobs"]["tokens"]) == ("x", "stop", ["x"])
    assert streamed == {k: unary[k] for k in ("text", "finish_reason")} | {
        "logprobs": {k: unary["logprobs"][k] for k in ("tokens", "token_logprobs", "text_offset")}}


def test_logprobs_name_a_token_that_holds_part_of_a_character_by_its_bytes():
    """As OpenAI names them ("bytes:\\xf0\\x9f\\x98"), not as U+FFFD, which loses which bytes the token holds;
    streamed or not, and the text holds the whole character."""
    ids = default_tokenizer().encode("a😀b")
    assert len(ids) == 4
    unary, streamed = _unary_and_streamed([ids[:2], ids[2:]])
    assert unary["text"] == streamed["text"] == "a😀b"
    assert unary["logprobs"]["tokens"] == streamed["logprobs"]["tokens"] == ["a", "bytes:\\xf0\\x9f\\x98",
                                                                             "bytes:\\x80", "b"]
    assert unary["logprobs"]["text_offset"] == streamed["logprobs"]["text_offset"] == [0, 1, 1, 2]


@pytest.mark.parametrize("field, value, words", [
    ("logit_bias", [], "logit_bias must be an object, got []"), ("logit_bias", 0, "logit_bias must be an object"),
    ("suffix", 0, "suffix must be a string, got 0"), ("suffix", False, "suffix must be a string"),
    ("user", 5, "user must be a string, got 5"), ("best_of", True, "best_of must be an integer, got True"),
    ("best_of", 1.0, "best_of must be an integer"), ("presence_penalty", False, "presence_penalty must be a number"),
    ("frequency_penalty", "0", "frequency_penalty must be a number, got '0'"),
    ("stop", "", "stop strings must not be empty"), ("stop", ["a", ""], "stop strings must not be empty"),
    ("stop", ["a"] * 100, "stop takes up to 4 strings, got 100"),
])
def test_an_optional_field_of_the_wrong_type_is_a_400_naming_it(field, value, words):
    """Each was read as its neutral value (an empty logit_bias, no suffix, best_of equal to n) and ignored without
    a word; an empty stop string was refused as "up to 4 non-empty strings, got 1"."""
    frontend = Frontend(MODEL)
    frontend.load(_ModelShape(), _Scripted([[13]]), max_batch_size=1)
    app = create_app(Context(frontend, max_body_bytes=1 << 20, dialect="v1", body_timeout_s=10.0), max_requests=8)
    with TestClient(app) as http:
        r = http.post("/v1/completions", json={"prompt": [1], "max_tokens": 1, field: value})
        assert r.status_code == 400 and words in r.json()["error"]["message"], r.text
        neutral = {"logit_bias": {}, "suffix": "", "user": "someone", "best_of": 1, "presence_penalty": 0.0,
                   "frequency_penalty": 0, "stop": ["\n\n"]}
        r = http.post("/v1/completions", json={"prompt": [1], "max_tokens": 1, field: neutral[field]})
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == ".", r.text
