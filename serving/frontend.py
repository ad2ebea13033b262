"""The one front end every API shares: the model's limits, request validation, the request life cycle, errors.

The adapters (native gRPC, KServe gRPC, KServe HTTP, OpenAI HTTP) turn their wire format into `Params` and
call the same methods, so a limit or a field check lives here once:

    frontend = Frontend("gpt2-tiny")                  # exists before the model: everything is UNAVAILABLE
    frontend.load(engine, scheduler)                  # limits known; `ready` once the scheduler accepts
    with frontend.api_call() as call:                 # one API call: the metrics hook, timed
        call.requests = [frontend.validate(Params(prompt=[464, 2068], max_new_tokens=8, temperature=0))]
        frontend.submit(call.requests)                # RequestError RESOURCE_EXHAUSTED / UNAVAILABLE
        (done,) = frontend.collect(call.requests, context.is_active)   # blocking; or read request.on_event

Every value is checked against the range of every type it later travels in: the scheduler's command arrays
are int32 (token ids, lengths, top_k, slots), float32 (temperature, top_p) and uint32 (the seed), so no
request can make the engine loop raise. Seeds: any integer that fits 64 bits (int64 or uint64) is accepted
and the engine uses it modulo 2**32 (seeds equal modulo 2**32 give the same tokens).

Text prompts are capped before they are tokenized, at TEXT_BYTES_PER_POSITION bytes (UTF-8) per position of
the model: natural text averages about 4 bytes per GPT-2 token and few tokens are longer than 16 bytes, so a
longer text almost never fits in the context, and the cap bounds the tokenizer's time (it holds the
interpreter lock: 4 KB take ~10 ms, 256 KB ~0.7 s) and memory. Send token ids for the rare text of long
tokens (runs of punctuation) that the cap refuses. Tokenizing runs on a small pool of its own, so waiting
handlers and event loops are not the threads doing it.

Errors are `RequestError(code, message)` with `code` a serving.request.Code: `grpc_status(code)`, and
`code.http_status` with `code.http_headers`, map it for the wire.
"""

from __future__ import annotations

import codecs
import contextlib
import hmac
import numbers
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np

from gptjax.prompts import MAX_STOP_IDS, check_prompt, check_token_ids
from gptjax.sampling import SamplingParams
from serving.request import Code, Event, Failed, Finished, Request, Tokens

INT32_MAX = 2**31 - 1
WIRE_INTS = (-(2**63), 2**64 - 1)  # fits int64 or uint64: the widest integer any wire format carries
TEXT_BYTES_PER_POSITION = 16
TOKENIZE_THREADS = 2
POLL_S = 0.25  # how often a blocked handler looks whether its caller is still there


class RequestError(Exception):
    """A request the server refuses or could not finish: a Code and a message naming the field."""

    def __init__(self, code: Code, message: str):
        super().__init__(message)
        self.code = code
        self.message = message

    @property
    def http_status(self) -> int:
        return self.code.http_status

    @property
    def http_headers(self) -> dict[str, str]:
        return self.code.http_headers

    def __repr__(self) -> str:
        return f"RequestError({self.code.name}, {self.message!r})"


def invalid(message: str) -> RequestError:
    return RequestError(Code.INVALID_ARGUMENT, message)


def bearer_key_matches(authorization: bytes, key: bytes) -> bool:
    """Whether an `Authorization` value (HTTP header or gRPC metadata) carries `key` as a bearer token: the scheme
    in any case, as HTTP's auth schemes are, and blanks around the token ignored."""
    scheme, _, token = authorization.strip().partition(b" ")
    return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), key)


def grpc_status(code: Code):
    """The grpc.StatusCode of a Code (grpc imported here only, so HTTP-only code never needs it)."""
    import grpc

    return grpc.StatusCode[code.name]


@dataclass(frozen=True)
class Limits:
    """What the loaded model and the server's config allow one request."""

    vocab_size: int
    max_seq_len: int  # prompt plus new tokens
    max_new_tokens: int  # the most one request may ask for
    default_max_new_tokens: int
    max_batch_size: int  # rows in one KServe request
    max_queued_requests: int
    max_text_bytes: int  # UTF-8 bytes of a text prompt, checked before tokenizing
    eos_token_id: int
    temperature: float  # the defaults of a request that does not say
    top_k: int
    top_p: float
    ft_top_p_off: bool  # FasterTransformer's default: top-p off (ServerConfig.ft_top_p_off)

    @classmethod
    def of(cls, engine, max_queued_requests: int, max_batch_size: int,
           ft_top_p_off: bool | None = None) -> "Limits":
        ec, seq = engine.engine_config, engine.max_seq_len
        return cls(vocab_size=engine.config.vocab_size, max_seq_len=seq,
                   max_new_tokens=ec.new_tokens_limit(engine.config), default_max_new_tokens=ec.max_new_tokens,
                   # a batch is queued whole: one larger than the queue could never be taken
                   max_batch_size=min(max_batch_size, max_queued_requests), max_queued_requests=max_queued_requests,
                   max_text_bytes=TEXT_BYTES_PER_POSITION * seq, eos_token_id=ec.eos_token_id,
                   temperature=ec.temperature, top_k=ec.top_k, top_p=ec.top_p,
                   ft_top_p_off=ec.top_p == 1.0 if ft_top_p_off is None else ft_top_p_off)


@dataclass
class Params:
    """One generation request as an API states it, before any check. None: the server's default.

    `prompt` is text or token ids (a list or a 1-D integer array). `end_id` is the end-of-text token that
    stops generation (None: the model's); `ignore_eos` drops it. `deadline` is in time.monotonic() seconds.
    """

    prompt: str | Sequence[int] | np.ndarray | None
    max_new_tokens: int | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop_ids: Sequence[int] | np.ndarray = ()
    ignore_eos: bool = False
    end_id: int | None = None
    deadline: float | None = None


@dataclass
class Completion:
    """What the engine produced for one request, gathered from its events."""

    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str  # "stop" or "length"


@dataclass
class ApiCall:
    """One API call, for the metrics: the adapter sets `requests` once it has them."""

    requests: list[Request] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)


# ---- value checks: each names the field as the caller's API names it ------------------------------------
def _integer(value, name: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise invalid(f"{name} must be an integer, got {value!r}")
    value = int(value)
    if not low <= value <= high:
        raise invalid(f"{name} = {value} is outside [{low}, {high}]")
    return value


def _real(value, name: str) -> float:
    """A finite number that stays finite as float32 (the scheduler's wire type)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise invalid(f"{name} must be a number, got {value!r}")
    try:
        value = float(value)
    except OverflowError:  # an integer past float64
        raise invalid(f"{name} must be a finite number (float32), got an integer too large for a float") from None
    with np.errstate(over="ignore"):
        if not np.isfinite(np.float32(value)):
            raise invalid(f"{name} must be a finite number (float32), got {value}")
    return value


def _checked(check: Callable, *args):
    """A gptjax.prompts check, its ValueError as INVALID_ARGUMENT with the same message."""
    try:
        return check(*args)
    except ValueError as e:
        raise invalid(str(e)) from None


def _sampling(p: Params, lim: Limits, names: Mapping[str, str]) -> SamplingParams:
    temperature = _real(lim.temperature if p.temperature is None else p.temperature, names["temperature"])
    if temperature < 0:
        raise invalid(f"{names['temperature']} must be >= 0 (0 is greedy), got {temperature}")
    top_k = _integer(lim.top_k if p.top_k is None else p.top_k, names["top_k"], 0, INT32_MAX)
    top_p = _real(lim.top_p if p.top_p is None else p.top_p, names["top_p"])
    if not 0.0 < top_p <= 1.0 or np.float32(top_p) == 0:
        raise invalid(f"{names['top_p']} must be in (0, 1] (1 is off), got {top_p}")
    seed = _integer(0 if p.seed is None else p.seed, names["seed"], *WIRE_INTS)
    return SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed % 2**32)


NAMES = {f: f for f in ("prompt", "max_new_tokens", "temperature", "top_k", "top_p", "seed", "stop_ids", "end_id")}


class TextStream:
    """Decode a growing token list piece by piece, as the whole list decodes: the bytes of a character split over
    tokens are held back until it is whole, while bytes that no later token can make whole (and a U+FFFD the model
    wrote) are U+FFFD at once. Each token is decoded once, so a long stream costs its length."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, ids, final: bool = False) -> str:
        return self._utf8.decode(b"".join(map(self.tokenizer.token_bytes, ids)), final)


class Frontend:
    """The served model, its limits and the request life cycle, shared by every API.

    It exists before the model loads (every call gets UNAVAILABLE until `load` and the scheduler accepts).
    `metrics` is an optional object with `call_finished(requests, ok, duration_s)`, called once per API
    call made inside `api_call()`.
    """

    def __init__(self, name: str, metrics=None):
        self.name = name
        self.metrics = metrics
        self.engine = None
        self.scheduler = None
        self.limits: Limits | None = None
        self._loaded = False
        self._tokenize_pool = ThreadPoolExecutor(TOKENIZE_THREADS, thread_name_prefix="tokenize")

    def load(self, engine, scheduler, max_batch_size: int, ft_top_p_off: bool | None = None) -> None:
        """The model is built: its limits apply (`max_batch_size`: rows in one KServe request; `ft_top_p_off`:
        ServerConfig's). `ready` turns true once the scheduler accepts."""
        self.engine, self.scheduler = engine, scheduler
        self.limits = Limits.of(engine, scheduler.max_queued, max_batch_size, ft_top_p_off)
        self._loaded = True

    @property
    def ready(self) -> bool:
        return self._loaded and self.scheduler.accepting

    def require_loaded(self) -> Limits:
        """The limits once the model is built (also while draining); UNAVAILABLE before."""
        if not self._loaded:
            raise RequestError(Code.UNAVAILABLE, "the model is loading; retry when health is SERVING")
        return self.limits

    def require_ready(self) -> Limits:
        """The limits while requests are taken; UNAVAILABLE while loading, starting or draining."""
        self.require_loaded()
        if not self.scheduler.accepting:
            raise RequestError(Code.UNAVAILABLE, "the server is not accepting requests (starting or shutting down)")
        return self.limits

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def decode(self, ids) -> str:
        return self.engine.tokenizer.decode(ids)

    def text_stream(self) -> TextStream:
        return TextStream(self.engine.tokenizer)

    # ---- text ----------------------------------------------------------------------------------------
    def check_text(self, text, name: str = "text") -> None:
        """Refuse a text that is empty, not a str, or over the byte cap, before any tokenizing."""
        lim = self.require_ready()
        if not isinstance(text, str):
            raise invalid(f"{name} must be a string, got {type(text).__name__}")
        if not text:
            raise invalid(f"{name} is empty")
        # len() counts characters, each at least one UTF-8 byte: a long text is refused without encoding it
        try:
            size = len(text) if len(text) > lim.max_text_bytes else len(text.encode("utf-8"))
        except UnicodeEncodeError:  # a lone surrogate (JSON's "\ud800"): no UTF-8 text, nothing to tokenize
            raise invalid(f"{name} is not valid Unicode text (it holds a lone surrogate)") from None
        if size > lim.max_text_bytes:
            raise invalid(f"{name} is {size} bytes; the model's {lim.max_seq_len} positions take at most "
                          f"{lim.max_text_bytes} bytes of text ({TEXT_BYTES_PER_POSITION} per position; "
                          "send token ids for a longer one)")

    def tokenize_async(self, text, name: str = "text") -> Future:
        """Check the text (raises RequestError now), then tokenize it on the front end's pool -> a Future
        of the token ids (wrap it with asyncio.wrap_future in an event loop)."""
        self.check_text(text, name)
        if self.scheduler.queued() >= self.scheduler.max_queued:  # refused now, not after the tokenizing
            from serving.scheduler import QueueFull

            raise RequestError(Code.RESOURCE_EXHAUSTED, str(QueueFull.of(self.scheduler.max_queued)))
        return self._tokenize_pool.submit(self.engine.tokenizer.encode, text)

    def tokenize(self, text, name: str = "text") -> list[int]:
        return self.tokenize_async(text, name).result()

    # ---- the one validation path ---------------------------------------------------------------------
    def validate(self, p: Params, names: Mapping[str, str] | None = None) -> Request:
        """Params -> a Request the scheduler can run, or RequestError naming the field. `names` maps the
        fields of Params (prompt, max_new_tokens, temperature, top_k, top_p, seed, stop_ids, end_id) to what
        the caller's API calls them. A text prompt is tokenized here (blocking); an event loop tokenizes
        with `tokenize_async` first and passes the ids."""
        lim = self.require_ready()
        names = {**NAMES, **(names or {})}
        if p.prompt is None:
            raise invalid(f"{names['prompt']}: give a text or token ids")
        if isinstance(p.prompt, str):
            prompt_name = f"{names['prompt']} (as tokens)"
            ids = self.tokenize(p.prompt, names["prompt"])
        else:
            prompt_name, ids = names["prompt"], p.prompt
        prompt = _checked(check_prompt, ids, lim.vocab_size, lim.max_seq_len, prompt_name)
        n_new = self._new_tokens(p.max_new_tokens, len(prompt), names["max_new_tokens"])
        sampling = _sampling(p, lim, names)
        stops = set(_checked(check_token_ids, p.stop_ids, lim.vocab_size, MAX_STOP_IDS, names["stop_ids"],
                             f"entries; at most {MAX_STOP_IDS} are taken"))
        if not p.ignore_eos:
            end_id = lim.eos_token_id if p.end_id is None else _integer(p.end_id, names["end_id"], *WIRE_INTS)
            if not 0 <= end_id < lim.vocab_size:
                raise invalid(f"{names['end_id']} = {end_id} is outside the vocabulary [0, {lim.vocab_size})")
            stops.add(end_id)
        if p.deadline is not None and not isinstance(p.deadline, numbers.Real):
            raise invalid(f"deadline must be a number, got {p.deadline!r}")
        return Request(prompt, n_new, sampling, frozenset(stops), p.deadline)

    def _new_tokens(self, n, prompt_len: int, name: str) -> int:
        """The new tokens a request asked for, checked; one that did not say gets the server's default, capped
        by the limit and by the positions its prompt leaves (a default that can't fit is no fault of the
        request's)."""
        lim = self.limits
        if n is None:  # a checked prompt leaves room for at least one
            return min(lim.default_max_new_tokens, lim.max_new_tokens, lim.max_seq_len - prompt_len)
        n = _integer(n, name, *WIRE_INTS)
        if n < 1:
            raise invalid(f"{name} must be at least 1, got {n}")
        if n > lim.max_new_tokens:
            raise RequestError(Code.RESOURCE_EXHAUSTED,
                               f"{name} = {n} is over the server's limit of {lim.max_new_tokens}")
        if prompt_len + n > lim.max_seq_len:
            raise invalid(f"prompt length {prompt_len} + {name} {n} exceeds the model's {lim.max_seq_len} positions")
        return n

    def check_batch(self, rows: int, name: str) -> None:
        """A batch of `rows` requests in one call (KServe): at least one, at most max_batch_size."""
        lim = self.require_ready()
        if rows < 1:
            raise invalid(f"{name} has an empty batch")
        if rows > lim.max_batch_size:
            raise RequestError(Code.RESOURCE_EXHAUSTED,
                               f"{name}: a batch of {rows} rows is over the server's limit of {lim.max_batch_size}")

    # ---- the life cycle ------------------------------------------------------------------------------
    def submit(self, requests: list[Request]) -> None:
        """Queue the requests together (all or none): RequestError RESOURCE_EXHAUSTED when the queue is
        full, UNAVAILABLE while loading or draining."""
        from serving.scheduler import NotAccepting, QueueFull

        self.require_ready()
        try:
            self.scheduler.submit(requests)
        except QueueFull as e:
            raise RequestError(Code.RESOURCE_EXHAUSTED, str(e)) from None
        except NotAccepting:
            raise RequestError(Code.UNAVAILABLE, "the server is shutting down") from None

    def collect(self, requests: list[Request], is_active: Callable[[], bool],
                poll_s: float = POLL_S) -> list[Completion]:
        """Wait for every request to end -> their completions. When one fails, or `is_active()` turns
        false (the caller went away), every request is cancelled and RequestError is raised. For requests
        read by a waiting thread (no `on_event`); an event loop reads `Request.on_event` instead."""
        try:
            waiting = list(requests)
            while waiting:
                if not waiting[0].wait_ended(poll_s) and not is_active():
                    raise RequestError(Code.CANCELLED, "the call was cancelled")
                for r in [r for r in waiting if r.ended]:
                    if isinstance(r.events[-1], Failed):  # the last event of an ended request is its end
                        raise RequestError(r.events[-1].code, r.events[-1].message)
                    waiting.remove(r)
            return [_completion(r) for r in requests]
        except BaseException:
            for r in requests:
                r.cancel()
            raise

    def events(self, request: Request, is_active: Callable[[], bool], poll_s: float = POLL_S) -> Iterator[Event]:
        """The request's events as they come, ending with its Finished; a Failed, or the caller going away
        (`is_active()` false: CANCELLED), raises RequestError. The request is cancelled when the iteration
        ends early."""
        try:
            while True:
                event = request.next_event(poll_s)
                if event is None:
                    if not is_active():
                        raise RequestError(Code.CANCELLED, "the call was cancelled")
                    continue
                if isinstance(event, Failed):
                    raise RequestError(event.code, event.message)
                yield event
                if isinstance(event, Finished):
                    return
        finally:
            if not request.ended:
                request.cancel()

    @contextlib.contextmanager
    def api_call(self) -> Iterator[ApiCall]:
        """Time one API call and report it to the metrics (ok unless the block raised)."""
        call, ok = ApiCall(), False
        try:
            yield call
            ok = True
        finally:
            if self.metrics is not None:
                self.metrics.call_finished(call.requests, ok, time.monotonic() - call.started)

    def counts(self) -> tuple[int, int]:
        """(requests holding a slot, requests queued) now; (0, 0) before the model loads."""
        if not self._loaded:
            return 0, 0
        return self.scheduler.active(), self.scheduler.queued()


def _completion(r: Request) -> Completion:
    """The completion of an ended request from its queued events; RequestError if it failed."""
    ids, lps = [], []
    while (event := r.next_event(0)) is not None:
        if isinstance(event, Tokens):
            ids += event.ids
            lps += event.logprobs
        elif isinstance(event, Finished):
            return Completion(ids, lps, event.reason)
        else:
            raise RequestError(event.code, event.message)
    raise RequestError(Code.INTERNAL, "the request ended without a final event")
