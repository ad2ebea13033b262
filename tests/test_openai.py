"""The OpenAI-compatible API of the real `gptjax serve`, driven by the official `openai` package: the model list,
completions unary and streamed (the streamed text is the unary text at temperature 0, and both are the native
API's greedy text), stop strings, echo, logprobs, n, seeds, usage, and the errors it raises."""

from __future__ import annotations

import pytest

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
    from gptjax.tokenizer import default_tokenizer
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
