"""The OpenAI-compatible API on the HTTP port: `GET /v1/models[/{id}]`, `POST /v1/completions`,
`/v1/chat/completions`.

`/v1/completions` takes `prompt` as a string, a token list, or a list of either (each one a choice, times
`n`), `max_tokens` (default 16), `temperature` (default 1), `top_p`, `seed` (none: a random one per choice),
`stop` (up to 4 strings, matched on the decoded text: the text ends before the stop string and the request
stops there, freeing its slot), `logprobs` 0 (each token's own log-probability, a token that holds part of a
character named by its bytes as OpenAI names it; the top alternatives of larger values are not computed),
`echo`, `stream` (server-sent events ending with `data: [DONE]`;
`stream_options.include_usage` adds a last chunk with the usage), and gives `usage` counts (the completion's:
the tokens whose text starts before a stop string). `top_k` is accepted as an extension. Fields that ask for
what gptjax can't do (`best_of` > n, penalties, `logit_bias`, `suffix`) get a 400 naming them, as does any field
of the wrong type; `user` (a string) is taken and unused, as it changes no token. Values are checked by the front
end, as for every API.

The models GPT-2 style checkpoints bring have no chat template, so `/v1/chat/completions` answers 400.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import secrets
import sys
import time
import uuid
from dataclasses import dataclass, field

from fastapi import FastAPI, Request as HttpRequest
from fastapi.responses import JSONResponse

from serving.frontend import Params, RequestError, invalid
from serving.http import (ClientGone, Context, EventStream, Stream, error_body, json_object, off_loop, sse,
                          streams, until_disconnect)
from serving.request import Code, Finished, Request

STARTED = int(time.time())
DEFAULT_MAX_TOKENS = 16  # OpenAI's default for completions
MAX_STOP_STRINGS = 4
MAX_STOP_CHARS = 256  # each stop string: streaming checks every prefix of each one against the text's end
FIELDS = {"model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "n", "stop", "seed", "logprobs", "echo",
          "stream", "stream_options", "user", "best_of", "presence_penalty", "frequency_penalty", "logit_bias",
          "suffix"}
# (field, type, as the message says it) of the optional fields that no other check reads for their type
TYPED = (("presence_penalty", (int, float), "a number"), ("frequency_penalty", (int, float), "a number"),
         ("logit_bias", dict, "an object"), ("suffix", str, "a string"), ("user", str, "a string"),
         ("best_of", int, "an integer"))
NAMES = {"prompt": "prompt", "max_new_tokens": "max_tokens", "temperature": "temperature", "top_p": "top_p",
         "top_k": "top_k", "seed": "seed"}


@dataclass
class Choice:
    """One choice's text as its tokens come: decoded incrementally, cut before the first stop string to complete,
    and held back while its end could still be the start of one. Tokens are taken one at a time, so how the
    engine groups them per event never changes the answer; tokens after the one that completes a stop string
    are dropped. The end-of-text token that ends a request counts as a token but adds no text."""

    frontend: object
    stops: list[str]
    stop_ids: frozenset
    ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    # each token's start in `text`: the characters decoded before it, so the tokens of a character split over
    # several (an emoji's bytes) all start where that character does
    offsets: list[int] = field(default_factory=list)
    text: str = ""
    sent: int = 0  # characters of `text` already streamed
    cut: bool = False  # a stop string ended the text
    finish_reason: str | None = None

    def __post_init__(self):
        self.decoder = self.frontend.text_stream()
        self.echoed = ""  # the prompt's text, with `echo`

    def echo(self, prompt_ids) -> None:
        """Start with the prompt: its text is `echoed`, and a character split between its last token and the first
        new one is decoded whole into `text` (decoded apart, each half would be U+FFFD)."""
        self.echoed = self.decoder.add(prompt_ids)

    def add(self, event) -> None:
        if self.done:  # what a request sends after its stop string (the rest of its decode call) is not news
            return
        if isinstance(event, Finished):
            self._extend(self.decoder.add([], final=True))
            self.finish_reason = self.finish_reason or event.reason
            return
        for t, logprob in zip(event.ids, event.logprobs):
            self.offsets.append(len(self.text))
            self.ids.append(t)
            self.logprobs.append(logprob)
            self._extend("" if t in self.stop_ids else self.decoder.add([t]))
            if self.done:
                return

    def _extend(self, piece: str) -> None:
        """Add decoded text, cut before the stop string that completes first: the one ending earliest, and of
        those ending together the longest (the text before `piece` held none)."""
        checked = len(self.text)
        self.text += piece
        hits = [(i + len(s), i) for s in self.stops if (i := self.text.find(s, max(0, checked - len(s) + 1))) >= 0]
        if hits:
            self.text = self.text[: min(hits)[1]]
            self.cut, self.finish_reason = True, "stop"

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def piece(self) -> str:
        """The text not streamed yet that no stop string can still claim."""
        hold = 0
        if not self.done:
            for s in self.stops:
                for k in range(min(len(s) - 1, len(self.text)), hold, -1):
                    if self.text.endswith(s[:k]):
                        hold = k
                        break
        end = max(self.sent, len(self.text) - hold)
        piece, self.sent = self.text[self.sent:end], end
        return piece

    def kept_tokens(self) -> int:
        """Tokens whose text starts inside the kept text (all of them unless a stop string cut it): what the
        answer's logprobs list and its usage counts."""
        return bisect.bisect_left(self.offsets, len(self.text)) if self.cut else len(self.ids)

    def streamed_tokens(self) -> int:
        """Tokens whose text starts inside what `piece` has given (the kept ones once done): those a stream's
        logprobs may name by now, never one whose text is held back as a stop string's possible start."""
        return self.kept_tokens() if self.done else bisect.bisect_left(self.offsets, self.sent)


def _prompts(value) -> list:
    """`prompt` as a list of prompts, each a str or a list of token ids."""
    def is_int(v):
        return isinstance(v, int) and not isinstance(v, bool)

    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not value:
        raise invalid("prompt must be a string, a list of token ids, or a non-empty list of either")
    if all(is_int(v) for v in value):
        return [value]
    if all(isinstance(v, str) for v in value) or all(isinstance(v, list) for v in value):
        return list(value)
    raise invalid("prompt must be a string, a list of token ids, or a list of strings or of token-id lists, not a mix")


def _stops(value) -> list[str]:
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise invalid("stop must be a string or a list of strings")
    if len(stops) > MAX_STOP_STRINGS:
        raise invalid(f"stop takes up to {MAX_STOP_STRINGS} strings, got {len(stops)}")
    if not all(stops):
        raise invalid("stop strings must not be empty (an empty one would end every completion before its text)")
    if any(len(s) > MAX_STOP_CHARS for s in stops):
        raise invalid(f"stop strings are at most {MAX_STOP_CHARS} characters, got one of "
                      f"{max(map(len, stops))}")
    return stops


def _refuse_unsupported(body: dict, n: int) -> None:
    """Fields that would change the tokens gptjax can't change, at any value but their neutral one, and every
    optional field of the wrong type (read as its neutral value, one would be ignored without a word)."""
    unknown = sorted(set(body) - FIELDS)
    if unknown:
        raise invalid(f"unknown field(s) {', '.join(unknown)}")
    for name, kind, what in TYPED:
        value = body.get(name)
        if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
            raise invalid(f"{name} must be {what}, got {value!r}")
    for name in ("presence_penalty", "frequency_penalty"):
        if body.get(name) not in (None, 0):
            raise invalid(f"{name} is not supported (only 0)")
    if body.get("logit_bias"):
        raise invalid("logit_bias is not supported (only empty)")
    if body.get("suffix"):
        raise invalid("suffix is not supported: gptjax models do not insert text")
    if body.get("best_of") not in (None, n):
        raise invalid(f"best_of must equal n ({n}): ranking extra choices is not supported")
    logprobs = body.get("logprobs")
    if logprobs is not None and (not isinstance(logprobs, int) or isinstance(logprobs, bool) or logprobs < 0):
        raise invalid(f"logprobs must be a non-negative integer, got {logprobs!r}")
    if logprobs:
        raise invalid("logprobs > 0 asks for the top alternatives of each token, which are not computed; "
                      "logprobs 0 gives each token's own log-probability")
    if logprobs is not None and body.get("echo"):
        raise invalid("echo with logprobs is not supported: the prompt's log-probabilities are not computed")


def _flag(body: dict, name: str) -> bool:
    """A true/false field; null is its default (false), as OpenAI's nullable fields are and as every other
    field here takes it: clients that send each unset field as null must not be refused."""
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise invalid(f"{name} must be true or false, got {value!r}")
    return value


def _count(body: dict, name: str, default: int) -> int:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise invalid(f"{name} must be a positive integer, got {value!r}")
    return value


class Completions:
    """One /v1/completions call: its choices' requests, run and answered."""

    def __init__(self, ctx: Context, body: dict):
        self.ctx, self.body, self.frontend = ctx, body, ctx.frontend
        self.n = _count(body, "n", 1)
        _refuse_unsupported(body, self.n)
        self.stream, self.echo = _flag(body, "stream"), _flag(body, "echo")
        self.want_logprobs = body.get("logprobs") is not None
        self.include_usage = _include_usage(body, self.stream)
        self.stops = _stops(body.get("stop"))
        self.prompts = _prompts(body.get("prompt"))
        self.id, self.created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        self.requests: list[Request] = []
        self.prompt_ids: list[list[int]] = []

    async def make_requests(self) -> list[Request]:
        """Tokenize (off the loop) and validate every choice's request, through the front end. A text prompt
        meeting a full queue is a 429 (the tokenizer refuses it first), as at `submit`."""
        prompts = self.prompts
        with _size_limits_are_400():
            self.frontend.check_batch(len(prompts) * self.n, "prompt x n")
        seed = self.body.get("seed")
        for i, prompt in enumerate(prompts):
            name = "prompt" if len(prompts) == 1 else f"prompt[{i}]"
            if isinstance(prompt, str):
                prompt = await asyncio.wrap_future(self.frontend.tokenize_async(prompt, name))
                name += " (as tokens)"
            for j in range(self.n):
                p = Params(prompt=prompt, max_new_tokens=_option(self.body, "max_tokens", DEFAULT_MAX_TOKENS),
                           temperature=_option(self.body, "temperature", 1.0),
                           top_p=_option(self.body, "top_p", 1.0), top_k=_option(self.body, "top_k", 0),
                           seed=secrets.randbits(63) if seed is None else _shifted(seed, j))
                with _size_limits_are_400():
                    self.requests.append(self.frontend.validate(p, {**NAMES, "prompt": name}))
            self.prompt_ids.append(self.requests[-1].prompt)
        return self.requests

    def usage(self, choices: list[Choice]) -> dict:
        """The prompts' tokens and the choices' kept ones (none generated after a stop string)."""
        prompt = sum(len(p) for p in self.prompt_ids)
        completion = sum(c.kept_tokens() for c in choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def logprobs(self, c: Choice, start: int, end: int | None = None) -> dict | None:
        """OpenAI's logprobs object for the choice's tokens from `start` up to `end` (None: up to those whose text
        it kept)."""
        if not self.want_logprobs:
            return None
        end = c.kept_tokens() if end is None else end
        ids = c.ids[start:end]
        return {"tokens": [self.token_text(t) for t in ids], "token_logprobs": c.logprobs[start:end],
                "top_logprobs": None, "text_offset": c.offsets[start:end]}

    def token_text(self, token: int) -> str:
        """A token as logprobs name it: its text, or, for a token that is not whole UTF-8 alone (part of a
        character split over tokens), its bytes as OpenAI writes them, `bytes:\\xe2\\x80`, not a lossy U+FFFD."""
        raw = self.frontend.tokenizer.token_bytes(token)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(chr(b) if 0x20 <= b < 0x7F and b != 0x5C else f"\\x{b:02x}" for b in raw)

    def chunk(self, choices: list[dict], usage=None) -> dict:
        out = {"id": self.id, "object": "text_completion", "created": self.created,
               "model": self.frontend.name, "choices": choices}
        if self.include_usage or not self.stream:
            out["usage"] = usage
        return out


def _include_usage(body: dict, stream: bool) -> bool:
    """`stream_options.include_usage`; like OpenAI, stream_options without `stream` is refused."""
    options = body.get("stream_options")
    if options is None:
        return False
    if not stream:
        raise invalid("stream_options is only allowed when stream is true")
    if not isinstance(options, dict):
        raise invalid(f"stream_options must be an object, got {type(options).__name__}")
    if set(options) - {"include_usage"}:
        raise invalid("stream_options takes only include_usage")
    value = options.get("include_usage", False)
    if not isinstance(value, bool):
        raise invalid(f"stream_options.include_usage must be true or false, got {value!r}")
    return value


@contextlib.contextmanager
def _size_limits_are_400():
    """A request over one of the server's size limits (`n` x prompts, `max_tokens`) is a 400, as OpenAI answers
    it: its clients retry a 429, and only a full queue is worth retrying."""
    try:
        yield
    except RequestError as e:
        if e.code is Code.RESOURCE_EXHAUSTED:
            raise invalid(e.message) from None
        raise


def _shifted(seed, j: int):
    """Choice j's seed: distinct choices of one seeded call differ, and the call stays reproducible. Past the
    largest seed (2**64 - 1) they wrap to 0, which keeps them the same modulo 2**32 (what the engine uses); the
    seed the client sent (choice 0's) is checked as sent."""
    if j and isinstance(seed, int) and not isinstance(seed, bool):
        return (seed + j) % 2**64
    return seed


async def _run_choice(stream: Stream, choice: Choice) -> None:
    """Feed the choice its request's events until it is done (a stop string ends the request early)."""
    async for event in stream.events():
        choice.add(event)
        if choice.done:
            stream.request.stop_here()  # a stop string: free the slot now
            return


def _answer(call: Completions, choices: list[Choice]) -> dict:
    return call.chunk([{"index": i, "text": c.echoed + c.text, "logprobs": call.logprobs(c, 0),
                        "finish_reason": c.finish_reason} for i, c in enumerate(choices)], call.usage(choices))


async def _merged(runs: list[Stream]):
    """(choice index, event or RequestError) of every choice's request, as they come."""
    queue: asyncio.Queue = asyncio.Queue()

    async def forward(i: int, stream: Stream):
        try:
            async for event in stream.events():
                await queue.put((i, event))
        except RequestError as e:
            await queue.put((i, e))

    tasks = [asyncio.ensure_future(forward(i, s)) for i, s in enumerate(runs)]
    try:
        while True:
            yield await queue.get()
    finally:
        for t in tasks:
            t.cancel()


async def _events(call: Completions, runs: list[Stream], choices: list[Choice], metered: contextlib.ExitStack):
    """The SSE chunks of a streamed completion, then `data: [DONE]`; an error ends it with an error chunk."""
    sent_tokens = [0] * len(choices)
    events = _merged(runs)
    try:
        with metered:
            if call.echo:
                for i in range(len(choices)):
                    yield sse(call.chunk([{"index": i, "text": choices[i].echoed, "logprobs": None,
                                           "finish_reason": None}]))
            async for i, event in events:
                c = choices[i]
                if c.done:  # what a finished choice's request sends after its stop string (its cancel) is not news
                    continue
                if isinstance(event, RequestError):
                    raise event
                c.add(event)
                if c.done:
                    runs[i].request.stop_here()  # finished, or a stop string: free the slot now
                piece = c.piece()
                if piece or c.done:
                    end = c.streamed_tokens()
                    lp = call.logprobs(c, sent_tokens[i], end)
                    sent_tokens[i] = end
                    yield sse(call.chunk([{"index": i, "text": piece, "logprobs": lp,
                                           "finish_reason": c.finish_reason}]))
                if all(c.done for c in choices):
                    break
        if call.include_usage:
            yield sse(call.chunk([], call.usage(choices)))
    except RequestError as e:
        yield sse(error_body("/v1/completions", e.http_status, e.message))
    finally:
        await events.aclose()
        for s in runs:
            s.request.cancel()
    yield sse(b"[DONE]")


def _option(body: dict, name: str, default):
    value = body.get(name)
    return default if value is None else value


def _read_call(ctx: Context, body: bytes, check_model) -> Completions:
    """The call a body asks for, its errors in the order they are answered (its JSON, its model, its fields and
    prompts): on a worker thread for a large body, whose prompts take about as long to check as to read."""
    value = json_object(body)
    check_model(value.get("model"))
    return Completions(ctx, value)


def add_routes(app: FastAPI, ctx: Context) -> None:
    frontend = ctx.frontend

    def check_model(model) -> None:
        if model is not None and model != frontend.name:
            raise RequestError(Code.NOT_FOUND, f"model {model!r} is not served here; this server serves "
                                               f"{frontend.name!r}")

    def card() -> dict:
        out = {"id": frontend.name, "object": "model", "created": STARTED, "owned_by": "gptjax"}
        if frontend.limits is not None:
            out["max_model_len"] = frontend.limits.max_seq_len
        return out

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [card()]}

    @app.get("/v1/models/{model:path}")  # a Hub id holds a '/' (org/name)
    async def retrieve_model(model: str):
        check_model(model)
        return card()

    @app.post("/v1/completions")
    async def completions(http: HttpRequest):
        metered = contextlib.ExitStack()  # the API call, for the metrics: closed when its answer is done
        call_info = metered.enter_context(frontend.api_call())
        try:
            body = await ctx.body(http)
            call = await off_loop(len(body), _read_call, ctx, body, check_model)
            call_info.requests = await call.make_requests()
            runs = streams(call.requests)
            frontend.submit(call.requests)
        except BaseException:
            metered.__exit__(*sys.exc_info())
            raise
        choices = [Choice(frontend, call.stops, r.stop_ids) for r in call.requests]
        for c, r in zip(choices, call.requests) if call.echo else ():
            c.echo(r.prompt)
        if call.stream:
            def close():  # the stream ended before its first chunk: nothing else will cancel or count it
                for r in call.requests:
                    r.cancel()
                metered.__exit__(ClientGone, ClientGone(), None)

            return EventStream(_events(call, runs, choices, metered), on_close=close)
        with metered:
            await until_disconnect(http, asyncio.gather(*(_run_choice(s, c) for s, c in zip(runs, choices))),
                                   call.requests)
        return JSONResponse(_answer(call, choices))

    @app.post("/v1/chat/completions")
    async def chat(http: HttpRequest):
        with frontend.api_call():  # a refused inference call, counted as every other one is
            check_model((await ctx.json(http)).get("model"))
            raise invalid("model has no chat template: its checkpoint brings none; use /v1/completions with the "
                          "conversation as one prompt")
