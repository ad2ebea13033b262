"""KServe v2 over HTTP: health, metadata, `infer` with JSON and binary tensors (the binary tensor extension that
`tritonclient.http` uses by default), and Triton's generate extension (`generate`, `generate_stream`).

An infer request is a JSON header (`inputs`, `outputs`, `parameters`) that is the whole body, or the first
`Inference-Header-Content-Length` bytes of it, followed by the binary tensors in input order
(`parameters.binary_data_size` bytes each). The tensors become numpy arrays here; which names and shapes make
a request is serving/ft.py's (both FasterTransformer dialects), and every value check is the front end's.
Outputs go back as JSON `data`, or binary after the JSON when the request asks (`binary_data_output`, or an
output's `binary_data`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import sys

import numpy as np
from fastapi import FastAPI, Request as HttpRequest
from fastapi.responses import JSONResponse, Response

import gptjax
from serving import ft
from serving.ft import MODEL_NAME, MODEL_VERSION, check_model
from serving.frontend import Params, RequestError, invalid
from serving.http import ClientGone, Context, EventStream, json_object, off_loop, sse, streams, until_disconnect
from serving.request import Code, Finished

EXTENSIONS = ["binary_tensor_data", "generate"]
# Triton's generate extension: its JSON fields -> the front end's Params fields
GENERATE_FIELDS = {"max_tokens": "max_new_tokens", "temperature": "temperature", "top_k": "top_k",
                   "top_p": "top_p", "random_seed": "seed", "end_id": "end_id"}
GENERATE_NAMES = {"max_new_tokens": "max_tokens", "seed": "random_seed", "prompt": "text_input"}
GENERATE_FLAGS = ("stream", "exclude_input_in_output")
PIECE_VALUES = 16 * 1024  # a JSON tensor's values per C call, read or written: ~1 ms for floats, less for token ids


# ---- tensors: JSON and the binary extension --------------------------------------------------------------
def split_binary(body: bytes, header_length: str | None) -> tuple[dict, memoryview]:
    """(the JSON header, the binary section after it) of an infer request."""
    if header_length is None:
        return json_object(body), memoryview(b"")
    if not (header_length.isascii() and header_length.isdigit()):
        raise invalid(f"Inference-Header-Content-Length must be a byte count, got {header_length!r}")
    n = int(header_length)
    if n > len(body):
        raise invalid(f"Inference-Header-Content-Length is {n} but the body has only {len(body)} bytes")
    return json_object(body[:n], "the inference header"), memoryview(body)[n:]


def _shape(t: dict, name: str) -> list[int]:
    shape = t.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                              for d in shape):
        raise invalid(f"input {name}: shape must be a list of non-negative integers, got {shape!r}")
    return shape


def _flatten(data) -> list:
    flat, stack = [], [data]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(reversed(item))
        else:
            flat.append(item)
    return flat


def _fits(v, kind: str) -> bool:
    """Whether a JSON value is one of a datatype kind's: bool for BOOL, a number for floats, else an integer."""
    if kind == "b":
        return isinstance(v, bool)
    if kind == "f":
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    return isinstance(v, int) and not isinstance(v, bool)


def _json_array(data, datatype: str, shape: list[int], name: str) -> np.ndarray:
    if not isinstance(data, list):
        raise invalid(f"input {name}: data must be a list, got {type(data).__name__}")
    flat = _flatten(data)
    if len(flat) != math.prod(shape):
        raise invalid(f"input {name}: shape {shape} needs {math.prod(shape)} values, got {len(flat)}")
    dtype = np.dtype(ft.DTYPES[datatype])
    for v in flat:  # a loop, not next(..., None): a null among the values is itself the bad one
        if not _fits(v, dtype.kind):
            raise invalid(f"input {name}: {v!r} is not a {datatype} value")
    # in C calls of PIECE_VALUES values: one over a large tensor would hold the GIL, and so the event loop, as long
    pieces = [flat[i:i + PIECE_VALUES] for i in range(0, len(flat), PIECE_VALUES)]
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        if any(min(p) < info.min or max(p) > info.max for p in pieces):
            raise invalid(f"input {name}: a value is outside {datatype}'s range [{info.min}, {info.max}]")
    try:  # JSON's numbers have no bound: one past the float datatype's range is refused, not made infinite
        with np.errstate(over="raise"):
            return np.concatenate([np.array(p, dtype) for p in pieces] or [np.array([], dtype)]).reshape(shape)
    except (OverflowError, FloatingPointError):
        raise invalid(f"input {name}: a value is too large for {datatype}") from None


def _tensor_meta(i: int, t) -> tuple[str, str, list[int], int | None]:
    """(name, datatype, shape, binary_data_size or None) of inputs[i], checked for form."""
    if not isinstance(t, dict) or not isinstance(t.get("name"), str):
        raise invalid(f"inputs[{i}] must be an object with a name")
    name, datatype = t["name"], t.get("datatype")
    params = t.get("parameters") or {}
    if not isinstance(params, dict) or set(params) - {"binary_data_size"}:
        raise invalid(f"input {name}: parameters takes only binary_data_size, got {params!r}")
    size = params.get("binary_data_size")
    if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 0):
        raise invalid(f"input {name}: binary_data_size must be a byte count, got {size!r}")
    return name, datatype if isinstance(datatype, str) else "", _shape(t, name), size


def decode_inputs(header: dict, binary: memoryview) -> dict[str, np.ndarray]:
    """The request's input tensors as numpy arrays by name: names first (ft.dialect_of: unknown, repeated or
    mixed dialects), then each tensor's datatype and shape (ft.check_input), then its data."""
    inputs = header.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise invalid("inputs must be a non-empty list of tensors")
    metas = [_tensor_meta(i, t) for i, t in enumerate(inputs)]
    ft.dialect_of(m[0] for m in metas)
    arrays, offset = {}, 0
    for (name, datatype, shape, size), t in zip(metas, inputs):
        dtype = ft.check_input(name, datatype, shape)
        if size is None:
            arrays[name] = _json_array(t.get("data"), datatype, shape, name)
            continue
        if "data" in t:
            raise invalid(f"input {name}: give its values as data or as binary_data_size bytes, not both")
        need = ft.byte_size(dtype, shape)
        if size != need:
            raise invalid(f"input {name}: shape {shape} of {datatype} needs {need} bytes, binary_data_size says {size}")
        if offset + size > len(binary):
            raise invalid(f"input {name}: its {size} binary bytes run past the end of the body "
                          f"({len(binary) - offset} left)")
        arrays[name] = np.frombuffer(binary[offset:offset + size], dtype).reshape(shape)
        offset += size
    if offset != len(binary):
        raise invalid(f"the body has {len(binary) - offset} bytes after the binary tensors")
    return arrays


def requested_outputs(header: dict) -> list[dict]:
    """The request's `outputs` entries, checked for form before anything runs (a malformed one found only when
    answering would throw the finished work away)."""
    outputs = header.get("outputs") or []
    if not isinstance(header.get("parameters") or {}, dict):
        raise invalid("parameters must be an object")
    if not isinstance(outputs, list) or not all(
            isinstance(o, dict) and isinstance(o.get("name"), str) and isinstance(o.get("parameters") or {}, dict)
            for o in outputs):
        raise invalid("outputs must be a list of objects, each with a name and, optionally, a parameters object")
    for o in outputs:  # read with bool(): a string such as "false" would turn binary output on
        unknown = sorted(set(o.get("parameters") or {}) - {"binary_data"})
        if unknown:  # shared memory or classification, which this server does not do: refused, not ignored
            raise invalid(f"output {o['name']}: parameters takes only binary_data, got {', '.join(unknown)}")
        flag = (o.get("parameters") or {}).get("binary_data")
        if flag is not None and not isinstance(flag, bool):
            raise invalid(f"output {o['name']}: binary_data must be true or false, got {flag!r}")
    return outputs


def encode_outputs(header: dict, outputs: dict[str, np.ndarray], answer: dict) -> Response:
    """The response: JSON tensors, or binary ones (with Inference-Header-Content-Length) where asked. Written as
    json.dumps writes `{**answer, "outputs": [...]}` (`answer` names the model at least), but a tensor's values a
    piece at a time (`_json_values`)."""
    every = bool((header.get("parameters") or {}).get("binary_data_output", False))
    wanted = {o["name"]: bool((o.get("parameters") or {}).get("binary_data", every)) for o in requested_outputs(header)}
    tensors, blobs = [], []
    for name, a in outputs.items():
        t = {"name": name, "datatype": ft.DATATYPE_OF[a.dtype.newbyteorder("=")], "shape": list(a.shape)}
        if wanted.get(name, every):
            blob = np.ascontiguousarray(a, a.dtype.newbyteorder("<")).tobytes()
            t["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
            tensors.append(json.dumps(t))
        else:
            tensors.append(json.dumps(t)[:-1] + ', "data": ' + _json_values(a) + "}")
    head = (json.dumps(answer)[:-1] + ', "outputs": [' + ", ".join(tensors) + "]}").encode()
    if not blobs:
        return Response(head, media_type="application/json")
    return Response(head + b"".join(blobs), media_type="application/octet-stream",
                    headers={"Inference-Header-Content-Length": str(len(head))})


def _json_values(a: np.ndarray) -> str:
    """`json.dumps(a.ravel().tolist())`, written PIECE_VALUES values per C call: json.dumps holds the GIL from start
    to end, so one call over a large tensor would pause the event loop even from a worker thread."""
    flat = a.ravel()
    if not flat.size:
        return "[]"
    pieces = (json.dumps(flat[i:i + PIECE_VALUES].tolist())[1:-1] for i in range(0, flat.size, PIECE_VALUES))
    return "[" + ", ".join(pieces) + "]"


def json_bytes(outputs: dict[str, np.ndarray]) -> int:
    """About the bytes of the outputs written as JSON (a token id's 5 digits and ", "; a float's are more)."""
    return 8 * sum(a.size for a in outputs.values())


def _request_id(body: dict) -> str | None:
    """The request's `id`, echoed in its answer: a string, as Triton takes it (a client matching answers by an id
    of another type would find it dropped or changed)."""
    value = body.get("id")
    if value is not None and not isinstance(value, str):
        raise invalid(f"id must be a string, got {value!r}")
    return value


# ---- Triton's generate extension ----------------------------------------------------------------------------
class Generate:
    """One generate / generate_stream call: `text_input` and its knobs, at the top level or in `parameters`."""

    def __init__(self, body: dict):
        if not isinstance(body.get("text_input"), str):
            raise invalid("text_input must be a string")
        self.text, self.id = body["text_input"], _request_id(body)
        params = body.get("parameters") or {}
        if not isinstance(params, dict):
            raise invalid("parameters must be an object")
        top = {k: v for k, v in body.items() if k not in ("text_input", "parameters", "id")}
        twice = sorted(set(top) & set(params))
        if twice:
            raise invalid(f"{', '.join(twice)} given both at the top level and in parameters")
        knobs = {**top, **params}
        unknown = sorted(set(knobs) - set(GENERATE_FIELDS) - set(GENERATE_FLAGS))
        if unknown:
            raise invalid(f"unknown field(s) {', '.join(unknown)}; generate takes text_input and "
                          f"{', '.join([*GENERATE_FIELDS, *GENERATE_FLAGS])}")
        for flag in GENERATE_FLAGS:
            if not isinstance(knobs.get(flag, False), bool):
                raise invalid(f"{flag} must be true or false, got {knobs[flag]!r}")
        self.with_prompt = not knobs.get("exclude_input_in_output", False)
        self.params = {GENERATE_FIELDS[k]: v for k, v in knobs.items() if k in GENERATE_FIELDS}
        self.end_id = self.params.pop("end_id", None)  # read as the tensors' end_id is (`ft.end_params`)

    async def request(self, frontend):
        """Tokenize off the event loop, then validate through the front end."""
        ids = await asyncio.wrap_future(frontend.tokenize_async(self.text, "text_input"))
        names = {**GENERATE_NAMES, "prompt": "text_input (as tokens)"}
        end = {} if self.end_id is None else ft.end_params(self.end_id, frontend)
        return frontend.validate(Params(prompt=ids, **self.params, **end), names)

    def answer(self, text: str) -> dict:
        out = {"model_name": MODEL_NAME, "model_version": MODEL_VERSION, "text_output": text}
        return out if self.id is None else {"id": self.id, **out}


def _shown(ids: list[int], stop_ids) -> list[int]:
    """The ids whose text is shown: the end-of-text token that ended the request is not."""
    return ids[:-1] if ids and ids[-1] in stop_ids else ids


async def _generate_events(call: Generate, stream, frontend, metered):
    """generate_stream's events: one `data: {text_output}` per piece of text; the prompt leads unless excluded."""
    decoder, lead = frontend.text_stream(), call.text if call.with_prompt else ""
    try:
        with metered:
            async for event in stream.events():
                final = isinstance(event, Finished)
                piece = decoder.add([] if final else _shown(event.ids, stream.request.stop_ids), final=final)
                if piece or lead:
                    yield sse(call.answer(lead + piece))
                    lead = ""
    except RequestError as e:
        yield sse({"error": e.message})
    finally:
        stream.request.cancel()


# ---- routes -------------------------------------------------------------------------------------------------
def _both(app: FastAPI, method: str, path: str):
    """Register a model route with and without `/versions/{version}`."""
    def register(handler):
        route = getattr(app, method)
        route(f"/v2/models/{{model}}{path}")(handler)
        route(f"/v2/models/{{model}}/versions/{{version}}{path}")(handler)
        return handler
    return register


def _health_routes(app: FastAPI, ctx: Context) -> None:
    frontend = ctx.frontend

    @app.get("/v2/health/live")
    async def live():
        return {"live": True}

    @app.get("/v2/health/ready")
    async def ready():
        frontend.require_ready()
        return {"ready": True}

    @app.get("/v2")
    async def server_metadata():
        return {"name": "gptjax", "version": gptjax.__version__, "extensions": EXTENSIONS}

    @app.get("/v2/models/stats")  # before /v2/models/{model}, which would take "stats" for a model's name
    @_both(app, "get", "/stats")
    async def statistics(model: str | None = None, version: str | None = None):
        if model is not None:
            check_model(model, version or "")
        raise RequestError(Code.UNIMPLEMENTED, "Triton's statistics extension is not served: /metrics has the counts")

    @_both(app, "get", "")
    async def model_metadata(model: str, version: str | None = None):
        check_model(model, version or "")
        return ft.model_metadata(ctx.dialect)

    @_both(app, "get", "/ready")
    async def model_ready(model: str, version: str | None = None):
        check_model(model, version or "")
        frontend.require_ready()
        return {"name": MODEL_NAME, "ready": True}

    @_both(app, "get", "/config")
    async def model_config(model: str, version: str | None = None):
        check_model(model, version or "")
        return ft.model_config(ctx.dialect, frontend)


def _infer_route(app: FastAPI, ctx: Context) -> None:
    frontend = ctx.frontend

    @_both(app, "post", "/infer")
    async def infer(http: HttpRequest, model: str, version: str | None = None):
        with frontend.api_call() as call:  # counted whatever refuses it, as over gRPC
            check_model(model, version or "")
            body = await ctx.body(http)
            # a large JSON body takes seconds of Python to read: off the event loop, which answers every other client
            length = http.headers.get("inference-header-content-length")
            header, binary = await off_loop(len(body), split_binary, body, length)
            request_id = _request_id(header)
            arrays = await off_loop(len(body), decode_inputs, header, binary)
            requested = [o["name"] for o in requested_outputs(header)]
            deadline = ft.request_deadline(header.get("parameters") or {}, also=("binary_data_output",))
            call.requests, info = ft.parse(arrays, frontend, deadline, requested)
            runs = streams(call.requests)
            frontend.submit(call.requests)
            work = asyncio.gather(*(s.completion() for s in runs))
            done = await until_disconnect(http, work, call.requests)
            outputs = ft.outputs(call.requests, done, info)
        answer = {"model_name": MODEL_NAME, "model_version": MODEL_VERSION}
        if request_id is not None:
            answer["id"] = request_id
        return await off_loop(json_bytes(outputs), encode_outputs, header, outputs, answer)


def _generate_routes(app: FastAPI, ctx: Context) -> None:
    frontend = ctx.frontend

    @_both(app, "post", "/generate")
    async def generate(http: HttpRequest, model: str, version: str | None = None):
        with frontend.api_call() as call:
            check_model(model, version or "")
            g = Generate(await ctx.json(http))
            call.requests = [await g.request(frontend)]
            (run,) = streams(call.requests)
            frontend.submit(call.requests)
            done = await until_disconnect(http, run.completion(), call.requests)
        new = frontend.decode(_shown(done.token_ids, call.requests[0].stop_ids))
        return JSONResponse(g.answer((g.text if g.with_prompt else "") + new))

    @_both(app, "post", "/generate_stream")
    async def generate_stream(http: HttpRequest, model: str, version: str | None = None):
        metered = contextlib.ExitStack()  # the API call, for the metrics: closed when the stream ends
        call = metered.enter_context(frontend.api_call())
        try:
            check_model(model, version or "")
            g = Generate(await ctx.json(http))
            call.requests = [await g.request(frontend)]
            (run,) = streams(call.requests)
            frontend.submit(call.requests)
        except BaseException:
            metered.__exit__(*sys.exc_info())
            raise

        def close():  # the stream ended before its first event: nothing else cancels or counts it
            run.request.cancel()
            metered.__exit__(ClientGone, ClientGone(), None)

        return EventStream(_generate_events(g, run, frontend, metered), on_close=close)


def add_routes(app: FastAPI, ctx: Context) -> None:
    _health_routes(app, ctx)
    _infer_route(app, ctx)
    _generate_routes(app, ctx)
