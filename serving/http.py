"""The HTTP port (process 0): KServe v2 REST with the binary tensor extension, Triton's generate extension,
the OpenAI-compatible API (serving/openai.py) and `/metrics`: the helpers their routes share. serving/http_app.py
mounts the routes in one FastAPI app run by uvicorn.

KServe v2 (model `fastertransformer`, version 1), so `tritonclient.http` works with its defaults:

    GET  /v2/health/live, /v2/health/ready, /v2, /v2/models/{m}[/versions/{v}][/ready|/config]
    POST /v2/models/{m}[/versions/{v}]/infer           JSON tensors, or a JSON header of
         `Inference-Header-Content-Length` bytes followed by the binary tensors (binary_data_size each);
         outputs in binary when the request asks (binary_data_output, or an output's binary_data)
    POST /v2/models/{m}[/versions/{v}]/generate        {"text_input": ..., "parameters": {...}} -> {"text_output"}
    POST /v2/models/{m}[/versions/{v}]/generate_stream the same as server-sent events, a piece of text each

The FasterTransformer tensors of both dialects are serving/ft.py's; every field check is the front end's
(serving/frontend.py), so the rules are those of the gRPC APIs. Errors are JSON `{"error": "..."}` with the
front end's HTTP status (400, 401, 404, 408, 413, 429, 503) and headers (a 503's Retry-After: serving/request.py).

uvicorn runs on a thread of its own with its own event loop. A request's events cross from the engine thread
with `loop.call_soon_threadsafe` into a queue of that request (no polling), and a client that disconnects,
from a stream or a unary call, cancels its requests at once, which frees their slots. A large JSON body, or a large
JSON answer, is read or written on a worker thread a piece at a time: one json.loads or json.dumps call holds the
GIL until it returns, so from any thread it would pause every stream on the loop.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import sys
from dataclasses import dataclass
from typing import AsyncIterator, Awaitable, Callable

from fastapi import Request as HttpRequest
from fastapi.responses import JSONResponse, Response
from starlette.requests import ClientDisconnect

from serving.frontend import Completion, Frontend, RequestError, bearer_key_matches, invalid
from serving.request import Code, Failed, Finished, Request, Tokens

log = logging.getLogger("gptjax.serving")

HEALTH_PATHS = ("/v2/health/live", "/v2/health/ready")
UNLIMITED_PATHS = (*HEALTH_PATHS, "/metrics")  # a busy server still answers its probes and scrapes


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


# ---- the bridge from the engine thread into the event loop ------------------------------------------------
class Stream:
    """One Request's events on this event loop: the engine thread hands each one over with
    `call_soon_threadsafe` (set up before the request is submitted)."""

    def __init__(self, request: Request, loop: asyncio.AbstractEventLoop):
        self.request = request
        self._queue: asyncio.Queue = asyncio.Queue()
        self._loop = loop
        request.on_event = self._deliver

    def _deliver(self, event) -> None:  # on the engine's thread
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, event)
        except RuntimeError:  # the loop has closed with the server: nobody is listening
            pass

    async def events(self) -> AsyncIterator[Tokens | Finished]:
        """Its Tokens, then its Finished; a Failed raises RequestError."""
        while True:
            event = await self._queue.get()
            if isinstance(event, Failed):
                raise RequestError(event.code, event.message)
            yield event
            if isinstance(event, Finished):
                return

    async def completion(self) -> Completion:
        ids, logprobs = [], []
        async for event in self.events():
            if isinstance(event, Tokens):
                ids += event.ids
                logprobs += event.logprobs
            else:
                return Completion(ids, logprobs, event.reason)
        raise RequestError(Code.INTERNAL, "the request ended without a final event")


def streams(requests: list[Request]) -> list[Stream]:
    loop = asyncio.get_running_loop()
    return [Stream(r, loop) for r in requests]


async def _disconnected(http: HttpRequest) -> None:
    """Returns when the client has gone (the body is read by now, so the next message is the disconnect)."""
    while (await http.receive())["type"] != "http.disconnect":
        pass


async def until_disconnect(http: HttpRequest, work: Awaitable, requests: list[Request]):
    """Await `work`; if the client disconnects first, cancel it and the requests (freeing their slots) and
    raise ClientGone. The requests are cancelled on every way out that is not their normal end."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(http))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        raise ClientGone()
    finally:
        for t in (task, watcher):
            t.cancel()
        for r in requests:
            r.cancel()
        await asyncio.gather(task, watcher, return_exceptions=True)  # retrieved: no "never retrieved" noise


class EventStream(Response):
    """Server-sent events from an async iterator of byte chunks. The client's disconnect stops the iterator at
    once, whatever it is waiting for (its own `finally` cancels its requests); `on_close` runs after it, for
    what an iterator that never started leaves undone."""

    media_type = "text/event-stream"

    def __init__(self, chunks: AsyncIterator[bytes], on_close: Callable[[], None] | None = None):
        # no body, so no content-length: the stream ends when the server closes it
        self.status_code, self.background = 200, None
        self.init_headers({"cache-control": "no-cache", "x-accel-buffering": "no"})
        self.chunks, self.on_close = chunks, on_close

    async def __call__(self, scope, receive, send) -> None:
        async def pump():
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            async for chunk in self.chunks:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
                # chunks queued up while the loop was busy come without a pause: this one lets the loop hear of a
                # client gone (a failed write's connection_lost) before the next is written to a dead connection,
                # which asyncio logs ("socket.send() raised exception.") for each one
                await asyncio.sleep(0)
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        async def gone():
            while (await receive())["type"] != "http.disconnect":
                pass

        streaming, watching = asyncio.ensure_future(pump()), asyncio.ensure_future(gone())
        try:
            await asyncio.wait((streaming, watching), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (streaming, watching):
                t.cancel()
            await asyncio.gather(streaming, watching, return_exceptions=True)
            await self.chunks.aclose()
            if self.on_close is not None:
                self.on_close()
        if not streaming.cancelled() and streaming.exception() is not None:
            raise streaming.exception()


def sse(data) -> bytes:
    return b"data: " + (data if isinstance(data, bytes) else json.dumps(data).encode()) + b"\n\n"


# ---- bodies and errors ------------------------------------------------------------------------------------
OPENAI_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                      405: "invalid_request_error", 408: "invalid_request_error", 413: "invalid_request_error",
                      429: "rate_limit_error", 503: "service_unavailable"}


def error_body(path: str, status: int, message: str) -> dict:
    """Triton's error form `{"error": "..."}`, or OpenAI's `{"error": {"message": ...}}` on the OpenAI routes
    (its clients show only `error.message`)."""
    if path.startswith("/v1/"):
        return {"error": {"message": message, "type": OPENAI_ERROR_TYPES.get(status, "server_error"), "param": None,
                          "code": status}}
    return {"error": message}


def error(path: str, status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body(path, status, message), status_code=status, headers=headers)


class BodyTooLarge(Exception):
    """A request body over the server's limit (413)."""

    def __init__(self, size: int, limit: int):
        super().__init__(f"the request body of {size} bytes (or more) is over the server's limit of {limit} bytes")


class BodyTimeout(Exception):
    """A request body that did not arrive whole in the server's time (408): a stalled or trickling client
    would otherwise hold its connection for ever."""

    def __init__(self, received: int, timeout_s: float):
        super().__init__(f"the request body did not arrive within {timeout_s:g} s ({received} bytes came)")


async def read_body(http: HttpRequest, limit: int, timeout_s: float) -> bytes:
    """The request body, refused past `limit` bytes before more than that is read, or when it has not
    arrived whole within `timeout_s`, or when the server stops first (UNAVAILABLE). A compressed body is
    refused by its Content-Encoding on every route (read as JSON, it would be "not valid JSON")."""
    encoding = http.headers.get("content-encoding", "identity")
    if encoding.strip().lower() != "identity":
        raise invalid(f"Content-Encoding {encoding!r} is not supported; send the body uncompressed")
    length = http.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise BodyTooLarge(int(length), limit)
    body = bytearray()
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in http.stream():
                body += chunk
                if len(body) > limit:
                    raise BodyTooLarge(len(body), limit)
    except TimeoutError:
        raise BodyTimeout(len(body), timeout_s) from None
    except ClientDisconnect:  # gone before the body was whole: nobody to answer, nothing to log
        raise ClientGone() from None
    except asyncio.CancelledError:
        # the server stops and its grace time is over: the client goes elsewhere, as a draining server's clients
        # do (let through, the cancel would be uvicorn's plain-text 500)
        asyncio.current_task().uncancel()
        raise RequestError(Code.UNAVAILABLE, "the server is shutting down") from None
    return bytes(body)


# From this size a body is read on a worker thread, in pieces. A smaller one reads in ~2.5 ms or less (JSON of token
# ids reads at ~100 MB/s), under the 5 ms a worker thread holds the GIL before the loop's thread may take it back
# (sys.getswitchinterval): no pause the hop could shorten. A 12 MB body read on the loop paused every stream ~0.15 s.
THREADED_BYTES = 256 * 1024
# What one C call of the reader takes of a large body (~0.5 ms): json.loads holds the GIL from start to end, so on a
# worker thread too one call over a whole body would pause the event loop just as long.
PIECE_CHARS = 64 * 1024


async def off_loop(size: int, fn, *args):
    """`fn(*args)`, on a worker thread when `size` (bytes in, or about that many out) makes it long enough to
    pause every other client of the event loop; a short one costs less on the loop than the hop."""
    if size < THREADED_BYTES:
        return fn(*args)
    return await asyncio.to_thread(fn, *args)


def json_object(data: bytes, what: str = "the request body") -> dict:
    """A body's JSON object, or a 400 naming what is wrong. A large body is read in pieces (`loads_in_pieces`),
    so that the thread reading it gives the GIL back between them; json.loads reads what they don't take."""
    try:
        text = data.decode(json.detect_encoding(data))  # as json.loads reads bytes, but refusing encoded surrogates
        value = _loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise invalid(f"{what} is not valid JSON: {e}") from None
    except RecursionError:
        raise invalid(f"{what} nests its JSON too deeply") from None
    except ValueError:  # Python's own limit on reading an integer's digits (a denial-of-service guard)
        raise invalid(f"{what} holds a number of more than {sys.get_int_max_str_digits()} digits") from None
    if not isinstance(value, dict):
        raise invalid(f"{what} must be a JSON object, got {type(value).__name__}")
    if SURROGATE_ESCAPE.search(text) and _lone_surrogate(value):
        # no text holds one: refused here, it would fail every answer that repeats it (an id, an error naming a field)
        raise invalid(f"{what} is not valid Unicode text: it holds a lone surrogate (a \\u escape in "
                      "D800-DFFF without its pair)")
    return value


def _loads(text: str):
    """json.loads(text); a large text in pieces where they take it."""
    if len(text) >= THREADED_BYTES:
        try:
            return loads_in_pieces(text)
        except Exception:  # not JSON, or beyond what the pieces take: json.loads gives the answer and its error
            pass
    return json.loads(text)


WHITESPACE = re.compile(r"[ \t\n\r]*")  # JSON's own, as json.decoder skips it
NESTED = re.compile(r'["\[\]{}]')  # what ends a run of plain values: a string, or an array or object starting or ending
STEP_CHARS = 256  # a body may have a value walked here per this many characters (others are read in runs)


def loads_in_pieces(text: str):
    """`json.loads(text)`, read in C calls of at most ~PIECE_CHARS each (a long string is one): a large array's
    runs of numbers are each read by one json.loads, each string and each other value by the C scanner, and
    arrays and objects are walked in Python. Raises (any exception) on text it does not take, valid JSON or not:
    nesting past Python's recursion limit, or so many small values that walking them would cost more than
    reading the text whole; its caller reads such text with json.loads."""
    reader = _Pieces(text)
    value, end = reader.value(WHITESPACE.match(text).end())
    if WHITESPACE.match(text, end).end() != len(text):
        raise ValueError("extra data")
    return value


class _Pieces:
    """JSON text walked a value at a time (`loads_in_pieces`), with a budget of values to walk."""

    scan = staticmethod(json.JSONDecoder().scan_once)  # C: the value that starts at an index -> (it, where it ends)

    def __init__(self, text: str):
        self.text, self.steps = text, len(text) // STEP_CHARS + 64

    def value(self, i: int):
        self.steps -= 1
        if self.steps < 0:
            raise ValueError("too many values to walk")
        c = self.text[i:i + 1]
        if c == "[":
            return self.array(i + 1)
        if c == "{":
            return self.object(i + 1)
        return self.scan(self.text, i)  # StopIteration where no value starts

    def array(self, i: int):
        text, out = self.text, []
        i = WHITESPACE.match(text, i).end()
        if text[i:i + 1] == "]":
            return out, i + 1
        while True:
            # the values up to the last comma before anything nested (all plain, so each comma ends one) in one call
            stop = NESTED.search(text, i, i + PIECE_CHARS)
            comma = text.rfind(",", i, stop.start() if stop else i + PIECE_CHARS)
            if comma > i:  # at least one value: "[" + "" + "]" would take the text "[," for an empty array
                out += json.loads("[" + text[i:comma] + "]")
                i = WHITESPACE.match(text, comma + 1).end()
            value, i = self.value(i)
            out.append(value)
            closed, i = self.after_item(i, "]")
            if closed:
                return out, i

    def object(self, i: int):
        text, out = self.text, {}
        i = WHITESPACE.match(text, i).end()
        if text[i:i + 1] == "}":
            return out, i + 1
        while True:
            if text[i:i + 1] != '"':
                raise ValueError("expected a key")
            key, i = json.decoder.scanstring(text, i + 1)
            i = WHITESPACE.match(text, i).end()
            if text[i:i + 1] != ":":
                raise ValueError("expected :")
            out[key], i = self.value(WHITESPACE.match(text, i + 1).end())  # a key given twice: the last, as json's
            closed, i = self.after_item(i, "}")
            if closed:
                return out, i

    def after_item(self, i: int, close: str) -> tuple[bool, int]:
        """Past an array's or object's item: (whether `close` ended it, where the next item or what follows starts)."""
        i = WHITESPACE.match(self.text, i).end()
        c = self.text[i:i + 1]
        if c == close:
            return True, i + 1
        if c != ",":
            raise ValueError(f"expected , or {close}")
        return False, WHITESPACE.match(self.text, i + 1).end()


SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")  # how JSON text that decoded strictly can hold a surrogate
SURROGATE = re.compile("[\ud800-\udfff]")


def _lone_surrogate(value) -> bool:
    """Whether a string of `value`, a key or a value at any depth, holds a surrogate (JSON joins the escapes of a
    pair into one character, so any left is one without its pair)."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            if SURROGATE.search(v):
                return True
        elif isinstance(v, dict):
            stack += v.keys()
            stack += v.values()
        elif isinstance(v, list):
            stack += v
    return False


# ---- the app ------------------------------------------------------------------------------------------------
@dataclass
class Context:
    """What every route reads: the front end (its limits once the model loads), the metrics, the server's
    settings known before the model loads."""

    frontend: Frontend
    max_body_bytes: int  # ServerConfig.max_message_bytes, as for gRPC messages
    dialect: str  # what KServe model metadata and config describe (the config.pbtxt's declaration)
    body_timeout_s: float  # ServerConfig.http_body_timeout_s

    @property
    def metrics(self):
        return self.frontend.metrics

    async def body(self, http: HttpRequest) -> bytes:
        return await read_body(http, self.max_body_bytes, self.body_timeout_s)

    async def json(self, http: HttpRequest) -> dict:
        """The body's JSON object (`json_object`); a large one is read off the event loop."""
        body = await self.body(http)
        return await off_loop(len(body), json_object, body)


class RequestLimit:
    """ASGI middleware: at most `limit` requests in progress (a stream counts until it ends); one more gets a
    503 with a JSON body and Retry-After at once, instead of queueing on the event loop. Health checks and
    metrics scrapes always pass, so that a busy server is not taken for a dead one (a failed scrape reads as
    one). (One event loop: no lock.)"""

    def __init__(self, app, limit: int):
        self.app, self.limit, self.active = app, limit, 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in UNLIMITED_PATHS:
            await self.app(scope, receive, send)
            return
        if self.active >= self.limit:
            message = f"the server is answering {self.limit} HTTP requests already; retry later"
            await error(scope["path"], 503, message, {"retry-after": "1"})(scope, receive, send)
            return
        self.active += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.active -= 1


class ApiKey:
    """ASGI middleware: every route but health answers 401 without `Authorization: Bearer KEY`."""

    def __init__(self, app, key: str):
        self.app = app
        self.key = key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] not in HEALTH_PATHS:
            given = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
            if not bearer_key_matches(given, self.key):
                message = "missing API key: send 'Authorization: Bearer KEY'" if not given else "wrong API key"
                response = error(scope["path"], 401, message, {"www-authenticate": "Bearer"})
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
